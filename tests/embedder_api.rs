//! The embedder's controls over real sockets: what an authenticator sees,
//! per-session extensions, event hooks and the event broadcast, and
//! disconnecting one connection.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use comet::core::{
    async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, Comet, Event, Identity,
    Transport, WireMode,
};
use comet::plugins::memory::{MemoryGroups, MemoryStore};
use common::raw::{Client, Kind};
use common::within;
use serde_json::json;
use tokio::net::TcpListener;
use tower::Service;

/// A typed value a login attaches to its session.
#[derive(Clone, Debug, PartialEq)]
struct Role(String);

/// What the authenticator saw of one login.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    conn_id: u64,
    transport: Transport,
    mode: WireMode,
    peer: SocketAddr,
    has_request: bool,
    has_tls: bool,
}

/// Accepts mkey "ok" and attaches the login's `role` field as a [`Role`].
#[derive(Default)]
struct RoleAuth {
    seen: Mutex<Vec<Seen>>,
}

#[async_trait]
impl Authenticator for RoleAuth {
    async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
        self.seen.lock().unwrap().push(Seen {
            conn_id: ctx.conn_id(),
            transport: ctx.transport(),
            mode: ctx.mode(),
            peer: ctx.peer(),
            has_request: ctx.request_parts().is_some(),
            has_tls: ctx.tls().is_some(),
        });
        let req = ctx.auth_request();
        let (Some(mid), Some("ok")) = (req.mid(), req.mkey()) else {
            return Ok(AuthOutcome::Denied("bad login".into()));
        };
        let role = req.field("role").and_then(|v| v.as_str()).unwrap_or("none");
        Ok(AuthOutcome::Accepted(
            Identity::new(mid).with_extension(Role(role.to_owned())),
        ))
    }
}

/// Answers op 1000 itself with the session's [`Role`] and connection id,
/// read from the connection context: what a tower layer sees.
#[derive(Clone)]
struct WhoAmI<S>(S);

impl<S> Service<comet::core::FrameRequest> for WhoAmI<S>
where
    S: Service<comet::core::FrameRequest, Response = comet::core::FrameResponse, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = comet::core::FrameResponse;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<comet::core::FrameResponse, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: comet::core::FrameRequest) -> Self::Future {
        if req.frame.op != 1000 {
            return Box::pin(self.0.call(req));
        }
        let role = req
            .ctx
            .extensions()
            .get::<Role>()
            .map_or("missing", |r| r.0.as_str());
        let text = format!("{} {}", role, req.ctx.conn_id());
        // The body is in the connection's wire mode: a JSON string in JSON.
        let body = match req.ctx.conn.mode {
            WireMode::Json => json!(text).to_string(),
            _ => text,
        };
        let reply = req.frame.reply(1001, bytes::Bytes::from(body));
        Box::pin(async move { Ok(Some(reply)) })
    }
}

struct Server {
    comet: Comet,
    auth: Arc<RoleAuth>,
    tcp: SocketAddr,
    ws: SocketAddr,
}

/// A comet on TCP and WebSocket listeners, with `RoleAuth`, the `WhoAmI`
/// layer and whatever `builder` adds.
async fn start(
    builder: impl FnOnce(comet::core::CometBuilder) -> comet::core::CometBuilder,
) -> Server {
    let auth = Arc::new(RoleAuth::default());
    let comet = builder(
        Comet::builder()
            .authenticator(auth.clone())
            .store(Arc::new(MemoryStore::default()))
            .groups(Arc::new(MemoryGroups::default()))
            .layer(tower::layer::layer_fn(WhoAmI)),
    )
    .build()
    .expect("build");
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tcp_addr, ws_addr) = (tcp.local_addr().unwrap(), ws.local_addr().unwrap());
    tokio::spawn(comet::transports::tcp::serve(
        tcp,
        comet.clone(),
        Default::default(),
    ));
    tokio::spawn(comet::transports::ws::serve(
        ws,
        comet.clone(),
        Default::default(),
    ));
    Server {
        comet,
        auth,
        tcp: tcp_addr,
        ws: ws_addr,
    }
}

impl Server {
    fn addr(&self, kind: Kind) -> SocketAddr {
        match kind {
            Kind::Tcp => self.tcp,
            _ => self.ws,
        }
    }

    async fn login(&self, kind: Kind, mid: i32, role: &str) -> Client {
        let mut c = Client::connect(kind, self.addr(kind)).await;
        let (ret, body) = c
            .auth(json!({"mid": mid, "mkey": "ok", "role": role}))
            .await;
        assert_eq!(ret, 0, "login of {mid} failed: {body}");
        c
    }
}

/// Asks the `WhoAmI` layer: "<role> <conn id>".
async fn who_am_i(c: &mut Client) -> String {
    let seq = c.next_seq();
    c.send_frame(1000, seq, None, Some(b"")).await;
    let reply = c.reply().await.expect("op 1001 before close");
    assert_eq!((reply.op, reply.seq), (1001, seq));
    // In JSON mode the body arrives as a JSON string.
    match reply.json.as_str() {
        Some(text) => text.to_owned(),
        None => String::from_utf8(reply.bytes).unwrap(),
    }
}

#[tokio::test]
async fn the_authenticator_sees_the_connection_and_its_extensions_reach_layers_and_hooks() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let s = start(|b| {
        b.on_event(move |e| {
            let line = match e {
                Event::Authenticated {
                    conn,
                    mid,
                    extensions,
                    ..
                } => format!(
                    "auth {mid} {} {:?}",
                    conn.conn_id,
                    extensions.get::<Role>().map(|r| r.0.clone())
                ),
                Event::Disconnected {
                    conn,
                    mid,
                    extensions,
                    ..
                } => format!(
                    "gone {mid:?} {} {:?}",
                    conn.conn_id,
                    extensions.get::<Role>().map(|r| r.0.clone())
                ),
                _ => "other".into(),
            };
            log.lock().unwrap().push(line);
        })
    })
    .await;

    for (kind, transport, mode) in [
        (Kind::Tcp, Transport::Tcp, WireMode::Binary),
        (Kind::WsBinary, Transport::WebSocket, WireMode::Binary),
        (Kind::WsJson, Transport::WebSocket, WireMode::Json),
    ] {
        events.lock().unwrap().clear();
        let mut c = s.login(kind, 7, "admin").await;
        let seen = s.auth.seen.lock().unwrap().pop().expect("one login seen");
        assert_eq!((seen.transport, seen.mode), (transport, mode), "{kind:?}");
        assert_eq!(seen.peer.ip().to_string(), "127.0.0.1");
        assert!(!seen.has_tls, "{kind:?}: no TLS on this listener");
        if kind == Kind::Tcp {
            assert!(!seen.has_request, "raw TCP has no upgrade request");
        }
        assert_eq!(who_am_i(&mut c).await, format!("admin {}", seen.conn_id));
        c.close().await;
        within("the disconnect event", async {
            while events.lock().unwrap().len() < 2 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(
            *events.lock().unwrap(),
            [
                format!("auth 7 {} Some(\"admin\")", seen.conn_id),
                format!("gone Some(7) {} Some(\"admin\")", seen.conn_id),
            ],
            "{kind:?}"
        );
    }

    // A refused login attaches nothing and its disconnect carries no role.
    events.lock().unwrap().clear();
    let mut c = Client::connect(Kind::Tcp, s.tcp).await;
    let (ret, _) = c.auth(json!({"mid": 8, "mkey": "no"})).await;
    assert_eq!(ret, -1);
    within("the refused login's disconnect event", async {
        while events.lock().unwrap().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let line = events.lock().unwrap()[0].clone();
    assert!(
        line.starts_with("gone None ") && line.ends_with(" None"),
        "{line}"
    );
    assert_eq!(s.comet.session_count(), 0);
}

#[tokio::test]
async fn the_upgrade_request_and_tls_facts_a_transport_attaches_reach_the_authenticator() {
    use comet::core::http;
    use comet::core::{Frame, TlsInfo};
    use tokio_stream::wrappers::ReceiverStream;

    /// Accepts only when the request carried `Authorization: Bearer t-<mid>`
    /// and the TLS facts name the server "chat.example".
    struct Bearer;

    #[async_trait]
    impl Authenticator for Bearer {
        async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
            let token = ctx
                .headers()
                .and_then(|h| h.get(http::header::AUTHORIZATION))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer t-"))
                .and_then(|m| m.parse().ok());
            let sni = ctx.tls().and_then(|t| t.server_name.as_deref());
            Ok(match (token, sni, ctx.query()) {
                (Some(mid), Some("chat.example"), Some("room=5")) => {
                    AuthOutcome::Accepted(Identity::new(mid))
                }
                other => AuthOutcome::Denied(format!("{other:?}")),
            })
        }
    }

    let comet = Comet::builder()
        .authenticator(Arc::new(Bearer))
        .store(Arc::new(MemoryStore::default()))
        .groups(Arc::new(MemoryGroups::default()))
        .build()
        .unwrap();
    for (header, ret) in [("Bearer t-42", 0), ("Bearer nope", -1)] {
        let request = http::Request::get("/sub?room=5")
            .header(http::header::AUTHORIZATION, header)
            .body(())
            .unwrap();
        let info = comet
            .conn_info(
                Transport::WebSocket,
                WireMode::Binary,
                "127.0.0.1:9".parse().unwrap(),
            )
            .with_request(request.into_parts().0)
            .with_tls(TlsInfo::new().with_server_name("chat.example"));
        let (in_tx, in_rx) = tokio::sync::mpsc::channel(4);
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(4);
        let session = tokio::spawn(comet.serve(
            info,
            ReceiverStream::new(in_rx),
            tokio_util::sync::PollSender::new(out_tx),
        ));
        in_tx
            .send(Ok(Frame::new(1, 7, 1, r#"{"mid":1,"mkey":"x"}"#)))
            .await
            .unwrap();
        let reply = within("op 8", out_rx.recv()).await.expect("op 8");
        let comet::core::Outgoing::Data(bytes) = reply else {
            panic!("{reply:?}")
        };
        let body: serde_json::Value = serde_json::from_slice(&bytes[16..]).unwrap();
        assert_eq!(body["ret"], json!(ret), "{header}: {body}");
        drop(in_tx);
        within("session end", session).await.unwrap();
    }
}

#[tokio::test]
async fn every_hook_runs_in_order_and_a_broadcast_subscriber_sees_logins_and_logouts() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (first, second) = (calls.clone(), calls.clone());
    let s = start(|b| {
        b.on_event(move |e| {
            if let Event::Authenticated { mid, .. } = e {
                first.lock().unwrap().push(format!("first {mid}"));
            }
        })
        .on_event(move |e| {
            if let Event::Authenticated { mid, .. } = e {
                second.lock().unwrap().push(format!("second {mid}"));
            }
        })
    })
    .await;
    let mut events = s.comet.subscribe_events();

    let c = s.login(Kind::WsJson, 5, "user").await;
    let conn_id = match within("the login event", events.recv()).await.unwrap() {
        Event::Authenticated {
            conn,
            mid,
            extensions,
            ..
        } => {
            assert_eq!(mid, 5);
            assert_eq!(extensions.get::<Role>(), Some(&Role("user".into())));
            conn.conn_id
        }
        other => panic!("expected a login, got {other:?}"),
    };
    // The hooks ran before the broadcast got the event.
    assert_eq!(*calls.lock().unwrap(), ["first 5", "second 5"]);
    c.close().await;
    match within("the logout event", events.recv()).await.unwrap() {
        Event::Disconnected {
            conn, mid, reason, ..
        } => {
            assert_eq!((conn.conn_id, mid), (conn_id, Some(5)));
            assert_eq!(reason, comet::core::SessionEnd::PeerClosed);
        }
        other => panic!("expected a logout, got {other:?}"),
    }
}

#[tokio::test]
async fn a_subscriber_that_lags_loses_events_and_never_holds_sessions_up() {
    let s = start(|b| b).await;
    // Subscribed, never read: past the buffer the oldest events go.
    let mut idle = s.comet.subscribe_events();
    for _ in 0..600 {
        // 600 logins and 600 logouts: more than the 1,024 events kept.
        let mut c = s.login(Kind::Tcp, 9, "x").await;
        assert_eq!(who_am_i(&mut c).await.split(' ').next(), Some("x"));
        c.close().await;
    }
    within("the last session to end", async {
        while s.comet.connection_count() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    match idle.recv().await {
        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
            assert!(missed >= 1200 - 1024, "missed {missed}")
        }
        other => panic!("expected Lagged, got {other:?}"),
    }
}

#[tokio::test]
async fn disconnect_conn_closes_exactly_that_connection() {
    let s = start(|b| b).await;
    let mut phone = s.login(Kind::Tcp, 3, "phone").await;
    let mut laptop = s.login(Kind::WsBinary, 3, "laptop").await;
    let phone_id: u64 = who_am_i(&mut phone)
        .await
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(s.comet.sessions_of(3), 2);

    assert!(s.comet.disconnect_conn(phone_id));
    assert_eq!(
        within("the phone's close", phone.closed()).await,
        common::raw::Closed::Eof
    );
    within("the registry to drop the phone", async {
        while s.comet.sessions_of(3) != 1 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    // The laptop is untouched: it still answers, and gets messages.
    assert!(who_am_i(&mut laptop).await.starts_with("laptop "));
    s.comet
        .send_to_user(4, 3, "still here".into())
        .await
        .unwrap();
    assert_eq!(&laptop.msg().await.msg[..], b"still here");
    // An id that is gone (or never was) closes nothing.
    assert!(!s.comet.disconnect_conn(phone_id));
    assert!(!s.comet.disconnect_conn(u64::MAX));
    assert_eq!(s.comet.sessions_of(3), 1);
}
