//! The admin and push HTTP API (issue 13 part 2) over real sockets: the
//! example server with `[admin]` on a free loopback port, a hand-written
//! HTTP/1.1 client, and the independent protocol client of `common::raw`
//! as the receiving end.
//!
//! The test server has users 1..=9 (mkey "k{mid}"), group 100 = {1, 2, 3}
//! and group 200 = {1..=9}.

mod common;

use std::net::SocketAddr;

use base64::Engine as _;
use comet::server::{AdminSection, Running};
use common::raw::{Client, Closed, Kind};
use serde_json::{json, Value};

const TOKEN: &str = "test-token-4f2a";

async fn start() -> (Running, SocketAddr) {
    let running = common::server::start_edit(|config| {
        config.admin = Some(AdminSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: Some(TOKEN.into()),
        });
    })
    .await;
    let admin = running.admin_addr.expect("admin listener bound");
    (running, admin)
}

use common::http::{http, Answer};

async fn api(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Answer {
    let body = body.map(|b| b.to_string());
    http(addr, method, path, Some(TOKEN), body.as_deref()).await
}

async fn login(running: &Running, kind: Kind, mid: i32) -> Client {
    let addr = match kind {
        Kind::Tcp => running.tcp_addr.unwrap(),
        _ => running.ws_addr.unwrap(),
    };
    Client::login(kind, addr, mid, &format!("k{mid}")).await
}

#[tokio::test]
async fn an_admin_send_is_stored_and_delivered_with_its_chat_id() {
    let (running, admin) = start().await;
    let mut tcp = login(&running, Kind::Tcp, 2).await;
    let mut web = login(&running, Kind::WsJson, 2).await;

    let a = api(
        admin,
        "POST",
        "/api/send/user",
        Some(json!({"from": 1, "to": 2, "msg": "hello from the backend"})),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let body = a.json();
    assert_eq!(body["ret"], 0);
    let chat_id = body["chatId"].as_i64().expect("chatId");
    assert!(chat_id >= 1);
    for c in [&mut tcp, &mut web] {
        let m = c.msg().await;
        assert_eq!(
            (m.op, m.chat_id, m.from, m.to),
            (18, chat_id, 1, 2),
            "delivered as op 18"
        );
        assert_eq!(m.msg, b"hello from the backend");
    }

    // Bytes that are not UTF-8 travel as base64, both ways.
    let bytes = [0xffu8, 0x00, 0xfe];
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let a = api(
        admin,
        "POST",
        "/api/send/user",
        Some(json!({"from": 1, "to": 2, "msg": b64, "enc": "base64"})),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.json()["chatId"],
        chat_id + 1,
        "the conversation's next chatId"
    );
    assert_eq!(tcp.msg().await.msg, bytes);
    assert_eq!(web.msg().await.msg, bytes);

    // The history read gives both back, the second in base64.
    let a = api(admin, "GET", "/api/history/user/2/1?after=0", None).await;
    assert_eq!(a.status, 200, "{a:?}");
    let page = a.json();
    assert_eq!(page["head"], chat_id + 1);
    let msgs = page["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["msg"], "hello from the backend");
    assert!(msgs[0].get("enc").is_none());
    assert_eq!(msgs[1]["enc"], "base64");
    assert_eq!(msgs[1]["msg"], b64);
    let a = api(admin, "GET", "/api/history/user/1/2?after=1&limit=5", None).await;
    assert_eq!(a.json()["messages"].as_array().unwrap().len(), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn group_sends_follow_op_20_rules_unless_sent_as_system() {
    let (running, admin) = start().await;
    let mut member = login(&running, Kind::WsBinary, 3).await;
    let mut outsider = login(&running, Kind::Tcp, 4).await;

    // On behalf of a member: stored, delivered to the other members.
    let a = api(
        admin,
        "POST",
        "/api/send/group",
        Some(json!({"from": 1, "group": 100, "msg": "members only"})),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let first = a.json()["chatId"].as_i64().unwrap();
    let m = member.msg().await;
    assert_eq!((m.op, m.chat_id, m.from, m.to), (20, first, 1, 100));

    // On behalf of a non-member: refused exactly as op 20 would be.
    let a = api(
        admin,
        "POST",
        "/api/send/group",
        Some(json!({"from": 4, "group": 100, "msg": "let me in"})),
    )
    .await;
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.json()["ret"], -1);
    assert!(a.json()["error"].as_str().unwrap().contains("not a member"));

    // As a trusted system sender the check is skipped.
    let a = api(
        admin,
        "POST",
        "/api/send/group",
        Some(json!({"from": 4, "group": 100, "msg": "announcement", "system": true})),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["chatId"], first + 1);
    let m = member.msg().await;
    assert_eq!(
        (m.chat_id, m.from, m.msg.as_slice()),
        (first + 1, 4, &b"announcement"[..])
    );
    // The sender's own sessions get the echo, as for op 20.
    assert_eq!(outsider.msg().await.chat_id, first + 1);
    outsider.no_msg().await;

    // Membership changes go through the directory, and count at once.
    let a = api(admin, "PUT", "/api/groups/100/members/4", None).await;
    assert_eq!((a.status, a.json()["changed"].clone()), (200, json!(true)));
    let a = api(admin, "GET", "/api/groups/100/members", None).await;
    assert_eq!(a.json()["members"], json!([1, 2, 3, 4]));
    let a = api(
        admin,
        "POST",
        "/api/send/group",
        Some(json!({"from": 1, "group": 100, "msg": "welcome"})),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(outsider.msg().await.msg, b"welcome");
    assert_eq!(member.msg().await.msg, b"welcome");
    let a = api(admin, "DELETE", "/api/groups/100/members/4", None).await;
    assert_eq!((a.status, a.json()["changed"].clone()), (200, json!(true)));
    let a = api(admin, "DELETE", "/api/groups/100/members/4", None).await;
    assert_eq!(a.json()["changed"], false);

    let a = api(admin, "GET", "/api/history/group/100?limit=2", None).await;
    let msgs = a.json()["messages"].as_array().unwrap().clone();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1]["msg"], "announcement");

    // Several users at once: one outcome per mid, in order.
    let a = api(
        admin,
        "POST",
        "/api/send/users",
        Some(json!({"from": 1, "to": [3, 999, 4], "msg": "each"})),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let results = a.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["ret"], 0);
    assert_eq!(results[1]["ret"], -1);
    assert_eq!(results[2]["ret"], 0);
    assert_eq!(member.msg().await.msg, b"each");
    assert_eq!(outsider.msg().await.msg, b"each");
    running.shutdown().await;
}

#[tokio::test]
async fn errors_have_the_right_status_and_shape() {
    let (running, admin) = start().await;
    let send = |body: Value| api(admin, "POST", "/api/send/user", Some(body));

    // No token, a wrong one, a token of another length: 401.
    for token in [None, Some("test-token-4f2b"), Some("x")] {
        let a = http(admin, "GET", "/api/online", token, None).await;
        assert_eq!(a.status, 401, "{a:?}");
        assert_eq!(
            a.json(),
            json!({"ret": -1, "error": "missing or wrong bearer token"})
        );
        assert!(a
            .headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"));
    }
    // Health needs none.
    assert_eq!(http(admin, "GET", "/healthz", None, None).await.status, 200);
    assert_eq!(http(admin, "GET", "/readyz", None, None).await.status, 200);

    let a = send(json!({"from": 1, "to": 404, "msg": "hi"})).await;
    assert_eq!(a.status, 404, "{a:?}");
    assert_eq!(a.json(), json!({"ret": -1, "error": "unknown user 404"}));

    // The message limit is max_body - 32 (65,504 bytes by default).
    let a = send(json!({"from": 1, "to": 2, "msg": "x".repeat(65_505)})).await;
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(a.json()["ret"], -1);
    // A body far past any message is refused before it is read.
    let a = send(json!({"from": 1, "to": 2, "msg": "x".repeat(400_000)})).await;
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(a.json()["ret"], -1);

    for (body, why) in [
        (json!({"from": 1, "to": 2}), "missing msg"),
        (json!({"from": 1, "to": 2, "msg": ""}), "empty"),
        (json!({"from": 1, "to": 0, "msg": "x"}), "bad recipient"),
        (
            json!({"from": 1, "to": 2, "msg": "!!", "enc": "base64"}),
            "bad base64",
        ),
        (
            json!({"from": 1, "to": 2, "msg": "x", "enc": "rot13"}),
            "unknown enc",
        ),
        (
            json!({"from": 1, "to": 2, "msg": "x", "extra": 1}),
            "unknown field",
        ),
    ] {
        let a = send(body).await;
        assert_eq!(a.status, 400, "{why}: {a:?}");
        assert_eq!(a.json()["ret"], -1, "{why}");
    }
    let a = http(
        admin,
        "POST",
        "/api/send/user",
        Some(TOKEN),
        Some("{not json"),
    )
    .await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.json()["ret"], -1);

    for path in [
        "/api/users/abc",
        "/api/history/user/1/2?after=x",
        "/api/history/user/1/2?after=-1",
        "/api/history/group/0",
    ] {
        let a = api(admin, "GET", path, None).await;
        assert_eq!(a.status, 400, "{path}: {a:?}");
        assert_eq!(a.json()["ret"], -1, "{path}");
    }

    let a = api(admin, "GET", "/api/no/such/route", None).await;
    assert_eq!(a.status, 404, "{a:?}");
    assert_eq!(a.json()["ret"], -1);
    running.shutdown().await;
}

#[tokio::test]
async fn presence_and_kick() {
    let (running, admin) = start().await;
    let a = api(admin, "GET", "/api/users/5", None).await;
    assert_eq!(
        a.json(),
        json!({"ret": 0, "mid": 5, "online": false, "sessions": 0})
    );

    let mut one = login(&running, Kind::Tcp, 5).await;
    let mut two = login(&running, Kind::WsJson, 5).await;
    let a = api(admin, "GET", "/api/users/5", None).await;
    assert_eq!(
        a.json(),
        json!({"ret": 0, "mid": 5, "online": true, "sessions": 2})
    );
    let a = api(admin, "GET", "/api/online", None).await;
    let body = a.json();
    assert_eq!(body["users"], json!([5]));
    assert_eq!(body["sessions"], 2);
    // A single node: no cluster totals, no node list.
    assert!(body.get("cluster").is_none(), "{body}");
    let a = api(admin, "GET", "/api/nodes", None).await;
    assert_eq!(a.status, 404, "{a:?}");
    assert_eq!(
        a.json(),
        json!({"ret": -1, "error": "not a cluster: this comet runs on its own"})
    );

    let a = api(admin, "POST", "/api/users/5/kick", None).await;
    assert_eq!(a.json(), json!({"ret": 0, "closed": 2}));
    assert_eq!(one.closed().await, Closed::Eof);
    assert!(matches!(two.closed().await, Closed::Ws(1000, _)));
    running.shutdown().await;
}

/// Every documented series shows up after real traffic, with the values the
/// traffic implies.
#[tokio::test]
async fn metrics_show_the_documented_series_after_real_traffic() {
    let (running, admin) = start().await;
    let mut a = login(&running, Kind::Tcp, 6).await;
    let mut b = login(&running, Kind::WsJson, 7).await;
    let ack = a.send_msg(18, 6, 7, b"ping").await;
    assert_eq!(ack.ret, 0);
    assert_eq!(b.msg().await.msg, b"ping");
    let ack = a.send_msg(18, 6, 404, b"nobody").await;
    assert_eq!(ack.ret, -1);
    // A refused login.
    let mut bad = Client::connect(Kind::Tcp, running.tcp_addr.unwrap()).await;
    let (ret, _) = bad.auth(json!({"mid": 8, "mkey": "wrong"})).await;
    assert_ne!(ret, 0);

    let m = http(admin, "GET", "/metrics", None, None).await;
    assert_eq!(m.status, 200);
    assert!(m.headers.contains("text/plain"), "{}", m.headers);
    let text = m.body;
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    // Other tests of this binary share the process's recorder: at least.
    assert!(value("comet_deliveries_total") >= 1.0);
    assert!(value(r#"comet_sends_total{result="accepted",reason="ok"}"#) >= 1.0);
    assert!(value(r#"comet_sends_total{result="refused",reason="unknown_user"}"#) >= 1.0);
    assert!(value(r#"comet_logins_total{result="accepted"}"#) >= 2.0);
    assert!(value(r#"comet_logins_total{result="refused"}"#) >= 1.0);
    assert!(value(r#"comet_frames_in_total{op="18"}"#) >= 2.0);
    assert!(value(r#"comet_frames_out_total{op="19"}"#) >= 2.0);
    assert!(value(r#"comet_frames_out_total{op="9"}"#) >= 1.0);
    assert!(value(r#"comet_sessions{transport="tcp",mode="binary"}"#) >= 1.0);
    assert!(value(r#"comet_sessions{transport="websocket",mode="json"}"#) >= 1.0);
    assert!(value(r#"comet_connections{transport="tcp",mode="binary"}"#) >= 1.0);
    assert!(value(r#"comet_closes_total{cause="auth_failed"}"#) >= 1.0);
    assert!(value(r#"comet_plugin_call_seconds_count{plugin="store"}"#) >= 1.0);
    assert!(value(r#"comet_batch_messages_count"#) >= 1.0);
    assert!(value("comet_process_resident_memory_bytes") > 1_000_000.0);
    assert!(value("comet_process_open_fds") >= 3.0);
    for series in [
        "comet_outbound_queued_bytes",
        r#"comet_plugin_errors_total{plugin="store",kind="timeout"}"#,
        r#"comet_closes_total{cause="slow_consumer"}"#,
        r#"comet_syncs_total{result="ok"}"#,
        "comet_replayed_messages_total",
        "comet_panics_total",
        r#"comet_connections_refused_total{reason="per_ip"}"#,
    ] {
        value(series);
    }
    assert!(text.contains("# TYPE comet_plugin_call_seconds histogram"));
    assert!(text.contains("# TYPE comet_batch_messages histogram"));
    running.shutdown().await;
}

/// The document served is the one generated from the handlers, it lists
/// every route, and it matches the checked-in `docs/admin-openapi.json`
/// (regenerate with `COMET_BLESS=1 cargo test --test admin`).
#[tokio::test]
async fn openapi_document_is_served_complete_and_checked_in() {
    let (running, admin) = start().await;
    let a = api(admin, "GET", "/api/openapi.json", None).await;
    assert_eq!(a.status, 200);
    let served = a.json();
    let generated: Value = serde_json::from_str(
        &comet::transports::admin::openapi()
            .to_pretty_json()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(served, generated);
    let paths = served["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/send/user", "post"),
        ("/api/send/users", "post"),
        ("/api/send/group", "post"),
        ("/api/online", "get"),
        ("/api/users/{mid}", "get"),
        ("/api/users/{mid}/kick", "post"),
        ("/api/history/user/{a}/{b}", "get"),
        ("/api/history/group/{group}", "get"),
        ("/api/groups/{group}/members", "get"),
        ("/api/groups/{group}/members/{mid}", "put"),
        ("/api/groups/{group}/members/{mid}", "delete"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    assert_eq!(
        served["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin-openapi.json");
    let pretty = serde_json::to_string_pretty(&served).unwrap() + "\n";
    if std::env::var_os("COMET_BLESS").is_some() {
        std::fs::write(&file, &pretty).unwrap();
    }
    let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        checked_in == pretty,
        "docs/admin-openapi.json is out of date: rerun with COMET_BLESS=1"
    );
    running.shutdown().await;
}

/// `chat_server` refuses an admin listener on a non-loopback address
/// without a token, naming the key; with a token, or on loopback, it is
/// accepted.
#[test]
fn a_public_admin_listener_needs_a_token() {
    use comet::server::ServerConfig;
    let base = "[server]\ntcp = \"127.0.0.1:0\"\n[admin]\n";
    let err =
        ServerConfig::parse(&format!("{base}listen = \"0.0.0.0:3103\"\n"), "t.toml").unwrap_err();
    assert_eq!(err.key, "admin.token");
    assert!(err.problem.contains("loopback"), "{err}");
    let err = ServerConfig::parse(&format!("{base}token = \"\"\n"), "t.toml").unwrap_err();
    assert_eq!(err.key, "admin.token");
    for ok in [
        format!("{base}listen = \"0.0.0.0:3103\"\ntoken = \"t\"\n"),
        format!("{base}listen = \"[::1]:3103\"\n"),
        base.to_owned(),
    ] {
        let config = ServerConfig::parse(&ok, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(config.admin.is_some());
    }
}
