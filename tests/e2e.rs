//! End to end over real loopback sockets, against the example server's
//! assembly, with an independent hand-written client (tests/common/raw.rs).

mod common;

use common::raw::{Client, Closed, Kind, KINDS};
use common::server::{start, start_with};
use serde_json::json;

fn ok(chat_id: i64) -> common::raw::Ack {
    common::raw::Ack {
        ret: 0,
        chat_id,
        error: None,
    }
}

#[tokio::test]
async fn every_flow_on_every_transport() {
    let srv = start().await;
    for kind in KINDS {
        let addr = if kind == Kind::Tcp {
            srv.tcp_addr.unwrap()
        } else {
            srv.ws_addr.unwrap()
        };
        let mut a = Client::login(kind, addr, 1, "k1").await;
        let mut b = Client::login(kind, addr, 2, "k2").await;
        let mut c = Client::login(kind, addr, 3, "k3").await;
        a.heartbeat().await;
        let dm = a.send_msg(18, 1, 2, b"hello b").await;
        assert_eq!(dm.ret, 0);
        let m = b.msg().await;
        assert_eq!(
            (m.op, m.chat_id, m.from, m.to, &m.msg[..]),
            (18, dm.chat_id, 1, 2, &b"hello b"[..])
        );
        let g = c.send_msg(20, 3, 100, b"hello group").await;
        assert_eq!(g.ret, 0);
        for r in [&mut a, &mut b] {
            let m = r.msg().await;
            assert_eq!(
                (m.op, m.chat_id, m.from, m.to, &m.msg[..]),
                (20, g.chat_id, 3, 100, &b"hello group"[..])
            );
        }
        c.no_msg().await;
        for cl in [a, b, c] {
            cl.close().await;
        }
    }
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn messages_cross_transports_byte_for_byte() {
    let srv = start().await;
    let (tcp, ws) = (srv.tcp_addr.unwrap(), srv.ws_addr.unwrap());
    let mut t = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    let mut j = Client::login(Kind::WsJson, ws, 2, "k2").await;
    let mut w = Client::login(Kind::WsBinary, ws, 3, "k3").await;

    // TCP → WS-JSON, including bytes that are not UTF-8 (base64 in JSON).
    assert_eq!(t.send_msg(18, 1, 2, "héllo".as_bytes()).await, ok(1));
    assert_eq!(j.msg().await.msg, "héllo".as_bytes());
    let raw = [0xff, 0x00, 0x80, b'x'];
    assert_eq!(t.send_msg(18, 1, 2, &raw).await, ok(2));
    assert_eq!(j.msg().await.msg, raw);
    // WS-binary → TCP, and WS-JSON (base64 on the wire) → WS-binary.
    assert_eq!(w.send_msg(18, 3, 1, &raw).await, ok(1));
    assert_eq!(t.msg().await.msg, raw);
    assert_eq!(j.send_msg(18, 2, 3, &raw).await, ok(1));
    assert_eq!(w.msg().await.msg, raw);
    // A group message reaches all three modes identically.
    assert_eq!(j.send_msg(20, 2, 100, &raw).await, ok(1));
    assert_eq!(t.msg().await.msg, raw);
    assert_eq!(w.msg().await.msg, raw);
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn several_sessions_per_mid_across_transports() {
    let srv = start().await;
    let (tcp, ws) = (srv.tcp_addr.unwrap(), srv.ws_addr.unwrap());
    let mut a_tcp = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    let mut a_json = Client::login(Kind::WsJson, ws, 1, "k1").await;
    let mut b_bin = Client::login(Kind::WsBinary, ws, 2, "k2").await;
    let mut b_tcp = Client::login(Kind::Tcp, tcp, 2, "k2").await;
    assert_eq!(srv.comet.sessions_of(1), 2);
    assert_eq!(a_tcp.send_msg(18, 1, 2, b"x").await, ok(1));
    // Both of b's sessions, and a's other session — not the sender.
    for c in [&mut b_bin, &mut b_tcp, &mut a_json] {
        assert_eq!(c.msg().await.chat_id, 1);
    }
    a_tcp.no_msg().await;
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn offline_inbox_arrives_after_reconnect_once() {
    let srv = start().await;
    let (tcp, ws) = (srv.tcp_addr.unwrap(), srv.ws_addr.unwrap());
    let mut a = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    let b = Client::login(Kind::WsJson, ws, 2, "k2").await;
    b.close().await;
    // Wait until the server has seen b go.
    for _ in 0..200 {
        if !srv.comet.is_online(2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!srv.comet.is_online(2));
    for i in 1..=3 {
        assert_eq!(
            a.send_msg(18, 1, 2, format!("while away {i}").as_bytes())
                .await,
            ok(i)
        );
    }
    assert_eq!(a.send_msg(20, 1, 100, b"group while away").await, ok(1));
    let mut b = Client::login(Kind::WsBinary, ws, 2, "k2").await;
    let got: Vec<(u32, i64)> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let m = b.msg().await;
            v.push((m.op, m.chat_id));
        }
        v
    };
    assert_eq!(got, vec![(18, 1), (18, 2), (18, 3), (20, 1)]);
    let mut again = Client::login(Kind::Tcp, tcp, 2, "k2").await;
    again.no_msg().await;
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn handshake_and_heartbeat_timeouts_over_sockets() {
    let srv = start_with(|s| {
        s.engine.handshake_timeout = std::time::Duration::from_millis(300);
        s.engine.heartbeat_timeout = std::time::Duration::from_millis(600);
    })
    .await;
    let (tcp, ws) = (srv.tcp_addr.unwrap(), srv.ws_addr.unwrap());
    // Silent after connecting: closed at the handshake timeout (300 ms from
    // the accept; allowed up to three times that on a busy machine), on
    // every transport.
    let bound = std::time::Duration::from_millis(3 * 300);
    for kind in KINDS {
        let addr = if kind == Kind::Tcp { tcp } else { ws };
        let started = std::time::Instant::now();
        let mut c = Client::connect(kind, addr).await;
        let closed = c.closed().await;
        let took = started.elapsed();
        assert!(took < bound, "{kind:?}: closed after {took:?}");
        if kind != Kind::Tcp {
            assert!(
                matches!(closed, Closed::Ws(1008, _) | Closed::Eof),
                "{closed:?}"
            );
        }
    }
    // A WebSocket upgrade that never completes is closed too.
    let started = std::time::Instant::now();
    let mut half = tokio::net::TcpStream::connect(ws).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    half.write_all(b"GET /sub HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = common::within("half upgrade to be closed", half.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0);
    let took = started.elapsed();
    assert!(took < bound, "half upgrade closed after {took:?}");
    // Silent after login: closed at the heartbeat timeout; a beating one stays.
    let mut quiet = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    let mut beating = Client::login(Kind::WsJson, ws, 2, "k2").await;
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        beating.heartbeat().await;
    }
    assert_eq!(quiet.closed().await, Closed::Eof);
    assert!(srv.comet.is_online(2));
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn a_trickle_that_never_completes_a_frame_is_closed_at_the_heartbeat_timeout() {
    let srv =
        start_with(|s| s.engine.heartbeat_timeout = std::time::Duration::from_millis(800)).await;
    let tcp = srv.tcp_addr.unwrap();
    let mut c = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    // One byte every 100 ms of a frame that never completes.
    let frame = common::raw::pack(1, 2, 1, &[0; 100]);
    let started = std::time::Instant::now();
    let mut closed = false;
    for byte in frame.iter().take(100) {
        c.write_raw(&[*byte]).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if !srv.comet.is_online(1) {
            closed = true;
            break;
        }
    }
    assert!(closed, "still online after {:?}", started.elapsed());
    assert_eq!(c.closed().await, Closed::Eof);
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn graceful_shutdown_flushes_and_closes_every_transport() {
    let srv = start().await;
    let (tcp, ws) = (srv.tcp_addr.unwrap(), srv.ws_addr.unwrap());
    let mut sender = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    let mut t = Client::login(Kind::Tcp, tcp, 2, "k2").await;
    let mut j = Client::login(Kind::WsJson, ws, 3, "k3").await;
    for i in 1..=50 {
        assert_eq!(
            sender
                .send_msg(20, 1, 100, format!("m{i}").as_bytes())
                .await,
            ok(i)
        );
    }
    let comet = srv.comet.clone();
    assert!(srv.shutdown().await);
    for c in [&mut t, &mut j] {
        for i in 1..=50 {
            assert_eq!(c.msg().await.chat_id, i);
        }
    }
    assert_eq!(t.closed().await, Closed::Eof);
    assert!(matches!(j.closed().await, Closed::Ws(1001, _)));
    assert_eq!(comet.connection_count(), 0);
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(tcp).await.is_err());
    let _ = json!(null);
}
