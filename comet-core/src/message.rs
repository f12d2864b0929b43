//! A stored, deliverable message, encoded once per wire mode and shared.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::frame::{op, WireMode};
use crate::payload::Delivered;
use crate::{GroupId, Mid};

/// The conversation a message belongs to; chatIds count per conversation
/// (PROTOCOL.md 2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Conversation {
    /// A 1:1 conversation: the unordered pair of mids, stored low first.
    Direct(Mid, Mid),
    /// A group conversation.
    Group(GroupId),
}

impl Conversation {
    /// The direct conversation between `a` and `b` (in either order).
    pub fn direct(a: Mid, b: Mid) -> Self {
        Conversation::Direct(a.min(b), a.max(b))
    }
}

/// A message as the store keeps it and as sessions receive it: shared by
/// every recipient through an `Arc`, with its inner op 18/20 frame encoded at
/// most once per [`WireMode`], on first use.
#[derive(Debug)]
pub struct Message {
    delivered: Delivered,
    wire: [OnceLock<Bytes>; 2],
}

impl Message {
    /// A message from its delivered form.
    pub fn new(delivered: Delivered) -> Arc<Self> {
        Arc::new(Message {
            delivered,
            wire: [OnceLock::new(), OnceLock::new()],
        })
    }

    /// The message's fields.
    pub fn delivered(&self) -> &Delivered {
        &self.delivered
    }

    /// Its chatId.
    pub fn chat_id(&self) -> i64 {
        self.delivered.chat_id
    }

    /// Its conversation.
    pub fn conversation(&self) -> Conversation {
        match self.delivered.op {
            op::SEND_TO_GROUP => Conversation::Group(self.delivered.to),
            _ => Conversation::direct(self.delivered.from, self.delivered.to),
        }
    }

    /// The inner frame (op 18 or 20, ver 1, seq 0) in `mode`, encoded once.
    pub fn wire(&self, mode: WireMode) -> &Bytes {
        let slot = match mode {
            WireMode::Binary => &self.wire[0],
            WireMode::Json => &self.wire[1],
        };
        slot.get_or_init(|| self.delivered.encode_frame(mode))
    }
}
