//! comet embedded in an existing axum application.
//!
//! The application has REST routes of its own and a SQLite user table (keys
//! stored as salted argon2id hashes); comet's WebSocket endpoint is mounted
//! beside them at `/sub`, and logins are checked against that table.
//!
//! ```text
//! cargo run --example embed_axum                                  # in-memory database
//! cargo run --example embed_axum -- --listen 127.0.0.1:3200 --db users.sqlite
//! ```
//!
//! Demo users 1 (key `pw1`) and 2 (key `pw2`) are added at startup if missing.
//! Talk to the application's own routes:
//!
//! ```text
//! curl http://127.0.0.1:3200/health
//! curl -i -X POST http://127.0.0.1:3200/users \
//!      -H 'content-type: application/json' -d '{"mid":5,"password":"pw5"}'
//! curl http://127.0.0.1:3200/users/5/online
//! curl -X POST http://127.0.0.1:3200/users/5/notify \
//!      -H 'content-type: application/json' -d '{"from":0,"msg":"hello from the backend"}'
//! ```
//!
//! Connect a WebSocket client (e.g. `websocat ws://127.0.0.1:3200/sub`) and
//! authenticate with a text frame; the reply is op 8:
//!
//! ```text
//! > {"ver":1,"op":7,"seq":1,"body":{"mid":1,"mkey":"pw1"}}
//! < {"ver":1,"op":8,"seq":1,"body":{"ret":0,"mid":1}}
//! ```
//!
//! Or log in over REST first: `POST /login` sets a `session` cookie (which a
//! browser's WebSocket to `/sub` sends by itself) and returns the same token
//! for `Authorization: Bearer`; op 7's body may then be empty. The
//! authenticator reads either from the upgrade request and attaches how the
//! session logged in, which `GET /users/{mid}/online` shows (`"via"`):
//!
//! ```text
//! curl -X POST http://127.0.0.1:3200/login \
//!      -H 'content-type: application/json' -d '{"mid":1,"password":"pw1"}'
//! websocat -H 'Authorization: Bearer <token>' ws://127.0.0.1:3200/sub
//! > {"ver":1,"op":7,"seq":1,"body":{}}
//! < {"ver":1,"op":8,"seq":1,"body":{"ret":0,"mid":1}}
//! > {"ver":1,"op":18,"seq":2,"body":{"from":1,"to":5,"msg":"hi 5"}}
//! < {"ver":1,"op":19,"seq":2,"body":{"ret":0,"chatId":1}}
//! ```
//!
//! Messages arrive as op 9 batches; send op 2 (heartbeat) at least every 90 s.
//! Ctrl-C stops accepting, then lets sessions flush and close.

mod app;

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use comet::core::BoxError;

#[derive(Parser, Debug)]
#[command(about = "an axum application with comet's WebSocket endpoint mounted at /sub")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3200")]
    listen: SocketAddr,
    /// SQLite user database; `:memory:` keeps it in memory.
    #[arg(long, default_value = ":memory:")]
    db: String,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    let users = Arc::new(app::SqlUsers::open(&args.db).await?);
    for mid in app::seed_demo_users(&users).await? {
        tracing::info!(mid, "added demo user");
    }
    let count: i64 = users
        .with_conn(|db| db.query_row("SELECT count(*) FROM users", [], |row| row.get(0)))
        .await?;
    tracing::info!(users = count, "user database ready");
    let sessions = Arc::new(app::Sessions::default());
    let comet = app::comet(users.clone(), sessions.clone());
    let router = app::app(comet.clone(), users, sessions);

    let listener = comet::transports::bind(args.listen)?;
    tracing::info!(addr = %listener.local_addr()?, db = %args.db, "listening; WebSocket at /sub");
    let stopping = comet.clone();
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: flushing sessions");
        // Upgraded connections run on their own tasks: comet closes them.
        stopping.shutdown();
    })
    .await?;
    let clean = comet.shutdown_and_wait().await;
    tracing::info!(clean, "stopped");
    Ok(())
}
