use std::collections::VecDeque;

// foldhash, not SipHash: every send hashes its conversation twice here, and
// SipHash was 4% of the server's instructions in a 1:1 ping-pong. Its seed
// is random per process, like std's.
use foldhash::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use comet_core::store::{History, Offline};
use comet_core::{async_trait, BoxError, Conversation, Draft, Message, MessageStore, Mid};

const SHARDS: usize = 64;

type Inboxes = HashMap<Mid, VecDeque<Offline>>;

#[derive(Debug, Default)]
struct Conv {
    last: i64,
    history: VecDeque<Arc<Message>>,
}

/// Messages in memory: chatIds per conversation, a bounded history per
/// conversation, and a bounded offline inbox per user.
///
/// chatIds start at 1 and rise by exactly one per message of a conversation,
/// with no gaps under any number of concurrent senders (each append holds
/// its conversation's shard lock while it numbers and records the message).
/// A full inbox drops its oldest message, counted by
/// [`dropped_offline`](Self::dropped_offline).
///
/// ```
/// # use comet_plugins::memory::MemoryStore;
/// let store = MemoryStore::new(100, 50); // history per conversation, inbox per user
/// # let _ = store;
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    history_limit: usize,
    inbox_limit: usize,
    conversations: Box<[Mutex<HashMap<Conversation, Conv>>]>,
    inboxes: Box<[Mutex<Inboxes>]>,
    hasher: foldhash::fast::RandomState,
    dropped: AtomicU64,
    /// The next inbox entry's seq (never reused, see [`Offline::seq`]).
    next_seq: AtomicU64,
}

impl Default for MemoryStore {
    /// 1,000 messages of history per conversation, 1,000 per inbox.
    fn default() -> Self {
        MemoryStore::new(1000, 1000)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    /// A store keeping `history_limit` messages per conversation and
    /// `inbox_limit` messages per offline user.
    pub fn new(history_limit: usize, inbox_limit: usize) -> Self {
        MemoryStore {
            history_limit,
            inbox_limit,
            conversations: (0..SHARDS).map(|_| Mutex::default()).collect(),
            inboxes: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            dropped: AtomicU64::new(0),
            next_seq: AtomicU64::new(1),
        }
    }

    fn shard_of<K: std::hash::Hash>(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// The last chatId given in a conversation (0 if none).
    pub fn last_chat_id(&self, conversation: Conversation) -> i64 {
        lock(&self.conversations[self.shard_of(&conversation)])
            .get(&conversation)
            .map_or(0, |c| c.last)
    }

    /// Messages waiting for `mid`.
    pub fn inbox_len(&self, mid: Mid) -> usize {
        lock(&self.inboxes[self.shard_of(&mid)])
            .get(&mid)
            .map_or(0, VecDeque::len)
    }

    /// Messages dropped from full inboxes so far.
    pub fn dropped_offline(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl MessageStore for MemoryStore {
    async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
        let mut shard = lock(&self.conversations[self.shard_of(&draft.conversation)]);
        let conv = shard.entry(draft.conversation).or_default();
        conv.last += 1;
        let msg = draft.into_message(conv.last);
        let mut evicted = None;
        if self.history_limit > 0 {
            if conv.history.len() == self.history_limit {
                evicted = conv.history.pop_front();
            }
            conv.history.push_back(msg.clone());
        }
        // The evicted message (maybe the last reference to its bytes and
        // encodings) is freed after the lock is released, not under it.
        drop(shard);
        drop(evicted);
        Ok(msg)
    }

    async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, BoxError> {
        let shard = lock(&self.conversations[self.shard_of(&conversation)]);
        let Some(conv) = shard.get(&conversation) else {
            return Ok(History::default());
        };
        let head = conv.last;
        // The kept history is contiguous: chatIds oldest..=head.
        let oldest = conv.history.front().map_or(head + 1, |m| m.chat_id());
        let skip = usize::try_from(after.saturating_add(1).saturating_sub(oldest)).unwrap_or(0);
        let messages = conv
            .history
            .iter()
            .skip(skip)
            .take(limit)
            .cloned()
            .collect();
        Ok(History {
            messages,
            oldest,
            head,
        })
    }

    async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError> {
        if self.inbox_limit == 0 {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let mut shard = lock(&self.inboxes[self.shard_of(&mid)]);
        // Taken under the shard lock: seqs rise within each inbox.
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let inbox = shard.entry(mid).or_default();
        if inbox.len() == self.inbox_limit {
            inbox.pop_front();
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Warn at the first drop and then at every power of two, so a
            // user offline for weeks cannot flood the log.
            if dropped.is_power_of_two() {
                tracing::warn!(
                    mid,
                    limit = self.inbox_limit,
                    dropped_total = dropped,
                    "offline inbox full: dropping oldest messages"
                );
            } else {
                tracing::debug!(mid, "offline inbox full: dropped its oldest message");
            }
        }
        inbox.push_back(Offline { seq, msg });
        Ok(())
    }

    async fn offline(&self, mid: Mid, limit: usize) -> Result<Vec<Offline>, BoxError> {
        Ok(lock(&self.inboxes[self.shard_of(&mid)])
            .get(&mid)
            .map(|inbox| inbox.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn remove_offline(&self, mid: Mid, through: u64) -> Result<(), BoxError> {
        let mut shard = lock(&self.inboxes[self.shard_of(&mid)]);
        let Some(inbox) = shard.get_mut(&mid) else {
            return Ok(());
        };
        while inbox.front().is_some_and(|e| e.seq <= through) {
            inbox.pop_front();
        }
        if inbox.is_empty() {
            shard.remove(&mid);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn draft(conversation: Conversation, from: Mid, to: Mid) -> Draft {
        Draft {
            conversation,
            op: 18,
            from,
            to,
            msg: Bytes::from_static(b"x"),
        }
    }

    #[tokio::test]
    async fn history_is_bounded_to_the_newest() {
        let store = MemoryStore::new(2, 10);
        let ab = Conversation::direct(1, 2);
        for _ in 0..3 {
            store.append(draft(ab, 1, 2)).await.unwrap();
        }
        let page = store.history(ab, 0, 10).await.unwrap();
        let ids: Vec<i64> = page.messages.iter().map(|m| m.chat_id()).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!((page.oldest, page.head), (2, 3));
        assert_eq!(store.last_chat_id(ab), 3);
    }
}
