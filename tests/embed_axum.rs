//! End to end over real loopback sockets, against the `embed_axum` example's
//! application (its `app.rs`, included below): the application's REST routes,
//! its SQLite user table, and comet's WebSocket endpoint mounted at `/sub`,
//! driven by the independent client of tests/common/raw.rs.

mod common;

#[path = "../examples/embed_axum/app.rs"]
mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::raw::{Client, Closed, Kind};
use common::within;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The application on a fresh in-memory database, on a free port.
struct Running {
    addr: SocketAddr,
    users: Arc<app::SqlUsers>,
}

async fn start() -> Running {
    let users = Arc::new(
        app::SqlUsers::open(":memory:")
            .await
            .expect("in-memory database"),
    );
    assert_eq!(app::seed_demo_users(&users).await.unwrap(), vec![1, 2]);
    let sessions = Arc::new(app::Sessions::default());
    let comet = app::comet(users.clone(), sessions.clone());
    let router = app::app(comet, users.clone(), sessions);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Running { addr, users }
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, body).await;
    (status, body)
}

/// One HTTP/1.1 request over a fresh connection: (status, head, body).
async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String, String) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let mut tcp = within("http connect", TcpStream::connect(addr))
        .await
        .unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("http response", tcp.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, head.to_owned(), body.to_owned())
}

async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (status, body) = http(addr, method, path, body).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    (status, json)
}

async fn online(addr: SocketAddr, mid: i32) -> bool {
    let (status, body) = http_json(addr, "GET", &format!("/users/{mid}/online"), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["mid"], json!(mid));
    body["online"].as_bool().expect("online is a bool")
}

/// Polls `/users/{mid}/online` until it answers `want` (sessions end on
/// their own tasks).
async fn await_online(addr: SocketAddr, mid: i32, want: bool) {
    within("online status", async {
        while online(addr, mid).await != want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn rest_routes_and_hashed_keys() {
    let srv = start().await;
    let addr = srv.addr;

    assert_eq!(http(addr, "GET", "/health", None).await, (200, "ok".into()));

    let user = json!({"mid": 5, "password": "secret-of-5"});
    assert_eq!(
        http_json(addr, "POST", "/users", Some(user.clone())).await,
        (201, json!({"mid": 5}))
    );
    let (status, body) = http_json(addr, "POST", "/users", Some(user)).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = http(
        addr,
        "POST",
        "/users",
        Some(json!({"mid": 0, "password": "x"})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = http(addr, "POST", "/users", Some(json!({"mid": 6}))).await;
    assert!((400..500).contains(&status), "missing password: {status}");

    // The table holds salted argon2 hashes, never the keys themselves.
    let rows: Vec<(i32, String)> = srv
        .users
        .with_conn(|db| {
            let mut stmt = db.prepare("SELECT mid, mkey_hash FROM users ORDER BY mid")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
        .unwrap();
    assert_eq!(
        rows.iter().map(|(mid, _)| *mid).collect::<Vec<_>>(),
        [1, 2, 5]
    );
    for ((_, stored), key) in rows.iter().zip(["pw1", "pw2", "secret-of-5"]) {
        assert!(stored.starts_with("$argon2"), "{stored}");
        assert!(!stored.contains(key), "{stored} holds the key");
    }
    // Salted: the same key hashes differently every time.
    let again = srv.users.add_user(7, "pw1".into()).await.unwrap();
    assert!(again);
    let (h1, h7): (String, String) = srv
        .users
        .with_conn(|db| {
            let get = |mid: i32| {
                db.query_row("SELECT mkey_hash FROM users WHERE mid = ?1", [mid], |r| {
                    r.get(0)
                })
            };
            Ok((get(1)?, get(7)?))
        })
        .await
        .unwrap();
    assert_ne!(h1, h7);

    assert!(!online(addr, 5).await);
    let (status, body) = http(addr, "GET", "/sub", None).await;
    assert_eq!(status, 426, "{body}");
}

#[tokio::test]
async fn websocket_sessions_on_the_mounted_endpoint() {
    let srv = start().await;
    let addr = srv.addr;
    let (status, _) = http(
        addr,
        "POST",
        "/users",
        Some(json!({"mid": 5, "password": "pw5"})),
    )
    .await;
    assert_eq!(status, 201);

    let mut one = Client::connect_path(Kind::WsJson, addr, "/sub").await;
    let (ret, body) = one.auth(json!({"mid": 1, "mkey": "pw1"})).await;
    assert_eq!((ret, &body["mid"]), (0, &json!(1)), "{body}");
    let mut five = Client::connect_path(Kind::WsBinary, addr, "/sub").await;
    let (ret, body) = five.auth(json!({"mid": 5, "mkey": "pw5"})).await;
    assert_eq!((ret, &body["mid"]), (0, &json!(5)), "{body}");
    assert!(online(addr, 5).await);
    assert!(online(addr, 1).await);
    assert!(!online(addr, 2).await);

    // 1:1 both ways, across the two wire modes, in one conversation.
    let ack = one.send_msg(18, 1, 5, "hello 5 ✓".as_bytes()).await;
    assert_eq!((ack.ret, ack.chat_id), (0, 1), "{ack:?}");
    let m = five.msg().await;
    assert_eq!(
        (m.op, m.chat_id, m.from, m.to, &m.msg[..]),
        (18, 1, 1, 5, "hello 5 ✓".as_bytes())
    );
    let ack = five.send_msg(18, 5, 1, b"hello 1").await;
    assert_eq!((ack.ret, ack.chat_id), (0, 2), "{ack:?}");
    let m = one.msg().await;
    assert_eq!(
        (m.op, m.chat_id, m.from, m.to, &m.msg[..]),
        (18, 2, 5, 1, &b"hello 1"[..])
    );

    // The application notifies a user through its comet handle.
    let (status, body) = http_json(
        addr,
        "POST",
        "/users/5/notify",
        Some(json!({"msg": "from the backend"})),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({"chatId": 1})));
    let m = five.msg().await;
    assert_eq!(
        (m.op, m.chat_id, m.from, m.to, &m.msg[..]),
        (18, 1, 0, 5, &b"from the backend"[..])
    );
    // As user 1: continues the 1-5 conversation, and echoes to 1's sessions.
    let (status, body) = http_json(
        addr,
        "POST",
        "/users/5/notify",
        Some(json!({"from": 1, "msg": "as one"})),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({"chatId": 3})));
    for c in [&mut five, &mut one] {
        let m = c.msg().await;
        assert_eq!(
            (m.op, m.chat_id, m.from, m.to, &m.msg[..]),
            (18, 3, 1, 5, &b"as one"[..])
        );
    }
    let (status, _) = http(addr, "POST", "/users/5/notify", Some(json!({"msg": ""}))).await;
    assert_eq!(status, 400);
    // The conversation's history through the application's REST route
    // (the read behind op 22), from either side.
    let (status, body) = http_json(addr, "GET", "/users/1/history/5?after=1", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((&body["oldest"], &body["head"]), (&json!(1), &json!(3)));
    assert_eq!(
        body["messages"],
        json!([
            {"chatId": 2, "from": 5, "to": 1, "msg": "hello 1"},
            {"chatId": 3, "from": 1, "to": 5, "msg": "as one"},
        ])
    );
    let (_, body) = http_json(addr, "GET", "/users/5/history/1?after=0&limit=1", None).await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(body["messages"][0]["chatId"], json!(1));
    let (status, _) = http(addr, "GET", "/users/5/history/1?after=-1", None).await;
    assert_eq!(status, 400);
    one.no_msg().await;
    five.no_msg().await;

    five.close().await;
    await_online(addr, 5, false).await;
    assert!(online(addr, 1).await);
    one.close().await;
}

#[tokio::test]
async fn bad_logins_are_denied_and_closed() {
    let srv = start().await;
    const WRONG: &str = "unknown mid or wrong mkey";
    for (kind, login, reason) in [
        (Kind::WsJson, json!({"mid": 1, "mkey": "pw2"}), WRONG),
        (Kind::WsBinary, json!({"mid": 1, "mkey": "PW1"}), WRONG),
        (Kind::WsJson, json!({"mid": 99, "mkey": "pw1"}), WRONG),
        (
            Kind::WsBinary,
            json!({"mid": 1}),
            "mid and mkey are required",
        ),
    ] {
        let mut c = Client::connect_path(kind, srv.addr, "/sub").await;
        let (ret, body) = c.auth(login.clone()).await;
        assert_eq!(ret, -1, "{login} → {body}");
        assert_eq!(body["error"], json!(reason), "{login} → {body}");
        let closed = c.closed().await;
        assert!(matches!(closed, Closed::Ws(1008, _)), "{closed:?}");
    }
    assert!(!online(srv.addr, 1).await);
    // The right key still works afterwards.
    let mut c = Client::connect_path(Kind::WsJson, srv.addr, "/sub").await;
    let (ret, body) = c.auth(json!({"mid": 1, "mkey": "pw1"})).await;
    assert_eq!(ret, 0, "{body}");
    c.close().await;
}

#[tokio::test]
async fn a_database_failure_is_a_backend_error_not_a_denial() {
    let srv = start().await;
    srv.users
        .with_conn(|db| db.execute_batch("DROP TABLE users"))
        .await
        .unwrap();
    let mut c = Client::connect_path(Kind::WsJson, srv.addr, "/sub").await;
    let (ret, body) = c.auth(json!({"mid": 1, "mkey": "pw1"})).await;
    assert_eq!(ret, -1);
    assert_eq!(body["error"], json!("authentication backend unavailable"));
    assert!(matches!(c.closed().await, Closed::Ws(1008, _)));
    let (status, body) = http(
        srv.addr,
        "POST",
        "/users",
        Some(json!({"mid": 5, "password": "pw5"})),
    )
    .await;
    assert_eq!(status, 500, "{body}");
}

/// `POST /login` issues a session: its cookie (as a browser sends it with
/// the upgrade request) or its token as a bearer logs in with an empty op 7
/// body, and the login's extension (how it logged in) reaches the event
/// hook, which the application's own route shows.
#[tokio::test]
async fn a_rest_login_session_logs_websockets_in_by_cookie_or_bearer() {
    let srv = start().await;
    let addr = srv.addr;
    let (status, head, body) = http_full(
        addr,
        "POST",
        "/login",
        Some(json!({"mid": 1, "password": "pw1"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let token = body["token"].as_str().expect("a token").to_owned();
    assert_eq!((body["mid"].as_i64(), token.len()), (Some(1), 64));
    let set_cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no Set-Cookie in {head}"));
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    assert_eq!(cookie, format!("session={token}"));

    // The browser's way: the cookie, beside others, with the upgrade.
    let cookies = format!("theme=dark; {cookie}");
    let mut by_cookie =
        Client::connect_with_headers(Kind::WsJson, addr, "/sub", &[("cookie", &cookies)]).await;
    let (ret, reply) = by_cookie.auth(json!({})).await;
    assert_eq!((ret, &reply["mid"]), (0, &json!(1)), "{reply}");
    // Another client's way: the token as a bearer.
    let bearer = format!("Bearer {token}");
    let mut by_bearer =
        Client::connect_with_headers(Kind::WsBinary, addr, "/sub", &[("authorization", &bearer)])
            .await;
    let (ret, reply) = by_bearer.auth(json!({})).await;
    assert_eq!((ret, &reply["mid"]), (0, &json!(1)), "{reply}");
    // And the key in op 7, as before.
    let mut by_key = Client::connect_path(Kind::WsJson, addr, "/sub").await;
    let (ret, _) = by_key.auth(json!({"mid": 1, "mkey": "pw1"})).await;
    assert_eq!(ret, 0);
    // The hook saw each login's extension.
    let (_, online) = http_json(addr, "GET", "/users/1/online", None).await;
    assert_eq!(online["sessions"], json!(3), "{online}");
    assert_eq!(
        online["via"],
        json!(["bearer", "cookie", "key"]),
        "{online}"
    );
    // The session works like any other.
    let ack = by_bearer.send_msg(18, 1, 2, b"hi 2").await;
    assert_eq!(ack.ret, 0, "{ack:?}");
    by_cookie.close().await;
    within("hook sees the end", async {
        loop {
            let (_, online) = http_json(addr, "GET", "/users/1/online", None).await;
            if online["via"] == json!(["bearer", "key"]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // A token the application did not issue, a token naming another user
    // than the body, and a wrong password at the REST login: refused.
    let mut forged =
        Client::connect_with_headers(Kind::WsJson, addr, "/sub", &[("cookie", "session=0123")])
            .await;
    let (ret, reply) = forged.auth(json!({})).await;
    assert_eq!(ret, -1, "{reply}");
    assert_eq!(reply["error"], json!("unknown or expired session"));
    let mut other =
        Client::connect_with_headers(Kind::WsJson, addr, "/sub", &[("authorization", &bearer)])
            .await;
    let (ret, reply) = other.auth(json!({"mid": 2})).await;
    assert_eq!(ret, -1, "{reply}");
    let (status, _) = http(
        addr,
        "POST",
        "/login",
        Some(json!({"mid": 1, "password": "pw2"})),
    )
    .await;
    assert_eq!(status, 401);
    by_bearer.close().await;
    by_key.close().await;
}
