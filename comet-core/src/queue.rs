//! A session's outbound queue: bounded in bytes, one consumer (the
//! session's writer), many producers (every sender delivering to it).
//!
//! A mutex around a `VecDeque` beats a linked-block channel here: a push is
//! an uncontended lock, a contiguous write and — only when the queue was
//! empty — one wake; the writer swaps the whole deque out in one lock, so a
//! burst costs the producers nothing more. An idle session's queue holds no
//! allocation.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

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
    ready: Notify,
    limit: usize,
}

impl Queue {
    pub(crate) fn new(limit: usize) -> Self {
        Queue {
            inner: Mutex::default(),
            ready: Notify::new(),
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
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Waits until something is queued and moves all of it into `into`
    /// (which must be empty). Returns `false` once the queue is closed and
    /// empty.
    pub(crate) async fn take(&self, into: &mut VecDeque<Outbound>) -> bool {
        loop {
            {
                let mut inner = self.lock();
                if !inner.items.is_empty() {
                    std::mem::swap(&mut inner.items, into);
                    inner.bytes = 0;
                    return true;
                }
                if inner.closed {
                    return false;
                }
            }
            // notify_one keeps a permit when nobody waits: no lost wake-up.
            self.ready.notified().await;
        }
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
