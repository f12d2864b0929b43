//! Engine settings.

use std::time::Duration;

use crate::frame::{DEFAULT_MAX_AUTH_BODY, DEFAULT_MAX_BODY, MSG_OVERHEAD};

/// Settings of the session engine. Every field has a safe default
/// (PROTOCOL.md's): build one with `Config { max_body: 8192, ..Config::default() }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Time a new connection has to send op 7 (default 10 s), counted from
    /// when the transport accepted it ([`crate::ConnInfo::accepted_at`]):
    /// one deadline through the TLS handshake, the WebSocket upgrade and op 7.
    pub handshake_timeout: Duration,
    /// Silence after which a session is closed, counted from the last
    /// complete frame (default 90 s).
    pub heartbeat_timeout: Duration,
    /// Largest accepted frame body in bytes (default 64 KiB).
    pub max_body: usize,
    /// Largest frame body accepted before the connection has logged in, so
    /// for op 7 (default 4 KiB). The transports hold a connection that has
    /// not authenticated to it (a WebSocket connection to about this much
    /// read before op 7, see `comet_transports::ws`); values above
    /// `max_body` act as `max_body`.
    pub max_auth_body: usize,
    /// Bytes a session may have queued for writing before it is closed as a
    /// slow consumer (default 4 MiB; values above `u32::MAX` act as
    /// `u32::MAX`).
    pub max_outbound_bytes: usize,
    /// Upper bound of every call into a plug-in (authenticator, store, group
    /// directory); past it the call counts as failed (default 5 s).
    pub hook_timeout: Duration,
    /// How long a graceful shutdown waits for sessions to flush (default 10 s).
    pub shutdown_timeout: Duration,
    /// Sessions one mid may hold at once (default 16). A login past it
    /// closes that mid's oldest session: the newest device wins, so a user
    /// who lost track of old connections is never locked out.
    pub max_sessions_per_mid: usize,
    /// The most messages one sync (op 22) replays; a larger `limit` is
    /// lowered to it (default 100, PROTOCOL.md 2.7).
    pub sync_limit: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            handshake_timeout: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(90),
            max_body: DEFAULT_MAX_BODY,
            max_auth_body: DEFAULT_MAX_AUTH_BODY,
            max_outbound_bytes: 4 * 1024 * 1024,
            hook_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            max_sessions_per_mid: 16,
            sync_limit: 100,
        }
    }
}

impl Config {
    /// The longest `msg` a send may carry: `max_body - 32`, so that one
    /// delivered message always fits one op 9.
    pub fn max_msg(&self) -> usize {
        self.max_body.saturating_sub(MSG_OVERHEAD)
    }

    /// The body limit before login: `max_auth_body`, at most `max_body`.
    pub fn auth_body_limit(&self) -> usize {
        self.max_auth_body.min(self.max_body)
    }
}
