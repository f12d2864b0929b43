//! The JSON text-mode frame mapping (PROTOCOL.md 1.2).

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::FrameError;
use crate::frame::Frame;

#[derive(Deserialize)]
struct JsonFrameIn<'a> {
    ver: u16,
    op: u32,
    seq: u32,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
}

/// Parses one text-mode frame. The returned body is the JSON text of the
/// `body` value, sharing `text`'s memory (empty for an absent or `null` body).
///
/// ```
/// use comet_core::codec::json;
/// let frame = json::decode_frame(r#"{"ver":1,"op":2,"seq":5}"#.into()).unwrap();
/// assert_eq!((frame.ver, frame.op, frame.seq, frame.body.len()), (1, 2, 5, 0));
/// ```
pub fn decode_frame(text: Bytes) -> Result<Frame, FrameError> {
    let parsed: JsonFrameIn<'_> =
        serde_json::from_slice(&text).map_err(|e| FrameError::Json(e.to_string()))?;
    let body = match parsed.body {
        Some(raw) => text.slice_ref(raw.get().as_bytes()),
        None => Bytes::new(),
    };
    Ok(Frame {
        ver: parsed.ver,
        op: parsed.op,
        seq: parsed.seq,
        body,
    })
}

/// Appends `frame` as one text-mode JSON object. The body must be JSON text
/// (as every payload encoder in this crate produces for [`crate::WireMode::Json`]);
/// an empty body is written as `null`.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) {
    write_head(dst, frame.ver, frame.op, frame.seq);
    if frame.body.is_empty() {
        dst.put_slice(b"null");
    } else {
        dst.put_slice(&frame.body);
    }
    dst.put_u8(b'}');
}

/// `frame` as one text-mode JSON object.
pub fn frame_to_bytes(frame: &Frame) -> Bytes {
    let mut buf = BytesMut::with_capacity(48 + frame.body.len());
    encode_frame(frame, &mut buf);
    buf.freeze()
}

/// Writes `{"ver":V,"op":O,"seq":S,"body":` — a frame object up to its body.
pub(crate) fn write_head(dst: &mut BytesMut, ver: u16, op: u32, seq: u32) {
    use std::fmt::Write;
    // BytesMut implements fmt::Write; writing to it cannot fail.
    let _ = write!(dst, r#"{{"ver":{ver},"op":{op},"seq":{seq},"body":"#);
}

/// Splits a JSON array of frame objects (an op 9 body in text mode).
pub fn split_array(body: &Bytes) -> Result<Vec<Frame>, FrameError> {
    let items: Vec<&RawValue> =
        serde_json::from_slice(body).map_err(|e| FrameError::Json(e.to_string()))?;
    items
        .into_iter()
        .map(|raw| decode_frame(body.slice_ref(raw.get().as_bytes())))
        .collect()
}
