//! The example server's configuration: the shipped file, large files, and
//! refusals that name the file, the key and the problem.

use std::fmt::Write as _;

use comet::server::{FsyncMode, ServerConfig, StoreBackend, DEFAULT_CONFIG};

#[test]
fn the_shipped_config_is_valid_and_as_documented() {
    let config = ServerConfig::parse(DEFAULT_CONFIG, "examples/chat_server.toml").unwrap();
    assert_eq!(config.server.tcp.unwrap().to_string(), "127.0.0.1:3101");
    assert_eq!(
        config.server.websocket.unwrap().to_string(),
        "127.0.0.1:3102"
    );
    assert_eq!(config.server.ws_path, "/sub");
    assert_eq!(config.server.engine.max_body, 65536);
    assert!(config.users.len() >= 3);
    assert_eq!(config.groups[0].id, 100);
    let engine = config.engine_config();
    assert_eq!(engine.heartbeat_timeout.as_secs(), 90);
    assert_eq!(engine.handshake_timeout.as_secs(), 10);
    assert_eq!(engine.sync_limit, 100);
    // Durable by default, in ./comet-data.
    let store = &config.store;
    assert_eq!(store.backend, StoreBackend::Embedded);
    assert_eq!(store.path, std::path::Path::new("comet-data"));
    assert_eq!(store.fsync, FsyncMode::Interval);
    assert_eq!(store.fsync_interval_ms, 1000);
    assert_eq!((store.history_limit, store.inbox_limit), (1000, 1000));
    assert_eq!((store.history_bytes, store.inbox_bytes), (4 << 20, 4 << 20));
    // The admin API on loopback, open (no token) there.
    let admin = config.admin.as_ref().expect("[admin] is shipped");
    assert_eq!(admin.listen.to_string(), "127.0.0.1:3103");
    assert!(admin.token.is_none());
}

#[test]
fn an_absent_store_table_means_the_documented_defaults() {
    let config = ServerConfig::parse("[server]\ntcp = \"127.0.0.1:0\"\n", "t.toml").unwrap();
    let shipped = ServerConfig::parse(DEFAULT_CONFIG, "examples/chat_server.toml").unwrap();
    let (a, b) = (&config.store, &shipped.store);
    assert_eq!(a.backend, b.backend);
    assert_eq!(a.path, b.path);
    assert_eq!(a.fsync, b.fsync);
    assert_eq!(a.fsync_interval_ms, b.fsync_interval_ms);
    assert_eq!(
        (a.history_limit, a.history_bytes),
        (b.history_limit, b.history_bytes)
    );
    assert_eq!(
        (a.inbox_limit, a.inbox_bytes),
        (b.inbox_limit, b.inbox_bytes)
    );
    assert_eq!(config.server.engine.sync_limit, 100);
    let always = ServerConfig::parse(
        "[server]\ntcp = \"127.0.0.1:0\"\nsync_limit = 7\n[store]\nbackend = \"memory\"\nfsync = \"always\"\n",
        "t.toml",
    )
    .unwrap();
    assert_eq!(always.store.backend, StoreBackend::Memory);
    assert_eq!(always.store.fsync, FsyncMode::Always);
    assert_eq!(always.engine_config().sync_limit, 7);
}

#[tokio::test]
async fn a_foreign_file_in_the_store_path_stops_the_start_and_stays_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(comet::plugins::embedded::DB_FILE);
    std::fs::write(&file, b"my notes, not a database").unwrap();
    let text = format!(
        "[server]\ntcp = \"127.0.0.1:0\"\n[store]\npath = {:?}\n",
        dir.path().display().to_string()
    );
    let config = ServerConfig::parse(&text, "store.toml").unwrap();
    let err = comet::server::start(config).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("not a comet store"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"my notes, not a database");
}

#[tokio::test]
async fn the_embedded_backend_keeps_messages_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ntcp = \"127.0.0.1:0\"\n[store]\npath = {:?}\n",
        dir.path().display().to_string()
    );
    let config = ServerConfig::parse(&text, "store.toml").unwrap();
    let running = comet::server::start(config.clone()).await.unwrap();
    let store = running.store.as_dyn();
    let chat = comet::core::Conversation::Group(5);
    let draft = comet::core::Draft {
        conversation: chat,
        op: 20,
        from: 1,
        to: 5,
        msg: "kept".into(),
    };
    assert_eq!(store.append(draft).await.unwrap().chat_id(), 1);
    drop(store);
    assert!(running.shutdown().await);
    let running = comet::server::start(config).await.unwrap();
    let comet::server::Store::Embedded(store) = &running.store else {
        panic!("embedded backend expected");
    };
    assert_eq!(store.opened().messages, 1);
    let page = running.store.as_dyn().history(chat, 0, 10).await.unwrap();
    assert_eq!(page.head, 1);
    assert_eq!(&page.messages[0].delivered().msg[..], b"kept");
    assert!(running.shutdown().await);
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
            format!("{ok_server}proxy_protocol_from = [\"10.0.0.0/8\", \"lb.internal\"]\n"),
            &["server.proxy_protocol_from", "lb.internal", "CIDR"],
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
        (
            format!("{ok_server}[store]\nbackend = \"mongodb\"\n"),
            &["bad.toml", "store.backend", "unknown variant `mongodb`"],
        ),
        (
            format!("{ok_server}[store]\nbackend = \"redis\"\nurl = \"http://127.0.0.1:6379/\"\n"),
            &["bad.toml", "store.url", "redis:// or rediss:// URL"],
        ),
        (
            format!("{ok_server}[store]\nbackend = \"redis\"\ntls_ca_file = \"ca.pem\"\n"),
            &["bad.toml", "store.tls_ca_file", "needs a rediss://"],
        ),
        (
            format!("{ok_server}[store]\nbackend = \"redis\"\n[cluster]\nnode_id = \"a b\"\n"),
            &["bad.toml", "cluster.node_id", "without spaces"],
        ),
        (
            format!("{ok_server}[store]\nbackend = \"redis\"\n[cluster]\nnode_ttl_ms = 100\n"),
            &["bad.toml", "cluster.node_ttl_ms", "at least 300"],
        ),
        (
            format!("{ok_server}[cluster]\nnode = \"a\"\n"),
            &["bad.toml", "cluster", "unknown field `node`"],
        ),
        (
            format!("{ok_server}[store]\nfsync = \"sometimes\"\n"),
            &["store.fsync", "unknown variant `sometimes`"],
        ),
        (
            format!("{ok_server}[store]\nfsync_interval_ms = 0\n"),
            &["store.fsync_interval_ms", "greater than 0"],
        ),
        (
            format!("{ok_server}[store]\npath = \"\"\n"),
            &["store.path", "empty"],
        ),
        (
            format!("{ok_server}sync_limit = 0\n"),
            &["server.sync_limit", "greater than 0"],
        ),
        (
            format!("{ok_server}[store]\nhistory = 5\n"),
            &["store.history", "unknown field `history`"],
        ),
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
