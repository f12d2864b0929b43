//! Cluster mode: the [`Broker`] seam.
//!
//! Without a broker (the default), a node stores a message with its
//! [`MessageStore`](crate::MessageStore), under a per-conversation lock,
//! and delivers it to its own sessions through its
//! [`Registry`](crate::Registry). With one (see
//! [`CometBuilder::broker`](crate::CometBuilder::broker)), a send is one call
//! to the broker, which checks group membership, assigns the chatId, keeps
//! the history and routes the message to every node that holds a recipient
//! (the sending node included) or to the inbox of a recipient who is online
//! nowhere. Each node delivers what its subscription feeds it, in the order
//! the broker assigned, through its registry
//! ([`Delivery::deliver`](crate::Delivery::deliver)).
//!
//! Sessions tell the broker where they are: [`Broker::login`] runs after a
//! session is registered locally and before its offline inbox is read,
//! [`Broker::logout`] once it has ended.

use std::time::Duration;

use async_trait::async_trait;

use crate::auth::ConnId;
use crate::error::BoxError;
use crate::store::Draft;
use crate::Mid;

/// Why a [`Broker::send`] stored nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// An op 20 whose sender is not a member of the group (no chatId was
    /// consumed).
    #[error("sender is not a member of the group")]
    NotMember,
    /// The broker could not be reached or failed; no chatId was consumed.
    #[error("{0}")]
    Unavailable(BoxError),
}

/// One live node of a cluster, as [`Broker::nodes`] reports it: the
/// admin API's `GET /api/nodes`. Counts are as of the node's last report,
/// `reported` ago.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStatus {
    /// The node's id.
    pub id: String,
    /// Whether the node's feed is subscribed (it takes logins and delivers).
    pub ready: bool,
    /// Its authenticated sessions when it last reported.
    pub sessions: u64,
    /// How long ago it reported them.
    pub reported: Duration,
}

impl NodeStatus {
    /// A node's status: see the fields.
    ///
    /// ```
    /// use std::time::Duration;
    /// let n = comet_core::NodeStatus::new("a", true, 12, Duration::from_millis(800));
    /// assert_eq!((n.id.as_str(), n.sessions), ("a", 12));
    /// ```
    pub fn new(id: impl Into<String>, ready: bool, sessions: u64, reported: Duration) -> Self {
        NodeStatus {
            id: id.into(),
            ready,
            sessions,
            reported,
        }
    }
}

/// Orders, keeps and routes messages for a cluster of comet nodes.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// In one atomic step: for op 20, checks that `draft.from` is a member
    /// of the group; assigns the next chatId of the conversation; appends
    /// the message to its history; routes it to the nodes holding its
    /// recipients and the sender's other sessions (skipping connection
    /// `except` of this node) or to the inboxes of recipients online
    /// nowhere. Returns the message's chatId. Delivery to this node's
    /// sessions comes back through the broker's feed, not from this call.
    async fn send(&self, draft: Draft, except: Option<ConnId>) -> Result<i64, BrokerError>;

    /// [`send`](Self::send) for a trusted sender: an op 20 without the
    /// membership check, behind
    /// [`Comet::send_to_group_as_system`](crate::Comet::send_to_group_as_system)
    /// (the admin API's `"system": true`). The sender's own sessions get
    /// their copy whether or not it is a member, as on a single node. The
    /// default refuses ([`BrokerError::Unavailable`]): a broker that cannot
    /// skip the check must say so, not apply it.
    async fn send_trusted(&self, draft: Draft) -> Result<i64, BrokerError> {
        let _ = draft;
        Err(BrokerError::Unavailable(
            "this cluster broker has no trusted (system) sends".into(),
        ))
    }

    /// A session of `mid` was registered on this node: from now on the
    /// broker routes `mid`'s messages here. Called before the session reads
    /// its offline inbox, so that every message is either in the inbox or
    /// routed here. An error refuses the login with the error as reason.
    async fn login(&self, mid: Mid) -> Result<(), BoxError>;

    /// A session of `mid` that [`login`](Self::login) accepted has ended on
    /// this node. Must not block.
    fn logout(&self, mid: Mid);

    /// The nodes of the cluster holding a session of `mid` now (their
    /// ids, sorted; this node among them if it holds one): the admin API's
    /// `GET /api/users/{mid}`. The default refuses.
    async fn nodes_of(&self, mid: Mid) -> Result<Vec<String>, BoxError> {
        let _ = mid;
        Err("this cluster broker has no presence to read".into())
    }

    /// The cluster's live nodes, sorted by id, with their session counts:
    /// the admin API's `GET /api/nodes` and the cluster totals of
    /// `GET /api/online`. The default refuses.
    async fn nodes(&self) -> Result<Vec<NodeStatus>, BoxError> {
        Err("this cluster broker has no list of nodes".into())
    }

    /// Closes the sessions of `mid` on every node of the cluster (this
    /// node's too, whose are already closing: see
    /// [`Comet::disconnect_everywhere`](crate::Comet::disconnect_everywhere)).
    /// Returns once the request is on its way, not when the sessions are
    /// closed. The default refuses: a broker that cannot reach the other
    /// nodes must say so, not leave their sessions open quietly.
    async fn disconnect(&self, mid: Mid) -> Result<(), BoxError> {
        let _ = mid;
        Err("this cluster broker cannot close sessions on other nodes".into())
    }

    /// Whether this node can take logins and deliver now (a cluster node:
    /// its feed is subscribed). The admin API's `GET /readyz` answers 503
    /// while not, so that a load balancer sends new clients elsewhere.
    /// Must not block. The default: always.
    fn is_ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Conversation;

    /// A broker with nothing but the required methods.
    struct Minimal;

    #[async_trait]
    impl Broker for Minimal {
        async fn send(&self, _: Draft, _: Option<ConnId>) -> Result<i64, BrokerError> {
            Ok(1)
        }
        async fn login(&self, _: Mid) -> Result<(), BoxError> {
            Ok(())
        }
        fn logout(&self, _: Mid) {}
    }

    #[tokio::test]
    async fn a_broker_without_trusted_sends_kicks_or_presence_refuses_them_rather_than_pretending()
    {
        let draft = Draft {
            conversation: Conversation::Group(100),
            op: crate::op::SEND_TO_GROUP,
            from: 9,
            to: 100,
            msg: bytes::Bytes::from_static(b"m"),
        };
        match Minimal.send_trusted(draft).await {
            Err(BrokerError::Unavailable(e)) => assert!(e.to_string().contains("trusted")),
            other => panic!("{other:?}"),
        }
        assert!(Minimal.disconnect(9).await.is_err());
        assert!(Minimal.nodes_of(9).await.is_err());
        assert!(Minimal.nodes().await.is_err());
        assert!(Minimal.is_ready());
    }
}
