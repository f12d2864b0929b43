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
use crate::listener::accept_loop;
#[cfg(feature = "tls")]
use crate::listener::tls_handshake;
use crate::login::LoginGuard;
#[cfg(feature = "tls")]
use crate::tls::TlsAcceptor;
use crate::{Admission, Limits};

/// Initial read buffer of a connection; it grows on demand up to one frame.
const READ_BUFFER: usize = 256;

/// Accepts TCP connections until the comet shuts down, serving each on its
/// own task. Sockets get `TCP_NODELAY`; connections past `limits` are closed
/// at once with a log line naming the peer. Accept errors (out of file
/// descriptors, ...) are logged and retried after a pause.
pub async fn serve(comet: Comet, listener: TcpListener, limits: Limits) -> io::Result<()> {
    accept_loop(
        comet,
        listener,
        limits,
        "tcp",
        |comet, stream, peer, admission| serve_tcp(&comet, stream, peer, admission).map(drop),
    )
    .await
}

#[cfg(feature = "tls")]
/// Like [`serve`], over TLS: the TLS handshake and op 7 must both be done
/// within the handshake timeout of the accept.
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
        move |comet, stream, peer, admission| {
            let acceptor = acceptor.clone();
            async move {
                if let Some(tls) = tls_handshake(&comet, &acceptor, stream, peer, &admission).await
                {
                    serve_stream(&comet, tls, peer, admission).await;
                }
            }
        },
    )
    .await
}

/// Serves one connection that speaks binary frames (plain TCP, or TLS on
/// top of it) to its end. `admission` is its place in the [`Limits`] (or
/// [`Admission::unlimited`]), kept until the end; op 7 must arrive within
/// the handshake timeout of [`Admission::accepted_at`], and may be at most
/// [`Config::max_auth_body`](comet_core::Config::max_auth_body) long.
pub fn serve_stream<S>(
    comet: &Comet,
    stream: S,
    peer: SocketAddr,
    admission: Admission,
) -> impl Future<Output = SessionEnd>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (read, write) = tokio::io::split(stream);
    serve_halves(comet, read, write, peer, admission)
}

/// Like [`serve_stream`], for a plain TCP connection, split without a lock
/// between its halves (`tokio::io::split` guards both halves with one
/// mutex, which the reader and the writer of a busy session would take
/// turns on).
pub fn serve_tcp(
    comet: &Comet,
    stream: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) -> impl Future<Output = SessionEnd> {
    let (read, write) = stream.into_split();
    serve_halves(comet, read, write, peer, admission)
}

/// Plain functions returning the session's future, not `async fn`s awaiting
/// it: each async layer would keep its own copy of the arguments
/// (rust-lang/rust#62958), and that future is most of an idle connection's
/// memory.
///
/// Until the login, frames are decoded with the smaller body limit of op 7
/// (and the read buffer grows only with the bytes that arrive, see
/// [`TcpCodec`]).
fn serve_halves<R, W>(
    comet: &Comet,
    read: R,
    write: W,
    peer: SocketAddr,
    admission: Admission,
) -> impl Future<Output = SessionEnd>
where
    R: AsyncRead + Send + Unpin,
    W: AsyncWrite + Send + Unpin,
{
    let config = comet.config();
    let max_body = config.max_body;
    let codec = TcpCodec::new(config.auth_body_limit());
    let framed = FramedRead::with_capacity(read, codec, READ_BUFFER);
    let mut info = comet.conn_info(Transport::Tcp, WireMode::Binary, peer);
    info.accepted_at = admission.accepted_at();
    let inbound = LoginGuard::new(framed, admission, move |f: &mut FramedRead<R, TcpCodec>| {
        f.decoder_mut().set_max_body(max_body)
    });
    comet.serve(info, inbound, WriteSink::new(write))
}
