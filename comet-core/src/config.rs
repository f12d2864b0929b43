//! Engine settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::{DEFAULT_MAX_AUTH_BODY, DEFAULT_MAX_BODY, MSG_OVERHEAD};

/// Settings of the session engine. Every field has a safe default
/// (PROTOCOL.md's): build one with
/// `Config::default().with_max_body(8192)`, or set its public fields. It is
/// `#[non_exhaustive]`, so settings can be added without breaking callers.
///
/// It reads from any serde format, with durations as whole milliseconds
/// under `*_ms` keys, absent keys at their defaults and unknown keys
/// refused; `chat_server`'s `[server]` table holds these keys beside its
/// listeners (docs/CONFIG.md).
///
/// ```
/// let config: comet_core::Config =
///     serde_json::from_str(r#"{ "heartbeat_timeout_ms": 30000, "max_body": 8192 }"#).unwrap();
/// assert_eq!(config.heartbeat_timeout, std::time::Duration::from_secs(30));
/// assert_eq!(config.sync_limit, comet_core::Config::default().sync_limit);
/// assert!(serde_json::from_str::<comet_core::Config>(r#"{ "max_bdy": 1 }"#).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Time a new connection has to send op 7 (default 10 s), counted from
    /// when the transport accepted it ([`crate::ConnInfo::accepted_at`]):
    /// one deadline through the TLS handshake, the WebSocket upgrade and op 7.
    #[serde(rename = "handshake_timeout_ms", with = "millis")]
    pub handshake_timeout: Duration,
    /// Silence after which a session is closed, counted from the last
    /// complete frame (default 90 s).
    #[serde(rename = "heartbeat_timeout_ms", with = "millis")]
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
    #[serde(rename = "hook_timeout_ms", with = "millis")]
    pub hook_timeout: Duration,
    /// How long a graceful shutdown waits for sessions to flush (default 10 s).
    #[serde(rename = "shutdown_timeout_ms", with = "millis")]
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

/// `with_<field>` setters, one per field.
macro_rules! setters {
    ($($field:ident: $ty:ty => $name:ident;)*) => {
        $(
            #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
            pub fn $name(mut self, value: $ty) -> Self {
                self.$field = value;
                self
            }
        )*
    };
}

impl Config {
    setters! {
        handshake_timeout: Duration => with_handshake_timeout;
        heartbeat_timeout: Duration => with_heartbeat_timeout;
        max_body: usize => with_max_body;
        max_auth_body: usize => with_max_auth_body;
        max_outbound_bytes: usize => with_max_outbound_bytes;
        hook_timeout: Duration => with_hook_timeout;
        shutdown_timeout: Duration => with_shutdown_timeout;
        max_sessions_per_mid: usize => with_max_sessions_per_mid;
        sync_limit: usize => with_sync_limit;
    }

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

/// A `Duration` as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
