//! # comet-bench
//!
//! The load generator and the reference servers behind `BENCHMARKS.md`.
//!
//! ```text
//! comet-bench serve --server comet   --tcp 127.0.0.1:4101 --ws 127.0.0.1:4102 --users 20000 --groups 1 --group-size 2000
//! comet-bench serve --server comet   --tcp 127.0.0.1:4101 --users 2010 --groups 1 --group-size 2000 --metrics
//! comet-bench serve --server ceiling --tcp 127.0.0.1:4201 --groups 1 --group-size 2000
//! comet-bench serve --server peer    --tcp 127.0.0.1:4301 --groups 1 --group-size 2000
//! comet-bench run fanout --addr 127.0.0.1:4101 --server-pid PID --members 2000 --messages 2000
//! comet-bench run idle   --addr 127.0.0.1:4101 --server-pid PID --connections 15000 --sources 8
//! comet-bench run fanout --addr 127.0.0.1:4301 --transport socket-io --members 2000 --messages 2000
//! ```
//!
//! Every `run` prints a human-readable summary on stderr and one JSON line of
//! results on stdout. `examples/scripts/bench.sh` runs the whole matrix;
//! `examples/scripts/bench_metrics.sh` compares `--metrics` on and off.

mod ceiling;
mod peer;
mod procfs;
mod proto;
mod report;
mod scenarios;
mod store_fill;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use proto::{Sources, Transport};

/// Groups of the benchmark servers: group g (1-based) holds mids
/// (g-1)*size+1 ..= g*size.
#[derive(Clone, Copy, Debug, clap::Args)]
pub(crate) struct Layout {
    /// Number of groups.
    #[arg(long, default_value_t = 1)]
    groups: i32,
    /// Members per group.
    #[arg(long, default_value_t = 2000)]
    group_size: i32,
}

impl Layout {
    pub(crate) fn members(&self, group: i32) -> std::ops::RangeInclusive<i32> {
        (group - 1) * self.group_size + 1..=group * self.group_size
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ServerKind {
    /// comet with its default plug-ins (the example server's assembly).
    Comet,
    /// A bare tokio server with no auth backend, store or middleware.
    Ceiling,
    /// The same chat semantics on axum + socketioxide (socket.io on the
    /// `--tcp` address; run with `--transport socket-io`).
    Peer,
}

/// Which message store comet runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StoreArg {
    /// `MemoryStore`.
    Memory,
    /// `EmbeddedStore` (SQLite), in `--store-path`.
    Embedded,
    /// Cluster mode on the Redis at `--redis-url` (one node of it; start
    /// several with different `--node-id`s and ports).
    Redis,
}

/// The embedded store's fsync mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FsyncArg {
    /// Acknowledged once written to the OS; fsync within 1 s.
    Interval,
    /// Acknowledged once fsynced (group commit).
    Always,
}

/// Where a `serve --server comet` keeps its messages.
#[derive(Clone, Debug)]
struct StoreChoice {
    store: StoreArg,
    path: std::path::PathBuf,
    fsync: FsyncArg,
    redis_url: String,
    node_id: Option<String>,
}

#[derive(Parser, Debug)]
#[command(about = "comet load generator and reference servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a server to benchmark (until killed).
    Serve {
        #[arg(long, value_enum)]
        server: ServerKind,
        #[arg(long, default_value = "127.0.0.1:4101")]
        tcp: SocketAddr,
        #[arg(long)]
        ws: Option<SocketAddr>,
        /// Users 1..=N with mkey "k{mid}" (comet and peer).
        #[arg(long, default_value_t = 20_000)]
        users: i32,
        /// Messages comet keeps per conversation.
        #[arg(long, default_value_t = 100)]
        history: usize,
        /// comet's message store.
        #[arg(long, value_enum, default_value_t = StoreArg::Memory)]
        store: StoreArg,
        /// The embedded store's directory (emptied first).
        #[arg(long, default_value = "target/bench/store")]
        store_path: std::path::PathBuf,
        /// The embedded store's fsync mode.
        #[arg(long, value_enum, default_value_t = FsyncArg::Interval)]
        fsync: FsyncArg,
        /// comet only: install the Prometheus recorder (as chat_server does
        /// with `[admin]`) before the comet is built, so every series is
        /// recorded, and render the exposition every `--scrape-secs` as a
        /// scraper would. Off: the `metrics` facade has no recorder and every
        /// handle is a no-op.
        #[arg(long)]
        metrics: bool,
        /// With `--metrics`: seconds between two renders of `/metrics`.
        #[arg(long, default_value_t = 15)]
        scrape_secs: u64,
        /// The Redis of `--store redis`.
        #[arg(long, default_value = "redis://127.0.0.1:6379/")]
        redis_url: String,
        /// This node's id with `--store redis` (default: from host and ports).
        #[arg(long)]
        node_id: Option<String>,
        #[command(flatten)]
        layout: Layout,
    },
    /// Fills an embedded store with N messages of B bytes over C
    /// conversations, closes it and opens it again: appends/s, open time,
    /// disk bytes per message (one JSON line).
    StoreFill {
        #[arg(long, default_value = "target/bench/fill")]
        path: std::path::PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 100)]
        msg_bytes: usize,
        #[arg(long, default_value_t = 1000)]
        conversations: i32,
    },
    /// Turns a results file (JSON lines) into markdown tables on stdout and
    /// SVG plots.
    Report {
        /// The JSON lines of many runs.
        results: std::path::PathBuf,
        /// Where the SVG plots go.
        #[arg(long, default_value = "docs/bench")]
        plots: std::path::PathBuf,
    },
    /// Runs one scenario against a running server.
    Run {
        #[command(subcommand)]
        scenario: Scenario,
        #[arg(long, global = true, default_value = "127.0.0.1:4101")]
        addr: SocketAddr,
        /// More server addresses (cluster nodes): connection i goes to the
        /// (i mod n)-th of `--addr` followed by these.
        #[arg(long, global = true, value_delimiter = ',')]
        more_addrs: Vec<SocketAddr>,
        #[arg(long, global = true, value_enum, default_value_t = Transport::Tcp)]
        transport: Transport,
        /// The server's pid, for RSS and CPU from /proc.
        #[arg(long, global = true)]
        server_pid: Option<u32>,
        /// Loopback source addresses to spread connections over.
        #[arg(long, global = true, default_value_t = 8)]
        sources: u8,
        /// Connections being set up at once.
        #[arg(long, global = true, default_value_t = 256)]
        connect_concurrency: usize,
        /// Labels copied into the JSON line (e.g. server=comet).
        #[arg(long, global = true)]
        label: Vec<String>,
        /// No progress display.
        #[arg(long, global = true)]
        quiet: bool,
    },
}

#[derive(Subcommand, Debug, Clone)]
enum Scenario {
    /// N authenticated idle connections: RSS per connection, connect+auth rate.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: i32,
        #[arg(long, default_value_t = 3)]
        hold_secs: u64,
    },
    /// One sender, a group of N: delivered msgs/s, latency, exactly-once in order.
    Fanout {
        #[arg(long, default_value_t = 2000)]
        members: i32,
        #[arg(long, default_value_t = 1000)]
        messages: u64,
        /// Fixed rate in messages/s (default: as fast as acks come back).
        #[arg(long)]
        rate: Option<u64>,
        #[arg(long, default_value_t = 32)]
        msg_bytes: usize,
        /// Pause between the last login and the first send, in ms. Right
        /// after thousands of logins the load generator itself (not the
        /// server: the bare tokio ceiling shows the same) delivers nothing
        /// for about 300 ms, which would put the first dozen messages of a
        /// fixed-rate run into its p99.
        #[arg(long, default_value_t = 1000)]
        settle_ms: u64,
    },
    /// P pairs ping-ponging op 18: round trips/s and latency.
    Pairs {
        #[arg(long, default_value_t = 100)]
        pairs: i32,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        msg_bytes: usize,
    },
    /// One client stores notes to itself, then replays them with op 22 page
    /// by page: replayed messages/s (serve with --history at least --messages).
    Sync {
        #[arg(long, default_value_t = 1000)]
        messages: u64,
        #[arg(long, default_value_t = 50)]
        rounds: u32,
        /// Messages per sync (the server caps it; 100 by default).
        #[arg(long, default_value_t = 100)]
        page: u32,
        /// Sends, then syncs, in flight at once.
        #[arg(long, default_value_t = 8)]
        depth: usize,
        #[arg(long, default_value_t = 32)]
        msg_bytes: usize,
    },
    /// N clients each sending notes to themselves, one unacknowledged send
    /// at a time: acknowledged sends/s (the store's commit path).
    Senders {
        #[arg(long, default_value_t = 100)]
        senders: i32,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        msg_bytes: usize,
    },
    /// Many users in many groups, 1:1 and group traffic at a fixed load.
    Mixed {
        #[arg(long, default_value_t = 50)]
        groups: i32,
        #[arg(long, default_value_t = 20)]
        group_size: i32,
        /// Messages per second per user.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        msg_bytes: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Report { results, plots } => match report::report(&results, &plots) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Serve {
                server,
                tcp,
                ws,
                users,
                history,
                store,
                store_path,
                fsync,
                metrics,
                scrape_secs,
                redis_url,
                node_id,
                layout,
            } => {
                let store = StoreChoice {
                    store,
                    path: store_path,
                    fsync,
                    redis_url,
                    node_id,
                };
                if metrics {
                    if server != ServerKind::Comet {
                        eprintln!("error: --metrics needs --server comet");
                        return ExitCode::FAILURE;
                    }
                    if let Err(e) = record_metrics(Duration::from_secs(scrape_secs.max(1))) {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
                serve(server, tcp, ws, users, history, store, layout).await
            }
            Command::StoreFill {
                path,
                messages,
                msg_bytes,
                conversations,
            } => match store_fill::run(&path, messages, msg_bytes, conversations).await {
                Ok(value) => {
                    println!("{value}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Run {
                scenario,
                addr,
                more_addrs,
                transport,
                server_pid,
                sources,
                connect_concurrency,
                label,
                quiet,
            } => {
                let mut addrs = vec![addr];
                addrs.extend(more_addrs);
                let ctx = scenarios::Ctx {
                    addrs,
                    transport,
                    server_pid,
                    sources: Sources(sources),
                    connect_concurrency,
                    quiet,
                };
                run(&ctx, scenario, label).await
            }
        }
    })
}

/// Installs chat_server's Prometheus recorder (before the comet is built:
/// the comet takes its metric handles from the recorder installed then) and
/// renders the exposition every `every`, as a scraper would.
fn record_metrics(every: Duration) -> Result<(), &'static str> {
    let handle =
        comet::server::prometheus().ok_or("the Prometheus recorder could not be installed")?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let text = handle.render();
            tracing::debug!(bytes = text.len(), "metrics rendered");
        }
    });
    Ok(())
}

async fn serve(
    kind: ServerKind,
    tcp: SocketAddr,
    ws: Option<SocketAddr>,
    users: i32,
    history: usize,
    store: StoreChoice,
    layout: Layout,
) -> ExitCode {
    match kind {
        ServerKind::Ceiling => match ceiling::serve(tcp, ws, layout).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        ServerKind::Peer => match peer::serve(tcp, layout, users).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        ServerKind::Comet => {
            let text = format!("[server]\ntcp = \"{tcp}\"\n");
            let mut config = match comet::server::ServerConfig::parse(&text, "bench") {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            config.server.tcp = Some(tcp);
            config.server.websocket = ws;
            // Benchmarks flood on purpose, from few source addresses.
            config.server.max_frames_per_sec = 0;
            config.server.max_connections = 1_000_000;
            config.server.max_connections_per_ip = 1_000_000;
            config.store.history_limit = history;
            config.store.backend = match store.store {
                StoreArg::Memory => comet::server::StoreBackend::Memory,
                StoreArg::Embedded => {
                    // Every run starts from an empty store.
                    let _ = std::fs::remove_dir_all(&store.path);
                    comet::server::StoreBackend::Embedded
                }
                StoreArg::Redis => {
                    config.store.url = store.redis_url.clone();
                    config.cluster.node_id = store.node_id.clone();
                    comet::server::StoreBackend::Redis
                }
            };
            config.store.path = store.path;
            config.store.fsync = match store.fsync {
                FsyncArg::Interval => comet::server::FsyncMode::Interval,
                FsyncArg::Always => comet::server::FsyncMode::Always,
            };
            config.users = (1..=users)
                .map(|mid| comet::server::UserEntry {
                    mid,
                    mkey: format!("k{mid}"),
                })
                .collect();
            config.groups = (1..=layout.groups)
                .map(|g| comet::server::GroupEntry {
                    id: g,
                    members: layout.members(g).collect(),
                })
                .collect();
            match comet::server::start(config).await {
                Ok(running) => {
                    eprintln!(
                        "comet listening on tcp {:?} ws {:?}",
                        running.tcp_addr, running.ws_addr
                    );
                    std::future::pending::<()>().await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(ctx: &scenarios::Ctx, scenario: Scenario, labels: Vec<String>) -> ExitCode {
    let (name, result) = match scenario.clone() {
        Scenario::Idle {
            connections,
            hold_secs,
        } => (
            "idle",
            scenarios::idle(ctx, connections, Duration::from_secs(hold_secs)).await,
        ),
        Scenario::Fanout {
            members,
            messages,
            rate,
            msg_bytes,
            settle_ms,
        } => (
            "fanout",
            scenarios::fanout(
                ctx,
                members,
                messages,
                rate,
                msg_bytes,
                Duration::from_millis(settle_ms),
            )
            .await,
        ),
        Scenario::Pairs {
            pairs,
            seconds,
            msg_bytes,
        } => (
            "pairs",
            scenarios::pairs(ctx, pairs, Duration::from_secs(seconds), msg_bytes).await,
        ),
        Scenario::Senders {
            senders,
            seconds,
            msg_bytes,
        } => (
            "senders",
            scenarios::senders(ctx, senders, Duration::from_secs(seconds), msg_bytes).await,
        ),
        Scenario::Sync {
            messages,
            rounds,
            page,
            depth,
            msg_bytes,
        } => (
            "sync",
            scenarios::sync(ctx, messages, rounds, page, depth, msg_bytes).await,
        ),
        Scenario::Mixed {
            groups,
            group_size,
            rate,
            seconds,
            msg_bytes,
        } => (
            "mixed",
            scenarios::mixed(
                ctx,
                groups,
                group_size,
                rate,
                Duration::from_secs(seconds),
                msg_bytes,
            )
            .await,
        ),
    };
    match result {
        Ok(mut value) => {
            let ok = value["ok"].as_bool().unwrap_or(false);
            value["scenario"] = json!(name);
            value["transport"] = json!(ctx.transport);
            for label in labels {
                if let Some((k, v)) = label.split_once('=') {
                    value[k] = json!(v);
                }
            }
            eprintln!(
                "{name} ({:?}): {}",
                ctx.transport,
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
            println!("{value}");
            if ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: {name} found lost, duplicated, reordered or refused messages");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {name} failed: {e}");
            ExitCode::FAILURE
        }
    }
}
