//! Before login, over real sockets: one handshake deadline from the accept
//! through every stage (TLS, the WebSocket upgrade, the first data frame,
//! op 7), op 7's small body limit and the WebSocket read budget, and the
//! cap on unauthenticated connections.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use comet::core::{Comet, Config};
use comet::plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
use comet::transports::{tcp, tls, ws, Limits};
use common::raw::{pack, Client, Closed, Kind};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct Srv {
    comet: Comet,
    limits: Limits,
    tcp: SocketAddr,
    ws: SocketAddr,
    tcp_tls: SocketAddr,
    wss: SocketAddr,
    connector: TlsConnector,
}

/// A server on every transport: users 1..=9 with mkey "k{mid}".
async fn start(config: Config, limits: Limits) -> Srv {
    let auth = MemoryAuth::from_iter((1..=9).map(|mid| (mid, format!("k{mid}"))));
    let groups = MemoryGroups::default();
    groups.set_members(100, [1, 2, 3]);
    let comet = Comet::builder()
        .authenticator(Arc::new(auth))
        .store(Arc::new(MemoryStore::new(100, 100)))
        .groups(Arc::new(groups))
        .config(config)
        .build()
        .unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        generated.signing_key.serialize_der(),
    ));
    let tls = tls::TlsConfig::from_der(vec![generated.cert.der().clone()], key).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(generated.cert.der().clone()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client_config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let bind = || comet::transports::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (l_tcp, l_ws, l_tcp_tls, l_wss) = (bind(), bind(), bind(), bind());
    let addr = |l: &tokio::net::TcpListener| l.local_addr().unwrap();
    let srv = Srv {
        comet: comet.clone(),
        limits: limits.clone(),
        tcp: addr(&l_tcp),
        ws: addr(&l_ws),
        tcp_tls: addr(&l_tcp_tls),
        wss: addr(&l_wss),
        connector: TlsConnector::from(Arc::new(client_config)),
    };
    let tcp = tcp::TcpOptions::default().with_limits(limits.clone());
    let ws = ws::WsOptions::default().with_limits(limits);
    tokio::spawn(tcp::serve(l_tcp, comet.clone(), tcp.clone()));
    tokio::spawn(ws::serve(l_ws, comet.clone(), ws.clone()));
    tokio::spawn(tcp::serve(
        l_tcp_tls,
        comet.clone(),
        tcp.with_tls(tls.clone()),
    ));
    tokio::spawn(ws::serve(l_wss, comet, ws.with_tls(tls)));
    srv
}

fn with_timeout(ms: u64) -> Config {
    Config::default().with_handshake_timeout(Duration::from_millis(ms))
}

/// Reads (and drops) whatever arrives until `until`; whether the peer
/// closed (end of stream or an error) by then.
async fn closed_by<S: AsyncRead + Unpin>(stream: &mut S, until: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Like [`closed_by`] for a WebSocket.
async fn ws_closed_by<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    until: Instant,
) -> bool {
    loop {
        match timeout_at(until, ws.next()).await {
            Err(_) => return false,
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return true,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// The op 8 frame a binary-mode connection gets by `until`, if any.
async fn op8_by<S: AsyncRead + Unpin>(stream: &mut S, until: Instant) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = match timeout_at(until, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= 16 {
            let len = u32::from_be_bytes(buf[0..4].try_into().unwrap()) as usize;
            if buf.len() >= len {
                assert_eq!(u32::from_be_bytes(buf[8..12].try_into().unwrap()), 8);
                return Some(buf[16..len].to_vec());
            }
        }
    }
}

/// Writes a WebSocket upgrade request for `/sub` in two parts, the second
/// at `rest_at`, and reads the response; the stream is then a WebSocket.
async fn slow_upgrade(stream: &mut TcpStream, rest_at: Instant) -> std::io::Result<()> {
    stream
        .write_all(b"GET /sub HTTP/1.1\r\nHost: localhost\r\n")
        .await?;
    sleep_until(rest_at).await;
    stream
        .write_all(
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await?;
    // The response, byte by byte so nothing after it is taken.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    Ok(())
}

/// Asserts the outcome of a staged handshake: op 7 never accepted, and the
/// connection closed at the single deadline (not before it, and well before
/// three timeouts: each stage alone was within the timeout, so a per-stage
/// timer would have let op 7 through).
fn assert_closed_at_the_deadline(what: &str, closed_at: Option<Duration>, accepted: bool, t: u64) {
    assert!(
        !accepted,
        "{what}: op 7 accepted after the handshake deadline"
    );
    let at = closed_at.unwrap_or_else(|| panic!("{what}: never closed"));
    let t = Duration::from_millis(t);
    assert!(
        at + Duration::from_millis(50) >= t && at < 3 * t,
        "{what}: closed after {at:?}, deadline {t:?}"
    );
}

#[tokio::test]
async fn wss_one_deadline_through_a_slow_tls_handshake_a_slow_upgrade_and_a_late_op7() {
    const T: u64 = 400;
    let srv = start(with_timeout(T), Limits::new(100)).await;
    let ms = |n: u64| Duration::from_millis(n);
    let t0 = Instant::now();
    let mut tcp = TcpStream::connect(srv.wss).await.unwrap();
    let mut closed_at = None;
    let mut accepted = false;
    // TLS at 300 ms, the upgrade at 600 ms, op 7 at 900 ms: each stage
    // starts within 400 ms of the one before.
    if closed_by(&mut tcp, t0 + ms(300)).await {
        closed_at = Some(t0.elapsed());
    } else {
        let name = ServerName::try_from("localhost").unwrap();
        match srv.connector.connect(name, tcp).await {
            Err(_) => closed_at = Some(t0.elapsed()),
            Ok(mut tls) => {
                if closed_by(&mut tls, t0 + ms(600)).await {
                    closed_at = Some(t0.elapsed());
                } else {
                    let url = format!("wss://localhost:{}/sub", srv.wss.port());
                    match tokio_tungstenite::client_async(url, tls).await {
                        Err(_) => closed_at = Some(t0.elapsed()),
                        Ok((mut ws, _)) => {
                            if ws_closed_by(&mut ws, t0 + ms(900)).await {
                                closed_at = Some(t0.elapsed());
                            }
                            let op7 = json!({"ver":1,"op":7,"seq":1,"body":{"mid":1,"mkey":"k1"}});
                            let _ = ws.send(Message::Text(op7.to_string().into())).await;
                            while let Ok(Some(Ok(msg))) =
                                timeout_at(t0 + ms(3 * T), ws.next()).await
                            {
                                if let Message::Text(text) = msg {
                                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                                    accepted |= v["op"] == 8 && v["body"]["ret"] == 0;
                                }
                            }
                            closed_at.get_or_insert(t0.elapsed());
                        }
                    }
                }
            }
        }
    }
    assert_closed_at_the_deadline("wss", closed_at, accepted, T);
    assert!(srv.comet.stats().authenticated == 0);
}

#[tokio::test]
async fn tcp_tls_one_deadline_through_a_slow_tls_handshake_and_a_late_op7() {
    const T: u64 = 400;
    let srv = start(with_timeout(T), Limits::new(100)).await;
    let ms = |n: u64| Duration::from_millis(n);
    let t0 = Instant::now();
    let mut tcp = TcpStream::connect(srv.tcp_tls).await.unwrap();
    let mut closed_at = None;
    let mut accepted = false;
    // TLS at 300 ms, op 7 at 600 ms.
    if closed_by(&mut tcp, t0 + ms(300)).await {
        closed_at = Some(t0.elapsed());
    } else {
        let name = ServerName::try_from("localhost").unwrap();
        match srv.connector.connect(name, tcp).await {
            Err(_) => closed_at = Some(t0.elapsed()),
            Ok(mut tls) => {
                if closed_by(&mut tls, t0 + ms(600)).await {
                    closed_at = Some(t0.elapsed());
                }
                let _ = tls
                    .write_all(&pack(1, 7, 1, br#"{"mid":1,"mkey":"k1"}"#))
                    .await;
                let reply = op8_by(&mut tls, t0 + ms(3 * T)).await;
                accepted = reply.is_some_and(|body| body.starts_with(br#"{"ret":0"#));
                closed_at.get_or_insert(t0.elapsed());
            }
        }
    }
    assert_closed_at_the_deadline("tcp+tls", closed_at, accepted, T);
}

#[tokio::test]
async fn ws_one_deadline_through_a_slow_upgrade_an_empty_message_and_a_late_op7() {
    const T: u64 = 400;
    let srv = start(with_timeout(T), Limits::new(100)).await;
    let ms = |n: u64| Duration::from_millis(n);
    let t0 = Instant::now();
    let mut tcp = TcpStream::connect(srv.ws).await.unwrap();
    let mut closed_at = None;
    let mut accepted = false;
    // Half the upgrade request at once, the rest at 250 ms; an empty
    // binary message (it fixes the mode, carries no frame) at 300 ms; op 7
    // at 600 ms.
    match slow_upgrade(&mut tcp, t0 + ms(250)).await {
        Err(_) => closed_at = Some(t0.elapsed()),
        Ok(()) => {
            let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
            if ws_closed_by(&mut ws, t0 + ms(300)).await {
                closed_at = Some(t0.elapsed());
            }
            let _ = ws.send(Message::Binary(Vec::new().into())).await;
            if closed_at.is_none() && ws_closed_by(&mut ws, t0 + ms(600)).await {
                closed_at = Some(t0.elapsed());
            }
            let op7 = pack(1, 7, 1, br#"{"mid":1,"mkey":"k1"}"#);
            let _ = ws.send(Message::Binary(op7.into())).await;
            while let Ok(Some(Ok(msg))) = timeout_at(t0 + ms(3 * T), ws.next()).await {
                if let Message::Binary(data) = msg {
                    accepted |=
                        data.len() > 16 && data[11] == 8 && data[16..].starts_with(br#"{"ret":0"#);
                }
            }
            closed_at.get_or_insert(t0.elapsed());
        }
    }
    assert_closed_at_the_deadline("ws", closed_at, accepted, T);
    assert_eq!(srv.comet.stats().timeouts, 1);
}

#[tokio::test]
async fn an_upgrade_that_never_completes_is_closed_at_the_deadline() {
    const T: u64 = 300;
    let srv = start(with_timeout(T), Limits::new(100)).await;
    for addr in [srv.ws, srv.wss] {
        let t0 = Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        // Bytes now and then, each well within the timeout of the last.
        let mut closed = false;
        for piece in [
            &b"GET /sub HTTP/1.1\r\n"[..],
            b"Host: x\r\n",
            b"X-A: 1\r\n",
            b"X-B: 2\r\n",
        ] {
            if tcp.write_all(piece).await.is_err()
                || closed_by(&mut tcp, Instant::now() + Duration::from_millis(200)).await
            {
                closed = true;
                break;
            }
        }
        let at = t0.elapsed();
        assert!(closed, "{addr}: open after {at:?}");
        assert!(
            at < Duration::from_millis(3 * T),
            "{addr}: closed after {at:?}"
        );
    }
}

#[tokio::test]
async fn a_big_frame_before_login_is_refused_though_max_body_allows_it() {
    let srv = start(Config::default(), Limits::new(100)).await;
    assert_eq!(
        (Config::default().max_body, Config::default().max_auth_body),
        (65_536, 4_096)
    );
    // TCP: a header announcing 60 KB is refused at once.
    let mut c = TcpStream::connect(srv.tcp).await.unwrap();
    let mut wire = pack(1, 7, 1, &[b' '; 60_000]);
    wire.truncate(16 + 10);
    c.write_all(&wire).await.unwrap();
    assert!(closed_by(&mut c, Instant::now() + Duration::from_secs(2)).await);
    assert_eq!(srv.comet.stats().oversized_frames, 1);
    // WebSocket, both modes: a 60 KB message before op 7 is closed with 1009.
    let mut bin = Client::connect(Kind::WsBinary, srv.ws).await;
    bin.write_raw(&pack(1, 7, 1, &[b' '; 60_000])).await;
    assert!(matches!(
        bin.closed().await,
        Closed::Ws(1009, _) | Closed::Eof
    ));
    let mut text = Client::connect(Kind::WsJson, srv.ws).await;
    let padding = "x".repeat(60_000);
    text.write_text(
        &json!({"ver":1,"op":7,"seq":1,"body":{"mid":1,"mkey":"k1","pad":padding}}).to_string(),
    )
    .await;
    assert!(matches!(
        text.closed().await,
        Closed::Ws(1009, _) | Closed::Eof
    ));
    // An op 7 near the limit is fine, and after login 60 KB frames are too.
    let mut a = Client::connect(Kind::Tcp, srv.tcp).await;
    let pad = "p".repeat(3_900);
    assert_eq!(a.auth(json!({"mid":1,"mkey":"k1","pad":pad})).await.0, 0);
    let mut b = Client::login(Kind::WsJson, srv.ws, 2, "k2").await;
    let mut d = Client::login(Kind::WsBinary, srv.ws, 3, "k3").await;
    let big = vec![b'm'; 60_000];
    assert_eq!(a.send_msg(20, 1, 100, &big).await.ret, 0);
    assert_eq!(b.msg().await.msg, big);
    assert_eq!(d.msg().await.msg, big);
    assert_eq!(b.send_msg(18, 2, 1, &big).await.ret, 0);
    assert_eq!(a.msg().await.msg, big);
    assert_eq!(d.send_msg(18, 3, 2, &big).await.ret, 0);
    assert_eq!(b.msg().await.msg, big);
}

#[tokio::test]
async fn a_websocket_frame_trickled_before_login_is_cut_off_at_the_read_budget() {
    let srv = start(Config::default(), Limits::new(100)).await;
    let budget = ws::pre_auth_budget(&Config::default());
    let mut tcp = TcpStream::connect(srv.ws).await.unwrap();
    slow_upgrade(&mut tcp, Instant::now()).await.unwrap();
    // A masked binary frame announcing 100,000 bytes (within tungstenite's
    // message limit of 2 × max_body), its payload sent 1 KiB at a time.
    let mut head = vec![0x82, 0x80 | 127];
    head.extend_from_slice(&100_000u64.to_be_bytes());
    head.extend_from_slice(&[0; 4]); // mask key 0: payload as is
    tcp.write_all(&head).await.unwrap();
    let mut sent = 0;
    let mut cut = false;
    while sent < 100_000 {
        if tcp.write_all(&[0u8; 1024]).await.is_err() {
            cut = true;
            break;
        }
        sent += 1024;
        if sent % 8192 == 0 && closed_by(&mut tcp, Instant::now() + Duration::from_millis(20)).await
        {
            cut = true;
            break;
        }
    }
    assert!(
        cut || closed_by(&mut tcp, Instant::now() + Duration::from_secs(2)).await,
        "sent all {sent} bytes before login"
    );
    assert!(
        sent <= budget + 16 * 1024,
        "cut off only after {sent} bytes (budget {budget})"
    );
    assert_eq!(srv.comet.stats().oversized_frames, 1);
}

#[tokio::test]
async fn unauthenticated_connections_past_their_cap_are_refused_and_logged_in_ones_are_not() {
    let limits = Limits::new(100).with_max_unauthenticated(4);
    let srv = start(Config::default(), limits).await;
    // Logged-in connections give their place back.
    let mut users = Vec::new();
    for (mid, kind) in [
        (1, Kind::Tcp),
        (2, Kind::WsJson),
        (3, Kind::WsBinary),
        (4, Kind::Tcp),
        (5, Kind::Tcp),
    ] {
        let addr = if kind == Kind::Tcp { srv.tcp } else { srv.ws };
        users.push(Client::login(kind, addr, mid, &format!("k{mid}")).await);
    }
    assert_eq!(srv.limits.unauthenticated(), 0);
    // Four silent ones fill the cap (a WebSocket holds its place from
    // accept, through the upgrade, to op 8).
    let mut silent = vec![
        Client::connect(Kind::Tcp, srv.tcp).await,
        Client::connect(Kind::WsJson, srv.ws).await,
        Client::connect(Kind::Tcp, srv.tcp).await,
        Client::connect(Kind::WsBinary, srv.ws).await,
    ];
    common::within("four unauthenticated", async {
        while srv.limits.unauthenticated() < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The next ones are refused at once, on every listener.
    let mut fifth = TcpStream::connect(srv.tcp).await.unwrap();
    assert!(closed_by(&mut fifth, Instant::now() + Duration::from_secs(2)).await);
    let refused_ws = tokio_tungstenite::connect_async(format!("ws://{}/sub", srv.ws)).await;
    assert!(refused_ws.is_err());
    assert_eq!(srv.limits.refused(), 2);
    // The logged-in users are not disturbed.
    assert_eq!(users[0].send_msg(20, 1, 100, b"still here").await.ret, 0);
    assert_eq!(users[1].msg().await.msg, b"still here");
    for u in &mut users {
        u.heartbeat().await;
    }
    // One silent connection leaves: a new one can log in, and then frees its
    // place again.
    silent.pop().unwrap().close().await;
    common::within("a place to free up", async {
        while srv.limits.unauthenticated() > 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let _late = Client::login(Kind::WsJson, srv.ws, 6, "k6").await;
    assert_eq!(srv.limits.unauthenticated(), 3);
    assert_eq!(srv.comet.session_count(), 6);
    drop(silent);
}
