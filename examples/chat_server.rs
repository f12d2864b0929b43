//! The example chat server: comet with in-memory users and groups and a
//! crash-safe embedded message store (`[store]`, default `./comet-data`),
//! configured by a TOML file.
//!
//! ```text
//! cargo run --release --example chat_server                 # shipped examples/chat_server.toml
//! cargo run --release --example chat_server -- --config my.toml
//! ```
//!
//! TCP (binary frames) listens on `server.tcp`, WebSocket (JSON or goim
//! binary frames) on `server.websocket` at `server.ws_path`. Ctrl-C or
//! SIGTERM (systemd, containers) shuts down gracefully: listeners stop,
//! sessions flush their queues and close, and the process exits 0.
//! Logs go to stdout, coloured only when it is a terminal;
//! `--log-format json` writes one JSON object per line.
//! Set `RUST_LOG=debug` for per-session logs. Exit codes: 2 for a bad
//! config, 1 when the listeners or the store cannot start (e.g. a file in
//! the store's directory that is not a comet store; the message names it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use comet::server::{self, ServerConfig};

#[derive(Parser, Debug)]
#[command(about = "comet example chat server (in-memory users and groups, embedded message store)")]
struct Args {
    /// TOML configuration file; without it the shipped examples/chat_server.toml is used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log lines as text (coloured only on a terminal) or as one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stdout().is_terminal()).init(),
    }
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM; names the signal.
async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(e) => {
                tracing::warn!(cause = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logs(args.log_format);
    let started = Instant::now();
    let config = match &args.config {
        Some(path) => ServerConfig::load(path),
        None => ServerConfig::parse(server::DEFAULT_CONFIG, "examples/chat_server.toml"),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: bad config: {e}");
            return ExitCode::from(2);
        }
    };
    let (users, groups) = (config.users.len(), config.groups.len());
    let running = match server::start(config).await {
        Ok(running) => running,
        Err(e) => {
            eprintln!("error: could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        tcp = ?running.tcp_addr,
        websocket = ?running.ws_addr,
        users,
        groups,
        startup_ms = started.elapsed().as_millis() as u64,
        "comet chat server ready"
    );
    let signal = stop_signal().await;
    tracing::info!(signal, "shutting down: flushing sessions");
    let clean = running.shutdown().await;
    tracing::info!(clean, "stopped");
    ExitCode::SUCCESS
}
