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
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::registry::Outbound;

#[derive(Debug, Default)]
struct Inner {
    items: VecDeque<Outbound>,
    bytes: usize,
    closed: bool,
}

/// Why a push was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue would exceed its byte bound.
    Full,
    /// The session is gone.
    Closed,
}

#[derive(Debug)]
pub(crate) struct Queue {
    inner: Mutex<Inner>,
    /// The session task, woken by the first push into an empty queue and by
    /// kicks.
    waker: AtomicWaker,
    limit: usize,
}

impl Queue {
    pub(crate) fn new(limit: usize) -> Self {
        Queue {
            inner: Mutex::default(),
            waker: AtomicWaker::new(),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the deque half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` of `size` bytes.
    pub(crate) fn push(&self, item: Outbound, size: usize) -> Result<(), Refused> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Refused::Closed);
        }
        if inner.bytes + size > self.limit {
            return Err(Refused::Full);
        }
        inner.bytes += size;
        inner.items.push_back(item);
        let first = inner.items.len() == 1;
        drop(inner);
        if first {
            self.waker.wake();
        }
        Ok(())
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
        self.register(cx);
        let mut inner = self.lock();
        if !inner.items.is_empty() {
            std::mem::swap(&mut inner.items, into);
            inner.bytes = 0;
            return Poll::Ready(true);
        }
        if inner.closed {
            return Poll::Ready(false);
        }
        Poll::Pending
    }

    /// Closes the queue (further pushes are refused) and returns what is
    /// left in it.
    pub(crate) fn close(&self) -> VecDeque<Outbound> {
        let mut inner = self.lock();
        inner.closed = true;
        inner.bytes = 0;
        std::mem::take(&mut inner.items)
    }

    /// Bytes queued and not yet taken by the writer.
    pub(crate) fn bytes(&self) -> usize {
        self.lock().bytes
    }
}
