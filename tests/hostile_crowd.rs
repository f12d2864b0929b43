//! A hostile crowd, at a CI-friendly scale (set COMET_CROWD_SCALE for a
//! larger run, see examples/scripts/hostile_crowd.sh): well-behaved clients
//! chat 1:1 and in groups over every transport while others send garbage,
//! hold half-written frames, authenticate and never read, reconnect in a
//! storm, spoof `from` and send to groups they are not in.
//!
//! Asserted: every acknowledged message reaches every intended session
//! exactly once and in chatId order; no good client is disconnected; every
//! bad client gets its outcome from PROTOCOL.md's table (the never-readers,
//! flooded through a group, are closed as slow consumers and counted once
//! each, while the flood's sender goes on); memory stays within a stated
//! bound. A second crowd sends 60 KB messages to users who never
//! log in (a few fixed ones, and a new one for most messages): the store's byte budgets,
//! not the payload sent, bound the memory.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use comet::server::{GroupEntry, UserEntry};
use common::raw::{pack, Client, Closed, Kind};
use serde_json::json;

/// (conversation key, chatId): the conversation is ("d", low, high) or ("g", id, 0).
type Key = (char, i32, i32, i64);

struct Plan {
    good: i32,
    per_client: i32,
    bad: i32,
}

fn plan() -> Plan {
    let scale: i32 = std::env::var("COMET_CROWD_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    Plan {
        good: 100 * scale,
        per_client: 10,
        bad: 10 * scale,
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

const NEVER_READ: i32 = 10_000;
const STORM: i32 = 20_000;
const SPOOF: i32 = 30_000;
const OUTSIDER: i32 = 40_000;
/// Floods group 3, whose other members are the never-reading clients.
const FLOOD: i32 = 60_000;
/// The flood: enough to fill the never-readers' outbound bound (set below)
/// and the kernel's socket buffers (on loopback the server's send buffer
/// grows to 4 MiB: 3 MB of flood went through unnoticed).
const FLOOD_MSGS: i32 = 200;
const FLOOD_MSG: usize = 48 * 1024;
const OUTBOUND_BOUND: usize = 1024 * 1024;

/// Both phases measure the process's RSS, so they run one after the other
/// in one test, the mixed crowd first: memory the big-message phase frees
/// stays with the allocator and would hide the crowd's growth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_crowd_harms_nobody() {
    mixed_crowd().await;
    big_messages_to_users_who_never_read_stay_within_the_store_budget().await;
}

async fn mixed_crowd() {
    let p = plan();
    let half = p.good / 2;
    let srv = common::server::start_config(|c| {
        c.server.engine.handshake_timeout = std::time::Duration::from_millis(2_000);
        // Small enough that the flood fills it; the good clients, which read
        // only once all is sent, hold about 30 KB each.
        c.server.engine.max_outbound_bytes = OUTBOUND_BOUND;
        let mut mids: Vec<i32> = (1..=p.good).collect();
        mids.push(FLOOD);
        for base in [NEVER_READ, STORM, SPOOF, OUTSIDER] {
            mids.extend((1..=p.bad).map(|i| base + i));
        }
        c.users = mids
            .iter()
            .map(|&mid| UserEntry {
                mid,
                mkey: format!("k{mid}"),
            })
            .collect();
        let mut g1: Vec<i32> = (1..=half).collect();
        g1.extend((1..=p.bad).map(|i| NEVER_READ + i));
        c.groups = vec![
            GroupEntry { id: 1, members: g1 },
            GroupEntry {
                id: 2,
                members: (half + 1..=p.good).collect(),
            },
            GroupEntry {
                id: 3,
                members: std::iter::once(FLOOD)
                    .chain((1..=p.bad).map(|i| NEVER_READ + i))
                    .collect(),
            },
        ];
    })
    .await;
    let (tcp, ws) = (srv.tcp_addr.unwrap(), srv.ws_addr.unwrap());
    let addr = move |kind: Kind| if kind == Kind::Tcp { tcp } else { ws };
    let kind_of = |mid: i32| [Kind::Tcp, Kind::WsJson, Kind::WsBinary][(mid % 3) as usize];
    let rss_before = rss_kib();

    // Log in every good client first.
    let mut good = Vec::new();
    for mid in 1..=p.good {
        good.push(Client::login(kind_of(mid), addr(kind_of(mid)), mid, &format!("k{mid}")).await);
    }

    // The bad crowd, all at once, while the good clients talk.
    let mut bad = tokio::task::JoinSet::new();
    let (flooded, flood_done) = tokio::sync::watch::channel(false);
    let (readers_in, mut all_in) = tokio::sync::mpsc::channel(p.bad as usize);
    for i in 1..=p.bad {
        bad.spawn(garbage(tcp, ws, i));
        bad.spawn(slowloris(tcp, i));
        bad.spawn(never_read(
            tcp,
            NEVER_READ + i,
            readers_in.clone(),
            flood_done.clone(),
        ));
        bad.spawn(storm(addr(kind_of(i)), kind_of(i), STORM + i));
        bad.spawn(spoofer(addr(kind_of(i)), kind_of(i), SPOOF + i));
        bad.spawn(outsider(addr(kind_of(i)), kind_of(i), OUTSIDER + i));
    }

    // Once every never-reader is in, the flood fills their outbound
    // queues: each must be closed as a slow consumer, and the flood's
    // sender must not notice.
    drop(readers_in);
    for _ in 1..=p.bad {
        all_in
            .recv()
            .await
            .expect("a never-reading client logged in");
    }
    let flood = tokio::spawn(async move {
        let mut c = Client::login(Kind::Tcp, tcp, FLOOD, &format!("k{FLOOD}")).await;
        let mut msg = vec![b'f'; FLOOD_MSG];
        for n in 0..FLOOD_MSGS {
            msg[..4].copy_from_slice(&n.to_be_bytes());
            let ack = c.send_msg(20, FLOOD, 3, &msg).await;
            assert_eq!(ack.ret, 0, "flood send refused: {ack:?}");
        }
        flooded.send(true).unwrap();
        c
    });

    let mut senders = tokio::task::JoinSet::new();
    for (i, mut client) in good.into_iter().enumerate() {
        let mid = i as i32 + 1;
        let (good_n, per) = (p.good, p.per_client);
        senders.spawn(async move {
            let group = if mid <= good_n / 2 { 1 } else { 2 };
            let mut acked: Vec<(Key, i32, Vec<i32>)> = Vec::new();
            for n in 0..per {
                let to = (mid * 7 + n * 13) % good_n + 1;
                if to != mid {
                    let ack = client
                        .send_msg(18, mid, to, format!("dm {mid}->{to} #{n}").as_bytes())
                        .await;
                    assert_eq!(ack.ret, 0, "good send refused: {ack:?}");
                    acked.push((('d', mid.min(to), mid.max(to), ack.chat_id), mid, vec![to]));
                }
                let ack = client
                    .send_msg(
                        20,
                        mid,
                        group,
                        format!("group {group} from {mid} #{n}").as_bytes(),
                    )
                    .await;
                assert_eq!(ack.ret, 0, "good group send refused: {ack:?}");
                acked.push((('g', group, 0, ack.chat_id), mid, vec![-group]));
            }
            (mid, client, acked)
        });
    }
    let mut clients = BTreeMap::new();
    let mut expected: HashMap<i32, HashSet<Key>> = HashMap::new();
    let members = |group: i32| {
        if group == 1 {
            1..=half
        } else {
            half + 1..=p.good
        }
    };
    while let Some(done) = senders.join_next().await {
        let (mid, client, acked) = done.unwrap();
        for (key, from, to) in acked {
            let recipients: Vec<i32> = match to[0] {
                g if g < 0 => members(-g).filter(|&m| m != from).collect(),
                to => vec![to],
            };
            for r in recipients {
                assert!(
                    expected.entry(r).or_default().insert(key),
                    "duplicate chatId {key:?}"
                );
            }
        }
        clients.insert(mid, client);
    }

    // Every good client gets exactly what it should, in chatId order.
    let deliveries: usize = expected.values().map(HashSet::len).sum();
    let mut checks = tokio::task::JoinSet::new();
    for (mid, mut client) in clients {
        let want = expected.remove(&mid).unwrap_or_default();
        checks.spawn(async move {
            let mut got = HashSet::new();
            let mut last: HashMap<(char, i32, i32), i64> = HashMap::new();
            while got.len() < want.len() {
                let m = client.msg().await;
                let key: Key = if m.op == 20 {
                    ('g', m.to, 0, m.chat_id)
                } else {
                    ('d', m.from.min(m.to), m.from.max(m.to), m.chat_id)
                };
                let conv = (key.0, key.1, key.2);
                assert!(
                    last.get(&conv).is_none_or(|&prev| prev < m.chat_id),
                    "{mid}: {key:?} out of order"
                );
                last.insert(conv, m.chat_id);
                assert!(want.contains(&key), "{mid}: unexpected {key:?}");
                assert!(got.insert(key), "{mid}: {key:?} twice");
            }
            // Nothing more, and still connected.
            client.no_msg().await;
            client
        });
    }
    let mut still = Vec::new();
    while let Some(done) = checks.join_next().await {
        still.push(done.unwrap());
    }
    let flood = tokio::time::timeout(Duration::from_secs(60), flood)
        .await
        .expect("the flood's sends are answered")
        .unwrap();
    while let Some(done) = bad.join_next().await {
        done.unwrap();
    }
    assert!(
        srv.comet.is_online(FLOOD),
        "the flood's sender was disconnected"
    );
    drop(flood);
    for mid in 1..=p.good {
        assert!(
            srv.comet.is_online(mid),
            "good client {mid} was disconnected"
        );
    }
    let stats = srv.comet.stats();
    // Garbage on TCP and on WebSocket; slowloris at the handshake timeout;
    // three refused sends from each spoofer and each outsider.
    assert_eq!(stats.protocol_errors, 2 * p.bad as u64, "{stats:?}");
    assert_eq!(stats.timeouts, p.bad as u64, "{stats:?}");
    assert_eq!(stats.send_failures, 6 * p.bad as u64, "{stats:?}");
    // Each never-reader, closed once (its later pushes refused are not
    // counted again).
    assert_eq!(stats.slow_consumers, p.bad as u64, "{stats:?}");
    assert_eq!(stats.panics, 0);
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    // Stated bound, for the whole test process (server and all clients):
    // 64 MiB plus 256 bytes per delivery, which the test's own clients hold
    // until they are checked (about 50k deliveries at scale 1: 76 MiB).
    let bound_mib = 64 + (deliveries as u64 * 256) / (1024 * 1024);
    assert!(
        grown_mib < bound_mib,
        "RSS grew by {grown_mib} MiB, bound {bound_mib} MiB"
    );
    eprintln!(
        "hostile crowd: {} good clients, {} bad of each kind, {deliveries} deliveries, RSS +{grown_mib} MiB (bound {bound_mib}), {stats:?}",
        p.good, p.bad
    );
    drop(still);
    assert!(srv.shutdown().await);
}

/// Senders of the big-message crowd, each sending `BIG_EACH` messages.
const BIG_SENDERS: i32 = 20;
const BIG_EACH: i32 = 300;
const BIG_MSG: usize = 60_000;
/// Mids that never log in and get a message from every sender.
const NEVER_ONLINE: i32 = 50_000;
/// Ever-new recipients start here.
const FRESH: i32 = 1_000_000;

async fn big_messages_to_users_who_never_read_stay_within_the_store_budget() {
    // Recipients must be users (the server refuses unknown mids); these
    // never log in.
    let fresh = |mid: i32, n: i32| FRESH + mid * BIG_EACH + n;
    let srv = common::server::start_config(|c| {
        let recipients = (NEVER_ONLINE..NEVER_ONLINE + 10)
            .chain((1..=BIG_SENDERS).flat_map(|mid| (0..BIG_EACH).map(move |n| fresh(mid, n))));
        c.users = (1..=BIG_SENDERS)
            .chain(recipients)
            .map(|mid| UserEntry {
                mid,
                mkey: format!("k{mid}"),
            })
            .collect();
    })
    .await;
    let tcp = srv.tcp_addr.unwrap();
    let comet::server::Store::Memory(store) = &srv.store else {
        panic!("start_config assembles the memory backend");
    };
    let store = store.clone();
    let limits = store.limits().clone();
    let rss_before = rss_kib();
    let mut senders = tokio::task::JoinSet::new();
    for mid in 1..=BIG_SENDERS {
        senders.spawn(async move {
            let mut c = Client::login(Kind::Tcp, tcp, mid, &format!("k{mid}")).await;
            let mut msg = vec![b'a' + (mid % 26) as u8; BIG_MSG];
            for n in 0..BIG_EACH {
                msg[..4].copy_from_slice(&n.to_be_bytes());
                // Every fifth to one of a few users who never log in, the
                // rest to a new one each time.
                let to = if n % 5 == 0 {
                    NEVER_ONLINE + (n / 5) % 10
                } else {
                    fresh(mid, n)
                };
                let ack = c.send_msg(18, mid, to, &msg).await;
                assert_eq!(ack.ret, 0, "send {n} of {mid} refused: {ack:?}");
            }
            c.heartbeat().await;
        });
    }
    while let Some(done) = senders.join_next().await {
        done.unwrap();
    }
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    let usage = store.usage();
    let sent_mib = (BIG_SENDERS * BIG_EACH) as usize * BIG_MSG / (1024 * 1024);
    eprintln!(
        "big-message crowd: {sent_mib} MiB sent, RSS +{grown_mib} MiB, store {usage:?}, limits {limits:?}"
    );
    // The budget bounds the store's charged bytes...
    assert!(usage.bytes <= limits.total_bytes, "{usage:?}");
    // ... and it was reached: old messages were dropped for new ones.
    assert!(
        usage.dropped_offline > 0 && usage.dropped_history > 0,
        "{usage:?}"
    );
    // Message bodies are charged over 3 times their size (for the wire
    // encodings a message may cache), so what the store keeps is at most a
    // third of its budget in bodies.
    let kept = usage.inbox_messages + usage.history_messages;
    assert!(kept * BIG_MSG * 3 <= limits.total_bytes, "{usage:?}");
    // Every message is charged over 3 times its size (for its two wire
    // caches, which stay empty here), so the store holds at most a third of
    // its budget in message bytes (~85 MiB at the default 256 MiB). The
    // bound: half the budget plus 64 MiB for the runtime, the connections
    // and the allocator's slack; the store before byte budgets held all
    // the payload sent (over 340 MiB).
    let bound_mib = (limits.total_bytes / (2 * 1024 * 1024)) as u64 + 64;
    assert!(
        grown_mib < bound_mib && (grown_mib as usize) < sent_mib,
        "RSS grew by {grown_mib} MiB for {sent_mib} MiB sent, bound {bound_mib} MiB"
    );
    assert!(srv.shutdown().await);
}

/// Garbage bytes: closed (TCP) or closed with 1007 (WebSocket JSON).
async fn garbage(tcp: SocketAddr, ws: SocketAddr, i: i32) {
    let mut c = Client::connect(Kind::Tcp, tcp).await;
    let noise: Vec<u8> = (0..64).map(|b| (b * 31 + i) as u8).collect();
    c.write_raw(&noise).await;
    assert_eq!(c.closed().await, Closed::Eof);
    let mut c = Client::connect(Kind::WsJson, ws).await;
    c.write_text("{\"ver\":1,\"op\":").await;
    assert!(matches!(c.closed().await, Closed::Ws(1007, _)));
}

/// Half a frame, then silence: closed at the handshake timeout.
async fn slowloris(tcp: SocketAddr, _i: i32) {
    let mut c = Client::connect(Kind::Tcp, tcp).await;
    let frame = pack(1, 7, 1, br#"{"mid":1,"mkey":"k1"}"#);
    c.write_raw(&frame[..10]).await;
    assert_eq!(c.closed().await, Closed::Eof);
}

/// Logs in, then never reads: it must not slow anyone down.
/// Logs in, then reads nothing while group 3 is flooded. Once the flood is
/// sent, reads what the kernel buffered: the server must have closed the
/// connection as a slow consumer by then, so the read reaches the end.
async fn never_read(
    tcp: SocketAddr,
    mid: i32,
    logged_in: tokio::sync::mpsc::Sender<()>,
    mut flood_done: tokio::sync::watch::Receiver<bool>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut c = Client::from_tcp(socket.connect(tcp).await.unwrap());
    assert_eq!(
        c.auth(json!({"mid": mid, "mkey": format!("k{mid}")}))
            .await
            .0,
        0
    );
    logged_in.send(()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), flood_done.wait_for(|&done| done))
        .await
        .expect("the flood ends")
        .unwrap();
    // Each read waits at most `common::WAIT`: a connection left open stalls
    // there once the kernel's buffers are read. The overall bound only
    // caps a slow drain: the server's socket keeps up to 4 MiB after the
    // close, read through a 4 KiB window (over 30 s on a loaded machine).
    let (got, closed) = tokio::time::timeout(Duration::from_secs(180), c.msgs_until_closed())
        .await
        .unwrap_or_else(|_| panic!("never-reading client {mid} was not closed"));
    assert_eq!(closed, Closed::Eof);
    // It is in group 1 too: only the flood (group 3) counts here.
    let flood = got.iter().filter(|m| m.op == 20 && m.to == 3).count();
    assert!(
        flood < FLOOD_MSGS as usize,
        "never-reading client {mid} got all {flood} flood messages: it was never a slow consumer"
    );
}

/// Connects, logs in and drops, over and over.
async fn storm(addr: SocketAddr, kind: Kind, mid: i32) {
    for _ in 0..10 {
        let mut c = Client::connect(kind, addr).await;
        assert_eq!(
            c.auth(json!({"mid": mid, "mkey": format!("k{mid}")}))
                .await
                .0,
            0
        );
        drop(c);
    }
}

/// Claims to be mid 1: refused, connection stays.
async fn spoofer(addr: SocketAddr, kind: Kind, mid: i32) {
    let mut c = Client::login(kind, addr, mid, &format!("k{mid}")).await;
    for _ in 0..3 {
        assert_eq!(c.send_msg(18, 1, 2, b"i am mid 1").await.ret, -1);
    }
    c.heartbeat().await;
}

/// Sends to a group it is not in: refused, connection stays.
async fn outsider(addr: SocketAddr, kind: Kind, mid: i32) {
    let mut c = Client::login(kind, addr, mid, &format!("k{mid}")).await;
    for group in [1, 2, 999] {
        assert_eq!(c.send_msg(20, mid, group, b"let me in").await.ret, -1);
    }
    c.heartbeat().await;
}
