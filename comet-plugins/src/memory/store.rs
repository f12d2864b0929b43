use std::collections::VecDeque;

// foldhash, not SipHash: every send hashes its conversation twice here, and
// SipHash was 4% of the server's instructions in a 1:1 ping-pong. Its seed
// is random per process, like std's.
use foldhash::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use comet_core::payload::Delivered;
use comet_core::{async_trait, BoxError, Conversation, Draft, Message, MessageStore, Mid};

const SHARDS: usize = 64;

type Inboxes = HashMap<Mid, VecDeque<Arc<Message>>>;

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
        }
    }

    fn shard_of<K: std::hash::Hash>(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// The kept history of a conversation, oldest first.
    pub fn history(&self, conversation: Conversation) -> Vec<Arc<Message>> {
        lock(&self.conversations[self.shard_of(&conversation)])
            .get(&conversation)
            .map(|c| c.history.iter().cloned().collect())
            .unwrap_or_default()
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
    async fn append(&self, draft: &Draft) -> Result<i64, BoxError> {
        let mut shard = lock(&self.conversations[self.shard_of(&draft.conversation)]);
        let conv = shard.entry(draft.conversation).or_default();
        conv.last += 1;
        let chat_id = conv.last;
        let mut evicted = None;
        if self.history_limit > 0 {
            if conv.history.len() == self.history_limit {
                evicted = conv.history.pop_front();
            }
            conv.history.push_back(Message::new(Delivered {
                op: draft.op,
                chat_id,
                from: draft.from,
                to: draft.to,
                msg: draft.msg.clone(),
            }));
        }
        // The evicted message (maybe the last reference to its bytes and
        // encodings) is freed after the lock is released, not under it.
        drop(shard);
        drop(evicted);
        Ok(chat_id)
    }

    async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError> {
        if self.inbox_limit == 0 {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let mut shard = lock(&self.inboxes[self.shard_of(&mid)]);
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
        inbox.push_back(msg);
        Ok(())
    }

    async fn take_offline(&self, mid: Mid) -> Result<Vec<Arc<Message>>, BoxError> {
        Ok(lock(&self.inboxes[self.shard_of(&mid)])
            .remove(&mid)
            .map(Vec::from)
            .unwrap_or_default())
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
    async fn chat_ids_count_per_conversation_from_one() {
        let store = MemoryStore::new(2, 10);
        let ab = Conversation::direct(1, 2);
        let ba = Conversation::direct(2, 1);
        assert_eq!(ab, ba);
        assert_eq!(store.append(&draft(ab, 1, 2)).await.unwrap(), 1);
        assert_eq!(store.append(&draft(ba, 2, 1)).await.unwrap(), 2);
        assert_eq!(
            store
                .append(&draft(Conversation::Group(9), 1, 9))
                .await
                .unwrap(),
            1
        );
        assert_eq!(store.append(&draft(ab, 1, 2)).await.unwrap(), 3);
        // History is bounded to the newest two.
        let ids: Vec<i64> = store.history(ab).iter().map(|m| m.chat_id()).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(store.last_chat_id(ab), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chat_ids_are_gapless_under_concurrent_appends() {
        let store = Arc::new(MemoryStore::new(0, 0));
        let conv = Conversation::Group(1);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    for _ in 0..500 {
                        ids.push(store.append(&draft(conv, i, 1)).await.unwrap());
                    }
                    ids
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        assert_eq!(all, (1..=4000).collect::<Vec<i64>>());
    }

    #[tokio::test]
    async fn inbox_is_bounded_oldest_first_and_drained_once() {
        let store = MemoryStore::new(0, 3);
        for id in 1..=5 {
            let msg = Message::new(Delivered {
                op: 18,
                chat_id: id,
                from: 1,
                to: 2,
                msg: Bytes::from_static(b"m"),
            });
            store.push_offline(2, msg).await.unwrap();
        }
        assert_eq!(store.dropped_offline(), 2);
        let ids: Vec<i64> = store
            .take_offline(2)
            .await
            .unwrap()
            .iter()
            .map(|m| m.chat_id())
            .collect();
        assert_eq!(ids, vec![3, 4, 5]);
        assert!(store.take_offline(2).await.unwrap().is_empty());
    }
}
