//! The [`Comet`] handle and its builder.

use foldhash::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service, ServiceExt as _};

use crate::auth::{Authenticator, ConnId, ConnInfo, Extensions, UserDirectory};
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::error::{BoxError, FrameError, SendError, SyncError};
use crate::frame::{op, Frame, Transport, WireMode};
use crate::groups::GroupDirectory;
use crate::message::Conversation;
use crate::middleware::{BoxService, Handler, Request, Response, Router, Stack};
use crate::payload::{SendRequest, SyncRequest};
use crate::registry::{Delivery, Kick, Registry};
use crate::session::{self, Outgoing, SessionEnd};
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{Draft, History, MessageStore};
use crate::{GroupId, Mid};

/// Number of stripes of the per-conversation send lock.
const SEND_STRIPES: usize = 1024;

/// Something that happened to a connection, reported to the hook set with
/// [`CometBuilder::on_event`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// A connection authenticated.
    #[non_exhaustive]
    Authenticated {
        /// The connection (with its `conn_id`).
        conn: ConnInfo,
        /// As whom.
        mid: Mid,
        /// The per-session data the login attached
        /// ([`Identity::extensions`](crate::Identity::extensions)).
        extensions: Arc<Extensions>,
    },
    /// A connection ended.
    #[non_exhaustive]
    Disconnected {
        /// The connection.
        conn: ConnInfo,
        /// Its mid, if it had authenticated.
        mid: Option<Mid>,
        /// Why it ended.
        reason: SessionEnd,
        /// The per-session data the login attached (empty if it never
        /// authenticated).
        extensions: Arc<Extensions>,
    },
}

type EventHook = Arc<dyn Fn(&Event) + Send + Sync>;
type DeliveryFn = Box<dyn FnOnce(Arc<Registry>) -> Arc<dyn Delivery> + Send>;
type BrokerFn = Box<dyn FnOnce(Arc<Registry>) -> Arc<dyn Broker> + Send>;
type LayerFn = Arc<dyn Fn(BoxService) -> BoxService + Send + Sync>;

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
///     .config(Config { max_body: 8192, ..Config::default() })
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
    events: Option<EventHook>,
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
        L::Service: Service<Request, Response = Response> + Send + 'static,
        <L::Service as Service<Request>>::Error: Into<BoxError>,
        <L::Service as Service<Request>>::Future: Send + 'static,
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
        S: Service<Request, Response = Response> + Clone + Send + Sync + 'static,
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

    /// Calls `hook` on every connection event (authenticated, disconnected).
    /// It runs on the session's task: keep it short and non-blocking.
    pub fn on_event(mut self, hook: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.events = Some(Arc::new(hook));
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
                events: self.events,
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

pub(crate) struct Engine {
    pub(crate) config: Config,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) store: Arc<dyn MessageStore>,
    pub(crate) groups: Arc<dyn GroupDirectory>,
    users: Option<Arc<dyn UserDirectory>>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) delivery: Option<Arc<dyn Delivery>>,
    pub(crate) broker: Option<Arc<dyn Broker>>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) events: Option<EventHook>,
    router: Router,
    layers: Vec<LayerFn>,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    hasher: foldhash::fast::RandomState,
    next_conn: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    pub(crate) active: AtomicUsize,
    pub(crate) idle: Notify,
}

impl Engine {
    /// A fresh middleware stack for one connection.
    pub(crate) fn stack(&self) -> Stack {
        if self.layers.is_empty() {
            return Stack::Bare(self.router.clone());
        }
        let mut service = BoxService::new(self.router.clone());
        for layer in self.layers.iter().rev() {
            service = layer(service);
        }
        Stack::Layered(service)
    }

    /// Reports an event; `event` is only called when someone listens.
    pub(crate) fn emit(&self, event: impl FnOnce() -> Event) {
        if let Some(hook) = &self.events {
            hook(&event());
        }
    }

    /// Runs a plug-in call under the hook timeout.
    pub(crate) async fn bounded<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, BoxError>>,
    ) -> Result<T, String> {
        crate::stats::bounded(&self.stats, self.config.hook_timeout, what, call).await
    }

    /// Validates, stores and delivers one message (op 18 or op 20).
    ///
    /// `as_mid` is the authenticated sender when the message comes from a
    /// connection (`from` must match it); `except` is the sending connection.
    pub(crate) async fn send(
        &self,
        op: u32,
        req: &SendRequest,
        as_mid: Option<Mid>,
        except: Option<ConnId>,
    ) -> Result<i64, SendError> {
        let result = self.send_checked(op, req, as_mid, except, false).await;
        self.stats.tel.send(&result);
        result
    }

    async fn send_checked(
        &self,
        op: u32,
        req: &SendRequest,
        as_mid: Option<Mid>,
        except: Option<ConnId>,
        trusted: bool,
    ) -> Result<i64, SendError> {
        if as_mid.is_some_and(|m| m != req.from) {
            return Err(SendError::Spoofed);
        }
        if req.to <= 0 {
            return Err(SendError::BadRecipient);
        }
        if req.msg.is_empty() {
            return Err(SendError::EmptyMessage);
        }
        let max = self.config.max_msg();
        if req.msg.len() > max {
            return Err(SendError::MessageTooLarge {
                len: req.msg.len(),
                max,
            });
        }
        if let Some(broker) = &self.broker {
            return self.send_through(broker, op, req, except).await;
        }
        let (conversation, members) = if op == op::SEND_TO_GROUP {
            let member = trusted
                || self
                    .bounded("group directory", self.groups.is_member(req.to, req.from))
                    .await
                    .map_err(SendError::Groups)?;
            if !member {
                return Err(SendError::NotMember(req.to));
            }
            let members = self
                .bounded("group directory", self.groups.members(req.to))
                .await
                .map_err(SendError::Groups)?;
            (Conversation::Group(req.to), Some(members))
        } else {
            if let Some(users) = self.users.as_ref().filter(|_| req.to != req.from) {
                let exists = match users.exists_now(req.to) {
                    Some(known) => known,
                    None => self
                        .bounded("user directory", users.exists(req.to))
                        .await
                        .map_err(SendError::Users)?,
                };
                if !exists {
                    return Err(SendError::UnknownUser(req.to));
                }
            }
            (Conversation::direct(req.from, req.to), None)
        };
        let draft = Draft {
            conversation,
            op,
            from: req.from,
            to: req.to,
            msg: req.msg.clone(),
        };
        // Storing and enqueueing happen under one per-conversation lock, so
        // every session sees a conversation in chatId order.
        let _order = self.stripe(&conversation).lock().await;
        let msg = self
            .bounded("message store", self.store.append(draft))
            .await
            .map_err(SendError::Store)?;
        let chat_id = msg.chat_id();
        let single = [req.to];
        let (recipients, echo): (&[Mid], Option<Mid>) = match &members {
            Some(members) => (members, Some(req.from)),
            None if req.to == req.from => (&single, None),
            None => (&single, Some(req.from)),
        };
        match &self.delivery {
            None => {
                self.registry
                    .deliver_local(recipients, echo, &msg, except)
                    .await
            }
            Some(delivery) => {
                if let Err(e) = delivery.deliver(recipients, echo, &msg, except).await {
                    // The message is stored: the sender's ack stands.
                    tracing::error!(chat_id, cause = %e, "delivery failed");
                }
            }
        }
        self.stats.message();
        Ok(chat_id)
    }

    /// The cluster's send: the broker checks membership, assigns the chatId
    /// and routes in one step; this node delivers from its feed.
    async fn send_through(
        &self,
        broker: &Arc<dyn Broker>,
        op: u32,
        req: &SendRequest,
        except: Option<ConnId>,
    ) -> Result<i64, SendError> {
        let conversation = if op == op::SEND_TO_GROUP {
            Conversation::Group(req.to)
        } else {
            if let Some(users) = self.users.as_ref().filter(|_| req.to != req.from) {
                let exists = match users.exists_now(req.to) {
                    Some(known) => known,
                    None => self
                        .bounded("user directory", users.exists(req.to))
                        .await
                        .map_err(SendError::Users)?,
                };
                if !exists {
                    return Err(SendError::UnknownUser(req.to));
                }
            }
            Conversation::direct(req.from, req.to)
        };
        let draft = Draft {
            conversation,
            op,
            from: req.from,
            to: req.to,
            msg: req.msg.clone(),
        };
        let sent = tokio::time::timeout(self.config.hook_timeout, broker.send(draft, except)).await;
        match sent {
            Ok(Ok(chat_id)) => {
                self.stats.message();
                Ok(chat_id)
            }
            Ok(Err(BrokerError::NotMember)) => Err(SendError::NotMember(req.to)),
            Ok(Err(e)) => Err(SendError::Store(e.to_string())),
            Err(_) => Err(SendError::Store("cluster broker timed out".into())),
        }
    }

    /// Checks a sync request from `mid` against PROTOCOL.md 2.7 (group
    /// membership, the cap) and reads the page it asks for.
    pub(crate) async fn sync(&self, mid: Mid, req: &SyncRequest) -> Result<History, SyncError> {
        let conversation = if req.kind == op::SEND_TO_GROUP {
            let member = self
                .bounded("group directory", self.groups.is_member(req.to, mid))
                .await
                .map_err(SyncError::Groups)?;
            if !member {
                return Err(SyncError::NotMember(req.to));
            }
            Conversation::Group(req.to)
        } else {
            Conversation::direct(mid, req.to)
        };
        let cap = self.config.sync_limit;
        let limit = req.limit.map_or(cap, |n| (n as usize).min(cap));
        self.history(conversation, req.after, limit).await
    }

    /// Reads a page of a conversation's history, bounded like every
    /// plug-in call.
    pub(crate) async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, SyncError> {
        self.bounded(
            "message store",
            self.store.history(conversation, after, limit),
        )
        .await
        .map_err(SyncError::Store)
    }

    fn stripe(&self, conversation: &Conversation) -> &tokio::sync::Mutex<()> {
        &self.stripes[(self.hasher.hash_one(conversation) as usize) % SEND_STRIPES]
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
            events: None,
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
    /// [`crate::telemetry::sample_process`]). Call it when the metrics are
    /// scraped: it walks every session once.
    pub fn sample_metrics(&self) {
        let (queued, _) = self.engine.registry.pending_bytes();
        self.engine.stats.tel.queued_bytes(queued);
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

    /// Closes every session of `mid`; returns how many there were.
    pub fn disconnect(&self, mid: Mid) -> usize {
        self.engine.registry.disconnect(mid)
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
