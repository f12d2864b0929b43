//! # comet-transports
//!
//! Puts a [`Comet`](comet_core::Comet) on the network:
//!
//! - [`tcp`]: a TCP listener speaking binary frames;
//! - [`ws`]: a WebSocket listener on a path (default `/sub`), text (JSON) and
//!   binary (goim v2) modes fixed by the first data frame;
//! - [`axum`] (feature `axum`, on by default): a tower service that upgrades a
//!   request on an existing axum `Router` route into a comet session;
//! - [`static_files`]: an opt-in of the WebSocket listener that serves a
//!   fixed set of files (a web client) to plain `GET` requests;
//! - [`admin`] (feature `admin`, on by default): the admin and push HTTP
//!   API as an axum `Router` (metrics, health, sends, presence, history,
//!   groups);
//! - [`tls`]: [`TlsConfig`](tls::TlsConfig), the TLS option of both
//!   listeners (TCP+TLS, WSS);
//! - [`Limits`]: the connection limits (global, unauthenticated, per source
//!   address) shared by the listeners;
//! - [`TrustedProxies`]: the proxies whose PROXY protocol header (both
//!   listeners) or `Forwarded` header ([`axum`]) names the client.
//!
//! Each transport has one way to serve: `serve(listener, comet, options)`
//! runs its accept loop, and `serve_connection(stream, peer, &comet,
//! &options)` serves one connection an application accepted itself, over
//! any `AsyncRead + AsyncWrite` stream. TLS, limits and trusted proxies
//! are options ([`tcp::TcpOptions`], [`ws::WsOptions`]).
//!
//! Every listener stops accepting when the comet shuts down
//! ([`Comet::shutdown`](comet_core::Comet::shutdown)); the sessions then
//! flush their queues and close.
//!
//! ```no_run
//! # async fn run(comet: comet_core::Comet) -> std::io::Result<()> {
//! use comet_transports::{tcp, ws, Limits};
//!
//! // One `Limits` for both listeners: they count connections together.
//! let limits = Limits::new(100_000);
//! let tcp = comet_transports::bind("127.0.0.1:3101".parse().unwrap())?;
//! let web = comet_transports::bind("127.0.0.1:3102".parse().unwrap())?;
//! tokio::try_join!(
//!     tcp::serve(tcp, comet.clone(), tcp::TcpOptions::default().with_limits(limits.clone())),
//!     ws::serve(web, comet, ws::WsOptions::default().with_limits(limits)),
//! )?;
//! # Ok(()) }
//! ```

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "axum")]
pub mod axum;
// The helpers shared by the listeners: with only some listeners enabled,
// parts of them have no caller.
#[cfg_attr(not(all(feature = "tcp", feature = "ws")), allow(dead_code))]
mod io;
#[cfg_attr(
    not(all(feature = "tcp", feature = "ws", feature = "axum")),
    allow(dead_code)
)]
mod limits;
#[cfg_attr(not(all(feature = "tcp", feature = "ws")), allow(dead_code))]
mod listener;
#[cfg_attr(
    not(all(feature = "tcp", feature = "ws", feature = "axum")),
    allow(dead_code)
)]
mod login;
#[cfg_attr(
    not(all(feature = "tcp", feature = "ws", feature = "axum")),
    allow(dead_code)
)]
mod proxy;
#[cfg(feature = "ws")]
pub mod static_files;
#[cfg(feature = "tcp")]
pub mod tcp;
#[cfg(feature = "tls")]
pub mod tls;
/// Without the `tls` feature: a listener option that cannot be set, so the
/// listeners' TLS arms compile away.
#[cfg(not(feature = "tls"))]
mod tls {
    /// No value exists: `with_tls` is not there to make one.
    #[derive(Clone, Debug)]
    pub(crate) enum TlsConfig {}
}
#[cfg(feature = "ws")]
pub mod ws;

pub use limits::{address_key, Limits, DEFAULT_IPV6_PREFIX, DEFAULT_MAX_UNAUTHENTICATED};
pub use listener::{bind, LISTEN_BACKLOG};
pub use proxy::{BadProxy, TrustedProxies};
