//! The `client` example syncs: after the server closes its connection it
//! reconnects and asks every conversation it has seen for what came after
//! the last chatId it holds, drops what it already has, and `/sync` does it
//! by hand. Runs the real example binary (built by `cargo test`) against a
//! server on loopback.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::raw::{Client, Kind};

/// The example binary `cargo test` built next to this test.
fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test`, which builds the examples",
        path.display()
    );
    path
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// Waits for a line of stdout containing `text`; returns it.
    fn expect(&mut self, text: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(15)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {text:?}; the client printed {:#?}", self.seen),
            }
        }
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("client stdin");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_syncs_after_a_reconnect_and_by_hand() {
    let running = common::server::start().await;
    let tcp = running.tcp_addr.unwrap();
    let mut peer = Client::login(Kind::Tcp, tcp, 2, "k2").await;

    let mut child = Command::new(example("client"))
        .args(["--transport", "tcp", "--addr", &tcp.to_string()])
        .args(["--mid", "1", "--mkey", "k1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("client starts");
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut client = Running {
        child,
        stdin,
        lines,
        seen: Vec::new(),
    };
    client.expect("auth ok: mid=1");
    assert_eq!(peer.send_msg(18, 2, 1, b"one").await.chat_id, 1);
    client.expect("chatId=1 from=2 to=1: one");

    // Another device keeps mid 1 online, so what is sent while the client
    // is away goes live to that device, not to an inbox: only a sync brings
    // it to the client.
    let mut other_device = Client::login(Kind::WsJson, running.ws_addr.unwrap(), 1, "k1").await;
    assert_eq!(running.comet.sessions_of(1), 2);
    running.comet.disconnect(1);
    drop(other_device);
    other_device = Client::login(Kind::WsJson, running.ws_addr.unwrap(), 1, "k1").await;
    client.expect("reconnecting in");
    for msg in [&b"two"[..], b"three"] {
        assert_eq!(peer.send_msg(18, 2, 1, msg).await.ret, 0);
    }
    client.expect("auth ok: mid=1");
    let two = client.expect("from=2 to=1: two");
    assert!(two.contains("chatId=2"), "{two}");
    client.expect("chatId=3 from=2 to=1: three");
    client.expect("sync user 2: oldest=1 head=3");

    // By hand, from the start: everything is already held, so nothing is
    // printed twice.
    client.type_line("/sync user 2 0");
    client.expect("sync user 2: oldest=1 head=3");
    client.type_line("/sync group 100");
    client.expect("sync group 100: oldest=0 head=0");
    client.type_line("/sync group 999");
    // Binary replies carry no reason (PROTOCOL.md 2.7).
    client.expect("sync group 999 failed (ret -1)");
    client.type_line("/quit");
    let status = client.child.wait().expect("client exits");
    assert!(status.success(), "{status:?}");
    // Drain what is left of its output.
    while let Ok(line) = client.lines.recv_timeout(Duration::from_millis(200)) {
        client.seen.push(line);
    }
    let copies = |text: &str| client.seen.iter().filter(|l| l.contains(text)).count();
    assert_eq!(copies(": one"), 1, "{:#?}", client.seen);
    assert_eq!(copies(": two"), 1, "{:#?}", client.seen);
    assert_eq!(copies(": three"), 1, "{:#?}", client.seen);
    drop(other_device);
}
