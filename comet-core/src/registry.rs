//! Live sessions by mid, and the [`Delivery`] seam that hands messages to them.
//!
//! The registry is sharded by mid: delivering to one user takes a read lock on
//! one shard out of 64, never a global lock. Pushing to a session
//! never waits: its queue is bounded in bytes, and a session over its bound
//! is closed (slow consumer) instead of slowing the sender.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::auth::ConnId;
use crate::error::BoxError;
use crate::frame::{Frame, WireMode, HEADER_LEN};
use crate::message::Message;
use crate::queue::{Outbound, Queue, Refused};
use crate::stats::Stats;
use crate::store::MessageStore;
use crate::Mid;

/// Number of registry shards (a power of two, at most 256).
pub(crate) const SHARDS: usize = 64;

/// From this many recipients on, a send looks them up shard by shard (see
/// `Registry::live_by_shard`).
const BY_SHARD: usize = 32;

/// `v` emptied, with its allocation, for borrows of another lifetime: an
/// in-place collect of an empty iterator reuses the buffer (no allocation).
// `filter_map` rather than `filter`: it is what changes the lifetime (its
// closure never runs).
#[allow(clippy::unnecessary_filter_map)]
fn recycle<'b>(mut v: Vec<&Entry>) -> Vec<&'b Entry> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}

/// Hashes mids with one multiply (Fibonacci hashing of the mid xor a
/// per-process random seed): a fan-out to thousands of members hashes every
/// one of them, and SipHash showed in profiles. Mids are authenticated ids,
/// and the seed keeps their bucket positions unpredictable.
#[derive(Clone, Debug)]
pub(crate) struct MidHasher {
    seed: u64,
}

impl Default for MidHasher {
    fn default() -> Self {
        MidHasher {
            seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) | 1,
        }
    }
}

impl BuildHasher for MidHasher {
    type Hasher = MidHash;
    fn build_hasher(&self) -> MidHash {
        MidHash(self.seed)
    }
}

#[derive(Debug)]
pub(crate) struct MidHash(u64);

impl std::hash::Hasher for MidHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_i32(&mut self, v: i32) {
        let x = (self.0 ^ u64::from(v as u32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

/// Bytes of one queue slot, counted against the outbound bound with
/// whatever the slot holds.
const SLOT: usize = std::mem::size_of::<Outbound>();

/// Why a session was told to close from outside its own task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kick {
    None = 0,
    SlowConsumer = 1,
    Disconnected = 2,
    Replaced = 3,
    Shutdown = 4,
}

/// `repr(C)`: the queue, which every delivery locks, at the start of the
/// allocation.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Shared {
    pub(crate) queue: Queue,
    /// Why the session was told to close (`Kick` as `u8`); set once, and
    /// announced through the queue's waker.
    kick: AtomicU8,
    /// The seq of the newest offline-inbox entry the writer has written
    /// (0: none yet): entries up to it may leave the store.
    pub(crate) inbox_written: AtomicU64,
}

impl Shared {
    pub(crate) fn kick_reason(&self) -> Kick {
        match self.kick.load(Ordering::Acquire) {
            1 => Kick::SlowConsumer,
            2 => Kick::Disconnected,
            3 => Kick::Replaced,
            4 => Kick::Shutdown,
            _ => Kick::None,
        }
    }

    pub(crate) fn kick(&self, why: Kick) {
        let _ = self
            .kick
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
        self.queue.wake();
    }

    /// Ready once the session has been kicked. Registers the task on the
    /// queue's waker first, as [`Queue::poll_take`] does: the session's
    /// reader and writer share one task, so one waker serves both.
    pub(crate) fn poll_kicked(&self, cx: &Context<'_>) -> Poll<Kick> {
        self.queue.register(cx);
        match self.kick_reason() {
            Kick::None => Poll::Pending,
            why => Poll::Ready(why),
        }
    }
}

/// A cheap handle to one live session: pushing never blocks.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    conn_id: ConnId,
    mid: Mid,
    mode: WireMode,
    shared: Arc<Shared>,
}

impl SessionHandle {
    pub(crate) fn new(conn_id: ConnId, mid: Mid, mode: WireMode, limit: usize) -> Self {
        let shared = Arc::new(Shared {
            queue: Queue::new(limit),
            kick: AtomicU8::new(0),
            inbox_written: AtomicU64::new(0),
        });
        SessionHandle {
            conn_id,
            mid,
            mode,
            shared,
        }
    }

    /// The connection's id.
    pub fn conn_id(&self) -> ConnId {
        self.conn_id
    }

    /// The authenticated mid.
    pub fn mid(&self) -> Mid {
        self.mid
    }

    /// The connection's wire mode.
    pub fn mode(&self) -> WireMode {
        self.mode
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Queues `item` of `size` bytes; past the byte bound the session is
    /// closed as a slow consumer and `false` returned.
    fn push(&self, item: Outbound, size: usize) -> bool {
        match self.shared.queue.push(item, size) {
            Ok(()) => true,
            Err(refused) => self.refused(refused),
        }
    }

    /// Queues a delivered message (sent inside op 9).
    #[inline]
    pub fn push_message(&self, msg: &Arc<Message>) -> bool {
        // The message is shared; this session holds a queue slot of it.
        let size = msg.wire(self.mode).len() + SLOT;
        match self.shared.queue.push_message(msg, size) {
            Ok(()) => true,
            Err(refused) => self.refused(refused),
        }
    }

    /// A push was refused: past the byte bound the session is closed as a
    /// slow consumer. Always `false`.
    #[cold]
    fn refused(&self, refused: Refused) -> bool {
        if refused == Refused::Full {
            self.shared.kick(Kick::SlowConsumer);
        }
        false
    }

    /// Queues a run of delivered messages in order, under one queue lock
    /// and with one wake-up (see [`Registry::deliver_run`]); past the byte
    /// bound the session is closed as a slow consumer and `false` returned.
    fn push_messages(&self, msgs: &[Arc<Message>]) -> bool {
        let mode = self.mode;
        match self
            .shared
            .queue
            .push_messages(msgs, |m| m.wire(mode).len() + SLOT)
        {
            Ok(()) => true,
            Err(refused) => self.refused(refused),
        }
    }

    /// Queues a replayed message (op 22; with `inbox_seq`, an entry of the
    /// session's offline inbox) once fewer than `window` replayed bytes wait
    /// to be written: a replay goes at the pace the client reads it and is
    /// never counted against the live bound. `false` if the session is gone.
    pub(crate) async fn push_replay(
        &self,
        msg: &Arc<Message>,
        inbox_seq: Option<u64>,
        window: usize,
    ) -> bool {
        let queue = &self.shared.queue;
        if !std::future::poll_fn(|cx| queue.poll_replay_room(cx, window)).await {
            return false;
        }
        // For pacing only: an inbox message is encoded without filling the
        // message's encoding cache, so its size is estimated.
        let len = msg.delivered().msg.len();
        let size = match self.mode {
            WireMode::Binary => HEADER_LEN + 16 + len,
            WireMode::Json => len * 4 / 3 + 128,
        };
        let item = match inbox_seq {
            Some(seq) => Outbound::Inbox(msg.clone(), seq),
            None => Outbound::Message(msg.clone()),
        };
        queue.push_replay(item, size).is_ok()
    }

    /// Waits until every replayed message queued so far is written;
    /// `false` if the session is gone.
    pub(crate) async fn replay_written(&self) -> bool {
        let queue = &self.shared.queue;
        std::future::poll_fn(|cx| queue.poll_replay_room(cx, 1)).await
    }

    /// Queues a frame whose body is in this session's mode.
    pub fn push_frame(&self, frame: Frame) -> bool {
        // What the reply really holds: its wire bytes, the boxed frame and
        // the queue slot (a heartbeat reply is 16 bytes on the wire and
        // about 80 in memory; counting 16 let a client that sends
        // heartbeats and never reads hold several times the bound).
        let size = HEADER_LEN + frame.body.len() + std::mem::size_of::<Frame>() + SLOT;
        self.push(Outbound::Frame(Box::new(frame)), size)
    }

    /// Closes the session (its writer stops, the connection is closed).
    pub fn disconnect(&self) {
        self.shared.kick(Kick::Disconnected);
    }

    /// Whether the session has been told to close.
    pub fn is_closed(&self) -> bool {
        self.shared.kick_reason() != Kick::None
    }
}

/// The live sessions of one mid. Most mids have one, kept inline in the
/// registry's table: a fan-out reads each member's session where it finds
/// the member, with no second allocation to chase (one cache miss less per
/// delivery).
#[derive(Debug)]
enum Sessions {
    One(SessionHandle),
    /// None (an entry kept for offline pushes under way), or several.
    Many(Vec<SessionHandle>),
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::Many(Vec::new())
    }
}

impl std::ops::Deref for Sessions {
    type Target = [SessionHandle];
    #[inline]
    fn deref(&self) -> &[SessionHandle] {
        match self {
            Sessions::One(handle) => std::slice::from_ref(handle),
            Sessions::Many(handles) => handles,
        }
    }
}

impl<'a> IntoIterator for &'a Sessions {
    type Item = &'a SessionHandle;
    type IntoIter = std::slice::Iter<'a, SessionHandle>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Sessions {
    fn push(&mut self, handle: SessionHandle) {
        *self = match std::mem::take(self) {
            Sessions::One(first) => Sessions::Many(vec![first, handle]),
            Sessions::Many(handles) if handles.is_empty() => Sessions::One(handle),
            Sessions::Many(mut handles) => {
                handles.push(handle);
                Sessions::Many(handles)
            }
        };
    }

    /// Keeps the sessions `keep` says yes to, in order.
    fn retain(&mut self, keep: impl Fn(&SessionHandle) -> bool) {
        match self {
            Sessions::One(handle) => {
                if !keep(handle) {
                    *self = Sessions::default();
                }
            }
            Sessions::Many(handles) => {
                handles.retain(keep);
                if handles.len() == 1 {
                    if let Some(only) = handles.pop() {
                        *self = Sessions::One(only);
                    }
                }
            }
        }
    }

    /// Removes and returns the oldest session.
    fn remove_oldest(&mut self) -> Option<SessionHandle> {
        let oldest = self.first()?.clone();
        let conn_id = oldest.conn_id;
        self.retain(|s| s.conn_id != conn_id);
        Some(oldest)
    }
}

#[derive(Debug, Default)]
struct Entry {
    sessions: Sessions,
    /// Offline-inbox pushes under way for this mid; a new session waits for
    /// them before draining the inbox, so none is stranded there.
    offline_inflight: u32,
}

type Map = HashMap<Mid, Entry, MidHasher>;

#[derive(Debug)]
struct Shard {
    map: RwLock<Map>,
    settled: Notify,
}

impl Shard {
    fn read(&self) -> RwLockReadGuard<'_, Map> {
        // A poisoned lock only means a panic elsewhere; the map is still sound.
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Map> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where delivered messages go: the one seam between the engine and the
/// sessions. [`Registry`] delivers to this process's sessions; a multi-node
/// backend wraps it and forwards to other nodes, without touching the engine.
///
/// An extension point: applications implement it.
#[async_trait]
pub trait Delivery: Send + Sync + 'static {
    /// Hands `msg` to every session of every mid in `recipients`, and to the
    /// live sessions of `echo` (the sender's other devices: live copies only,
    /// never its inbox, even when it is also in `recipients`), skipping the
    /// connection `except` (the sending one). Recipients with no session get
    /// the message in their offline inbox. Never waits on a slow session.
    async fn deliver(
        &self,
        recipients: &[Mid],
        echo: Option<Mid>,
        msg: &Arc<Message>,
        except: Option<ConnId>,
    ) -> Result<(), BoxError>;
}

/// The sharded map mid → live sessions of this process.
pub struct Registry {
    shards: Box<[Shard]>,
    hasher: MidHasher,
    store: Arc<dyn MessageStore>,
    stats: Arc<Stats>,
    sessions: AtomicUsize,
    hook_timeout: std::time::Duration,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("sessions", &self.sessions.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry that keeps offline messages in `store`.
    pub fn new(store: Arc<dyn MessageStore>, stats: Arc<Stats>) -> Self {
        let hasher = MidHasher::default();
        Registry {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    map: RwLock::new(HashMap::with_hasher(hasher.clone())),
                    settled: Notify::new(),
                })
                .collect(),
            hasher,
            store,
            stats,
            sessions: AtomicUsize::new(0),
            hook_timeout: std::time::Duration::from_secs(5),
        }
    }

    /// Bounds each offline-inbox push by `timeout` (the builder passes
    /// [`Config::hook_timeout`](crate::Config::hook_timeout)).
    pub fn with_hook_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.hook_timeout = timeout;
        self
    }

    fn shard(&self, mid: Mid) -> &Shard {
        &self.shards[usize::from(self.shard_index(mid))]
    }

    fn shard_index(&self, mid: Mid) -> u8 {
        // High bits pick the shard; the map inside uses the low ones.
        ((self.hasher.hash_one(mid) >> 40) as usize & (SHARDS - 1)) as u8
    }

    /// Tells every registered session to close for `why`.
    pub(crate) fn kick_all(&self, why: Kick) {
        for shard in self.shards.iter() {
            for entry in shard.read().values() {
                for session in &entry.sessions {
                    session.shared.kick(why);
                }
            }
        }
    }

    /// Adds a session, then waits until no offline push for its mid is under
    /// way, so the caller can drain the inbox knowing every message meant for
    /// this mid is either in the inbox or in the session's queue.
    ///
    /// With `max_per_mid` sessions already there, the oldest is closed and
    /// removed first (the newest device wins).
    pub(crate) async fn register(&self, handle: SessionHandle, max_per_mid: usize) {
        let shard = self.shard(handle.mid);
        let mid = handle.mid;
        {
            let mut map = shard.write();
            let entry = map.entry(mid).or_default();
            while entry.sessions.len() >= max_per_mid.max(1) {
                let Some(oldest) = entry.sessions.remove_oldest() else {
                    break;
                };
                oldest.shared.kick(Kick::Replaced);
                self.sessions.fetch_sub(1, Ordering::Relaxed);
                self.stats.session_replaced();
                tracing::info!(
                    mid,
                    conn_id = oldest.conn_id,
                    "closing oldest session: sessions per mid limit reached"
                );
            }
            entry.sessions.push(handle);
        }
        self.sessions.fetch_add(1, Ordering::Relaxed);
        let settle = async {
            loop {
                let settled = shard.settled.notified();
                tokio::pin!(settled);
                settled.as_mut().enable();
                let busy = shard
                    .read()
                    .get(&mid)
                    .is_some_and(|e| e.offline_inflight > 0);
                if !busy {
                    return;
                }
                settled.await;
            }
        };
        // Each push is bounded by the hook timeout; the wait for all of
        // them is bounded too, so no store can hold a login back for long.
        // Past it, a late push lands in the inbox after this session read
        // it: the message stays in history for a sync.
        if tokio::time::timeout(2 * self.hook_timeout, settle)
            .await
            .is_err()
        {
            tracing::warn!(
                mid,
                "login went on while offline pushes were still under way"
            );
        }
    }

    /// Removes connection `conn_id` of `mid`.
    pub(crate) fn unregister(&self, mid: Mid, conn_id: ConnId) {
        let mut map = self.shard(mid).write();
        if let Some(entry) = map.get_mut(&mid) {
            self.remove_session(entry, conn_id);
            if entry.sessions.is_empty() && entry.offline_inflight == 0 {
                map.remove(&mid);
            }
        }
    }

    /// Removes connection `conn_id` of `mid`, and counts its last inbox
    /// work (putting back held messages, removing written inbox entries) as
    /// under way until the guard is dropped: a new login of `mid` waits for
    /// it (bounded) rather than read entries this session already wrote.
    pub(crate) fn unregister_settling(&self, mid: Mid, conn_id: ConnId) -> Inflight<'_> {
        let shard = self.shard(mid);
        {
            let mut map = shard.write();
            let entry = map.entry(mid).or_default();
            self.remove_session(entry, conn_id);
            entry.offline_inflight += 1;
        }
        Inflight { shard, mid }
    }

    /// Drops connection `conn_id` from `entry`, keeping the session count.
    fn remove_session(&self, entry: &mut Entry, conn_id: ConnId) {
        let before = entry.sessions.len();
        entry.sessions.retain(|s| s.conn_id != conn_id);
        if entry.sessions.len() < before {
            self.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Number of live sessions of `mid`.
    pub fn sessions_of(&self, mid: Mid) -> usize {
        self.shard(mid)
            .read()
            .get(&mid)
            .map_or(0, |e| e.sessions.len())
    }

    /// Number of live sessions in all.
    pub fn session_count(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Bytes queued for writing, summed over every session, and the
    /// largest single session's share: the outbound queue depths.
    pub fn pending_bytes(&self) -> (usize, usize) {
        let (mut total, mut max) = (0, 0);
        for shard in self.shards.iter() {
            for entry in shard.read().values() {
                for s in &entry.sessions {
                    let n = s.shared.queue.bytes();
                    total += n;
                    max = max.max(n);
                }
            }
        }
        (total, max)
    }

    /// Mids with at least one live session.
    pub fn online_mids(&self) -> Vec<Mid> {
        let mut mids = Vec::new();
        for shard in self.shards.iter() {
            mids.extend(
                shard
                    .read()
                    .iter()
                    .filter(|(_, e)| !e.sessions.is_empty())
                    .map(|(m, _)| *m),
            );
        }
        mids
    }

    /// Closes every session of `mid`; returns how many.
    pub fn disconnect(&self, mid: Mid) -> usize {
        let map = self.shard(mid).read();
        let Some(entry) = map.get(&mid) else { return 0 };
        for s in &entry.sessions {
            s.disconnect();
        }
        entry.sessions.len()
    }

    /// Closes the authenticated session of connection `conn_id`, if it is
    /// live on this node; returns whether it was. It walks every session
    /// (connections are indexed by mid, not by id): meant for an operator's
    /// or a moderation hook's occasional call, not for every frame.
    pub fn disconnect_conn(&self, conn_id: ConnId) -> bool {
        for shard in self.shards.iter() {
            for entry in shard.read().values() {
                if let Some(s) = entry.sessions.iter().find(|s| s.conn_id == conn_id) {
                    s.disconnect();
                    return true;
                }
            }
        }
        false
    }

    /// Closes every session.
    pub fn disconnect_all(&self) {
        self.kick_all(Kick::Disconnected);
    }

    /// Pushes to the live sessions of `mid`, adding them to `delivered`;
    /// returns `false` when it has none (the caller then keeps the message
    /// offline).
    fn push_live(
        &self,
        mid: Mid,
        msg: &Arc<Message>,
        except: Option<ConnId>,
        delivered: &mut u64,
    ) -> bool {
        let map = self.shard(mid).read();
        map.get(&mid)
            .is_some_and(|entry| self.push_to(entry, msg, except, delivered))
    }

    /// Pushes to every session of `entry` but `except`, adding them to
    /// `delivered` (the caller adds the total to `comet_deliveries_total`
    /// once per send, not once per session); `false` if it has none.
    fn push_to(
        &self,
        entry: &Entry,
        msg: &Arc<Message>,
        except: Option<ConnId>,
        delivered: &mut u64,
    ) -> bool {
        for s in &entry.sessions {
            if Some(s.conn_id) != except {
                // A refused push has kicked the session (counted once, as it
                // ends) or found it closing.
                s.push_message(msg);
                *delivered += 1;
            }
        }
        !entry.sessions.is_empty()
    }

    /// Keeps `msg` in `mid`'s inbox unless a session of `mid` arrived;
    /// `stored` is the copy the inbox keeps. Gives up at `deadline`.
    async fn push_offline(
        &self,
        mid: Mid,
        msg: &Arc<Message>,
        stored: &Arc<Message>,
        except: Option<ConnId>,
        deadline: tokio::time::Instant,
    ) {
        let shard = self.shard(mid);
        {
            let mut map = shard.write();
            let entry = map.entry(mid).or_default();
            // A session may have arrived since push_live looked.
            let mut delivered = 0;
            if self.push_to(entry, msg, except, &mut delivered) {
                self.stats.tel.deliveries.increment(delivered);
                return;
            }
            entry.offline_inflight += 1;
        }
        // Settled however this ends, even if the future is dropped mid-way:
        // a login of `mid` waits for the count to reach zero.
        let _inflight = Inflight { shard, mid };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.store_offline(mid, stored, left).await;
    }

    /// One bounded store call that keeps `msg` in `mid`'s inbox (a failure
    /// is counted and logged: the message stays in history for a sync).
    async fn store_offline(&self, mid: Mid, msg: &Arc<Message>, timeout: std::time::Duration) {
        let push = self.store.push_offline(mid, msg.clone());
        if crate::stats::bounded(&self.stats, timeout, "offline inbox", push)
            .await
            .is_err()
        {
            tracing::warn!(
                mid,
                chat_id = msg.chat_id(),
                "message not kept in the offline inbox"
            );
        }
    }
}

impl Registry {
    /// Keeps `msgs` (live messages a session held back while it was still
    /// writing its inbox, and never wrote) in `mid`'s inbox, behind what is
    /// left of it, if `mid` has no session left: otherwise its other
    /// sessions have their own copies, and this device can sync.
    pub(crate) async fn put_back(&self, mid: Mid, msgs: impl IntoIterator<Item = Arc<Message>>) {
        let shard = self.shard(mid);
        {
            let mut map = shard.write();
            if map.get(&mid).is_some_and(|e| !e.sessions.is_empty()) {
                return;
            }
            map.entry(mid).or_default().offline_inflight += 1;
        }
        let _inflight = Inflight { shard, mid };
        for msg in msgs {
            self.store_offline(mid, &msg, self.hook_timeout).await;
        }
    }
}

/// One offline push (or a session's last inbox work) under way for `mid`;
/// counted down when dropped. A login of `mid` waits for these (bounded).
pub(crate) struct Inflight<'a> {
    shard: &'a Shard,
    mid: Mid,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut map = self.shard.write();
        if let Some(entry) = map.get_mut(&self.mid) {
            entry.offline_inflight -= 1;
            if entry.offline_inflight == 0 && entry.sessions.is_empty() {
                map.remove(&self.mid);
            }
        }
        drop(map);
        self.shard.settled.notify_waiters();
    }
}

#[async_trait]
impl Delivery for Registry {
    async fn deliver(
        &self,
        recipients: &[Mid],
        echo: Option<Mid>,
        msg: &Arc<Message>,
        except: Option<ConnId>,
    ) -> Result<(), BoxError> {
        self.deliver_local(recipients, echo, msg, except).await;
        Ok(())
    }
}

impl Registry {
    /// Delivers `msgs`, a run of messages with the same `recipients`, `echo`
    /// and `except`, as [`Delivery::deliver`] called for each of them in
    /// order would, except that each live session gets the whole run under
    /// one lock of its queue and one wake-up, so its writer sends the run in
    /// one batch rather than one write per message. A cluster node delivers
    /// the bursts its feed reads this way.
    pub async fn deliver_run(
        &self,
        recipients: &[Mid],
        echo: Option<Mid>,
        msgs: &[Arc<Message>],
        except: Option<ConnId>,
    ) {
        match msgs {
            [] => return,
            [msg] => return self.deliver_local(recipients, echo, msg, except).await,
            _ => {}
        }
        let mut delivered = 0;
        if let Some(mid) = echo {
            if let Some(entry) = self.shard(mid).read().get(&mid) {
                Self::push_run_to(entry, msgs, except, &mut delivered);
            }
        }
        let deadline = tokio::time::Instant::now() + self.hook_timeout;
        // Inbox copies (without the per-mode encodings), made for the first
        // recipient without a session here and shared by the others, as in
        // `deliver_local`.
        let mut stored: Vec<Arc<Message>> = Vec::new();
        let offline = self.live_by_shard(recipients, echo, |entry| {
            Self::push_run_to(entry, msgs, except, &mut delivered);
        });
        self.stats.tel.deliveries.increment(delivered);
        for mid in offline {
            if stored.is_empty() {
                stored.extend(msgs.iter().map(|m| Message::new(m.delivered().clone())));
            }
            for (msg, stored) in msgs.iter().zip(&stored) {
                self.push_offline(mid, msg, stored, except, deadline).await;
            }
        }
    }

    /// [`push_to`](Self::push_to) for a run of messages.
    fn push_run_to(
        entry: &Entry,
        msgs: &[Arc<Message>],
        except: Option<ConnId>,
        delivered: &mut u64,
    ) {
        for s in &entry.sessions {
            if Some(s.conn_id) != except {
                s.push_messages(msgs);
                *delivered += msgs.len() as u64;
            }
        }
    }

    /// [`Delivery::deliver`] without the trait's boxed future: the engine
    /// calls this directly when no other delivery was configured.
    pub(crate) async fn deliver_local(
        &self,
        recipients: &[Mid],
        echo: Option<Mid>,
        msg: &Arc<Message>,
        except: Option<ConnId>,
    ) {
        // One counter update per send, not per delivery: a fan-out to N
        // members costs one increment (before each await too, so that a
        // dropped future loses no count).
        let mut delivered = 0;
        if let Some(mid) = echo {
            self.push_live(mid, msg, except, &mut delivered);
        }
        // Every offline push of one send shares one hook timeout, so a
        // group send to many offline members holds its conversation's
        // order lock for one timeout at most, not one per member (past it,
        // the rest keep the message in history only, for a sync).
        let deadline = tokio::time::Instant::now() + self.hook_timeout;
        // Inboxes keep a copy without the live message's per-mode
        // encodings, shared by every offline recipient of this send.
        let mut stored: Option<Arc<Message>> = None;
        let offline = self.live_by_shard(recipients, echo, |entry| {
            self.push_to(entry, msg, except, &mut delivered);
        });
        self.stats.tel.deliveries.increment(delivered);
        for mid in offline {
            let stored = stored.get_or_insert_with(|| Message::new(msg.delivered().clone()));
            self.push_offline(mid, msg, stored, except, deadline).await;
        }
    }

    /// Calls `push` with the entry of every recipient but `skip` that has
    /// a session here, and returns the recipients that have none.
    ///
    /// From [`BY_SHARD`] recipients on, it goes shard by shard: each
    /// shard's lock is taken once for all of its recipients rather than
    /// once per recipient, and its lookups run before its pushes, so that
    /// their cache misses overlap instead of waiting on each other (every
    /// lock is a full barrier). Fan-out to 2,000 members: 0.8x the time
    /// per delivery of one lookup and push per member, though it runs more
    /// instructions. Only the order among recipients changes; each one's
    /// messages are pushed in the order of the caller's calls.
    fn live_by_shard(
        &self,
        recipients: &[Mid],
        skip: Option<Mid>,
        mut push: impl FnMut(&Entry),
    ) -> Vec<Mid> {
        let mut offline = Vec::new();
        if recipients.len() < BY_SHARD {
            for &mid in recipients {
                if Some(mid) == skip {
                    continue;
                }
                match self.shard(mid).read().get(&mid) {
                    Some(entry) if !entry.sessions.is_empty() => push(entry),
                    _ => offline.push(mid),
                }
            }
            return offline;
        }
        // A counting sort of the recipients by shard.
        let shard_of: Vec<u8> = recipients
            .iter()
            .map(|&mid| self.shard_index(mid))
            .collect();
        let mut start = [0u32; SHARDS + 1];
        for &i in &shard_of {
            start[usize::from(i) + 1] += 1;
        }
        for i in 0..SHARDS {
            start[i + 1] += start[i];
        }
        let mut next = start;
        let mut sorted = vec![0; recipients.len()];
        for (&mid, &i) in recipients.iter().zip(&shard_of) {
            let slot = &mut next[usize::from(i)];
            sorted[*slot as usize] = mid;
            *slot += 1;
        }
        // One buffer for every shard's lookups: each shard's borrows end
        // with its lock, and `recycle` hands the allocation on empty.
        let mut spare: Vec<&Entry> = Vec::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let mids = &sorted[start[i] as usize..start[i + 1] as usize];
            if mids.is_empty() {
                continue;
            }
            let map = shard.read();
            let mut found = recycle(spare);
            found.reserve(mids.len());
            for &mid in mids {
                if Some(mid) == skip {
                    continue;
                }
                match map.get(&mid) {
                    Some(entry) if !entry.sessions.is_empty() => found.push(entry),
                    _ => offline.push(mid),
                }
            }
            for entry in &found {
                push(entry);
            }
            spare = recycle(found);
        }
        offline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(conn_id: ConnId) -> SessionHandle {
        SessionHandle::new(conn_id, 7, WireMode::Binary, 1024)
    }

    fn conn_ids(sessions: &Sessions) -> Vec<ConnId> {
        sessions.iter().map(|s| s.conn_id).collect()
    }

    /// Records inbox pushes; nothing else is called by the registry.
    #[derive(Default)]
    struct Inboxes(std::sync::Mutex<Vec<(Mid, i64)>>);

    #[async_trait]
    impl MessageStore for Inboxes {
        async fn append(&self, _: crate::store::Draft) -> Result<Arc<Message>, BoxError> {
            Err("not used".into())
        }
        async fn history(
            &self,
            _: crate::message::Conversation,
            _: i64,
            _: usize,
        ) -> Result<crate::store::History, BoxError> {
            Err("not used".into())
        }
        async fn push_offline(&self, mid: Mid, msg: Arc<Message>) -> Result<(), BoxError> {
            self.0.lock().unwrap().push((mid, msg.chat_id()));
            Ok(())
        }
        async fn offline(&self, _: Mid, _: usize) -> Result<Vec<crate::store::Offline>, BoxError> {
            Err("not used".into())
        }
        async fn remove_offline(&self, _: Mid, _: u64) -> Result<(), BoxError> {
            Err("not used".into())
        }
    }

    fn message(chat_id: i64) -> Arc<Message> {
        Message::new(crate::payload::Delivered {
            op: 20,
            chat_id,
            from: 1,
            to: 9,
            msg: bytes::Bytes::from_static(b"m"),
        })
    }

    /// Every live session gets each message once and in order, every
    /// recipient without one gets it in its inbox, the sender's connection
    /// and skipped echo get no copy: on both sides of the shard-by-shard
    /// threshold, one message at a time and in runs.
    #[tokio::test]
    async fn a_fan_out_reaches_each_recipient_once_in_order_live_or_offline() {
        for members in [BY_SHARD - 1, BY_SHARD, 500] {
            let store = Arc::new(Inboxes::default());
            let registry = Registry::new(store.clone(), Arc::new(Stats::default()));
            let recipients: Vec<Mid> = (1..=members as Mid).collect();
            // Odd mids are online (mid 1, the sender, with two devices).
            let mut handles = Vec::new();
            for &mid in recipients.iter().filter(|m| *m % 2 == 1) {
                let handle =
                    SessionHandle::new(u64::from(mid as u32), mid, WireMode::Binary, 1 << 20);
                handle.shared.queue.release_held();
                registry.register(handle.clone(), 4).await;
                handles.push(handle);
            }
            let other_device = SessionHandle::new(100_000, 1, WireMode::Binary, 1 << 20);
            other_device.shared.queue.release_held();
            registry.register(other_device.clone(), 4).await;
            registry
                .deliver_local(&recipients, Some(1), &message(1), Some(1))
                .await;
            registry
                .deliver_run(&recipients, Some(1), &[message(2), message(3)], Some(1))
                .await;
            let cx = Context::from_waker(futures_util::task::noop_waker_ref());
            for handle in handles.iter().chain([&other_device]) {
                let mut taken = std::collections::VecDeque::new();
                let got: Vec<i64> = match handle.shared.queue.poll_take(&cx, &mut taken) {
                    Poll::Ready(true) => taken
                        .into_iter()
                        .map(|i| i.into_message().chat_id())
                        .collect(),
                    _ => Vec::new(),
                };
                let want: Vec<i64> = if handle.conn_id == 1 {
                    vec![]
                } else {
                    vec![1, 2, 3]
                };
                assert_eq!(got, want, "{members} members, conn {}", handle.conn_id);
            }
            let mut inboxes = store.0.lock().unwrap().clone();
            inboxes.sort_unstable();
            let want: Vec<(Mid, i64)> = recipients
                .iter()
                .filter(|m| *m % 2 == 0)
                .flat_map(|&m| [(m, 1), (m, 2), (m, 3)])
                .collect();
            assert_eq!(inboxes, want, "{members} members");
        }
    }

    #[test]
    fn a_recycled_lookup_buffer_keeps_its_allocation() {
        let entry = Entry::default();
        let mut found: Vec<&Entry> = Vec::with_capacity(64);
        found.push(&entry);
        let (at, capacity) = (found.as_ptr() as usize, found.capacity());
        let again: Vec<&Entry> = recycle(found);
        assert!(again.is_empty());
        assert_eq!((again.as_ptr() as usize, again.capacity()), (at, capacity));
    }

    #[test]
    fn sessions_keep_one_inline_and_several_in_order() {
        let mut sessions = Sessions::default();
        assert!(sessions.is_empty());
        sessions.push(handle(1));
        assert!(matches!(sessions, Sessions::One(_)));
        sessions.push(handle(2));
        sessions.push(handle(3));
        assert_eq!(conn_ids(&sessions), [1, 2, 3]);
        assert_eq!(sessions.remove_oldest().map(|s| s.conn_id), Some(1));
        assert_eq!(conn_ids(&sessions), [2, 3]);
        sessions.retain(|s| s.conn_id != 3);
        assert!(matches!(sessions, Sessions::One(_)));
        assert_eq!(conn_ids(&sessions), [2]);
        sessions.retain(|s| s.conn_id != 2);
        assert!(sessions.is_empty());
        assert!(sessions.remove_oldest().is_none());
        sessions.push(handle(4));
        assert_eq!(conn_ids(&sessions), [4]);
    }
}
