//! The chat server's WebSocket listener serves the embedded web client to
//! plain HTTP requests (same origin as `/sub`), answers other paths 404,
//! and still upgrades WebSocket requests on the same port.

mod common;

use std::net::SocketAddr;

use common::raw::{Client, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one raw request and reads the response to the server's close.
async fn http(addr: SocketAddr, request: &str) -> (String, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    common::within("the response and the close", tcp.read_to_end(&mut out))
        .await
        .expect("read");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole response head");
    let head = String::from_utf8(out[..split].to_vec()).expect("an ASCII head");
    (head, out[split + 4..].to_vec())
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
}

#[tokio::test]
async fn the_listener_serves_the_web_client_beside_the_websocket_endpoint() {
    let server = common::server::start().await;
    let addr = server.ws_addr.expect("websocket listener");

    let (head, body) = http(addr, &get("/")).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/html; charset=utf-8"),
        "{head}"
    );
    assert_eq!(body, include_bytes!("../web/index.html"));

    for (path, content_type) in [
        ("/app.js", "text/javascript"),
        ("/comet.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let (head, body) = http(addr, &get(path)).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {head}");
        assert!(
            head.contains(&format!("Content-Type: {content_type}")),
            "{path}: {head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{path}: {head}"
        );
        assert!(!body.is_empty(), "{path}");
    }
    let (_, body) = http(addr, &get("/comet.js")).await;
    assert_eq!(body, include_bytes!("../web/comet.js"));

    let (head, body) = http(addr, &get("/../Cargo.toml")).await;
    assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
    assert_eq!(body, b"not found\n");
    let (head, _) = http(addr, "POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 405 "), "{head}");
    let (head, _) = http(addr, &get("/sub")).await;
    assert!(head.starts_with("HTTP/1.1 426 "), "{head}");

    // The WebSocket endpoint on the same port is untouched.
    let mut one = Client::login(Kind::WsJson, addr, 1, "k1").await;
    let mut two = Client::login(Kind::WsJson, addr, 2, "k2").await;
    let ack = one.send_msg(18, 1, 2, b"same origin").await;
    assert_eq!(ack.ret, 0, "{ack:?}");
    assert_eq!(two.msg().await.msg, b"same origin");
    one.close().await;
    two.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_request_head_past_the_upgrade_allowance_is_refused() {
    let server = common::server::start().await;
    let addr = server.ws_addr.expect("websocket listener");
    let big = format!(
        "GET / HTTP/1.1\r\nX-Filler: {}\r\n",
        "a".repeat(comet::transports::ws::UPGRADE_ALLOWANCE)
    );
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before it has read everything.
    let _ = tcp.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    let _ = common::within("the refusal", tcp.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    server.shutdown().await;
}
