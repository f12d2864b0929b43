//! The TCP listener: binary frames (PROTOCOL.md 1.1).

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use comet_core::codec::TcpCodec;
use comet_core::{Comet, SessionEnd, Transport, WireMode};
use futures_util::FutureExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;

use crate::io::WriteSink;
use crate::listener::{accept_loop, tls_handshake};
use crate::tls::TlsAcceptor;
use crate::Limits;

/// Initial read buffer of a connection; it grows on demand up to one frame.
const READ_BUFFER: usize = 256;

/// Accepts TCP connections until the comet shuts down, serving each on its
/// own task. Sockets get `TCP_NODELAY`; connections past `limits` are closed
/// at once with a log line naming the peer. Accept errors (out of file
/// descriptors, ...) are logged and retried after a pause.
pub async fn serve(comet: Comet, listener: TcpListener, limits: Limits) -> io::Result<()> {
    accept_loop(comet, listener, limits, "tcp", |comet, stream, peer| {
        serve_tcp(&comet, stream, peer).map(drop)
    })
    .await
}

/// Like [`serve`], over TLS: the handshake must complete within the
/// handshake timeout.
pub async fn serve_tls(
    comet: Comet,
    listener: TcpListener,
    limits: Limits,
    acceptor: TlsAcceptor,
) -> io::Result<()> {
    accept_loop(
        comet,
        listener,
        limits,
        "tcp+tls",
        move |comet, stream, peer| {
            let acceptor = acceptor.clone();
            async move {
                if let Some(tls) = tls_handshake(&comet, &acceptor, stream, peer).await {
                    serve_stream(&comet, tls, peer).await;
                }
            }
        },
    )
    .await
}

/// Serves one connection that speaks binary frames (plain TCP, or TLS on
/// top of it) to its end.
pub fn serve_stream<S>(
    comet: &Comet,
    stream: S,
    peer: SocketAddr,
) -> impl Future<Output = SessionEnd>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (read, write) = tokio::io::split(stream);
    serve_halves(comet, read, write, peer)
}

/// Serves a plain TCP connection, split without a lock between its halves
/// (`tokio::io::split` guards both halves with one mutex, which the reader
/// and the writer of a busy session would take turns on).
pub fn serve_tcp(
    comet: &Comet,
    stream: TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = SessionEnd> {
    let (read, write) = stream.into_split();
    serve_halves(comet, read, write, peer)
}

/// Plain functions returning the session's future, not `async fn`s awaiting
/// it: each async layer would keep its own copy of the arguments
/// (rust-lang/rust#62958), and that future is most of an idle connection's
/// memory.
fn serve_halves<R, W>(
    comet: &Comet,
    read: R,
    write: W,
    peer: SocketAddr,
) -> impl Future<Output = SessionEnd>
where
    R: AsyncRead + Send + Unpin,
    W: AsyncWrite + Send + Unpin,
{
    let codec = TcpCodec::new(comet.config().max_body);
    let inbound = FramedRead::with_capacity(read, codec, READ_BUFFER);
    let info = comet.conn_info(Transport::Tcp, WireMode::Binary, peer);
    comet.serve(info, inbound, WriteSink::new(write))
}
