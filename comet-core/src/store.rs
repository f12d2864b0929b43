//! Message storage: the [`MessageStore`] hook.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BoxError;
use crate::message::{Conversation, Message};
use crate::payload::Delivered;
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

impl Draft {
    /// The stored message this draft becomes once it has `chat_id`.
    pub fn into_message(self, chat_id: i64) -> Arc<Message> {
        Message::new(Delivered {
            op: self.op,
            chat_id,
            from: self.from,
            to: self.to,
            msg: self.msg,
        })
    }
}

/// A page of one conversation's kept history, with the conversation's
/// bounds (PROTOCOL.md 2.7).
#[derive(Clone, Debug, Default)]
pub struct History {
    /// The kept messages with a chatId above the one asked for, oldest
    /// first, at most the limit asked for.
    pub messages: Vec<Arc<Message>>,
    /// The oldest chatId the store still keeps: 0 when the conversation has
    /// no messages, `head + 1` when the store has dropped all it had.
    pub oldest: i64,
    /// The newest chatId of the conversation (0 when it has none).
    pub head: i64,
}

/// One message of a user's offline inbox and its place there.
#[derive(Clone, Debug)]
pub struct Offline {
    /// The entry's position: rises with every entry pushed to any inbox of
    /// the store and is never reused, so
    /// [`remove_offline`](MessageStore::remove_offline) can name "everything
    /// up to here" even while new entries arrive.
    pub seq: u64,
    /// The message.
    pub msg: Arc<Message>,
}

/// Stores messages, assigns chatIds, keeps each conversation's history and
/// each user's offline inbox.
///
/// The engine serialises [`append`](Self::append) per conversation and
/// delivers in the same critical section, so sessions see each
/// conversation's messages in chatId order. A store shared by several comet
/// nodes must still assign chatIds atomically (e.g. Redis `INCR`).
///
/// `comet_core::testing::store_conformance` checks every rule written here
/// against a store; run it in your store's tests.
///
/// An extension point: applications implement it.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Stores `draft`, gives it its chatId and returns the stored message:
    /// within one conversation the first chatId is 1 and each next one is
    /// exactly one more, with no gaps even under concurrent senders. A
    /// failed append must consume no chatId. Once it returns `Ok`, the
    /// message is as durable as the store promises (the sender is told
    /// ret 0).
    async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError>;

    /// The kept messages of `conversation` with a chatId above `after`,
    /// oldest first, at most `limit` of them (none for `limit` 0), and the
    /// conversation's `oldest` and `head` (see [`History`]), read together.
    async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, BoxError>;

    /// Keeps `msg` for `mid`, who has no session now. The inbox is bounded:
    /// past the bound the oldest message is dropped (and counted).
    async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError>;

    /// The oldest `limit` entries of `mid`'s inbox, oldest first, without
    /// removing them: a session removes them with
    /// [`remove_offline`](Self::remove_offline) once it has written them, so
    /// a crash in between delivers them again instead of losing them.
    async fn offline(&self, mid: Mid, limit: usize) -> Result<Vec<Offline>, BoxError>;

    /// Removes the entries of `mid`'s inbox whose `seq` is at most
    /// `through`. Removing what is already gone is not an error.
    async fn remove_offline(&self, mid: Mid, through: u64) -> Result<(), BoxError>;
}
