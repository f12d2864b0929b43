//! Soak test: a steady mixed load against the example server's assembly for
//! a configurable time, sampling memory, file descriptors and queue depths
//! every second into a CSV, and failing if memory or descriptors keep
//! growing after the warm-up.
//!
//! ```text
//! cargo run --release --example soak -- --seconds 600 --clients 2000 --rate 2000 --csv soak.csv
//! ```
//!
//! The server runs in this process (so /proc/self covers it and the load
//! clients together; the clients' footprint is constant once connected).
//! Load: every client sends 1:1 and group messages at a fixed total rate,
//! reads everything it receives, heartbeats, and every 50th client
//! reconnects after a 5–65 s life (churn finds leaks that a static load
//! hides). The verdict compares the last third of the run with the
//! first sample after warm-up.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use comet::core::codec::TcpCodec;
use comet::core::frame::{op, Frame, WireMode};
use comet::core::payload::SendRequest;
use comet::server::{GroupEntry, ServerConfig, UserEntry};
use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::Framed;

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(about = "comet soak test: steady mixed load, RSS/fd/queue sampling, growth verdict")]
pub struct Args {
    /// Total run time in seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Warm-up before the baseline sample, in seconds.
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Connected clients.
    #[arg(long, default_value_t = 200)]
    pub clients: i32,
    /// Messages per second, all clients together.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// CSV output.
    #[arg(long, default_value = "soak.csv")]
    pub csv: PathBuf,
    /// Allowed RSS growth after warm-up, in percent (and at least 8 MiB).
    #[arg(long, default_value_t = 20.0)]
    pub tolerance_pct: f64,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    failed: AtomicU64,
}

async fn client(
    addr: std::net::SocketAddr,
    mid: i32,
    clients: i32,
    interval: Duration,
    counters: Arc<Counters>,
    stop: tokio_util::sync::CancellationToken,
) {
    while !stop.is_cancelled() {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut framed = Framed::new(stream, TcpCodec::new(1 << 20));
        let login = format!(r#"{{"mid":{mid},"mkey":"k{mid}"}}"#);
        if framed
            .send(Frame::new(1, op::AUTH, 1, login))
            .await
            .is_err()
        {
            continue;
        }
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(Duration::from_secs(20));
        let mut seq = 1u32;
        let mut n = 0i32;
        // Churn: a client lives for a random-ish while, then reconnects.
        let life = Duration::from_secs(5 + (mid as u64 * 7919) % 60);
        let born = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {
                    seq += 1;
                    n += 1;
                    let (op, to) = if n % 2 == 0 {
                        (op::SEND_TO_USER, (mid * 31 + n) % clients + 1)
                    } else {
                        (op::SEND_TO_GROUP, 1 + (mid - 1) / 20)
                    };
                    let body = SendRequest { from: mid, to, msg: Bytes::from(format!("soak {mid} {n}")) }.encode(WireMode::Binary);
                    if framed.send(Frame::new(1, op, seq, body)).await.is_err() { break; }
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                _ = heartbeat.tick() => {
                    seq += 1;
                    if framed.send(Frame::new(1, op::HEARTBEAT, seq, "")).await.is_err() { break; }
                }
                frame = framed.next() => match frame {
                    Some(Ok(f)) if f.op == op::BATCH => {
                        let n = comet::core::codec::read_batch(WireMode::Binary, &f.body, 1 << 20).map(|v| v.len()).unwrap_or(0);
                        counters.received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Some(Ok(f)) if (f.op == op::SEND_TO_USER_REPLY || f.op == op::SEND_TO_GROUP_REPLY) && f.body.first() != Some(&0) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                },
            }
            if born.elapsed() > life && mid % 50 == 0 {
                break;
            }
        }
    }
}

/// What a soak run saw.
#[derive(Debug)]
pub struct Verdict {
    /// Memory and descriptors stayed within bounds after the warm-up.
    pub steady: bool,
    /// Messages sent.
    pub sent: u64,
    /// Messages received.
    pub received: u64,
    /// Sends refused.
    pub refused: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match soak(Args::parse()).await {
        Ok(v) if v.steady => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the soak and judges it (also run at a small scale by tests/soak.rs).
pub async fn soak(args: Args) -> std::io::Result<Verdict> {
    let mut config = ServerConfig::parse("[server]\ntcp = \"127.0.0.1:0\"\n", "soak")
        .map_err(std::io::Error::other)?;
    config.users = (1..=args.clients)
        .map(|mid| UserEntry {
            mid,
            mkey: format!("k{mid}"),
        })
        .collect();
    config.groups = (0..(args.clients + 19) / 20)
        .map(|g| GroupEntry {
            id: g + 1,
            members: (g * 20 + 1..=(g * 20 + 20).min(args.clients)).collect(),
        })
        .collect();
    config.server.max_frames_per_sec = 0;
    // A small history bound so the store reaches its steady size early.
    config.store.history_limit = 50;
    config.store.backend = comet::server::StoreBackend::Memory;
    let running = comet::server::start(config).await?;
    let addr = running
        .tcp_addr
        .ok_or_else(|| std::io::Error::other("no tcp listener"))?;
    let counters = Arc::new(Counters {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let per_client = Duration::from_secs_f64(args.clients as f64 / args.rate.max(1) as f64);
    for mid in 1..=args.clients {
        tokio::spawn(client(
            addr,
            mid,
            args.clients,
            per_client,
            counters.clone(),
            stop.clone(),
        ));
    }
    let mut csv = String::from("second,rss_kib,open_fds,sessions,pending_bytes_total,pending_bytes_max,sent,received,failed\n");
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for second in 1..=args.seconds {
        tick.tick().await;
        let (pending, pending_max) = running.comet.registry().pending_bytes();
        let row = (
            second,
            rss_kib(),
            open_fds(),
            running.comet.session_count(),
            pending,
            pending_max,
        );
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            row.0,
            row.1,
            row.2,
            row.3,
            row.4,
            row.5,
            counters.sent.load(Ordering::Relaxed),
            counters.received.load(Ordering::Relaxed),
            counters.failed.load(Ordering::Relaxed)
        ));
        samples.push(row);
        eprint!("\r{second:>5}s  rss {:>7} KiB  fds {:>6}  sessions {:>6}  queued {:>8} B  sent {:>9}  received {:>10}   ",
            row.1, row.2, row.3, row.4, counters.sent.load(Ordering::Relaxed), counters.received.load(Ordering::Relaxed));
    }
    eprintln!();
    stop.cancel();
    std::fs::write(&args.csv, &csv)?;
    let _ = running.shutdown().await;
    let elapsed = started.elapsed().as_secs_f64();
    let sent = counters.sent.load(Ordering::Relaxed);
    println!(
        "ran {elapsed:.0}s: sent {sent} ({:.0}/s), received {}, refused {}; samples in {}",
        sent as f64 / elapsed,
        counters.received.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed),
        args.csv.display()
    );
    let mut verdict = Verdict {
        steady: true,
        sent,
        received: counters.received.load(Ordering::Relaxed),
        refused: counters.failed.load(Ordering::Relaxed),
    };
    let Some(base) = samples.get(args.warmup as usize) else {
        println!("verdict: run shorter than the warm-up, nothing to judge");
        return Ok(verdict);
    };
    let tail = &samples[samples.len() - samples.len() / 3..];
    let rss_end = tail.iter().map(|s| s.1).max().unwrap_or(0);
    let fds_end = tail.iter().map(|s| s.2).max().unwrap_or(0);
    let rss_allowed = base.1 + ((base.1 as f64 * args.tolerance_pct / 100.0) as u64).max(8 * 1024);
    let fds_allowed = base.2 + (base.2 / 20).max(16);
    println!("rss after warm-up {} KiB, in the last third up to {rss_end} KiB (allowed {rss_allowed}); fds {} -> {fds_end} (allowed {fds_allowed})", base.1, base.2);
    if rss_end > rss_allowed || fds_end > fds_allowed {
        println!("verdict: FAIL, memory or descriptors keep growing");
        verdict.steady = false;
    } else {
        println!("verdict: ok");
    }
    Ok(verdict)
}
