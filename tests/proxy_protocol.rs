//! The PROXY protocol (issue 11) over real sockets: a v1 or v2 header from
//! a trusted proxy names the client (the authenticator's peer, and the
//! address the per-address limit of 1 counts), an untrusted peer's header
//! is read as its data, and a trusted peer without a valid header is
//! refused. With it, issue 10 finding 8: IPv6 clients of one /64 named by a
//! trusted proxy share one per-address slot.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use comet::core::{
    async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, Comet, Identity,
};
use comet::plugins::memory::{MemoryGroups, MemoryStore};
use comet::transports::tcp::{self, TcpOptions};
use comet::transports::ws::{self, WsOptions};
use comet::transports::{Limits, TrustedProxies};
use common::raw::{Client, Kind};
use common::within;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Accepts every mid, recording the peer each login came from.
#[derive(Default)]
struct Peers(Mutex<Vec<SocketAddr>>);

#[async_trait]
impl Authenticator for Peers {
    async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
        self.0.lock().unwrap().push(ctx.peer());
        let mid = ctx.auth_request().mid().unwrap_or(1);
        Ok(AuthOutcome::Accepted(Identity::new(mid)))
    }
}

impl Peers {
    fn last(&self) -> Option<SocketAddr> {
        self.0.lock().unwrap().last().copied()
    }
}

struct Srv {
    peers: Arc<Peers>,
    tcp: SocketAddr,
    ws: SocketAddr,
}

/// A TCP and a WebSocket listener trusting `proxies`, sharing a
/// per-address limit of 1.
async fn server(proxies: &[&str]) -> Srv {
    let peers = Arc::new(Peers::default());
    let comet = Comet::builder()
        .authenticator(peers.clone())
        .store(Arc::new(MemoryStore::new(10, 10)))
        .groups(Arc::new(MemoryGroups::default()))
        .build()
        .unwrap();
    let limits = Limits::new(100).with_per_ip(1);
    let proxies = TrustedProxies::new(proxies).unwrap();
    let bind = || comet::transports::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (l_tcp, l_ws) = (bind(), bind());
    let srv = Srv {
        peers,
        tcp: l_tcp.local_addr().unwrap(),
        ws: l_ws.local_addr().unwrap(),
    };
    let tcp_options = TcpOptions::default()
        .with_limits(limits.clone())
        .with_proxy_protocol(proxies.clone());
    let ws_options = WsOptions::default()
        .with_limits(limits)
        .with_proxy_protocol(proxies);
    tokio::spawn(tcp::serve(l_tcp, comet.clone(), tcp_options));
    tokio::spawn(ws::serve(l_ws, comet, ws_options));
    srv
}

/// A v1 header (a text line) naming `client`.
fn v1(client: &str) -> Vec<u8> {
    let client: SocketAddr = client.parse().unwrap();
    let (family, dst) = if client.is_ipv4() {
        ("TCP4", "127.0.0.1")
    } else {
        ("TCP6", "::1")
    };
    format!(
        "PROXY {family} {} {dst} {} 3101\r\n",
        client.ip(),
        client.port()
    )
    .into_bytes()
}

/// A v2 header (binary) naming `client`, built by hand from the
/// specification rather than by the crate the server parses with.
fn v2(client: &str) -> Vec<u8> {
    let client: SocketAddr = client.parse().unwrap();
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(0x21); // version 2, PROXY command
    let (family, src, dst): (u8, Vec<u8>, Vec<u8>) = match client {
        SocketAddr::V4(a) => (0x11, a.ip().octets().to_vec(), vec![127, 0, 0, 1]),
        SocketAddr::V6(a) => (0x21, a.ip().octets().to_vec(), {
            let mut one = vec![0; 16];
            one[15] = 1;
            one
        }),
    };
    out.push(family); // TCP over IPv4 or IPv6
    let len = (src.len() * 2 + 4) as u16;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&3101u16.to_be_bytes());
    out
}

/// Connects to `addr`, sends `header`, then speaks `kind`.
async fn via_proxy(kind: Kind, addr: SocketAddr, header: &[u8]) -> Client {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(header).await.unwrap();
    Client::over(kind, Box::new(tcp), &format!("ws://{addr}/sub")).await
}

/// Logs in through the proxy as `mid`; the peer the authenticator saw.
async fn login_via(srv: &Srv, kind: Kind, header: &[u8], mid: i32) -> (Client, SocketAddr) {
    let addr = if kind == Kind::Tcp { srv.tcp } else { srv.ws };
    let mut c = via_proxy(kind, addr, header).await;
    let (ret, body) = c.auth(json!({"mid": mid, "mkey": "x"})).await;
    assert_eq!(ret, 0, "{body}");
    (c, srv.peers.last().unwrap())
}

/// Sends `bytes` and asserts the server closes the connection without a
/// byte in answer.
async fn refused(addr: SocketAddr, bytes: &[u8]) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    // A reset counts as closed too.
    let _ = within("server closes", tcp.read_to_end(&mut got)).await;
    assert!(
        got.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn v1_and_v2_headers_from_a_trusted_proxy_name_the_client() {
    let srv = server(&["127.0.0.1"]).await;
    for (kind, net) in [(Kind::Tcp, "192.0.2"), (Kind::WsJson, "198.51.100")] {
        let addr = if kind == Kind::Tcp { srv.tcp } else { srv.ws };
        let first = format!("{net}.7:5000");
        let (_a, peer) = login_via(&srv, kind, &v1(&first), 1).await;
        assert_eq!(peer, first.parse().unwrap(), "{kind:?} v1");
        // The same client again: its one place is taken, whichever version
        // names it (the proxy's own address is not what is counted).
        refused(addr, &v2(&format!("{net}.7:5001"))).await;
        refused(addr, &v1(&format!("{net}.7:5002"))).await;
        let second = format!("{net}.8:6000");
        let (_b, peer) = login_via(&srv, kind, &v2(&second), 2).await;
        assert_eq!(peer, second.parse().unwrap(), "{kind:?} v2");
    }
    // A v2 LOCAL header (a proxy's own health check) names nobody: the
    // connection is the proxy's.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let (_c, peer) = login_via(&srv, Kind::Tcp, &local, 3).await;
    assert_eq!(peer.ip().to_string(), "127.0.0.1");
}

#[tokio::test]
async fn an_untrusted_peers_header_is_its_data() {
    let srv = server(&["10.0.0.0/8"]).await;
    // TCP: "PROXY TC..." read as a frame header, whose length is absurd:
    // the connection fails before op 7 is answered.
    let mut c = via_proxy(Kind::Tcp, srv.tcp, &v1("192.0.2.7:5000")).await;
    c.send_frame(7, 1, Some(json!({"mid": 1, "mkey": "x"})), None)
        .await;
    let reply = within("close", c.reply()).await;
    assert!(
        reply.is_err(),
        "op 7 answered after a stray header: {reply:?}"
    );
    // WebSocket: the header is the start of a request line no upgrade
    // accepts.
    let mut tcp = TcpStream::connect(srv.ws).await.unwrap();
    tcp.write_all(&v1("192.0.2.7:5000")).await.unwrap();
    tcp.write_all(b"GET /sub HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = within("close", tcp.read_to_end(&mut got)).await;
    assert!(
        !String::from_utf8_lossy(&got).contains(" 101 "),
        "upgraded after a stray header"
    );
    assert!(srv.peers.last().is_none(), "nobody authenticated");
}

#[tokio::test]
async fn a_trusted_proxy_without_a_valid_header_is_refused() {
    let srv = server(&["127.0.0.0/8"]).await;
    for addr in [srv.tcp, srv.ws] {
        refused(addr, b"PROXY TCP4 999.0.2.7 127.0.0.1 5000 3101\r\n").await;
        refused(addr, b"PROXY TCP4 192.0.2.7 127.0.0.1 5000\r\n").await;
        // No header at all: a client speaking its protocol straight away.
        refused(addr, b"GET /sub HTTP/1.1\r\nHost: x\r\n\r\n").await;
        // A v2 preamble announcing an unknown family.
        refused(addr, b"\r\n\r\n\0\r\nQUIT\n\x21\x55\x00\x00").await;
    }
    assert!(srv.peers.last().is_none(), "nobody authenticated");
}

/// Issue 10 finding 8: the per-address limit counts IPv6 clients per /64,
/// also when a trusted proxy names them.
#[tokio::test]
async fn ipv6_clients_of_one_64_named_by_a_proxy_share_one_slot() {
    let srv = server(&["127.0.0.1"]).await;
    let (_a, peer) = login_via(&srv, Kind::Tcp, &v2("[2001:db8:1:2::5]:4000"), 1).await;
    assert_eq!(peer, "[2001:db8:1:2::5]:4000".parse().unwrap());
    // Another address of the same /64, over either listener: refused.
    refused(srv.tcp, &v2("[2001:db8:1:2:ffff::9]:4001")).await;
    refused(srv.ws, &v1("[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:4002")).await;
    // Another /64: a place of its own.
    let (_b, peer) = login_via(&srv, Kind::WsBinary, &v2("[2001:db8:1:3::5]:4003"), 2).await;
    assert_eq!(peer, "[2001:db8:1:3::5]:4003".parse().unwrap());
}
