//! The TCP listener: binary frames (PROTOCOL.md 1.1).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use comet_core::codec::TcpCodec;
use comet_core::{Comet, SessionEnd, Transport, WireMode};
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::codec::FramedRead;

use crate::io::WriteSink;
use crate::Limits;

/// Initial read buffer of a connection; it grows on demand up to one frame.
const READ_BUFFER: usize = 256;

/// Accepts TCP connections until the comet shuts down, serving each on its
/// own task. Sockets get `TCP_NODELAY`; connections past `limits` are closed
/// at once with a log line naming the peer. Accept errors (out of file
/// descriptors, ...) are logged and retried after a pause.
pub async fn serve(comet: Comet, listener: TcpListener, limits: Limits) -> io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(%local, "tcp listener started");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = comet.shutdown_requested() => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(%local, cause = %e, "tcp accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(permit) = limits.admit(peer, "tcp") else {
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, cause = %e, "could not set TCP_NODELAY");
        }
        let comet = comet.clone();
        tokio::spawn(async move {
            serve_stream(&comet, stream, peer).await;
            drop(permit);
        });
    }
    tracing::info!(%local, "tcp listener stopped");
    Ok(())
}

/// Serves one connection that speaks binary frames (plain TCP, or TLS on
/// top of it) to its end.
pub async fn serve_stream<S>(comet: &Comet, stream: S, peer: SocketAddr) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (read, write) = tokio::io::split(stream);
    let codec = TcpCodec::new(comet.config().max_body);
    let inbound = FramedRead::with_capacity(read, codec, READ_BUFFER);
    let mut outbound = WriteSink::new(write);
    let info = comet.conn_info(Transport::Tcp, WireMode::Binary, peer);
    let end = comet.serve(info, inbound, &mut outbound).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), outbound.close()).await;
    end
}
