//! Cluster mode over a real `redis-server` that each test starts on a free
//! port (and kills at the end): three comet nodes (`server::start` with
//! `[store] backend = "redis"`, or real `chat_server` processes where a
//! node must die by SIGKILL), clients in TCP, WS-JSON and WS-binary spread
//! over them. A missing `redis-server` binary fails the test with a
//! message (`.ci/run` installs it).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use comet::server::{Running, StoreBackend};
use common::raw::{Client, Closed, Kind, Msg};
use serde_json::json;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` child process on a free port, with its own directory
/// (AOF on, no RDB snapshots).
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// More arguments for redis-server.
    args: Vec<String>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// [`Redis::start`], with more arguments for redis-server.
    fn start_with(args: &[&str]) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `redis-server` ({e}): the cluster tests need it; install it \
                     with `apt-get install -y --no-install-recommends redis-server` (.ci/run \
                     does this)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    fn cmd<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let mut c = self.client().get_connection().expect("redis connection");
        cmd.query(&mut c).expect("redis command")
    }

    /// Stops the server (SIGTERM: it writes its AOF and exits).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One in-process node on `redis`, users 1..=9 ("k{mid}"), group 100 =
/// {1, 2, 3}, group 200 = {1..=9}.
async fn node(redis: &Redis, id: &str) -> Running {
    node_with(redis, id, |_| {}).await
}

/// [`node`], with `edit` applied to its configuration last.
async fn node_with(
    redis: &Redis,
    id: &str,
    edit: impl FnOnce(&mut comet::server::ServerConfig),
) -> Running {
    let url = redis.url();
    let id = id.to_string();
    common::server::start_edit(move |c| {
        c.store.backend = StoreBackend::Redis;
        c.store.url = url;
        c.cluster.node_id = Some(id);
        c.server.max_frames_per_sec = 0;
        c.server.engine.sync_limit = 1000;
        edit(c);
    })
    .await
}

async fn nodes(redis: &Redis) -> Vec<Running> {
    vec![
        node(redis, "a").await,
        node(redis, "b").await,
        node(redis, "c").await,
    ]
}

fn addr(n: &Running, kind: Kind) -> SocketAddr {
    match kind {
        Kind::Tcp => n.tcp_addr.unwrap(),
        _ => n.ws_addr.unwrap(),
    }
}

/// Logs in; a node that has just started may not have subscribed to its
/// feed yet and refuse for a moment ("cluster unavailable"), so this
/// retries as [`login_eventually`] does.
async fn login(n: &Running, kind: Kind, mid: i32) -> Client {
    login_eventually(n, kind, mid).await
}

/// Logs in, retrying while the node refuses (e.g. resubscribing).
async fn login_eventually(n: &Running, kind: Kind, mid: i32) -> Client {
    login_at_eventually(kind, addr(n, kind), mid).await
}

/// Logs in at `at`, retrying while the node refuses (e.g. not subscribed
/// to its feed yet).
async fn login_at_eventually(kind: Kind, at: SocketAddr, mid: i32) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = Client::connect(kind, at).await;
        let (ret, body) = c.auth(json!({"mid": mid, "mkey": format!("k{mid}")})).await;
        if ret == 0 {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "login of {mid} still refused: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The messages of `c` until none arrived for a heartbeat round trip after
/// `want` of them.
async fn take(c: &mut Client, want: usize) -> Vec<Msg> {
    let mut got = Vec::new();
    while got.len() < want {
        got.push(common::within("a delivery", c.msg()).await);
    }
    c.heartbeat().await;
    got.extend(c.take_msgs());
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_node_one_to_one_and_group_in_every_wire_mode() {
    let redis = Redis::start();
    let n = nodes(&redis).await;
    // User 1 on node a (TCP) and node b (WS-JSON); user 2 on node b
    // (WS-binary); user 3 on node c (WS-JSON).
    let mut one_a = login(&n[0], Kind::Tcp, 1).await;
    let mut one_b = login(&n[1], Kind::WsJson, 1).await;
    let mut two = login(&n[1], Kind::WsBinary, 2).await;
    let mut three = login(&n[2], Kind::WsJson, 3).await;

    let ack = one_a.send_msg(18, 1, 2, b"hello two").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 1));
    let want = Msg {
        op: 18,
        chat_id: 1,
        from: 1,
        to: 2,
        msg: b"hello two".to_vec(),
    };
    assert_eq!(take(&mut two, 1).await, vec![want.clone()]);
    // The sender's other session, on another node, has its copy...
    assert_eq!(take(&mut one_b, 1).await, vec![want]);
    // ...and the sending connection none.
    one_a.no_msg().await;
    three.no_msg().await;

    let ack = three
        .send_msg(20, 3, 100, "to the group ✓".as_bytes())
        .await;
    assert_eq!((ack.ret, ack.chat_id), (0, 1));
    let want = Msg {
        op: 20,
        chat_id: 1,
        from: 3,
        to: 100,
        msg: "to the group ✓".as_bytes().to_vec(),
    };
    for c in [&mut one_a, &mut one_b, &mut two] {
        assert_eq!(take(c, 1).await, vec![want.clone()]);
    }
    three.no_msg().await;

    // A refused op 20 consumes no chatId.
    let mut nine = login(&n[0], Kind::WsBinary, 9).await;
    assert_eq!(nine.send_msg(20, 9, 100, b"not a member").await.ret, -1);
    let ack = two.send_msg(20, 2, 100, b"next").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 2));
    for c in [&mut one_a, &mut one_b, &mut three] {
        let got = take(c, 1).await;
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].chat_id, got[0].from), (2, 2));
    }
    nine.no_msg().await;
}

/// `PUBLISH` calls since the last `CONFIG RESETSTAT`.
fn publishes(redis: &Redis) -> u64 {
    let info: String = redis.cmd(redis::cmd("INFO").arg("commandstats"));
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_senders_copy_goes_to_its_other_sessions_and_only_to_nodes_that_hold_one() {
    let redis = Redis::start();
    let n = nodes(&redis).await;
    // User 4: two sessions on node a, one on node b. User 6: one session,
    // on node a. User 5, the recipient: node c.
    let mut four_a = login(&n[0], Kind::Tcp, 4).await;
    let mut four_a2 = login(&n[0], Kind::WsJson, 4).await;
    let mut four_b = login(&n[1], Kind::WsBinary, 4).await;
    let mut six = login(&n[0], Kind::WsBinary, 6).await;
    let mut five = login(&n[2], Kind::Tcp, 5).await;

    let _: () = redis.cmd(redis::cmd("CONFIG").arg("RESETSTAT"));
    let ack = four_a.send_msg(18, 4, 5, b"from four").await;
    assert_eq!(ack.ret, 0);
    let want = Msg {
        op: 18,
        chat_id: ack.chat_id,
        from: 4,
        to: 5,
        msg: b"from four".to_vec(),
    };
    assert_eq!(take(&mut five, 1).await, vec![want.clone()]);
    // The sender's other session on the sending node has its copy, and so
    // has the one on node b; the sending connection has none.
    assert_eq!(take(&mut four_a2, 1).await, vec![want.clone()]);
    assert_eq!(take(&mut four_b, 1).await, vec![want]);
    four_a.no_msg().await;
    // One PUBLISH per node holding a session to deliver to: c, a and b.
    assert_eq!(publishes(&redis), 3);

    // A sender whose only session is the sending one: no copy goes back to
    // its node, only the recipient's node hears of the message.
    let _: () = redis.cmd(redis::cmd("CONFIG").arg("RESETSTAT"));
    let ack = six.send_msg(18, 6, 5, b"from six").await;
    assert_eq!(ack.ret, 0);
    let got = take(&mut five, 1).await;
    assert_eq!(
        got.iter().map(|m| (m.from, m.chat_id)).collect::<Vec<_>>(),
        vec![(6, ack.chat_id)]
    );
    six.no_msg().await;
    assert_eq!(publishes(&redis), 1);
    // The rest of node a still hears nothing of it.
    four_a2.no_msg().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_ids_are_gapless_and_delivered_in_order_across_nodes() {
    const EACH: usize = 60;
    let redis = Redis::start();
    let n = nodes(&redis).await;
    let mut watch_a = login(&n[0], Kind::WsBinary, 7).await;
    let mut watch_c = login(&n[2], Kind::WsJson, 8).await;
    // Senders 1, 2, 3 on nodes a, b, c, one per wire mode, all into group
    // 200 at once.
    let mut tasks = Vec::new();
    for (i, kind) in common::raw::KINDS.into_iter().enumerate() {
        let mut c = login(&n[i], kind, i as i32 + 1).await;
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..EACH {
                let ack = c
                    .send_msg(20, i as i32 + 1, 200, format!("{i}-{k}").as_bytes())
                    .await;
                assert_eq!(ack.ret, 0, "{ack:?}");
                acked.push(ack.chat_id);
            }
            acked
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        for id in t.await.unwrap() {
            assert!(all.insert(id), "chatId {id} acknowledged twice");
        }
    }
    let total = 3 * EACH as i64;
    assert_eq!(all, (1..=total).collect(), "chatIds 1..={total}, no gap");
    // Every node delivers in the order Redis assigned.
    for w in [&mut watch_a, &mut watch_c] {
        let ids: Vec<i64> = take(w, 3 * EACH).await.iter().map(|m| m.chat_id).collect();
        assert_eq!(ids, (1..=total).collect::<Vec<_>>());
    }
}

/// The cluster's group directory, as an application's admin path uses it.
async fn groups(redis: &Redis) -> std::sync::Arc<comet::plugins::redis::RedisGroups> {
    use comet::plugins::redis::{RedisCluster, RedisOptions};
    RedisCluster::connect(RedisOptions::new(redis.url(), "admin"))
        .await
        .expect("connects to the test redis")
        .groups()
}

/// Takes exactly one message and checks its chatId and bytes.
async fn one_msg(c: &mut Client, chat_id: i64, msg: &[u8]) {
    let got = take(c, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].chat_id, &got[0].msg[..]), (chat_id, msg));
}

/// A group message is published once for all nodes; each delivers it to
/// its own sessions of the members from its membership cache, which joins
/// and leaves made on any node keep in step, and which is loaded again
/// after the feed was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_routing_follows_joins_and_leaves_on_every_node() {
    let redis = Redis::start();
    let n = nodes(&redis).await;
    let groups = groups(&redis).await;
    let mut one = login(&n[0], Kind::Tcp, 1).await;
    let mut two = login(&n[1], Kind::WsBinary, 2).await;
    let mut three = login(&n[2], Kind::WsJson, 3).await;
    let mut four = login(&n[1], Kind::Tcp, 4).await;
    let mut five = login(&n[2], Kind::Tcp, 5).await;

    let ack = one.send_msg(20, 1, 100, b"g1").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 1));
    one_msg(&mut two, 1, b"g1").await;
    one_msg(&mut three, 1, b"g1").await;
    four.no_msg().await;

    // 4 joins (node b has the group cached): the next message reaches it.
    groups.join(100, 4).await.unwrap();
    let ack = one.send_msg(20, 1, 100, b"g2").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 2));
    for c in [&mut two, &mut three, &mut four] {
        one_msg(c, 2, b"g2").await;
    }

    // 2 leaves: the next message does not reach it, and 2 may not send.
    groups.leave(100, 2).await.unwrap();
    let ack = one.send_msg(20, 1, 100, b"g3").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 3));
    one_msg(&mut three, 3, b"g3").await;
    one_msg(&mut four, 3, b"g3").await;
    assert_eq!(two.send_msg(20, 2, 100, b"gone").await.ret, -1);
    two.no_msg().await;
    five.no_msg().await;
    one.no_msg().await;

    // Every feed lost; 5 joins while the nodes resubscribe. Their caches
    // were forgotten with the feed, so they load the group again.
    let killed: i64 = redis.cmd(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"));
    assert!(killed >= 3, "every node's subscription killed ({killed})");
    groups.join(100, 5).await.unwrap();
    for mut c in [one, two, three, four, five] {
        let _ = common::within("session closed", c.msgs_until_closed()).await;
    }
    let mut one = login_eventually(&n[0], Kind::Tcp, 1).await;
    let mut two = login_eventually(&n[1], Kind::WsBinary, 2).await;
    let mut three = login_eventually(&n[2], Kind::WsJson, 3).await;
    let mut five = login_eventually(&n[2], Kind::Tcp, 5).await;
    let ack = one.send_msg(20, 1, 100, b"g4").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 4));
    one_msg(&mut three, 4, b"g4").await;
    one_msg(&mut five, 4, b"g4").await;
    two.no_msg().await;
    one.no_msg().await;
}

/// Nodes that have never seen a group load its members when its first
/// message arrives, while joins and leaves keep coming: each message still
/// reaches exactly the members it had when it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_membership_caches_deliver_to_the_members_of_each_send() {
    const GROUPS: i32 = 20;
    let redis = Redis::start();
    let n = nodes(&redis).await;
    let groups = groups(&redis).await;
    let mut one = login(&n[0], Kind::WsBinary, 1).await;
    let mut seven = login(&n[1], Kind::WsJson, 7).await;
    let mut eight = login(&n[1], Kind::WsBinary, 8).await;
    let mut nine = login(&n[2], Kind::Tcp, 9).await;
    for g in 0..GROUPS {
        let group = 1000 + g;
        groups.join(group, 1).await.unwrap();
        groups.join(group, 7).await.unwrap();
        groups.join(group, 9).await.unwrap();
        // m1: 7, 9; then 8 joins; m2: 7, 8, 9; then 7 leaves; m3: 8, 9.
        assert_eq!(one.send_msg(20, 1, group, b"m1").await.ret, 0);
        groups.join(group, 8).await.unwrap();
        assert_eq!(one.send_msg(20, 1, group, b"m2").await.ret, 0);
        groups.leave(group, 7).await.unwrap();
        assert_eq!(one.send_msg(20, 1, group, b"m3").await.ret, 0);
    }
    let per_group = |c: Vec<Msg>| {
        let mut by: BTreeMap<i32, Vec<(i64, Vec<u8>)>> = BTreeMap::new();
        for m in c {
            assert_eq!(m.op, 20);
            by.entry(m.to).or_default().push((m.chat_id, m.msg));
        }
        by
    };
    let want = |ids: &[(i64, &[u8])]| {
        (0..GROUPS)
            .map(|g| {
                let msgs = ids.iter().map(|(id, m)| (*id, m.to_vec())).collect();
                (1000 + g, msgs)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let g = GROUPS as usize;
    assert_eq!(
        per_group(take(&mut seven, 2 * g).await),
        want(&[(1, b"m1"), (2, b"m2")])
    );
    assert_eq!(
        per_group(take(&mut eight, 2 * g).await),
        want(&[(2, b"m2"), (3, b"m3")])
    );
    assert_eq!(
        per_group(take(&mut nine, 3 * g).await),
        want(&[(1, b"m1"), (2, b"m2"), (3, b"m3")])
    );
    one.no_msg().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_inbox_group_catch_up_and_sync_from_any_node() {
    let redis = Redis::start();
    let n = nodes(&redis).await;
    // 9 logs in once and out again (its catch-up point is now), then
    // messages arrive while it is offline everywhere.
    login(&n[1], Kind::Tcp, 9).await.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut one = login(&n[0], Kind::Tcp, 1).await;
    for k in 1..=3 {
        let ack = one
            .send_msg(18, 1, 9, format!("direct {k}").as_bytes())
            .await;
        assert_eq!((ack.ret, ack.chat_id), (0, k));
        let ack = one
            .send_msg(20, 1, 200, format!("group {k}").as_bytes())
            .await;
        assert_eq!((ack.ret, ack.chat_id), (0, k));
    }
    // Logs in on another node: the inbox and the group's catch-up.
    let mut nine = login(&n[2], Kind::WsJson, 9).await;
    let got = take(&mut nine, 6).await;
    let direct: Vec<_> = got
        .iter()
        .filter(|m| m.op == 18)
        .map(|m| (m.chat_id, m.msg.clone()))
        .collect();
    let group: Vec<_> = got
        .iter()
        .filter(|m| m.op == 20)
        .map(|m| (m.chat_id, m.msg.clone()))
        .collect();
    assert_eq!(
        direct,
        (1..=3)
            .map(|k| (k, format!("direct {k}").into_bytes()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        group,
        (1..=3)
            .map(|k| (k, format!("group {k}").into_bytes()))
            .collect::<Vec<_>>()
    );
    // Nothing twice, and a second login gets nothing again.
    assert_eq!(got.len(), 6, "{got:?}");
    nine.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut nine = login(&n[1], Kind::WsBinary, 9).await;
    nine.no_msg().await;
    // Sync reads the shared history from any node.
    for (i, kind) in common::raw::KINDS.into_iter().enumerate() {
        let mut c = login(&n[i], kind, 9).await;
        let (ack, msgs) = c.sync(18, 1, 0, None).await;
        assert_eq!((ack.ret, ack.oldest, ack.head), (0, 1, 3), "node {i}");
        assert_eq!(
            msgs.iter().map(|m| m.chat_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let (ack, msgs) = c.sync(20, 200, 1, None).await;
        assert_eq!((ack.ret, ack.head), (0, 3));
        assert_eq!(
            msgs.iter().map(|m| m.chat_id).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }
}

/// Sends 1:1 from `c` until `n` acks or the connection closes; returns the
/// acked (chatId, msg).
async fn send_until_closed(
    c: &mut Client,
    from: i32,
    to: i32,
    tag: &str,
    n: usize,
) -> Vec<(i64, Vec<u8>)> {
    let mut acked = Vec::new();
    for k in 0..n {
        let msg = format!("{tag}-{k}").into_bytes();
        let seq = c.next_seq();
        let mut body = from.to_be_bytes().to_vec();
        body.extend_from_slice(&to.to_be_bytes());
        body.extend_from_slice(&msg);
        if c.kind == Kind::WsJson {
            c.send_frame(
                18,
                seq,
                Some(
                    json!({"from": from, "to": to, "msg": String::from_utf8(msg.clone()).unwrap()}),
                ),
                None,
            )
            .await;
        } else {
            c.send_frame(18, seq, None, Some(&body)).await;
        }
        let Ok(reply) = c.reply().await else { break };
        assert_eq!(reply.op, 19);
        let (ret, chat_id) = if c.kind == Kind::WsJson {
            (
                reply.json["ret"].as_i64().unwrap(),
                reply.json["chatId"].as_i64().unwrap(),
            )
        } else {
            (
                reply.bytes[0] as i8 as i64,
                i64::from_be_bytes(reply.bytes[1..9].try_into().unwrap()),
            )
        };
        if ret == 0 {
            acked.push((chat_id, msg));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    acked
}

/// The chatId through which `have` holds every message without a gap: what
/// a client syncs after (chatIds are gapless, so a hole means a message
/// it missed, e.g. one routed to a node as that node died).
fn gapless_through(have: &BTreeMap<i64, Vec<u8>>) -> i64 {
    let mut through = 0;
    while have.contains_key(&(through + 1)) {
        through += 1;
    }
    through
}

/// Every message `mid` can see of its direct conversation with `peer`:
/// `seen` plus a sync after the first gap in them.
async fn synced(c: &mut Client, peer: i32, seen: &[Msg]) -> BTreeMap<i64, Vec<u8>> {
    let mut all: BTreeMap<i64, Vec<u8>> = seen
        .iter()
        .filter(|m| m.op == 18)
        .map(|m| (m.chat_id, m.msg.clone()))
        .collect();
    let (ack, msgs) = c.sync(18, peer, gapless_through(&all), None).await;
    assert_eq!(ack.ret, 0, "{ack:?}");
    // `sync` also hands back live and inbox messages that arrived with it
    // (e.g. group catch-up): keep this conversation's.
    for m in msgs.into_iter().filter(|m| m.op == 18) {
        all.insert(m.chat_id, m.msg);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_pubsub_connection_closes_sessions_and_sync_recovers_everything() {
    let redis = Redis::start();
    let n = nodes(&redis).await;
    let mut two = login(&n[1], Kind::WsBinary, 2).await;
    let mut one = login(&n[0], Kind::Tcp, 1).await;
    let sender = tokio::spawn(async move {
        let acked = send_until_closed(&mut one, 1, 2, "k", 300).await;
        (one, acked)
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let killed: i64 = redis.cmd(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"));
    assert!(killed >= 3, "every node's subscription killed ({killed})");
    // The receiver's node closes its session: its client reconnects.
    let (seen, closed) = common::within("session closed", two.msgs_until_closed()).await;
    assert!(matches!(closed, Closed::Ws(..) | Closed::Eof));
    let (_, mut acked) = sender.await.unwrap();
    // The sender reconnects too and sends more once its node is back.
    let mut one = login_eventually(&n[0], Kind::Tcp, 1).await;
    acked.extend(send_until_closed(&mut one, 1, 2, "after", 20).await);
    assert!(acked.len() >= 20);
    let mut two = login_eventually(&n[2], Kind::WsJson, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    two.heartbeat().await;
    let mut seen = seen;
    seen.extend(two.take_msgs());
    let all = synced(&mut two, 1, &seen).await;
    for (id, msg) in &acked {
        assert_eq!(
            all.get(id),
            Some(msg),
            "acknowledged chatId {id} missing after sync"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_falls_behind_its_feed_stops_reading_and_resyncs_its_sessions() {
    let redis = Redis::start();
    // Redis drops a subscriber holding 256 KiB it has not read (by default
    // 32 MiB); the node reads at most 16 KiB ahead of its feed task.
    let _: () = redis.cmd(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("client-output-buffer-limit")
            .arg("pubsub 262144 131072 1"),
    );
    let a = node_with(&redis, "a", |c| c.cluster.feed_budget = Some(16 * 1024)).await;
    let mut one = login(&a, Kind::Tcp, 1).await;
    // A steady flood on the node's feed, 10 messages a millisecond (40 MB
    // a second, which the node's reader takes in without falling behind),
    // of 1:1 messages for users online nowhere: the node puts each into
    // five inboxes, one Redis call at a time, far slower than that.
    let client = redis.client();
    let flood = tokio::task::spawn_blocking(move || {
        let mut c = client.get_connection().unwrap();
        let body = vec![b'x'; 4096];
        for round in 0..500 {
            let mut pipe = redis::pipe();
            for k in 0..10 {
                let chat = round * 10 + k + 1;
                let mut m = format!("D\n{chat}\n18\n8\n9\n0\n9,7,6,5,4\n").into_bytes();
                m.extend_from_slice(&body);
                pipe.cmd("PUBLISH").arg("comet:ch:a").arg(m).ignore();
            }
            let _: () = pipe.query(&mut c).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    // The node stops reading 16 KiB ahead, Redis drops its subscription
    // (an unbounded reader would have kept taking it all into the node's
    // memory instead), and the node closes its sessions so that they
    // resync.
    let (_, closed) = common::within("session closed", one.msgs_until_closed()).await;
    assert!(matches!(closed, Closed::Eof), "{closed:?}");
    flood.await.unwrap();
    // The node subscribes again and serves as before.
    let mut one = login_eventually(&a, Kind::Tcp, 1).await;
    let mut two = login(&a, Kind::WsBinary, 2).await;
    let ack = one.send_msg(18, 1, 2, b"after the flood").await;
    assert_eq!(ack.ret, 0);
    let got = take(&mut two, 1).await;
    assert_eq!(got[0].msg, b"after the flood".to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_refuses_sends_and_logins_then_recovers() {
    let mut redis = Redis::start();
    let a = node_with(&redis, "a", |c| {
        c.admin = Some(comet::server::AdminSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: None,
        });
    })
    .await;
    let b = node(&redis, "b").await;
    let mut one = login(&a, Kind::Tcp, 1).await;
    let mut two = login(&b, Kind::WsJson, 2).await;
    assert_eq!(one.send_msg(18, 1, 2, b"before").await.chat_id, 1);
    assert_eq!(take(&mut two, 1).await[0].msg, b"before");

    redis.stop();
    // Sessions are closed (their feed is gone)...
    common::within("session closed", one.closed()).await;
    common::within("session closed", two.closed()).await;
    // ...sends fail (ret -1 on the wire: `SendError::Store`)...
    let err = a.comet.send_to_user(1, 2, "down".into()).await.unwrap_err();
    assert!(matches!(err, comet::core::SendError::Store(_)), "{err:?}");
    // ...and logins are refused with a reason, without a panic.
    for kind in common::raw::KINDS {
        let mut c = Client::connect(kind, addr(&b, kind)).await;
        let (ret, body) = c.auth(json!({"mid": 3, "mkey": "k3"})).await;
        assert_ne!(ret, 0, "login while Redis is down: {body}");
        let reason = body["error"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "refused without a reason: {body}");
    }
    // The admin API: this node's totals still, with why the cluster's are
    // missing; the node list cannot be read.
    let api = a.admin_addr.unwrap();
    let (status, body) = get(api, "/api/online").await;
    assert_eq!(status, 200, "{body}");
    let online: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(online["sessions"], json!(0), "{online}");
    assert!(online.get("cluster").is_none(), "{online}");
    let why = online["cluster_error"].as_str().unwrap_or_default();
    assert!(why.starts_with("cluster unavailable: "), "{online}");
    let (status, body) = get(api, "/api/nodes").await;
    assert_eq!(status, 503, "{body}");

    // Redis comes back (same port, same AOF; its script cache is empty).
    redis.spawn();
    let mut one = login_eventually(&a, Kind::Tcp, 1).await;
    let mut two = login_eventually(&b, Kind::WsJson, 2).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let ack = loop {
        let ack = one.send_msg(18, 1, 2, b"after").await;
        if ack.ret == 0 || Instant::now() > deadline {
            break ack;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The history survived (AOF), so chatIds go on.
    assert_eq!((ack.ret, ack.chat_id), (0, 2), "{ack:?}");
    let got = take(&mut two, 1).await;
    assert_eq!((got[0].chat_id, &got[0].msg[..]), (2, &b"after"[..]));
    let (ack, msgs) = two.sync(18, 1, 0, None).await;
    assert_eq!((ack.ret, ack.head), (0, 2));
    assert_eq!(msgs.len(), 2);
}

/// A `chat_server` process in cluster mode.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Proc {
    fn start(redis: &Redis, dir: &Path, name: &str) -> Proc {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut config = format!(
            "[server]\ntcp = \"{addr}\"\nmax_frames_per_sec = 0\nsync_limit = 1000\n\
             [store]\nbackend = \"redis\"\nurl = \"{}\"\n[cluster]\nnode_id = \"{name}\"\n",
            redis.url()
        );
        for mid in 1..=9 {
            config.push_str(&format!("[[users]]\nmid = {mid}\nmkey = \"k{mid}\"\n"));
        }
        config.push_str("[[groups]]\nid = 100\nmembers = [1, 2, 3]\n");
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(common::chat_server_binary())
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("chat_server starts");
        let mut p = Proc { child, addr };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(p.addr).is_err() {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("{name}.log")));
                panic!("chat_server exited with {status}: {log:?}");
            }
            assert!(
                Instant::now() < deadline,
                "chat_server did not listen in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis that asks for a password: each of a node's connections (its
/// commands and its feed) authenticates as the URL's ACL user, so
/// cross-node delivery works; a wrong password stops a node at start with
/// a reason that shows the URL without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_authenticate_to_a_redis_that_asks_for_a_password() {
    let redis = Redis::start();
    let ok: String = redis.cmd(
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("comet")
            .arg("on")
            .arg(">s3cret")
            // What docs/CLUSTER.md asks for: the prefix's keys and
            // channels, and no dangerous command but CONFIG GET.
            .arg("~comet:*")
            .arg("&comet:*")
            .arg("+@all")
            .arg("-@dangerous")
            .arg("+config|get"),
    );
    assert_eq!(ok, "OK");
    // From here on the default user needs a password too.
    let ok: String = redis.cmd(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg("admin-pw"),
    );
    assert_eq!(ok, "OK");
    let url = format!("redis://comet:s3cret@127.0.0.1:{}/", redis.port);
    let a = node_with(&redis, "a", |c| c.store.url = url.clone()).await;
    let b = node_with(&redis, "b", |c| c.store.url = url.clone()).await;
    let mut one = login(&a, Kind::Tcp, 1).await;
    let mut two = login(&b, Kind::WsJson, 2).await;
    let ack = one.send_msg(18, 1, 2, b"through an ACL user").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 1));
    let got = take(&mut two, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].msg, b"through an ACL user");
    // A group send, and an offline inbox read at a login on the other node.
    let ack = two.send_msg(20, 2, 100, b"group").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 1));
    assert_eq!(take(&mut one, 1).await[0].msg, b"group");
    assert_eq!(one.send_msg(18, 1, 3, b"offline").await.ret, 0);
    let mut three = login(&b, Kind::WsBinary, 3).await;
    let got = take(&mut three, 2).await;
    let mut texts: Vec<&[u8]> = got.iter().map(|m| m.msg.as_slice()).collect();
    texts.sort();
    assert_eq!(texts, [b"group".as_slice(), b"offline".as_slice()]);
    // And sync (op 22) from the shared history.
    let (ack, msgs) = three.sync(20, 100, 0, None).await;
    assert_eq!(ack.ret, 0);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].msg, b"group");

    let text = format!(
        "[server]\ntcp = \"127.0.0.1:0\"\n[store]\nbackend = \"redis\"\n\
         url = \"redis://comet:wrong-pw@127.0.0.1:{}/\"\n[cluster]\nnode_id = \"c\"\n",
        redis.port
    );
    let config = comet::server::ServerConfig::parse(&text, "test.toml").unwrap();
    let err = match comet::server::start(config).await {
        Ok(_) => panic!("a node with a wrong password started"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("redis://comet:***@127.0.0.1"), "{err}");
    assert!(!err.contains("wrong-pw"), "{err}");
    assert!(
        err.to_lowercase().contains("auth") || err.contains("WRONGPASS"),
        "{err}"
    );
}

/// rediss://: nodes reach Redis over TLS (on its TLS port) for their
/// commands and their feed, checking its certificate against
/// `store.tls_ca_file` and showing their own, which this Redis asks for
/// (`tls-auth-clients yes`, its default). A node without the CA (the
/// system's roots), or without a certificate of its own, does not start,
/// and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_reach_a_redis_over_tls_and_check_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL (Redis) takes a certificate whose issuer is
    // its own subject for a self-signed one.
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "comet test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let signed = |name: &str, sans: Vec<String>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca).unwrap();
        (
            file(&format!("{name}.pem"), cert.pem()),
            file(&format!("{name}-key.pem"), key.serialize_pem()),
        )
    };
    let (server_cert, server_key) = signed("redis", vec!["127.0.0.1".into()]);
    let (node_cert, node_key) = signed("node", vec!["node".into()]);
    let ca_file = file("ca.pem", ca.pem());
    let tls_port = free_port().to_string();
    let arg = |p: &std::path::PathBuf| p.to_str().unwrap().to_string();
    // Redis's default: tls-auth-clients yes.
    let redis = Redis::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &arg(&server_cert),
        "--tls-key-file",
        &arg(&server_key),
        "--tls-ca-cert-file",
        &arg(&ca_file),
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let tls = |c: &mut comet::server::ServerConfig| {
        c.store.url = url.clone();
        c.store.tls_ca_file = Some(ca_file.clone());
        c.store.tls_cert_file = Some(node_cert.clone());
        c.store.tls_key_file = Some(node_key.clone());
    };
    let a = node_with(&redis, "a", tls).await;
    let b = node_with(&redis, "b", tls).await;
    let mut one = login(&a, Kind::Tcp, 1).await;
    let mut two = login(&b, Kind::WsBinary, 2).await;
    let ack = one.send_msg(18, 1, 2, b"over TLS").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 1));
    assert_eq!(take(&mut two, 1).await[0].msg, b"over TLS");
    // Every connection of the nodes, the two feeds (sub=2) included, came
    // in on the TLS port.
    let clients: String = redis.cmd(redis::cmd("CLIENT").arg("LIST"));
    let on_tls = |l: &&str| l.contains(&format!("laddr=127.0.0.1:{tls_port} "));
    let nodes: Vec<&str> = clients.lines().filter(on_tls).collect();
    assert!(nodes.len() >= 4, "{clients}");
    assert_eq!(
        nodes.iter().filter(|l| l.contains(" sub=2 ")).count(),
        2,
        "{clients}"
    );
    assert!(
        clients
            .lines()
            .filter(|l| !on_tls(l))
            .all(|l| !l.contains(" sub=2 ")),
        "{clients}"
    );

    // Without the CA, or without a certificate of its own.
    let no_ca: fn(&mut comet::server::ServerConfig) = |c| c.store.tls_ca_file = None;
    let no_cert: fn(&mut comet::server::ServerConfig) = |c| {
        c.store.tls_cert_file = None;
        c.store.tls_key_file = None;
    };
    for (edit, what) in [(no_ca, "UnknownIssuer"), (no_cert, "CertificateRequired")] {
        let text = "[server]\ntcp = \"127.0.0.1:0\"\n[store]\nbackend = \"redis\"\n\
                    [cluster]\nnode_id = \"c\"\n";
        let mut config = comet::server::ServerConfig::parse(text, "test.toml").unwrap();
        tls(&mut config);
        edit(&mut config);
        let err = match comet::server::start(config).await {
            Ok(_) => panic!("a node started: {what}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&format!("redis at {url}")), "{err}");
        assert!(err.contains(what), "{err}");
    }
}

/// `GET path` on `addr`: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path, "").await
}

/// One HTTP/1.1 request (with a JSON `body` unless empty): the status code
/// and the body of the answer.
async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let answer = common::http::http(addr, method, path, None, Some(body)).await;
    (answer.status, answer.body)
}

/// `/readyz` of `n` until its status is `want`; returns the body.
async fn ready_until(n: &Running, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(n.admin_addr.unwrap(), "/readyz").await;
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node whose feed is not subscribed takes no logins, and its `/readyz`
/// says so (503, with the reason), so that a load balancer sends clients
/// elsewhere, as does `comet_cluster_ready`; once the feed is back, so is
/// the node, and `comet_cluster_feed_subscriptions_total` counts the new
/// subscription. (Redis 7 drops the
/// subscriptions of a user whose channel permissions are taken away, and
/// refuses new ones: the feed stays down while commands still work.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_its_feed_is_not_ready() {
    let redis = Redis::start();
    let acl = |channels: &str| {
        let ok: String = redis.cmd(
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg("comet")
                .arg("on")
                .arg(">pw")
                .arg("~*")
                .arg("+@all")
                .arg("resetchannels")
                .arg(channels),
        );
        assert_eq!(ok, "OK");
    };
    acl("&*");
    let url = format!("redis://comet:pw@127.0.0.1:{}/", redis.port);
    let n = node_with(&redis, "a", |c| {
        c.store.url = url;
        c.admin = Some(comet::server::AdminSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: None,
        });
    })
    .await;
    assert_eq!(ready_until(&n, 200).await, "ready\n");
    login(&n, Kind::Tcp, 1).await;

    acl("resetchannels");
    let why = ready_until(&n, 503).await;
    assert!(why.contains("feed is not subscribed"), "{why}");
    // The node list says so too: alive (heartbeating), not ready.
    let (status, body) = get(n.admin_addr.unwrap(), "/api/nodes").await;
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["nodes"][0]["id"], json!("a"), "{body}");
    assert_eq!(listed["nodes"][0]["ready"], json!(false), "{body}");
    assert_eq!(listed["totals"]["ready"], json!(0), "{body}");
    // The counter is the process's: other tests' nodes add to it too.
    let subscriptions = metric(&n, "comet_cluster_feed_subscriptions_total").await;
    assert_eq!(metric(&n, "comet_cluster_ready").await, 0.0);
    let mut c = Client::connect(Kind::Tcp, addr(&n, Kind::Tcp)).await;
    let (ret, body) = c.auth(json!({"mid": 2, "mkey": "k2"})).await;
    assert_ne!(ret, 0, "a login while the feed is down: {body}");

    acl("&*");
    assert_eq!(ready_until(&n, 200).await, "ready\n");
    login(&n, Kind::Tcp, 2).await;
    assert_eq!(metric(&n, "comet_cluster_ready").await, 1.0);
    assert!(metric(&n, "comet_cluster_feed_subscriptions_total").await > subscriptions);
}

/// The value of `series` on `n`'s `/metrics` (0 while it has none).
async fn metric(n: &Running, series: &str) -> f64 {
    let (status, text) = get(n.admin_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A second live node with a node id already in use does not start (it
/// would read the first one's channel and reset its presence); another id
/// does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_id_in_use_by_a_live_node_is_refused() {
    let redis = Redis::start();
    let first = node(&redis, "a").await;
    // Once its feed is subscribed, the id is visibly in use.
    login(&first, Kind::Tcp, 1).await;
    let text = format!(
        "[server]\ntcp = \"127.0.0.1:0\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\n\
         [cluster]\nnode_id = \"a\"\n",
        redis.url()
    );
    let config = comet::server::ServerConfig::parse(&text, "test.toml").unwrap();
    let err = match comet::server::start(config).await {
        Ok(_) => panic!("a second node \"a\" started"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("node id \"a\" is taken"), "{err}");
    let second = node(&redis, "b").await;
    login(&second, Kind::Tcp, 2).await;

    // A subscription Redis still holds for a node that died without
    // closing it (a power cut: no heartbeat any more) does not stop that
    // id from starting again.
    let mut stale = redis.client().get_connection().unwrap();
    let mut stale = stale.as_pubsub();
    stale.subscribe("comet:ch:c").unwrap();
    let restarted = node(&redis, "c").await;
    login(&restarted, Kind::Tcp, 3).await;
}

/// A process that takes a running node's id over (two processes started
/// with one id at the same instant, both passing the start-up check, or a
/// node that stalled past its heartbeat's lifetime while another started
/// with its id) makes the running one step down at its next heartbeat: it
/// closes its sessions, refuses logins, answers not ready, stops reading
/// the id's channel and leaves the id's claim and presence to the newcomer
/// while that one lives. Once it is gone, the node claims the id again and
/// takes logins again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_id_another_process_claims_steps_down() {
    let redis = Redis::start();
    let n = node_with(&redis, "a", |c| {
        // Heartbeats every 500 ms.
        c.cluster.node_ttl_ms = Some(1500);
        c.admin = Some(comet::server::AdminSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: None,
        });
    })
    .await;
    let mut one = login(&n, Kind::Tcp, 1).await;
    assert_eq!(ready_until(&n, 200).await, "ready\n");
    let presence = || -> Vec<String> { redis.cmd(redis::cmd("SMEMBERS").arg("comet:pr:1")) };
    assert_eq!(presence(), ["a"]);
    let readers = || -> u64 {
        let (_, n): (String, u64) = redis.cmd(redis::cmd("PUBSUB").arg("NUMSUB").arg("comet:ch:a"));
        n
    };

    // A newcomer with the same id, as the redis commands it would issue:
    // its claim (scripts::CLAIM), its feed's subscription, its heartbeat.
    let mut newcomer = redis.client().get_connection().unwrap();
    let mut newcomer = newcomer.as_pubsub();
    newcomer.subscribe("comet:ch:a").unwrap();
    let ok: String = redis.cmd(redis::cmd("SET").arg("comet:own:a").arg("newcomer"));
    assert_eq!(ok, "OK");
    let ok: String = redis.cmd(
        redis::cmd("SET")
            .arg("comet:node:a")
            .arg("1")
            .arg("PX")
            .arg(60_000),
    );
    assert_eq!(ok, "OK");

    common::within("the displaced node closing its session", one.closed()).await;
    let why = ready_until(&n, 503).await;
    assert!(why.contains("not subscribed"), "{why}");
    let mut c = Client::connect(Kind::Tcp, addr(&n, Kind::Tcp)).await;
    let (ret, body) = c.auth(json!({"mid": 2, "mkey": "k2"})).await;
    // (The reason, "taken over by another process", goes to the log.)
    assert_ne!(ret, 0, "{body}");
    assert_eq!(body["error"], "cluster unavailable", "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while readers() != 1 {
        assert!(
            Instant::now() < deadline,
            "the displaced node still reads comet:ch:a"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past several heartbeat periods, while the newcomer lives: the
    // displaced node neither claims the id back nor logs its closed
    // session out of the id's presence.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let own: String = redis.cmd(redis::cmd("GET").arg("comet:own:a"));
    assert_eq!(own, "newcomer");
    assert_eq!(presence(), ["a"]);
    assert_eq!(readers(), 1);

    // The newcomer goes away: the node claims the id again, resets the
    // id's presence and takes logins again.
    drop(newcomer);
    let gone: u64 = redis.cmd(redis::cmd("DEL").arg("comet:node:a"));
    assert_eq!(gone, 1);
    assert_eq!(ready_until(&n, 200).await, "ready\n");
    let own: String = redis.cmd(redis::cmd("GET").arg("comet:own:a"));
    assert_ne!(own, "newcomer");
    let mut two = login(&n, Kind::Tcp, 2).await;
    assert_eq!(presence(), Vec::<String>::new());
    two.heartbeat().await;
}

/// The admin API on a cluster: a 1:1 and a group send posted on one node
/// reach sessions on the other; a system group send (`"system": true`)
/// skips the membership check as on a single node, its non-member sender's
/// own session included, while without `system` that sender is refused;
/// group membership changes (`PUT` / `DELETE`) hold for every node; the
/// node list and the cluster's totals count every node's sessions; and a
/// kick closes the user's sessions on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_pushes_reach_every_node_and_system_sends_skip_the_membership_check() {
    let redis = Redis::start();
    // Heartbeats (and session counts) every second.
    let ttl = |c: &mut comet::server::ServerConfig| c.cluster.node_ttl_ms = Some(3000);
    let a = node_with(&redis, "a", |c| {
        ttl(c);
        c.admin = Some(comet::server::AdminSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: None,
        });
    })
    .await;
    let b = node_with(&redis, "b", ttl).await;
    let api = a.admin_addr.unwrap();
    let mut one = login(&a, Kind::Tcp, 1).await;
    let mut two = login(&b, Kind::WsJson, 2).await;
    // 9 is not in group 100 = {1, 2, 3}.
    let mut nine = login(&b, Kind::WsBinary, 9).await;

    let (status, body) = request(
        api,
        "POST",
        "/api/send/user",
        r#"{"from": 1, "to": 2, "msg": "pushed"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(take(&mut two, 1).await[0].msg, b"pushed");
    // The sender's sessions get their copy, as for a client's op 18.
    assert_eq!(take(&mut one, 1).await[0].msg, b"pushed");

    let (status, body) = request(
        api,
        "POST",
        "/api/send/group",
        r#"{"from": 9, "group": 100, "msg": "not a member"}"#,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = request(
        api,
        "POST",
        "/api/send/group",
        r#"{"from": 9, "group": 100, "msg": "from the system", "system": true}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sent: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sent["chatId"], 1, "{body}");
    for c in [&mut one, &mut two, &mut nine] {
        let got = take(c, 1).await;
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].op, got[0].chat_id, got[0].from, got[0].to),
            (20, 1, 9, 100)
        );
        assert_eq!(got[0].msg, b"from the system");
    }

    // Membership through the API, for every node: 9 joins and may send.
    let member = "/api/groups/100/members/9";
    // A membership change answers 200 with whether anything changed.
    let change = |method: &'static str, changed: bool| async move {
        let (status, body) = request(api, method, member, "").await;
        let want = format!(r#""changed":{changed}"#);
        assert_eq!((status, body.contains(&want)), (200, true), "{body}");
    };
    change("PUT", true).await;
    change("PUT", false).await;
    let (_, body) = get(api, "/api/groups/100/members").await;
    assert!(body.contains('9'), "{body}");
    let ack = nine.send_msg(20, 9, 100, b"a member now").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 2));
    for c in [&mut one, &mut two] {
        assert_eq!(take(c, 1).await[0].msg, b"a member now");
    }
    change("DELETE", true).await;
    change("DELETE", false).await;
    assert_eq!(nine.send_msg(20, 9, 100, b"gone").await.ret, -1);

    // Presence for the whole cluster: user 1 on both nodes, 2 on b only.
    let mut one_on_b = login(&b, Kind::WsJson, 1).await;
    let presence = |mid: i32| async move {
        let (status, body) = get(api, &format!("/api/users/{mid}")).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let p1 = presence(1).await;
    assert_eq!(
        (p1["online"].clone(), p1["sessions"].clone()),
        (json!(true), json!(1))
    );
    assert_eq!(p1["nodes"], json!(["a", "b"]), "{p1}");
    let p2 = presence(2).await;
    assert_eq!(
        (p2["online"].clone(), p2["sessions"].clone()),
        (json!(false), json!(0))
    );
    assert_eq!(p2["nodes"], json!(["b"]), "{p2}");

    // Every node's sessions, as its heartbeats report them: 1 on a; 2, 9
    // and 1 on b.
    let listed = nodes_until(api, |v| {
        let counts: Vec<_> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["id"].clone(), n["sessions"].clone()))
            .collect();
        counts == [(json!("a"), json!(1)), (json!("b"), json!(3))]
    })
    .await;
    for n in listed["nodes"].as_array().unwrap() {
        assert_eq!(n["ready"], json!(true), "{listed}");
        assert!(n["reported_ms_ago"].as_u64().unwrap() < 3000, "{listed}");
    }
    let totals = json!({"nodes": 2, "ready": 2, "sessions": 4});
    assert_eq!(listed["totals"], totals, "{listed}");
    let (status, body) = get(api, "/api/online").await;
    assert_eq!(status, 200, "{body}");
    let online: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (online["sessions"].clone(), online["users"].clone()),
        (json!(1), json!([1]))
    );
    assert_eq!(online["cluster"], totals, "{online}");

    // A kick posted on node a closes user 1's sessions on both nodes.
    let (status, body) = request(api, "POST", "/api/users/1/kick", "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""closed":1"#), "{body}");
    common::within("the kick on node a", one.closed()).await;
    common::within("the kick on node b", one_on_b.closed()).await;
    // Their logouts reach the presence (a logout does not block the close).
    let deadline = Instant::now() + Duration::from_secs(10);
    while presence(1).await["nodes"] != json!([]) {
        assert!(Instant::now() < deadline, "{}", presence(1).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nobody else's.
    two.heartbeat().await;
    nine.heartbeat().await;

    // A node that stopped leaves the list once its heartbeat expires.
    assert!(b.shutdown().await);
    let left = nodes_until(api, |v| v["nodes"].as_array().unwrap().len() == 1).await;
    assert_eq!(left["nodes"][0]["id"], json!("a"), "{left}");
}

/// `GET /api/nodes` on `api`, asked again until its answer satisfies
/// `done` (the nodes report with their heartbeats), within 10 s.
async fn nodes_until(
    api: SocketAddr,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(api, "/api/nodes").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node names, in its log, each Redis setting under which the cluster
/// would lose or reuse acknowledged sends, or hold a slow node's backlog in
/// Redis without bound; on the tests' settings (AOF on, no memory limit,
/// Redis's default pubsub limit) it names none.
#[tokio::test]
async fn a_node_warns_of_redis_settings_that_lose_acknowledged_sends() {
    const RISKY: [&str; 3] = [
        "maxmemory-policy",
        "appendonly",
        "client-output-buffer-limit",
    ];
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    // A node listens before it connects to Redis: its log is whole once
    // it has said "cluster node", which comes after the warnings.
    let log = |name: &str| {
        let path = dir.path().join(format!("{name}.log"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.contains("cluster node") {
                return text;
            }
            assert!(Instant::now() < deadline, "{name} never connected: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let safe_node = Proc::start(&redis, dir.path(), "safe");
    let safe = log("safe");
    drop(safe_node);
    for setting in RISKY {
        assert!(
            !safe.contains(setting),
            "{setting} named on safe settings: {safe}"
        );
    }

    for (name, value) in [
        ("maxmemory", "1gb"),
        ("maxmemory-policy", "allkeys-lru"),
        ("appendonly", "no"),
        ("client-output-buffer-limit", "pubsub 0 0 0"),
    ] {
        let ok: String = redis.cmd(redis::cmd("CONFIG").arg("SET").arg(name).arg(value));
        assert_eq!(ok, "OK");
    }
    let risky_node = Proc::start(&redis, dir.path(), "risky");
    let risky = log("risky");
    drop(risky_node);
    for setting in RISKY {
        let line = risky
            .lines()
            .find(|l| l.contains("WARN") && l.contains(&format!("setting=\"{setting}\"")))
            .unwrap_or_else(|| panic!("no warning for {setting}: {risky}"));
        assert!(line.contains("node=\"risky\""), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_node_loses_nothing_acknowledged() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut doomed = Proc::start(&redis, dir.path(), "doomed");
    let survivor = Proc::start(&redis, dir.path(), "survivor");
    // 2 and 3 sit on the node that dies; 1 sends from the other. (A node
    // listens before its feed is subscribed, and refuses logins until then.)
    let mut two = login_at_eventually(Kind::Tcp, doomed.addr, 2).await;
    let mut three = login_at_eventually(Kind::Tcp, doomed.addr, 3).await;
    let mut one = login_at_eventually(Kind::Tcp, survivor.addr, 1).await;
    let sender = tokio::spawn(async move {
        let mut acked = Vec::new();
        for k in 0..200 {
            let a = one.send_msg(18, 1, 2, format!("d{k}").as_bytes()).await;
            if a.ret == 0 {
                acked.push((18, a.chat_id, format!("d{k}").into_bytes()));
            }
            let a = one.send_msg(20, 1, 100, format!("g{k}").as_bytes()).await;
            if a.ret == 0 {
                acked.push((20, a.chat_id, format!("g{k}").into_bytes()));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    doomed.child.kill().expect("SIGKILL");
    doomed.child.wait().unwrap();
    let (seen2, _) = common::within("closed", two.msgs_until_closed()).await;
    let (seen3, _) = common::within("closed", three.msgs_until_closed()).await;
    let acked = sender.await.unwrap();
    assert!(
        acked.len() >= 300,
        "the survivor kept acknowledging ({})",
        acked.len()
    );
    // They reconnect to the survivor and sync.
    let mut two = Client::login(Kind::Tcp, survivor.addr, 2, "k2").await;
    let mut three = Client::login(Kind::Tcp, survivor.addr, 3, "k3").await;
    two.heartbeat().await;
    three.heartbeat().await;
    let mut seen2 = seen2;
    seen2.extend(two.take_msgs());
    let mut seen3 = seen3;
    seen3.extend(three.take_msgs());
    let direct = synced(&mut two, 1, &seen2).await;
    let mut group: BTreeMap<i64, Vec<u8>> = seen3
        .iter()
        .filter(|m| m.op == 20)
        .map(|m| (m.chat_id, m.msg.clone()))
        .collect();
    let (ack, msgs) = three.sync(20, 100, gapless_through(&group), None).await;
    assert_eq!(ack.ret, 0);
    for m in msgs.into_iter().filter(|m| m.op == 20) {
        group.insert(m.chat_id, m.msg);
    }
    for (op, id, msg) in &acked {
        let have = if *op == 18 { &direct } else { &group };
        assert_eq!(
            have.get(id),
            Some(msg),
            "acknowledged op {op} chatId {id} missing"
        );
    }
}

/// Writes one op 20 per body without waiting for replies (binary modes),
/// then reads the replies in order: a node's feed gets the messages in
/// bursts. Returns the chatIds acknowledged.
async fn send_pipelined(c: &mut Client, from: i32, sends: &[(i32, Vec<u8>)]) -> Vec<i64> {
    let mut seqs = Vec::new();
    for (to, msg) in sends {
        let seq = c.next_seq();
        let mut body = Vec::new();
        body.extend_from_slice(&from.to_be_bytes());
        body.extend_from_slice(&to.to_be_bytes());
        body.extend_from_slice(msg);
        c.send_frame(20, seq, None, Some(&body)).await;
        seqs.push(seq);
    }
    let mut acked = Vec::new();
    for seq in seqs {
        let ack = c.ack(21, seq).await;
        assert_eq!(ack.ret, 0, "{ack:?}");
        acked.push(ack.chat_id);
    }
    acked
}

/// Reads `want` messages on its own task, so that a reader keeps up while
/// the senders flood; checks each conversation's chatIds are 1, 2, 3, ...
/// in order (nothing lost, repeated or reordered) and returns the count per
/// group.
fn read_all(mut c: Client, want: usize) -> tokio::task::JoinHandle<BTreeMap<i32, i64>> {
    tokio::spawn(async move {
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        for _ in 0..want {
            let m = common::within("a burst's delivery", c.msg()).await;
            let seen = last.entry(m.to).or_default();
            let what = (m.to, m.from, m.chat_id);
            assert_eq!(
                m.chat_id,
                *seen + 1,
                "(group, from, chatId) {what:?} after {seen}"
            );
            *seen = m.chat_id;
            assert_eq!(m.msg.len(), 8000);
        }
        c.no_msg().await;
        last
    })
}

/// Nodes deliver the bursts their feed reads as runs (each session gets a
/// run in one push): pipelined group sends from two nodes, interleaving two
/// groups, reach every member on every node exactly once and in chatId
/// order, the sender's other session included and the sending connection
/// excluded; a member that stops reading is closed alone, as a slow
/// consumer, when its queue passes the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_of_group_messages_arrive_once_in_order_and_only_a_stuck_member_is_closed() {
    let redis = Redis::start();
    // Node a holds both senders, which are members of group 200 too and
    // do not read while they write: its bound is large. Nodes b and c
    // close a session past 1 MiB (a reader that keeps up stays under it:
    // a burst is at most 64 KiB).
    let mut n = Vec::new();
    for (id, bound) in [("a", 64 << 20), ("b", 1 << 20), ("c", 1 << 20)] {
        n.push(
            node_with(&redis, id, move |c| {
                c.server.engine.max_outbound_bytes = bound
            })
            .await,
        );
    }
    // Mid 3 (groups 100 and 200) on node b never reads after its login; a
    // small receive buffer keeps the kernel from absorbing megabytes.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = Client::from_tcp(socket.connect(addr(&n[1], Kind::Tcp)).await.unwrap());
    assert_eq!(stuck.auth(json!({"mid": 3, "mkey": "k3"})).await.0, 0);
    let mut sender_a = login(&n[0], Kind::Tcp, 1).await;
    let mut sender_b = login(&n[0], Kind::WsBinary, 6).await;
    // Through node a, sender 1 sends 600 messages, every tenth to group
    // 100, the rest to group 200; sender 6 sends 300 to group 200 at the
    // same time.
    let body = |i: usize| {
        let mut m = format!("{i:08}").into_bytes();
        m.resize(8000, b'm');
        m
    };
    let from_a: Vec<(i32, Vec<u8>)> = (0..600)
        .map(|i| (if i % 10 == 0 { 100 } else { 200 }, body(i)))
        .collect();
    let from_b: Vec<(i32, Vec<u8>)> = (0..300).map(|i| (200, body(i))).collect();
    let (g100, g200) = (60, 840);
    let readers = [
        // Mid 2: both groups, next to the stuck member.
        (
            read_all(login(&n[1], Kind::WsJson, 2).await, g100 + g200),
            true,
        ),
        // Mid 4 and 5: group 200, on node c and on the senders' node.
        (read_all(login(&n[2], Kind::Tcp, 4).await, g200), false),
        (read_all(login(&n[0], Kind::WsBinary, 5).await, g200), false),
        // Mid 1's other session: its own sends to both groups and the
        // other sender's.
        (
            read_all(login(&n[2], Kind::WsJson, 1).await, g100 + g200),
            true,
        ),
    ];
    let (acked_a, acked_b) = tokio::join!(
        send_pipelined(&mut sender_a, 1, &from_a),
        send_pipelined(&mut sender_b, 6, &from_b)
    );
    let mut all: Vec<i64> = acked_a.iter().chain(&acked_b).copied().collect();
    all.sort_unstable();
    assert_eq!(all.len(), 900);
    for (reader, both) in readers {
        let last = common::within("a reader", reader).await.unwrap();
        let mut want = BTreeMap::from([(200, g200 as i64)]);
        if both {
            want.insert(100, g100 as i64);
        }
        assert_eq!(last, want);
    }
    // The sending connections got the other sender's messages to group
    // 200, and none of their own.
    for (c, want, other) in [(&mut sender_a, 300, 6), (&mut sender_b, 540, 1)] {
        let got = take(c, want).await;
        assert_eq!(got.len(), want);
        assert!(got.iter().all(|m| m.from == other && m.to == 200));
        assert!(got.windows(2).all(|w| w[0].chat_id < w[1].chat_id));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while n[1].comet.is_online(3) {
        assert!(
            Instant::now() < deadline,
            "the stuck member is still online"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(n[1].comet.stats().slow_consumers >= 1);
    drop(stuck);
}
