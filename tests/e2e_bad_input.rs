//! PROTOCOL.md section 3, row by row, over real sockets: each bad client gets
//! the outcome in the table, and a pair of good clients carries on unharmed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use comet::server::Running;
use common::raw::{pack, Client, Closed, Kind, KINDS};
use common::server::{start, start_with};
use serde_json::json;

/// Two good clients that must keep chatting whatever the bad ones do.
struct Witness {
    a: Client,
    b: Client,
    sent: i64,
}

impl Witness {
    async fn new(srv: &Running) -> Witness {
        Witness {
            a: Client::login(Kind::Tcp, srv.tcp_addr.unwrap(), 8, "k8").await,
            b: Client::login(Kind::WsJson, srv.ws_addr.unwrap(), 9, "k9").await,
            sent: 0,
        }
    }

    async fn still_fine(&mut self) {
        self.sent += 1;
        let ack = self.a.send_msg(18, 8, 9, b"still here").await;
        assert_eq!((ack.ret, ack.chat_id), (0, self.sent));
        assert_eq!(self.b.msg().await.chat_id, self.sent);
    }
}

fn addr(srv: &Running, kind: Kind) -> SocketAddr {
    if kind == Kind::Tcp {
        srv.tcp_addr.unwrap()
    } else {
        srv.ws_addr.unwrap()
    }
}

fn closed_as_protocol_error(kind: Kind, closed: &Closed) {
    match kind {
        Kind::Tcp => assert_eq!(closed, &Closed::Eof),
        _ => assert!(
            matches!(closed, Closed::Ws(1002, reason) if !reason.is_empty()),
            "{closed:?}"
        ),
    }
}

#[tokio::test]
async fn bad_headers_and_oversized_frames_close_only_their_connection() {
    let srv = start_with(|s| s.engine.max_body = 1024).await;
    let mut w = Witness::new(&srv).await;
    for kind in [Kind::Tcp, Kind::WsBinary] {
        let mut bad_header_len = pack(1, 7, 1, b"{}");
        bad_header_len[5] = 15;
        let mut small_pack_len = pack(1, 7, 1, b"");
        small_pack_len[3] = 12;
        let mut oversized = pack(1, 7, 1, b"");
        oversized[0..4].copy_from_slice(&(16u32 + 1025).to_be_bytes());
        for (i, bytes) in [bad_header_len, small_pack_len, oversized]
            .into_iter()
            .enumerate()
        {
            // Before and after authenticating.
            for logged_in in [false, true] {
                let mut c = if logged_in {
                    Client::login(kind, addr(&srv, kind), 1, "k1").await
                } else {
                    Client::connect(kind, addr(&srv, kind)).await
                };
                c.write_raw(&bytes).await;
                let closed = c.closed().await;
                closed_as_protocol_error(kind, &closed);
                w.still_fine().await;
                let _ = i;
            }
        }
    }
    // A body of exactly max_body is fine.
    let mut c = Client::login(Kind::Tcp, srv.tcp_addr.unwrap(), 1, "k1").await;
    c.write_raw(&pack(1, 5000, 1, &[0; 1024])).await;
    c.heartbeat().await;
    assert!(srv.comet.stats().protocol_errors >= 12);
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn ops_before_auth_and_auth_twice_close_the_connection() {
    let srv = start().await;
    let mut w = Witness::new(&srv).await;
    for kind in KINDS {
        let mut c = Client::connect(kind, addr(&srv, kind)).await;
        c.send_frame(2, 1, None, None).await;
        closed_as_protocol_error(kind, &c.closed().await);
        let mut c = Client::connect(kind, addr(&srv, kind)).await;
        c.send_frame(18, 1, Some(json!({"from": 1, "to": 2, "msg": "x"})), None)
            .await;
        closed_as_protocol_error(kind, &c.closed().await);
        let mut c = Client::login(kind, addr(&srv, kind), 1, "k1").await;
        c.send_frame(7, 2, Some(json!({"mid": 1, "mkey": "k1"})), None)
            .await;
        closed_as_protocol_error(kind, &c.closed().await);
        w.still_fine().await;
    }
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn bad_logins_get_a_reason_then_close() {
    let srv = start().await;
    let mut w = Witness::new(&srv).await;
    for kind in KINDS {
        for body in [
            json!({"mid": 1, "mkey": "wrong"}),
            json!({"mid": 4242, "mkey": "k1"}),
            json!({"mkey": "k1"}),
            json!("not an object"),
        ] {
            let mut c = Client::connect(kind, addr(&srv, kind)).await;
            let (ret, reply) = c.auth(body.clone()).await;
            assert_eq!(ret, -1, "{body}");
            assert!(
                reply["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{reply}"
            );
            let closed = c.closed().await;
            if kind != Kind::Tcp {
                assert!(matches!(closed, Closed::Ws(1008, _)), "{closed:?}");
            }
        }
        // Bytes that are not JSON at all (binary modes can send them).
        if kind != Kind::WsJson {
            let mut c = Client::connect(kind, addr(&srv, kind)).await;
            c.write_raw(&pack(1, 7, 3, b"\xff{not json")).await;
            let reply = c.reply().await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&reply.bytes).unwrap();
            assert_eq!(
                (reply.op, reply.seq, body["ret"].as_i64()),
                (8, 3, Some(-1))
            );
            assert!(body["error"].as_str().unwrap().contains("JSON"));
        }
        w.still_fine().await;
    }
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn refused_sends_answer_ret_minus_one_and_keep_the_connection() {
    let srv = start_with(|s| s.engine.max_body = 1024).await;
    let mut w = Witness::new(&srv).await;
    for kind in KINDS {
        let mut c = Client::login(kind, addr(&srv, kind), 4, "k4").await;
        let cases: [(u32, i32, i32, Vec<u8>, &str); 7] = [
            (18, 5, 1, b"spoof".to_vec(), "from does not match"),
            (20, 4, 100, b"not a member".to_vec(), "not a member"),
            (20, 4, 999, b"no such group".to_vec(), "not a member"),
            (18, 4, 1, Vec::new(), "empty"),
            (18, 4, 1, vec![b'x'; 1024 - 32 + 1], "exceeds"),
            (18, 4, 0, b"to nobody".to_vec(), "positive"),
            // The server knows its users (MemoryAuth is its UserDirectory).
            (18, 4, 9999, b"to a stranger".to_vec(), "unknown user 9999"),
        ];
        for (op, from, to, msg, reason) in cases {
            let ack = c.send_msg(op, from, to, &msg).await;
            assert_eq!((ack.ret, ack.chat_id), (-1, 0));
            if kind == Kind::WsJson {
                assert!(ack.error.as_deref().unwrap().contains(reason), "{ack:?}");
            }
        }
        // A body too short to hold from and to.
        if kind != Kind::WsJson {
            let seq = c.next_seq();
            c.write_raw(&pack(1, 18, seq, &[0, 0, 0, 4])).await;
            assert_eq!(c.ack(19, seq).await.ret, -1);
        } else {
            let seq = c.next_seq();
            c.send_frame(18, seq, Some(json!({"from": 4})), None).await;
            assert_eq!(c.ack(19, seq).await.ret, -1);
        }
        // Still connected, and nothing was consumed: the first real message is chatId 1.
        let ack = c.send_msg(18, 4, 5, b"real").await;
        assert_eq!(ack.ret, 0);
        // Nothing was stored for the stranger: no chatId, no conversation.
        let (sync, replay) = c.sync(18, 9999, 0, None).await;
        assert_eq!(
            (sync.ret, sync.oldest, sync.head, replay.len()),
            (0, 0, 0, 0)
        );
        w.still_fine().await;
    }
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn websocket_frames_that_break_the_text_or_binary_rules() {
    let srv = start().await;
    let mut w = Witness::new(&srv).await;
    let ws = srv.ws_addr.unwrap();
    // Malformed JSON, a missing required field: 1007 with a reason.
    for text in [
        "{not json",
        r#"{"op":7,"seq":1,"body":{}}"#,
        r#"{"ver":1,"op":"7","seq":1}"#,
    ] {
        let mut c = Client::connect(Kind::WsJson, ws).await;
        c.write_text(text).await;
        let closed = c.closed().await;
        assert!(
            matches!(closed, Closed::Ws(1007, ref r) if !r.is_empty()),
            "{text}: {closed:?}"
        );
    }
    // A frame of the other mode: 1002, before and after login.
    let mut c = Client::login(Kind::WsJson, ws, 1, "k1").await;
    c.write_raw(&pack(1, 2, 1, b"")).await;
    assert!(matches!(c.closed().await, Closed::Ws(1002, _)));
    let mut c = Client::login(Kind::WsBinary, ws, 1, "k1").await;
    c.write_text(r#"{"ver":1,"op":2,"seq":1}"#).await;
    assert!(matches!(c.closed().await, Closed::Ws(1002, _)));
    // A binary message ending inside a frame.
    let mut c = Client::connect(Kind::WsBinary, ws).await;
    let frame = pack(1, 7, 1, br#"{"mid":1,"mkey":"k1"}"#);
    c.write_raw(&frame[..frame.len() - 3]).await;
    assert!(matches!(c.closed().await, Closed::Ws(1002, _)));
    w.still_fine().await;

    // Another path is not an endpoint.
    let tcp = tokio::net::TcpStream::connect(ws).await.unwrap();
    let err = tokio_tungstenite::client_async(format!("ws://{ws}/other"), tcp)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_closed_and_blocks_nobody() {
    let srv = start_with(|s| {
        s.engine.max_outbound_bytes = 64 * 1024;
        s.max_frames_per_sec = 0; // the sender floods on purpose
    })
    .await;
    let mut w = Witness::new(&srv).await;
    let tcp = srv.tcp_addr.unwrap();
    // Mid 3 is in group 100 and never reads again after its login. A small
    // receive buffer keeps the kernel from absorbing megabytes for it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = Client::from_tcp(socket.connect(tcp).await.unwrap());
    let (ret, _) = stuck.auth(json!({"mid": 3, "mkey": "k3"})).await;
    assert_eq!(ret, 0);
    let mut sender = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    let mut good = Client::login(Kind::WsBinary, srv.ws_addr.unwrap(), 2, "k2").await;
    let msg = vec![b'm'; 8000];
    let total = 1000; // 8 MB for the stuck client: past the server's socket buffer (4 MB at most) and its bound
    let mut received = 0;
    for i in 1..=total {
        let ack = sender.send_msg(20, 1, 100, &msg).await;
        assert_eq!((ack.ret, ack.chat_id), (0, i), "every send is acknowledged");
        // Keep the good reader current.
        while received < i {
            let m = good.msg().await;
            received += 1;
            assert_eq!(m.chat_id, received);
        }
    }
    for _ in 0..500 {
        if !srv.comet.is_online(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!srv.comet.is_online(3), "the stuck reader was closed");
    assert!(srv.comet.stats().slow_consumers >= 1);
    w.still_fine().await;
    drop(stuck);
    assert!(srv.shutdown().await);
}

#[tokio::test]
async fn connections_past_the_limit_are_refused() {
    let srv = start_with(|s| s.max_connections = 3).await;
    let tcp = srv.tcp_addr.unwrap();
    let mut a = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    let _b = Client::login(Kind::Tcp, tcp, 2, "k2").await;
    let _c = Client::login(Kind::WsJson, srv.ws_addr.unwrap(), 3, "k3").await;
    let mut over = Client::connect(Kind::Tcp, tcp).await;
    assert_eq!(over.closed().await, Closed::Eof);
    a.heartbeat().await;
    a.close().await;
    // A freed slot is usable again.
    for _ in 0..200 {
        if srv.comet.connection_count() < 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut again = Client::login(Kind::Tcp, tcp, 1, "k1").await;
    again.heartbeat().await;
    assert!(srv.shutdown().await);
}

/// Issue 10, finding 6: a client that sends heartbeats and never reads is
/// closed once what its replies really hold (wire bytes, the boxed frame
/// and the queue slot: about 88 bytes each) reaches the outbound bound,
/// not once their 16 wire bytes each do. The server's socket buffers are
/// pinned small (accepted sockets inherit the listener's), so the kernel
/// absorbs a known amount: about 1,000 replies here, where 3,500 replies
/// counted at 16 bytes would still fit a 64 KiB bound and those counted at
/// 88 bytes are far past it.
#[tokio::test]
async fn heartbeat_replies_count_what_they_hold_against_the_outbound_bound() {
    use comet::core::{Comet, Config};
    use comet::plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HEARTBEATS: usize = 3_500;
    let comet = Comet::builder()
        .authenticator(Arc::new(MemoryAuth::from_iter([(1, "k1".to_string())])))
        .store(Arc::new(MemoryStore::new(100, 100)))
        .groups(Arc::new(MemoryGroups::default()))
        .config(Config::default().with_max_outbound_bytes(64 * 1024))
        .build()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(comet::transports::tcp::serve(
        listener,
        comet.clone(),
        comet::transports::tcp::TcpOptions::default()
            .with_limits(comet::transports::Limits::new(16)),
    ));

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut c = Client::from_tcp(socket.connect(addr).await.unwrap());
    assert_eq!(c.auth(json!({"mid": 1, "mkey": "k1"})).await.0, 0);
    // Every heartbeat in a few large writes, reading nothing meanwhile.
    let mut stream = c.into_tcp();
    let beats: Vec<u8> = (0..HEARTBEATS)
        .flat_map(|i| pack(1, 2, i as u32 + 1, b""))
        .collect();
    // The server may close before it has read them all.
    let _ = common::within("the heartbeats written", stream.write_all(&beats)).await;
    // Then read what the kernel holds: the connection must end there.
    let mut read = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    })
    .await;
    let replies = read / 16;
    assert!(
        ended.is_ok(),
        "not closed after {HEARTBEATS} unread heartbeat replies ({replies} read since)"
    );
    assert!(replies < HEARTBEATS, "all {replies} replies were written");
    assert_eq!(comet.stats().slow_consumers, 1);
    assert!(comet.shutdown_and_wait().await);
}
