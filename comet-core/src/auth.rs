//! Authentication: the [`Authenticator`] hook and what it sees.
//!
//! [`Authenticator`], [`UserDirectory`] are extension points: applications
//! implement them. [`AuthContext`] is what a login sees (op 7's body, the
//! connection, and, when the transport had them, the WebSocket upgrade
//! request and the TLS handshake); [`Identity`] is what a login yields,
//! with typed per-session [`Extensions`] that middleware and event hooks
//! read later.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::{BoxError, PayloadError};
use crate::frame::{Transport, WireMode};
use crate::Mid;

pub use http::Extensions;

/// Identifies one connection for the life of the process.
pub type ConnId = u64;

/// Facts about a connection, known before it authenticates.
///
/// Transports make one with [`Comet::conn_info`](crate::Comet::conn_info)
/// (which hands out a fresh [`ConnId`]) and attach what they learnt while
/// accepting it: the WebSocket upgrade request
/// ([`with_request`](Self::with_request)) and the TLS handshake
/// ([`with_tls`](Self::with_tls)). Those two reach the [`Authenticator`]
/// through [`AuthContext`] and are dropped once the login is decided, so an
/// established session does not keep the request's headers.
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
    /// Upgrade request and TLS facts, until the login takes them.
    handshake: Option<Arc<Handshake>>,
}

/// What a transport learnt before op 7 and only the login needs.
#[derive(Clone, Debug, Default)]
struct Handshake {
    request: Option<http::request::Parts>,
    tls: Option<TlsInfo>,
}

impl ConnInfo {
    /// Facts for connection `conn_id`, accepted now. Inside a running comet
    /// use [`Comet::conn_info`](crate::Comet::conn_info), which assigns a
    /// process-unique id; this constructor is for transports' and
    /// authenticators' own tests.
    pub fn new(conn_id: ConnId, transport: Transport, mode: WireMode, peer: SocketAddr) -> Self {
        ConnInfo {
            conn_id,
            transport,
            mode,
            peer,
            accepted_at: tokio::time::Instant::now(),
            handshake: None,
        }
    }

    /// Sets when the transport accepted the connection (the handshake
    /// deadline counts from it).
    pub fn with_accepted_at(mut self, at: tokio::time::Instant) -> Self {
        self.accepted_at = at;
        self
    }

    /// Attaches the HTTP request that upgraded this connection to a
    /// WebSocket (its method, URI with the query string, headers with the
    /// cookies), for the [`Authenticator`] to read through
    /// [`AuthContext::request_parts`]. The body-less `Parts` of
    /// `http::Request::into_parts`.
    pub fn with_request(mut self, parts: http::request::Parts) -> Self {
        self.handshake_mut().request = Some(parts);
        self
    }

    /// Attaches what the TLS handshake negotiated, for the
    /// [`Authenticator`] to read through [`AuthContext::tls`].
    pub fn with_tls(mut self, tls: TlsInfo) -> Self {
        self.handshake_mut().tls = Some(tls);
        self
    }

    fn handshake_mut(&mut self) -> &mut Handshake {
        Arc::make_mut(self.handshake.get_or_insert_with(Default::default))
    }

    /// Takes the upgrade request and TLS facts out (the session does, once,
    /// before the login).
    pub(crate) fn take_handshake(&mut self) -> (Option<http::request::Parts>, Option<TlsInfo>) {
        match self.handshake.take() {
            None => (None, None),
            Some(h) => {
                let h = Arc::unwrap_or_clone(h);
                (h.request, h.tls)
            }
        }
    }
}

/// What a TLS handshake negotiated, as plain comet types (no TLS library's
/// types leak through it). Transports fill it; authenticators read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsInfo {
    /// The server name the client asked for (SNI), if it sent one.
    pub server_name: Option<String>,
    /// The application protocol agreed by ALPN (e.g. `b"http/1.1"`), if any.
    pub alpn: Option<Vec<u8>>,
}

impl TlsInfo {
    /// Facts of a TLS handshake that negotiated neither SNI nor ALPN; add
    /// them with the setters.
    pub fn new() -> Self {
        TlsInfo::default()
    }

    /// Sets the SNI server name.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Sets the ALPN protocol.
    pub fn with_alpn(mut self, protocol: impl Into<Vec<u8>>) -> Self {
        self.alpn = Some(protocol.into());
        self
    }
}

/// Everything a login can look at: op 7's body ([`AuthRequest`]), the
/// connection ([`ConnInfo`]: id, transport, wire mode, peer), and, when the
/// transport had them, the WebSocket upgrade request (headers, URI with its
/// query string, cookies in the `Cookie` headers) and the TLS handshake.
///
/// The engine builds it for each op 7; tests of an [`Authenticator`] build
/// one with [`AuthContext::new`] and the `with_*` setters. It is
/// `#[non_exhaustive]` so that more facts can be added without breaking
/// authenticators.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AuthContext {
    request: AuthRequest,
    conn: ConnInfo,
    http: Option<http::request::Parts>,
    tls: Option<TlsInfo>,
}

impl AuthContext {
    /// The context of login `request` on connection `conn`. Upgrade request
    /// and TLS facts attached to `conn` with [`ConnInfo::with_request`] /
    /// [`ConnInfo::with_tls`] are moved into the context.
    pub fn new(request: AuthRequest, mut conn: ConnInfo) -> Self {
        let (http, tls) = conn.take_handshake();
        AuthContext {
            request,
            conn,
            http,
            tls,
        }
    }

    /// Sets the upgrade request's parts.
    pub fn with_request(mut self, parts: http::request::Parts) -> Self {
        self.http = Some(parts);
        self
    }

    /// Sets the TLS facts.
    pub fn with_tls(mut self, tls: TlsInfo) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Op 7's body.
    pub fn auth_request(&self) -> &AuthRequest {
        &self.request
    }

    /// The connection (id, transport, wire mode, peer, accept time).
    pub fn conn(&self) -> &ConnInfo {
        &self.conn
    }

    /// The connection's id.
    pub fn conn_id(&self) -> ConnId {
        self.conn.conn_id
    }

    /// The transport the connection arrived on.
    pub fn transport(&self) -> Transport {
        self.conn.transport
    }

    /// The connection's wire mode.
    pub fn mode(&self) -> WireMode {
        self.conn.mode
    }

    /// The peer's address (the client's, when a transport took it from a
    /// trusted proxy).
    pub fn peer(&self) -> SocketAddr {
        self.conn.peer
    }

    /// The HTTP request that upgraded the connection to a WebSocket, when
    /// the transport passed it on (`None` on raw TCP).
    pub fn request_parts(&self) -> Option<&http::request::Parts> {
        self.http.as_ref()
    }

    /// The upgrade request's headers (cookies are in its `Cookie` headers;
    /// parse them with e.g. the `cookie` crate).
    pub fn headers(&self) -> Option<&http::HeaderMap> {
        self.http.as_ref().map(|p| &p.headers)
    }

    /// The upgrade request's URI.
    pub fn uri(&self) -> Option<&http::Uri> {
        self.http.as_ref().map(|p| &p.uri)
    }

    /// The upgrade request's query string (without the `?`), if it had one.
    pub fn query(&self) -> Option<&str> {
        self.uri().and_then(http::Uri::query)
    }

    /// What the TLS handshake negotiated, when the connection is TLS and the
    /// transport passed it on.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }
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

/// Who a connection authenticated as, and the typed per-session data the
/// login attached ([`Extensions`]: claims, a tenant, a role...).
///
/// The extensions travel with the session: middleware reads them through
/// [`ConnContext::extensions`](crate::middleware::ConnContext::extensions),
/// event hooks in [`Event`](crate::Event)'s `extensions`. They are shared,
/// not copied, so cloning an `Identity` is cheap.
///
/// ```
/// use comet_core::Identity;
///
/// #[derive(Clone)]
/// struct Tenant(&'static str);
///
/// let id = Identity::new(7).with_extension(Tenant("acme"));
/// assert_eq!(id.mid, 7);
/// assert_eq!(id.extensions().get::<Tenant>().map(|t| t.0), Some("acme"));
/// ```
#[derive(Clone, Debug)]
pub struct Identity {
    /// The user's mid: messages to this mid reach the connection.
    pub mid: Mid,
    extensions: Arc<Extensions>,
}

impl Identity {
    /// The identity of user `mid`, with no extensions.
    pub fn new(mid: Mid) -> Self {
        Identity {
            mid,
            extensions: Arc::default(),
        }
    }

    /// Adds one typed value to the session's extensions (replacing a value
    /// of the same type).
    pub fn with_extension<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.extensions_mut().insert(value);
        self
    }

    /// The session's extensions.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The session's extensions, to change (copied first if shared).
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        Arc::make_mut(&mut self.extensions)
    }

    /// The extensions as the shared handle events carry.
    pub(crate) fn shared_extensions(&self) -> &Arc<Extensions> {
        &self.extensions
    }
}

/// The answer to a login. A rejected login is not an error: errors are for
/// backend failures.
#[derive(Clone, Debug)]
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
///
/// An extension point: applications implement it.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Checks one login: op 7's body ([`AuthContext::auth_request`]) with
    /// what is known of the connection (peer, transport, the WebSocket
    /// upgrade request's headers and query, TLS).
    async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError>;
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
///
/// An extension point: applications implement it.
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
