//! The TCP listener: binary frames (PROTOCOL.md 1.1).

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use comet_core::codec::TcpCodec;
use comet_core::{Comet, SessionEnd, TlsInfo, Transport, WireMode};
use futures_util::future::Either;
use futures_util::FutureExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;

use crate::io::WriteSink;
use crate::limits::Admission;
use crate::listener::{accept_loop, handshake_deadline, then_serve, tls_handshake, Common};
use crate::login::LoginGuard;
use crate::tls::TlsConfig;
use crate::{Limits, TrustedProxies};

/// Initial read buffer of a connection; it grows on demand up to one frame.
const READ_BUFFER: usize = 256;

/// Options of the TCP transport: connection limits, TLS, and the proxies
/// trusted to send a PROXY protocol header. `TcpOptions::default()` is
/// plain TCP under [`Limits::default`], trusting no proxy.
///
/// ```no_run
/// # async fn run(comet: comet_core::Comet) -> std::io::Result<()> {
/// use comet_transports::tcp::{self, TcpOptions};
/// use comet_transports::{tls::TlsConfig, Limits, TrustedProxies};
///
/// let options = TcpOptions::default()
///     .with_limits(Limits::new(100_000).with_per_ip(50))
///     .with_tls(TlsConfig::from_pem_files("cert.pem".as_ref(), "key.pem".as_ref())?)
///     .with_proxy_protocol(TrustedProxies::new(["10.0.0.0/8"]).expect("valid networks"));
/// let listener = comet_transports::bind("0.0.0.0:3101".parse().unwrap())?;
/// tcp::serve(listener, comet, options).await
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct TcpOptions {
    common: Common,
}

impl TcpOptions {
    /// The connection limits (default [`Limits::default`]). Give every
    /// listener of a server clones of one `Limits` to count their
    /// connections together.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.common.limits = limits;
        self
    }

    #[cfg(feature = "tls")]
    /// Serves TLS: the TLS handshake and op 7 must both be done within the
    /// handshake timeout of the accept.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.common.tls = Some(tls);
        self
    }

    /// Reads a PROXY protocol header (v1 or v2) in front of every
    /// connection from one of `proxies`, and serves it as the client the
    /// header names (its address is the session's peer and counts for the
    /// per-address limit). A connection from a trusted proxy without a valid
    /// header is refused (logged with the proxy's address); what other
    /// peers send is never read as a header. The header must arrive within
    /// the handshake timeout. Only [`serve`]'s own accept loop reads it:
    /// [`serve_connection`] is handed the client's address by its caller.
    pub fn with_proxy_protocol(mut self, proxies: TrustedProxies) -> Self {
        self.common.proxies = proxies;
        self
    }
}

/// Accepts TCP connections (binary frames, PROTOCOL.md 1.1) on `listener`
/// until the comet shuts down, serving each on its own task. Sockets get
/// `TCP_NODELAY`; connections past the limits are closed at once with a
/// log line naming the peer. Accept errors (out of file descriptors, ...)
/// are logged and retried after a pause.
pub async fn serve(listener: TcpListener, comet: Comet, options: TcpOptions) -> io::Result<()> {
    let common = &options.common;
    match common.tls.clone() {
        None => {
            accept_loop(
                comet,
                listener,
                common,
                "tcp",
                |comet, stream, peer, admission| {
                    serve_tcp(&comet, stream, peer, admission).map(drop)
                },
            )
            .await
        }
        #[cfg(feature = "tls")]
        Some(tls) => {
            accept_loop(
                comet,
                listener,
                common,
                "tcp+tls",
                move |comet, stream, peer, admission| {
                    tls_then_serve(comet, &tls, stream, peer, admission).map(drop)
                },
            )
            .await
        }
        #[cfg(not(feature = "tls"))]
        Some(never) => match never {},
    }
}

/// Serves one connection that an application accepted itself (from its
/// own listener, a Unix socket, an in-memory pipe, ...), as [`serve`]
/// serves each of its own: counted in `options`' limits under `peer`, TLS
/// first if `options` has it, and op 7 within the handshake timeout from
/// now. `None` when the connection never became a session (refused by the
/// limits, or a failed TLS handshake; both logged with `peer`).
pub fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    comet: &Comet,
    options: &TcpOptions,
) -> impl Future<Output = Option<SessionEnd>> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let admission = options.common.limits.admit(peer, "tcp");
    match (admission, &options.common.tls) {
        (None, _) => Either::Left(std::future::ready(None)),
        (Some(admission), None) => {
            let session = serve_stream(comet, stream, peer, admission, None);
            Either::Right(Either::Left(session.map(Some)))
        }
        (Some(admission), Some(tls)) => Either::Right(Either::Right(tls_then_serve(
            comet.clone(),
            tls,
            stream,
            peer,
            admission,
        ))),
    }
}

/// The TLS handshake, by the handshake deadline, then the session (see
/// [`then_serve`]). (Without the `tls` feature no `TlsConfig` exists, and
/// this is never called.)
#[cfg_attr(not(feature = "tls"), allow(unreachable_code, unused_variables))]
fn tls_then_serve<S>(
    comet: Comet,
    tls: &TlsConfig,
    stream: S,
    peer: SocketAddr,
    admission: Admission,
) -> impl Future<Output = Option<SessionEnd>> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = handshake_deadline(&comet, &admission);
    let tls = tls.clone();
    let handshake = async move { tls_handshake(&tls, stream, peer, deadline).await };
    then_serve(handshake, move |(stream, info)| {
        serve_stream(&comet, stream, peer, admission, Some(info))
    })
}

/// Serves one binary-frame connection to its end; `tls` is what its TLS
/// handshake negotiated, if it had one.
fn serve_stream<S>(
    comet: &Comet,
    stream: S,
    peer: SocketAddr,
    admission: Admission,
    tls: Option<Box<TlsInfo>>,
) -> impl Future<Output = SessionEnd>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (read, write) = tokio::io::split(stream);
    serve_halves(comet, read, write, peer, admission, tls)
}

/// Like [`serve_stream`], for a plain TCP connection, split without a lock
/// between its halves (`tokio::io::split` guards both halves with one
/// mutex, which the reader and the writer of a busy session would take
/// turns on).
fn serve_tcp(
    comet: &Comet,
    stream: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) -> impl Future<Output = SessionEnd> {
    let (read, write) = stream.into_split();
    serve_halves(comet, read, write, peer, admission, None)
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
    tls: Option<Box<TlsInfo>>,
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
    if let Some(tls) = tls {
        info = info.with_tls(*tls);
    }
    let inbound = LoginGuard::new(framed, admission, move |f: &mut FramedRead<R, TcpCodec>| {
        f.decoder_mut().set_max_body(max_body)
    });
    comet.serve(info, inbound, WriteSink::new(write))
}
