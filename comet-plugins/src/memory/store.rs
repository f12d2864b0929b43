use std::collections::VecDeque;

// foldhash, not SipHash: every send hashes its conversation twice here, and
// SipHash was 4% of the server's instructions in a 1:1 ping-pong. Its seed
// is random per process, like std's.
use foldhash::HashMap;
use std::hash::BuildHasher;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use comet_core::store::{History, Offline};
use comet_core::{async_trait, BoxError, Conversation, Draft, Message, MessageStore, Mid};
use tokio::time::Instant;

const SHARDS: usize = 64;
const MIB: usize = 1024 * 1024;

/// The bounds of a [`MemoryStore`]: counts and bytes per conversation and
/// per inbox, bytes and records for the whole store, and how long an unread
/// inbox lives.
///
/// Start from [`MemoryLimits::default`] and change what you need:
///
/// ```
/// # use comet_plugins::memory::{MemoryLimits, MemoryStore};
/// # use std::time::Duration;
/// let store = MemoryStore::with_limits(
///     MemoryLimits::default()
///         .with_total_bytes(64 << 20)
///         .with_inbox_ttl(Duration::from_secs(7 * 86_400)),
/// );
/// assert_eq!(store.limits().total_bytes, 64 << 20);
/// ```
///
/// The per-conversation and per-inbox byte bounds count message bodies (the
/// `msg` bytes), like the embedded store's and the server's `[store]
/// history_bytes` / `inbox_bytes`. The store-wide
/// [`total_bytes`](Self::total_bytes) counts *charged* bytes, memory really
/// held: per message its body, both wire encodings it may cache (binary:
/// body + 32; JSON: at most 4/3 of the body + 128, its base64 form) and a
/// fixed overhead (the shared [`Message`] and its bookkeeping, about 250
/// bytes), about 3.4 times its length, which is what it holds once
/// delivered to both binary and JSON clients; per kept entry its queue
/// slot; per conversation and per inbox its record (see [`MemoryStore`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryLimits {
    /// Messages of history kept per conversation (default 1,000, the
    /// PROTOCOL.md 2.7 promise for small messages).
    pub history: usize,
    /// Bytes of message bodies kept per conversation (default 4 MiB, as
    /// the embedded store: 1,000 messages of up to 4 KiB, or the last 64 of
    /// 64 KiB).
    pub history_bytes: usize,
    /// Messages kept per offline inbox (default 1,000).
    pub inbox: usize,
    /// Bytes of message bodies kept per offline inbox (default 4 MiB).
    pub inbox_bytes: usize,
    /// Charged bytes of the whole store: histories, inboxes and records
    /// (default 256 MiB).
    pub total_bytes: usize,
    /// Conversations the store knows (default 1,000,000). A conversation is
    /// never forgotten (its chatIds would restart at 1), so past this an
    /// append that would start a new conversation fails.
    pub conversations: usize,
    /// Offline inboxes at once (default 1,000,000). Past this a push to a
    /// mid with no inbox is dropped and counted.
    pub inboxes: usize,
    /// An inbox nobody has read (or emptied) for this long is deleted
    /// (default 30 days; [`Duration::ZERO`] keeps inboxes forever).
    pub inbox_ttl: Duration,
}

impl Default for MemoryLimits {
    /// 1,000 messages / 4 MiB per conversation and per inbox, 256 MiB for the
    /// whole store, 1,000,000 conversations and inboxes, inboxes unread for
    /// 30 days deleted.
    fn default() -> Self {
        MemoryLimits {
            history: 1000,
            history_bytes: 4 * MIB,
            inbox: 1000,
            inbox_bytes: 4 * MIB,
            total_bytes: 256 * MIB,
            conversations: 1_000_000,
            inboxes: 1_000_000,
            inbox_ttl: Duration::from_secs(30 * 86_400),
        }
    }
}

impl MemoryLimits {
    /// Keeps at most `messages` and `bytes` of history per conversation.
    pub fn with_history(mut self, messages: usize, bytes: usize) -> Self {
        self.history = messages;
        self.history_bytes = bytes;
        self
    }

    /// Keeps at most `messages` and `bytes` per offline inbox.
    pub fn with_inbox(mut self, messages: usize, bytes: usize) -> Self {
        self.inbox = messages;
        self.inbox_bytes = bytes;
        self
    }

    /// Keeps at most `bytes` in the whole store.
    pub fn with_total_bytes(mut self, bytes: usize) -> Self {
        self.total_bytes = bytes;
        self
    }

    /// Knows at most `n` conversations.
    pub fn with_conversations(mut self, n: usize) -> Self {
        self.conversations = n;
        self
    }

    /// Keeps at most `n` offline inboxes at once.
    pub fn with_inboxes(mut self, n: usize) -> Self {
        self.inboxes = n;
        self
    }

    /// Deletes inboxes unread for `ttl` ([`Duration::ZERO`]: never).
    pub fn with_inbox_ttl(mut self, ttl: Duration) -> Self {
        self.inbox_ttl = ttl;
        self
    }
}

/// What a [`MemoryStore`] holds and has dropped, from
/// [`MemoryStore::usage`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryUsage {
    /// Charged bytes held now (see [`MemoryLimits`]); at most
    /// [`MemoryLimits::total_bytes`] once every call has returned.
    pub bytes: usize,
    /// Conversations known.
    pub conversations: usize,
    /// Offline inboxes held.
    pub inboxes: usize,
    /// Messages kept in histories.
    pub history_messages: usize,
    /// Entries kept in offline inboxes.
    pub inbox_messages: usize,
    /// History messages dropped by a bound so far.
    pub dropped_history: u64,
    /// Offline messages dropped by a bound so far (not counting expiry).
    pub dropped_offline: u64,
    /// Offline messages deleted with their expired inbox so far.
    pub expired_offline: u64,
    /// Appends refused because the store knows too many conversations.
    pub refused_appends: u64,
}

/// The fixed charge of one distinct message: the `Arc<Message>` allocation
/// (counts, fields, two cache slots), allocator headers of its three
/// buffers, and its entry in the store's table of held messages.
const MESSAGE_OVERHEAD: usize = 16 + size_of::<Message>() + 3 * 16 + 48;
/// One history slot (a `VecDeque` may hold twice what it uses).
const HISTORY_ENTRY: usize = 2 * size_of::<Arc<Message>>();
/// One inbox slot.
const INBOX_ENTRY: usize = 2 * size_of::<Offline>();
/// A conversation's record: its map entry (tables run up to half empty) and
/// its place in the eviction order.
const CONV_RECORD: usize = 2 * (size_of::<(Conversation, Conv)>() + 1) + 2 * 24;
/// An inbox's record, likewise.
const INBOX_RECORD: usize = 2 * (size_of::<(Mid, Inbox)>() + 1) + 2 * 16;

/// The bytes `msg` holds once both wire encodings are cached.
fn charge(msg: &Message) -> usize {
    let len = msg.delivered().msg.len();
    MESSAGE_OVERHEAD + len + (32 + len) + (4 * len.div_ceil(3) + 128)
}

#[derive(Debug, Default)]
struct Conv {
    last: i64,
    history: VecDeque<Arc<Message>>,
    /// Message body bytes of `history`.
    bytes: usize,
    /// When it was last appended to (its key in the shard's `lru`).
    stamp: u64,
}

#[derive(Debug, Default)]
struct ConvShard {
    map: HashMap<Conversation, Conv>,
    /// Conversations with kept history, least recently appended first.
    lru: Recency<Conversation>,
}

#[derive(Debug)]
struct Inbox {
    entries: VecDeque<Offline>,
    /// Message body bytes of `entries`.
    bytes: usize,
    /// Store time (ms) of its creation or last read.
    read_at: u64,
    /// When it was last pushed to (its key in the shard's `lru`).
    stamp: u64,
}

#[derive(Debug, Default)]
struct InboxShard {
    /// Only inboxes with entries.
    map: HashMap<Mid, Inbox>,
    /// Every inbox, least recently pushed first.
    lru: Recency<Mid>,
}

/// A least-recently-used order with lazy removal. A touch appends
/// `(stamp, key)` at the back (stamps rise, so the queue stays sorted); an
/// entry is current only while its key's record still carries that stamp,
/// so moving a key to the back costs one push instead of a search tree's
/// removal and insertion on every append. Stale entries leave from the
/// front as they are met, and by a compaction once they outnumber the
/// current ones, so the queue holds at most about twice its live keys.
#[derive(Debug)]
struct Recency<K> {
    queue: VecDeque<(u64, K)>,
    /// Keys with a current entry.
    live: usize,
}

impl<K> Default for Recency<K> {
    fn default() -> Self {
        Recency {
            queue: VecDeque::new(),
            live: 0,
        }
    }
}

impl<K: Copy> Recency<K> {
    /// Makes `(stamp, key)` the key's current entry; `new` says the key had
    /// none.
    fn touch(&mut self, stamp: u64, key: K, new: bool) {
        self.live += usize::from(new);
        self.queue.push_back((stamp, key));
    }

    /// The key's current entry went stale (its record is gone or empty).
    fn forget(&mut self) {
        self.live = self.live.saturating_sub(1);
    }

    /// Drops stale entries once they outnumber the current ones.
    fn compact(&mut self, current: impl Fn(u64, &K) -> bool) {
        if self.queue.len() > 2 * self.live + 32 {
            self.queue.retain(|(stamp, key)| current(*stamp, key));
            self.queue.shrink_to(2 * self.queue.len() + 32);
        }
    }

    /// The least recent current entry, dropping stale ones in front of it.
    fn first(&mut self, current: impl Fn(u64, &K) -> bool) -> Option<(u64, K)> {
        while let Some(&(stamp, key)) = self.queue.front() {
            if current(stamp, &key) {
                return Some((stamp, key));
            }
            self.queue.pop_front();
        }
        None
    }
}

/// Messages taken out of the store under a lock, freed after it is
/// released. Usually one (an append that pushes the oldest history message
/// out), which needs no allocation.
#[derive(Default)]
struct Victims {
    one: Option<Arc<Message>>,
    more: Vec<Arc<Message>>,
}

impl Victims {
    fn push(&mut self, msg: Arc<Message>) {
        match self.one {
            None => self.one = Some(msg),
            Some(_) => self.more.push(msg),
        }
    }
}

/// Whether `(stamp, key)` is a conversation's current place in its shard's
/// eviction order.
fn conv_current(map: &HashMap<Conversation, Conv>, stamp: u64, key: &Conversation) -> bool {
    map.get(key)
        .is_some_and(|c| c.stamp == stamp && !c.history.is_empty())
}

/// Whether `(stamp, mid)` is an inbox's current place in its shard's
/// eviction order.
fn inbox_current(map: &HashMap<Mid, Inbox>, stamp: u64, mid: &Mid) -> bool {
    map.get(mid).is_some_and(|i| i.stamp == stamp)
}

/// Why entries leave an inbox.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gone {
    Read,
    Dropped,
    Expired,
}

/// Messages in memory: chatIds per conversation, a bounded history per
/// conversation, a bounded offline inbox per user, and a bound on the whole
/// store.
///
/// chatIds start at 1 and rise by exactly one per message of a conversation,
/// with no gaps under any number of concurrent senders (each append holds
/// its conversation's shard lock while it numbers and records the message).
///
/// # Bounds
///
/// Every bound is a [`MemoryLimits`] field; what goes past one is dropped,
/// oldest first, and counted ([`usage`](Self::usage)):
///
/// - **per conversation**, [`history`](MemoryLimits::history) messages and
///   [`history_bytes`](MemoryLimits::history_bytes): the oldest are
///   forgotten (a sync then answers `oldest` above them, PROTOCOL.md 2.7);
///   a single message over the byte bound is delivered but not kept
///   (bodies count here, see [`MemoryLimits`]);
/// - **per inbox**, [`inbox`](MemoryLimits::inbox) messages and
///   [`inbox_bytes`](MemoryLimits::inbox_bytes): the oldest are dropped;
/// - **the whole store**, [`total_bytes`](MemoryLimits::total_bytes): when
///   an append or a push takes the store past it, histories pay first
///   (they were delivered already): the least recently appended
///   conversation with history loses its oldest messages, then the next
///   least recent, and so on. A push whose room no history can make takes it from the least
///   recently pushed inboxes, oldest entries first, possibly its own. So
///   once every call has returned the store holds at most `total_bytes`;
///   while calls run it may exceed it by one message per call in flight;
/// - **conversations**, [`conversations`](MemoryLimits::conversations):
///   a conversation is never forgotten, since its chatIds would restart at
///   1 while clients still hold higher ones (its history may be dropped;
///   its record, ~200 bytes, stays). Past the bound, an append that would
///   start a new conversation fails (`message store full`; the sender gets
///   ret -1 and no chatId is used); existing conversations keep working.
///   The records count toward `total_bytes`: at most ~190 MiB at the
///   default 1,000,000;
/// - **inboxes**, [`inboxes`](MemoryLimits::inboxes): a push to a mid
///   with no inbox is dropped past it; and an inbox nobody has read for
///   [`inbox_ttl`](MemoryLimits::inbox_ttl) is deleted, checked when it is
///   pushed to or read and by a sweep that pushes drive (every inbox is
///   looked at at least every `min(inbox_ttl, 64 s)` while pushes arrive).
///
/// A message shared by many inboxes (one group message to offline members)
/// is charged once for all of them; its history slot charges it once more,
/// so a message is charged at most twice, whatever the number of its
/// holders, and in full to each conversation and inbox bound it counts
/// against. (Counting the history slot apart keeps the common send, whose
/// recipients are online, off the shared holder table.)
///
/// ```
/// # use comet_plugins::memory::MemoryStore;
/// let store = MemoryStore::new(100, 50); // history per conversation, inbox per user
/// # let _ = store;
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    limits: MemoryLimits,
    conversations: Box<[Mutex<ConvShard>]>,
    inboxes: Box<[Mutex<InboxShard>]>,
    /// How many inbox entries share each message (by
    /// address: an entry holds its `Arc`, so the address is not reused
    /// while it is counted here).
    held: Box<[Mutex<HashMap<usize, u32>>]>,
    /// Per shard, the stamp of its least recently appended conversation
    /// with history, or of its least recently pushed inbox (`u64::MAX`:
    /// none), so eviction finds the store's least recent without locking
    /// every shard.
    conv_oldest: Box<[AtomicU64]>,
    inbox_oldest: Box<[AtomicU64]>,
    hasher: foldhash::fast::RandomState,
    bytes: AtomicUsize,
    /// Charged bytes of conversation and inbox records.
    record_bytes: AtomicUsize,
    conversation_count: AtomicUsize,
    inbox_count: AtomicUsize,
    history_messages: AtomicUsize,
    inbox_messages: AtomicUsize,
    dropped_history: AtomicU64,
    dropped: AtomicU64,
    expired: AtomicU64,
    refused: AtomicU64,
    /// The next LRU stamp.
    clock: AtomicU64,
    /// The next inbox entry's seq (never reused, see [`Offline::seq`]).
    next_seq: AtomicU64,
    /// Store time (ms) of the next sweep step, and its shard.
    next_sweep: AtomicU64,
    sweep_shard: AtomicUsize,
    epoch: Instant,
}

impl Default for MemoryStore {
    /// [`MemoryLimits::default`].
    fn default() -> Self {
        MemoryStore::with_limits(MemoryLimits::default())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn shards<T: Default>() -> Box<[Mutex<T>]> {
    (0..SHARDS).map(|_| Mutex::default()).collect()
}

impl MemoryStore {
    /// A store keeping `history_limit` messages per conversation and
    /// `inbox_limit` messages per offline user, with no byte bound per
    /// conversation or inbox (as before byte bounds existed); the store-wide
    /// bounds are [`MemoryLimits::default`]'s, so memory stays bounded.
    /// [`with_limits`](Self::with_limits) sets every bound.
    pub fn new(history_limit: usize, inbox_limit: usize) -> Self {
        MemoryStore::with_limits(MemoryLimits {
            history: history_limit,
            inbox: inbox_limit,
            history_bytes: usize::MAX,
            inbox_bytes: usize::MAX,
            ..MemoryLimits::default()
        })
    }

    /// A store with these bounds.
    pub fn with_limits(limits: MemoryLimits) -> Self {
        MemoryStore {
            limits,
            conversations: shards(),
            inboxes: shards(),
            held: shards(),
            conv_oldest: (0..SHARDS).map(|_| AtomicU64::new(u64::MAX)).collect(),
            inbox_oldest: (0..SHARDS).map(|_| AtomicU64::new(u64::MAX)).collect(),
            hasher: Default::default(),
            bytes: AtomicUsize::new(0),
            record_bytes: AtomicUsize::new(0),
            conversation_count: AtomicUsize::new(0),
            inbox_count: AtomicUsize::new(0),
            history_messages: AtomicUsize::new(0),
            inbox_messages: AtomicUsize::new(0),
            dropped_history: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            clock: AtomicU64::new(0),
            next_seq: AtomicU64::new(1),
            next_sweep: AtomicU64::new(0),
            sweep_shard: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    /// Its bounds.
    pub fn limits(&self) -> &MemoryLimits {
        &self.limits
    }

    fn shard_of<K: std::hash::Hash>(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// The last chatId given in a conversation (0 if none).
    pub fn last_chat_id(&self, conversation: Conversation) -> i64 {
        lock(&self.conversations[self.shard_of(&conversation)])
            .map
            .get(&conversation)
            .map_or(0, |c| c.last)
    }

    /// Messages waiting for `mid`.
    pub fn inbox_len(&self, mid: Mid) -> usize {
        lock(&self.inboxes[self.shard_of(&mid)])
            .map
            .get(&mid)
            .map_or(0, |i| i.entries.len())
    }

    /// Offline messages dropped by a bound so far (inbox count or bytes,
    /// the store's bytes, the inbox count); expired inboxes are counted in
    /// [`MemoryUsage::expired_offline`].
    pub fn dropped_offline(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// History messages dropped by a bound so far.
    pub fn dropped_history(&self) -> u64 {
        self.dropped_history.load(Ordering::Relaxed)
    }

    /// What the store holds now and has dropped so far.
    pub fn usage(&self) -> MemoryUsage {
        MemoryUsage {
            bytes: self.bytes.load(Ordering::Relaxed),
            conversations: self.conversation_count.load(Ordering::Relaxed),
            inboxes: self.inbox_count.load(Ordering::Relaxed),
            history_messages: self.history_messages.load(Ordering::Relaxed),
            inbox_messages: self.inbox_messages.load(Ordering::Relaxed),
            dropped_history: self.dropped_history.load(Ordering::Relaxed),
            dropped_offline: self.dropped.load(Ordering::Relaxed),
            expired_offline: self.expired.load(Ordering::Relaxed),
            refused_appends: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Milliseconds since the store was made.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn ttl_ms(&self) -> Option<u64> {
        (!self.limits.inbox_ttl.is_zero())
            .then(|| u64::try_from(self.limits.inbox_ttl.as_millis()).unwrap_or(u64::MAX))
    }

    fn expired(&self, inbox: &Inbox, now: u64) -> bool {
        self.ttl_ms()
            .is_some_and(|ttl| now.saturating_sub(inbox.read_at) >= ttl)
    }

    /// Counts one more holder of `msg`; returns the bytes newly charged (its
    /// whole charge for the first holder).
    fn hold(&self, msg: &Arc<Message>) -> usize {
        let key = Arc::as_ptr(msg) as usize;
        let mut held = lock(&self.held[(key >> 4) % SHARDS]);
        let n = held.entry(key).or_insert(0);
        *n += 1;
        if *n == 1 {
            charge(msg)
        } else {
            0
        }
    }

    /// Counts one holder of `msg` less; returns the bytes freed.
    fn release(&self, msg: &Arc<Message>) -> usize {
        let key = Arc::as_ptr(msg) as usize;
        let mut held = lock(&self.held[(key >> 4) % SHARDS]);
        match held.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                0
            }
            Some(_) => {
                held.remove(&key);
                charge(msg)
            }
            None => 0,
        }
    }

    /// Records conversation shard `i`'s least recent stamp after a change.
    fn settle_convs(oldest: &[AtomicU64], i: usize, shard: &mut ConvShard) {
        let ConvShard { map, lru } = shard;
        lru.compact(|stamp, key| conv_current(map, stamp, key));
        let first = lru.first(|stamp, key| conv_current(map, stamp, key));
        oldest[i].store(first.map_or(u64::MAX, |e| e.0), Ordering::Relaxed);
    }

    /// After an append to conversation shard `i` with `stamp`: keeps the
    /// order compact and the shard's recorded stamp a lower bound of its
    /// least recent one (exact when the shard had none), which costs no
    /// lookup. [`make_room`](Self::make_room) corrects a stale record
    /// before it evicts by it.
    fn appended(oldest: &[AtomicU64], i: usize, shard: &mut ConvShard, stamp: u64) {
        let ConvShard { map, lru } = shard;
        lru.compact(|stamp, key| conv_current(map, stamp, key));
        if oldest[i].load(Ordering::Relaxed) == u64::MAX {
            oldest[i].store(stamp, Ordering::Relaxed);
        }
    }

    /// Records inbox shard `i`'s least recent stamp after a change.
    fn settle_inboxes(oldest: &[AtomicU64], i: usize, shard: &mut InboxShard) {
        let InboxShard { map, lru } = shard;
        lru.compact(|stamp, mid| inbox_current(map, stamp, mid));
        let first = lru.first(|stamp, mid| inbox_current(map, stamp, mid));
        oldest[i].store(first.map_or(u64::MAX, |e| e.0), Ordering::Relaxed);
    }

    /// The shard whose least recent stamp is the oldest, if any has one.
    fn least_recent(oldest: &[AtomicU64]) -> Option<usize> {
        let (i, stamp) = oldest
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, stamp)| stamp)?;
        (stamp != u64::MAX).then_some(i)
    }

    fn add_bytes(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn sub_bytes(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }

    /// Takes the oldest message off `conv`'s history (keeping `lru` in
    /// step) into `victims`.
    fn pop_history(&self, conv: &mut Conv, lru: &mut Recency<Conversation>, victims: &mut Victims) {
        let Some(msg) = conv.history.pop_front() else {
            return;
        };
        conv.bytes -= msg.delivered().msg.len();
        self.sub_bytes(charge(&msg) + HISTORY_ENTRY);
        self.history_messages.fetch_sub(1, Ordering::Relaxed);
        self.dropped_history.fetch_add(1, Ordering::Relaxed);
        if conv.history.is_empty() {
            lru.forget();
        }
        victims.push(msg);
    }

    /// Takes the oldest entry off `mid`'s inbox into `victims`, removing the
    /// inbox once empty. Returns whether the inbox is gone.
    fn pop_inbox(
        &self,
        shard: &mut InboxShard,
        mid: Mid,
        why: Gone,
        victims: &mut Victims,
    ) -> bool {
        let Some(inbox) = shard.map.get_mut(&mid) else {
            return true;
        };
        if let Some(e) = inbox.entries.pop_front() {
            inbox.bytes -= e.msg.delivered().msg.len();
            self.sub_bytes(self.release(&e.msg) + INBOX_ENTRY);
            self.inbox_messages.fetch_sub(1, Ordering::Relaxed);
            match why {
                Gone::Read => {}
                Gone::Dropped => self.count_dropped(mid),
                Gone::Expired => {
                    self.expired.fetch_add(1, Ordering::Relaxed);
                }
            }
            victims.push(e.msg);
        }
        if !inbox.entries.is_empty() {
            return false;
        }
        shard.lru.forget();
        shard.map.remove(&mid);
        self.inbox_count.fetch_sub(1, Ordering::Relaxed);
        self.record_bytes.fetch_sub(INBOX_RECORD, Ordering::Relaxed);
        self.sub_bytes(INBOX_RECORD);
        true
    }

    fn count_dropped(&self, mid: Mid) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // Warn at the first drop and then at every power of two, so a user
        // offline for weeks (or a flood) cannot flood the log.
        if dropped.is_power_of_two() {
            tracing::warn!(
                mid,
                dropped_total = dropped,
                "offline inbox or store full: dropping oldest messages"
            );
        } else {
            tracing::debug!(mid, "offline message dropped by a bound");
        }
    }

    /// Brings the store back under `total_bytes`: histories first, the
    /// least recently appended conversation's oldest messages first; then,
    /// if `inboxes_too`, the least recently pushed inbox's oldest entries.
    fn make_room(&self, inboxes_too: bool) {
        let budget = self.limits.total_bytes;
        let over = || self.bytes.load(Ordering::Relaxed) > budget;
        let mut victims = Victims::default();
        // Each round evicts or corrects one shard's stale stamp; the bound
        // only guards against racing writers refreshing stamps forever.
        for _ in 0..4 * SHARDS {
            if !over() {
                break;
            }
            let Some(i) = Self::least_recent(&self.conv_oldest) else {
                break;
            };
            let mut shard = lock(&self.conversations[i]);
            let ConvShard { map, lru } = &mut *shard;
            let first = lru.first(|stamp, key| conv_current(map, stamp, key));
            if first.map_or(u64::MAX, |e| e.0) != self.conv_oldest[i].load(Ordering::Relaxed) {
                // A lower bound left by appends: correct it and choose again.
                Self::settle_convs(&self.conv_oldest, i, &mut shard);
                continue;
            }
            if let Some((_, key)) = first {
                if let Some(conv) = map.get_mut(&key) {
                    while !conv.history.is_empty() && over() {
                        self.pop_history(conv, lru, &mut victims);
                    }
                }
            }
            Self::settle_convs(&self.conv_oldest, i, &mut shard);
        }
        if inboxes_too {
            for _ in 0..4 * SHARDS {
                if !over() {
                    break;
                }
                let Some(i) = Self::least_recent(&self.inbox_oldest) else {
                    break;
                };
                let mut shard = lock(&self.inboxes[i]);
                let InboxShard { map, lru } = &mut *shard;
                if let Some((_, mid)) = lru.first(|stamp, mid| inbox_current(map, stamp, mid)) {
                    while over() && !self.pop_inbox(&mut shard, mid, Gone::Dropped, &mut victims) {}
                }
                Self::settle_inboxes(&self.inbox_oldest, i, &mut shard);
            }
        }
        // Freed after the locks are released, not under them.
        drop(victims);
    }

    /// Deletes the expired inboxes of one shard, at most every
    /// `min(inbox_ttl, 64 s) / 64`, the next shard each time.
    fn sweep(&self, now: u64) {
        let Some(ttl) = self.ttl_ms() else {
            return;
        };
        let due = self.next_sweep.load(Ordering::Relaxed);
        let step = (ttl.min(64_000) / SHARDS as u64).max(1);
        if now < due
            || self
                .next_sweep
                .compare_exchange(due, now + step, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let i = self.sweep_shard.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let mut victims = Victims::default();
        let mut shard = lock(&self.inboxes[i]);
        let expired: Vec<Mid> = shard
            .map
            .iter()
            .filter(|(_, inbox)| self.expired(inbox, now))
            .map(|(mid, _)| *mid)
            .collect();
        for mid in expired {
            while !self.pop_inbox(&mut shard, mid, Gone::Expired, &mut victims) {}
        }
        Self::settle_inboxes(&self.inbox_oldest, i, &mut shard);
        drop(shard);
        drop(victims);
    }
}

#[async_trait]
impl MessageStore for MemoryStore {
    async fn append(&self, draft: Draft) -> Result<Arc<Message>, BoxError> {
        let start = self.shard_of(&draft.conversation);
        let key = draft.conversation;
        let mut victims = Victims::default();
        let mut shard = lock(&self.conversations[start]);
        let ConvShard { map, lru } = &mut *shard;
        if !map.contains_key(&key) {
            let known = self.conversation_count.load(Ordering::Relaxed);
            let records = self.record_bytes.load(Ordering::Relaxed);
            if known >= self.limits.conversations || records + CONV_RECORD > self.limits.total_bytes
            {
                let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        conversations = known,
                        refused_total = refused,
                        "message store full: refusing new conversations"
                    );
                }
                return Err(format!(
                    "message store full: {known} conversations (MemoryLimits::conversations)"
                )
                .into());
            }
            self.conversation_count.fetch_add(1, Ordering::Relaxed);
            self.record_bytes.fetch_add(CONV_RECORD, Ordering::Relaxed);
            self.add_bytes(CONV_RECORD);
        }
        let conv = map.entry(key).or_default();
        conv.last += 1;
        let msg = draft.into_message(conv.last);
        let new = conv.history.is_empty();
        conv.stamp = self.clock.fetch_add(1, Ordering::Relaxed);
        conv.history.push_back(msg.clone());
        conv.bytes += msg.delivered().msg.len();
        self.add_bytes(charge(&msg) + HISTORY_ENTRY);
        self.history_messages.fetch_add(1, Ordering::Relaxed);
        lru.touch(conv.stamp, key, new);
        while conv.history.len() > self.limits.history || conv.bytes > self.limits.history_bytes {
            self.pop_history(conv, lru, &mut victims);
        }
        let stamp = conv.stamp;
        Self::appended(&self.conv_oldest, start, &mut shard, stamp);
        // Evicted messages (maybe the last references to their bytes and
        // encodings) are freed after the lock is released, not under it.
        drop(shard);
        drop(victims);
        if self.bytes.load(Ordering::Relaxed) > self.limits.total_bytes {
            self.make_room(false);
        }
        Ok(msg)
    }

    async fn history(
        &self,
        conversation: Conversation,
        after: i64,
        limit: usize,
    ) -> Result<History, BoxError> {
        let shard = lock(&self.conversations[self.shard_of(&conversation)]);
        let Some(conv) = shard.map.get(&conversation) else {
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
        let now = self.now();
        self.sweep(now);
        let cost = msg.delivered().msg.len();
        if self.limits.inbox == 0 || cost > self.limits.inbox_bytes {
            self.count_dropped(mid);
            return Ok(());
        }
        let start = self.shard_of(&mid);
        let mut victims = Victims::default();
        let mut shard = lock(&self.inboxes[start]);
        if shard.map.get(&mid).is_some_and(|i| self.expired(i, now)) {
            while !self.pop_inbox(&mut shard, mid, Gone::Expired, &mut victims) {}
        }
        let new = !shard.map.contains_key(&mid);
        if new {
            let open = self.inbox_count.load(Ordering::Relaxed);
            let records = self.record_bytes.load(Ordering::Relaxed);
            if open >= self.limits.inboxes || records + INBOX_RECORD > self.limits.total_bytes {
                Self::settle_inboxes(&self.inbox_oldest, start, &mut shard);
                drop(shard);
                self.count_dropped(mid);
                return Ok(());
            }
            self.inbox_count.fetch_add(1, Ordering::Relaxed);
            self.record_bytes.fetch_add(INBOX_RECORD, Ordering::Relaxed);
            self.add_bytes(INBOX_RECORD);
            shard.map.insert(
                mid,
                Inbox {
                    entries: VecDeque::new(),
                    bytes: 0,
                    read_at: now,
                    stamp: 0,
                },
            );
        }
        let stamp = self.clock.fetch_add(1, Ordering::Relaxed);
        // Taken under the shard lock: seqs rise within each inbox.
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.add_bytes(self.hold(&msg) + INBOX_ENTRY);
        self.inbox_messages.fetch_add(1, Ordering::Relaxed);
        let mut over = 0;
        if let Some(inbox) = shard.map.get_mut(&mid) {
            inbox.stamp = stamp;
            inbox.bytes += cost;
            inbox.entries.push_back(Offline { seq, msg });
            over = inbox.entries.len().saturating_sub(self.limits.inbox);
        }
        shard.lru.touch(stamp, mid, new);
        for _ in 0..over {
            self.pop_inbox(&mut shard, mid, Gone::Dropped, &mut victims);
        }
        while shard
            .map
            .get(&mid)
            .is_some_and(|i| i.bytes > self.limits.inbox_bytes)
        {
            self.pop_inbox(&mut shard, mid, Gone::Dropped, &mut victims);
        }
        Self::settle_inboxes(&self.inbox_oldest, start, &mut shard);
        drop(shard);
        drop(victims);
        if self.bytes.load(Ordering::Relaxed) > self.limits.total_bytes {
            self.make_room(true);
        }
        Ok(())
    }

    async fn offline(&self, mid: Mid, limit: usize) -> Result<Vec<Offline>, BoxError> {
        let now = self.now();
        let mut victims = Victims::default();
        let i = self.shard_of(&mid);
        let mut shard = lock(&self.inboxes[i]);
        let Some(inbox) = shard.map.get_mut(&mid) else {
            return Ok(Vec::new());
        };
        if !self.expired(inbox, now) {
            inbox.read_at = now;
            return Ok(inbox.entries.iter().take(limit).cloned().collect());
        }
        while !self.pop_inbox(&mut shard, mid, Gone::Expired, &mut victims) {}
        Self::settle_inboxes(&self.inbox_oldest, i, &mut shard);
        drop(shard);
        drop(victims);
        Ok(Vec::new())
    }

    async fn remove_offline(&self, mid: Mid, through: u64) -> Result<(), BoxError> {
        let now = self.now();
        let mut victims = Victims::default();
        let i = self.shard_of(&mid);
        let mut shard = lock(&self.inboxes[i]);
        let Some(inbox) = shard.map.get_mut(&mid) else {
            return Ok(());
        };
        inbox.read_at = now;
        while shard
            .map
            .get(&mid)
            .and_then(|i| i.entries.front())
            .is_some_and(|e| e.seq <= through)
        {
            self.pop_inbox(&mut shard, mid, Gone::Read, &mut victims);
        }
        Self::settle_inboxes(&self.inbox_oldest, i, &mut shard);
        drop(shard);
        drop(victims);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn draft(conversation: Conversation, from: Mid, to: Mid, len: usize) -> Draft {
        Draft {
            conversation,
            op: 18,
            from,
            to,
            msg: Bytes::from(vec![b'x'; len]),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_store_conforms() {
        comet_core::testing::store_conformance(|l| async move {
            Arc::new(MemoryStore::new(l.history, l.inbox))
        })
        .await;
    }

    #[tokio::test]
    async fn history_is_bounded_to_the_newest() {
        let store = MemoryStore::new(2, 10);
        let ab = Conversation::direct(1, 2);
        for _ in 0..3 {
            store.append(draft(ab, 1, 2, 1)).await.unwrap();
        }
        let page = store.history(ab, 0, 10).await.unwrap();
        let ids: Vec<i64> = page.messages.iter().map(|m| m.chat_id()).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!((page.oldest, page.head), (2, 3));
        assert_eq!(store.last_chat_id(ab), 3);
        assert_eq!(store.dropped_history(), 1);
    }

    #[tokio::test]
    async fn history_and_inbox_byte_budgets_drop_the_oldest() {
        let one = charge(&draft(Conversation::Group(1), 1, 1, 10_000).into_message(1));
        let store = MemoryStore::with_limits(
            MemoryLimits::default()
                .with_history(1000, 30_000)
                .with_inbox(1000, 20_000),
        );
        let g = Conversation::Group(7);
        for _ in 0..5 {
            let msg = store.append(draft(g, 1, 7, 10_000)).await.unwrap();
            store.push_offline(9, msg).await.unwrap();
        }
        let h = store.history(g, 0, 100).await.unwrap();
        assert_eq!((h.oldest, h.head, h.messages.len()), (3, 5, 3));
        let inbox = store.offline(9, 100).await.unwrap();
        let ids: Vec<i64> = inbox.iter().map(|e| e.msg.chat_id()).collect();
        assert_eq!(ids, vec![4, 5]);
        let u = store.usage();
        assert_eq!((u.dropped_history, u.dropped_offline), (2, 3));
        assert_eq!((u.history_messages, u.inbox_messages), (3, 2));
        // Charged once by the history slot and once for all its inboxes.
        let want = CONV_RECORD + INBOX_RECORD + 3 * (one + HISTORY_ENTRY) + 2 * (one + INBOX_ENTRY);
        assert_eq!(u.bytes, want);
        // A message over the history budget is numbered, delivered, not kept.
        let big = store.append(draft(g, 1, 7, 40_000)).await.unwrap();
        assert_eq!(big.chat_id(), 6);
        let h = store.history(g, 0, 100).await.unwrap();
        assert_eq!((h.oldest, h.head, h.messages.len()), (7, 6, 0));
        // Reading everything frees everything but the conversation record.
        store.remove_offline(9, u64::MAX).await.unwrap();
        let u = store.usage();
        assert_eq!((u.bytes, u.inboxes, u.conversations), (CONV_RECORD, 0, 1));
    }

    #[tokio::test]
    async fn the_store_budget_evicts_least_recent_histories_then_inboxes() {
        let one = charge(&draft(Conversation::Group(1), 1, 1, 10_000).into_message(1));
        // Room for the records and about ten messages.
        let total = 4 * CONV_RECORD + 2 * INBOX_RECORD + 10 * (one + INBOX_ENTRY);
        let store = MemoryStore::with_limits(MemoryLimits::default().with_total_bytes(total));
        for c in 1..=4 {
            for _ in 0..3 {
                store
                    .append(draft(Conversation::Group(c), 1, c, 10_000))
                    .await
                    .unwrap();
            }
            assert!(store.usage().bytes <= total);
        }
        // 12 messages for room of about 10: conversation 1, the least recently
        // appended, lost its oldest.
        let h1 = store.history(Conversation::Group(1), 0, 10).await.unwrap();
        assert!(h1.oldest > 1, "{h1:?}");
        let h4 = store.history(Conversation::Group(4), 0, 10).await.unwrap();
        assert_eq!((h4.oldest, h4.head), (1, 3));
        // Offline pushes take history first, then the oldest inbox entries.
        for i in 0..30 {
            let msg = draft(Conversation::direct(1, 2), 1, 2, 10_000).into_message(i + 1);
            store.push_offline(2 + (i as i32 % 2), msg).await.unwrap();
            let u = store.usage();
            assert!(u.bytes <= total, "{u:?}");
        }
        let u = store.usage();
        assert_eq!(u.history_messages, 0, "{u:?}");
        assert!(u.dropped_offline > 0 && u.inbox_messages >= 8, "{u:?}");
        let kept = store.offline(2, 100).await.unwrap();
        // The newest are kept.
        assert_eq!(kept.last().unwrap().msg.chat_id(), 29);
        // chatIds survive: the next append of conversation 1 continues.
        let next = store
            .append(draft(Conversation::Group(1), 1, 1, 1))
            .await
            .unwrap();
        assert_eq!(next.chat_id(), 4);
    }

    #[tokio::test]
    async fn a_group_message_in_many_inboxes_is_charged_once_for_all_of_them() {
        let store = MemoryStore::default();
        let msg = store
            .append(draft(Conversation::Group(3), 1, 3, 1_000))
            .await
            .unwrap();
        let one = charge(&msg);
        assert_eq!(store.usage().bytes, CONV_RECORD + one + HISTORY_ENTRY);
        for mid in 10..110 {
            store.push_offline(mid, msg.clone()).await.unwrap();
        }
        let inboxes = 100 * (INBOX_RECORD + INBOX_ENTRY);
        assert_eq!(
            store.usage().bytes,
            CONV_RECORD + one + HISTORY_ENTRY + one + inboxes
        );
        // The last reader frees the inboxes' charge; the history keeps its own.
        for mid in 10..110 {
            store.remove_offline(mid, u64::MAX).await.unwrap();
        }
        assert_eq!(store.usage().bytes, CONV_RECORD + one + HISTORY_ENTRY);
    }

    #[tokio::test]
    async fn a_conversation_appended_again_is_evicted_last_and_the_order_stays_small() {
        let one = charge(&draft(Conversation::Group(1), 1, 1, 10_000).into_message(1));
        let total = 4 * CONV_RECORD + 7 * (one + HISTORY_ENTRY);
        let store = MemoryStore::with_limits(MemoryLimits::default().with_total_bytes(total));
        // Two messages each in 1, 2, 3, then conversation 1 again: 2 is now
        // the least recently appended.
        for c in [1, 1, 2, 2, 3, 3, 1] {
            store
                .append(draft(Conversation::Group(c), 1, c, 10_000))
                .await
                .unwrap();
        }
        // One more message (into 4) takes the store past its bound.
        store
            .append(draft(Conversation::Group(4), 1, 4, 10_000))
            .await
            .unwrap();
        let oldest = |c| {
            let store = &store;
            async move {
                store
                    .history(Conversation::Group(c), 0, 10)
                    .await
                    .unwrap()
                    .oldest
            }
        };
        assert_eq!(
            oldest(2).await,
            2,
            "2 was the least recent: it loses its oldest"
        );
        assert_eq!((oldest(1).await, oldest(3).await), (1, 1));
        // Thousands of appends to a few conversations keep the eviction
        // order near its live keys (stale entries are compacted away).
        let store = MemoryStore::new(10, 10);
        for i in 0..20_000 {
            store
                .append(draft(Conversation::Group(i % 3), 1, 1, 1))
                .await
                .unwrap();
        }
        for shard in store.conversations.iter() {
            let shard = lock(shard);
            assert!(
                shard.lru.queue.len() <= 2 * shard.lru.live + 33,
                "{:?}",
                shard.lru
            );
            assert_eq!(
                shard.lru.live,
                shard.map.values().filter(|c| !c.history.is_empty()).count()
            );
        }
    }

    #[tokio::test]
    async fn new_conversations_past_the_bound_are_refused_and_old_ones_continue() {
        let store = MemoryStore::with_limits(MemoryLimits::default().with_conversations(2));
        for to in [2, 3] {
            let m = store
                .append(draft(Conversation::direct(1, to), 1, to, 1))
                .await
                .unwrap();
            assert_eq!(m.chat_id(), 1);
        }
        let err = store
            .append(draft(Conversation::direct(1, 4), 1, 4, 1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("message store full"), "{err}");
        assert_eq!(store.last_chat_id(Conversation::direct(1, 4)), 0);
        let m = store
            .append(draft(Conversation::direct(1, 3), 3, 1, 1))
            .await
            .unwrap();
        assert_eq!(m.chat_id(), 2);
        assert_eq!(store.usage().refused_appends, 1);
    }

    #[tokio::test]
    async fn inboxes_past_their_count_are_dropped() {
        let store = MemoryStore::with_limits(MemoryLimits::default().with_inboxes(2));
        for mid in 1..=3 {
            let msg = draft(Conversation::direct(1, mid), 1, mid, 1).into_message(1);
            store.push_offline(mid, msg).await.unwrap();
        }
        assert_eq!((store.inbox_len(1), store.inbox_len(3)), (1, 0));
        assert_eq!(store.dropped_offline(), 1);
        // Once one is read, there is room again.
        store.remove_offline(1, u64::MAX).await.unwrap();
        let msg = draft(Conversation::direct(1, 3), 1, 3, 1).into_message(2);
        store.push_offline(3, msg).await.unwrap();
        assert_eq!(store.inbox_len(3), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unread_inboxes_expire() {
        let ttl = Duration::from_secs(3600);
        let store = MemoryStore::with_limits(MemoryLimits::default().with_inbox_ttl(ttl));
        let msg = |n| draft(Conversation::direct(1, 2), 1, 2, 100).into_message(n);
        for mid in 1..=100 {
            store.push_offline(mid, msg(1)).await.unwrap();
        }
        tokio::time::advance(ttl / 2).await;
        // Mid 1 reads (and so keeps) its inbox; mid 2 is pushed to, which
        // does not count as read.
        assert_eq!(store.offline(1, 10).await.unwrap().len(), 1);
        store.push_offline(2, msg(2)).await.unwrap();
        tokio::time::advance(ttl / 2).await;
        // Expired on read.
        assert!(store.offline(2, 10).await.unwrap().is_empty());
        assert_eq!(store.usage().expired_offline, 2);
        // The others are swept by later pushes, within a minute or so.
        for _ in 0..SHARDS * 2 {
            tokio::time::advance(Duration::from_secs(1)).await;
            store.push_offline(1, msg(3)).await.unwrap();
        }
        let u = store.usage();
        assert_eq!(u.inboxes, 1, "{u:?}");
        assert_eq!(u.expired_offline, 100, "{u:?}");
        assert_eq!(store.inbox_len(1), 1 + SHARDS * 2);
    }
}
