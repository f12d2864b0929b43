//! Wire codecs: binary framing, the JSON text mapping, and op 9 batches.
//!
//! - [`TcpCodec`]: tokio-util `Decoder`/`Encoder` for TCP and binary WebSocket.
//! - [`json`]: one frame object per WebSocket text frame.
//! - [`BatchWriter`] / [`read_batch`]: op 9 in both modes.
//! - [`Units`]: encoded units waiting for the socket.

mod batch;
pub mod json;
mod tcp;
mod units;

pub use batch::{read_batch, BatchWriter};
pub use tcp::{encode_frame, frame_to_bytes, put_header, split_frames, TcpCodec};
pub use units::Units;

use bytes::{Bytes, BytesMut};

use crate::frame::{Frame, WireMode};

/// Appends `frame` to `dst` in `mode`'s encoding.
pub fn encode(mode: WireMode, frame: &Frame, dst: &mut BytesMut) {
    match mode {
        WireMode::Binary => tcp::encode_frame(frame, dst),
        WireMode::Json => json::encode_frame(frame, dst),
    }
}

/// `frame` in `mode`'s encoding, as one buffer.
pub fn to_bytes(mode: WireMode, frame: &Frame) -> Bytes {
    match mode {
        WireMode::Binary => tcp::frame_to_bytes(frame),
        WireMode::Json => json::frame_to_bytes(frame),
    }
}
