//! The binary frame codec of TCP and binary WebSocket (PROTOCOL.md 1.1).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::FrameError;
use crate::frame::{Frame, DEFAULT_MAX_BODY, HEADER_LEN};

/// The least room the decoder keeps in its buffer for the next read.
const MIN_READ: usize = 256;

/// A tokio-util codec for binary frames with a body limit.
///
/// Decoding never panics on any input, and never reserves more than
/// `HEADER_LEN + max_body` bytes for a frame whatever its header claims: the
/// length is checked before any allocation. Nor does it reserve a frame's
/// announced length up front: the buffer grows with the bytes that arrive
/// (at most doubling, and by at least 256 bytes), so a peer that announces
/// a large frame and sends little of it holds little memory.
///
/// The limit can change between frames ([`set_max_body`](Self::set_max_body)):
/// the transports decode with a small one until the connection has logged in.
///
/// ```
/// use bytes::BytesMut;
/// use comet_core::codec::TcpCodec;
/// use comet_core::frame::{op, Frame};
/// use tokio_util::codec::{Decoder, Encoder};
///
/// let mut codec = TcpCodec::new(1024);
/// let mut buf = BytesMut::new();
/// codec.encode(Frame::new(1, op::HEARTBEAT, 5, ""), &mut buf).unwrap();
/// assert_eq!(&buf[..], &[0, 0, 0, 16, 0, 16, 0, 1, 0, 0, 0, 2, 0, 0, 0, 5]);
/// let frame = codec.decode(&mut buf).unwrap().unwrap();
/// assert_eq!((frame.op, frame.seq), (op::HEARTBEAT, 5));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TcpCodec {
    max_body: usize,
}

impl Default for TcpCodec {
    fn default() -> Self {
        TcpCodec::new(DEFAULT_MAX_BODY)
    }
}

impl TcpCodec {
    /// A codec accepting bodies of at most `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        TcpCodec { max_body }
    }

    /// The configured body limit.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Changes the body limit for the frames decoded from now on.
    pub fn set_max_body(&mut self, max_body: usize) {
        self.max_body = max_body;
    }
}

/// Checks a header at the start of `src` (which must hold at least
/// [`HEADER_LEN`] bytes) and returns the body length it announces.
fn check_header(src: &[u8], max_body: usize) -> Result<usize, FrameError> {
    let pack_len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
    let header_len = u16::from_be_bytes([src[4], src[5]]);
    if header_len as usize != HEADER_LEN {
        return Err(FrameError::BadHeaderLen(header_len));
    }
    if (pack_len as usize) < HEADER_LEN {
        return Err(FrameError::PackLenTooSmall(pack_len));
    }
    let body_len = pack_len as usize - HEADER_LEN;
    if body_len > max_body {
        return Err(FrameError::BodyTooLarge {
            len: body_len,
            max: max_body,
        });
    }
    Ok(body_len)
}

impl Decoder for TcpCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            // Keep room for a useful read. A buffer whose earlier frames are
            // still referenced cannot be reclaimed, and `FramedRead` then
            // reserves a single byte: reads would come in 8-byte pieces.
            src.reserve(MIN_READ.saturating_sub(src.len()));
            return Ok(None);
        }
        let body_len = check_header(src, self.max_body)?;
        let frame_len = HEADER_LEN + body_len;
        if src.len() < frame_len {
            // Room for the rest of the frame (bounded by max_body, checked
            // above), but no more than what has arrived so far: a header
            // alone must not make us allocate what it announces.
            let missing = frame_len - src.len();
            src.reserve(missing.min(src.len().max(MIN_READ)));
            return Ok(None);
        }
        let mut frame = src.split_to(frame_len);
        frame.advance(6);
        let ver = frame.get_u16();
        let op = frame.get_u32();
        let seq = frame.get_u32();
        Ok(Some(Frame {
            ver,
            op,
            seq,
            body: frame.freeze(),
        }))
    }
}

impl Encoder<Frame> for TcpCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(&frame, dst);
        Ok(())
    }
}

impl Encoder<&Frame> for TcpCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(frame, dst);
        Ok(())
    }
}

/// Writes a frame header announcing a body of `body_len` bytes.
pub fn put_header(dst: &mut impl BufMut, body_len: usize, ver: u16, op: u32, seq: u32) {
    dst.put_u32((HEADER_LEN + body_len) as u32);
    dst.put_u16(HEADER_LEN as u16);
    dst.put_u16(ver);
    dst.put_u32(op);
    dst.put_u32(seq);
}

/// Appends `frame` in binary framing to `dst`.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) {
    dst.reserve(HEADER_LEN + frame.body.len());
    put_header(dst, frame.body.len(), frame.ver, frame.op, frame.seq);
    dst.extend_from_slice(&frame.body);
}

/// `frame` in binary framing, as one buffer.
pub fn frame_to_bytes(frame: &Frame) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + frame.body.len());
    encode_frame(frame, &mut buf);
    buf.freeze()
}

/// Reads every whole frame of a buffer that must hold nothing else (a binary
/// WebSocket message, or an op 9 body). Each body shares `buf`'s memory.
pub fn split_frames(mut buf: Bytes, max_body: usize) -> Result<Vec<Frame>, FrameError> {
    let mut frames = Vec::new();
    while !buf.is_empty() {
        if buf.len() < HEADER_LEN {
            return Err(FrameError::Truncated(buf.len()));
        }
        let body_len = check_header(&buf, max_body)?;
        if buf.len() < HEADER_LEN + body_len {
            return Err(FrameError::Truncated(buf.len()));
        }
        let mut head = buf.split_to(HEADER_LEN);
        head.advance(6);
        let ver = head.get_u16();
        let op = head.get_u32();
        let seq = head.get_u32();
        frames.push(Frame {
            ver,
            op,
            seq,
            body: buf.split_to(body_len),
        });
    }
    Ok(frames)
}
