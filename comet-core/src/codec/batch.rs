//! op 9 batches (PROTOCOL.md 2.6).

use bytes::{BufMut, Bytes, BytesMut};

use super::{json, tcp};
use crate::error::FrameError;
use crate::frame::{op, Frame, WireMode, HEADER_LEN, SERVER_VER};

/// Largest buffer a writer starts a unit with.
const MAX_HINT: usize = 64 * 1024;

/// Assembles op 9 frames from already-encoded inner frames, keeping each
/// batch's body within `max_body` (in text mode: its JSON text).
///
/// ```
/// use comet_core::codec::{read_batch, BatchWriter, TcpCodec};
/// use comet_core::frame::WireMode;
/// use comet_core::payload::Delivered;
/// use tokio_util::codec::Decoder;
///
/// let msg = Delivered { op: 18, chat_id: 1, from: 1, to: 2, msg: "hi".into() };
/// let mut batch = BatchWriter::new(WireMode::Binary, 1024);
/// assert!(batch.push(&msg.encode_frame(WireMode::Binary)));
/// let mut wire = bytes::BytesMut::from(&batch.take().unwrap()[..]);
/// let op9 = TcpCodec::new(1024).decode(&mut wire).unwrap().unwrap();
/// let inner = read_batch(WireMode::Binary, &op9.body, 1024).unwrap();
/// assert_eq!(Delivered::decode(WireMode::Binary, &inner[0]).unwrap(), msg);
/// ```
#[derive(Debug)]
pub struct BatchWriter {
    mode: WireMode,
    /// `u32`s where the values fit: every session holds one of these.
    max_body: u32,
    buf: BytesMut,
    start: usize,
    count: u32,
    /// Size of the last unit taken (at most `MAX_HINT`): what the next
    /// buffer starts with.
    hint: u32,
}

impl BatchWriter {
    /// An empty batch writer for `mode`.
    pub fn new(mode: WireMode, max_body: usize) -> Self {
        BatchWriter {
            mode,
            max_body: u32::try_from(max_body).unwrap_or(u32::MAX),
            buf: BytesMut::new(),
            start: 0,
            count: 0,
            hint: 0,
        }
    }

    /// Number of inner frames in the open batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the open batch holds no frame.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn body_len(&self) -> usize {
        match self.mode {
            WireMode::Binary => self.buf.len() - self.start - HEADER_LEN,
            // `[` plus the items and commas written so far; `]` is counted in push.
            WireMode::Json => self.buf.len() - self.start,
        }
    }

    /// Adds one encoded inner frame to the open batch (opening one if needed).
    /// Returns `false`, adding nothing, when the open batch is not empty and
    /// the frame would take its body past `max_body`; call
    /// [`finish`](Self::finish) or [`take`](Self::take) and push again. A frame alone
    /// is always accepted, even one larger than `max_body` (it cannot be split).
    #[inline]
    pub fn push(&mut self, inner: &[u8]) -> bool {
        // The common case, once per delivered message: one more frame into
        // an open binary batch.
        if self.count > 0 && self.mode == WireMode::Binary {
            if self.body_len() + inner.len() > self.max_body as usize {
                return false;
            }
            self.buf.extend_from_slice(inner);
            self.count += 1;
            return true;
        }
        self.push_other(inner)
    }

    /// [`push`](Self::push) opening a batch, or in JSON mode.
    fn push_other(&mut self, inner: &[u8]) -> bool {
        // The batch's own bytes: a binary header, or the JSON head
        // `{"ver":1,"op":9,"seq":0,"body":[` and the closing `]}`.
        let framing = match self.mode {
            WireMode::Binary => HEADER_LEN,
            WireMode::Json => 40,
        };
        self.open(inner.len() + framing);
        if self.count > 0 {
            let extra = match self.mode {
                WireMode::Binary => inner.len(),
                WireMode::Json => inner.len() + 2, // comma and closing bracket
            };
            if self.body_len() + extra > self.max_body as usize {
                return false;
            }
        } else {
            self.start = self.buf.len();
            match self.mode {
                WireMode::Binary => self.buf.put_bytes(0, HEADER_LEN),
                WireMode::Json => {
                    json::write_head(&mut self.buf, SERVER_VER, op::BATCH, 0);
                    self.start = self.buf.len();
                    self.buf.put_u8(b'[');
                }
            }
        }
        if self.count > 0 && self.mode == WireMode::Json {
            self.buf.put_u8(b',');
        }
        self.buf.extend_from_slice(inner);
        self.count += 1;
        true
    }

    /// Gives an empty buffer room for `need` bytes, or for as much as the
    /// last unit if that was larger (up to 64 KiB): one allocation per unit.
    fn open(&mut self, need: usize) {
        if self.buf.capacity() == 0 {
            self.buf.reserve(need.max(self.hint as usize));
        }
    }

    /// Closes the open batch, if any; its bytes stay buffered until
    /// [`take`](Self::take).
    pub fn finish(&mut self) {
        if self.count == 0 {
            return;
        }
        match self.mode {
            WireMode::Binary => {
                let body_len = self.buf.len() - self.start - HEADER_LEN;
                let mut header = &mut self.buf[self.start..self.start + HEADER_LEN];
                tcp::put_header(&mut header, body_len, SERVER_VER, op::BATCH, 0);
            }
            WireMode::Json => self.buf.put_slice(b"]}"),
        }
        self.count = 0;
    }

    /// Appends a frame that is not part of a batch (a reply), after closing
    /// the open batch so the order on the wire is the order of calls.
    pub fn push_frame(&mut self, frame: &Frame) {
        self.finish();
        self.open(frame.body.len() + 64);
        super::encode(self.mode, frame, &mut self.buf);
    }

    /// Closes the open batch and returns every byte written since the last
    /// call, or `None` when there is none. In binary mode that may be several
    /// frames back to back (one write); in JSON mode call it after each frame,
    /// since each text message holds exactly one frame object.
    pub fn take(&mut self) -> Option<Bytes> {
        self.finish();
        if self.buf.is_empty() {
            None
        } else {
            // `split()` keeps the rest of the allocation: once this unit is
            // written and dropped, the next one reuses it in place.
            self.hint = self.buf.len().min(MAX_HINT) as u32;
            Some(self.buf.split().freeze())
        }
    }

    /// Frees the buffer if nothing is pending in it (an idle connection
    /// need not keep one); the next push allocates one sized like the last
    /// unit taken.
    pub fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }
}

/// Reads the inner frames of an op 9 body (what clients do).
pub fn read_batch(mode: WireMode, body: &Bytes, max_body: usize) -> Result<Vec<Frame>, FrameError> {
    match mode {
        WireMode::Binary => tcp::split_frames(body.clone(), max_body),
        WireMode::Json => json::split_array(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_writer_keeps_no_buffer_and_sizes_the_next_one() {
        let mut batch = BatchWriter::new(WireMode::Binary, 1024);
        assert!(batch.push(&[1u8; 300]));
        let unit = batch.take().unwrap();
        assert_eq!(unit.len(), HEADER_LEN + 300);
        // Nothing kept for an idle connection once released...
        batch.release();
        assert_eq!(batch.buf.capacity(), 0);
        // ...and the next unit starts with room for one like the last.
        assert!(batch.push(&[2u8; 10]));
        assert!(batch.buf.capacity() >= HEADER_LEN + 300);
        let next = batch.take().unwrap();
        assert_eq!(&next[HEADER_LEN..], &[2u8; 10]);
        assert_eq!(
            &unit[HEADER_LEN..],
            &[1u8; 300][..],
            "the first unit is intact"
        );
    }
}
