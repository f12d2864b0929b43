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
//! hides), syncing (op 22) every conversation it knows right after.
//!
//! Two verdicts. Memory: the last third of the run against the first sample
//! after warm-up. Delivery: every client checks each message it receives
//! (no duplicate and no step back in chatId within a session, the text
//! names its sender), and at the end, once every send has its reply and
//! the queues are drained, syncs every conversation it is part of (each
//! with an acknowledged message): a chatId up to the head that it still
//! lacks is lost, and one that only the sync supplied to a client that
//! never reconnected is a gap in live delivery. Both fail the run.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use comet::core::codec::{read_batch, TcpCodec};
use comet::core::frame::{op, Frame, WireMode};
use comet::core::payload::{Delivered, SendReply, SendRequest, SyncReply, SyncRequest};
use comet::core::Conversation;
use comet::server::{GroupEntry, ServerConfig, UserEntry};
use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

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
    acked: AtomicU64,
    received: AtomicU64,
    failed: AtomicU64,
    /// Clients that stopped sending and got every reply.
    settled: AtomicU64,
}

/// Everything run-wide the clients share.
struct Shared {
    addr: std::net::SocketAddr,
    clients: i32,
    interval: Duration,
    counters: Counters,
    /// The newest acknowledged chatId of each conversation.
    acked: Mutex<HashMap<Conversation, i64>>,
    /// Stop sending (keep reading, wait for the replies).
    stop_sending: CancellationToken,
    /// Every reply is in and every queue drained: check and report.
    check: CancellationToken,
}

/// The chatIds one client holds of one conversation: all up to `upto`,
/// and some above it (delivered out of the order of the client's own
/// acknowledgements).
#[derive(Debug, Default)]
struct Held {
    upto: i64,
    above: BTreeSet<i64>,
}

impl Held {
    /// Adds `id`; whether it was new.
    fn insert(&mut self, id: i64) -> bool {
        if id <= self.upto || !self.above.insert(id) {
            return false;
        }
        while self.above.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
        true
    }

    /// How many of 1..=head are missing.
    fn missing(&self, head: i64) -> i64 {
        let above = self.above.range(..=head).count() as i64;
        (head - self.upto - above).max(0)
    }

    fn count(&self) -> usize {
        self.upto as usize + self.above.len()
    }
}

/// What one client saw; summed into the [`Verdict`].
#[derive(Debug, Default)]
struct Report {
    duplicates: u64,
    out_of_order: u64,
    corrupt: u64,
    gaps: u64,
    recovered: u64,
    lost: u64,
    reconnects: u64,
    unchecked: bool,
}

/// One client's state across its connections.
struct Client {
    mid: i32,
    held: HashMap<Conversation, Held>,
    report: Report,
    /// This session: the newest chatId per conversation received live, and
    /// the conversations it synced (where replays may repeat live ones).
    last_live: HashMap<Conversation, i64>,
    synced: HashSet<Conversation>,
    /// Sends waiting for their reply: seq -> conversation.
    outstanding: HashMap<u32, Conversation>,
    seq: u32,
}

type Conn = Framed<tokio::net::TcpStream, TcpCodec>;

impl Client {
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Takes in one received frame: deliveries are checked and held, send
    /// replies settle their send. Returns a sync reply, if it was one.
    fn receive(&mut self, f: Frame, shared: &Shared) -> Option<(u32, SyncReply)> {
        match f.op {
            op::BATCH => {
                let inner = read_batch(WireMode::Binary, &f.body, 1 << 20).unwrap_or_default();
                for frame in inner {
                    shared.counters.received.fetch_add(1, Ordering::Relaxed);
                    match Delivered::decode(WireMode::Binary, &frame) {
                        Ok(d) => self.delivered(d),
                        Err(_) => self.report.corrupt += 1,
                    }
                }
            }
            op::SEND_TO_USER_REPLY | op::SEND_TO_GROUP_REPLY => {
                let Some(conv) = self.outstanding.remove(&f.seq) else {
                    self.report.corrupt += 1;
                    return None;
                };
                match SendReply::decode(WireMode::Binary, &f.body) {
                    Ok(r) if r.ret == 0 => {
                        shared.counters.acked.fetch_add(1, Ordering::Relaxed);
                        self.held.entry(conv).or_default().insert(r.chat_id);
                        let mut acked = shared.acked.lock().unwrap_or_else(|e| e.into_inner());
                        let max = acked.entry(conv).or_default();
                        *max = (*max).max(r.chat_id);
                    }
                    _ => {
                        shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            op::SYNC_REPLY => {
                if let Ok(r) = SyncReply::decode(WireMode::Binary, &f.body) {
                    return Some((f.seq, r));
                }
            }
            _ => {}
        }
        None
    }

    fn delivered(&mut self, d: Delivered) {
        let conv = match d.op {
            op::SEND_TO_GROUP => Conversation::Group(d.to),
            _ => Conversation::direct(d.from, d.to),
        };
        // Every message says who sent it: "soak FROM N".
        let from_text = std::str::from_utf8(&d.msg)
            .ok()
            .and_then(|t| t.strip_prefix("soak "))
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse::<i32>().ok());
        if from_text != Some(d.from) {
            self.report.corrupt += 1;
        }
        let new = self.held.entry(conv).or_default().insert(d.chat_id);
        if self.synced.contains(&conv) {
            // A replay may repeat a live delivery (PROTOCOL.md 2.7).
            return;
        }
        if !new {
            self.report.duplicates += 1;
        }
        let last = self.last_live.entry(conv).or_default();
        if d.chat_id < *last {
            self.report.out_of_order += 1;
        }
        *last = (*last).max(d.chat_id);
    }

    async fn sync(&mut self, conn: &mut Conn, conv: Conversation, after: i64) -> io::Result<u32> {
        let (kind, to) = match conv {
            Conversation::Group(g) => (op::SEND_TO_GROUP, g),
            Conversation::Direct(a, b) => (op::SEND_TO_USER, if a == self.mid { b } else { a }),
        };
        let seq = self.next_seq();
        let body = SyncRequest {
            kind,
            to,
            after,
            limit: None,
        }
        .encode(WireMode::Binary);
        self.synced.insert(conv);
        conn.send(Frame::new(1, op::SYNC, seq, body))
            .await
            .map_err(io::Error::other)?;
        Ok(seq)
    }

    /// Syncs `conv` until this client holds every chatId up to its head;
    /// counts what the sync had to supply and what is gone.
    async fn check(
        &mut self,
        conn: &mut Conn,
        conv: Conversation,
        shared: &Shared,
        reconnected: bool,
    ) -> io::Result<()> {
        let before = self.held.get(&conv).map_or(0, Held::count);
        let mut head: i64;
        loop {
            let after = self.held.get(&conv).map_or(0, |h| h.upto);
            let seq = self.sync(conn, conv, after).await?;
            let reply = loop {
                let f = match conn.next().await {
                    Some(Ok(f)) => f,
                    _ => return Err(io::ErrorKind::UnexpectedEof.into()),
                };
                if let Some((s, r)) = self.receive(f, shared) {
                    if s == seq {
                        break r;
                    }
                }
            };
            if reply.ret != 0 {
                self.report.unchecked = true;
                return Ok(());
            }
            head = reply.head;
            let upto = self.held.get(&conv).map_or(0, |h| h.upto);
            if upto >= head || upto == after {
                break;
            }
        }
        let supplied = (self.held.get(&conv).map_or(0, Held::count) - before) as u64;
        if reconnected {
            self.report.recovered += supplied;
        } else {
            self.report.gaps += supplied;
        }
        self.report.lost += self.held.get(&conv).map_or(head, |h| h.missing(head)) as u64;
        Ok(())
    }
}

async fn login(addr: std::net::SocketAddr, mid: i32) -> Option<Conn> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut conn = Framed::new(stream, TcpCodec::new(1 << 20));
    let body = format!(r#"{{"mid":{mid},"mkey":"k{mid}"}}"#);
    conn.send(Frame::new(1, op::AUTH, 1, body)).await.ok()?;
    match conn.next().await {
        Some(Ok(f)) if f.op == op::AUTH_REPLY && f.body.starts_with(br#"{"ret":0"#) => Some(conn),
        _ => None,
    }
}

/// One client: sends 1:1 and group messages at its rate, reads and checks
/// everything it receives, heartbeats, and (every 50th) reconnects after a
/// while, syncing what it may have missed. After the stop it waits for its
/// replies, then for the check, and syncs every conversation it is part of.
async fn client(
    shared: Arc<Shared>,
    mid: i32,
    expected: Arc<Mutex<HashMap<i32, Vec<Conversation>>>>,
) -> Report {
    let mut c = Client {
        mid,
        held: HashMap::new(),
        report: Report::default(),
        last_live: HashMap::new(),
        synced: HashSet::new(),
        outstanding: HashMap::new(),
        seq: 1,
    };
    let clients = shared.clients;
    let mut n = 0i32;
    let mut reported_settled = false;
    let mut sessions = 0u64;
    loop {
        let Some(mut conn) = login(shared.addr, mid).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        sessions += 1;
        c.last_live.clear();
        c.synced.clear();
        c.outstanding.clear();
        if sessions > 1 {
            // What the last session may have lost at its close.
            let known: Vec<(Conversation, i64)> =
                c.held.iter().map(|(k, h)| (*k, h.upto)).collect();
            for (conv, upto) in known {
                if c.sync(&mut conn, conv, upto).await.is_err() {
                    break;
                }
            }
        }
        let mut ticker = tokio::time::interval(shared.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(Duration::from_secs(20));
        // Churn: a client lives for a random-ish while, then reconnects.
        let life = Duration::from_secs(5 + (mid as u64 * 7919) % 60);
        let born = Instant::now();
        let checking = loop {
            if shared.stop_sending.is_cancelled() && c.outstanding.is_empty() && !reported_settled {
                reported_settled = true;
                shared.counters.settled.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = shared.check.cancelled() => break true,
                _ = ticker.tick(), if !shared.stop_sending.is_cancelled() => {
                    n += 1;
                    let (op, to, conv) = if n % 2 == 0 && clients > 1 {
                        let mut to = (mid * 31 + n) % clients + 1;
                        if to == mid {
                            to = to % clients + 1;
                        }
                        (op::SEND_TO_USER, to, Conversation::direct(mid, to))
                    } else {
                        let g = 1 + (mid - 1) / 20;
                        (op::SEND_TO_GROUP, g, Conversation::Group(g))
                    };
                    let seq = c.next_seq();
                    let body = SendRequest { from: mid, to, msg: Bytes::from(format!("soak {mid} {n}")) }.encode(WireMode::Binary);
                    c.outstanding.insert(seq, conv);
                    if conn.send(Frame::new(1, op, seq, body)).await.is_err() { break false; }
                    shared.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                _ = heartbeat.tick() => {
                    let seq = c.next_seq();
                    if conn.send(Frame::new(1, op::HEARTBEAT, seq, "")).await.is_err() { break false; }
                }
                frame = conn.next() => match frame {
                    Some(Ok(f)) => { c.receive(f, &shared); }
                    _ => break false,
                },
                _ = shared.stop_sending.cancelled(), if !shared.stop_sending.is_cancelled() => {}
            }
            if !shared.stop_sending.is_cancelled() && mid % 50 == 0 && born.elapsed() > life {
                break false;
            }
        };
        if checking {
            let reconnected = sessions > 1;
            c.report.reconnects = sessions - 1;
            let mut convs: HashSet<Conversation> = c.held.keys().copied().collect();
            let expected = expected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&mid)
                .unwrap_or_default();
            convs.extend(expected);
            let mut convs: Vec<Conversation> = convs.into_iter().collect();
            convs.sort();
            for conv in convs {
                if c.check(&mut conn, conv, &shared, reconnected)
                    .await
                    .is_err()
                {
                    c.report.unchecked = true;
                    break;
                }
            }
            return c.report;
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
    /// Sends acknowledged (op 19 / op 21 ret 0).
    pub acked: u64,
    /// Messages received (live, from inboxes and from syncs).
    pub received: u64,
    /// Sends refused.
    pub refused: u64,
    /// Every client got every reply and was checked.
    pub settled: bool,
    /// chatIds up to a conversation's head that a member still lacks after
    /// syncing it (acknowledged messages among them): lost.
    pub lost: u64,
    /// A message received twice by one client outside a sync.
    pub duplicates: u64,
    /// A conversation going back in chatId within one session.
    pub out_of_order: u64,
    /// Messages a client that never reconnected had to sync: a gap in
    /// what was delivered to a live session.
    pub gaps: u64,
    /// Messages a client that reconnected got back by syncing (its old
    /// connection closed with them queued: allowed).
    pub recovered: u64,
    /// Deliveries that do not match what was sent, or replies to no send.
    pub corrupt: u64,
    /// Reconnects (churn).
    pub reconnects: u64,
}

impl Verdict {
    /// Steady, settled, and every acknowledged message delivered to every
    /// recipient exactly once, in order, without gaps.
    pub fn passed(&self) -> bool {
        self.steady
            && self.settled
            && self.lost == 0
            && self.duplicates == 0
            && self.out_of_order == 0
            && self.gaps == 0
            && self.corrupt == 0
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match soak(Args::parse()).await {
        Ok(v) if v.passed() => ExitCode::SUCCESS,
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
    let groups: Vec<GroupEntry> = (0..(args.clients + 19) / 20)
        .map(|g| GroupEntry {
            id: g + 1,
            members: (g * 20 + 1..=(g * 20 + 20).min(args.clients)).collect(),
        })
        .collect();
    config.groups = groups.clone();
    config.server.max_frames_per_sec = 0;
    // A small history bound so the store reaches its steady size early; a
    // reconnecting client syncs at once, well within it.
    config.store.history_limit = 200;
    config.store.backend = comet::server::StoreBackend::Memory;
    let running = comet::server::start(config).await?;
    let addr = running
        .tcp_addr
        .ok_or_else(|| std::io::Error::other("no tcp listener"))?;
    let shared = Arc::new(Shared {
        addr,
        clients: args.clients,
        interval: Duration::from_secs_f64(args.clients as f64 / args.rate.max(1) as f64),
        counters: Counters {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            received: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            settled: AtomicU64::new(0),
        },
        acked: Mutex::default(),
        stop_sending: CancellationToken::new(),
        check: CancellationToken::new(),
    });
    let expected: Arc<Mutex<HashMap<i32, Vec<Conversation>>>> = Arc::default();
    let tasks: Vec<_> = (1..=args.clients)
        .map(|mid| tokio::spawn(client(shared.clone(), mid, expected.clone())))
        .collect();
    let counters = &shared.counters;
    let mut csv = String::from("second,rss_kib,open_fds,sessions,pending_bytes_total,pending_bytes_max,sent,acked,received,failed\n");
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
            "{},{},{},{},{},{},{},{},{},{}\n",
            row.0,
            row.1,
            row.2,
            row.3,
            row.4,
            row.5,
            counters.sent.load(Ordering::Relaxed),
            counters.acked.load(Ordering::Relaxed),
            counters.received.load(Ordering::Relaxed),
            counters.failed.load(Ordering::Relaxed)
        ));
        samples.push(row);
        eprint!("\r{second:>5}s  rss {:>7} KiB  fds {:>6}  sessions {:>6}  queued {:>8} B  sent {:>9}  received {:>10}   ",
            row.1, row.2, row.3, row.4, counters.sent.load(Ordering::Relaxed), counters.received.load(Ordering::Relaxed));
    }
    eprintln!();
    let elapsed = started.elapsed().as_secs_f64();

    // Stop sending; wait for every reply and every queue to drain; then
    // every client syncs each conversation it is part of and reports what
    // it lacked.
    shared.stop_sending.cancel();
    let clients = args.clients as u64;
    let settle_by = Instant::now() + Duration::from_secs(30);
    while counters.settled.load(Ordering::Relaxed) < clients && Instant::now() < settle_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut settled = counters.settled.load(Ordering::Relaxed) == clients;
    while running.comet.registry().pending_bytes().0 > 0 && Instant::now() < settle_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Deliveries leave the queues in a burst; give the sockets a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let acked = shared.acked.lock().unwrap_or_else(|e| e.into_inner());
        let mut expected = expected.lock().unwrap_or_else(|e| e.into_inner());
        for conv in acked.keys() {
            match *conv {
                Conversation::Direct(a, b) => {
                    expected.entry(a).or_default().push(*conv);
                    expected.entry(b).or_default().push(*conv);
                }
                Conversation::Group(g) => {
                    if let Some(group) = groups.iter().find(|e| e.id == g) {
                        for m in &group.members {
                            expected.entry(*m).or_default().push(*conv);
                        }
                    }
                }
            }
        }
    }
    shared.check.cancel();
    let mut report = Report::default();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(r)) => {
                report.duplicates += r.duplicates;
                report.out_of_order += r.out_of_order;
                report.corrupt += r.corrupt;
                report.gaps += r.gaps;
                report.recovered += r.recovered;
                report.lost += r.lost;
                report.reconnects += r.reconnects;
                report.unchecked |= r.unchecked;
            }
            _ => report.unchecked = true,
        }
    }
    settled &= !report.unchecked;
    std::fs::write(&args.csv, &csv)?;
    let _ = running.shutdown().await;
    let sent = counters.sent.load(Ordering::Relaxed);
    let mut verdict = Verdict {
        steady: true,
        sent,
        acked: counters.acked.load(Ordering::Relaxed),
        received: counters.received.load(Ordering::Relaxed),
        refused: counters.failed.load(Ordering::Relaxed),
        settled,
        lost: report.lost,
        duplicates: report.duplicates,
        out_of_order: report.out_of_order,
        gaps: report.gaps,
        recovered: report.recovered,
        corrupt: report.corrupt,
        reconnects: report.reconnects,
    };
    println!(
        "ran {elapsed:.0}s: sent {sent} ({:.0}/s), acknowledged {}, received {}, refused {}; samples in {}",
        sent as f64 / elapsed,
        verdict.acked,
        verdict.received,
        verdict.refused,
        args.csv.display()
    );
    println!(
        "delivery: lost {}, duplicates {}, out of order {}, gaps {}, corrupt {}; {} reconnects, {} recovered by sync{}",
        verdict.lost,
        verdict.duplicates,
        verdict.out_of_order,
        verdict.gaps,
        verdict.corrupt,
        verdict.reconnects,
        verdict.recovered,
        if verdict.settled { "" } else { "; NOT SETTLED (a client missed replies or could not be checked)" }
    );
    let Some(base) = samples.get(args.warmup as usize) else {
        println!("verdict: run shorter than the warm-up, memory not judged");
        return Ok(verdict);
    };
    let tail = &samples[samples.len() - samples.len() / 3..];
    let rss_end = tail.iter().map(|s| s.1).max().unwrap_or(0);
    let fds_end = tail.iter().map(|s| s.2).max().unwrap_or(0);
    let rss_allowed = base.1 + ((base.1 as f64 * args.tolerance_pct / 100.0) as u64).max(8 * 1024);
    let fds_allowed = base.2 + (base.2 / 20).max(16);
    println!("rss after warm-up {} KiB, in the last third up to {rss_end} KiB (allowed {rss_allowed}); fds {} -> {fds_end} (allowed {fds_allowed})", base.1, base.2);
    if rss_end > rss_allowed || fds_end > fds_allowed {
        println!("memory: FAIL, memory or descriptors keep growing");
        verdict.steady = false;
    }
    println!("verdict: {}", if verdict.passed() { "ok" } else { "FAIL" });
    Ok(verdict)
}
