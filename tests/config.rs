//! The example server's configuration: the shipped file, large files, and
//! refusals that name the file, the key and the problem.

use std::fmt::Write as _;

use comet::server::{ServerConfig, DEFAULT_CONFIG};

#[test]
fn the_shipped_config_is_valid_and_as_documented() {
    let config = ServerConfig::parse(DEFAULT_CONFIG, "examples/chat_server.toml").unwrap();
    assert_eq!(config.server.tcp.unwrap().to_string(), "127.0.0.1:3101");
    assert_eq!(
        config.server.websocket.unwrap().to_string(),
        "127.0.0.1:3102"
    );
    assert_eq!(config.server.ws_path, "/sub");
    assert_eq!(config.server.max_body, 65536);
    assert!(config.users.len() >= 3);
    assert_eq!(config.groups[0].id, 100);
    let engine = config.engine_config();
    assert_eq!(engine.heartbeat_timeout.as_secs(), 90);
    assert_eq!(engine.handshake_timeout.as_secs(), 10);
}

#[test]
fn twenty_thousand_users_and_ten_thousand_member_groups_load() {
    let mut text = String::from("[server]\ntcp = \"127.0.0.1:0\"\n");
    for mid in 1..=20_000 {
        writeln!(text, "[[users]]\nmid = {mid}\nmkey = \"key-{mid}\"").unwrap();
    }
    for id in 1..=4 {
        let members: Vec<String> = (1..=10_000).map(|m| (m + id * 1000).to_string()).collect();
        writeln!(
            text,
            "[[groups]]\nid = {id}\nmembers = [{}]",
            members.join(", ")
        )
        .unwrap();
    }
    let path = std::env::temp_dir().join(format!("comet-big-{}.toml", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    let config = ServerConfig::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(config.users.len(), 20_000);
    assert_eq!(config.groups.len(), 4);
    let store = comet::server::Store::Memory(Default::default());
    let (comet, auth, groups) = comet::server::assemble(&config, &store);
    assert_eq!(auth.len(), 20_000);
    assert_eq!(groups.len(3), 10_000);
    assert_eq!(comet.session_count(), 0);
}

fn refused(text: &str) -> String {
    ServerConfig::parse(text, "bad.toml")
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_configs_are_refused_with_file_key_and_problem() {
    let ok_server = "[server]\ntcp = \"127.0.0.1:0\"\n";
    let cases: &[(String, &[&str])] = &[
        (
            format!("{ok_server}tcpp = 1\n"),
            &["bad.toml", "server.tcpp", "line 3", "unknown field `tcpp`"],
        ),
        (
            "[server]\ntcp = \"localhost\"\n".into(),
            &["bad.toml", "server.tcp", "line 2", "socket address"],
        ),
        (
            format!("{ok_server}max_body = \"big\"\n"),
            &["bad.toml", "server.max_body", "line 3", "expected usize"],
        ),
        (
            format!("{ok_server}max_body = 10\n"),
            &["bad.toml", "server.max_body", "between"],
        ),
        (
            "[server]\nws_path = \"/sub\"\n".into(),
            &["server", "at least one"],
        ),
        (
            format!("{ok_server}ws_path = \"sub\"\n"),
            &["server.ws_path", "'/'"],
        ),
        (
            format!("{ok_server}heartbeat_timeout_ms = 0\n"),
            &["server.heartbeat_timeout_ms"],
        ),
        (
            format!(
                "{ok_server}[[users]]\nmid = 1\nmkey = \"a\"\n[[users]]\nmid = 1\nmkey = \"b\"\n"
            ),
            &["users[1].mid", "listed twice"],
        ),
        (
            format!("{ok_server}[[users]]\nmid = -3\nmkey = \"a\"\n"),
            &["users[0].mid", "positive"],
        ),
        (
            format!("{ok_server}[[users]]\nmid = 3\nmkey = \"\"\n"),
            &["users[0].mkey", "empty"],
        ),
        (
            format!("{ok_server}[[users]]\nmid = 3\n"),
            &["bad.toml", "users", "missing field `mkey`"],
        ),
        (
            format!("{ok_server}[[groups]]\nid = 7\nmembers = [1, 0, 2]\n"),
            &["groups[0].members[1]", "positive"],
        ),
        ("no = [valid\n".into(), &["bad.toml", "line 1"]),
        ("".into(), &["missing field `server`"]),
    ];
    for (text, wants) in cases {
        let message = refused(text);
        for want in *wants {
            assert!(
                message.contains(want),
                "{text:?} gave {message:?}, wanted {want:?}"
            );
        }
    }
    let missing = ServerConfig::load("/nonexistent/comet.toml")
        .unwrap_err()
        .to_string();
    assert!(missing.contains("/nonexistent/comet.toml"), "{missing}");
}

#[tokio::test]
async fn a_taken_port_fails_the_start_and_leaves_nothing_listening() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = format!(
        "[server]\ntcp = \"{free}\"\nwebsocket = \"{}\"\n",
        taken.local_addr().unwrap()
    );
    let mut config = ServerConfig::parse(&text, "ports.toml").unwrap();
    config.store.backend = comet::server::StoreBackend::Memory;
    let err = comet::server::start(config).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    // The TCP listener that was bound first is gone again: its port is free.
    std::net::TcpListener::bind(free).expect("the tcp port was released");
}
