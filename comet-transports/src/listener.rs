//! The accept loop every listener shares, and the options they share.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use comet_core::{Comet, TlsInfo};
use futures_util::future::Either;
use futures_util::FutureExt as _;
#[cfg(feature = "tls")]
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::limits::Admission;
use crate::proxy::{self, TrustedProxies};
use crate::tls::TlsConfig;
use crate::Limits;

/// Backlog of listening sockets made by [`bind`].
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with `SO_REUSEADDR` (except on Windows) and a backlog of
/// [`LISTEN_BACKLOG`] (the kernel caps it at `net.core.somaxconn`).
///
/// `tokio::net::TcpListener::bind` uses a backlog of 128: during a
/// reconnect storm the kernel then drops SYNs past it, and clients retry
/// only after a second. Bind listeners for comet with this instead.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Restart without waiting out TIME_WAIT. Not on Windows, where
    // SO_REUSEADDR lets another process take the port over (mio skips it
    // there too).
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What every listener's options hold: the connection limits, TLS and the
/// proxies trusted to send a PROXY protocol header.
#[derive(Clone, Debug, Default)]
pub(crate) struct Common {
    pub(crate) limits: Limits,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) proxies: TrustedProxies,
}

/// Accepts until the comet shuts down; each admitted connection (with
/// `TCP_NODELAY`) runs `serve` on its own task with its [`Admission`],
/// which keeps its place in the limits until the connection ends. Accept
/// errors (out of file descriptors, ...) are logged and retried after a
/// pause.
///
/// A connection from a trusted proxy first has its PROXY header read (on
/// its own task, within the handshake deadline); it is then served, and
/// counted by the per-address limit, as the client the header names.
pub(crate) async fn accept_loop<F, Fut>(
    comet: Comet,
    listener: TcpListener,
    common: &Common,
    name: &'static str,
    serve: F,
) -> io::Result<()>
where
    F: Fn(Comet, TcpStream, SocketAddr, Admission) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr()?;
    let limits = &common.limits;
    tracing::info!(%local, listener = name, "listener started");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = comet.shutdown_requested() => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(%local, listener = name, cause = %e, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, cause = %e, "could not set TCP_NODELAY");
        }
        if common.proxies.contains(peer.ip()) {
            let Some(admission) = limits.admit_unkeyed(peer, name) else {
                continue;
            };
            let deadline = handshake_deadline(&comet, &admission);
            let header = proxied(limits.clone(), stream, peer, admission, deadline, name);
            let (comet, serve) = (comet.clone(), serve.clone());
            let connection = then_serve(header, move |(stream, client, admission)| {
                serve(comet, stream, client, admission)
            });
            tokio::spawn(connection.map(drop));
            continue;
        }
        let Some(admission) = limits.admit(peer, name) else {
            continue;
        };
        tokio::spawn(serve(comet.clone(), stream, peer, admission));
    }
    tracing::info!(%local, listener = name, "listener stopped");
    Ok(())
}

/// A connection's handshake step (a PROXY header, TLS, a WebSocket
/// upgrade), then what `serve` makes of its result; `None` when the
/// handshake gave none (it logs why).
///
/// The handshake runs boxed and is chained to the session rather than
/// awaited in an `async` block: the connection's task holds either the
/// handshake's box or the session, never room for both, and none for
/// what the handshake consumed. Idle connections pay only for the session.
pub(crate) fn then_serve<H, T, F, Fut>(
    handshake: H,
    serve: F,
) -> impl Future<Output = Option<Fut::Output>> + Send + 'static
where
    H: Future<Output = Option<T>> + Send + 'static,
    F: FnOnce(T) -> Fut + Send + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send,
{
    Box::pin(handshake).then(move |done| match done {
        Some(done) => Either::Left(serve(done).map(Some)),
        None => Either::Right(std::future::ready(None)),
    })
}

/// Reads the PROXY header of a connection from the trusted proxy `proxy`
/// by the handshake deadline, and counts the connection for the client it
/// names; `None` (logged) when the header is bad or late, or the client's
/// address is full.
async fn proxied(
    limits: Limits,
    mut stream: TcpStream,
    proxy: SocketAddr,
    mut admission: Admission,
    deadline: tokio::time::Instant,
    name: &'static str,
) -> Option<(TcpStream, SocketAddr, Admission)> {
    let client = match tokio::time::timeout_at(deadline, proxy::read_header(&mut stream)).await {
        Ok(Ok(client)) => client.unwrap_or(proxy),
        Ok(Err(e)) => {
            tracing::warn!(peer = %proxy, listener = name, cause = %e, "refusing connection from a trusted proxy: bad PROXY protocol header");
            return None;
        }
        Err(_) => {
            tracing::info!(peer = %proxy, listener = name, "no PROXY protocol header within the handshake timeout");
            return None;
        }
    };
    limits
        .key(&mut admission, client, name)
        .then_some((stream, client, admission))
}

/// The end of a connection's handshake: its accept time plus the handshake
/// timeout. TLS, the WebSocket upgrade and op 7 all share it.
pub(crate) fn handshake_deadline(comet: &Comet, admission: &Admission) -> tokio::time::Instant {
    admission.accepted_at() + comet.config().handshake_timeout
}

/// Completes a TLS handshake by the handshake deadline, logging failures;
/// the stream, and what the handshake negotiated for the authenticator
/// (boxed: the connection's futures carry it until the login).
#[cfg(feature = "tls")]
pub(crate) async fn tls_handshake<S>(
    tls: &TlsConfig,
    stream: S,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<(tokio_rustls::server::TlsStream<S>, Box<TlsInfo>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let session = tls.get_ref().1;
            let mut info = TlsInfo::new();
            if let Some(name) = session.server_name() {
                info = info.with_server_name(name);
            }
            if let Some(alpn) = session.alpn_protocol() {
                info = info.with_alpn(alpn);
            }
            Some((tls, Box::new(info)))
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, cause = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake not completed within the handshake timeout");
            None
        }
    }
}

/// Without the `tls` feature no listener has a [`TlsConfig`], so this is
/// never called.
#[cfg(not(feature = "tls"))]
pub(crate) async fn tls_handshake<S>(
    _tls: &TlsConfig,
    _stream: S,
    _peer: SocketAddr,
    _deadline: tokio::time::Instant,
) -> Option<(S, Box<TlsInfo>)> {
    None
}
