//! The benchmark scenarios: idle, fanout, pairs, mixed, sync. Each returns one
//! JSON object of results; every message carries its send time so latency
//! is measured end to end, and every receiver checks chatIds for loss,
//! duplication and reordering.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::procfs;
use crate::proto::{login, Event, Rx, Sources, Transport, Tx};

/// What every scenario needs.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    /// The server's addresses (several: cluster nodes, used in turn).
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) transport: Transport,
    pub(crate) server_pid: Option<u32>,
    pub(crate) sources: Sources,
    pub(crate) connect_concurrency: usize,
    pub(crate) quiet: bool,
}

impl Ctx {
    /// The address of connection `i`.
    pub(crate) fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i % self.addrs.len()]
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Digits of the send time at the start of every message body.
const STAMP: usize = 20;

/// A message body: the send time in ns as 20 ASCII digits, padded with '.'
/// to `size` bytes. ASCII keeps it plain text in every encoding (JSON,
/// socket.io), so no transport pays for base64.
fn stamped(size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(STAMP));
    b.put_slice(format!("{:020}", now_ns()).as_bytes());
    b.resize(size.max(STAMP), b'.');
    b.freeze()
}

fn stamp_of(msg: &[u8]) -> Option<u64> {
    std::str::from_utf8(msg.get(..STAMP)?).ok()?.parse().ok()
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn latency_json(h: &Histogram<u64>) -> Value {
    let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
    json!({
        "p50_us": us(h.value_at_quantile(0.50)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "max_us": us(h.max()),
        "samples": h.len(),
    })
}

/// Server-side meters around a measured interval.
struct Meter {
    pid: Option<u32>,
    cpu0: u64,
    t0: Instant,
}

impl Meter {
    fn start(pid: Option<u32>) -> Meter {
        Meter {
            pid,
            cpu0: pid.map_or(0, procfs::cpu_ns),
            t0: Instant::now(),
        }
    }
    fn cpu_ns(&self) -> Option<u64> {
        self.pid
            .map(|p| procfs::cpu_ns(p).saturating_sub(self.cpu0))
    }
}

/// Progress on stderr while a scenario runs.
fn progress(
    ctx: &Ctx,
    what: &'static str,
    counter: Arc<AtomicU64>,
    total: u64,
) -> tokio::task::JoinHandle<()> {
    let quiet = ctx.quiet;
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !quiet {
                let n = counter.load(Ordering::Relaxed);
                let rate = n as f64 / started.elapsed().as_secs_f64();
                eprint!("\r  {what}: {n}/{total}  ({rate:.0}/s)          ");
            }
        }
    })
}

/// Connects and logs in `mids`, `ctx.connect_concurrency` at a time.
async fn connect_all(
    ctx: &Ctx,
    mids: Vec<i32>,
    what: &'static str,
) -> std::io::Result<(Vec<(i32, Tx, Rx)>, Duration)> {
    let gate = Arc::new(Semaphore::new(ctx.connect_concurrency.max(1)));
    let done = Arc::new(AtomicU64::new(0));
    let bar = progress(ctx, what, done.clone(), mids.len() as u64);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(mids.len());
    for (i, mid) in mids.into_iter().enumerate() {
        let gate = gate.clone();
        let done = done.clone();
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(std::io::Error::other)?;
            let addr = ctx.addr(i);
            let stream = ctx.sources.connect(i, addr).await?;
            let (tx, rx) = login(stream, ctx.transport, addr, mid).await?;
            done.fetch_add(1, Ordering::Relaxed);
            Ok::<_, std::io::Error>((mid, tx, rx))
        }));
    }
    let mut conns = Vec::with_capacity(tasks.len());
    for t in tasks {
        conns.push(t.await.map_err(std::io::Error::other)??);
    }
    let elapsed = started.elapsed();
    bar.abort();
    if !ctx.quiet {
        eprintln!();
    }
    Ok((conns, elapsed))
}

/// `idle`: N authenticated connections; RSS per connection and connect rate.
pub(crate) async fn idle(ctx: &Ctx, n: i32, hold: Duration) -> std::io::Result<Value> {
    let rss0 = ctx.server_pid.map(procfs::rss_bytes);
    let (conns, took) = connect_all(ctx, (1..=n).collect(), "connected").await?;
    // Keep them alive and reading (heartbeats every 20 s if held longer).
    let mut readers = Vec::new();
    for (_, mut tx, mut rx) in conns {
        readers.push(tokio::spawn(async move {
            let mut events = Vec::new();
            let mut beat = tokio::time::interval(Duration::from_secs(20));
            beat.tick().await;
            let mut seq = 1;
            loop {
                tokio::select! {
                    r = rx.next(&mut events) => { if r.is_none() { return } events.clear(); }
                    _ = beat.tick() => { seq += 1; if tx.heartbeat(seq).await.is_err() { return } }
                }
            }
        }));
    }
    tokio::time::sleep(hold).await;
    let rss1 = ctx.server_pid.map(procfs::rss_bytes);
    let alive = readers.iter().filter(|r| !r.is_finished()).count();
    for r in &readers {
        r.abort();
    }
    let per_conn = match (rss0, rss1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / n as f64),
        _ => None,
    };
    Ok(json!({
        "connections": n,
        "alive_after_hold": alive,
        "connect_auth_per_s": (n as f64 / took.as_secs_f64()).round(),
        "server_rss_before_bytes": rss0,
        "server_rss_after_bytes": rss1,
        "server_rss_per_conn_bytes": per_conn.map(|v| v.round()),
        "ok": alive == n as usize,
    }))
}

/// Per-receiver order check: chatIds must rise by exactly one (`strict`)
/// or at least rise (when the receiver does not see every message).
#[derive(Default)]
struct Order {
    last: HashMap<(u32, i32, i32), i64>,
    lost_or_dup: u64,
    reordered: u64,
}

impl Order {
    fn see(&mut self, conv: (u32, i32, i32), chat_id: i64, strict: bool) {
        match self.last.insert(conv, chat_id) {
            None => {}
            Some(prev) if chat_id <= prev => self.reordered += 1,
            Some(prev) if strict && chat_id != prev + 1 => self.lost_or_dup += 1,
            Some(_) => {}
        }
    }
}

/// `fanout`: one sender, a group of `members` (the sender included), `count`
/// messages at max rate (window of outstanding acks) or `rate` per second.
pub(crate) async fn fanout(
    ctx: &Ctx,
    members: i32,
    count: u64,
    rate: Option<u64>,
    size: usize,
    settle: Duration,
) -> std::io::Result<Value> {
    let (conns, _) = connect_all(ctx, (1..=members).collect(), "members connected").await?;
    let mut conns = conns.into_iter();
    let Some((_, mut tx, mut sender_rx)) = conns.next() else {
        return Err(std::io::Error::other("no members"));
    };
    let delivered = Arc::new(AtomicU64::new(0));
    let expected = count * (members as u64 - 1);
    let bar = progress(ctx, "delivered", delivered.clone(), expected);
    let mut receivers = Vec::new();
    for (_, _tx, mut rx) in conns {
        let delivered = delivered.clone();
        receivers.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut order = Order::default();
            let mut got = 0u64;
            let mut last_at = Instant::now();
            let mut events = Vec::new();
            while got < count {
                if rx.next(&mut events).await.is_none() {
                    break;
                }
                let now = now_ns();
                for e in events.drain(..) {
                    if let Event::Msgs(msgs) = e {
                        delivered.fetch_add(msgs.len() as u64, Ordering::Relaxed);
                        for m in msgs {
                            if let Some(ts) = stamp_of(&m.msg) {
                                let _ = h.record(now.saturating_sub(ts).max(1));
                            }
                            order.see((m.op, m.to, 0), m.chat_id, true);
                            got += 1;
                        }
                    }
                }
                last_at = Instant::now();
            }
            (h, order, got, last_at, _tx)
        }));
    }
    // Acks come back on the sender's own connection.
    let window = Arc::new(Semaphore::new(256));
    let acks = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut events = Vec::new();
            let (mut ok, mut failed) = (0u64, 0u64);
            while ok + failed < count {
                if sender_rx.next(&mut events).await.is_none() {
                    break;
                }
                for e in events.drain(..) {
                    if let Event::Ack { ret, .. } = e {
                        if ret == 0 {
                            ok += 1
                        } else {
                            failed += 1
                        }
                        window.add_permits(1);
                    }
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(settle).await;
    let meter = Meter::start(ctx.server_pid);
    let mut ticker =
        rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(1) as f64)));
    for seq in 1..=count {
        match &mut ticker {
            Some(t) => {
                t.tick().await;
            }
            None => window
                .acquire()
                .await
                .map_err(std::io::Error::other)?
                .forget(),
        }
        tx.send_msg(
            comet::core::op::SEND_TO_GROUP,
            seq as u32 + 1,
            1,
            1,
            stamped(size),
        )
        .await?;
    }
    let deadline = Duration::from_secs(60 + count / 1000);
    let (ok, failed) = tokio::time::timeout(deadline, acks)
        .await
        .map_err(|_| std::io::Error::other("acks timed out"))?
        .map_err(std::io::Error::other)?;
    let mut h = histogram();
    let mut order = Order::default();
    let (mut got, mut last) = (0u64, meter.t0);
    for r in receivers {
        match tokio::time::timeout(deadline, r).await {
            Ok(Ok((rh, ro, rg, at, _))) => {
                let _ = h.add(&rh);
                order.lost_or_dup += ro.lost_or_dup;
                order.reordered += ro.reordered;
                got += rg;
                last = last.max(at);
            }
            _ => order.lost_or_dup += 1,
        }
    }
    bar.abort();
    if !ctx.quiet {
        eprintln!();
    }
    let secs = last.duration_since(meter.t0).as_secs_f64().max(1e-9);
    let cpu = meter.cpu_ns();
    Ok(json!({
        "members": members,
        "messages": count,
        "rate": rate,
        "msg_bytes": size,
        "settle_ms": settle.as_millis() as u64,
        "acked": ok,
        "refused": failed,
        "deliveries": got,
        "expected_deliveries": expected,
        "delivered_per_s": (got as f64 / secs).round(),
        "server_cpu_ns_per_delivery": cpu.map(|c| (c as f64 / got.max(1) as f64).round()),
        "latency": latency_json(&h),
        "lost_or_duplicated": order.lost_or_dup + expected.saturating_sub(got),
        "reordered": order.reordered,
        "ok": got == expected && order.lost_or_dup == 0 && order.reordered == 0 && failed == 0,
    }))
}

/// `pairs`: P pairs ping-ponging op 18 for `duration`.
pub(crate) async fn pairs(
    ctx: &Ctx,
    pairs: i32,
    duration: Duration,
    size: usize,
) -> std::io::Result<Value> {
    let (conns, _) = connect_all(ctx, (1..=2 * pairs).collect(), "connected").await?;
    let mut by_mid: HashMap<i32, (Tx, Rx)> =
        conns.into_iter().map(|(m, t, r)| (m, (t, r))).collect();
    let trips = Arc::new(AtomicU64::new(0));
    let bar = progress(ctx, "round trips", trips.clone(), 0);
    let stop = Instant::now() + duration;
    let meter = Meter::start(ctx.server_pid);
    let mut tasks = Vec::new();
    for p in 0..pairs {
        let (a, b) = (2 * p + 1, 2 * p + 2);
        let (mut atx, mut arx) = by_mid
            .remove(&a)
            .ok_or_else(|| std::io::Error::other("missing"))?;
        let (mut btx, mut brx) = by_mid
            .remove(&b)
            .ok_or_else(|| std::io::Error::other("missing"))?;
        // b answers every message from a.
        let echo = tokio::spawn(async move {
            let mut events = Vec::new();
            let mut order = Order::default();
            let mut seq = 1u32;
            while brx.next(&mut events).await.is_some() {
                for e in events.drain(..) {
                    if let Event::Msgs(msgs) = e {
                        for m in msgs {
                            order.see((m.op, a.min(b), a.max(b)), m.chat_id, false);
                            seq += 1;
                            if btx
                                .send_msg(comet::core::op::SEND_TO_USER, seq, b, a, m.msg.clone())
                                .await
                                .is_err()
                            {
                                return order;
                            }
                        }
                    }
                }
            }
            order
        });
        let trips = trips.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut order = Order::default();
            let mut events = Vec::new();
            let mut seq = 1u32;
            let mut n = 0u64;
            let _ = atx
                .send_msg(comet::core::op::SEND_TO_USER, seq, a, b, stamped(size))
                .await;
            'outer: while Instant::now() < stop {
                if arx.next(&mut events).await.is_none() {
                    break;
                }
                for e in events.drain(..) {
                    if let Event::Msgs(msgs) = e {
                        for m in msgs {
                            order.see((m.op, a.min(b), a.max(b)), m.chat_id, false);
                            if let Some(ts) = stamp_of(&m.msg) {
                                let _ = h.record(now_ns().saturating_sub(ts).max(1));
                            }
                            n += 1;
                            trips.fetch_add(1, Ordering::Relaxed);
                            if Instant::now() >= stop {
                                break 'outer;
                            }
                            seq += 1;
                            if atx
                                .send_msg(comet::core::op::SEND_TO_USER, seq, a, b, stamped(size))
                                .await
                                .is_err()
                            {
                                break 'outer;
                            }
                        }
                    }
                }
            }
            echo.abort();
            (h, order, n)
        }));
    }
    let mut h = histogram();
    let mut order = Order::default();
    let mut total = 0;
    for t in tasks {
        let (th, to, n) = t.await.map_err(std::io::Error::other)?;
        let _ = h.add(&th);
        order.reordered += to.reordered;
        total += n;
    }
    bar.abort();
    if !ctx.quiet {
        eprintln!();
    }
    let secs = meter.t0.elapsed().as_secs_f64();
    Ok(json!({
        "pairs": pairs,
        "seconds": duration.as_secs_f64(),
        "round_trips": total,
        "round_trips_per_s": (total as f64 / secs).round(),
        "server_cpu_ns_per_round_trip": meter.cpu_ns().map(|c| (c as f64 / total.max(1) as f64).round()),
        "latency": latency_json(&h),
        "reordered": order.reordered,
        "ok": order.reordered == 0 && total > 0,
    }))
}

/// `mixed`: `groups` groups of `size` users, every user sending `rate`
/// messages per second, alternating 1:1 and group.
pub(crate) async fn mixed(
    ctx: &Ctx,
    groups: i32,
    size: i32,
    rate: f64,
    duration: Duration,
    msg_size: usize,
) -> std::io::Result<Value> {
    let users = groups * size;
    let (conns, _) = connect_all(ctx, (1..=users).collect(), "connected").await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let bar = progress(ctx, "delivered", delivered.clone(), 0);
    let meter = Meter::start(ctx.server_pid);
    let stop = Instant::now() + duration;
    let mut tasks = Vec::new();
    for (mid, mut tx, mut rx) in conns {
        let delivered = delivered.clone();
        tasks.push(tokio::spawn(async move {
            let group = (mid - 1) / size + 1;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut h = histogram();
            let mut order = Order::default();
            let (mut seq, mut sent, mut failed) = (1u32, 0u64, 0u64);
            let mut events = Vec::new();
            let grace = stop + Duration::from_secs(2);
            loop {
                let now = Instant::now();
                if now >= grace {
                    break;
                }
                tokio::select! {
                    _ = tick.tick(), if now < stop => {
                        seq += 1;
                        let (op, to) = if seq % 2 == 0 {
                            (comet::core::op::SEND_TO_USER, mid % users + 1)
                        } else {
                            (comet::core::op::SEND_TO_GROUP, group)
                        };
                        if tx.send_msg(op, seq, mid, to, stamped(msg_size)).await.is_err() { break; }
                        sent += 1;
                    }
                    r = rx.next(&mut events) => {
                        if r.is_none() { break; }
                        let at = now_ns();
                        for e in events.drain(..) {
                            match e {
                                Event::Msgs(msgs) => for m in msgs {
                                    let conv = if m.op == comet::core::op::SEND_TO_GROUP { (m.op, m.to, 0) } else { (m.op, m.from.min(m.to), m.from.max(m.to)) };
                                    order.see(conv, m.chat_id, false);
                                    if let Some(ts) = stamp_of(&m.msg) { let _ = h.record(at.saturating_sub(ts).max(1)); }
                                    delivered.fetch_add(1, Ordering::Relaxed);
                                },
                                Event::Ack { ret, .. } if ret != 0 => failed += 1,
                                _ => {}
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(grace.into()) => break,
                }
            }
            (h, order, sent, failed)
        }));
    }
    let mut h = histogram();
    let mut order = Order::default();
    let (mut sent, mut failed) = (0, 0);
    for t in tasks {
        let (th, to, s, f) = t.await.map_err(std::io::Error::other)?;
        let _ = h.add(&th);
        order.reordered += to.reordered;
        sent += s;
        failed += f;
    }
    bar.abort();
    if !ctx.quiet {
        eprintln!();
    }
    let got = delivered.load(Ordering::Relaxed);
    Ok(json!({
        "users": users,
        "groups": groups,
        "group_size": size,
        "rate_per_user": rate,
        "offered_msgs_per_s": (users as f64 * rate).round(),
        "sent": sent,
        "refused": failed,
        "deliveries": got,
        "server_cpu_ns_per_delivery": meter.cpu_ns().map(|c| (c as f64 / got.max(1) as f64).round()),
        "latency": latency_json(&h),
        "reordered": order.reordered,
        "ok": order.reordered == 0 && failed == 0 && got > 0,
    }))
}

/// `sync`: user 1 stores `messages` notes to itself (acks pipelined,
/// `depth` in flight), then replays that conversation `rounds` times page by
/// page (`page` messages a sync, `depth` syncs in flight): replayed
/// messages/s to one client, every page checked chatId by chatId.
pub(crate) async fn sync(
    ctx: &Ctx,
    messages: u64,
    rounds: u32,
    page: u32,
    depth: usize,
    size: usize,
) -> std::io::Result<Value> {
    let (mut conns, _) = connect_all(ctx, vec![1], "connected").await?;
    let (_, mut tx, mut rx) = conns
        .pop()
        .ok_or_else(|| std::io::Error::other("no connection"))?;
    let mut events = Vec::new();
    let mut seq = 2u32;
    // Where the conversation stands (a server may have served runs before).
    // Notes to oneself: they reach no other session and no inbox, so the
    // run leaves nothing behind for the scenarios after it.
    tx.sync(seq, comet::core::op::SEND_TO_USER, 1, 0, 0).await?;
    let base = loop {
        rx.next(&mut events)
            .await
            .ok_or_else(|| std::io::Error::other("closed before op 23"))?;
        if let Some(head) = events.drain(..).find_map(|e| match e {
            Event::Synced { head, .. } => Some(head),
            _ => None,
        }) {
            break head;
        }
    };
    // Fill: acks pipelined, `depth` unacknowledged at most.
    let (mut sent, mut acked, mut refused) = (0u64, 0u64, 0u64);
    let fill_started = Instant::now();
    while acked < messages {
        while sent < messages && sent - acked < depth as u64 {
            seq += 1;
            tx.send_msg(comet::core::op::SEND_TO_USER, seq, 1, 1, stamped(size))
                .await?;
            sent += 1;
        }
        rx.next(&mut events)
            .await
            .ok_or_else(|| std::io::Error::other("closed while filling"))?;
        for e in events.drain(..) {
            if let Event::Ack { ret } = e {
                acked += 1;
                refused += u64::from(ret != 0);
            }
        }
    }
    let fill_secs = fill_started.elapsed().as_secs_f64();
    // The pages of one round: after base, base + page, ...
    let head = base + messages as i64;
    let afters: Vec<i64> = (base..head).step_by(page.max(1) as usize).collect();
    let expected: u64 = u64::from(rounds) * messages;
    let replayed_count = Arc::new(AtomicU64::new(0));
    let bar = progress(ctx, "replayed", replayed_count.clone(), expected);
    let meter = Meter::start(ctx.server_pid);
    let (mut asked, mut answered) = (0usize, 0usize);
    let total_syncs = afters.len() * rounds as usize;
    let mut next_id = base + 1; // the chatId the replay must deliver next
    let (mut bad_pages, mut out_of_order) = (0u64, 0u64);
    let mut replayed = 0u64;
    while answered < total_syncs {
        while asked < total_syncs && asked - answered < depth {
            seq += 1;
            let after = afters[asked % afters.len()];
            tx.sync(seq, comet::core::op::SEND_TO_USER, 1, after, page)
                .await?;
            asked += 1;
        }
        rx.next(&mut events)
            .await
            .ok_or_else(|| std::io::Error::other("closed while syncing"))?;
        for e in events.drain(..) {
            match e {
                Event::Msgs(msgs) => {
                    for m in msgs {
                        out_of_order += u64::from(m.chat_id != next_id);
                        next_id = if m.chat_id >= head {
                            base + 1
                        } else {
                            m.chat_id + 1
                        };
                        replayed += 1;
                    }
                    replayed_count.store(replayed, Ordering::Relaxed);
                }
                Event::Synced {
                    ret,
                    oldest,
                    head: h,
                } => {
                    bad_pages += u64::from(ret != 0 || oldest > base + 1 || h != head);
                    answered += 1;
                }
                _ => {}
            }
        }
    }
    let secs = meter.t0.elapsed().as_secs_f64();
    bar.abort();
    if !ctx.quiet {
        eprintln!();
    }
    Ok(json!({
        "messages": messages,
        "msg_bytes": size,
        "page": page,
        "depth": depth,
        "rounds": rounds,
        "fill_sends_per_s": (messages as f64 / fill_secs).round(),
        "replayed": replayed,
        "replayed_per_s": (replayed as f64 / secs).round(),
        "server_cpu_ns_per_replayed": meter.cpu_ns().map(|c| (c as f64 / replayed.max(1) as f64).round()),
        "refused": refused,
        "bad_pages": bad_pages,
        "out_of_order": out_of_order,
        "ok": refused == 0 && bad_pages == 0 && out_of_order == 0 && replayed == expected,
    }))
}

/// `senders`: `n` clients each sending notes to themselves (no deliveries,
/// no inbox), one unacknowledged send at a time, for `duration`:
/// acknowledged sends/s, i.e. how fast the store commits under `n`
/// concurrent appends.
pub(crate) async fn senders(
    ctx: &Ctx,
    n: i32,
    duration: Duration,
    size: usize,
) -> std::io::Result<Value> {
    let (conns, _) = connect_all(ctx, (1..=n).collect(), "connected").await?;
    let acked = Arc::new(AtomicU64::new(0));
    let bar = progress(ctx, "acknowledged", acked.clone(), 0);
    let meter = Meter::start(ctx.server_pid);
    let stop = Instant::now() + duration;
    let mut tasks = Vec::new();
    for (mid, mut tx, mut rx) in conns {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let (mut seq, mut ok, mut refused) = (1u32, 0u64, 0u64);
            let mut events = Vec::new();
            while Instant::now() < stop {
                seq += 1;
                let sent = Instant::now();
                if tx
                    .send_msg(comet::core::op::SEND_TO_USER, seq, mid, mid, stamped(size))
                    .await
                    .is_err()
                {
                    break;
                }
                let mut answered = false;
                while !answered {
                    if rx.next(&mut events).await.is_none() {
                        return (h, ok, refused);
                    }
                    for e in events.drain(..) {
                        if let Event::Ack { ret } = e {
                            answered = true;
                            if ret == 0 {
                                ok += 1;
                                acked.fetch_add(1, Ordering::Relaxed);
                            } else {
                                refused += 1;
                            }
                        }
                    }
                }
                let _ = h.record((sent.elapsed().as_nanos() as u64).max(1));
            }
            (h, ok, refused)
        }));
    }
    let mut h = histogram();
    let (mut ok, mut refused) = (0u64, 0u64);
    for t in tasks {
        let (th, tok, tref) = t.await.map_err(std::io::Error::other)?;
        let _ = h.add(&th);
        ok += tok;
        refused += tref;
    }
    bar.abort();
    if !ctx.quiet {
        eprintln!();
    }
    let secs = meter.t0.elapsed().as_secs_f64();
    Ok(json!({
        "senders": n,
        "msg_bytes": size,
        "acknowledged": ok,
        "acknowledged_per_s": (ok as f64 / secs).round(),
        "server_cpu_ns_per_send": meter.cpu_ns().map(|c| (c as f64 / ok.max(1) as f64).round()),
        "ack_latency": latency_json(&h),
        "refused": refused,
        "ok": refused == 0 && ok > 0,
    }))
}
