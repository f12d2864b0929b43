//! A session's outbound queue: bounded in bytes, one consumer (the
//! session's writer), many producers (every sender delivering to it).
//!
//! A mutex around a `VecDeque` beats a linked-block channel here: a push is
//! an uncontended lock, a contiguous write and — only when the queue was
//! empty — one wake; the writer swaps the whole deque out in one lock, so a
//! burst costs the producers nothing more. An idle session's queue holds no
//! allocation.
//!
//! The wake-up is an `AtomicWaker`, not a `tokio::sync::Notify`: a pending
//! `Notified` takes the notifier's mutex every time it is polled, and a
//! session's task is polled on every frame in either direction. The queue's
//! waker also carries the session's kicks (see `registry::Shared`), so one
//! cheap registration covers both.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::frame::Frame;
use crate::message::Message;

/// What a session's writer has to send.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A reply or other frame, already in the session's mode (boxed: it is
    /// rarer than messages, and keeps queue slots at two words).
    Frame(Box<Frame>),
    /// A delivered message, batched into op 9 by the writer.
    Message(Arc<Message>),
    /// A message of the session's offline inbox and its entry's seq: once
    /// written, the entry leaves the store.
    Inbox(Arc<Message>, u64),
}

impl Outbound {
    #[cfg(test)]
    pub(crate) fn into_message(self) -> Arc<Message> {
        match self {
            Outbound::Message(m) | Outbound::Inbox(m, _) => m,
            Outbound::Frame(_) => unreachable!("a frame"),
        }
    }
}

/// Every queue exists once per session, so its counters are `u32`: the
/// byte bound itself is at most `u32::MAX` (see [`Queue::new`]), and a
/// replay's pacing window is a few frames.
///
/// `repr(C)`, in this order: what every push reads and writes (the deque,
/// the bound's counters and the flags) comes first, then what only a
/// login's inbox and a sync use, so that the fields a fan-out touches sit
/// together. (Measured on its own, this order made no difference within
/// the benchmark's noise; it costs nothing.)
#[derive(Debug, Default)]
#[repr(C)]
struct Inner {
    items: VecDeque<Outbound>,
    /// Bytes of `items`.
    bytes: u32,
    /// Bytes the writer took and has not yet written: they count against
    /// the bound too, or a session whose peer stopped reading would hold
    /// twice the bound (a stuck flush plus a full queue).
    in_flight: u32,
    /// Bytes of `held`.
    held_bytes: u32,
    /// Whether live messages are held back: the session is still writing
    /// its offline inbox (PROTOCOL.md 2.1: the inbox comes before any
    /// message sent after op 8).
    holding: bool,
    closed: bool,
    /// Bytes of replayed messages (op 22) queued, and taken but not yet
    /// written. They are paced (see [`Queue::poll_replay_room`]) rather
    /// than bounded: a replay never closes a session as a slow consumer.
    replay: u32,
    replay_in_flight: u32,
    /// Live messages that arrived while holding: they wait here, counted
    /// against the bound, and join `items` when the inbox is done. Boxed
    /// and made only when the first one arrives: most logins never need it,
    /// and every idle session would carry an empty deque's 32 bytes.
    #[allow(clippy::box_collection)]
    held: Option<Box<VecDeque<Outbound>>>,
}

/// `n` as a queue counter (saturating: a bound never exceeds `u32::MAX`).
fn counted(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Why a push was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue would exceed its byte bound.
    Full,
    /// The session is gone.
    Closed,
}

/// `repr(C)`: the lock and the bound first, then the session's waker, which
/// a push into an empty queue wakes (see [`Inner`]).
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Queue {
    inner: Mutex<Inner>,
    limit: u32,
    /// The session task, woken by the first push into an empty queue and by
    /// kicks.
    waker: AtomicWaker,
    /// The task replaying a sync, woken when the writer has written.
    room: AtomicWaker,
}

impl Queue {
    /// A queue of at most `limit` bytes (capped at `u32::MAX`) that holds
    /// live messages back until [`release_held`](Self::release_held).
    pub(crate) fn new(limit: usize) -> Self {
        Queue {
            inner: Mutex::new(Inner {
                holding: true,
                ..Inner::default()
            }),
            waker: AtomicWaker::new(),
            room: AtomicWaker::new(),
            limit: counted(limit),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the deque half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `size` as the live bound counts it, if the queue has room for it
    /// beside what is queued, being written and held back.
    #[inline]
    fn room_for(&self, inner: &Inner, size: usize) -> Result<u32, Refused> {
        let queued =
            u64::from(inner.bytes) + u64::from(inner.in_flight) + u64::from(inner.held_bytes);
        if queued + size as u64 > u64::from(self.limit) {
            return Err(Refused::Full);
        }
        // Within the bound, so within `u32`.
        Ok(size as u32)
    }

    /// Queues `item` of `size` bytes (a delivered message waits while the
    /// queue holds them back).
    pub(crate) fn push(&self, item: Outbound, size: usize) -> Result<(), Refused> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Refused::Closed);
        }
        let size = self.room_for(&inner, size)?;
        if inner.holding && matches!(item, Outbound::Message(_)) {
            inner.held.get_or_insert_with(Box::default).push_back(item);
            inner.held_bytes += size;
            return Ok(());
        }
        inner.bytes += size;
        self.enqueue(inner, item);
        Ok(())
    }

    /// Queues a delivered message of `size` bytes, as [`push`](Self::push)
    /// would: the fan-out's path, run once per recipient, so the common
    /// case (not holding, not closed, within the bound) takes one branch.
    #[inline]
    pub(crate) fn push_message(&self, msg: &Arc<Message>, size: usize) -> Result<(), Refused> {
        let mut inner = self.lock();
        if inner.holding | inner.closed {
            drop(inner);
            return self.push(Outbound::Message(msg.clone()), size);
        }
        inner.bytes += self.room_for(&inner, size)?;
        self.enqueue(inner, Outbound::Message(msg.clone()));
        Ok(())
    }

    /// Queues delivered messages in order, each of `size(msg)` bytes, as
    /// [`push`](Self::push) would one by one, but under one lock and with
    /// at most one wake-up: the writer finds the whole run at once and
    /// sends it in one batch. Stops at the first message past the bound
    /// (those before it stay queued).
    pub(crate) fn push_messages(
        &self,
        msgs: &[Arc<Message>],
        size: impl Fn(&Message) -> usize,
    ) -> Result<(), Refused> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Refused::Closed);
        }
        let was_empty = inner.items.is_empty();
        let mut result = Ok(());
        for msg in msgs {
            let size = match self.room_for(&inner, size(msg)) {
                Ok(size) => size,
                Err(refused) => {
                    result = Err(refused);
                    break;
                }
            };
            let item = Outbound::Message(msg.clone());
            if inner.holding {
                inner.held.get_or_insert_with(Box::default).push_back(item);
                inner.held_bytes += size;
            } else {
                inner.items.push_back(item);
                inner.bytes += size;
            }
        }
        let wake = was_empty && !inner.items.is_empty();
        drop(inner);
        if wake {
            self.waker.wake();
        }
        result
    }

    /// Appends `item` and releases the lock; wakes the session task if the
    /// queue was empty (it is already awake otherwise).
    #[inline]
    fn enqueue(&self, mut inner: MutexGuard<'_, Inner>, item: Outbound) {
        inner.items.push_back(item);
        let first = inner.items.len() == 1;
        drop(inner);
        if first {
            self.waker.wake();
        }
    }

    /// Queues a replayed message of `size` bytes, outside the live bound;
    /// the caller paces itself with
    /// [`poll_replay_room`](Self::poll_replay_room).
    pub(crate) fn push_replay(&self, item: Outbound, size: usize) -> Result<(), Refused> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Refused::Closed);
        }
        inner.replay = inner.replay.saturating_add(counted(size));
        self.enqueue(inner, item);
        Ok(())
    }

    /// Ready once fewer than `window` replayed bytes wait to be written:
    /// `Ready(false)` if the queue is closed.
    pub(crate) fn poll_replay_room(&self, cx: &Context<'_>, window: usize) -> Poll<bool> {
        self.room.register(cx.waker());
        let inner = self.lock();
        if inner.closed {
            Poll::Ready(false)
        } else if (u64::from(inner.replay) + u64::from(inner.replay_in_flight)) < window as u64 {
            Poll::Ready(true)
        } else {
            Poll::Pending
        }
    }

    /// The messages held back, if the queue still holds them (the inbox was
    /// not done); it holds no more after this.
    pub(crate) fn take_held(&self) -> Option<VecDeque<Outbound>> {
        let mut inner = self.lock();
        if !std::mem::take(&mut inner.holding) {
            return None;
        }
        inner.held_bytes = 0;
        Some(inner.held.take().map(|held| *held).unwrap_or_default())
    }

    /// Lets the messages held back join the queue, and stops holding.
    pub(crate) fn release_held(&self) {
        let mut inner = self.lock();
        inner.holding = false;
        let Some(held) = inner.held.take() else {
            return;
        };
        let first = inner.items.is_empty();
        inner.items.extend(*held);
        inner.bytes += std::mem::take(&mut inner.held_bytes);
        drop(inner);
        if first {
            self.waker.wake();
        }
    }

    /// Wakes the session task (a kick).
    pub(crate) fn wake(&self) {
        self.waker.wake();
    }

    /// Registers the session task for [`wake`](Self::wake)s and pushes into
    /// an empty queue. Every poll of a session task registers before it
    /// checks anything, so no wake-up is lost.
    pub(crate) fn register(&self, cx: &Context<'_>) {
        self.waker.register(cx.waker());
    }

    /// Moves everything queued into `into` (which must be empty), or waits
    /// for something to be. `Ready(false)` once the queue is closed and
    /// empty.
    pub(crate) fn poll_take(&self, cx: &Context<'_>, into: &mut VecDeque<Outbound>) -> Poll<bool> {
        debug_assert!(into.is_empty(), "the writer takes into an empty deque");
        self.register(cx);
        let mut inner = self.lock();
        if !inner.items.is_empty() {
            // A swap, not a take: the writer's drained deque becomes the
            // queue's, so a busy session reuses two buffers.
            std::mem::swap(&mut inner.items, into);
            inner.in_flight += std::mem::take(&mut inner.bytes);
            inner.replay_in_flight = inner
                .replay_in_flight
                .saturating_add(std::mem::take(&mut inner.replay));
            return Poll::Ready(true);
        }
        if inner.closed {
            return Poll::Ready(false);
        }
        Poll::Pending
    }

    /// The writer wrote everything it took.
    pub(crate) fn written(&self) {
        let mut inner = self.lock();
        inner.in_flight = 0;
        let replayed = std::mem::take(&mut inner.replay_in_flight) > 0;
        drop(inner);
        if replayed {
            self.room.wake();
        }
    }

    /// Frees the queue's buffer if it is empty (an idle session).
    pub(crate) fn shrink(&self) {
        let mut inner = self.lock();
        if inner.items.is_empty() {
            inner.items = VecDeque::new();
        }
    }

    /// Closes the queue (further pushes are refused) and returns what is
    /// left in it.
    pub(crate) fn close(&self) -> VecDeque<Outbound> {
        let mut inner = self.lock();
        inner.closed = true;
        inner.bytes = 0;
        inner.in_flight = 0;
        inner.replay = 0;
        inner.replay_in_flight = 0;
        inner.held_bytes = 0;
        let items = std::mem::take(&mut inner.items);
        drop(inner);
        self.room.wake();
        items
    }

    /// Bytes queued or being written, not yet written.
    pub(crate) fn bytes(&self) -> usize {
        let inner = self.lock();
        inner.bytes as usize + inner.in_flight as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;

    fn item() -> Outbound {
        Outbound::Frame(Box::new(Frame::new(1, 3, 0, "")))
    }

    fn message(chat_id: i64) -> Outbound {
        Outbound::Message(crate::message::Message::new(crate::payload::Delivered {
            op: 18,
            chat_id,
            from: 1,
            to: 2,
            msg: bytes::Bytes::from_static(b"m"),
        }))
    }

    fn chat_ids(items: &VecDeque<Outbound>) -> Vec<i64> {
        items
            .iter()
            .map(|i| match i {
                Outbound::Message(m) | Outbound::Inbox(m, _) => m.chat_id(),
                Outbound::Frame(_) => 0,
            })
            .collect()
    }

    #[test]
    fn live_messages_wait_for_the_inbox_but_replies_do_not() {
        let queue = Queue::new(100);
        let cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert_eq!(queue.push(message(7), 30), Ok(()));
        assert_eq!(queue.push(item(), 10), Ok(()));
        assert_eq!(
            queue.push_replay(Outbound::Inbox(message(1).into_message(), 1), 10),
            Ok(())
        );
        // Held bytes count against the bound.
        assert_eq!(queue.push(message(8), 61), Err(Refused::Full));
        let mut taken = VecDeque::new();
        assert_eq!(queue.poll_take(&cx, &mut taken), Poll::Ready(true));
        assert_eq!(chat_ids(&taken), vec![0, 1]);
        taken.clear();
        queue.written();
        queue.release_held();
        assert_eq!(queue.push(message(8), 30), Ok(()));
        assert_eq!(queue.poll_take(&cx, &mut taken), Poll::Ready(true));
        assert_eq!(chat_ids(&taken), vec![7, 8]);
    }

    #[test]
    fn bytes_taken_but_not_written_count_against_the_bound() {
        let queue = Queue::new(100);
        queue.release_held();
        let cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert_eq!(queue.push(item(), 60), Ok(()));
        let mut taken = VecDeque::new();
        assert_eq!(queue.poll_take(&cx, &mut taken), Poll::Ready(true));
        assert_eq!(taken.len(), 1);
        // The writer holds 60 bytes it has not written (a peer that stopped
        // reading): only 40 more fit.
        assert_eq!(queue.bytes(), 60);
        assert_eq!(queue.push(item(), 50), Err(Refused::Full));
        assert_eq!(queue.push(item(), 40), Ok(()));
        queue.written();
        assert_eq!(queue.bytes(), 40);
        assert_eq!(queue.push(item(), 60), Ok(()));
        assert_eq!(queue.push(item(), 1), Err(Refused::Full));
    }

    #[test]
    fn replayed_bytes_are_paced_not_bounded() {
        let queue = Queue::new(100);
        queue.release_held();
        let cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert_eq!(queue.poll_replay_room(&cx, 50), Poll::Ready(true));
        // Past the live bound, and the live bound still holds for live items.
        assert_eq!(queue.push_replay(item(), 150), Ok(()));
        assert_eq!(queue.push(item(), 100), Ok(()));
        assert_eq!(queue.push(item(), 1), Err(Refused::Full));
        assert_eq!(queue.poll_replay_room(&cx, 50), Poll::Pending);
        let mut taken = VecDeque::new();
        assert_eq!(queue.poll_take(&cx, &mut taken), Poll::Ready(true));
        // Taken is not written: still no room.
        assert_eq!(queue.poll_replay_room(&cx, 50), Poll::Pending);
        queue.written();
        assert_eq!(queue.poll_replay_room(&cx, 50), Poll::Ready(true));
        queue.close();
        assert_eq!(queue.poll_replay_room(&cx, 50), Poll::Ready(false));
        assert_eq!(queue.push_replay(item(), 1), Err(Refused::Closed));
    }

    #[test]
    fn a_run_of_messages_is_queued_whole_held_back_and_bounded_per_message() {
        let queue = Queue::new(100);
        let cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let run: Vec<_> = (1..=4).map(|c| message(c).into_message()).collect();
        // Held back while the inbox is written, like single pushes.
        assert_eq!(queue.push_messages(&run[..2], |_| 20), Ok(()));
        let mut taken = VecDeque::new();
        assert_eq!(queue.poll_take(&cx, &mut taken), Poll::Pending);
        queue.release_held();
        assert_eq!(queue.push_messages(&run[2..], |_| 20), Ok(()));
        assert_eq!(queue.poll_take(&cx, &mut taken), Poll::Ready(true));
        assert_eq!(chat_ids(&taken), vec![1, 2, 3, 4]);
        taken.clear();
        // 80 bytes in flight: of a run of three 10-byte messages, two fit;
        // the third is refused and the two before it stay queued.
        assert_eq!(queue.push_messages(&run[..3], |_| 10), Err(Refused::Full));
        assert_eq!(queue.bytes(), 100);
        queue.written();
        assert_eq!(queue.poll_take(&cx, &mut taken), Poll::Ready(true));
        assert_eq!(chat_ids(&taken), vec![1, 2]);
        queue.close();
        assert_eq!(queue.push_messages(&run, |_| 1), Err(Refused::Closed));
    }
}
