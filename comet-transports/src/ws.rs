//! The WebSocket transport (PROTOCOL.md 1.2): text (JSON) and binary (goim
//! v2) modes, fixed by the first data frame.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use comet_core::codec::{json, split_frames};
use comet_core::{Comet, Frame, FrameError, Outgoing, SessionEnd, TlsInfo, Transport, WireMode};
use futures_util::future::Either;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::limits::Admission;
use crate::listener::{accept_loop, handshake_deadline, then_serve, tls_handshake, Common};
use crate::login::{BudgetSpent, Budgeted, LoginGuard, ReadBudget};
use crate::static_files::{route, Rewind, Routed, StaticFiles};
use crate::tls::TlsConfig;
use crate::{Limits, TrustedProxies};

/// Bytes of the HTTP upgrade request the pre-login read budget allows for
/// (headers with cookies included).
pub const UPGRADE_ALLOWANCE: usize = 16 * 1024;

/// The largest data message accepted before login: op 7's body limit plus
/// room for the JSON frame object around it.
pub fn auth_message_limit(config: &comet_core::Config) -> usize {
    config.auth_body_limit() + 1024
}

/// Bytes a WebSocket connection may send, from its accept to its login:
/// the upgrade request ([`UPGRADE_ALLOWANCE`]), the op 7 message
/// ([`auth_message_limit`]) and 2 KiB for frame headers, control frames
/// and one read past op 7. A connection that sends more before it has
/// logged in is closed (1009); this, not tungstenite's message limit,
/// bounds what an unauthenticated connection can make the server buffer.
pub fn pre_auth_budget(config: &comet_core::Config) -> usize {
    UPGRADE_ALLOWANCE + auth_message_limit(config) + 2048
}

/// Options of the WebSocket transport: the endpoint's path, static files
/// beside it, connection limits, TLS (WSS), and the proxies trusted to
/// send a PROXY protocol header. `WsOptions::default()` serves `/sub` in
/// plain text under [`Limits::default`], with no files and no trusted
/// proxy.
///
/// ```no_run
/// # async fn run(comet: comet_core::Comet) -> std::io::Result<()> {
/// use comet_transports::ws::{self, WsOptions};
/// use comet_transports::{tls::TlsConfig, Limits};
///
/// let options = WsOptions::default()
///     .with_path("/chat")
///     .with_limits(Limits::new(100_000))
///     .with_tls(TlsConfig::from_pem_files("cert.pem".as_ref(), "key.pem".as_ref())?);
/// let listener = comet_transports::bind("0.0.0.0:443".parse().unwrap())?;
/// ws::serve(listener, comet, options).await
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct WsOptions {
    path: Arc<str>,
    static_files: Option<StaticFiles>,
    common: Common,
}

impl Default for WsOptions {
    fn default() -> Self {
        WsOptions {
            path: "/sub".into(),
            static_files: None,
            common: Common::default(),
        }
    }
}

impl WsOptions {
    /// The path clients connect to (default `/sub`); other paths get 404.
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into().into();
        self
    }

    /// Files served to plain `GET` requests on the same listener (default
    /// none): requests that are not WebSocket upgrades are answered from
    /// `files`, or with 404, and the connection is closed (see
    /// [`static_files`](crate::static_files)); without files they are
    /// answered 426 on the endpoint's path and 404 elsewhere.
    pub fn with_static_files(mut self, files: StaticFiles) -> Self {
        self.static_files = Some(files);
        self
    }

    /// The connection limits (default [`Limits::default`]). Give every
    /// listener of a server clones of one `Limits` to count their
    /// connections together.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.common.limits = limits;
        self
    }

    #[cfg(feature = "tls")]
    /// Serves TLS (WSS): the TLS handshake, the upgrade and op 7 must all be
    /// done within the handshake timeout of the accept.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.common.tls = Some(tls);
        self
    }

    /// Reads a PROXY protocol header (v1 or v2) in front of every
    /// connection from one of `proxies`, as
    /// [`TcpOptions::with_proxy_protocol`](crate::tcp::TcpOptions::with_proxy_protocol)
    /// does (only in [`serve`]'s own accept loop).
    pub fn with_proxy_protocol(mut self, proxies: TrustedProxies) -> Self {
        self.common.proxies = proxies;
        self
    }

    /// The path clients connect to.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// The tungstenite settings comet uses: a small eagerly-allocated read
/// buffer (memory per idle connection matters more than read throughput
/// here), writes buffered until the session flushes a batch, and message
/// limits derived from `max_body` so no peer makes us allocate more.
///
/// tungstenite cannot change these limits on an open connection, so they
/// are the logged-in ones. Before login the listeners of this module (and
/// [`CometWs`](crate::axum::CometWs)) count the bytes read instead
/// ([`pre_auth_budget`]): tungstenite still reserves address space for a
/// frame whose header announces up to this message limit, but it reads,
/// and so fills, only what the budget lets through.
pub(crate) fn ws_config(max_body: usize) -> WebSocketConfig {
    // A JSON body may be longer than the bytes it carries (escapes, base64).
    let max_message = 2 * max_body + 1024;
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Accepts WebSocket connections on `listener` until the comet shuts
/// down, serving each on its own task: the upgrade on `options`' path, then
/// the session. Plain HTTP requests are answered and closed: from the
/// static files if `options` has them, otherwise 426 on the endpoint's path
/// and 404 elsewhere. The TLS handshake (if any), the upgrade and op 7 must
/// all be done within the handshake timeout of the accept.
pub async fn serve(listener: TcpListener, comet: Comet, options: WsOptions) -> io::Result<()> {
    let WsOptions {
        path,
        static_files: files,
        common,
    } = options;
    let name = match common.tls {
        None => "websocket",
        Some(_) => "websocket+tls",
    };
    let tls = common.tls.clone();
    accept_loop(
        comet,
        listener,
        &common,
        name,
        move |comet, stream, peer, admission| {
            let endpoint = (path.clone(), files.clone());
            connection(comet, stream, peer, endpoint, tls.as_ref(), admission).map(drop)
        },
    )
    .await
}

/// Serves one connection that an application accepted itself, as
/// [`serve`] serves each of its own: counted in `options`' limits under
/// `peer`, TLS first if `options` has it, then the upgrade (or the answer
/// to a plain HTTP request), then the session; the handshake timeout counts
/// from now. Until the login at most [`pre_auth_budget`] bytes are read.
/// `None` when the connection never became a session (refused by the
/// limits, a failed TLS handshake or upgrade, a plain HTTP request; logged
/// with `peer`).
pub fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    comet: &Comet,
    options: &WsOptions,
) -> impl Future<Output = Option<SessionEnd>> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match options.common.limits.admit(peer, "websocket") {
        Some(admission) => {
            let endpoint = (options.path.clone(), options.static_files.clone());
            let tls = options.common.tls.as_ref();
            Either::Left(connection(
                comet.clone(),
                stream,
                peer,
                endpoint,
                tls,
                admission,
            ))
        }
        None => Either::Right(std::future::ready(None)),
    }
}

/// The endpoint's path and the static files beside it.
type Endpoint = (Arc<str>, Option<StaticFiles>);

/// What a connection's handshake hands to its session.
struct Upgraded<S> {
    ws: WebSocketStream<Rewind<Budgeted<S>>>,
    budget: ReadBudget,
    request: Option<Box<http::request::Parts>>,
    tls: Option<Box<TlsInfo>>,
}

/// An admitted connection, from the TLS handshake (with `tls`) through
/// the upgrade (one boxed handshake future, see [`then_serve`]) to the
/// session's end.
fn connection<S>(
    comet: Comet,
    stream: S,
    peer: SocketAddr,
    (path, files): Endpoint,
    tls: Option<&TlsConfig>,
    admission: Admission,
) -> impl Future<Output = Option<SessionEnd>> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = handshake_deadline(&comet, &admission);
    match tls.cloned() {
        None => {
            let handshake = upgrade(comet.clone(), stream, peer, path, files, deadline, None);
            Either::Left(session_after(handshake, comet, peer, admission))
        }
        Some(tls) => {
            let c = comet.clone();
            let handshake = async move {
                let (stream, info) = tls_handshake(&tls, stream, peer, deadline).await?;
                upgrade(c, stream, peer, path, files, deadline, Some(info)).await
            };
            Either::Right(session_after(handshake, comet, peer, admission))
        }
    }
}

/// The session on the connection `handshake` upgrades, if it does.
fn session_after<S>(
    handshake: impl Future<Output = Option<Upgraded<S>>> + Send + 'static,
    comet: Comet,
    peer: SocketAddr,
    admission: Admission,
) -> impl Future<Output = Option<SessionEnd>> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    then_serve(handshake, move |upgraded: Upgraded<S>| {
        let Upgraded {
            ws,
            budget,
            request,
            tls,
        } = upgraded;
        serve_upgraded(comet, ws, peer, admission, Some(budget), request, tls)
    })
}

/// Reads the request head by `deadline` (at most [`UPGRADE_ALLOWANCE`]
/// bytes, counted in the pre-login read budget): a plain request is
/// answered (from `files`, 426 or 404) and the connection closed (`None`);
/// an upgrade on `path` is completed, the head read again by the
/// handshake. The upgrade request's method, URI, version and headers go
/// to the authenticator ([`AuthContext`](comet_core::AuthContext)).
async fn upgrade<S>(
    comet: Comet,
    stream: S,
    peer: SocketAddr,
    path: Arc<str>,
    files: Option<StaticFiles>,
    deadline: tokio::time::Instant,
    tls: Option<Box<TlsInfo>>,
) -> Option<Upgraded<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let budget = ReadBudget::new(pre_auth_budget(comet.config()));
    let mut stream = Budgeted::new(stream, budget.clone());
    let routed = route(&mut stream, files.as_ref(), &path, UPGRADE_ALLOWANCE);
    let head = match tokio::time::timeout_at(deadline, routed).await {
        Ok(Ok(Routed::Upgrade(head))) => head,
        Ok(Ok(Routed::Answered)) => return None,
        Ok(Err(e)) => {
            tracing::debug!(%peer, cause = %e, "http request failed");
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, "http request not completed within the handshake timeout");
            return None;
        }
    };
    let mut request = None;
    // tungstenite's callback signature fixes the error type.
    #[allow(clippy::result_large_err)]
    let check_path = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == &*path {
            request = Some(Box::new(request_parts(req)));
            Ok(resp)
        } else {
            let mut not_found =
                ErrorResponse::new(Some(format!("no comet endpoint at {}", req.uri().path())));
            *not_found.status_mut() = http::StatusCode::NOT_FOUND;
            Err(not_found)
        }
    };
    let config = ws_config(comet.config().max_body);
    let stream = Rewind::new(head, stream);
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(config));
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(ws)) => Some(Upgraded {
            ws,
            budget,
            request,
            tls,
        }),
        Ok(Err(e)) => {
            tracing::warn!(%peer, cause = %e, "websocket upgrade failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "websocket upgrade not completed within the handshake timeout");
            None
        }
    }
}

/// A copy of an upgrade request's method, URI, version and headers (not
/// its extensions, which belong to the server that read it).
pub(crate) fn request_parts<B>(req: &http::Request<B>) -> http::request::Parts {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = req.method().clone();
    parts.uri = req.uri().clone();
    parts.version = req.version();
    parts.headers = req.headers().clone();
    parts
}

/// Serves one upgraded WebSocket connection to its end: waits for the
/// first data frame, which fixes the mode, then runs the session. The first
/// data frame and op 7 must arrive within the handshake timeout of the
/// accept, and messages before the login may be at most
/// [`auth_message_limit`] long; `budget` (if any) is lifted at login.
/// `request` and `tls` (boxed: the connection's futures carry them until
/// here) go to the authenticator.
///
/// Not an `async fn`: the wait for the first message is chained to the
/// session, so the future holds one or the other, and its arguments only
/// until they are used.
pub(crate) fn serve_upgraded<S>(
    comet: Comet,
    ws: WebSocketStream<S>,
    peer: SocketAddr,
    admission: Admission,
    budget: Option<ReadBudget>,
    request: Option<Box<http::request::Parts>>,
    tls: Option<Box<TlsInfo>>,
) -> impl Future<Output = SessionEnd> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sink, stream) = ws.split();
    let sink = WsSink {
        inner: sink,
        mode: WireMode::Binary,
    };
    let deadline = handshake_deadline(&comet, &admission);
    let limits = (
        comet.config().auth_body_limit(),
        auth_message_limit(comet.config()),
    );
    let first = first_message(stream, sink, deadline, peer, limits);
    first.then(move |halves| {
        let (frames, sink) = match halves {
            Ok(halves) => halves,
            Err(end) => return Either::Right(std::future::ready(end)),
        };
        let mut info = comet.conn_info(Transport::WebSocket, frames.mode, peer);
        info.accepted_at = admission.accepted_at();
        if let Some(request) = request {
            info = info.with_request(*request);
        }
        if let Some(tls) = tls {
            info = info.with_tls(*tls);
        }
        let max_body = comet.config().max_body;
        let frames = LoginGuard::new(frames, admission, move |frames: &mut WsFrames<S>| {
            frames.max_body = max_body;
            frames.max_message = None;
            if let Some(budget) = budget {
                budget.lift();
            }
        });
        Either::Left(comet.serve(info, frames, sink))
    })
}

/// Waits for the first data message, which fixes the wire mode, until
/// `deadline`; returns the frame stream (holding that message) and the sink
/// in that mode. `(max_body, max_message)` are the limits before the
/// login.
async fn first_message<S>(
    mut stream: SplitStream<WebSocketStream<S>>,
    mut sink: WsSink<S>,
    deadline: tokio::time::Instant,
    peer: SocketAddr,
    (max_body, max_message): (usize, usize),
) -> Result<(WsFrames<S>, WsSink<S>), SessionEnd>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let first = tokio::time::timeout_at(deadline, async {
        loop {
            match stream.next().await {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => return Some(Ok(msg)),
                Some(Ok(Message::Close(_))) | None => return None,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(Err(e)),
            }
        }
    })
    .await;
    let first = match first {
        Ok(Some(first)) => first,
        Ok(None) => return Err(SessionEnd::PeerClosed),
        Err(_) => {
            tracing::info!(%peer, "no data frame within the handshake timeout");
            let _ = sink
                .send(Outgoing::Close {
                    code: 1008,
                    reason: "no op 7 within the handshake timeout".into(),
                })
                .await;
            return Err(SessionEnd::HandshakeTimeout);
        }
    };
    let mode = match first {
        Ok(Message::Text(_)) => WireMode::Json,
        _ => WireMode::Binary,
    };
    sink.mode = mode;
    let mut frames = WsFrames {
        inner: stream,
        mode,
        max_body,
        max_message: Some(max_message),
        batch: Vec::new().into_iter(),
        next: None,
        failed: false,
    };
    // A broken first message reaches the engine as an error like any other,
    // which logs, counts and closes with the right code.
    match first {
        Ok(msg) => frames.accept(msg),
        Err(e) => frames.next = Some(Err(map_error(e))),
    }
    Ok((frames, sink))
}

fn map_error(e: tungstenite::Error) -> FrameError {
    use tungstenite::error::CapacityError;
    match e {
        tungstenite::Error::Io(e) => {
            match e.get_ref().and_then(|e| e.downcast_ref::<BudgetSpent>()) {
                Some(spent) => FrameError::MessageTooLarge {
                    len: spent.budget + 1,
                    max: spent.budget,
                },
                None => FrameError::Io(e),
            }
        }
        tungstenite::Error::Utf8(_) => FrameError::Json("text frame is not valid UTF-8".into()),
        tungstenite::Error::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            FrameError::MessageTooLarge {
                len: size,
                max: max_size,
            }
        }
        other => FrameError::Transport(other.to_string()),
    }
}

/// Decoded frames from a WebSocket: one per text message, one or more per
/// binary message. Between messages it holds no allocation: a text
/// message's frame (or any error) waits in `next`, a binary message's frames
/// in the vector `split_frames` made, freed once the last is taken.
struct WsFrames<S> {
    inner: SplitStream<WebSocketStream<S>>,
    mode: WireMode,
    /// The frame body limit: op 7's until the login, then `max_body`.
    max_body: usize,
    /// The message limit before the login; none after it (tungstenite's).
    max_message: Option<usize>,
    batch: std::vec::IntoIter<Frame>,
    next: Option<Result<Frame, FrameError>>,
    failed: bool,
}

impl<S> WsFrames<S> {
    /// Takes in the frames of one data message (other messages are
    /// ignored). Called only when the previous message's are all out.
    fn accept(&mut self, msg: Message) {
        if let Some(max) = self.max_message {
            if msg.is_text() || msg.is_binary() {
                let len = msg.len();
                if len > max {
                    self.next = Some(Err(FrameError::MessageTooLarge { len, max }));
                    return;
                }
            }
        }
        self.next = match (msg, self.mode) {
            (Message::Text(text), WireMode::Json) => Some(json::decode_frame(Bytes::from(text))),
            (Message::Binary(data), WireMode::Binary) => match split_frames(data, self.max_body) {
                Ok(frames) => {
                    self.batch = frames.into_iter();
                    None
                }
                Err(e) => Some(Err(e)),
            },
            (Message::Text(_), WireMode::Binary) => {
                Some(Err(FrameError::WrongMode("text", "binary-mode")))
            }
            (Message::Binary(_), WireMode::Json) => {
                Some(Err(FrameError::WrongMode("binary", "text-mode")))
            }
            _ => None,
        };
    }
}

impl<S> Stream for WsFrames<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Result<Frame, FrameError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.batch.next() {
                if this.batch.len() == 0 {
                    this.batch = Vec::new().into_iter();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            if let Some(item) = this.next.take() {
                if item.is_err() {
                    this.failed = true;
                }
                return Poll::Ready(Some(item));
            }
            if this.failed {
                return Poll::Ready(None);
            }
            match ready!(this.inner.poll_next_unpin(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(Message::Close(_))) => return Poll::Ready(None),
                Some(Ok(msg)) => this.accept(msg),
                // A peer that vanishes without a close frame has hung up; it
                // broke no protocol rule worth a warning.
                Some(Err(
                    tungstenite::Error::ConnectionClosed
                    | tungstenite::Error::AlreadyClosed
                    | tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ),
                )) => return Poll::Ready(None),
                Some(Err(e)) => this.next = Some(Err(map_error(e))),
            }
        }
    }
}

/// Wire units to WebSocket messages: binary units as binary messages, JSON
/// units as text messages, `Close` as a close frame with its code.
struct WsSink<S> {
    inner: SplitSink<WebSocketStream<S>, Message>,
    mode: WireMode,
}

impl<S> Sink<Outgoing> for WsSink<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Error = tungstenite::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().inner.poll_ready_unpin(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Outgoing) -> Result<(), Self::Error> {
        let this = self.get_mut();
        let msg = match item {
            Outgoing::Data(bytes) => match this.mode {
                WireMode::Binary => Message::Binary(bytes),
                WireMode::Json => Message::Text(Utf8Bytes::try_from(bytes).map_err(|_| {
                    tungstenite::Error::Utf8("comet produced a non-UTF-8 JSON frame".into())
                })?),
            },
            Outgoing::Close { code, mut reason } => {
                // A close frame's payload is at most 125 bytes: 2 for the
                // code, 123 for the reason (cut on a character boundary).
                if reason.len() > 123 {
                    let mut end = 123;
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    reason.truncate(end);
                }
                Message::Close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                }))
            }
        };
        this.inner.start_send_unpin(msg)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().inner.poll_flush_unpin(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().inner.poll_close_unpin(cx)
    }
}
