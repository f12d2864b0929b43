//! What the authenticator sees of a connection (issue 11), over real
//! sockets: the WebSocket upgrade request's headers and URI, from the plain
//! listener and from `CometWs` (a session cookie, a bearer token, a query
//! token), and the TLS facts (SNI, ALPN) from both TLS listeners. Raw TCP
//! has no request to show.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use comet::core::{
    async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, Comet, Identity, Transport,
};
use comet::plugins::memory::{MemoryGroups, MemoryStore};
use comet::transports::axum::CometWs;
use comet::transports::tcp::{self, TcpOptions};
use comet::transports::tls::TlsConfig;
use comet::transports::ws::{self, WsOptions};
use common::raw::pack;
use common::within;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// What one login showed the authenticator.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    transport: Option<Transport>,
    token_from: Option<&'static str>,
    path: Option<String>,
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
}

/// Logs in `tok-N` as mid N, the token taken from the `session` cookie,
/// an `Authorization: Bearer` header or a `token` query parameter of the
/// upgrade request, in that order; op 7's body is not looked at. Without a
/// request (raw TCP) the login is denied.
#[derive(Default)]
struct Tokens(Mutex<Vec<Seen>>);

fn token(ctx: &AuthContext) -> Option<(&'static str, String)> {
    let headers = ctx.headers()?;
    let cookie = headers
        .get_all(comet::core::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("session="));
    if let Some(t) = cookie {
        return Some(("cookie", t.to_string()));
    }
    let bearer = headers
        .get(comet::core::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(t) = bearer {
        return Some(("bearer", t.to_string()));
    }
    let query = ctx
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))?;
    Some(("query", query.to_string()))
}

#[async_trait]
impl Authenticator for Tokens {
    async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
        let found = token(ctx);
        self.0.lock().unwrap().push(Seen {
            transport: Some(ctx.transport()),
            token_from: found.as_ref().map(|(from, _)| *from),
            path: ctx.uri().map(|u| u.path().to_string()),
            sni: ctx.tls().and_then(|t| t.server_name.clone()),
            alpn: ctx.tls().and_then(|t| t.alpn.clone()),
        });
        let mid = found.and_then(|(_, t)| t.strip_prefix("tok-")?.parse().ok());
        Ok(match mid {
            Some(mid) => AuthOutcome::Accepted(Identity::new(mid)),
            None => AuthOutcome::Denied("no valid token in the upgrade request".into()),
        })
    }
}

impl Tokens {
    fn last(&self) -> Seen {
        self.0.lock().unwrap().last().cloned().expect("a login")
    }
}

fn comet(auth: Arc<Tokens>) -> Comet {
    Comet::builder()
        .authenticator(auth)
        .store(Arc::new(MemoryStore::new(10, 10)))
        .groups(Arc::new(MemoryGroups::default()))
        .build()
        .unwrap()
}

/// Upgrades `stream` with a request to `url` carrying `headers`, sends
/// op 7 with an empty body; op 8's `ret` and body.
async fn ws_login<S>(stream: S, url: &str, headers: &[(&'static str, &str)]) -> (i64, Value)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut req = url.into_client_request().unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(*name, value.parse().unwrap());
    }
    let (mut ws, _) = within("upgrade", tokio_tungstenite::client_async(req, stream))
        .await
        .expect("upgrade");
    let op7 = json!({"ver": 1, "op": 7, "seq": 1, "body": {}});
    ws.send(Message::Text(op7.to_string().into()))
        .await
        .unwrap();
    loop {
        match within("op 8", ws.next()).await {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["op"] == 8 {
                    let body = frame["body"].clone();
                    return (body["ret"].as_i64().unwrap(), body);
                }
            }
            Some(Ok(_)) => continue,
            other => panic!("no op 8: {other:?}"),
        }
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// The three places a token can be, and no token.
async fn check_tokens(auth: &Tokens, addr: SocketAddr, path: &str) {
    let url = format!("ws://{addr}{path}");
    let (ret, body) = ws_login(
        connect(addr).await,
        &url,
        &[("cookie", "theme=dark; session=tok-4")],
    )
    .await;
    assert_eq!((ret, body["mid"].as_i64()), (0, Some(4)), "{body}");
    assert_eq!(auth.last().token_from, Some("cookie"));
    assert_eq!(auth.last().path.as_deref(), Some(path));
    let (ret, body) = ws_login(
        connect(addr).await,
        &url,
        &[("authorization", "Bearer tok-5")],
    )
    .await;
    assert_eq!((ret, body["mid"].as_i64()), (0, Some(5)), "{body}");
    assert_eq!(auth.last().token_from, Some("bearer"));
    let (ret, body) = ws_login(connect(addr).await, &format!("{url}?x=1&token=tok-6"), &[]).await;
    assert_eq!((ret, body["mid"].as_i64()), (0, Some(6)), "{body}");
    assert_eq!(auth.last().token_from, Some("query"));
    let (ret, _) = ws_login(connect(addr).await, &url, &[("cookie", "theme=dark")]).await;
    assert_ne!(ret, 0, "a login without a token");
    assert_eq!(auth.last().token_from, None);
    assert_eq!(auth.last().transport, Some(Transport::WebSocket));
}

#[tokio::test]
async fn the_websocket_listener_shows_the_upgrade_request() {
    let auth = Arc::new(Tokens::default());
    let comet = comet(auth.clone());
    let l = comet::transports::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(ws::serve(
        l,
        comet.clone(),
        WsOptions::default().with_path("/chat"),
    ));
    check_tokens(&auth, addr, "/chat").await;

    // Raw TCP has no upgrade request: this authenticator denies it.
    let l = comet::transports::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let tcp_addr = l.local_addr().unwrap();
    tokio::spawn(tcp::serve(l, comet, TcpOptions::default()));
    let mut c = connect(tcp_addr).await;
    c.write_all(&pack(1, 7, 1, br#"{"mid":4,"mkey":"tok-4"}"#))
        .await
        .unwrap();
    let mut head = [0u8; 16];
    within("op 8", c.read_exact(&mut head)).await.unwrap();
    assert_eq!(u32::from_be_bytes(head[8..12].try_into().unwrap()), 8);
    let seen = auth.last();
    assert_eq!(
        (seen.transport, seen.path, seen.token_from),
        (Some(Transport::Tcp), None, None)
    );
}

#[tokio::test]
async fn comet_ws_shows_the_upgrade_request() {
    let auth = Arc::new(Tokens::default());
    let app = Router::new().route_service("/sub", CometWs::new(comet(auth.clone())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    check_tokens(&auth, addr, "/sub").await;
}

#[tokio::test]
async fn tls_listeners_show_sni_and_alpn() {
    let generated = rcgen::generate_simple_self_signed(vec!["chat.localhost".into()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        generated.signing_key.serialize_der(),
    ));
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![generated.cert.der().clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"comet".to_vec(), b"http/1.1".to_vec()];
    let tls = TlsConfig::from_rustls(Arc::new(server));
    let mut roots = RootCertStore::empty();
    roots.add(generated.cert.der().clone()).unwrap();
    let connector = |alpn: &[u8]| {
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        TlsConnector::from(Arc::new(config))
    };
    let name = ServerName::try_from("chat.localhost").unwrap();

    let auth = Arc::new(Tokens::default());
    let comet = comet(auth.clone());
    let bind = || comet::transports::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (l_wss, l_tls) = (bind(), bind());
    let (wss, tcp_tls) = (l_wss.local_addr().unwrap(), l_tls.local_addr().unwrap());
    let options = WsOptions::default().with_tls(tls.clone());
    tokio::spawn(ws::serve(l_wss, comet.clone(), options));
    tokio::spawn(tcp::serve(
        l_tls,
        comet,
        TcpOptions::default().with_tls(tls),
    ));

    let stream = connector(b"http/1.1")
        .connect(name.clone(), connect(wss).await)
        .await
        .unwrap();
    let (ret, body) = ws_login(
        stream,
        "wss://chat.localhost/sub",
        &[("authorization", "Bearer tok-7")],
    )
    .await;
    assert_eq!((ret, body["mid"].as_i64()), (0, Some(7)), "{body}");
    let seen = auth.last();
    assert_eq!(seen.sni.as_deref(), Some("chat.localhost"));
    assert_eq!(seen.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(seen.token_from, Some("bearer"));

    let mut stream = connector(b"comet")
        .connect(name, connect(tcp_tls).await)
        .await
        .unwrap();
    stream
        .write_all(&pack(1, 7, 1, br#"{"mid":7}"#))
        .await
        .unwrap();
    let mut head = [0u8; 16];
    within("op 8", stream.read_exact(&mut head)).await.unwrap();
    let seen = auth.last();
    assert_eq!(seen.transport, Some(Transport::Tcp));
    assert_eq!(seen.sni.as_deref(), Some("chat.localhost"));
    assert_eq!(seen.alpn.as_deref(), Some(&b"comet"[..]));
}
