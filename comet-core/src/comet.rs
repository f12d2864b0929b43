//! The [`Comet`] handle and its builder.

use foldhash::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service, ServiceExt as _};

use crate::auth::{Authenticator, ConnId, ConnInfo, UserDirectory};
use crate::broker::{Broker, NodeStatus};
use crate::config::Config;
use crate::engine::{Engine, EventHook, LayerFn, EVENT_BUFFER, SEND_STRIPES};
use crate::error::{BoxError, FrameError, SendError, SyncError};
use crate::frame::{op, Frame, Transport, WireMode};
use crate::groups::GroupDirectory;
use crate::message::Conversation;
use crate::middleware::{BoxService, FrameRequest, FrameResponse, Handler, Router};
use crate::payload::SendRequest;
use crate::registry::{Delivery, Kick, Registry};
use crate::session::{self, Outgoing, SessionEnd};
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{History, MessageStore};
use crate::{GroupId, Mid};

pub use crate::engine::Event;

type DeliveryFn = Box<dyn FnOnce(Arc<Registry>) -> Arc<dyn Delivery> + Send>;
type BrokerFn = Box<dyn FnOnce(Arc<Registry>) -> Arc<dyn Broker> + Send>;

/// Why [`CometBuilder::build`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A required plug-in was not given.
    #[error("no {0} was given to the builder")]
    Missing(&'static str),
    /// A handler was registered for one of the protocol's own ops.
    #[error("op {0} belongs to the protocol; intercept it with a layer instead")]
    ReservedOp(u32),
    /// A setting is out of range.
    #[error("invalid config: {0}")]
    Config(&'static str),
}

/// Assembles a [`Comet`]: plug-ins, settings, middleware, handlers, hooks.
///
/// ```
/// use comet_core::{Comet, Config};
/// # use comet_core::{async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, Identity};
/// # use comet_core::{Conversation, Draft, History, MessageStore, Message, Offline, GroupDirectory, Members};
/// # use std::sync::Arc;
/// # struct A; #[async_trait] impl Authenticator for A {
/// #   async fn authenticate(&self, c: &AuthContext) -> Result<AuthOutcome, BoxError> {
/// #     Ok(AuthOutcome::Accepted(Identity::new(c.auth_request().mid().unwrap_or(0)))) } }
/// # struct S; #[async_trait] impl MessageStore for S {
/// #   async fn append(&self, d: Draft) -> Result<Arc<Message>, BoxError> { Ok(d.into_message(1)) }
/// #   async fn history(&self, _: Conversation, _: i64, _: usize) -> Result<History, BoxError> { Ok(History::default()) }
/// #   async fn push_offline(&self, _: i32, _: Arc<Message>) -> Result<(), BoxError> { Ok(()) }
/// #   async fn offline(&self, _: i32, _: usize) -> Result<Vec<Offline>, BoxError> { Ok(vec![]) }
/// #   async fn remove_offline(&self, _: i32, _: u64) -> Result<(), BoxError> { Ok(()) } }
/// # struct G; #[async_trait] impl GroupDirectory for G {
/// #   async fn is_member(&self, _: i32, _: i32) -> Result<bool, BoxError> { Ok(false) }
/// #   async fn members(&self, _: i32) -> Result<Members, BoxError> { Ok(Arc::from(vec![])) } }
/// let comet = Comet::builder()
///     .authenticator(Arc::new(A))
///     .store(Arc::new(S))
///     .groups(Arc::new(G))
///     .config(Config::default().with_max_body(8192))
///     .layer(tower::limit::ConcurrencyLimitLayer::new(1))
///     .build()
///     .unwrap();
/// assert_eq!(comet.config().max_msg(), 8192 - 32);
/// ```
#[must_use]
pub struct CometBuilder {
    config: Config,
    auth: Option<Arc<dyn Authenticator>>,
    store: Option<Arc<dyn MessageStore>>,
    groups: Option<Arc<dyn GroupDirectory>>,
    users: Option<Arc<dyn UserDirectory>>,
    layers: Vec<LayerFn>,
    handlers: HashMap<u32, Handler>,
    reserved: Option<u32>,
    events: Vec<EventHook>,
    delivery: Option<DeliveryFn>,
    broker: Option<BrokerFn>,
}

impl fmt::Debug for CometBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CometBuilder")
            .field("config", &self.config)
            .field("layers", &self.layers.len())
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl CometBuilder {
    /// The [`Authenticator`] (required).
    pub fn authenticator(mut self, auth: Arc<dyn Authenticator>) -> Self {
        self.auth = Some(auth);
        self
    }

    /// The [`MessageStore`] (required).
    pub fn store(mut self, store: Arc<dyn MessageStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The [`GroupDirectory`] (required).
    pub fn groups(mut self, groups: Arc<dyn GroupDirectory>) -> Self {
        self.groups = Some(groups);
        self
    }

    /// The application's [`UserDirectory`] (optional): with it, op 18 to a
    /// user that does not exist is refused ("unknown user N") instead of
    /// filling an inbox nobody will ever read.
    pub fn users(mut self, users: Arc<dyn UserDirectory>) -> Self {
        self.users = Some(users);
        self
    }

    /// The engine settings.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Adds a tower layer around the frame service. The first layer added is
    /// the outermost: it sees each frame first. The stack is built once per
    /// authenticated connection, so a layer's service state (a rate limit's
    /// window, say) belongs to that connection; share state across
    /// connections with an `Arc` inside the layer.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<BoxService> + Send + Sync + 'static,
        L::Service: Service<FrameRequest, Response = FrameResponse> + Send + 'static,
        <L::Service as Service<FrameRequest>>::Error: Into<BoxError>,
        <L::Service as Service<FrameRequest>>::Future: Send + 'static,
    {
        self.layers.push(Arc::new(move |inner: BoxService| {
            BoxService::new(layer.layer(inner).map_err(Into::into))
        }));
        self
    }

    /// Routes frames with `op` (an op the protocol leaves to applications) to
    /// `service`. `build` refuses handlers for the protocol's own ops.
    pub fn handler<S>(mut self, op: u32, service: S) -> Self
    where
        S: Service<FrameRequest, Response = FrameResponse> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        if op::is_builtin(op) {
            self.reserved = Some(op);
        } else {
            self.handlers
                .insert(op, Handler::new(service.map_err(Into::into)));
        }
        self
    }

    /// Replaces the delivery seam. `make` receives this node's session
    /// [`Registry`] (which delivers locally and keeps offline messages in the
    /// store) and returns the [`Delivery`] the engine hands every stored
    /// message to — e.g. a multi-node backend that delivers locally through
    /// the registry and forwards to other nodes.
    pub fn delivery(
        mut self,
        make: impl FnOnce(Arc<Registry>) -> Arc<dyn Delivery> + Send + 'static,
    ) -> Self {
        self.delivery = Some(Box::new(make));
        self
    }

    /// Runs this node as one of a cluster (see [`crate::broker`]): `make`
    /// receives this node's session [`Registry`], which the broker's feed
    /// delivers into, and returns the [`Broker`] every send goes through.
    /// The store still serves history (op 22) and offline inboxes, and the
    /// group directory sync's membership checks; they must be the cluster's
    /// shared ones.
    pub fn broker(
        mut self,
        make: impl FnOnce(Arc<Registry>) -> Arc<dyn Broker> + Send + 'static,
    ) -> Self {
        self.broker = Some(Box::new(make));
        self
    }

    /// Adds `hook`, called on every connection event (authenticated,
    /// disconnected). Hooks run in the order they were added, on the
    /// session's task: keep them short and non-blocking. For async work
    /// (a database write on disconnect, say) use
    /// [`Comet::subscribe_events`] instead.
    pub fn on_event(mut self, hook: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.events.push(Arc::new(hook));
        self
    }

    /// Builds the comet.
    pub fn build(self) -> Result<Comet, BuildError> {
        if let Some(op) = self.reserved {
            return Err(BuildError::ReservedOp(op));
        }
        let auth = self.auth.ok_or(BuildError::Missing("authenticator"))?;
        let store = self.store.ok_or(BuildError::Missing("message store"))?;
        let groups = self.groups.ok_or(BuildError::Missing("group directory"))?;
        if self.config.max_body <= crate::frame::MSG_OVERHEAD {
            return Err(BuildError::Config("max_body must be larger than 32"));
        }
        if self.config.max_auth_body == 0 {
            return Err(BuildError::Config("max_auth_body must be greater than 0"));
        }
        if self.config.sync_limit == 0 {
            return Err(BuildError::Config("sync_limit must be greater than 0"));
        }
        let stats = Arc::new(Stats::default());
        let registry = Arc::new(
            Registry::new(store.clone(), stats.clone()).with_hook_timeout(self.config.hook_timeout),
        );
        // `None`: the local registry, called without a boxed future.
        let delivery: Option<Arc<dyn Delivery>> = self.delivery.map(|make| make(registry.clone()));
        let broker = self.broker.map(|make| make(registry.clone()));
        let handlers = Arc::new(self.handlers);
        let layers = self.layers;
        let engine = Arc::new_cyclic(|weak| {
            let router = Router {
                engine: weak.clone(),
                handlers,
            };
            Engine {
                router,
                layers,
                config: self.config,
                auth,
                store,
                groups,
                users: self.users,
                delivery,
                broker,
                registry,
                stats,
                events: self.events.into_boxed_slice(),
                event_tx: tokio::sync::broadcast::Sender::new(EVENT_BUFFER),
                stripes: (0..SEND_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                hasher: Default::default(),
                next_conn: AtomicU64::new(1),
                shutdown: CancellationToken::new(),
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }
        });
        Ok(Comet { engine })
    }
}

/// A running comet: cheap to clone, kept by the application.
///
/// Transports hand it connections ([`serve`](Comet::serve)); the application
/// uses it from its own code to send messages as if a client had sent op 18 /
/// op 20, see who is online, disconnect users and shut down.
#[derive(Clone)]
pub struct Comet {
    engine: Arc<Engine>,
}

impl fmt::Debug for Comet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Comet")
            .field("config", &self.engine.config)
            .field("sessions", &self.engine.registry.session_count())
            .finish_non_exhaustive()
    }
}

impl Comet {
    /// Starts assembling a comet.
    pub fn builder() -> CometBuilder {
        CometBuilder {
            config: Config::default(),
            auth: None,
            store: None,
            groups: None,
            users: None,
            layers: Vec::new(),
            handlers: HashMap::default(),
            reserved: None,
            events: Vec::new(),
            delivery: None,
            broker: None,
        }
    }

    /// The engine settings.
    pub fn config(&self) -> &Config {
        &self.engine.config
    }

    /// Facts for a new connection: a fresh connection id, its transport, wire
    /// mode and peer, accepted now (a transport that accepted it earlier sets
    /// [`ConnInfo::accepted_at`]).
    pub fn conn_info(&self, transport: Transport, mode: WireMode, peer: SocketAddr) -> ConnInfo {
        ConnInfo::new(
            self.engine.next_conn.fetch_add(1, Ordering::Relaxed),
            transport,
            mode,
            peer,
        )
    }

    /// Runs one connection to its end: handshake, authentication, offline
    /// inbox, then frames through the middleware stack while a writer drains
    /// the session's queue in op 9 batches.
    ///
    /// `inbound` yields decoded frames (bodies in `conn.mode`); `outbound`
    /// takes encoded wire units ([`Outgoing`]). Transports, and tests using
    /// channels, share this one loop.
    ///
    /// When the session ends, `outbound` gets the close frame the end calls
    /// for and is closed (both within one second). The returned future owns
    /// everything it needs (it does not borrow `self`); spawn it or await it.
    pub fn serve<St, Si>(
        &self,
        conn: ConnInfo,
        inbound: St,
        outbound: Si,
    ) -> impl Future<Output = SessionEnd>
    where
        St: Stream<Item = Result<Frame, FrameError>> + Unpin + Send,
        Si: Sink<Outgoing> + Unpin + Send,
        Si::Error: fmt::Display,
    {
        session::run(self.engine.clone(), self.clone(), conn, inbound, outbound)
    }

    /// Sends `msg` from `from` to user `to` exactly as if `from` had sent op
    /// 18 over a connection: validated, stored (chatId assigned), delivered to
    /// `to`'s sessions (or inbox) and to `from`'s sessions.
    pub async fn send_to_user(&self, from: Mid, to: Mid, msg: Bytes) -> Result<i64, SendError> {
        let req = SendRequest { from, to, msg };
        self.engine.send(op::SEND_TO_USER, &req, None, None).await
    }

    /// Sends `msg` from member `from` to `group` exactly as if `from` had
    /// sent op 20 (so `from` must be a member).
    pub async fn send_to_group(
        &self,
        from: Mid,
        group: GroupId,
        msg: Bytes,
    ) -> Result<i64, SendError> {
        let req = SendRequest {
            from,
            to: group,
            msg,
        };
        self.engine.send(op::SEND_TO_GROUP, &req, None, None).await
    }

    /// Sends `msg` to `group` as a trusted system sender: like
    /// [`send_to_group`](Self::send_to_group) (validated, stored in the
    /// group's conversation with the next chatId, delivered to every live
    /// member and kept in the inbox of every offline one, counted like a
    /// client's op 20) but without the membership check, so a backend can
    /// post to any group. `from` is what recipients see in the message's
    /// `from` (a bot's or the system's mid; it need not be a member). As
    /// with op 20, `from`'s own live sessions get the message too (the
    /// echo). A group with no members stores the message and delivers it
    /// to nobody else.
    ///
    /// This is the send behind the admin API's `POST /api/send/group` with
    /// `"system": true`.
    pub async fn send_to_group_as_system(
        &self,
        from: Mid,
        group: GroupId,
        msg: Bytes,
    ) -> Result<i64, SendError> {
        let req = SendRequest {
            from,
            to: group,
            msg,
        };
        let result = self
            .engine
            .send_checked(op::SEND_TO_GROUP, &req, None, None, true)
            .await;
        self.engine.stats.tel.send(&result);
        result
    }

    /// Sends `msg` from `from` to each mid of `to`, each as its own 1:1
    /// message exactly as [`send_to_user`](Self::send_to_user): stored in
    /// the `from`–mid conversation with that conversation's next chatId and
    /// delivered (or kept offline). The sends run one after the other, in
    /// the order given, and one failing (an unknown user, say) does not stop
    /// the others: the result holds one outcome per mid, in order.
    pub async fn send_to_users(
        &self,
        from: Mid,
        to: &[Mid],
        msg: Bytes,
    ) -> Vec<Result<i64, SendError>> {
        let mut results = Vec::with_capacity(to.len());
        for &mid in to {
            results.push(self.send_to_user(from, mid, msg.clone()).await);
        }
        results
    }

    /// The group directory this comet was built with (its
    /// [`membership`](GroupDirectory::membership) capability, if any, is
    /// what the admin API's group routes use).
    pub fn groups(&self) -> &Arc<dyn GroupDirectory> {
        &self.engine.groups
    }

    /// Brings the sampled gauges up to date: bytes queued for writing
    /// (`comet_outbound_queued_bytes`, summed over every session) and the
    /// process's resident memory and open file descriptors (see
    /// [`crate::telemetry::sample_process`]), and in cluster mode whether
    /// the broker is ready (`comet_cluster_ready`, 1 or 0). Call it when
    /// the metrics are scraped: it walks every session once.
    pub fn sample_metrics(&self) {
        let (queued, _) = self.engine.registry.pending_bytes();
        self.engine.stats.tel.queued_bytes(queued);
        if let Some(broker) = &self.engine.broker {
            metrics::gauge!("comet_cluster_ready").set(f64::from(u8::from(broker.is_ready())));
        }
        crate::telemetry::sample_process();
    }

    /// The kept messages of `conversation` with a chatId above `after`,
    /// oldest first, at most `limit` of them, with its `oldest` and `head`:
    /// the read behind op 22 (PROTOCOL.md 2.7), for the application's own
    /// routes (a REST "history" endpoint, say). Unlike op 22 it checks no
    /// membership and applies no cap: the application decides who may read
    /// what. A `limit` of 0 reads only `oldest` and `head`.
    ///
    /// ```
    /// # use comet_core::{Comet, Conversation};
    /// # async fn demo(comet: Comet) -> Result<(), comet_core::SyncError> {
    /// let page = comet.history(Conversation::direct(1, 2), 0, 50).await?;
    /// for msg in &page.messages {
    ///     println!("{} from {}", msg.chat_id(), msg.delivered().from);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, SyncError> {
        self.engine.history(conversation, after, limit).await
    }

    /// Whether `mid` has a live session on this node.
    pub fn is_online(&self, mid: Mid) -> bool {
        self.engine.registry.sessions_of(mid) > 0
    }

    /// Number of live sessions of `mid`.
    pub fn sessions_of(&self, mid: Mid) -> usize {
        self.engine.registry.sessions_of(mid)
    }

    /// Mids with at least one live session.
    pub fn online_users(&self) -> Vec<Mid> {
        self.engine.registry.online_mids()
    }

    /// Number of authenticated sessions.
    pub fn session_count(&self) -> usize {
        self.engine.registry.session_count()
    }

    /// Number of connections being served, authenticated or not.
    pub fn connection_count(&self) -> usize {
        self.engine.active.load(Ordering::Acquire)
    }

    /// Closes every session of `mid` on this node; returns how many there
    /// were. In cluster mode, see
    /// [`disconnect_everywhere`](Self::disconnect_everywhere).
    pub fn disconnect(&self, mid: Mid) -> usize {
        self.engine.registry.disconnect(mid)
    }

    /// In cluster mode, the nodes holding a session of `mid` now
    /// ([`Broker::nodes_of`]); `None` on a single node, where
    /// [`sessions_of`](Self::sessions_of) says it all.
    pub async fn nodes_of(&self, mid: Mid) -> Result<Option<Vec<String>>, BoxError> {
        self.ask_broker(|b| b.nodes_of(mid)).await
    }

    /// In cluster mode, the live nodes and their session counts
    /// ([`Broker::nodes`]); `None` on a single node.
    pub async fn nodes(&self) -> Result<Option<Vec<NodeStatus>>, BoxError> {
        self.ask_broker(|b| b.nodes()).await
    }

    /// `call` on the cluster broker, bounded like every broker call;
    /// `None` on a single node.
    async fn ask_broker<'a, T>(
        &'a self,
        call: impl FnOnce(&'a dyn Broker) -> futures_util::future::BoxFuture<'a, Result<T, BoxError>>,
    ) -> Result<Option<T>, BoxError> {
        let Some(broker) = &self.engine.broker else {
            return Ok(None);
        };
        self.engine
            .bounded("cluster broker", call(broker.as_ref()))
            .await
            .map(Some)
    }

    /// Closes every session of `mid` on this node and, in cluster mode, on
    /// every other node ([`Broker::disconnect`]): the admin API's kick.
    /// Returns how many sessions this node had; the other nodes close
    /// theirs as the request reaches them. On a single node it is
    /// [`disconnect`](Self::disconnect). An error (the cluster unreachable)
    /// leaves this node's sessions closed and the others' as they were.
    pub async fn disconnect_everywhere(&self, mid: Mid) -> Result<usize, BoxError> {
        let here = self.engine.registry.disconnect(mid);
        if let Some(broker) = &self.engine.broker {
            self.engine
                .bounded("cluster broker", broker.disconnect(mid))
                .await?;
        }
        Ok(here)
    }

    /// Closes one connection: the authenticated session with id `conn_id`
    /// (from [`Event`]s, [`ConnContext::conn_id`](crate::ConnContext::conn_id)
    /// or [`ConnInfo::conn_id`]), leaving the user's other sessions alone.
    /// It ends as [`disconnect`](Self::disconnect) ends sessions
    /// ([`SessionEnd::Disconnected`], WebSocket close 1000). Returns whether
    /// such a session was live on this node. It walks every session: meant
    /// for occasional calls, not per message.
    pub fn disconnect_conn(&self, conn_id: ConnId) -> bool {
        self.engine.registry.disconnect_conn(conn_id)
    }

    /// Subscribes to connection events, for async observers: every
    /// [`Event`] after this call, in order, as the hooks of
    /// [`CometBuilder::on_event`] see them. Sessions never wait for a
    /// subscriber: one that falls more than 1,024 events behind loses the
    /// oldest (its next `recv` is `Err(RecvError::Lagged(n))`). Events are
    /// only built and sent while someone is subscribed (or a hook is set).
    ///
    /// ```no_run
    /// # async fn demo(comet: comet_core::Comet) {
    /// use comet_core::Event;
    /// use tokio::sync::broadcast::error::RecvError;
    ///
    /// let mut events = comet.subscribe_events();
    /// tokio::spawn(async move {
    ///     loop {
    ///         match events.recv().await {
    ///             Ok(Event::Disconnected { mid: Some(mid), .. }) => {
    ///                 // e.g. write "last seen" to the database
    ///                 let _ = mid;
    ///             }
    ///             Ok(_) => {}
    ///             Err(RecvError::Lagged(missed)) => eprintln!("missed {missed} events"),
    ///             Err(RecvError::Closed) => break,
    ///         }
    ///     }
    /// });
    /// # }
    /// ```
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.engine.event_tx.subscribe()
    }

    /// The engine's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.engine.stats.snapshot()
    }

    /// The local session registry (the default [`Delivery`]).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.engine.registry
    }

    /// Starts a graceful shutdown: every session stops reading, writes what
    /// is queued for it, and closes. New connections are refused.
    pub fn shutdown(&self) {
        // Sessions still logging in watch the token; established ones are
        // kicked (and one registering after this sweep sees the token).
        self.engine.shutdown.cancel();
        self.engine.registry.kick_all(Kick::Shutdown);
    }

    /// Whether this node's [`Broker`] (cluster mode) can take logins and
    /// deliver now ([`Broker::is_ready`]); always `true` on a single node.
    pub fn broker_ready(&self) -> bool {
        self.engine.broker.as_ref().is_none_or(|b| b.is_ready())
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.engine.shutdown.is_cancelled()
    }

    /// Resolves once shutdown was called.
    pub async fn shutdown_requested(&self) {
        self.engine.shutdown.cancelled().await
    }

    /// Waits until no connection is being served.
    pub async fn idle(&self) {
        loop {
            let idle = self.engine.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.connection_count() == 0 {
                return;
            }
            idle.await;
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Shuts down and waits for every session to flush and close, at most
    /// [`Config::shutdown_timeout`]; returns whether all closed in time.
    pub async fn shutdown_and_wait(&self) -> bool {
        self.shutdown();
        tokio::time::timeout(self.engine.config.shutdown_timeout, self.idle())
            .await
            .is_ok()
    }
}
