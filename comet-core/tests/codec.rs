//! Codec tests beyond the byte-exact vectors (`vectors.rs`): framing under
//! arbitrary read splits, hostile input, the bad-input rows of PROTOCOL.md §3,
//! the JSON text mapping (§1.2), the `msg` encoding rule (§2.4) and op 9
//! batching (§2.6).

use bytes::{BufMut, Bytes, BytesMut};
use comet_core::codec::{self, json, read_batch, split_frames, BatchWriter, TcpCodec};
use comet_core::error::FrameError;
use comet_core::frame::{op, Frame, WireMode, HEADER_LEN};
use comet_core::payload::{AuthReply, Delivered, SendReply, SendRequest};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_util::codec::{Decoder, Encoder};

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// Largest body the framing property tests generate (and the codec allows).
const PROP_MAX_BODY: usize = 299;

/// A body limit large enough never to matter.
const HUGE: usize = 1 << 20;

/// `cases` cases, and no regression file written next to this test.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

fn frame_strategy() -> impl Strategy<Value = Frame> {
    (
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        vec(any::<u8>(), 0..=PROP_MAX_BODY),
    )
        .prop_map(|(ver, op, seq, body)| Frame::new(ver, op, seq, body))
}

/// A raw 16-byte header with every field chosen by the caller.
fn raw_header(pack_len: u32, header_len: u16, ver: u16, op: u32, seq: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN);
    v.put_u32(pack_len);
    v.put_u16(header_len);
    v.put_u16(ver);
    v.put_u32(op);
    v.put_u32(seq);
    v
}

/// Decodes every complete frame currently in `buf`, panicking on an error.
fn drain(codec: &mut TcpCodec, buf: &mut BytesMut, out: &mut Vec<Frame>) {
    while let Some(frame) = codec.decode(buf).expect("valid frames decode") {
        out.push(frame);
    }
}

/// What a decoder made of a byte stream: the frames, then how it stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// Waiting for more bytes, with this many buffered.
    Pending(usize),
    /// A framing error (its Display text).
    Failed(String),
}

/// Feeds `input` to a fresh `TcpCodec::new(max_body)` in chunks of `chunk`
/// bytes, decoding as far as possible after each chunk.
fn decode_chunked(input: &[u8], chunk: usize, max_body: usize) -> (Vec<Frame>, Stop) {
    let mut codec = TcpCodec::new(max_body);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Stop::Failed(e.to_string())),
            }
        }
    }
    let left = buf.len();
    (frames, Stop::Pending(left))
}

fn delivered(op: u32, chat_id: i64, from: i32, to: i32, msg: impl Into<Bytes>) -> Delivered {
    Delivered {
        op,
        chat_id,
        from,
        to,
        msg: msg.into(),
    }
}

/// Message bytes: arbitrary bytes (mostly not UTF-8) or arbitrary text
/// (UTF-8 with escapes, multi-byte characters and control characters).
fn msg_strategy(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..max),
        proptest::string::string_regex(&format!("(?s).{{0,{}}}", max / 2))
            .expect("regex")
            .prop_map(String::into_bytes),
        // ASCII with characters JSON must escape.
        vec(
            prop_oneof![Just(b'"'), Just(b'\\'), Just(b'\n'), Just(0u8), Just(b'a')],
            0..max
        )
    ]
}

fn delivered_strategy(max_msg: usize) -> impl Strategy<Value = Delivered> {
    (
        prop_oneof![Just(op::SEND_TO_USER), Just(op::SEND_TO_GROUP)],
        any::<i64>(),
        any::<i32>(),
        any::<i32>(),
        msg_strategy(max_msg),
    )
        .prop_map(|(op, chat_id, from, to, msg)| delivered(op, chat_id, from, to, msg))
}

/// Arbitrary JSON values, biased towards the keys and value shapes the
/// decoders look at, so fuzzing reaches past the first syntax check.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..70_000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(Value::from("base64")),
        Just(Value::from("aGk=")),
        Just(Value::from("/w==")),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            btree_map(json_key(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("ver".to_owned()),
        Just("op".to_owned()),
        Just("seq".to_owned()),
        Just("body".to_owned()),
        Just("from".to_owned()),
        Just("to".to_owned()),
        Just("msg".to_owned()),
        Just("enc".to_owned()),
        Just("chatId".to_owned()),
        Just("ret".to_owned()),
        Just("mid".to_owned()),
        Just("error".to_owned()),
        "[a-z]{0,4}",
    ]
}

/// Top-level JSON objects with mostly the interesting keys.
fn json_object() -> impl Strategy<Value = Value> {
    btree_map(json_key(), json_value(), 0..8).prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Objects shaped like the typed bodies (each field present or not, with a
/// plausible or an arbitrary value), so the payload decoders often succeed.
fn payload_object() -> impl Strategy<Value = Value> {
    let int = prop_oneof![
        3 => (-2i64..3).prop_map(Value::from),
        3 => any::<i32>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => json_value(),
    ];
    let text = prop_oneof![
        3 => ".{0,12}".prop_map(Value::from),
        1 => Just(Value::from("aGk=")),
        1 => Just(Value::from("/w==")),
        1 => Just(Value::from("not base64")),
        1 => json_value(),
    ];
    let enc = prop_oneof![
        Just(Value::from("base64")),
        Just(Value::Null),
        Just(Value::from("hex")),
    ];
    (
        proptest::option::weighted(0.8, int.clone()),
        proptest::option::weighted(0.8, int.clone()),
        proptest::option::weighted(0.8, int.clone()),
        proptest::option::weighted(0.8, int.clone()),
        proptest::option::weighted(0.5, int),
        proptest::option::weighted(0.8, text.clone()),
        proptest::option::weighted(0.3, enc),
        proptest::option::weighted(0.5, text),
    )
        .prop_map(|(from, to, chat_id, ret, mid, msg, enc, error)| {
            let mut obj = serde_json::Map::new();
            let fields = [
                ("from", from),
                ("to", to),
                ("chatId", chat_id),
                ("ret", ret),
                ("mid", mid),
                ("msg", msg),
                ("enc", enc),
                ("error", error),
            ];
            for (key, value) in fields {
                if let Some(value) = value {
                    obj.insert(key.to_owned(), value);
                }
            }
            Value::Object(obj)
        })
}

/// Objects shaped like text-mode frames, fields present or not.
fn frame_object() -> impl Strategy<Value = Value> {
    let int = prop_oneof![
        4 => (0i64..70_000).prop_map(Value::from),
        1 => any::<u32>().prop_map(Value::from),
        1 => json_value(),
    ];
    (
        proptest::option::weighted(0.9, int.clone()),
        proptest::option::weighted(0.9, int.clone()),
        proptest::option::weighted(0.9, int),
        proptest::option::of(json_value()),
    )
        .prop_map(|(ver, op, seq, body)| {
            let mut obj = serde_json::Map::new();
            for (key, value) in [("ver", ver), ("op", op), ("seq", seq), ("body", body)] {
                if let Some(value) = value {
                    obj.insert(key.to_owned(), value);
                }
            }
            Value::Object(obj)
        })
}

/// Bytes for the never-panic properties: noise, JSON objects and arrays of
/// them, and truncated or mangled JSON.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => vec(any::<u8>(), 0..2000),
        1 => json_object().prop_map(|v| v.to_string().into_bytes()),
        4 => payload_object().prop_map(|v| v.to_string().into_bytes()),
        2 => frame_object().prop_map(|v| v.to_string().into_bytes()),
        2 => vec(frame_object(), 0..4).prop_map(|v| Value::Array(v).to_string().into_bytes()),
        1 => vec(json_object(), 0..4).prop_map(|v| Value::Array(v).to_string().into_bytes()),
        1 => (json_object(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(v, i, b)| {
            let mut text = v.to_string().into_bytes();
            let at = i.index(text.len());
            text[at] = b;
            text
        }),
        1 => (json_object(), any::<prop::sample::Index>()).prop_map(|(v, i)| {
            let mut text = v.to_string().into_bytes();
            let at = i.index(text.len());
            text.truncate(at);
            text
        }),
    ]
}

/// Byte streams for the binary decoder: noise, a plausible header (headerLen
/// 16) with any packLen, or valid frames followed by such a header or noise.
fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
    let pack_len = prop_oneof![
        any::<u32>(),
        0u32..16,
        16u32..(16 + 1024 + 64),
        Just(16 + 1024),
        Just(16 + 1025),
        Just(0xFFFF_FFF0),
        Just(u32::MAX),
    ];
    let small_frame = (any::<u16>(), any::<u32>(), vec(any::<u8>(), 0..200));
    prop_oneof![
        vec(any::<u8>(), 0..2000),
        (pack_len.clone(), any::<u16>(), vec(any::<u8>(), 0..2000)).prop_map(
            |(pack_len, ver, tail)| {
                let mut v = raw_header(pack_len, 16, ver, 7, 1);
                v.extend_from_slice(&tail);
                v
            }
        ),
        (
            vec(small_frame, 0..6),
            pack_len,
            any::<u16>(),
            vec(any::<u8>(), 0..300)
        )
            .prop_map(|(frames, pack_len, header_len, tail)| {
                let mut buf = BytesMut::new();
                for (ver, op, body) in frames {
                    codec::encode_frame(&Frame::new(ver, op, 0, body), &mut buf);
                }
                buf.extend_from_slice(&raw_header(pack_len, header_len % 24, 1, 2, 3));
                buf.extend_from_slice(&tail);
                buf.to_vec()
            }),
    ]
}

// ---------------------------------------------------------------------------
// 1. framing under every read split
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn frames_survive_every_split_point_and_byte_by_byte_reads(
        frames in vec(frame_strategy(), 1..20),
    ) {
        let mut wire = BytesMut::new();
        let mut ends = Vec::new();
        for frame in &frames {
            TcpCodec::new(PROP_MAX_BODY).encode(frame, &mut wire).unwrap();
            ends.push(wire.len());
        }
        let wire = wire.freeze();
        let n = wire.len();
        prop_assert_eq!(n, frames.iter().map(|f| HEADER_LEN + f.body.len()).sum::<usize>());

        for k in 0..=n {
            let mut codec = TcpCodec::new(PROP_MAX_BODY);
            let mut buf = BytesMut::from(&wire[..k]);
            let mut got = Vec::new();
            drain(&mut codec, &mut buf, &mut got);
            // Exactly the frames that ended within the first k bytes, and the
            // bytes of the partial one stay buffered.
            let complete = ends.iter().filter(|&&end| end <= k).count();
            prop_assert_eq!(got.len(), complete, "split at {}", k);
            let consumed = if complete == 0 { 0 } else { ends[complete - 1] };
            prop_assert_eq!(buf.len(), k - consumed, "split at {}", k);
            buf.extend_from_slice(&wire[k..]);
            drain(&mut codec, &mut buf, &mut got);
            prop_assert_eq!(&got, &frames, "split at {}", k);
            prop_assert!(buf.is_empty(), "leftover after split at {}", k);
        }

        let mut codec = TcpCodec::new(PROP_MAX_BODY);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in wire.iter() {
            buf.put_u8(byte);
            drain(&mut codec, &mut buf, &mut got);
        }
        prop_assert_eq!(&got, &frames);
        prop_assert!(buf.is_empty());

        // The whole buffer read as one binary WebSocket message.
        prop_assert_eq!(&split_frames(wire.clone(), PROP_MAX_BODY).unwrap(), &frames);
    }
}

// ---------------------------------------------------------------------------
// 2. hostile input: no panic, bounded allocation
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn tcp_decoder_never_panics_nor_over_reserves(input in hostile_stream()) {
        const MAX: usize = 1024;
        let mut codec = TcpCodec::new(MAX);
        let mut buf = BytesMut::from(&input[..]);
        let bound = 2 * input.len().max(HEADER_LEN + MAX);
        let mut frames = Vec::new(); // kept alive: the buffer stays shared
        loop {
            let before = buf.len();
            let result = codec.decode(&mut buf);
            prop_assert!(
                buf.capacity() <= bound,
                "capacity {} after decode of {} input bytes (bound {})",
                buf.capacity(), input.len(), bound
            );
            match result {
                Ok(Some(frame)) => {
                    prop_assert!(frame.body.len() <= MAX);
                    prop_assert_eq!(buf.len(), before - HEADER_LEN - frame.body.len());
                    frames.push(frame);
                }
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before, "Ok(None) consumes nothing");
                    break;
                }
                Err(e) => {
                    prop_assert!(matches!(
                        e,
                        FrameError::BadHeaderLen(_)
                            | FrameError::PackLenTooSmall(_)
                            | FrameError::BodyTooLarge { .. }
                    ), "unexpected error {:?}", e);
                    prop_assert_eq!(e.ws_close_code(), 1002);
                    break;
                }
            }
        }
        // Whatever decoded re-encodes to the bytes it came from.
        let mut again = BytesMut::new();
        for frame in &frames {
            codec::encode_frame(frame, &mut again);
        }
        prop_assert_eq!(&again[..], &input[..again.len()]);
    }

    #[test]
    fn tcp_decoder_outcome_does_not_depend_on_read_sizes(
        input in hostile_stream(),
        chunk in 1usize..64,
    ) {
        let whole = decode_chunked(&input, input.len(), 1024);
        let pieces = decode_chunked(&input, chunk, 1024);
        prop_assert_eq!(&whole, &pieces);
        let one_by_one = decode_chunked(&input, 1, 1024);
        prop_assert_eq!(&whole, &one_by_one);
    }

    #[test]
    fn split_frames_never_panics_and_is_exact(input in hostile_stream()) {
        let bytes = Bytes::from(input.clone());
        match split_frames(bytes.clone(), 1024) {
            Ok(frames) => {
                // Every byte belongs to a frame, and re-encoding gives it back.
                let mut again = BytesMut::new();
                for frame in &frames {
                    prop_assert!(frame.body.len() <= 1024);
                    codec::encode_frame(frame, &mut again);
                }
                prop_assert_eq!(&again[..], &input[..]);
                // The binary op 9 reader is the same function.
                prop_assert_eq!(read_batch(WireMode::Binary, &bytes, 1024).unwrap(), frames);
            }
            Err(e) => {
                prop_assert!(matches!(
                    e,
                    FrameError::BadHeaderLen(_)
                        | FrameError::PackLenTooSmall(_)
                        | FrameError::BodyTooLarge { .. }
                        | FrameError::Truncated(_)
                ), "unexpected error {:?}", e);
                prop_assert!(read_batch(WireMode::Binary, &bytes, 1024).is_err());
            }
        }
    }

    #[test]
    fn json_decoders_never_panic(input in hostile_bytes()) {
        let bytes = Bytes::from(input.clone());

        if let Ok(frame) = json::decode_frame(bytes.clone()) {
            // The body shares the text's memory and re-encodes stably.
            let range = bytes.as_ptr() as usize..=bytes.as_ptr() as usize + bytes.len();
            prop_assert!(frame.body.is_empty() || range.contains(&(frame.body.as_ptr() as usize)));
            let again = json::decode_frame(json::frame_to_bytes(&frame)).unwrap();
            prop_assert_eq!(again, frame);
        }

        match json::split_array(&bytes) {
            Ok(frames) => {
                prop_assert_eq!(read_batch(WireMode::Json, &bytes, 1024).unwrap(), frames);
            }
            Err(e) => {
                prop_assert!(matches!(e, FrameError::Json(_)));
                prop_assert_eq!(e.ws_close_code(), 1007);
                prop_assert!(read_batch(WireMode::Json, &bytes, 1024).is_err());
            }
        }
    }

    #[test]
    fn payload_decoders_never_panic(input in hostile_bytes(), frame_op in any::<u32>()) {
        let bytes = Bytes::from(input);
        let frame = Frame::new(1, frame_op, 0, bytes.clone());

        // Binary layouts: the outcome depends on the length alone.
        let req = SendRequest::decode(WireMode::Binary, &bytes);
        prop_assert_eq!(req.is_ok(), bytes.len() >= 8);
        if let Ok(req) = req {
            prop_assert_eq!(req.encode(WireMode::Binary), bytes.clone());
        }
        let reply = SendReply::decode(WireMode::Binary, &bytes);
        prop_assert_eq!(reply.is_ok(), bytes.len() == 9);
        if let Ok(reply) = reply {
            prop_assert_eq!(reply.encode(WireMode::Binary), bytes.clone());
        }
        let d = Delivered::decode(WireMode::Binary, &frame);
        prop_assert_eq!(d.is_ok(), bytes.len() >= 16);
        if let Ok(d) = d {
            prop_assert_eq!(d.op, frame_op);
            let inner = d.encode_frame(WireMode::Binary);
            prop_assert_eq!(&inner[HEADER_LEN..], &bytes[..]);
        }

        // JSON layouts: whatever decodes survives a re-encode unchanged.
        if let Ok(req) = SendRequest::decode(WireMode::Json, &bytes) {
            let again = SendRequest::decode(WireMode::Json, &req.encode(WireMode::Json)).unwrap();
            prop_assert_eq!(again, req);
        }
        if let Ok(reply) = SendReply::decode(WireMode::Json, &bytes) {
            let again = SendReply::decode(WireMode::Json, &reply.encode(WireMode::Json)).unwrap();
            prop_assert_eq!((again.ret, again.chat_id), (reply.ret, reply.chat_id));
            if let Some(error) = reply.error.as_deref().filter(|e| !e.is_empty()) {
                prop_assert_eq!(again.error.as_deref(), Some(error));
            }
        }
        if let Ok(d) = Delivered::decode(WireMode::Json, &frame) {
            let inner = json::decode_frame(d.encode_frame(WireMode::Json)).unwrap();
            prop_assert_eq!(Delivered::decode(WireMode::Json, &inner).unwrap(), d);
        }
        if let Ok(reply) = AuthReply::decode(&bytes) {
            prop_assert_eq!(AuthReply::decode(&reply.encode()).unwrap(), reply);
        }
    }
}

#[test]
fn a_huge_pack_len_is_rejected_without_allocating() {
    for pack_len in [0xFFFF_FFF0u32, u32::MAX, 16 + 1025, 1 << 31] {
        let mut buf = BytesMut::with_capacity(HEADER_LEN);
        buf.extend_from_slice(&raw_header(pack_len, 16, 1, 7, 1));
        let cap = buf.capacity();
        let err = TcpCodec::new(1024).decode(&mut buf).unwrap_err();
        match err {
            FrameError::BodyTooLarge { len, max } => {
                assert_eq!(len, pack_len as usize - HEADER_LEN);
                assert_eq!(max, 1024);
            }
            other => panic!("expected BodyTooLarge, got {other:?}"),
        }
        assert_eq!(
            buf.capacity(),
            cap,
            "nothing reserved for packLen {pack_len:#x}"
        );
    }
}

#[test]
fn a_header_announcing_max_body_reserves_at_most_one_frame() {
    let mut buf = BytesMut::from(&raw_header(16 + 1024, 16, 1, 7, 1)[..]);
    assert!(TcpCodec::new(1024).decode(&mut buf).unwrap().is_none());
    assert_eq!(buf.len(), HEADER_LEN, "the header stays buffered");
    assert!(
        buf.capacity() <= 2 * (HEADER_LEN + 1024),
        "capacity {}",
        buf.capacity()
    );
}

// ---------------------------------------------------------------------------
// 3. PROTOCOL.md §3 bad input, codec level
// ---------------------------------------------------------------------------

#[test]
fn header_len_other_than_16_is_rejected() {
    for header_len in [0u16, 1, 15, 17, 32, u16::MAX] {
        for pack_len in [16u32, 20, 100] {
            let mut bytes = raw_header(pack_len, header_len, 1, 2, 3);
            bytes.resize(pack_len as usize, 0);
            let mut buf = BytesMut::from(&bytes[..]);
            let err = TcpCodec::new(1024).decode(&mut buf).unwrap_err();
            assert!(
                matches!(err, FrameError::BadHeaderLen(h) if h == header_len),
                "headerLen {header_len}: {err:?}"
            );
            assert_eq!(err.ws_close_code(), 1002);
            let err = split_frames(Bytes::from(bytes), 1024).unwrap_err();
            assert!(matches!(err, FrameError::BadHeaderLen(h) if h == header_len));
        }
    }
}

#[test]
fn pack_len_below_16_is_rejected() {
    for pack_len in [0u32, 1, 4, 15] {
        let bytes = raw_header(pack_len, 16, 1, 2, 3);
        let mut buf = BytesMut::from(&bytes[..]);
        // More bytes behind it change nothing.
        buf.extend_from_slice(&[0u8; 40]);
        let err = TcpCodec::new(1024).decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, FrameError::PackLenTooSmall(p) if p == pack_len),
            "packLen {pack_len}: {err:?}"
        );
        assert_eq!(err.ws_close_code(), 1002);
        let err = split_frames(Bytes::from(bytes), 1024).unwrap_err();
        assert!(matches!(err, FrameError::PackLenTooSmall(p) if p == pack_len));
    }
}

#[test]
fn body_of_exactly_max_body_is_accepted_and_one_more_byte_is_not() {
    for max in [0usize, 1, 9, 1024, 64 * 1024] {
        // Exactly max_body: accepted, on a complete frame...
        let frame = Frame::new(3, 1000, 77, vec![0xA5; max]);
        let wire = codec::frame_to_bytes(&frame);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(
            TcpCodec::new(max).decode(&mut buf).unwrap(),
            Some(frame.clone())
        );
        assert!(buf.is_empty());
        assert_eq!(split_frames(wire.clone(), max).unwrap(), vec![frame]);
        // ...and on its header alone (waits for the body, if there is one).
        let mut buf = BytesMut::from(&wire[..HEADER_LEN]);
        let alone = TcpCodec::new(max).decode(&mut buf).unwrap();
        assert_eq!(alone.is_none(), max > 0);

        // max_body + 1: rejected, on a complete frame...
        let big = codec::frame_to_bytes(&Frame::new(3, 1000, 77, vec![0xA5; max + 1]));
        let mut buf = BytesMut::from(&big[..]);
        let err = TcpCodec::new(max).decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, FrameError::BodyTooLarge { len, max: m } if len == max + 1 && m == max),
            "{err:?}"
        );
        assert_eq!(err.ws_close_code(), 1002);
        let err = split_frames(big.clone(), max).unwrap_err();
        assert!(matches!(err, FrameError::BodyTooLarge { .. }));
        // ...and as soon as the 16-byte header is there.
        let mut buf = BytesMut::from(&big[..HEADER_LEN]);
        let err = TcpCodec::new(max).decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::BodyTooLarge { len, .. } if len == max + 1));
        // A byte short of the header is not enough to know.
        let mut buf = BytesMut::from(&big[..HEADER_LEN - 1]);
        assert_eq!(TcpCodec::new(max).decode(&mut buf).unwrap(), None);
    }
}

#[test]
fn default_codec_limit_is_64_kib() {
    let codec = TcpCodec::default();
    assert_eq!(codec.max_body(), 64 * 1024);
    let mut buf = BytesMut::from(&raw_header(16 + 64 * 1024 + 1, 16, 1, 2, 3)[..]);
    let mut codec = codec;
    assert!(matches!(
        codec.decode(&mut buf),
        Err(FrameError::BodyTooLarge {
            len: 65537,
            max: 65536
        })
    ));
}

#[test]
fn an_incomplete_frame_is_not_an_error_and_consumes_nothing() {
    let frame = Frame::new(1, op::SEND_TO_USER, 9, &b"0123456789abcdef"[..]);
    let wire = codec::frame_to_bytes(&frame);
    for k in 0..wire.len() {
        let mut buf = BytesMut::from(&wire[..k]);
        let mut codec = TcpCodec::new(1024);
        assert_eq!(codec.decode(&mut buf).unwrap(), None, "{k} bytes");
        assert_eq!(&buf[..], &wire[..k], "{k} bytes: nothing consumed");
        buf.extend_from_slice(&wire[k..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame.clone()));
        assert!(buf.is_empty());
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }
}

#[test]
fn the_decoder_keeps_room_for_a_real_read_while_earlier_frames_live_on() {
    // Two frames exactly fill a buffer; the decoded frames stay alive (as a
    // handler or a queued reply would keep them), so the buffer's memory
    // cannot be reclaimed. The decoder must still leave room for a proper
    // read, not the single byte `FramedRead` would otherwise reserve.
    let one = codec::frame_to_bytes(&Frame::new(1, op::SEND_TO_USER, 1, &[7u8; 40][..]));
    let mut buf = BytesMut::with_capacity(2 * one.len());
    buf.extend_from_slice(&one);
    buf.extend_from_slice(&one);
    let mut codec = TcpCodec::new(1024);
    let kept = [
        codec.decode(&mut buf).unwrap().unwrap(),
        codec.decode(&mut buf).unwrap().unwrap(),
    ];
    assert_eq!(
        buf.capacity() - buf.len(),
        0,
        "the test starts from a full buffer"
    );
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    assert!(
        buf.capacity() - buf.len() >= 256,
        "room for the next read: {}",
        buf.capacity() - buf.len()
    );
    assert_eq!(kept[1].body.len(), 40);
}

#[test]
fn a_binary_send_request_does_not_keep_the_frame_buffer_alive() {
    // The message of an op 18/20 is stored in history and inboxes: it must
    // own its bytes rather than pin the connection's read buffer.
    let body = SendRequest {
        from: 1,
        to: 2,
        msg: Bytes::from_static(b"hello"),
    }
    .encode(WireMode::Binary);
    let req = SendRequest::decode(WireMode::Binary, &body).unwrap();
    assert_eq!(&req.msg[..], b"hello");
    let range = body.as_ptr_range();
    assert!(
        !range.contains(&req.msg.as_ptr()),
        "msg points into the frame body"
    );
}

#[test]
fn a_stream_ending_inside_a_frame_is_an_error_at_eof() {
    let wire = codec::frame_to_bytes(&Frame::new(1, 2, 3, &b"body"[..]));
    let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
    let err = TcpCodec::new(1024).decode_eof(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::Io(_)), "{err:?}");
    let mut empty = BytesMut::new();
    assert_eq!(TcpCodec::new(1024).decode_eof(&mut empty).unwrap(), None);
}

#[test]
fn split_frames_rejects_a_message_ending_inside_a_frame() {
    let one = codec::frame_to_bytes(&Frame::new(1, 2, 3, &b"body"[..]));
    let mut two = BytesMut::from(&one[..]);
    two.extend_from_slice(&one);
    for cut in 1..one.len() {
        let err = split_frames(two.clone().freeze().slice(..one.len() + cut), 1024).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated(left) if left == cut),
            "cut {cut}: {err:?}"
        );
        assert_eq!(err.ws_close_code(), 1002);
    }
    assert_eq!(split_frames(Bytes::new(), 1024).unwrap(), vec![]);
    assert_eq!(split_frames(two.freeze(), 1024).unwrap().len(), 2);
}

// ---------------------------------------------------------------------------
// 4. JSON text mode (PROTOCOL.md 1.2)
// ---------------------------------------------------------------------------

fn json_err(text: &str) -> FrameError {
    match json::decode_frame(Bytes::copy_from_slice(text.as_bytes())) {
        Ok(frame) => panic!("{text} decoded to {frame:?}"),
        Err(e) => e,
    }
}

#[test]
fn json_frame_requires_ver_op_and_seq() {
    for text in [
        r#"{"op":2,"seq":1}"#,
        r#"{"ver":1,"seq":1}"#,
        r#"{"ver":1,"op":2}"#,
        r#"{"body":null}"#,
        r#"{}"#,
        r#"{"ver":null,"op":2,"seq":1}"#,
    ] {
        let err = json_err(text);
        assert!(matches!(err, FrameError::Json(_)), "{text}: {err:?}");
        assert_eq!(err.ws_close_code(), 1007, "{text}");
    }
}

#[test]
fn json_frame_fields_must_be_in_range_integers() {
    for text in [
        r#"{"ver":65536,"op":2,"seq":1}"#,
        r#"{"ver":-1,"op":2,"seq":1}"#,
        r#"{"ver":1,"op":2,"seq":-1}"#,
        r#"{"ver":1,"op":4294967296,"seq":1}"#,
        r#"{"ver":1,"op":2,"seq":4294967296}"#,
        r#"{"ver":1,"op":"2","seq":1}"#,
        r#"{"ver":"1","op":2,"seq":1}"#,
        r#"{"ver":1,"op":2.5,"seq":1}"#,
        r#"{"ver":1,"op":true,"seq":1}"#,
    ] {
        assert!(matches!(json_err(text), FrameError::Json(_)), "{text}");
    }
    let edge =
        json::decode_frame(r#"{"ver":65535,"op":4294967295,"seq":4294967295}"#.into()).unwrap();
    assert_eq!(
        (edge.ver, edge.op, edge.seq),
        (u16::MAX, u32::MAX, u32::MAX)
    );
}

#[test]
fn json_frame_must_be_one_object() {
    for text in [
        "",
        " ",
        "null",
        "[]",
        r#"[{"ver":1,"op":2,"seq":1}]"#,
        r#""{\"ver\":1,\"op\":2,\"seq\":1}""#,
        r#"{"ver":1,"op":2,"seq":1}{"ver":1,"op":2,"seq":2}"#,
        r#"{"ver":1,"op":2,"seq":1"#,
        r#"{"ver":1,"op":2,"seq":1,"body":}"#,
    ] {
        assert!(matches!(json_err(text), FrameError::Json(_)), "{text:?}");
    }
    assert!(matches!(
        json::decode_frame(Bytes::from_static(
            b"{\"ver\":1,\"op\":2,\"seq\":1,\"body\":\"\xff\"}"
        )),
        Err(FrameError::Json(_))
    ));
}

#[test]
fn json_absent_and_null_body_are_empty() {
    for text in [
        r#"{"ver":1,"op":2,"seq":5}"#,
        r#"{"ver":1,"op":2,"seq":5,"body":null}"#,
        r#" { "seq" : 5 , "body" : null , "op" : 2 , "ver" : 1 } "#,
    ] {
        let frame = json::decode_frame(text.into()).unwrap();
        assert_eq!(frame, Frame::new(1, 2, 5, ""), "{text}");
    }
}

#[test]
fn json_body_is_kept_as_its_exact_text_without_copying() {
    let cases = [
        (
            r#"{"ver":1,"op":7,"seq":1,"body":{"mid":123,"mkey":"xxoo"}}"#,
            r#"{"mid":123,"mkey":"xxoo"}"#,
        ),
        (
            r#"{"ver":1,"op":7,"seq":1,"body":{ "mid" : 1,"extra":[1, 2.50, "é\u00e9"] }}"#,
            r#"{ "mid" : 1,"extra":[1, 2.50, "é\u00e9"] }"#,
        ),
        (r#"{"body":"text","ver":1,"op":99,"seq":1}"#, r#""text""#),
        (r#"{"ver":1,"op":99,"seq":1,"body":[]}"#, "[]"),
        (r#"{"ver":1,"op":99,"seq":1,"body":0}"#, "0"),
        (r#"{"ver":1,"op":99,"seq":1,"body":{}}"#, "{}"),
        (r#"{"ver":1,"op":99,"seq":1,"body":"" }"#, r#""""#),
    ];
    for (text, body) in cases {
        let bytes = Bytes::from(text);
        let frame = json::decode_frame(bytes.clone()).unwrap();
        assert_eq!(&frame.body[..], body.as_bytes(), "{text}");
        let start = bytes.as_ptr() as usize;
        let at = frame.body.as_ptr() as usize;
        assert!(
            at >= start && at + frame.body.len() <= start + bytes.len(),
            "zero copy"
        );
    }
}

#[test]
fn json_encoding_writes_empty_body_as_null_and_others_verbatim() {
    let empty = json::frame_to_bytes(&Frame::new(1, op::HEARTBEAT_REPLY, 5, ""));
    assert_eq!(&empty[..], br#"{"ver":1,"op":3,"seq":5,"body":null}"#);
    let mut buf = BytesMut::new();
    codec::encode(
        WireMode::Json,
        &Frame::new(7, 8, 9, r#"{"ret":0,"mid":123}"#),
        &mut buf,
    );
    assert_eq!(
        &buf[..],
        br#"{"ver":7,"op":8,"seq":9,"body":{"ret":0,"mid":123}}"#
    );
    let edge = json::frame_to_bytes(&Frame::new(u16::MAX, u32::MAX, u32::MAX, "[]"));
    assert_eq!(
        &edge[..],
        br#"{"ver":65535,"op":4294967295,"seq":4294967295,"body":[]}"#
    );
    assert_eq!(
        json::decode_frame(edge).unwrap(),
        Frame::new(u16::MAX, u32::MAX, u32::MAX, "[]")
    );
}

#[test]
fn ws_close_codes() {
    assert_eq!(FrameError::Json("x".into()).ws_close_code(), 1007);
    for err in [
        FrameError::BadHeaderLen(17),
        FrameError::PackLenTooSmall(3),
        FrameError::BodyTooLarge { len: 2, max: 1 },
        FrameError::Truncated(4),
        FrameError::WrongMode("text", "binary"),
        FrameError::Io(std::io::Error::other("gone")),
    ] {
        assert_eq!(err.ws_close_code(), 1002, "{err:?}");
    }
}

#[test]
fn json_split_array_reads_frame_objects() {
    let body = Bytes::from_static(
        br#"[{"ver":1,"op":18,"seq":0,"body":{"a":1}}, {"ver":1,"op":20,"seq":0}]"#,
    );
    let frames = json::split_array(&body).unwrap();
    assert_eq!(
        frames,
        vec![Frame::new(1, 18, 0, r#"{"a":1}"#), Frame::new(1, 20, 0, "")]
    );
    assert_eq!(
        json::split_array(&Bytes::from_static(b"[]")).unwrap(),
        vec![]
    );
    for bad in [&b""[..], b"{}", b"[1]", br#"[{"ver":1}]"#, b"[", b"null"] {
        let err = json::split_array(&Bytes::from_static(bad)).unwrap_err();
        assert!(matches!(err, FrameError::Json(_)), "{bad:?}");
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn json_frames_round_trip(
        ver in any::<u16>(),
        op_code in any::<u32>(),
        seq in any::<u32>(),
        body in prop_oneof![Just(Value::Null), json_value()],
    ) {
        // The body travels as text: compare against what that text parses to
        // (serde_json's float printing is not guaranteed to round-trip).
        let text = if body.is_null() { String::new() } else { body.to_string() };
        let body: Value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
        let frame = Frame::new(ver, op_code, seq, text.clone());
        let wire = json::frame_to_bytes(&frame);
        let parsed: Value = serde_json::from_slice(&wire).unwrap();
        prop_assert_eq!(&parsed["ver"], &Value::from(ver));
        prop_assert_eq!(&parsed["op"], &Value::from(op_code));
        prop_assert_eq!(&parsed["seq"], &Value::from(seq));
        prop_assert_eq!(&parsed["body"], &body);
        prop_assert_eq!(json::decode_frame(wire).unwrap(), frame);
    }
}

// ---------------------------------------------------------------------------
// 5. msg encoding (PROTOCOL.md 2.4)
// ---------------------------------------------------------------------------

/// The `"msg"` and `"enc"` of a JSON body.
fn msg_and_enc(body: &[u8]) -> (String, Option<String>) {
    let v: Value = serde_json::from_slice(body).expect("body is JSON");
    (
        v["msg"].as_str().expect("msg is a string").to_owned(),
        v.get("enc")
            .map(|e| e.as_str().expect("enc is a string").to_owned()),
    )
}

/// PROTOCOL.md 2.4: `msg` goes base64 when its bytes are not UTF-8, or when
/// their JSON string (as serde_json writes it) would be longer than their
/// base64 string.
fn expect_base64(msg: &[u8]) -> bool {
    use base64::Engine as _;
    match std::str::from_utf8(msg) {
        Err(_) => true,
        Ok(s) => {
            serde_json::to_string(s).unwrap().len()
                > base64::engine::general_purpose::STANDARD.encode(msg).len() + 2
        }
    }
}

#[test]
fn control_characters_go_base64_when_shorter() {
    // 65,504 bytes of \x01 escape to six bytes each; base64 is 4/3.
    let msg = vec![1u8; 65_504];
    let d = delivered(op::SEND_TO_USER, 1, 1, 2, Bytes::from(msg.clone()));
    let wire = d.encode_frame(WireMode::Json);
    assert!(wire.len() < 65_504 * 4 / 3 + 512, "{} bytes", wire.len());
    let frame = json::decode_frame(wire).unwrap();
    assert_eq!(msg_and_enc(&frame.body).1.as_deref(), Some("base64"));
    assert_eq!(Delivered::decode(WireMode::Json, &frame).unwrap().msg, msg);
    // A few control characters in text stay plain.
    let plain = Bytes::from_static(b"line one\nline two\ttab");
    let d = delivered(op::SEND_TO_USER, 1, 1, 2, plain);
    let frame = json::decode_frame(d.encode_frame(WireMode::Json)).unwrap();
    assert_eq!(msg_and_enc(&frame.body).1, None);
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn send_request_round_trips_and_uses_base64_only_where_protocol_says(
        from in any::<i32>(),
        to in any::<i32>(),
        msg in msg_strategy(300),
    ) {
        let req = SendRequest { from, to, msg: Bytes::from(msg.clone()) };

        let body = req.encode(WireMode::Json);
        let (text, enc) = msg_and_enc(&body);
        match std::str::from_utf8(&msg).ok().filter(|_| !expect_base64(&msg)) {
            Some(s) => {
                prop_assert_eq!(enc, None);
                prop_assert_eq!(text, s);
            }
            None => {
                prop_assert_eq!(enc.as_deref(), Some("base64"));
                use base64::Engine as _;
                let raw = base64::engine::general_purpose::STANDARD.decode(&text).unwrap();
                prop_assert_eq!(raw, msg.clone());
            }
        }
        let v: Value = serde_json::from_slice(&body).unwrap();
        prop_assert_eq!(&v["from"], &Value::from(from));
        prop_assert_eq!(&v["to"], &Value::from(to));
        prop_assert_eq!(SendRequest::decode(WireMode::Json, &body).unwrap(), req.clone());

        let bin = req.encode(WireMode::Binary);
        prop_assert_eq!(bin.len(), 8 + msg.len());
        prop_assert_eq!(&bin[..4], &from.to_be_bytes()[..]);
        prop_assert_eq!(&bin[4..8], &to.to_be_bytes()[..]);
        prop_assert_eq!(&bin[8..], &msg[..]);
        prop_assert_eq!(SendRequest::decode(WireMode::Binary, &bin).unwrap(), req);
    }

    #[test]
    fn delivered_round_trips_in_both_modes(d in delivered_strategy(300)) {
        let bin = d.encode_frame(WireMode::Binary);
        let mut buf = BytesMut::from(&bin[..]);
        let frame = TcpCodec::new(HUGE).decode(&mut buf).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!((frame.ver, frame.op, frame.seq), (1, d.op, 0));
        prop_assert_eq!(frame.body.len(), 16 + d.msg.len());
        prop_assert_eq!(Delivered::decode(WireMode::Binary, &frame).unwrap(), d.clone());

        let txt = d.encode_frame(WireMode::Json);
        let frame = json::decode_frame(txt).unwrap();
        prop_assert_eq!((frame.ver, frame.op, frame.seq), (1, d.op, 0));
        let (text, enc) = msg_and_enc(&frame.body);
        prop_assert_eq!(enc.is_some(), expect_base64(&d.msg));
        if enc.is_none() {
            prop_assert_eq!(text.as_bytes(), &d.msg[..]);
        }
        let v: Value = serde_json::from_slice(&frame.body).unwrap();
        prop_assert_eq!(&v["chatId"], &Value::from(d.chat_id));
        prop_assert_eq!(Delivered::decode(WireMode::Json, &frame).unwrap(), d);
    }

    #[test]
    fn base64_sent_utf8_is_delivered_as_plain_text_unless_escaping_is_longer(text in "(?s).{0,80}") {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
        let body = serde_json::json!({"from": 1, "to": 2, "msg": b64, "enc": "base64"}).to_string();
        let req = SendRequest::decode(WireMode::Json, &Bytes::from(body)).unwrap();
        prop_assert_eq!(&req.msg[..], text.as_bytes());

        let d = delivered(op::SEND_TO_USER, 1, req.from, req.to, req.msg.clone());
        let frame = json::decode_frame(d.encode_frame(WireMode::Json)).unwrap();
        let (msg, enc) = msg_and_enc(&frame.body);
        let plain = !expect_base64(text.as_bytes());
        prop_assert_eq!(enc.is_none(), plain);
        if plain {
            prop_assert_eq!(msg, text.clone());
        }
        prop_assert_eq!(Delivered::decode(WireMode::Json, &frame).unwrap().msg, req.msg.clone());
        // And the client's request, re-encoded, follows the same rule.
        prop_assert_eq!(msg_and_enc(&req.encode(WireMode::Json)).1.is_none(), plain);
    }
}

#[test]
fn msg_crosses_modes_byte_for_byte() {
    let payloads: [&[u8]; 5] = [
        b"hi",
        &[0xff, 0x00],
        "h\u{e9}llo \u{1F600}".as_bytes(),
        b"\0\"\\\n",
        b"",
    ];
    for msg in payloads {
        // A binary client sends; a JSON client receives, and vice versa.
        let bin_req = SendRequest {
            from: 1,
            to: 2,
            msg: Bytes::copy_from_slice(msg),
        };
        let got = SendRequest::decode(WireMode::Binary, &bin_req.encode(WireMode::Binary)).unwrap();
        let d = delivered(op::SEND_TO_GROUP, 5, got.from, got.to, got.msg);
        let inner = json::decode_frame(d.encode_frame(WireMode::Json)).unwrap();
        assert_eq!(
            &Delivered::decode(WireMode::Json, &inner).unwrap().msg[..],
            msg
        );

        let json_req =
            SendRequest::decode(WireMode::Json, &bin_req.encode(WireMode::Json)).unwrap();
        let d = delivered(
            op::SEND_TO_USER,
            5,
            json_req.from,
            json_req.to,
            json_req.msg,
        );
        let bin = d.encode_frame(WireMode::Binary);
        let inner = split_frames(bin, HUGE).unwrap();
        assert_eq!(
            &Delivered::decode(WireMode::Binary, &inner[0]).unwrap().msg[..],
            msg
        );
    }
}

#[test]
fn non_utf8_msg_is_standard_padded_base64() {
    let d = delivered(op::SEND_TO_USER, 1, 1, 2, &[0xfb, 0xff, 0xbf, 0x80][..]);
    let frame = json::decode_frame(d.encode_frame(WireMode::Json)).unwrap();
    let (msg, enc) = msg_and_enc(&frame.body);
    assert_eq!(msg, "+/+/gA==");
    assert_eq!(enc.as_deref(), Some("base64"));
}

#[test]
fn send_request_json_errors() {
    for body in [
        r#"{"from":1,"to":2,"msg":"hi","enc":"hex"}"#,
        r#"{"from":1,"to":2,"msg":"hi","enc":"BASE64"}"#,
        r#"{"from":1,"to":2,"msg":"hi","enc":""}"#,
        r#"{"from":1,"to":2,"msg":"hi","enc":7}"#,
        r#"{"from":1,"to":2,"msg":"not base64!","enc":"base64"}"#,
        r#"{"from":1,"to":2,"msg":"aGk","enc":"base64"}"#,
        r#"{"from":1,"to":2}"#,
        r#"{"from":1,"msg":"hi"}"#,
        r#"{"to":2,"msg":"hi"}"#,
        r#"{"from":"1","to":2,"msg":"hi"}"#,
        r#"{"from":2147483648,"to":2,"msg":"hi"}"#,
        r#"{"from":1,"to":2,"msg":[104,105]}"#,
        r#"{"from":1,"to":2,"msg":null}"#,
        r#""hi""#,
        "",
    ] {
        assert!(
            SendRequest::decode(WireMode::Json, &Bytes::from(body)).is_err(),
            "{body}"
        );
    }
    // Unknown enc is an error for delivered messages too.
    let frame = Frame::new(
        1,
        18,
        0,
        r#"{"chatId":1,"from":1,"to":2,"msg":"hi","enc":"gzip"}"#,
    );
    assert!(Delivered::decode(WireMode::Json, &frame).is_err());
    // The accepted forms.
    let ok = |body: &'static str| SendRequest::decode(WireMode::Json, &Bytes::from(body)).unwrap();
    assert_eq!(
        &ok(r#"{"from":1,"to":2,"msg":"aGk=","enc":"base64"}"#).msg[..],
        b"hi"
    );
    assert_eq!(
        &ok(r#"{"from":1,"to":2,"msg":"aGk=","enc":null}"#).msg[..],
        b"aGk="
    );
    assert_eq!(
        &ok(r#"{"msg":"\u00ff","to":-2,"from":-1,"x":{}}"#).msg[..],
        "\u{ff}".as_bytes()
    );
    assert_eq!(
        ok(r#"{"from":-2147483648,"to":2147483647,"msg":""}"#).from,
        i32::MIN
    );
}

#[test]
fn binary_send_request_needs_from_and_to() {
    for len in 0..8 {
        let body = Bytes::from(vec![1u8; len]);
        assert!(
            SendRequest::decode(WireMode::Binary, &body).is_err(),
            "{len} bytes"
        );
    }
    let req = SendRequest::decode(
        WireMode::Binary,
        &Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2]),
    )
    .unwrap();
    assert_eq!(
        req,
        SendRequest {
            from: -1,
            to: 2,
            msg: Bytes::new()
        }
    );
}

#[test]
fn binary_delivered_and_reply_lengths() {
    for len in 0..16 {
        let frame = Frame::new(1, 18, 0, vec![0u8; len]);
        assert!(
            Delivered::decode(WireMode::Binary, &frame).is_err(),
            "{len} bytes"
        );
    }
    for len in [0usize, 8, 10, 20] {
        assert!(
            SendReply::decode(WireMode::Binary, &vec![0u8; len]).is_err(),
            "{len} bytes"
        );
    }
    let failed = SendReply::failed("nope");
    assert_eq!(
        &failed.encode(WireMode::Binary)[..],
        &[0xff, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let ok = SendReply::decode(
        WireMode::Binary,
        &SendReply::ok(-5).encode(WireMode::Binary),
    )
    .unwrap();
    assert_eq!(ok, SendReply::ok(-5));
}

#[test]
fn json_send_reply_failure_always_has_a_reason() {
    let body = SendReply::failed("").encode(WireMode::Json);
    let reply = SendReply::decode(WireMode::Json, &body).unwrap();
    assert_eq!((reply.ret, reply.chat_id), (-1, 0));
    assert!(!reply.error.unwrap().is_empty());
    let body = SendReply::failed("why \"quoted\"").encode(WireMode::Json);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"ret": -1, "chatId": 0, "error": "why \"quoted\""})
    );
}

#[test]
fn auth_reply_round_trips_and_rejects_bad_bodies() {
    for reply in [
        AuthReply::Ok { mid: i32::MIN },
        AuthReply::Ok { mid: 123 },
        AuthReply::Failed {
            error: "bad \"key\"\n".into(),
        },
    ] {
        assert_eq!(AuthReply::decode(&reply.encode()).unwrap(), reply);
    }
    for bad in [
        &b""[..],
        b"{}",
        br#"{"ret":0}"#,
        br#"{"ret":"0","mid":1}"#,
        b"[0]",
    ] {
        assert!(AuthReply::decode(bad).is_err(), "{bad:?}");
    }
}

// ---------------------------------------------------------------------------
// 6. op 9 batches (PROTOCOL.md 2.6)
// ---------------------------------------------------------------------------

/// One op 9 unit as taken from a writer: the op 9 frame (text mode: the
/// decoded object) and its inner frames.
fn open_batch(mode: WireMode, unit: Bytes) -> (Frame, Vec<Frame>) {
    let op9 = match mode {
        WireMode::Binary => {
            let mut buf = BytesMut::from(&unit[..]);
            let frame = TcpCodec::new(HUGE)
                .decode(&mut buf)
                .unwrap()
                .expect("a whole frame");
            assert!(buf.is_empty(), "one op 9 per unit");
            frame
        }
        WireMode::Json => json::decode_frame(unit).unwrap(),
    };
    assert_eq!((op9.ver, op9.op, op9.seq), (1, op::BATCH, 0));
    let inner = read_batch(mode, &op9.body, HUGE).unwrap();
    (op9, inner)
}

fn check_batches(mode: WireMode, max_body: usize, msgs: &[Delivered]) -> Result<(), TestCaseError> {
    let mut writer = BatchWriter::new(mode, max_body);
    prop_assert!(writer.take().is_none());
    // (unit, length of the inner frame the open batch refused, if any)
    let mut units: Vec<(Bytes, Option<usize>)> = Vec::new();
    for d in msgs {
        let inner = d.encode_frame(mode);
        if !writer.push(&inner) {
            prop_assert!(!writer.is_empty(), "a frame alone is always accepted");
            let count = writer.len();
            units.push((writer.take().unwrap(), Some(inner.len())));
            prop_assert!(writer.is_empty());
            prop_assert!(writer.push(&inner));
            prop_assert!(count > 0);
        }
        prop_assert!(!writer.is_empty());
    }
    units.extend(writer.take().map(|u| (u, None)));
    prop_assert!(writer.take().is_none());

    let mut got = Vec::new();
    for (unit, refused) in units {
        let (op9, inner) = open_batch(mode, unit);
        prop_assert!(!inner.is_empty(), "no empty op 9");
        if op9.body.len() > max_body {
            prop_assert_eq!(
                inner.len(),
                1,
                "only a lone oversized message may exceed max_body"
            );
        }
        if let Some(refused) = refused {
            // The refusal was needed: the refused frame would not have fit.
            let extra = match mode {
                WireMode::Binary => refused,
                WireMode::Json => refused + 1, // its comma
            };
            prop_assert!(op9.body.len() + extra > max_body);
        }
        for frame in &inner {
            prop_assert_eq!((frame.ver, frame.seq), (1, 0));
            prop_assert!(frame.op == op::SEND_TO_USER || frame.op == op::SEND_TO_GROUP);
            got.push(Delivered::decode(mode, frame).unwrap());
        }
    }
    prop_assert_eq!(&got[..], msgs);
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn batches_respect_max_body_and_keep_order(msgs in vec(delivered_strategy(260), 1..60)) {
        check_batches(WireMode::Binary, 200, &msgs)?;
        check_batches(WireMode::Json, 200, &msgs)?;
    }

    #[test]
    fn batches_of_tiny_messages_pack_many_per_op9(
        msgs in vec(delivered_strategy(4), 10..80),
    ) {
        check_batches(WireMode::Binary, 200, &msgs)?;
        check_batches(WireMode::Json, 200, &msgs)?;
    }
}

#[test]
fn a_message_exactly_filling_max_body_fits_one_batch() {
    // Binary: inner frame = 32 + msg bytes.
    let d = delivered(op::SEND_TO_USER, 1, 1, 2, vec![b'x'; 200 - 32]);
    let mut writer = BatchWriter::new(WireMode::Binary, 200);
    assert!(writer.push(&d.encode_frame(WireMode::Binary)));
    let (op9, _) = open_batch(WireMode::Binary, writer.take().unwrap());
    assert_eq!(op9.body.len(), 200);
    // An extra empty-ish message no longer fits.
    let mut writer = BatchWriter::new(WireMode::Binary, 200);
    assert!(writer.push(&d.encode_frame(WireMode::Binary)));
    assert!(!writer.push(&delivered(op::SEND_TO_USER, 2, 1, 2, "").encode_frame(WireMode::Binary)));
    assert_eq!(writer.len(), 1);

    // JSON: the body is `[` + inner + `]`.
    let probe = delivered(op::SEND_TO_USER, 1, 1, 2, "")
        .encode_frame(WireMode::Json)
        .len();
    let d = delivered(op::SEND_TO_USER, 1, 1, 2, vec![b'x'; 200 - 2 - probe]);
    let inner = d.encode_frame(WireMode::Json);
    assert_eq!(inner.len() + 2, 200);
    let mut writer = BatchWriter::new(WireMode::Json, 200);
    assert!(writer.push(&inner));
    let (op9, frames) = open_batch(WireMode::Json, writer.take().unwrap());
    assert_eq!(op9.body.len(), 200);
    assert_eq!(Delivered::decode(WireMode::Json, &frames[0]).unwrap(), d);
}

#[test]
fn take_on_an_empty_writer_is_none() {
    for mode in [WireMode::Binary, WireMode::Json] {
        let mut writer = BatchWriter::new(mode, 1024);
        assert!(writer.is_empty());
        assert_eq!(writer.len(), 0);
        assert!(writer.take().is_none());
        writer.finish();
        assert!(
            writer.take().is_none(),
            "finish on an empty writer writes nothing"
        );
        assert!(writer.push(&delivered(18, 1, 1, 2, "a").encode_frame(mode)));
        assert_eq!(writer.len(), 1);
        assert!(writer.take().is_some());
        assert!(writer.is_empty());
        assert!(writer.take().is_none(), "take empties the writer");
    }
}

#[test]
fn push_frame_keeps_wire_order_in_binary_mode() {
    let mode = WireMode::Binary;
    let m: Vec<Delivered> = (1..=4)
        .map(|i| delivered(18, i, 1, 2, format!("m{i}")))
        .collect();
    let reply = |seq| {
        Frame::new(
            1,
            op::SEND_TO_USER_REPLY,
            seq,
            SendReply::ok(seq as i64).encode(mode),
        )
    };
    let mut writer = BatchWriter::new(mode, 1024);
    writer.push_frame(&reply(10)); // nothing open: no empty op 9 before it
    assert!(writer.push(&m[0].encode_frame(mode)));
    assert!(writer.push(&m[1].encode_frame(mode)));
    writer.push_frame(&reply(11));
    assert!(writer.is_empty(), "push_frame closes the open batch");
    assert!(writer.push(&m[2].encode_frame(mode)));
    writer.push_frame(&reply(12));
    writer.push_frame(&reply(13));
    assert!(writer.push(&m[3].encode_frame(mode)));
    let wire = writer.take().unwrap();
    assert!(writer.take().is_none());

    let frames = split_frames(wire, 1024).unwrap();
    let shape: Vec<(u32, u32)> = frames.iter().map(|f| (f.op, f.seq)).collect();
    assert_eq!(
        shape,
        [
            (19, 10),
            (9, 0),
            (19, 11),
            (9, 0),
            (19, 12),
            (19, 13),
            (9, 0)
        ]
    );
    let batch = |i: usize| -> Vec<Delivered> {
        read_batch(mode, &frames[i].body, 1024)
            .unwrap()
            .iter()
            .map(|f| Delivered::decode(mode, f).unwrap())
            .collect()
    };
    assert_eq!(batch(1), m[..2]);
    assert_eq!(batch(3), m[2..3]);
    assert_eq!(batch(6), m[3..]);
    assert_eq!(frames[2], reply(11));
}

#[test]
fn push_frame_keeps_wire_order_in_json_mode() {
    let mode = WireMode::Json;
    let m: Vec<Delivered> = (1..=3)
        .map(|i| delivered(20, i, 1, 100, format!("m{i}")))
        .collect();
    let reply = |seq| {
        Frame::new(
            1,
            op::SEND_TO_GROUP_REPLY,
            seq,
            SendReply::ok(seq as i64).encode(mode),
        )
    };

    // Taken after every frame, as a text-mode connection must: one object each.
    let mut writer = BatchWriter::new(mode, 1024);
    let mut units = Vec::new();
    assert!(writer.push(&m[0].encode_frame(mode)));
    assert!(writer.push(&m[1].encode_frame(mode)));
    units.extend(writer.take());
    writer.push_frame(&reply(5));
    units.extend(writer.take());
    assert!(writer.push(&m[2].encode_frame(mode)));
    units.extend(writer.take());
    let frames: Vec<Frame> = units
        .into_iter()
        .map(|u| json::decode_frame(u).unwrap())
        .collect();
    let shape: Vec<(u32, u32)> = frames.iter().map(|f| (f.op, f.seq)).collect();
    assert_eq!(shape, [(9, 0), (21, 5), (9, 0)]);
    assert_eq!(frames[1], reply(5));

    // Without a take in between, the objects still come out in call order.
    let mut writer = BatchWriter::new(mode, 1024);
    assert!(writer.push(&m[0].encode_frame(mode)));
    writer.push_frame(&reply(6));
    assert!(writer.push(&m[1].encode_frame(mode)));
    assert!(writer.push(&m[2].encode_frame(mode)));
    let wire = writer.take().unwrap();
    let objects: Vec<&RawValue> = serde_json::Deserializer::from_slice(&wire)
        .into_iter::<&RawValue>()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(objects.len(), 3);
    let frames: Vec<Frame> = objects
        .iter()
        .map(|o| json::decode_frame(Bytes::copy_from_slice(o.get().as_bytes())).unwrap())
        .collect();
    let shape: Vec<(u32, u32)> = frames.iter().map(|f| (f.op, f.seq)).collect();
    assert_eq!(shape, [(9, 0), (21, 6), (9, 0)]);
    let second: Vec<Delivered> = read_batch(mode, &frames[2].body, 1024)
        .unwrap()
        .iter()
        .map(|f| Delivered::decode(mode, f).unwrap())
        .collect();
    assert_eq!(second, m[1..]);
}
