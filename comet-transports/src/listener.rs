//! The accept loop every listener shares.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use comet_core::Comet;
use tokio::net::{TcpListener, TcpStream};

use crate::{Admission, Limits};

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

/// Accepts until the comet shuts down; each admitted connection (with
/// `TCP_NODELAY`) runs `serve` on its own task with its [`Admission`],
/// which keeps its place in `limits` until the connection ends. Accept
/// errors (out of file descriptors, ...) are logged and retried after a
/// pause.
pub(crate) async fn accept_loop<F, Fut>(
    comet: Comet,
    listener: TcpListener,
    limits: Limits,
    name: &'static str,
    serve: F,
) -> io::Result<()>
where
    F: Fn(Comet, TcpStream, SocketAddr, Admission) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr()?;
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
        let Some(admission) = limits.admit(peer, name) else {
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, cause = %e, "could not set TCP_NODELAY");
        }
        tokio::spawn(serve(comet.clone(), stream, peer, admission));
    }
    tracing::info!(%local, listener = name, "listener stopped");
    Ok(())
}

/// The end of a connection's handshake: its accept time plus the handshake
/// timeout. TLS, the WebSocket upgrade and op 7 all share it.
pub(crate) fn handshake_deadline(comet: &Comet, admission: &Admission) -> tokio::time::Instant {
    admission.accepted_at() + comet.config().handshake_timeout
}

#[cfg(feature = "tls")]
/// Completes a TLS handshake by the handshake deadline, logging failures.
pub(crate) async fn tls_handshake(
    comet: &Comet,
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    admission: &Admission,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let deadline = handshake_deadline(comet, admission);
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
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
