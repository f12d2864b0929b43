//! A seconds-long smoke run of every scenario against every server, so the
//! load generator cannot rot. It asserts correctness only (no loss,
//! duplication or reordering; every send acknowledged), never timing.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One server and its load at a time: the machine may have two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_comet-bench")
}

/// Starts `serve --server kind` and waits until it accepts connections.
fn start(kind: &str, layout: &[&str]) -> (Server, String, Option<String>) {
    let tcp = format!("127.0.0.1:{}", free_port());
    let ws = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["serve", "--server", kind, "--tcp", &tcp, "--users", "2000"];
    let serves_ws = kind == "comet" || kind == "ceiling";
    if serves_ws {
        args.extend(["--ws", &ws]);
    }
    args.extend(layout);
    let child = Command::new(bin())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&tcp).is_err() {
        assert!(Instant::now() < deadline, "{kind} server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ws = serves_ws.then_some(ws);
    (Server(child), tcp, ws)
}

fn run(addr: &str, pid: u32, transport: &str, scenario: &[&str]) -> serde_json::Value {
    let pid = pid.to_string();
    let out = Command::new(bin())
        .args(["run"])
        .args(scenario)
        .args([
            "--addr",
            addr,
            "--transport",
            transport,
            "--server-pid",
            &pid,
            "--quiet",
            "--sources",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "{scenario:?} over {transport}: no result line\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(value["ok"], true, "{scenario:?} over {transport}: {value}");
    assert!(out.status.success());
    value
}

const FANOUT: &[&str] = &["fanout", "--members", "50", "--messages", "50"];
const PAIRS: &[&str] = &["pairs", "--pairs", "5", "--seconds", "1"];
const SYNC: &[&str] = &["sync", "--messages", "60", "--rounds", "3", "--page", "25"];
const IDLE: &[&str] = &["idle", "--connections", "100", "--hold-secs", "1"];
const MIXED: &[&str] = &[
    "mixed",
    "--groups",
    "4",
    "--group-size",
    "50",
    "--rate",
    "2",
    "--seconds",
    "1",
];

/// Each scenario once against one server over one transport; a fan-out to
/// 50 members reaches the 49 who did not send, 50 times.
fn every_scenario(addr: &str, pid: u32, transport: &str) {
    let fanout = run(addr, pid, transport, FANOUT);
    assert_eq!(fanout["deliveries"], 49 * 50);
    run(addr, pid, transport, PAIRS);
    run(addr, pid, transport, IDLE);
    run(addr, pid, transport, MIXED);
}

#[test]
fn every_scenario_against_comet_on_every_transport() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (server, tcp, ws) = start("comet", &["--groups", "4", "--group-size", "50"]);
    let pid = server.0.id();
    let ws = ws.unwrap();
    for (addr, transport) in [(&tcp, "tcp"), (&ws, "ws-json"), (&ws, "ws-binary")] {
        every_scenario(addr, pid, transport);
        // The replay of op 22 (comet only): 60 messages (the server keeps
        // 100) replayed 3 times in pages of 25, each chatId checked.
        let sync = run(addr, pid, transport, SYNC);
        assert_eq!(sync["replayed"], 180, "{sync}");
    }
}

#[test]
fn every_scenario_against_the_ceiling() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (server, tcp, ws) = start("ceiling", &["--groups", "4", "--group-size", "50"]);
    let pid = server.0.id();
    let ws = ws.unwrap();
    for (addr, transport) in [(&tcp, "tcp"), (&ws, "ws-binary")] {
        every_scenario(addr, pid, transport);
    }
}

#[test]
fn every_scenario_against_the_socketio_peer() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (server, http, _) = start("peer", &["--groups", "4", "--group-size", "50"]);
    let pid = server.0.id();
    every_scenario(&http, pid, "socket-io");
}
