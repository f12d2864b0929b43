//! `tcp::serve_connection` and `ws::serve_connection` (issue 11): an
//! application with its own accept loop hands each accepted stream to comet
//! and gets the session's end back; the options' limits hold as in `serve`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use comet::core::{Comet, SessionEnd};
use comet::plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
use comet::transports::tcp::{self, TcpOptions};
use comet::transports::ws::{self, WsOptions};
use comet::transports::Limits;
use common::raw::{Client, Kind};
use common::within;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// An application's own accept loop: every stream goes to the transport
/// `kind` asks for; what each `serve_connection` returned is reported.
async fn own_loop(kind: Kind) -> (SocketAddr, mpsc::UnboundedReceiver<Option<SessionEnd>>) {
    let comet = Comet::builder()
        .authenticator(Arc::new(MemoryAuth::from_iter([
            (1, "k1".to_string()),
            (2, "k2".to_string()),
        ])))
        .store(Arc::new(MemoryStore::new(10, 10)))
        .groups(Arc::new(MemoryGroups::default()))
        .build()
        .unwrap();
    // One connection per address: the second one is refused.
    let limits = Limits::new(10).with_per_ip(1);
    let tcp_options = TcpOptions::default().with_limits(limits.clone());
    let ws_options = WsOptions::default().with_limits(limits);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            let tx = tx.clone();
            let served = match kind {
                Kind::Tcp => futures_util::future::Either::Left(tcp::serve_connection(
                    stream,
                    peer,
                    &comet,
                    &tcp_options,
                )),
                _ => futures_util::future::Either::Right(ws::serve_connection(
                    stream,
                    peer,
                    &comet,
                    &ws_options,
                )),
            };
            tokio::spawn(async move {
                let _ = tx.send(served.await);
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn an_application_accept_loop_serves_both_transports() {
    for kind in [Kind::Tcp, Kind::WsJson] {
        let (addr, mut ends) = own_loop(kind).await;
        let mut one = Client::login(kind, addr, 1, "k1").await;
        // The same address again: past the per-address limit of the
        // options, never a session.
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        drop(stream);
        assert_eq!(within("refusal", ends.recv()).await, Some(None), "{kind:?}");
        let ack = one.send_msg(18, 1, 2, b"hi").await;
        assert_eq!(ack.ret, 0, "{kind:?}: {ack:?}");
        one.close().await;
        let end = within("session end", ends.recv()).await;
        assert_eq!(end, Some(Some(SessionEnd::PeerClosed)), "{kind:?}");
        // The place is free again.
        let mut two = Client::connect(kind, addr).await;
        let (ret, body) = two.auth(json!({"mid": 2, "mkey": "k2"})).await;
        assert_eq!(ret, 0, "{kind:?}: {body}");
        two.close().await;
    }
}

/// Sends one plain HTTP request and reads the response head to the close.
async fn plain_request(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    within("the response and the close", tcp.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_websocket_listener_without_files_answers_plain_requests() {
    // Through an application's own loop: not a session, and said so.
    let (addr, mut ends) = own_loop(Kind::WsJson).await;
    let answer = plain_request(addr, "/healthz").await;
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    assert_eq!(within("the end", ends.recv()).await, Some(None));
    let answer = plain_request(addr, "/sub").await;
    assert!(answer.starts_with("HTTP/1.1 426 "), "{answer}");
    assert!(
        answer.ends_with("this is a WebSocket endpoint\n"),
        "{answer}"
    );
    assert_eq!(within("the end", ends.recv()).await, Some(None));
    // The endpoint itself still upgrades.
    let mut one = Client::login(Kind::WsBinary, addr, 1, "k1").await;
    let ack = one.send_msg(18, 1, 2, b"still there").await;
    assert_eq!(ack.ret, 0, "{ack:?}");
    one.close().await;

    // Through `ws::serve`'s own accept loop, with the default options.
    let comet = Comet::builder()
        .authenticator(Arc::new(MemoryAuth::from_iter([(1, "k1".to_string())])))
        .store(Arc::new(MemoryStore::new(10, 10)))
        .groups(Arc::new(MemoryGroups::default()))
        .build()
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ws::serve(listener, comet, WsOptions::default()));
    let answer = plain_request(addr, "/").await;
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    let answer = plain_request(addr, "/sub?probe=1").await;
    assert!(answer.starts_with("HTTP/1.1 426 "), "{answer}");
    let one = Client::login(Kind::WsJson, addr, 1, "k1").await;
    one.close().await;
}
