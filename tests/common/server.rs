//! The example server's assembly on free loopback ports.

use comet::server::{self, Running, ServerConfig};

/// A memory-backed config on port 0, with `tweak` applied to the `[server]`
/// table (e.g. short timeouts); users 1..=9 have mkey "k{mid}", group 100 is
/// {1, 2, 3}, group 200 is {1..=9}.
pub async fn start_with(tweak: impl FnOnce(&mut comet::server::ServerSection)) -> Running {
    start_edit(|config| tweak(&mut config.server)).await
}

/// As [`start_with`], with `edit` applied to the whole configuration (the
/// `[store]` table, say).
pub async fn start_edit(edit: impl FnOnce(&mut ServerConfig)) -> Running {
    let mut text = String::from("[server]\ntcp = \"127.0.0.1:0\"\nwebsocket = \"127.0.0.1:0\"\n");
    // Tests that care about durability start their own store.
    text.push_str("[store]\nbackend = \"memory\"\n");
    for mid in 1..=9 {
        text.push_str(&format!("[[users]]\nmid = {mid}\nmkey = \"k{mid}\"\n"));
    }
    text.push_str("[[groups]]\nid = 100\nmembers = [1, 2, 3]\n");
    text.push_str("[[groups]]\nid = 200\nmembers = [1, 2, 3, 4, 5, 6, 7, 8, 9]\n");
    let mut config = ServerConfig::parse(&text, "test.toml").expect("test config");
    edit(&mut config);
    server::start(config).await.expect("server starts")
}

pub async fn start() -> Running {
    start_with(|_| {}).await
}

/// A server from the shipped defaults, on port 0, with no users or groups
/// except those `edit` adds.
pub async fn start_config(edit: impl FnOnce(&mut ServerConfig)) -> Running {
    let text = "[server]\ntcp = \"127.0.0.1:0\"\nwebsocket = \"127.0.0.1:0\"\n[store]\nbackend = \"memory\"\n";
    let mut config = ServerConfig::parse(text, "test.toml").expect("test config");
    edit(&mut config);
    server::start(config).await.expect("server starts")
}
