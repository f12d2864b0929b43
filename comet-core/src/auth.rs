//! Authentication: the [`Authenticator`] hook and what it sees.

use std::net::SocketAddr;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::{BoxError, PayloadError};
use crate::frame::{Transport, WireMode};
use crate::Mid;

/// Identifies one connection for the life of the process.
pub type ConnId = u64;

/// Facts about a connection, known before it authenticates.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// Process-unique connection id.
    pub conn_id: ConnId,
    /// The transport it arrived on.
    pub transport: Transport,
    /// Its wire mode.
    pub mode: WireMode,
    /// The peer's address.
    pub peer: SocketAddr,
    /// When the transport accepted the connection (before any TLS handshake
    /// or WebSocket upgrade). The handshake timeout counts from here: op 7
    /// must have arrived by `accepted_at + Config::handshake_timeout`,
    /// whatever stages came before it.
    pub accepted_at: tokio::time::Instant,
}

/// The op 7 body: a JSON object with `mid`, `mkey` and whatever else the
/// client sent, all of which reach the [`Authenticator`] untouched.
#[derive(Clone, Debug)]
pub struct AuthRequest {
    fields: Map<String, Value>,
    raw: Bytes,
}

impl AuthRequest {
    /// Parses an op 7 body (UTF-8 JSON object, in both wire modes).
    pub fn parse(body: &Bytes) -> Result<Self, PayloadError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(fields)) => Ok(AuthRequest {
                fields,
                raw: body.clone(),
            }),
            Ok(_) => Err(PayloadError::new("auth body must be a JSON object")),
            Err(e) => Err(PayloadError::new(format!(
                "auth body is not valid JSON: {e}"
            ))),
        }
    }

    /// A request from already-parsed fields.
    pub fn from_fields(fields: Map<String, Value>) -> Self {
        let raw = Bytes::from(Value::Object(fields.clone()).to_string());
        AuthRequest { fields, raw }
    }

    /// `mid`, when present and a 32-bit signed integer.
    pub fn mid(&self) -> Option<Mid> {
        self.fields
            .get("mid")
            .and_then(Value::as_i64)
            .and_then(|m| Mid::try_from(m).ok())
    }

    /// `mkey`, when present and a string.
    pub fn mkey(&self) -> Option<&str> {
        self.fields.get("mkey").and_then(Value::as_str)
    }

    /// Any field of the body.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }

    /// Every field of the body.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// The body as it arrived.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}

/// Who a connection authenticated as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user's mid: messages to this mid reach the connection.
    pub mid: Mid,
}

impl Identity {
    /// The identity of user `mid`.
    pub fn new(mid: Mid) -> Self {
        Identity { mid }
    }
}

/// The answer to a login. A rejected login is not an error: errors are for
/// backend failures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    /// The login is good.
    Accepted(Identity),
    /// The login is refused, with a reason a person can read (sent in op 8).
    Denied(String),
}

/// Decides who a connection is. Applications back it with their own user
/// database; `comet-plugins` has an in-memory table.
///
/// An `Err` (database down, ...) is answered with op 8 `ret -1`
/// ("authentication backend unavailable") and logged; the connection closes,
/// the server carries on. Calls are bounded by [`crate::Config::hook_timeout`].
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Checks one op 7 request from the connection `conn`.
    async fn authenticate(
        &self,
        req: &AuthRequest,
        conn: &ConnInfo,
    ) -> Result<AuthOutcome, BoxError>;
}

/// Knows which users exist: an optional hook
/// ([`CometBuilder::users`](crate::CometBuilder::users)).
///
/// Without it, op 18 accepts any positive `to`, and a message to a mid that
/// never logs in is kept in an inbox nobody drains (within the store's
/// bounds). With it, op 18 to a user that does not exist answers ret -1
/// "unknown user N" and consumes no chatId; notes to oneself are never
/// checked. An `Err` answers ret -1 too ("user directory unavailable"),
/// and calls are bounded by [`crate::Config::hook_timeout`].
#[async_trait]
pub trait UserDirectory: Send + Sync + 'static {
    /// Whether `mid` is a user of the application.
    async fn exists(&self, mid: Mid) -> Result<bool, BoxError>;

    /// The answer, if the directory knows it without waiting (an in-memory
    /// table, a local cache): `Some` skips [`exists`](Self::exists) and the
    /// future it would box on every op 18. The default, `None`, always asks
    /// `exists`. Must agree with `exists`.
    fn exists_now(&self, mid: Mid) -> Option<bool> {
        let _ = mid;
        None
    }
}
