//! Mounting comet's WebSocket endpoint inside an existing axum application.
//!
//! [`CometWs`] is a tower `Service` for `Router::route_service`: it checks
//! the upgrade request, answers `101 Switching Protocols`, and runs the
//! upgraded connection as a comet session on its own task — beside the
//! application's own routes, in one process.
//!
//! ```no_run
//! # async fn run(comet: comet_core::Comet) -> std::io::Result<()> {
//! use axum::{routing::get, Router};
//! use comet_transports::axum::CometWs;
//! use std::net::SocketAddr;
//!
//! let app = Router::new()
//!     .route("/health", get(|| async { "ok" }))
//!     .route_service("/sub", CometWs::new(comet));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! // Required: CometWs keys its limits and logs on the peer address.
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await
//! # }
//! ```
//!
//! **The peer address is required.** Served without connect info (a plain
//! `axum::serve(listener, app)`), every upgrade request is answered
//! `500 Internal Server Error` naming the fix, and the first one is logged
//! at error level: every client would otherwise share the address
//! `0.0.0.0:0`, and a per-address limit would count them all as one.
//!
//! **Behind a reverse proxy** the TCP peer is the proxy. Name the proxies
//! with [`CometWs::trust_proxies`]: for a request whose TCP peer is one of
//! them, the client address is the rightmost address of the `Forwarded`
//! header (RFC 7239), or else of `X-Forwarded-For`, that is, the one the
//! trusted proxy itself appended. Requests from any other peer keep their
//! TCP address, whatever headers they carry.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::ConnectInfo;
use comet_core::Comet;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tower::Service;

use crate::limits::Admission;
use crate::login::{Budgeted, ReadBudget};
use crate::ws::{pre_auth_budget, request_parts, serve_upgraded, ws_config, UPGRADE_ALLOWANCE};
use crate::{BadProxy, Limits, TrustedProxies};

/// A tower service that turns WebSocket upgrade requests into comet
/// sessions. Mount it with `Router::route_service(path, CometWs::new(comet))`.
#[derive(Clone, Debug)]
pub struct CometWs {
    comet: Comet,
    limits: Option<Limits>,
    trusted: TrustedProxies,
}

/// Whether the missing-connect-info error was logged (once per process).
static NO_CONNECT_INFO_LOGGED: AtomicBool = AtomicBool::new(false);

const NO_CONNECT_INFO: &str =
    "comet's WebSocket endpoint needs the peer address: serve the app with \
     `axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())`";

impl CometWs {
    /// A service serving sessions of `comet`.
    pub fn new(comet: Comet) -> Self {
        CometWs {
            comet,
            limits: None,
            trusted: TrustedProxies::default(),
        }
    }

    /// Takes the client's address from the `Forwarded` or
    /// `X-Forwarded-For` header of requests whose TCP peer is one of
    /// `proxies` (addresses, or networks like `"10.0.0.0/8"`); see the
    /// [module docs](self). Headers from any other peer are ignored.
    ///
    /// ```
    /// # fn run(comet: comet_core::Comet) -> Result<(), comet_transports::BadProxy> {
    /// use comet_transports::axum::CometWs;
    /// let ws = CometWs::new(comet).trust_proxies(["127.0.0.1", "10.0.0.0/8"])?;
    /// # Ok(()) }
    /// ```
    pub fn trust_proxies<I, S>(mut self, proxies: I) -> Result<Self, BadProxy>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.trusted = TrustedProxies::new(proxies)?;
        Ok(self)
    }

    /// The client's address: the TCP peer's, or, from a trusted proxy, the
    /// one it appended to `Forwarded` / `X-Forwarded-For`.
    fn client_addr(&self, peer: SocketAddr, headers: &HeaderMap) -> SocketAddr {
        if !self.trusted.contains(peer.ip()) {
            return peer;
        }
        let forwarded = client_ip::rightmost_forwarded(headers)
            .or_else(|_| client_ip::rightmost_x_forwarded_for(headers));
        match forwarded {
            // The client's port is not known: 0.
            Ok(client) => SocketAddr::new(client, 0),
            Err(e) => {
                tracing::debug!(%peer, cause = %e, "trusted proxy sent no usable client address");
                peer
            }
        }
    }

    /// Shares the connection limits with other listeners; requests past
    /// them are answered `503 Service Unavailable`. A connection holds its
    /// place among the unauthenticated ones from its upgrade request to its
    /// login.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::from(text));
    *resp.status_mut() = status;
    resp
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

impl<B> Service<Request<B>> for CometWs
where
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        ready(Ok(self.upgrade(&mut req)))
    }
}

impl CometWs {
    fn upgrade<B>(&self, req: &mut Request<B>) -> Response<Body> {
        let Some(socket_peer) = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
        else {
            if !NO_CONNECT_INFO_LOGGED.swap(true, Ordering::Relaxed) {
                tracing::error!("{NO_CONNECT_INFO}; refusing every upgrade until then");
            }
            return plain(StatusCode::INTERNAL_SERVER_ERROR, NO_CONNECT_INFO);
        };
        let peer = self.client_addr(socket_peer, req.headers());
        let headers = req.headers();
        if req.method() != Method::GET
            || !header_has(headers, header::UPGRADE, "websocket")
            || !header_has(headers, header::CONNECTION, "upgrade")
        {
            tracing::debug!(%peer, "not a websocket upgrade request");
            return plain(
                StatusCode::UPGRADE_REQUIRED,
                "this endpoint speaks WebSocket only",
            );
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            return plain(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13");
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
        };
        let accept = derive_accept_key(key.as_bytes());
        if self.comet.is_shutting_down() {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
        }
        // The handshake deadline counts from this request: hyper read it,
        // and the connection's accept is not known here.
        let admission = match &self.limits {
            Some(limits) => match limits.admit(peer, "axum") {
                Some(admission) => admission,
                None => return plain(StatusCode::SERVICE_UNAVAILABLE, "connection limit reached"),
            },
            None => Admission::unlimited(),
        };
        let request = Box::new(request_parts(req));
        let on_upgrade = hyper::upgrade::on(req);
        let comet = self.comet.clone();
        tokio::spawn(async move {
            let deadline = admission.accepted_at() + comet.config().handshake_timeout;
            match tokio::time::timeout_at(deadline, on_upgrade).await {
                Ok(Ok(upgraded)) => {
                    let config = ws_config(comet.config().max_body);
                    // hyper has read the request already.
                    let budget =
                        ReadBudget::new(pre_auth_budget(comet.config()) - UPGRADE_ALLOWANCE);
                    let io = Budgeted::new(TokioIo::new(upgraded), budget.clone());
                    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                    let request = Some(request);
                    serve_upgraded(comet, ws, peer, admission, Some(budget), request, None).await;
                }
                Ok(Err(e)) => tracing::warn!(%peer, cause = %e, "websocket upgrade failed"),
                Err(_) => tracing::info!(%peer, "websocket upgrade not completed in time"),
            }
        });
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        resp
    }
}
