//! Crash safety of the embedded store, over a real `chat_server` process:
//! concurrent senders pipeline sends into a few conversations, the server
//! is SIGKILLed at a random moment and restarted on the same store, and
//! every send whose ret 0 reached its sender must be in the op 22 replay
//! with the same chatId and bytes; chatIds run contiguously from oldest to
//! head, and new sends go on at head + 1.
//!
//! `CRASH_ITERATIONS` sets the number of kill/restart rounds (default 4);
//! `examples/scripts/crash_loop.sh` runs more.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::raw::{Client, Kind};

const SENDERS: i32 = 4;
/// Recipient of every sender's direct messages; never logged in while
/// sending.
const PEER: i32 = 9;
const GROUP: i32 = 100;
/// Sends written before their replies are read.
const WINDOW: usize = 32;

/// A conversation as the test names it: (op kind, other side).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Conv {
    Group,
    /// Direct between a sender and [`PEER`].
    Direct(i32),
}

type Acked = BTreeMap<(Conv, i64), Vec<u8>>;

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A cheap random number from the clock (the kill moment; no extra crate).
fn random_below(n: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % n.max(1)
}

/// A temp directory removed on success, kept (and named) on a failure.
struct ScopeDir(Option<tempfile::TempDir>);

impl ScopeDir {
    fn path(&self) -> &Path {
        self.0.as_ref().expect("dir").path()
    }
}

impl Drop for ScopeDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if std::thread::panicking() {
                eprintln!("crash test files kept in {}", dir.keep().display());
            }
        }
    }
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(dir: &Path, round: usize) -> Server {
        let addr = free_port();
        let store = dir.join("store");
        let mut config = format!(
            "[server]\ntcp = \"{addr}\"\nmax_frames_per_sec = 0\nsync_limit = 1000\n\
             [store]\nbackend = \"embedded\"\npath = {:?}\nhistory_limit = 1000000\n\
             inbox_limit = 0\n",
            store.display().to_string()
        );
        for mid in 1..=PEER {
            config.push_str(&format!("[[users]]\nmid = {mid}\nmkey = \"k{mid}\"\n"));
        }
        config.push_str(&format!(
            "[[groups]]\nid = {GROUP}\nmembers = [1, 2, 3, 4]\n"
        ));
        let config_path = dir.join("crash.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join(format!("server-{round}.log"))).unwrap();
        let child = Command::new(common::chat_server_binary())
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,comet_core=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("chat_server starts");
        let mut server = Server { child, addr };
        server.wait_ready(dir, round);
        server
    }

    fn wait_ready(&mut self, dir: &Path, round: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.addr).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("server-{round}.log")));
                panic!("chat_server exited with {status}: {log:?}");
            }
            assert!(
                Instant::now() < deadline,
                "chat_server did not listen in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

fn send_body(from: i32, to: i32, msg: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(8 + msg.len());
    body.extend_from_slice(&from.to_be_bytes());
    body.extend_from_slice(&to.to_be_bytes());
    body.extend_from_slice(msg);
    body
}

/// Pipelines sends from `mid` (alternately to the group and to [`PEER`])
/// until the connection dies; returns what was acknowledged with ret 0.
async fn sender(
    addr: SocketAddr,
    mid: i32,
    round: usize,
    logged_in: tokio::sync::mpsc::Sender<()>,
) -> Vec<(Conv, i64, Vec<u8>)> {
    let mut c = Client::login(Kind::Tcp, addr, mid, &format!("k{mid}")).await;
    logged_in.send(()).await.unwrap();
    let mut acked = Vec::new();
    let mut n = 0u64;
    loop {
        let mut window = Vec::with_capacity(WINDOW);
        for _ in 0..WINDOW {
            n += 1;
            let (op, to, conv) = if n.is_multiple_of(2) {
                (20, GROUP, Conv::Group)
            } else {
                (18, PEER, Conv::Direct(mid))
            };
            let msg =
                format!("r{round}-m{mid}-n{n}-{}", "x".repeat((n % 50) as usize)).into_bytes();
            let seq = c.next_seq();
            c.send_frame(op, seq, None, Some(&send_body(mid, to, &msg)))
                .await;
            window.push((seq, op + 1, conv, msg));
        }
        for (seq, reply_op, conv, msg) in window {
            let Ok(reply) = c.reply().await else {
                return acked;
            };
            assert_eq!(
                (reply.op, reply.seq),
                (reply_op, seq),
                "replies come in order"
            );
            assert_eq!(reply.bytes.len(), 9);
            let ret = reply.bytes[0] as i8;
            let chat_id = i64::from_be_bytes(reply.bytes[1..9].try_into().unwrap());
            if ret == 0 {
                acked.push((conv, chat_id, msg));
            }
        }
    }
}

/// op 22 pages until the head: (oldest, head, replayed messages).
async fn sync_all(c: &mut Client, kind: u8, to: i32) -> (i64, i64, Vec<(i64, i32, i32, Vec<u8>)>) {
    let mut after = 0i64;
    let mut got = Vec::new();
    loop {
        let mut body = vec![kind];
        body.extend_from_slice(&to.to_be_bytes());
        body.extend_from_slice(&after.to_be_bytes());
        body.extend_from_slice(&1000i32.to_be_bytes());
        let seq = c.next_seq();
        c.send_frame(22, seq, None, Some(&body)).await;
        let reply = c.reply().await.expect("op 23");
        assert_eq!((reply.op, reply.seq), (23, seq));
        assert_eq!(reply.bytes.len(), 17);
        assert_eq!(reply.bytes[0], 0, "sync ret");
        let oldest = i64::from_be_bytes(reply.bytes[1..9].try_into().unwrap());
        let head = i64::from_be_bytes(reply.bytes[9..17].try_into().unwrap());
        let mut last = after;
        // Every replayed message is written before op 23.
        while let Some(m) = c.try_msg() {
            last = m.chat_id;
            got.push((m.chat_id, m.from, m.to, m.msg));
        }
        if last >= head || last == after {
            return (oldest, head, got);
        }
        after = last;
    }
}

/// Checks one conversation's replay against what was acknowledged, and
/// that a new send goes on at head + 1 (recorded as acknowledged).
async fn verify(addr: SocketAddr, conv: Conv, acked: &mut Acked) {
    let (mid, kind, to) = match conv {
        Conv::Group => (1, 20u8, GROUP),
        Conv::Direct(sender) => (PEER, 18u8, sender),
    };
    let mut c = Client::login(Kind::Tcp, addr, mid, &format!("k{mid}")).await;
    let (oldest, head, replay) = sync_all(&mut c, kind, to).await;
    let ids: Vec<i64> = replay.iter().map(|m| m.0).collect();
    let want: Vec<i64> = if head == 0 {
        vec![]
    } else {
        (oldest..=head).collect()
    };
    assert_eq!(
        ids, want,
        "{conv:?}: chatIds from oldest to head are contiguous"
    );
    let stored: BTreeMap<i64, &Vec<u8>> = replay.iter().map(|m| (m.0, &m.3)).collect();
    for ((c2, chat_id), bytes) in acked.iter() {
        if *c2 == conv {
            assert_eq!(
                stored.get(chat_id).copied(),
                Some(bytes),
                "{conv:?}: acknowledged chatId {chat_id} lost or changed after SIGKILL"
            );
        }
    }
    let msg = format!("after-restart-{head}").into_bytes();
    let (op, from, dest) = match conv {
        Conv::Group => (20, 1, GROUP),
        Conv::Direct(sender) => (18, PEER, sender),
    };
    let ack = c.send_msg(op, from, dest, &msg).await;
    assert_eq!(
        (ack.ret, ack.chat_id),
        (0, head + 1),
        "{conv:?}: sends go on at head + 1"
    );
    acked.insert((conv, head + 1), msg);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_survive_sigkill() {
    let rounds: usize = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    // The server logs (server-N.log) and the store are kept on failure.
    let dir = ScopeDir(Some(dir));
    let mut acked = Acked::new();
    let mut total = 0;
    for round in 0..rounds {
        let server = Server::start(dir.path(), 2 * round);
        let (logged_in, mut logins) = tokio::sync::mpsc::channel(SENDERS as usize);
        let senders: Vec<_> = (1..=SENDERS)
            .map(|mid| tokio::spawn(sender(server.addr, mid, round, logged_in.clone())))
            .collect();
        // The kill's moment counts from the last login, so that a slow
        // machine cannot kill the server before a sender is logged in.
        for _ in 1..=SENDERS {
            logins.recv().await.expect("a sender logged in");
        }
        tokio::time::sleep(Duration::from_millis(100 + random_below(400))).await;
        server.kill();
        for s in senders {
            for (conv, chat_id, msg) in s.await.unwrap() {
                let before = acked.insert((conv, chat_id), msg);
                assert!(
                    before.is_none(),
                    "{conv:?} chatId {chat_id} acknowledged twice"
                );
                total += 1;
            }
        }
        let server = Server::start(dir.path(), 2 * round + 1);
        let mut convs = vec![Conv::Group];
        convs.extend((1..=SENDERS).map(Conv::Direct));
        for conv in convs {
            verify(server.addr, conv, &mut acked).await;
        }
        server.kill();
    }
    assert!(total > 0, "no send was acknowledged before the kills");
    drop(dir);
    eprintln!("{rounds} rounds, {total} acknowledged sends checked");
}
