//! A ready server on the default plug-ins, configured from TOML: the
//! assembly behind `examples/chat_server.rs`, reusable by applications and
//! tests. Its WebSocket listeners also serve the web chat client
//! ([`crate::web`]) at `GET /`, beside the endpoint it connects to.
//!
//! ```toml
//! [server]
//! tcp = "127.0.0.1:3101"
//! websocket = "127.0.0.1:3102"
//! ws_path = "/sub"
//! handshake_timeout_ms = 10000
//! heartbeat_timeout_ms = 90000
//! max_body = 65536
//! sync_limit = 100
//!
//! [store]
//! backend = "embedded"      # or "memory", or "redis" (cluster mode)
//! url = "redis://127.0.0.1:6379/"  # backend = "redis" only
//! path = "comet-data"       # a directory, created if missing
//! fsync = "interval"        # or "always"
//! fsync_interval_ms = 1000
//! history_limit = 1000      # messages per conversation
//! history_bytes = 4194304   # message bytes per conversation
//! inbox_limit = 1000        # messages per offline user
//! inbox_bytes = 4194304     # message bytes per offline user
//!
//! [admin]                   # absent: no admin API
//! listen = "127.0.0.1:3103"
//! token = "s3cret"          # needed on a non-loopback address
//!
//! [cluster]                 # backend = "redis" only
//! node_id = "node-a"        # unique per node; default: host and ports
//!
//! [[users]]
//! mid = 1
//! mkey = "k1"
//!
//! [[groups]]
//! id = 100
//! members = [1, 2, 3]
//! ```
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = comet::server::ServerConfig::load("chat.toml")?;
//! let running = comet::server::start(config).await?;
//! println!("tcp on {:?}", running.tcp_addr);
//! running.comet.shutdown_requested().await;
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use comet_core::middleware::FrameRateLimitLayer;
use comet_core::{Comet, Config, MessageStore};
use comet_plugins::embedded::{EmbeddedConfig, EmbeddedStore, Fsync};
use comet_plugins::memory::{MemoryAuth, MemoryGroups, MemoryLimits, MemoryStore};
use comet_plugins::redis::{RedisCluster, RedisOptions, RedisStore};
use comet_transports::{admin, tcp, tls, ws, Limits, TrustedProxies};
use futures_util::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listeners and limits.
    pub server: ServerSection,
    /// The message store (default: embedded, in `comet-data`).
    #[serde(default)]
    pub store: StoreSection,
    /// Cluster mode settings (used with `store.backend = "redis"`).
    #[serde(default)]
    pub cluster: ClusterSection,
    /// Users and their keys (for the in-memory authenticator).
    #[serde(default)]
    pub users: Vec<UserEntry>,
    /// Groups and their members.
    #[serde(default)]
    pub groups: Vec<GroupEntry>,
    /// The admin and push HTTP API; absent: not served.
    #[serde(default)]
    pub admin: Option<AdminSection>,
}

/// The `[admin]` table: where the admin and push HTTP API
/// ([`comet_transports::admin`]) listens, and its token.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Listen address (default `127.0.0.1:3103`). A non-loopback address
    /// needs a `token`.
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
    /// The bearer token `/api/` requires (`Authorization: Bearer ...`);
    /// absent: `/api/` is open, allowed on a loopback address only.
    #[serde(default)]
    pub token: Option<String>,
}

impl Default for AdminSection {
    /// `127.0.0.1:3103`, no token.
    fn default() -> Self {
        AdminSection {
            listen: defaults::admin_listen(),
            token: None,
        }
    }
}

/// The `[server]` table: listeners, connection limits, and the engine's
/// [`Config`] (`engine`) as keys of the same table.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ServerSection {
    /// TCP listen address (binary frames); absent: no TCP listener.
    #[serde(default)]
    pub tcp: Option<SocketAddr>,
    /// WebSocket listen address; absent: no WebSocket listener.
    #[serde(default)]
    pub websocket: Option<SocketAddr>,
    /// WebSocket path (default `/sub`).
    #[serde(default = "defaults::ws_path")]
    pub ws_path: String,
    /// Connections at once, all listeners together (default 100,000).
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// TCP+TLS listen address (needs `tls_cert` and `tls_key`).
    #[serde(default)]
    pub tcp_tls: Option<SocketAddr>,
    /// WSS listen address (needs `tls_cert` and `tls_key`).
    #[serde(default)]
    pub websocket_tls: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listeners.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listeners.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Connections at once from one source IP address (default 10,000:
    /// carrier-grade NAT puts many users behind one address).
    #[serde(default = "defaults::max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Frames per second a connection may send on average before it is
    /// closed (default 1,000; 0 turns the limit off).
    #[serde(default = "defaults::max_frames_per_sec")]
    pub max_frames_per_sec: u32,
    /// Frames a connection may send in one burst (default 2,000).
    #[serde(default = "defaults::frame_burst")]
    pub frame_burst: u32,
    /// Connections at once that have not authenticated yet, all listeners
    /// together (default 10,000).
    #[serde(default = "defaults::max_unauthenticated")]
    pub max_unauthenticated: usize,
    /// IPv6 peers count against `max_connections_per_ip` per prefix of
    /// this many bits (default 64; 128: per address).
    #[serde(default = "defaults::ipv6_prefix_len")]
    pub ipv6_prefix_len: u8,
    /// Proxies (addresses or CIDR networks) whose connections, on every
    /// listener, start with a PROXY protocol v1/v2 header naming the client
    /// (default none). Connections from other peers are never read as one.
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
    /// The engine's settings, as keys of this same table
    /// (`handshake_timeout_ms`, `heartbeat_timeout_ms`, `max_body`,
    /// `max_auth_body`, `max_outbound_bytes`, `hook_timeout_ms`,
    /// `shutdown_timeout_ms`, `max_sessions_per_mid`, `sync_limit`): the
    /// engine's own [`Config`], read by its `Deserialize`.
    #[serde(flatten)]
    pub engine: Config,
    /// Keys neither the table nor the engine knows; [`ServerConfig::parse`]
    /// refuses the file when there is one. (`deny_unknown_fields` does not
    /// work beside `flatten`.)
    #[serde(flatten, skip_serializing)]
    unknown: std::collections::BTreeMap<String, toml::Value>,
}

/// Which message store the server runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// [`EmbeddedStore`]: on disk in `path`, crash-safe (the default).
    #[default]
    Embedded,
    /// [`MemoryStore`]: lost at exit.
    Memory,
    /// Cluster mode: history, inboxes, groups and presence in the Redis at
    /// `url`, shared by every node ([`RedisCluster`]).
    Redis,
}

/// The `[cluster]` table (with `store.backend = "redis"`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's id, unique in the cluster. Default: derived from the
    /// host name and the listening ports (logged at startup).
    pub node_id: Option<String>,
    /// Prefix of the cluster's Redis keys and channels (default `comet:`).
    pub prefix: Option<String>,
    /// Most bytes of its feed the node reads ahead of delivering them
    /// (default 16 MiB, [`RedisOptions::feed_budget`]).
    pub feed_budget: Option<u64>,
    /// Milliseconds a node counts as alive after its last heartbeat
    /// (default 10,000, at least 300; [`RedisOptions::node_ttl`]).
    pub node_ttl_ms: Option<u64>,
}

/// When the embedded store fsyncs (see [`Fsync`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// Acknowledge once written to the OS; fsync within `fsync_interval_ms`.
    #[default]
    Interval,
    /// Acknowledge once fsynced (concurrent sends share one fsync).
    Always,
}

/// The `[store]` table.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `"embedded"` (default) or `"memory"`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// The embedded store's directory, created if missing (default
    /// `comet-data`, relative to the working directory).
    #[serde(default = "defaults::store_path")]
    pub path: PathBuf,
    /// `"interval"` (default) or `"always"`.
    #[serde(default)]
    pub fsync: FsyncMode,
    /// The longest wait for an fsync in `"interval"` mode (default 1,000 ms).
    #[serde(default = "defaults::fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// Messages kept per conversation (default 1,000).
    #[serde(default = "defaults::history_limit")]
    pub history_limit: usize,
    /// Message bytes kept per conversation (default 4 MiB).
    #[serde(default = "defaults::store_bytes")]
    pub history_bytes: usize,
    /// Offline messages kept per user (default 1,000).
    #[serde(default = "defaults::inbox_limit")]
    pub inbox_limit: usize,
    /// Offline message bytes kept per user (default 4 MiB).
    #[serde(default = "defaults::store_bytes")]
    pub inbox_bytes: usize,
    /// The Redis of `backend = "redis"` (default
    /// `redis://127.0.0.1:6379/`; `rediss://` for TLS,
    /// `redis://user:password@…` for a Redis that asks for a password).
    #[serde(default = "defaults::redis_url")]
    pub url: String,
    /// For a `rediss://` URL: the PEM file of the CA that signed Redis's
    /// certificate (default: none, the system's root certificates).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// For a `rediss://` Redis that asks clients for a certificate: this
    /// node's certificate chain (PEM file; default: none). Needs
    /// `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM file) of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for StoreSection {
    /// The embedded store in `comet-data` with the documented defaults.
    fn default() -> Self {
        StoreSection {
            backend: StoreBackend::default(),
            path: defaults::store_path(),
            fsync: FsyncMode::default(),
            fsync_interval_ms: defaults::fsync_interval_ms(),
            history_limit: defaults::history_limit(),
            history_bytes: defaults::store_bytes(),
            inbox_limit: defaults::inbox_limit(),
            inbox_bytes: defaults::store_bytes(),
            url: defaults::redis_url(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl StoreSection {
    /// The embedded store's settings this table asks for.
    pub fn embedded_config(&self) -> EmbeddedConfig {
        EmbeddedConfig {
            path: self.path.clone(),
            fsync: match self.fsync {
                FsyncMode::Interval => Fsync::Interval,
                FsyncMode::Always => Fsync::Always,
            },
            fsync_interval: Duration::from_millis(self.fsync_interval_ms),
            history_limit: self.history_limit,
            history_bytes: self.history_bytes,
            inbox_limit: self.inbox_limit,
            inbox_bytes: self.inbox_bytes,
        }
    }
}

mod defaults {
    pub(super) fn ws_path() -> String {
        "/sub".into()
    }
    pub(super) fn max_connections() -> usize {
        100_000
    }
    pub(super) fn max_connections_per_ip() -> usize {
        10_000
    }
    pub(super) fn max_frames_per_sec() -> u32 {
        1_000
    }
    pub(super) fn frame_burst() -> u32 {
        2_000
    }
    pub(super) fn inbox_limit() -> usize {
        1_000
    }
    pub(super) fn history_limit() -> usize {
        1_000
    }
    pub(super) fn max_unauthenticated() -> usize {
        10_000
    }
    pub(super) fn ipv6_prefix_len() -> u8 {
        64
    }
    pub(super) fn redis_url() -> String {
        "redis://127.0.0.1:6379/".into()
    }
    pub(super) fn store_path() -> std::path::PathBuf {
        "comet-data".into()
    }
    pub(super) fn fsync_interval_ms() -> u64 {
        1_000
    }
    pub(super) fn store_bytes() -> usize {
        4 * 1024 * 1024
    }
    pub(super) fn admin_listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 3103))
    }
}

/// One `[[users]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// The user's mid (positive).
    pub mid: i32,
    /// Its key.
    pub mkey: String,
}

/// One `[[groups]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    /// The group id (positive).
    pub id: i32,
    /// Member mids (positive).
    pub members: Vec<i32>,
}

/// A configuration that was refused: which file, which key, what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The key (`server.max_body`, `users[3].mid`, ...), or the line and
    /// column for a syntax error.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// The configuration shipped as `examples/chat_server.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../examples/chat_server.toml");

impl ServerConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.into(),
            key: "(file)".into(),
            problem: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let file = file.as_ref();
        let config: ServerConfig = toml::from_str(text).map_err(|e| {
            let key = match (engine_key_at_fault(text), e.span()) {
                // A bad engine key's error spans the whole `[server]` table
                // (the engine's keys are read through `flatten`).
                (Some(at), _) => key_at(text, at),
                (None, Some(span)) => key_at(text, span.start),
                (None, None) => "(document)".into(),
            };
            ConfigError {
                file: file.into(),
                key,
                problem: e.message().to_owned(),
            }
        })?;
        if let Some(key) = config.server.unknown.keys().next() {
            // Found by the flattened catch-all, so without a span: point at
            // the line that sets it.
            let at = key_line(text, key);
            return Err(ConfigError {
                file: file.into(),
                key: at.map_or_else(|| format!("server.{key}"), |at| key_at(text, at)),
                problem: format!("unknown field `{key}`"),
            });
        }
        config.check().map_err(|(key, problem)| ConfigError {
            file: file.into(),
            key,
            problem,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), (String, String)> {
        let s = &self.server;
        let bad = |key: &str, problem: &str| Err((key.to_owned(), problem.to_owned()));
        if s.tcp.is_none()
            && s.websocket.is_none()
            && s.tcp_tls.is_none()
            && s.websocket_tls.is_none()
        {
            return bad(
                "server",
                "needs at least one of tcp, websocket, tcp_tls and websocket_tls",
            );
        }
        if s.tcp_tls.is_some() || s.websocket_tls.is_some() {
            if s.tls_cert.is_none() {
                return bad("server.tls_cert", "is needed by tcp_tls and websocket_tls");
            }
            if s.tls_key.is_none() {
                return bad("server.tls_key", "is needed by tcp_tls and websocket_tls");
            }
        }
        if s.max_connections_per_ip == 0 {
            return bad("server.max_connections_per_ip", "must be greater than 0");
        }
        let e = &s.engine;
        if e.max_sessions_per_mid == 0 {
            return bad("server.max_sessions_per_mid", "must be greater than 0");
        }
        if s.max_frames_per_sec > 0 && s.frame_burst == 0 {
            return bad("server.frame_burst", "must be greater than 0");
        }
        if !s.ws_path.starts_with('/') {
            return bad("server.ws_path", "must start with '/'");
        }
        if e.handshake_timeout.is_zero() {
            return bad("server.handshake_timeout_ms", "must be greater than 0");
        }
        if e.heartbeat_timeout.is_zero() {
            return bad("server.heartbeat_timeout_ms", "must be greater than 0");
        }
        if e.hook_timeout.is_zero() {
            return bad("server.hook_timeout_ms", "must be greater than 0");
        }
        if !(64..=16 * 1024 * 1024).contains(&e.max_body) {
            return bad("server.max_body", "must be between 64 and 16777216 bytes");
        }
        if s.max_connections == 0 {
            return bad("server.max_connections", "must be greater than 0");
        }
        if e.max_outbound_bytes < e.max_body {
            return bad("server.max_outbound_bytes", "must be at least max_body");
        }
        if e.max_auth_body == 0 {
            return bad("server.max_auth_body", "must be greater than 0");
        }
        if s.max_unauthenticated == 0 {
            return bad("server.max_unauthenticated", "must be greater than 0");
        }
        if s.ipv6_prefix_len > 128 {
            return bad("server.ipv6_prefix_len", "must be between 0 and 128");
        }
        if let Err(err) = TrustedProxies::new(&s.proxy_protocol_from) {
            return bad("server.proxy_protocol_from", &err.to_string());
        }
        if e.sync_limit == 0 {
            return bad("server.sync_limit", "must be greater than 0");
        }
        let st = &self.store;
        if st.backend == StoreBackend::Embedded && st.path.as_os_str().is_empty() {
            return bad("store.path", "must not be empty");
        }
        if st.backend == StoreBackend::Redis
            && !(st.url.starts_with("redis://") || st.url.starts_with("rediss://"))
        {
            return bad("store.url", "must be a redis:// or rediss:// URL");
        }
        for (key, set) in [
            ("store.tls_ca_file", st.tls_ca_file.is_some()),
            ("store.tls_cert_file", st.tls_cert_file.is_some()),
            ("store.tls_key_file", st.tls_key_file.is_some()),
        ] {
            if set && !st.url.starts_with("rediss://") {
                return bad(key, "needs a rediss:// store.url");
            }
        }
        if st.tls_cert_file.is_some() != st.tls_key_file.is_some() {
            return bad(
                "store.tls_cert_file",
                "and store.tls_key_file go together: give both or neither",
            );
        }
        if let Some(id) = &self.cluster.node_id {
            if id.is_empty() || id.contains(|c: char| c.is_whitespace() || c == ',' || c == '|') {
                return bad(
                    "cluster.node_id",
                    "must be non-empty, without spaces, commas or bars",
                );
            }
        }
        if self
            .cluster
            .node_ttl_ms
            .is_some_and(|ms| !(300..=86_400_000).contains(&ms))
        {
            return bad(
                "cluster.node_ttl_ms",
                "must be at least 300 and at most 86400000 (a day)",
            );
        }
        if st.fsync_interval_ms == 0 {
            return bad("store.fsync_interval_ms", "must be greater than 0");
        }
        if let Some(admin) = &self.admin {
            match &admin.token {
                Some(token) if token.is_empty() => {
                    return bad("admin.token", "must not be empty");
                }
                None if !admin.listen.ip().is_loopback() => {
                    return bad(
                        "admin.token",
                        "is needed when admin.listen is not a loopback address",
                    );
                }
                _ => {}
            }
        }
        let mut mids = HashSet::with_capacity(self.users.len());
        for (i, u) in self.users.iter().enumerate() {
            if u.mid <= 0 {
                return Err((
                    format!("users[{i}].mid"),
                    format!("{} is not a positive mid", u.mid),
                ));
            }
            if !mids.insert(u.mid) {
                return Err((
                    format!("users[{i}].mid"),
                    format!("mid {} is listed twice", u.mid),
                ));
            }
            if u.mkey.is_empty() {
                return Err((format!("users[{i}].mkey"), "must not be empty".into()));
            }
        }
        let mut ids = HashSet::with_capacity(self.groups.len());
        for (i, g) in self.groups.iter().enumerate() {
            if g.id <= 0 {
                return Err((
                    format!("groups[{i}].id"),
                    format!("{} is not a positive group id", g.id),
                ));
            }
            if !ids.insert(g.id) {
                return Err((
                    format!("groups[{i}].id"),
                    format!("group {} is listed twice", g.id),
                ));
            }
            if let Some(j) = g.members.iter().position(|&m| m <= 0) {
                return Err((
                    format!("groups[{i}].members[{j}]"),
                    format!("{} is not a positive mid", g.members[j]),
                ));
            }
        }
        Ok(())
    }

    /// The engine settings this file asks for.
    pub fn engine_config(&self) -> Config {
        self.server.engine.clone()
    }
}

/// Where the first line setting `key` starts in `text` (its first
/// non-blank byte).
fn key_line(text: &str, key: &str) -> Option<usize> {
    let mut offset = 0;
    text.lines().find_map(|line| {
        let start = offset;
        offset += line.len() + 1;
        let rest = line.trim_start().strip_prefix(key)?;
        rest.trim_start()
            .starts_with('=')
            .then(|| start + line.len() - line.trim_start().len())
    })
}

/// The line of the first `[server]` key that the engine's [`Config`]
/// refuses on its own (a wrong type, say), if any.
fn engine_key_at_fault(text: &str) -> Option<usize> {
    let doc: toml::Table = toml::from_str(text).ok()?;
    let server = doc.get("server")?.as_table()?;
    server.iter().find_map(|(key, value)| {
        let mut one = toml::Table::new();
        one.insert(key.clone(), value.clone());
        match Config::deserialize(toml::Value::Table(one)) {
            // An unknown field is a listener key here, not a fault.
            Err(e) if !e.to_string().contains("unknown field") => key_line(text, key),
            _ => None,
        }
    })
}

/// Names the key at byte `offset` of `text` for an error message, as
/// `table.key (line L, column C)`, from the line's `key =` and the nearest
/// table header above it.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = offset - line_start + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_owned())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = text[..line_start + line.len()]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let name = match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k} "),
        (None, Some(k)) => format!("{k} "),
        (Some(t), None) => format!("{t} "),
        (None, None) => String::new(),
    };
    format!("{name}(line {line_no}, column {col})")
}

impl Default for ServerConfig {
    /// The shipped `examples/chat_server.toml`.
    fn default() -> Self {
        // The shipped file is checked by a test; a broken one is a build bug.
        Self::parse(DEFAULT_CONFIG, "examples/chat_server.toml")
            .unwrap_or_else(|e| panic!("shipped config is invalid: {e}"))
    }
}

/// The message store a server runs on.
#[derive(Clone, Debug)]
pub enum Store {
    /// `backend = "memory"`.
    Memory(Arc<MemoryStore>),
    /// `backend = "embedded"`.
    Embedded(Arc<EmbeddedStore>),
    /// `backend = "redis"`: the cluster's shared store.
    Redis(Arc<RedisStore>),
}

impl Store {
    /// The store as the engine uses it.
    pub fn as_dyn(&self) -> Arc<dyn MessageStore> {
        match self {
            Store::Memory(s) => s.clone(),
            Store::Embedded(s) => s.clone(),
            Store::Redis(s) => s.clone(),
        }
    }
}

/// Opens the store `config.store` describes. Blocking: the embedded store
/// reads its conversation table (at most a few hundred milliseconds for a
/// million messages). A file in `store.path` that is not a comet store is
/// an error naming it (kind [`io::ErrorKind::InvalidData`]), and the file
/// is left untouched. `backend = "redis"` is opened by [`start`] (it
/// connects to Redis): here it is an error.
pub fn open_store(config: &ServerConfig) -> io::Result<Store> {
    let st = &config.store;
    match st.backend {
        StoreBackend::Redis => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the redis backend is opened by server::start",
        )),
        StoreBackend::Memory => Ok(Store::Memory(Arc::new(MemoryStore::with_limits(
            MemoryLimits::default()
                .with_history(st.history_limit, st.history_bytes)
                .with_inbox(st.inbox_limit, st.inbox_bytes),
        )))),
        StoreBackend::Embedded => {
            let store = EmbeddedStore::open(st.embedded_config()).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("message store: {e}"))
            })?;
            let opened = store.opened();
            tracing::info!(
                path = %st.path.display(),
                created = opened.created,
                conversations = opened.conversations,
                messages = opened.messages,
                inbox_messages = opened.inbox_messages,
                open_ms = opened.elapsed.as_millis() as u64,
                fsync = %st.embedded_config().fsync,
                "message store opened"
            );
            Ok(Store::Embedded(Arc::new(store)))
        }
    }
}

/// A started server: its comet, its plug-ins and its bound addresses.
#[derive(Debug)]
pub struct Running {
    /// The comet handle.
    pub comet: Comet,
    /// The authenticator (add users at run time).
    pub auth: Arc<MemoryAuth>,
    /// The message store.
    pub store: Store,
    /// The group directory (join and leave at run time); empty and unused
    /// in cluster mode, where groups live in Redis (see `cluster`).
    pub groups: Arc<MemoryGroups>,
    /// Cluster mode's connection to Redis (`store.backend = "redis"`):
    /// its `groups()` joins and leaves for the whole cluster.
    pub cluster: Option<RedisCluster>,
    /// Where the TCP listener is bound.
    pub tcp_addr: Option<SocketAddr>,
    /// Where the WebSocket listener is bound.
    pub ws_addr: Option<SocketAddr>,
    /// Where the TCP+TLS listener is bound.
    pub tcp_tls_addr: Option<SocketAddr>,
    /// Where the WSS listener is bound.
    pub ws_tls_addr: Option<SocketAddr>,
    /// Where the admin API listens.
    pub admin_addr: Option<SocketAddr>,
    /// The connection limits (read [`Limits::refused`] for refusals).
    pub limits: Limits,
    listeners: Vec<JoinHandle<io::Result<()>>>,
}

impl Running {
    /// Stops accepting, lets every session flush and close (within the
    /// shutdown timeout), and waits for the listeners; returns whether every
    /// session closed in time.
    pub async fn shutdown(self) -> bool {
        let clean = self.comet.shutdown_and_wait().await;
        for listener in self.listeners {
            let _ = listener.await;
        }
        clean
    }
}

/// The comet and plug-ins a configuration describes, on `store` (see
/// [`open_store`]), not yet listening.
pub fn assemble(
    config: &ServerConfig,
    store: &Store,
) -> (Comet, Arc<MemoryAuth>, Arc<MemoryGroups>) {
    let auth = Arc::new(MemoryAuth::from_iter(
        config.users.iter().map(|u| (u.mid, u.mkey.as_bytes())),
    ));
    let groups = Arc::new(MemoryGroups::default());
    for g in &config.groups {
        groups.set_members(g.id, g.members.iter().copied());
    }
    let mut builder = Comet::builder()
        .authenticator(auth.clone())
        .users(auth.clone())
        .store(store.as_dyn())
        .groups(groups.clone())
        .config(config.engine_config());
    if config.server.max_frames_per_sec > 0 {
        builder = builder.layer(FrameRateLimitLayer::new(
            config.server.max_frames_per_sec,
            config.server.frame_burst,
        ));
    }
    let comet = builder
        .build()
        .unwrap_or_else(|e| panic!("checked config refused by the builder: {e}"));
    (comet, auth, groups)
}

/// A node id from the host name and the listening ports, e.g.
/// `web-1:3101:3102`: unique as long as no two nodes share host and ports.
pub fn default_node_id(tcp: Option<SocketAddr>, ws: Option<SocketAddr>) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !h.contains(|c: char| c.is_whitespace() || c == ','))
        .unwrap_or_else(|| "localhost".into());
    let port = |a: Option<SocketAddr>| a.map_or(0, |a| a.port());
    format!("{host}:{}:{}", port(tcp), port(ws))
}

/// Cluster mode (`store.backend = "redis"`): connects to Redis, writes the
/// file's `[[groups]]` there (idempotently: members already in keep their
/// catch-up point, members added at run time stay) and builds the node's
/// comet on the shared store, groups and broker.
pub async fn assemble_cluster(
    config: &ServerConfig,
    node_id: String,
) -> io::Result<(Comet, Arc<MemoryAuth>, Arc<MemoryGroups>, RedisCluster)> {
    let st = &config.store;
    let mut opts =
        RedisOptions::new(st.url.clone(), node_id).limits(st.history_limit, st.inbox_limit);
    if let Some(prefix) = &config.cluster.prefix {
        opts = opts.prefix(prefix.clone());
    }
    if let Some(bytes) = config.cluster.feed_budget {
        opts = opts.feed_budget(bytes);
    }
    if let Some(ms) = config.cluster.node_ttl_ms {
        opts = opts.node_ttl(std::time::Duration::from_millis(ms));
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{key} {}: {e}", path.display())))
    };
    if let Some(path) = &st.tls_ca_file {
        opts = opts.tls_ca(read("store.tls_ca_file", path)?);
    }
    if let (Some(cert), Some(key)) = (&st.tls_cert_file, &st.tls_key_file) {
        opts = opts.tls_client(
            read("store.tls_cert_file", cert)?,
            read("store.tls_key_file", key)?,
        );
    }
    let url = opts.redacted_url();
    let cluster = RedisCluster::connect(opts)
        .await
        .map_err(|e| io::Error::other(format!("redis at {url}: {e}")))?;
    for g in &config.groups {
        cluster
            .groups()
            .set_members(g.id, g.members.iter().copied())
            .await
            .map_err(|e| io::Error::other(format!("writing group {} to redis: {e}", g.id)))?;
    }
    tracing::info!(node_id = %cluster.node_id(), url = %url, groups = config.groups.len(), "cluster node");
    let auth = Arc::new(MemoryAuth::from_iter(
        config.users.iter().map(|u| (u.mid, u.mkey.as_bytes())),
    ));
    let mut builder = Comet::builder()
        .authenticator(auth.clone())
        .users(auth.clone())
        .store(cluster.store())
        .groups(cluster.groups())
        .broker({
            let cluster = cluster.clone();
            move |registry| cluster.broker(registry)
        })
        .config(config.engine_config());
    if config.server.max_frames_per_sec > 0 {
        builder = builder.layer(FrameRateLimitLayer::new(
            config.server.max_frames_per_sec,
            config.server.frame_burst,
        ));
    }
    let comet = builder
        .build()
        .map_err(|e| io::Error::other(format!("checked config refused by the builder: {e}")))?;
    Ok((comet, auth, Arc::new(MemoryGroups::default()), cluster))
}

/// Binds the server's listeners (port 0 picks a free port), opens its store
/// and starts serving. The store is opened after every listener is bound,
/// so a taken port leaves the store's directory untouched.
pub async fn start(config: ServerConfig) -> io::Result<Running> {
    // The recorder must be in place before the limits and the comet
    // register their series.
    let prometheus = config.admin.as_ref().and_then(|_| prometheus());
    let limits = Limits::new(config.server.max_connections)
        .with_per_ip(config.server.max_connections_per_ip)
        .with_max_unauthenticated(config.server.max_unauthenticated)
        .with_ipv6_prefix(config.server.ipv6_prefix_len);
    let s = &config.server;
    let acceptor = match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) if s.tcp_tls.is_some() || s.websocket_tls.is_some() => {
            Some(tls::TlsConfig::from_pem_files(cert, key)?)
        }
        _ => None,
    };
    // Bind everything before serving anything: a port that is taken must
    // not leave the listeners bound before it running with no handle.
    let bind = |addr: Option<SocketAddr>| addr.map(comet_transports::bind).transpose();
    let tls_only = |addr: Option<SocketAddr>| addr.filter(|_| acceptor.is_some());
    let local = |l: &Option<TcpListener>| l.as_ref().map(TcpListener::local_addr).transpose();
    let tcp_listener = bind(s.tcp)?;
    let ws_listener = bind(s.websocket)?;
    let tcp_tls_listener = bind(tls_only(s.tcp_tls))?;
    let ws_tls_listener = bind(tls_only(s.websocket_tls))?;
    let admin_listener = bind(config.admin.as_ref().map(|a| a.listen))?;
    let admin_addr = local(&admin_listener)?;
    let (tcp_addr, ws_addr) = (local(&tcp_listener)?, local(&ws_listener)?);
    let (tcp_tls_addr, ws_tls_addr) = (local(&tcp_tls_listener)?, local(&ws_tls_listener)?);

    let (comet, auth, groups, store, cluster) = if config.store.backend == StoreBackend::Redis {
        let node_id =
            config.cluster.node_id.clone().unwrap_or_else(|| {
                default_node_id(tcp_addr.or(tcp_tls_addr), ws_addr.or(ws_tls_addr))
            });
        let (comet, auth, groups, cluster) = assemble_cluster(&config, node_id).await?;
        let store = Store::Redis(cluster.store());
        (comet, auth, groups, store, Some(cluster))
    } else {
        let store = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || open_store(&config))
                .await
                .map_err(io::Error::other)??
        };
        let (comet, auth, groups) = assemble(&config, &store);
        (comet, auth, groups, store, None)
    };

    // The web client is served on the WebSocket listeners, same origin as
    // the endpoint it connects to.
    // Checked by `ServerConfig::check`.
    let proxies = TrustedProxies::new(&s.proxy_protocol_from)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let ws_options = ws::WsOptions::default()
        .with_path(s.ws_path.clone())
        .with_static_files(crate::web::files())
        .with_limits(limits.clone())
        .with_proxy_protocol(proxies.clone());
    let tcp_options = tcp::TcpOptions::default()
        .with_limits(limits.clone())
        .with_proxy_protocol(proxies);
    let mut listeners = Vec::new();
    // Listeners still serving, for the admin API's /readyz.
    let up = Arc::new(AtomicUsize::new(0));
    let mut spawn = |serve: BoxFuture<'static, io::Result<()>>| {
        let up = up.clone();
        up.fetch_add(1, Ordering::AcqRel);
        listeners.push(tokio::spawn(async move {
            let result = serve.await;
            up.fetch_sub(1, Ordering::AcqRel);
            result
        }));
    };
    if let Some(l) = tcp_listener {
        spawn(Box::pin(tcp::serve(l, comet.clone(), tcp_options.clone())));
    }
    if let Some(l) = ws_listener {
        spawn(Box::pin(ws::serve(l, comet.clone(), ws_options.clone())));
    }
    if let (Some(l), Some(tls)) = (tcp_tls_listener, &acceptor) {
        let options = tcp_options.with_tls(tls.clone());
        spawn(Box::pin(tcp::serve(l, comet.clone(), options)));
    }
    if let (Some(l), Some(tls)) = (ws_tls_listener, &acceptor) {
        let options = ws_options.with_tls(tls.clone());
        spawn(Box::pin(ws::serve(l, comet.clone(), options)));
    }
    let serving = listeners.len();
    if let (Some(l), Some(section)) = (admin_listener, &config.admin) {
        let mut options =
            admin::AdminOptions::new().ready(move || up.load(Ordering::Acquire) == serving);
        if let Some(token) = &section.token {
            options = options.token(token.clone());
        }
        if let Some(handle) = prometheus {
            options = options.metrics(move || handle.render());
        }
        let app = admin::router(comet.clone(), options);
        let stop = comet.clone();
        listeners.push(tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move { stop.shutdown_requested().await })
                .await
        }));
    }
    Ok(Running {
        comet,
        auth,
        store,
        groups,
        cluster,
        tcp_addr,
        ws_addr,
        tcp_tls_addr,
        ws_tls_addr,
        admin_addr,
        limits,
        listeners,
    })
}

/// The process's Prometheus recorder, installed on first use: `None` when
/// another recorder was installed first (the embedder's own; `/metrics`
/// then answers 404 and the embedder exports through its recorder).
/// Histograms get buckets (seconds for plug-in calls, counts for batches)
/// so that they export as Prometheus histograms.
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("comet_plugin_call_seconds".into()),
                    &[
                        0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("comet_batch_messages".into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                    )
                });
            match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(cause = %e, "no Prometheus recorder: /metrics will answer 404");
                    None
                }
            }
        })
        .clone()
}
