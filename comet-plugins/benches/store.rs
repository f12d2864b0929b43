//! Benchmarks that need the in-memory plug-ins (comet-core cannot depend on
//! this crate): chatId assignment in [`MemoryStore`] under contention, and
//! registry lookups and group fan-out through a [`Comet`] with 1,000 live
//! sessions served over in-process channels.
//!
//! Run with `cargo bench -p comet-plugins --bench store`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use comet_core::frame::{op, Frame, Transport, WireMode, HEADER_LEN};
use comet_core::{Comet, Config, Conversation, Draft, FrameError, MessageStore, Outgoing};
use comet_plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;

/// Sessions (and group members) of the registry benchmarks.
const SESSIONS: i32 = 1000;
/// The group every session's mid belongs to.
const GROUP: i32 = 100;

fn short<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    group
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `total` appends spread over `tasks` tasks; task `t` appends to
/// `conversation(t)`. Returns the wall time from the first spawn to the last
/// join.
async fn appends(
    store: Arc<MemoryStore>,
    total: u64,
    tasks: u64,
    conversation: fn(u64) -> Conversation,
) -> Duration {
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let n = total / tasks + u64::from(t < total % tasks);
            let store = store.clone();
            let draft = Draft {
                conversation: conversation(t),
                op: op::SEND_TO_GROUP,
                from: t as i32 + 1,
                to: 1,
                msg: Bytes::from_static(b"hello world"),
            };
            tokio::spawn(async move {
                for _ in 0..n {
                    black_box(store.append(draft.clone()).await.expect("append"));
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("append task");
    }
    start.elapsed()
}

fn store_append(c: &mut Criterion) {
    let rt = runtime();
    let mut g = short(c, "store_append");
    g.throughput(Throughput::Elements(1));
    let one: fn(u64) -> Conversation = |_| Conversation::Group(1);
    let own: fn(u64) -> Conversation = |t| Conversation::Group(t as i32 + 1);
    let cases = [
        ("one_conversation/1_task", 1, one, 1000),
        ("one_conversation/2_tasks", 2, one, 1000),
        ("one_conversation/8_tasks", 8, one, 1000),
        ("8_conversations/8_tasks", 8, own, 1000),
        // No history: only the chatId counter under the lock.
        ("one_conversation/1_task/no_history", 1, one, 0),
        ("one_conversation/8_tasks/no_history", 8, one, 0),
    ];
    for (name, tasks, conversation, history) in cases {
        let store = Arc::new(MemoryStore::new(history, 0));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(appends(store.clone(), iters, tasks, conversation)))
        });
    }
    g.finish();
}

/// Counts the op 18/20 frames inside the op 9s of one binary wire unit.
fn count_delivered(unit: &[u8]) -> u64 {
    let mut n = 0;
    let mut rest = unit;
    while rest.len() >= HEADER_LEN {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let frame_op = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
        if frame_op == op::BATCH {
            let mut body = &rest[HEADER_LEN..len];
            while body.len() >= HEADER_LEN {
                let inner = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
                body = &body[inner..];
                n += 1;
            }
        }
        rest = &rest[len..];
    }
    n
}

/// Deliveries seen by every session's reader, and a wake-up for whoever
/// waits for them to reach `target`.
#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    target: AtomicU64,
    reached: Notify,
}

impl Tally {
    fn add(&self, n: u64) {
        let now = self.delivered.fetch_add(n, Ordering::AcqRel) + n;
        if now >= self.target.load(Ordering::Acquire) {
            self.reached.notify_one();
        }
    }

    /// Waits until `target` deliveries in all have been seen.
    async fn wait_for(&self, target: u64) {
        self.target.store(target, Ordering::Release);
        loop {
            let reached = self.reached.notified();
            if self.delivered.load(Ordering::Acquire) >= target {
                return;
            }
            reached.await;
        }
    }
}

/// A comet with `SESSIONS` logged-in binary sessions (mids 1..=SESSIONS,
/// all members of `GROUP`), each read by a task that counts deliveries.
struct Crowd {
    comet: Comet,
    tally: Arc<Tally>,
    _inbound: Vec<mpsc::Sender<Result<Frame, FrameError>>>,
}

async fn crowd() -> Crowd {
    let auth = MemoryAuth::from_iter((1..=SESSIONS).map(|m| (m, format!("k{m}"))));
    let groups = MemoryGroups::default();
    groups.set_members(GROUP, 1..=SESSIONS);
    let comet = Comet::builder()
        .authenticator(Arc::new(auth))
        .store(Arc::new(MemoryStore::default()))
        .groups(Arc::new(groups))
        .config(
            Config::default()
                .with_heartbeat_timeout(Duration::from_secs(3600))
                .with_max_outbound_bytes(64 << 20),
        )
        .build()
        .expect("build");
    let tally = Arc::new(Tally::default());
    let mut inbound = Vec::new();
    for mid in 1..=SESSIONS {
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let info = comet.conn_info(
            Transport::Local,
            WireMode::Binary,
            "127.0.0.1:9".parse().expect("address"),
        );
        let serving = comet.clone();
        tokio::spawn(async move {
            serving
                .serve(info, ReceiverStream::new(in_rx), PollSender::new(out_tx))
                .await
        });
        let login = format!(r#"{{"mid":{mid},"mkey":"k{mid}"}}"#);
        in_tx
            .send(Ok(Frame::new(1, op::AUTH, 1, login)))
            .await
            .expect("session reading");
        match out_rx.recv().await {
            Some(Outgoing::Data(unit)) => {
                assert_eq!(
                    u32::from_be_bytes([unit[8], unit[9], unit[10], unit[11]]),
                    op::AUTH_REPLY
                );
            }
            other => panic!("no op 8 for mid {mid}: {other:?}"),
        }
        let tally = tally.clone();
        tokio::spawn(async move {
            while let Some(out) = out_rx.recv().await {
                if let Outgoing::Data(unit) = out {
                    tally.add(count_delivered(&unit));
                }
            }
        });
        inbound.push(in_tx);
    }
    assert_eq!(comet.session_count(), SESSIONS as usize);
    Crowd {
        comet,
        tally,
        _inbound: inbound,
    }
}

/// What a group fan-out benchmark times.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fanout {
    /// Time the `send_to_group` calls only (enqueue into 1,000 queues).
    Enqueue,
    /// Time pipelined sends until every delivery reached its reader.
    Pipelined,
    /// Time each send plus its 1,000 deliveries, one at a time.
    RoundTrip,
}

/// `iters` sends to the group from a task on the runtime; every delivery has
/// reached its reader when it returns, whatever was timed.
async fn fanout(crowd: &Crowd, iters: u64, how: Fanout) -> Duration {
    let comet = crowd.comet.clone();
    let tally = crowd.tally.clone();
    let base = tally.delivered.load(Ordering::Acquire);
    let per_send = SESSIONS as u64;
    let msg = Bytes::from_static(b"0123456789abcdef0123456789abcdef");
    tokio::spawn(async move {
        let start = Instant::now();
        for i in 0..iters {
            comet
                .send_to_group(1, GROUP, msg.clone())
                .await
                .expect("send");
            if how == Fanout::RoundTrip {
                tally.wait_for(base + (i + 1) * per_send).await;
            }
        }
        let sent = start.elapsed();
        tally.wait_for(base + iters * per_send).await;
        match how {
            Fanout::Enqueue => sent,
            Fanout::Pipelined | Fanout::RoundTrip => start.elapsed(),
        }
    })
    .await
    .expect("sending task")
}

fn registry(c: &mut Criterion) {
    let rt = runtime();
    let crowd = rt.block_on(crowd());
    let mut g = short(c, "registry");

    g.throughput(Throughput::Elements(SESSIONS as u64));
    g.bench_function("sessions_of/1000_online_mids", |b| {
        b.iter(|| {
            let mut n = 0;
            for mid in 1..=SESSIONS {
                n += crowd.comet.sessions_of(black_box(mid));
            }
            assert_eq!(n, SESSIONS as usize);
        })
    });
    g.bench_function("sessions_of/1000_offline_mids", |b| {
        b.iter(|| {
            let mut n = 0;
            for mid in SESSIONS + 1..=2 * SESSIONS {
                n += crowd.comet.sessions_of(black_box(mid));
            }
            assert_eq!(n, 0);
        })
    });

    // Throughput in deliveries: one send reaches all 1,000 sessions.
    let cases = [
        ("send_to_group_1000/enqueue", Fanout::Enqueue),
        ("send_to_group_1000/pipelined_delivered", Fanout::Pipelined),
        ("send_to_group_1000/round_trip", Fanout::RoundTrip),
    ];
    for (name, how) in cases {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(fanout(&crowd, iters, how)))
        });
    }
    g.finish();
    let stats = crowd.comet.stats();
    println!("registry: engine stats after the run: {stats:?}");
    crowd.comet.shutdown();
    drop(crowd);
    rt.shutdown_timeout(Duration::from_secs(5));
}

// What `criterion_group!` and `criterion_main!` expand to, written out so
// that no undocumented `pub fn` trips the workspace's `missing_docs` lint.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    store_append(&mut c);
    registry(&mut c);
    c.final_summary();
}
