//! Message storage: the [`MessageStore`] hook.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BoxError;
use crate::message::{Conversation, Message};
use crate::Mid;

/// A message about to be stored; the store gives it its chatId.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    /// Its conversation.
    pub conversation: Conversation,
    /// 18 (to a user) or 20 (to a group).
    pub op: u32,
    /// The sender.
    pub from: Mid,
    /// The recipient mid or group id.
    pub to: i32,
    /// The message bytes.
    pub msg: Bytes,
}

/// Stores messages, assigns chatIds, and keeps each user's offline inbox.
///
/// The engine serialises [`append`](Self::append) per conversation and
/// delivers in the same critical section, so sessions see each
/// conversation's messages in chatId order. A store shared by several comet
/// nodes must still assign chatIds atomically (e.g. Redis `INCR`).
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Stores `draft` and returns its chatId: within one conversation the
    /// first is 1 and each next one is exactly one more, with no gaps even
    /// under concurrent senders. A failed append must consume no chatId.
    async fn append(&self, draft: &Draft) -> Result<i64, BoxError>;

    /// Keeps `msg` for `mid`, who has no session now. The inbox is bounded:
    /// past the bound the oldest message is dropped (and counted).
    async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError>;

    /// Removes and returns `mid`'s inbox, oldest first.
    async fn take_offline(&self, mid: Mid) -> Result<Vec<Arc<Message>>, BoxError>;
}
