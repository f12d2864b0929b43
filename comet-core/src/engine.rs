//! The engine's shared state: plug-ins, settings, the session registry,
//! the middleware stack's parts and the send path. One per [`Comet`]
//! (which is a handle to it); sessions and the router read it.
//!
//! It sits below the session and the middleware in the module order
//! (frame → codec → queue → registry → engine → middleware → session →
//! handle): it names the middleware's types but never calls into a session.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, ConnId, ConnInfo, Extensions, UserDirectory};
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::error::{BoxError, SendError, SyncError};
use crate::frame::op;
use crate::groups::GroupDirectory;
use crate::message::Conversation;
use crate::middleware::{BoxService, Router, Stack};
use crate::payload::{SendRequest, SyncRequest};
use crate::registry::{Delivery, Registry};
use crate::session::SessionEnd;
use crate::stats::Stats;
use crate::store::{Draft, History, MessageStore};
use crate::Mid;

/// Events the broadcast keeps for its slowest subscriber; one further
/// behind loses the oldest (`RecvError::Lagged`).
pub(crate) const EVENT_BUFFER: usize = 1024;

/// Number of stripes of the per-conversation send lock.
pub(crate) const SEND_STRIPES: usize = 1024;

/// Something that happened to a connection, reported to the hooks added
/// with [`CometBuilder::on_event`](crate::CometBuilder::on_event) and to
/// [`Comet::subscribe_events`](crate::Comet::subscribe_events)'s receivers.
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

pub(crate) type EventHook = Arc<dyn Fn(&Event) + Send + Sync>;
pub(crate) type LayerFn = Arc<dyn Fn(BoxService) -> BoxService + Send + Sync>;

/// The state every session of one comet shares.
pub(crate) struct Engine {
    pub(crate) config: Config,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) store: Arc<dyn MessageStore>,
    pub(crate) groups: Arc<dyn GroupDirectory>,
    pub(crate) users: Option<Arc<dyn UserDirectory>>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) delivery: Option<Arc<dyn Delivery>>,
    pub(crate) broker: Option<Arc<dyn Broker>>,
    pub(crate) stats: Arc<Stats>,
    /// Hooks, in the order they were added.
    pub(crate) events: Box<[EventHook]>,
    /// The broadcast behind [`Comet::subscribe_events`](crate::Comet::subscribe_events).
    pub(crate) event_tx: tokio::sync::broadcast::Sender<Event>,
    pub(crate) router: Router,
    pub(crate) layers: Vec<LayerFn>,
    pub(crate) stripes: Box<[tokio::sync::Mutex<()>]>,
    pub(crate) hasher: foldhash::fast::RandomState,
    pub(crate) next_conn: AtomicU64,
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

    /// Reports an event to every hook, in order, then to the broadcast's
    /// subscribers; `event` is only called when someone listens. A send to
    /// the broadcast never waits: a subscriber that lags loses the oldest
    /// events.
    pub(crate) fn emit(&self, event: impl FnOnce() -> Event) {
        let subscribed = self.event_tx.receiver_count() > 0;
        if self.events.is_empty() && !subscribed {
            return;
        }
        let event = event();
        for hook in self.events.iter() {
            hook(&event);
        }
        if subscribed {
            // An error only means every subscriber went away meanwhile.
            let _ = self.event_tx.send(event);
        }
    }

    /// Runs a plug-in call under the hook timeout.
    pub(crate) async fn bounded<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, BoxError>>,
    ) -> Result<T, BoxError> {
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

    pub(crate) async fn send_checked(
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
            return self.send_through(broker, op, req, except, trusted).await;
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
            self.check_recipient(req).await?;
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

    /// op 18's recipient must be a user the [`UserDirectory`] knows (when
    /// the application gave one; notes to oneself are never checked). A
    /// directory that knows at once (`exists_now`) costs no future.
    async fn check_recipient(&self, req: &SendRequest) -> Result<(), SendError> {
        let Some(users) = self.users.as_ref().filter(|_| req.to != req.from) else {
            return Ok(());
        };
        let exists = match users.exists_now(req.to) {
            Some(known) => known,
            None => self
                .bounded("user directory", users.exists(req.to))
                .await
                .map_err(SendError::Users)?,
        };
        if exists {
            Ok(())
        } else {
            Err(SendError::UnknownUser(req.to))
        }
    }

    /// The cluster's send: the broker checks membership, assigns the chatId
    /// and routes in one step; this node delivers from its feed.
    async fn send_through(
        &self,
        broker: &Arc<dyn Broker>,
        op: u32,
        req: &SendRequest,
        except: Option<ConnId>,
        trusted: bool,
    ) -> Result<i64, SendError> {
        let conversation = if op == op::SEND_TO_GROUP {
            Conversation::Group(req.to)
        } else {
            self.check_recipient(req).await?;
            Conversation::direct(req.from, req.to)
        };
        let draft = Draft {
            conversation,
            op,
            from: req.from,
            to: req.to,
            msg: req.msg.clone(),
        };
        let send = async {
            if trusted && op == op::SEND_TO_GROUP {
                broker.send_trusted(draft).await
            } else {
                broker.send(draft, except).await
            }
        };
        let sent = tokio::time::timeout(self.config.hook_timeout, send).await;
        match sent {
            Ok(Ok(chat_id)) => {
                self.stats.message();
                Ok(chat_id)
            }
            Ok(Err(BrokerError::NotMember)) => Err(SendError::NotMember(req.to)),
            Ok(Err(e)) => Err(SendError::Store(Box::new(e))),
            Err(_) => Err(SendError::Store(Box::new(crate::error::PluginTimeout(
                "cluster broker",
            )))),
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
