//! The transport-agnostic session engine: one connection from handshake to
//! close.

use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures_util::{FutureExt as _, Sink, SinkExt, Stream, StreamExt};
use std::panic::AssertUnwindSafe;
use tower::Service;
use tracing::Instrument;

use crate::auth::{AuthContext, AuthOutcome, AuthRequest, ConnInfo, Identity, TlsInfo};
use crate::codec::{BatchWriter, Units};
use crate::comet::Comet;
use crate::engine::{Engine, Event};
use crate::error::FrameError;
use crate::frame::{op, Frame, WireMode};
use crate::middleware::{ConnContext, FrameRequest, Stack};
use crate::payload::AuthReply;
use crate::queue::Outbound;
use crate::registry::{Kick, SessionHandle, Shared};
use crate::store::Offline;
use crate::Mid;

/// Queue slots a writer keeps between bursts.
const IDLE_CAPACITY: usize = 64;

/// Offline-inbox entries read, written and removed at a time at login.
const INBOX_PAGE: usize = 64;

/// How long a session waits to hand its close frame to a transport, and for
/// the transport to close, when the peer is not accepting writes.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// One unit for the transport to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// Encoded bytes: in binary mode one or more whole frames (one write, or
    /// one binary WebSocket message); in JSON mode exactly one frame object
    /// (one text WebSocket message).
    Data(Bytes),
    /// Close the connection; WebSocket transports send this close code and
    /// reason, TCP just closes.
    Close {
        /// WebSocket close code (1000 normal, 1001 going away, 1002 protocol
        /// error, 1007 invalid payload, 1008 policy violation).
        code: u16,
        /// A reason a person can read.
        reason: String,
    },
}

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The peer closed the connection.
    PeerClosed,
    /// No op 7 within the handshake timeout.
    HandshakeTimeout,
    /// Nothing received within the heartbeat timeout.
    HeartbeatTimeout,
    /// The peer broke the protocol (bad frame, op before op 7, op 7 twice),
    /// with the WebSocket close code that says so.
    Protocol(u16, String),
    /// The login was refused or could not be checked.
    AuthFailed(String),
    /// Its outbound queue hit its bound.
    SlowConsumer,
    /// The application disconnected it.
    Disconnected,
    /// Its mid logged in on more sessions than allowed; this was the oldest.
    Replaced,
    /// A plug-in, layer or handler panicked while serving it.
    Panic(String),
    /// The comet is shutting down.
    Shutdown,
    /// A layer or handler returned an error.
    Handler(String),
    /// The frame-rate limit closed it.
    RateLimited(String),
    /// Writing to the transport failed.
    Transport(String),
    /// The message store failed while the session needed it (its offline
    /// inbox could not be read).
    Store(String),
}

impl SessionEnd {
    fn protocol(engine: &Engine, e: &FrameError) -> Self {
        if matches!(
            e,
            FrameError::BodyTooLarge { .. } | FrameError::MessageTooLarge { .. }
        ) {
            engine.stats.oversized_frame();
        }
        SessionEnd::Protocol(e.ws_close_code(), e.to_string())
    }

    /// Why a kicked session ends.
    fn kicked(why: Kick) -> Self {
        match why {
            Kick::SlowConsumer => SessionEnd::SlowConsumer,
            Kick::Replaced => SessionEnd::Replaced,
            Kick::Shutdown => SessionEnd::Shutdown,
            Kick::Disconnected | Kick::None => SessionEnd::Disconnected,
        }
    }

    fn close_frame(&self) -> Option<(u16, String)> {
        Some(match self {
            SessionEnd::PeerClosed | SessionEnd::Transport(_) => return None,
            SessionEnd::HandshakeTimeout => (1008, "no op 7 within the handshake timeout".into()),
            SessionEnd::HeartbeatTimeout => (1001, "heartbeat timeout".into()),
            SessionEnd::Protocol(code, r) => (*code, r.clone()),
            SessionEnd::AuthFailed(r) => (1008, r.clone()),
            SessionEnd::SlowConsumer => (1008, "outbound queue limit reached".into()),
            SessionEnd::Disconnected => (1000, "disconnected by the server".into()),
            SessionEnd::Replaced => (1008, "replaced by a newer session of the same mid".into()),
            SessionEnd::Panic(_) => (1011, "internal error".into()),
            SessionEnd::Shutdown => (1001, "server shutting down".into()),
            SessionEnd::Handler(r) => (1011, r.clone()),
            SessionEnd::RateLimited(r) => (1008, r.clone()),
            SessionEnd::Store(_) => (1011, "message store unavailable".into()),
        })
    }
}

/// Counts a served connection for [`Comet::idle`].
struct Active<'a>(&'a Engine);

impl<'a> Active<'a> {
    fn new(engine: &'a Engine) -> Self {
        engine.active.fetch_add(1, Ordering::AcqRel);
        Active(engine)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Removes the session from the registry however the task ends (panics too).
struct Registered<'a> {
    engine: &'a Engine,
    mid: Mid,
    conn_id: u64,
    /// Whether the cluster broker accepted the session's login (and so
    /// must hear of its end).
    brokered: bool,
}

impl<'a> Registered<'a> {
    /// Unregisters now, and returns a guard that keeps a new login of the
    /// mid waiting (bounded) until it is dropped.
    fn settle(self) -> crate::registry::Inflight<'a> {
        let this = std::mem::ManuallyDrop::new(self);
        let settling = this
            .engine
            .registry
            .unregister_settling(this.mid, this.conn_id);
        this.logout();
        settling
    }

    /// Tells the cluster broker (if it accepted the login) the session ended.
    fn logout(&self) {
        if self.brokered {
            if let Some(broker) = &self.engine.broker {
                broker.logout(self.mid);
            }
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.engine.registry.unregister(self.mid, self.conn_id);
        self.logout();
    }
}

/// Encodes queue items into wire units.
struct Writer<'e> {
    mode: WireMode,
    tel: &'e crate::telemetry::Telemetry,
    batch: BatchWriter,
    units: Units,
    /// Whether anything but heartbeat replies was written since the last
    /// flush. A flush of heartbeat replies alone marks an idle connection,
    /// which then gives its buffers back; a busy one reuses them.
    busy: bool,
    /// The seq of the newest offline-inbox entry encoded since the last
    /// flush.
    inbox_seq: Option<u64>,
}

impl<'e> Writer<'e> {
    fn new(mode: WireMode, max_body: usize, tel: &'e crate::telemetry::Telemetry) -> Self {
        Writer {
            mode,
            tel,
            batch: BatchWriter::new(mode, max_body),
            units: Units::default(),
            busy: false,
            inbox_seq: None,
        }
    }

    /// After a flush: the inbox entries it carried are written.
    fn mark_inbox_written(&mut self, shared: &Shared) {
        if let Some(seq) = self.inbox_seq.take() {
            shared.inbox_written.fetch_max(seq, Ordering::AcqRel);
        }
    }

    /// Counts the open op 9 batch, if any, as it is about to close.
    fn count_batch(&self) {
        let n = self.batch.len();
        if n > 0 {
            self.tel.batch(n);
        }
    }

    fn take_unit(&mut self) {
        self.count_batch();
        if let Some(unit) = self.batch.take() {
            self.units.push_back(unit);
        }
    }

    fn frame(&mut self, frame: &Frame) {
        // A flush of op 8 or heartbeat replies alone leaves an idle session.
        self.busy |= !matches!(frame.op, op::HEARTBEAT_REPLY | op::AUTH_REPLY);
        self.tel.frame_out(frame.op);
        // The open op 9 closes here (and is counted once: `take_unit`
        // counts it in JSON mode, `push_frame` closes it in binary mode).
        if self.mode == WireMode::Json {
            self.take_unit();
        } else {
            self.count_batch();
        }
        self.batch.push_frame(frame);
        if self.mode == WireMode::Json {
            self.take_unit();
        }
    }

    fn message(&mut self, msg: &crate::message::Message) {
        self.encoded(msg.wire(self.mode));
    }

    /// Adds one encoded inner frame to the current op 9.
    #[inline]
    fn encoded(&mut self, wire: &Bytes) {
        self.busy = true;
        if !self.batch.push(wire) {
            self.next_batch(wire);
        }
    }

    /// Closes the full op 9 and opens the next one with `wire`.
    #[inline(never)]
    fn next_batch(&mut self, wire: &Bytes) {
        match self.mode {
            WireMode::Json => self.take_unit(),
            WireMode::Binary => {
                self.count_batch();
                self.batch.finish()
            }
        }
        self.batch.push(wire);
    }

    fn item(&mut self, item: &Outbound) {
        match item {
            Outbound::Frame(f) => self.frame(f),
            Outbound::Message(m) => self.message(m),
            // Encoded without filling the message's cache: an inbox keeps
            // no per-mode copies.
            Outbound::Inbox(m, seq) => {
                self.encoded(&m.delivered().encode_frame(self.mode));
                self.inbox_seq = Some(*seq);
            }
        }
    }

    /// Writes everything encoded so far. `Ok(true)`: the flush carried
    /// heartbeat replies alone, so the session looks idle and the writer
    /// gave its buffers back.
    async fn flush<Si>(&mut self, sink: &mut Si) -> Result<bool, String>
    where
        Si: Sink<Outgoing> + Unpin,
        Si::Error: fmt::Display,
    {
        self.take_unit();
        // Each unit leaves the list only once the sink has it: a flush
        // interrupted by shutdown resumes where it stopped.
        while let Some(unit) = self.units.front() {
            sink.feed(Outgoing::Data(unit.clone()))
                .await
                .map_err(|e| e.to_string())?;
            self.units.pop_front();
        }
        sink.flush().await.map_err(|e| e.to_string())?;
        let idle = !std::mem::take(&mut self.busy);
        if idle {
            self.release();
        }
        Ok(idle)
    }

    /// Gives back buffers kept for the next flush.
    fn release(&mut self) {
        self.units.shrink();
        self.batch.release();
    }
}

/// The message of a caught panic.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}

/// One session's future. Not an `async fn` wrapping an async block: that
/// would keep every argument twice (rust-lang/rust#62958), and this future is
/// most of what an idle connection costs.
pub(crate) fn run<St, Si>(
    engine: Arc<Engine>,
    comet: Comet,
    mut conn: ConnInfo,
    mut inbound: St,
    mut outbound: Si,
) -> impl Future<Output = SessionEnd>
where
    St: Stream<Item = Result<Frame, FrameError>> + Unpin + Send,
    Si: Sink<Outgoing> + Unpin + Send,
    Si::Error: fmt::Display,
{
    let span = tracing::debug_span!("session", conn_id = conn.conn_id, peer = %conn.peer, mid = tracing::field::Empty);
    async move {
        let engine_ref = &*engine;
        let _active = Active::new(engine_ref);
        engine_ref.stats.connection();
        let _connected = engine_ref.stats.tel.connection(conn.transport, conn.mode);
        let (end, mid, extensions) = 'session: {
            // A statement of its own, so that the handshake's result is not
            // kept in the session's future beside the established session.
            // Boxed: the login's state (the upgrade request, the auth
            // context, the authenticator's call) is larger than the
            // established session's, and an inline future would keep room
            // for it for the connection's whole life.
            let (request, tls) = conn.take_handshake();
            let (identity, auth_frame) = match Box::pin(handshake(
                engine_ref,
                &conn,
                (request, tls),
                &mut inbound,
                &mut outbound,
            ))
            .await
            {
                Ok(login) => login,
                Err(end) => break 'session (end, None, None),
            };
            // `identity` is only moved, never borrowed, here and in
            // `established`: a borrowed local keeps its room in the future
            // for as long as it is in scope.
            tracing::Span::current().record("mid", identity.mid);
            let mid = identity.mid;
            let (end, extensions) = established(
                engine_ref,
                comet,
                &conn,
                identity,
                &auth_frame,
                &mut inbound,
                &mut outbound,
            )
            .await;
            (end, Some(mid), Some(extensions))
        };
        engine_ref.stats.tel.close(&end);
        match &end {
            SessionEnd::Protocol(_, cause) => {
                engine_ref.stats.protocol_error();
                tracing::warn!(peer = %conn.peer, cause = %cause, "closing connection: protocol error");
            }
            SessionEnd::HandshakeTimeout | SessionEnd::HeartbeatTimeout => {
                engine_ref.stats.timeout();
                tracing::info!(peer = %conn.peer, reason = ?end, "closing silent connection");
            }
            SessionEnd::SlowConsumer => {
                engine_ref.stats.slow_consumer();
                tracing::warn!(peer = %conn.peer, mid, "closing slow consumer: outbound queue limit reached");
            }
            SessionEnd::Handler(cause) => {
                engine_ref.stats.handler_error();
                tracing::warn!(peer = %conn.peer, cause = %cause, "closing connection: handler error");
            }
            SessionEnd::Panic(cause) => {
                engine_ref.stats.panic();
                engine_ref.stats.tel.panic();
                tracing::error!(peer = %conn.peer, mid, cause = %cause, "closing connection: panic while serving it");
            }
            other => tracing::debug!(reason = ?other, "session ended"),
        }
        // The close frame (if the end calls for one), then the transport's
        // own close. Best effort, and bounded: the peer may be gone or not
        // reading.
        let close = async {
            if let Some((code, reason)) = end.close_frame() {
                outbound.feed(Outgoing::Close { code, reason }).await?;
            }
            outbound.close().await
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
        engine_ref.emit(|| Event::Disconnected {
            conn,
            mid,
            reason: end.clone(),
            extensions: extensions.unwrap_or_default(),
        });
        end
    }
    .instrument(span)
}

/// Waits for op 7 and authenticates. On failure the op 8 reply (if any) has
/// been written and the returned end says why.
async fn handshake<St, Si>(
    engine: &Engine,
    conn: &ConnInfo,
    (request, tls): (Option<http::request::Parts>, Option<TlsInfo>),
    inbound: &mut St,
    outbound: &mut Si,
) -> Result<(Identity, Frame), SessionEnd>
where
    St: Stream<Item = Result<Frame, FrameError>> + Unpin + Send,
    Si: Sink<Outgoing> + Unpin + Send,
    Si::Error: fmt::Display,
{
    let cfg = &engine.config;
    let first = tokio::select! {
        first = tokio::time::timeout_at(conn.accepted_at + cfg.handshake_timeout, inbound.next()) => first,
        _ = engine.shutdown.cancelled() => return Err(SessionEnd::Shutdown),
    };
    let frame = match first {
        Err(_) => return Err(SessionEnd::HandshakeTimeout),
        Ok(None) => return Err(SessionEnd::PeerClosed),
        Ok(Some(Err(FrameError::Io(e)))) => return Err(SessionEnd::Transport(e.to_string())),
        Ok(Some(Err(e))) => return Err(SessionEnd::protocol(engine, &e)),
        Ok(Some(Ok(frame))) if frame.op != op::AUTH => {
            return Err(SessionEnd::Protocol(
                1002,
                format!("op {} before op 7", frame.op),
            ))
        }
        Ok(Some(Ok(frame))) => frame,
    };
    let outcome = match AuthRequest::parse(&frame.body) {
        Err(e) => Err(e.to_string()),
        Ok(req) => {
            let mut ctx = AuthContext::new(req, conn.clone());
            if let Some(parts) = request {
                ctx = ctx.with_request(parts);
            }
            if let Some(tls) = tls {
                ctx = ctx.with_tls(tls);
            }
            let call = engine.bounded("authenticator", engine.auth.authenticate(&ctx));
            match AssertUnwindSafe(call).catch_unwind().await {
                Ok(Ok(AuthOutcome::Accepted(identity))) => Ok(identity),
                Ok(Ok(AuthOutcome::Denied(reason))) => Err(reason),
                Ok(Err(_)) => Err("authentication backend unavailable".to_string()),
                Err(panic) => {
                    engine.stats.panic();
                    engine.stats.tel.panic();
                    tracing::error!(peer = %conn.peer, cause = %panic_text(&panic), "authenticator panicked");
                    Err("authentication backend unavailable".to_string())
                }
            }
        }
    };
    match outcome {
        // Only the header is kept for the op 8 reply: the body is a view
        // into the read buffer, which could not be reused while it lives.
        Ok(identity) => Ok((identity, frame.reply(frame.op, Bytes::new()))),
        Err(reason) => {
            engine.stats.auth_fail();
            engine.stats.tel.login(false);
            tracing::info!(peer = %conn.peer, reason = %reason, "login refused");
            let reply = frame.reply(
                op::AUTH_REPLY,
                AuthReply::Failed {
                    error: reason.clone(),
                }
                .encode(),
            );
            let mut writer = Writer::new(conn.mode, cfg.max_body, &engine.stats.tel);
            writer.frame(&reply);
            let _ = writer.flush(outbound).await;
            Err(SessionEnd::AuthFailed(reason))
        }
    }
}

async fn established<St, Si>(
    engine: &Engine,
    comet: Comet,
    conn: &ConnInfo,
    identity: Identity,
    auth_frame: &Frame,
    inbound: &mut St,
    outbound: &mut Si,
) -> (SessionEnd, Arc<http::Extensions>)
where
    St: Stream<Item = Result<Frame, FrameError>> + Unpin + Send,
    Si: Sink<Outgoing> + Unpin + Send,
    Si::Error: fmt::Display,
{
    let cfg = &engine.config;
    let mid = identity.mid;
    // Registration and the inbox's first page are awaited in a boxed future
    // of their own, dropped before the steady state starts: the session's
    // future keeps room only for what an established session awaits.
    let (handle, registered, page) =
        match Box::pin(login(engine, conn, mid, auth_frame, outbound)).await {
            Ok(login) => login,
            Err(end) => return (end, identity.shared_extensions().clone()),
        };

    // op 8 first; the inbox follows through the queue at the client's
    // pace (see `deliver_inbox`), and live messages wait until it is done.
    let mut writer = Writer::new(conn.mode, cfg.max_body, &engine.stats.tel);
    let _session = engine.stats.tel.session(conn.transport, conn.mode);
    handle.push_frame(auth_frame.reply(op::AUTH_REPLY, AuthReply::Ok { mid }.encode()));
    let ctx = Arc::new(ConnContext {
        conn: conn.clone(),
        identity,
        comet,
        handle: handle.clone(),
    });
    engine.emit(|| Event::Authenticated {
        conn: conn.clone(),
        mid,
        extensions: ctx.identity.shared_extensions().clone(),
    });
    let shared = handle.shared().clone();
    let end = {
        let reader = read_loop(engine, &ctx, &handle, inbound);
        let writing = write_loop(&mut writer, outbound, &shared);
        // Kicks are watched on their own, so a writer stuck on a peer that
        // stopped reading is still cut off.
        let kicked = std::future::poll_fn(|cx| shared.poll_kicked(cx));
        tokio::pin!(reader, writing, kicked);
        // The inbox runs beside them, boxed and dropped once done: an idle
        // session keeps no room for it in its future.
        let inbox = Box::pin(deliver_inbox(engine, mid, &handle, page));
        let first = tokio::select! {
            end = &mut reader => Some(end),
            end = &mut writing => Some(end),
            why = &mut kicked => Some(SessionEnd::kicked(why)),
            done = inbox => done.err(),
        };
        match first {
            Some(end) => end,
            None => tokio::select! {
                end = reader => end,
                end = writing => end,
                why = kicked => SessionEnd::kicked(why),
            },
        }
    };
    // No new deliveries from here on; a new login of this mid waits until
    // the inbox work below is done.
    let settling = registered.settle();
    let extensions = ctx.identity.shared_extensions().clone();
    drop(ctx);
    // Live messages held back behind an inbox that was not done go to the
    // inbox, behind its rest, when this was the mid's last session.
    if let Some(held) = shared.queue.take_held().filter(|h| !h.is_empty()) {
        let msgs = held.into_iter().filter_map(|item| match item {
            Outbound::Message(m) => Some(m),
            _ => None,
        });
        // Boxed: the session's future keeps no room for this rare call.
        Box::pin(engine.registry.put_back(mid, msgs)).await;
    }
    if matches!(
        end,
        SessionEnd::Shutdown | SessionEnd::Disconnected | SessionEnd::PeerClosed
    ) {
        // Write what is already queued (acknowledged messages included).
        for item in shared.queue.close() {
            writer.item(&item);
        }
        let flushed = Box::pin(tokio::time::timeout(
            cfg.shutdown_timeout,
            writer.flush(outbound),
        ))
        .await;
        if matches!(flushed, Ok(Ok(_))) {
            writer.mark_inbox_written(&shared);
        }
    }
    // Inbox entries written before the end leave the store; the rest stay
    // for the next login.
    if shared.inbox_written.load(Ordering::Acquire) > 0 {
        let mut removed = 0;
        let _ = Box::pin(remove_written_inbox(engine, mid, &shared, &mut removed)).await;
    }
    drop(settling);
    (end, extensions)
}

/// Registers the session and reads the inbox's first page. The page is
/// read before op 8 is written: a store that cannot answer refuses the
/// login with a reason (op 8 written here), rather than passing for an
/// empty inbox.
async fn login<'e, Si>(
    engine: &'e Engine,
    conn: &ConnInfo,
    mid: Mid,
    auth_frame: &Frame,
    outbound: &mut Si,
) -> Result<(SessionHandle, Registered<'e>, Vec<Offline>), SessionEnd>
where
    Si: Sink<Outgoing> + Unpin + Send,
    Si::Error: fmt::Display,
{
    let cfg = &engine.config;
    engine.stats.auth_ok();
    engine.stats.tel.login(true);
    let handle = SessionHandle::new(conn.conn_id, mid, conn.mode, cfg.max_outbound_bytes);
    engine
        .registry
        .register(handle.clone(), cfg.max_sessions_per_mid)
        .await;
    let mut registered = Registered {
        engine,
        mid,
        conn_id: conn.conn_id,
        brokered: false,
    };
    if engine.shutdown.is_cancelled() {
        // Registered after `Comet::shutdown` swept the registry.
        handle.shared().kick(Kick::Shutdown);
    }
    let cluster = match &engine.broker {
        // Routed here from now on, before the inbox is read.
        Some(broker) => engine
            .bounded("cluster broker", broker.login(mid))
            .await
            .map(|()| registered.brokered = true)
            .map_err(|cause| ("cluster unavailable", cause)),
        None => Ok(()),
    };
    let page = match cluster {
        Ok(()) => engine
            .bounded("message store", engine.store.offline(mid, INBOX_PAGE))
            .await
            .map_err(|cause| ("message store unavailable", cause)),
        Err(e) => Err(e),
    };
    match page {
        Ok(page) => Ok((handle, registered, page)),
        Err((reason, cause)) => {
            drop(registered);
            engine.stats.auth_fail();
            engine.stats.tel.login(false);
            tracing::warn!(peer = %conn.peer, mid, cause = %cause, reason, "login refused");
            let reason = reason.to_string();
            let mut writer = Writer::new(conn.mode, cfg.max_body, &engine.stats.tel);
            writer.frame(
                &auth_frame.reply(
                    op::AUTH_REPLY,
                    AuthReply::Failed {
                        error: reason.clone(),
                    }
                    .encode(),
                ),
            );
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.flush(outbound)).await;
            Err(SessionEnd::AuthFailed(reason))
        }
    }
}

/// Writes the offline inbox, `page` first, through the session's queue at
/// the client's pace (at most two op 9s of it wait to be written), while
/// the session reads frames, answers heartbeats and replays syncs as usual.
/// Entries leave the store as the writer writes them, so a session that
/// ends half-way leaves exactly the unwritten rest for the next login.
/// Live messages are held back until the inbox is done (PROTOCOL.md 2.1).
/// Returns only on failure (or when the session is closing).
async fn deliver_inbox(
    engine: &Engine,
    mid: Mid,
    handle: &SessionHandle,
    mut page: Vec<Offline>,
) -> Result<(), SessionEnd> {
    let shared = handle.shared();
    let window = 2 * engine.config.max_body;
    let mut removed = 0;
    loop {
        let more = page.len() == INBOX_PAGE;
        for entry in &page {
            if !handle
                .push_replay(&entry.msg, Some(entry.seq), window)
                .await
            {
                return Ok(());
            }
            remove_written_inbox(engine, mid, shared, &mut removed).await?;
        }
        drop(page);
        if !handle.replay_written().await {
            return Ok(());
        }
        remove_written_inbox(engine, mid, shared, &mut removed).await?;
        if !more {
            break;
        }
        page = engine
            .bounded("message store", engine.store.offline(mid, INBOX_PAGE))
            .await
            .map_err(|e| SessionEnd::Store(e.to_string()))?;
    }
    shared.queue.release_held();
    Ok(())
}

/// Removes from the store the inbox entries the writer has written since
/// `removed`.
async fn remove_written_inbox(
    engine: &Engine,
    mid: Mid,
    shared: &Shared,
    removed: &mut u64,
) -> Result<(), SessionEnd> {
    let written = shared.inbox_written.load(Ordering::Acquire);
    if written > *removed {
        engine
            .bounded("message store", engine.store.remove_offline(mid, written))
            .await
            // Written but still stored: the next login gets them again (the
            // client drops them by chatId); this session stops here rather
            // than deliver live messages ahead of an inbox it cannot drain.
            .map_err(|e| SessionEnd::Store(e.to_string()))?;
        *removed = written;
    }
    Ok(())
}

async fn read_loop<St>(
    engine: &Engine,
    ctx: &Arc<ConnContext>,
    handle: &SessionHandle,
    inbound: &mut St,
) -> SessionEnd
where
    St: Stream<Item = Result<Frame, FrameError>> + Unpin + Send,
{
    let mut service = engine.stack();
    // One timer per session, re-armed only when it fires: a frame just moves
    // the deadline (no timer-wheel work per frame).
    let silence = engine.config.heartbeat_timeout;
    let mut deadline = tokio::time::Instant::now() + silence;
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    // The waker the timer holds. A pending `Sleep` registers its waker again
    // on every poll, and the reader is polled on every wake-up of the
    // session (about 700 instructions per 1:1 round trip), so the timer is
    // polled only when it has fired or holds another waker.
    let mut armed: Option<std::task::Waker> = None;
    loop {
        // Scoped so that neither the wake-up, `next` nor `frame` outlives
        // its move into the request: the future keeps no room for them
        // across the call.
        let mut request = {
            let woke = std::future::poll_fn(|cx| {
                if let Poll::Ready(next) = inbound.poll_next_unpin(cx) {
                    return Poll::Ready(Some(next));
                }
                let holds = armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
                if !holds || timer.is_elapsed() {
                    // Unconstrained: out of coop budget, a `Sleep` would answer
                    // Pending without registering the waker recorded below.
                    let mut poll = tokio::task::coop::unconstrained(timer.as_mut());
                    if std::pin::Pin::new(&mut poll).poll(cx).is_ready() {
                        armed = None;
                        return Poll::Ready(None);
                    }
                    armed = Some(cx.waker().clone());
                }
                Poll::Pending
            })
            .await;
            let Some(next) = woke else {
                if tokio::time::Instant::now() >= deadline {
                    return SessionEnd::HeartbeatTimeout;
                }
                timer.as_mut().reset(deadline);
                continue;
            };
            let frame = match next {
                None => return SessionEnd::PeerClosed,
                Some(Err(FrameError::Io(e))) => return SessionEnd::Transport(e.to_string()),
                Some(Err(e)) => return SessionEnd::protocol(engine, &e),
                Some(Ok(frame)) => frame,
            };
            deadline = tokio::time::Instant::now() + silence;
            engine.stats.tel.frame_in(frame.op);
            tracing::trace!(
                op = frame.op,
                seq = frame.seq,
                len = frame.body.len(),
                "frame"
            );
            if frame.op == op::AUTH {
                return SessionEnd::Protocol(1002, "op 7 on an authenticated connection".into());
            }
            Some(FrameRequest {
                frame,
                ctx: ctx.clone(),
            })
        };
        let result = match call(&mut service, &mut request).await {
            Ok(result) => result,
            Err(panic) => return SessionEnd::Panic(panic),
        };
        match result {
            Ok(Some(reply)) => {
                // Refused over the bound: the session has been kicked, and
                // ends (and is counted) as a slow consumer.
                handle.push_frame(reply);
            }
            Ok(None) => {}
            Err(e) if e.is::<crate::middleware::RateLimited>() => {
                return SessionEnd::RateLimited(e.to_string())
            }
            Err(e) => return SessionEnd::Handler(e.to_string()),
        }
    }
}

/// Runs one request through the stack to its end, even if the session goes
/// away meanwhile: a call that completes on its first poll (the protocol's
/// own ops with the in-memory plug-ins always do) runs inline, and one that
/// has to wait moves to a task of its own, which the session awaits. A send
/// dropped half-way would leave a stored message (its chatId used) that
/// some recipients never get. `Err` carries a panic's message.
async fn call(
    service: &mut Stack,
    request: &mut Option<FrameRequest>,
) -> Result<Result<crate::middleware::FrameResponse, crate::BoxError>, String> {
    // Readiness, the call and its first poll in one `poll_fn`, with the
    // request in the caller's frame: the session's future holds it once,
    // not a copy per stage. `Ready(None)`: the job has to wait.
    let mut job: Option<<Stack as Service<FrameRequest>>::Future> = None;
    let first = std::future::poll_fn(|cx| {
        let step = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if job.is_none() {
                match service.poll_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                    Poll::Ready(Ok(())) => job = request.take().map(|r| service.call(r)),
                }
            }
            match job.as_mut() {
                Some(running) => match running.as_mut().poll(cx) {
                    Poll::Ready(result) => Poll::Ready(Some(result)),
                    Poll::Pending => Poll::Ready(None),
                },
                None => Poll::Ready(Some(Err("request already taken".into()))),
            }
        }));
        match step {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(done)) => Poll::Ready(Ok(done)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    });
    let job = match (first.await, job) {
        (Ok(Some(result)), _) => return Ok(result),
        (Ok(None), Some(job)) => job,
        (Ok(None), None) => return Ok(Err("request already taken".into())),
        (Err(panic), _) => return Err(panic_text(&panic)),
    };
    // The task keeps the session's span for its log lines.
    match tokio::spawn(job.in_current_span()).await {
        Ok(result) => Ok(result),
        Err(e) if e.is_panic() => Err(panic_text(&e.into_panic())),
        Err(_) => Ok(Err("request cancelled".into())),
    }
}

async fn write_loop<Si>(writer: &mut Writer<'_>, outbound: &mut Si, shared: &Shared) -> SessionEnd
where
    Si: Sink<Outgoing> + Unpin + Send,
    Si::Error: fmt::Display,
{
    let mut items = std::collections::VecDeque::new();
    loop {
        if !std::future::poll_fn(|cx| shared.queue.poll_take(cx, &mut items)).await {
            return SessionEnd::Disconnected;
        }
        for item in items.drain(..) {
            writer.item(&item);
        }
        // No large buffer kept from a burst.
        if items.capacity() > IDLE_CAPACITY {
            items = std::collections::VecDeque::new();
        }
        match writer.flush(outbound).await {
            Err(e) => return SessionEnd::Transport(e),
            Ok(idle) => {
                writer.mark_inbox_written(shared);
                shared.queue.written();
                if idle {
                    // Neither deque stays allocated on an idle session.
                    items = std::collections::VecDeque::new();
                    shared.queue.shrink();
                }
            }
        }
    }
}

#[cfg(test)]
mod writer_metrics {
    use super::*;
    use crate::payload::Delivered;

    /// An op 9 closed by a reply is counted once, in both modes.
    #[test]
    fn a_batch_closed_by_a_reply_is_counted_once() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let tel = metrics::with_local_recorder(&recorder, crate::telemetry::Telemetry::default);
        let msg = crate::message::Message::new(Delivered {
            op: 18,
            chat_id: 1,
            from: 1,
            to: 2,
            msg: Bytes::from_static(b"hi"),
        });
        for mode in [WireMode::Binary, WireMode::Json] {
            let mut writer = Writer::new(mode, 65_536, &tel);
            writer.message(&msg);
            writer.message(&msg);
            writer.frame(&Frame::new(1, op::SEND_TO_USER_REPLY, 1, "{}"));
            writer.message(&msg);
            writer.take_unit();
        }
        let text = handle.render();
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
                .to_owned()
        };
        // Per mode: a batch of 2 closed by the reply, then a batch of 1.
        assert_eq!(value("comet_batch_messages_count"), "4", "{text}");
        assert_eq!(value("comet_batch_messages_sum"), "6", "{text}");
        assert_eq!(value(r#"comet_frames_out_total{op="9"}"#), "4");
        assert_eq!(value(r#"comet_frames_out_total{op="19"}"#), "2");
    }
}
