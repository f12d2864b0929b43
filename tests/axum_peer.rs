//! `CometWs` and the client's address (issue 11): mounted without connect
//! info it refuses upgrades loudly instead of giving every client
//! `0.0.0.0:0`; behind trusted proxies the address comes from `Forwarded` /
//! `X-Forwarded-For`, and only from them. Over real sockets, with a
//! per-address limit of 1 showing which address each connection got.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use comet::core::Comet;
use comet::plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
use comet::transports::axum::CometWs;
use comet::transports::Limits;
use common::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn comet() -> Comet {
    Comet::builder()
        .authenticator(Arc::new(MemoryAuth::from_iter([(1, "k1".to_string())])))
        .store(Arc::new(MemoryStore::new(10, 10)))
        .groups(Arc::new(MemoryGroups::default()))
        .build()
        .unwrap()
}

/// Serves `ws` at /sub, with or without connect info.
async fn serve(ws: CometWs, connect_info: bool) -> SocketAddr {
    let app = Router::new().route_service("/sub", ws);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if connect_info {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        } else {
            axum::serve(listener, app).await
        }
    });
    addr
}

/// Sends an upgrade request (with `X-Forwarded-For: forwarded` if given)
/// and returns the status code and what was read of the response; the
/// connection stays open (an upgraded one holds its place in the limits).
async fn upgrade(addr: SocketAddr, forwarded: Option<&str>) -> (u16, String, TcpStream) {
    let mut tcp = within("connect", TcpStream::connect(addr)).await.unwrap();
    let mut req = String::from(
        "GET /sub HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    );
    if let Some(ip) = forwarded {
        req.push_str(&format!("X-Forwarded-For: {ip}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let mut got = Vec::new();
    // Headers end with an empty line; a refusal's body follows at once.
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = within("response", tcp.read(&mut buf)).await.unwrap();
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    if status != 101 {
        // Read the rest of a refusal (its body).
        if let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), tcp.read(&mut buf)).await
        {
            got.extend_from_slice(&buf[..n]);
        }
    }
    (status, String::from_utf8_lossy(&got).to_string(), tcp)
}

#[tokio::test]
async fn without_connect_info_upgrades_are_refused_with_the_fix() {
    let addr = serve(CometWs::new(comet()), false).await;
    let (status, text, _tcp) = upgrade(addr, None).await;
    assert_eq!(status, 500, "{text}");
    assert!(
        text.contains("into_make_service_with_connect_info"),
        "the refusal names the fix: {text}"
    );
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let limits = || Limits::new(100).with_per_ip(1);
    // The proxy (127.0.0.1, the test) is trusted: each forwarded client is
    // its own address.
    let trusting = serve(
        CometWs::new(comet())
            .with_limits(limits())
            .trust_proxies(["127.0.0.0/8"])
            .unwrap(),
        true,
    )
    .await;
    let (a, _, _hold_a) = upgrade(trusting, Some("203.0.113.1")).await;
    let (b, _, _hold_b) = upgrade(trusting, Some("203.0.113.2")).await;
    let (again, text, _) = upgrade(trusting, Some("203.0.113.1")).await;
    assert_eq!(
        (a, b),
        (101, 101),
        "two forwarded clients, one address each"
    );
    assert_eq!(again, 503, "a second connection of 203.0.113.1: {text}");

    // Not trusted: the headers are ignored, both are 127.0.0.1.
    let plain = serve(CometWs::new(comet()).with_limits(limits()), true).await;
    let (a, _, _hold) = upgrade(plain, Some("203.0.113.1")).await;
    let (b, text, _) = upgrade(plain, Some("203.0.113.2")).await;
    assert_eq!(a, 101);
    assert_eq!(b, 503, "an untrusted peer's header is ignored: {text}");

    assert!(CometWs::new(comet()).trust_proxies(["not-an-ip"]).is_err());
}
