//! A FIFO of encoded wire units that holds one without allocating.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// A first-in, first-out list of encoded units (shared [`Bytes`]) waiting to
/// be written.
///
/// Most flushes of a session carry exactly one unit (binary mode batches
/// everything into one buffer), so the first unit lives inline and only a
/// second one allocates a `VecDeque`; [`shrink`](Self::shrink) frees that
/// spill-over, so an idle connection keeps no allocation here.
///
/// ```
/// use bytes::Bytes;
/// use comet_core::codec::Units;
///
/// let mut units = Units::default();
/// units.push_back(Bytes::from_static(b"ab"));
/// units.push_back(Bytes::from_static(b"cd"));
/// assert_eq!(units.len(), 2);
/// units.advance(3); // a partial write of 3 bytes
/// assert_eq!(units.front().map(|u| &u[..]), Some(&b"d"[..]));
/// assert_eq!(units.pop_front(), Some(Bytes::from_static(b"d")));
/// assert!(units.is_empty());
/// ```
#[derive(Debug, Default)]
pub struct Units {
    head: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Units {
    /// Number of units held.
    pub fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.len()
    }

    /// Whether no unit is held.
    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// Appends a unit.
    pub fn push_back(&mut self, unit: Bytes) {
        if self.head.is_none() {
            self.head = Some(unit);
        } else {
            self.rest.push_back(unit);
        }
    }

    /// The oldest unit.
    pub fn front(&self) -> Option<&Bytes> {
        self.head.as_ref()
    }

    /// Removes and returns the oldest unit.
    pub fn pop_front(&mut self) -> Option<Bytes> {
        let head = self.head.take();
        self.head = self.rest.pop_front();
        head
    }

    /// The units, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.head.iter().chain(self.rest.iter())
    }

    /// Drops `n` written bytes from the front: whole units, then part of the
    /// next one.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.head.as_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.pop_front();
            } else {
                front.advance(n);
                return;
            }
        }
    }

    /// Frees the spill-over list if it is empty.
    pub fn shrink(&mut self) {
        if self.rest.is_empty() && self.rest.capacity() > 0 {
            self.rest = VecDeque::new();
        }
    }
}
