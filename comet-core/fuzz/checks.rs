//! The properties the fuzz targets check, shared with the regression tests
//! (`tests/fuzz_regressions.rs` runs every saved input through them).
//!
//! Each check must hold for every input; a panic is a finding.

#![allow(dead_code, unreachable_pub)]

use bytes::{Bytes, BytesMut};
use comet_core::codec::{self, json, read_batch, split_frames, BatchWriter, TcpCodec};
use comet_core::payload::{AuthReply, Delivered, SendReply, SendRequest};
use comet_core::{AuthRequest, WireMode};
use tokio_util::codec::Decoder;

const MAX_BODY: usize = 1024;

/// The TCP decoder over `data` in chunks whose sizes come from the input's
/// first byte: never panics, never reserves more than one frame beyond the
/// input, and every decoded frame re-encodes to the bytes it came from.
pub fn tcp_decoder(data: &[u8]) {
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut codec = TcpCodec::new(MAX_BODY);
    let mut buf = BytesMut::new();
    let mut consumed = Vec::new();
    let mut decoded = Vec::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let used = before.len() - buf.len();
                    consumed.extend_from_slice(&before[..used]);
                    decoded.push(frame);
                }
                Ok(None) => {
                    assert!(buf.capacity() <= (before.len() + 16 + MAX_BODY) * 2);
                    break;
                }
                Err(_) => return,
            }
        }
    }
    let mut again = BytesMut::new();
    for frame in &decoded {
        codec::encode_frame(frame, &mut again);
    }
    assert_eq!(&again[..], &consumed[..]);
}

/// The JSON frame parser: never panics; what parses re-encodes and parses
/// to the same frame.
pub fn json_frame(data: &[u8]) {
    if let Ok(frame) = json::decode_frame(Bytes::copy_from_slice(data)) {
        let text = json::frame_to_bytes(&frame);
        let again = json::decode_frame(text).expect("re-encoded frame parses");
        assert_eq!(
            (again.ver, again.op, again.seq),
            (frame.ver, frame.op, frame.seq)
        );
        if frame.body.is_empty() {
            assert!(again.body.is_empty());
        }
    }
}

/// Every payload parser in both modes: never panics, and what parses
/// round-trips.
pub fn payloads(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    for mode in [WireMode::Binary, WireMode::Json] {
        if let Ok(req) = SendRequest::decode(mode, &body) {
            let again = SendRequest::decode(mode, &req.encode(mode)).expect("round trip");
            assert_eq!(again, req);
        }
        if let Ok(reply) = SendReply::decode(mode, &body) {
            let again = SendReply::decode(mode, &reply.encode(mode)).expect("round trip");
            assert_eq!((again.ret, again.chat_id), (reply.ret, reply.chat_id));
        }
        let frame = comet_core::Frame::new(1, 18, 0, body.clone());
        if let Ok(d) = Delivered::decode(mode, &frame) {
            let wire = d.encode_frame(mode);
            let inner = match mode {
                WireMode::Binary => split_frames(wire, usize::MAX).expect("one frame"),
                WireMode::Json => vec![json::decode_frame(wire).expect("one frame")],
            };
            assert_eq!(Delivered::decode(mode, &inner[0]).expect("round trip"), d);
        }
    }
    let _ = AuthReply::decode(data);
    if let Ok(req) = AuthRequest::parse(&body) {
        let _ = (req.mid(), req.mkey());
    }
}

/// The op 9 reader in both modes: never panics, and what it reads round
/// trips: its frames, written back as an op 9 by the server's own
/// [`BatchWriter`] and read again, are the same frames (in binary mode the
/// body is also byte for byte the one read).
pub fn batch_reader(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    for mode in [WireMode::Binary, WireMode::Json] {
        let Ok(frames) = read_batch(mode, &body, MAX_BODY) else {
            continue;
        };
        let mut writer = BatchWriter::new(mode, usize::MAX);
        for frame in &frames {
            assert!(
                writer.push(&codec::to_bytes(mode, frame)),
                "an open batch takes every frame"
            );
        }
        let Some(wire) = writer.take() else {
            assert!(frames.is_empty());
            continue;
        };
        let op9 = match mode {
            WireMode::Binary => {
                let mut buf = BytesMut::from(&wire[..]);
                let op9 = TcpCodec::new(usize::MAX >> 1)
                    .decode(&mut buf)
                    .expect("the writer's op 9 decodes")
                    .expect("one whole op 9");
                assert!(buf.is_empty(), "one op 9 and nothing else");
                assert_eq!(op9.body, body, "binary frames re-encode byte for byte");
                op9
            }
            WireMode::Json => json::decode_frame(wire).expect("the writer's op 9 parses"),
        };
        assert_eq!((op9.ver, op9.op, op9.seq), (1, 9, 0));
        let again = read_batch(mode, &op9.body, MAX_BODY).expect("the written batch reads");
        assert_eq!(again, frames, "{mode:?} batch round trip");
    }
}
