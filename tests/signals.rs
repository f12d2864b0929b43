//! Operating the real `chat_server` process (issue 13, part 3): SIGTERM
//! stops it as gracefully as Ctrl-C and it exits 0; its logs carry no ANSI
//! colour codes when stdout is not a terminal; `--log-format json` writes
//! one JSON object per line.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::raw::{Client, Closed, Kind};

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts chat_server on a free TCP port with its store in `dir`; stdout
/// and stderr go to `dir/out.log` and `dir/err.log`.
fn start(dir: &Path, extra: &[&str]) -> (Child, SocketAddr) {
    let addr = free_port();
    let config = format!(
        "[server]\ntcp = \"{addr}\"\n[store]\npath = {:?}\n\
         [[users]]\nmid = 1\nmkey = \"k1\"\n[[users]]\nmid = 2\nmkey = \"k2\"\n",
        dir.join("store").display().to_string()
    );
    std::fs::write(dir.join("server.toml"), config).unwrap();
    let child = Command::new(common::chat_server_binary())
        .arg("--config")
        .arg(dir.join("server.toml"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("out.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("err.log")).unwrap())
        .spawn()
        .expect("chat_server starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "chat_server did not listen in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill(1) runs");
    assert!(status.success(), "kill -{name} failed");
}

/// Waits for the process to exit (at most 20 s) and returns its exit code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chat_server did not exit within 20 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A session with a message queued when SIGTERM comes: the message is
/// written, the connection closed, and the process exits 0.
#[tokio::test]
async fn sigterm_drains_sessions_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path(), &[]);
    let mut one = Client::login(Kind::Tcp, addr, 1, "k1").await;
    let mut two = Client::login(Kind::Tcp, addr, 2, "k2").await;
    let ack = two.send_msg(18, 2, 1, b"before the signal").await;
    assert_eq!(ack.ret, 0);
    signal(&child, "TERM");
    let (msgs, closed) = common::within("the close", one.msgs_until_closed()).await;
    assert_eq!(closed, Closed::Eof);
    assert!(
        msgs.iter()
            .any(|m| m.chat_id == ack.chat_id && m.msg == b"before the signal"),
        "the acknowledged message was delivered before the close: {msgs:?}"
    );
    assert_eq!(exit_code(&mut child), Some(0), "exit status after SIGTERM");
    let out = std::fs::read_to_string(dir.path().join("out.log")).unwrap();
    assert!(
        out.contains("signal=\"SIGTERM\"") || out.contains("signal=SIGTERM"),
        "{out}"
    );
    assert!(out.contains("stopped"), "{out}");
    assert!(
        !out.contains('\u{1b}'),
        "ANSI escape codes in logs written to a file: {out:?}"
    );

    // The same data directory serves again: the message is still there.
    let (mut child, addr) = start(dir.path(), &[]);
    let mut one = Client::login(Kind::Tcp, addr, 1, "k1").await;
    let (sync, page) = one.sync(18, 2, 0, None).await;
    assert_eq!(sync.ret, 0);
    assert!(page.iter().any(|m| m.chat_id == ack.chat_id), "{page:?}");
    signal(&child, "INT");
    assert_eq!(exit_code(&mut child), Some(0), "exit status after SIGINT");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path(), &["--log-format", "json"]);
    let c = Client::login(Kind::Tcp, addr, 1, "k1").await;
    drop(c);
    signal(&child, "TERM");
    assert_eq!(exit_code(&mut child), Some(0));
    let out = std::fs::read_to_string(dir.path().join("out.log")).unwrap();
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "ready, shutting down and stopped: {out}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(v.is_object(), "{line}");
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("\"signal\":\"SIGTERM\"")),
        "{out}"
    );
}
