//! PROTOCOL.md's byte-exact vectors (`vectors.json`) as tests: every vector
//! decodes in both modes to the same frame and payload, and every frame the
//! server or a client writes encodes back to exactly those bytes (JSON: the
//! same values; key order and whitespace are free).

use bytes::{Bytes, BytesMut};
use comet_core::codec::{self, json, read_batch, BatchWriter, TcpCodec};
use comet_core::frame::{op, Frame, WireMode};
use comet_core::payload::{AuthReply, Delivered, SendReply, SendRequest, SyncReply, SyncRequest};
use serde_json::Value;
use tokio_util::codec::Decoder;

struct Vector {
    name: String,
    tcp: Vec<u8>,
    json: String,
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn vectors() -> Vec<Vector> {
    let text = include_str!("vectors.json");
    let doc: Value = serde_json::from_str(text).expect("vectors.json parses");
    doc["vectors"]
        .as_array()
        .expect("vectors array")
        .iter()
        .map(|v| Vector {
            name: v["name"].as_str().unwrap().to_owned(),
            tcp: hex(v["tcp_hex"].as_str().unwrap()),
            json: v["json_text"].as_str().unwrap().to_owned(),
        })
        .collect()
}

fn vector(name: &str) -> Vector {
    vectors().into_iter().find(|v| v.name == name).unwrap()
}

fn decode_tcp(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = TcpCodec::default().decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty(), "one vector is exactly one frame");
    frame
}

/// Equal JSON values, where an absent `body` equals `"body": null`
/// (PROTOCOL.md 1.2).
fn json_eq(a: &[u8], b: &[u8]) {
    fn norm(bytes: &[u8]) -> Value {
        let mut v: Value = serde_json::from_slice(bytes).unwrap();
        if let Some(obj) = v.as_object_mut() {
            obj.entry("body").or_insert(Value::Null);
        }
        v
    }
    assert_eq!(norm(a), norm(b));
}

#[test]
fn copy_matches_the_shared_protocol_vectors() {
    // The normative file lives outside the repository; when it is there, the
    // copy the tests embed must not have drifted from it.
    let shared = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/protocol/vectors.json"
    );
    if let Ok(original) = std::fs::read_to_string(shared) {
        assert_eq!(original, include_str!("vectors.json"));
    }
    assert_eq!(vectors().len(), 13);
}

#[test]
fn every_vector_decodes_to_the_same_frame_in_both_modes_and_reencodes_exactly() {
    for v in vectors() {
        let bin = decode_tcp(&v.tcp);
        let txt = json::decode_frame(Bytes::from(v.json.clone())).unwrap();
        assert_eq!(
            (bin.ver, bin.op, bin.seq),
            (txt.ver, txt.op, txt.seq),
            "{}",
            v.name
        );
        assert_eq!(codec::frame_to_bytes(&bin).to_vec(), v.tcp, "{}", v.name);
        json_eq(&json::frame_to_bytes(&txt), v.json.as_bytes());
    }
}

#[test]
fn auth_vectors() {
    let req = vector("auth_request");
    let frame = decode_tcp(&req.tcp);
    let parsed = comet_core::AuthRequest::parse(&frame.body).unwrap();
    assert_eq!((parsed.mid(), parsed.mkey()), (Some(123), Some("xxoo")));
    let txt = json::decode_frame(req.json.into()).unwrap();
    let parsed = comet_core::AuthRequest::parse(&txt.body).unwrap();
    assert_eq!((parsed.mid(), parsed.mkey()), (Some(123), Some("xxoo")));

    let ok = vector("auth_reply_ok");
    let reply = frame.reply(op::AUTH_REPLY, AuthReply::Ok { mid: 123 }.encode());
    assert_eq!(codec::to_bytes(WireMode::Binary, &reply).to_vec(), ok.tcp);
    json_eq(&codec::to_bytes(WireMode::Json, &reply), ok.json.as_bytes());
    assert_eq!(
        AuthReply::decode(&reply.body).unwrap(),
        AuthReply::Ok { mid: 123 }
    );
}

#[test]
fn heartbeat_vectors() {
    let hb = decode_tcp(&vector("heartbeat").tcp);
    let reply = hb.reply(op::HEARTBEAT_REPLY, "");
    let expected = vector("heartbeat_reply");
    assert_eq!(
        codec::to_bytes(WireMode::Binary, &reply).to_vec(),
        expected.tcp
    );
    assert_eq!(
        codec::to_bytes(WireMode::Json, &reply),
        expected.json.as_bytes()
    );
}

#[test]
fn send_vectors() {
    for (name, to, msg) in [("send_to_user", 2, "hi"), ("send_to_group", 100, "yo")] {
        let v = vector(name);
        let want = SendRequest {
            from: 1,
            to,
            msg: Bytes::from(msg),
        };
        let bin = decode_tcp(&v.tcp);
        assert_eq!(
            SendRequest::decode(WireMode::Binary, &bin.body).unwrap(),
            want
        );
        let txt = json::decode_frame(v.json.clone().into()).unwrap();
        assert_eq!(
            SendRequest::decode(WireMode::Json, &txt.body).unwrap(),
            want
        );
        // A client encoding the request produces the vector's bytes.
        let frame = Frame::new(1, bin.op, bin.seq, want.encode(WireMode::Binary));
        assert_eq!(codec::frame_to_bytes(&frame).to_vec(), v.tcp);
        let frame = Frame::new(1, bin.op, bin.seq, want.encode(WireMode::Json));
        json_eq(&json::frame_to_bytes(&frame), v.json.as_bytes());
    }
}

#[test]
fn send_reply_vectors() {
    let ok = vector("send_to_user_reply");
    let req = Frame::new(1, op::SEND_TO_USER, 7, "");
    for mode in [WireMode::Binary, WireMode::Json] {
        let reply = req.reply(op::SEND_TO_USER_REPLY, SendReply::ok(1).encode(mode));
        match mode {
            WireMode::Binary => assert_eq!(codec::to_bytes(mode, &reply).to_vec(), ok.tcp),
            WireMode::Json => json_eq(&codec::to_bytes(mode, &reply), ok.json.as_bytes()),
        }
        assert_eq!(SendReply::decode(mode, &reply.body).unwrap().chat_id, 1);
    }
    let failed = vector("send_to_user_failed");
    let req = Frame::new(1, op::SEND_TO_USER, 8, "");
    let reason = "from does not match the authenticated mid";
    let bin = req.reply(
        op::SEND_TO_USER_REPLY,
        SendReply::failed(reason).encode(WireMode::Binary),
    );
    assert_eq!(codec::frame_to_bytes(&bin).to_vec(), failed.tcp);
    let txt = req.reply(
        op::SEND_TO_USER_REPLY,
        SendReply::failed(reason).encode(WireMode::Json),
    );
    json_eq(&json::frame_to_bytes(&txt), failed.json.as_bytes());
    assert_eq!(comet_core::SendError::Spoofed.to_string(), reason);
}

#[test]
fn batch_vector() {
    let v = vector("batch");
    let items = [
        Delivered {
            op: op::SEND_TO_USER,
            chat_id: 1,
            from: 1,
            to: 2,
            msg: Bytes::from_static(b"hi"),
        },
        Delivered {
            op: op::SEND_TO_GROUP,
            chat_id: 4,
            from: 1,
            to: 100,
            msg: Bytes::from_static(&[0xff, 0x00]),
        },
    ];
    for mode in [WireMode::Binary, WireMode::Json] {
        let mut batch = BatchWriter::new(mode, 64 * 1024);
        for item in &items {
            assert!(batch.push(&item.encode_frame(mode)));
        }
        let wire = batch.take().unwrap();
        let frame = match mode {
            WireMode::Binary => {
                assert_eq!(wire.to_vec(), v.tcp);
                decode_tcp(&wire)
            }
            WireMode::Json => {
                json_eq(&wire, v.json.as_bytes());
                json::decode_frame(wire).unwrap()
            }
        };
        assert_eq!((frame.ver, frame.op, frame.seq), (1, op::BATCH, 0));
        let inner = read_batch(mode, &frame.body, 64 * 1024).unwrap();
        let decoded: Vec<Delivered> = inner
            .iter()
            .map(|f| Delivered::decode(mode, f).unwrap())
            .collect();
        assert_eq!(decoded, items);
    }
}

#[test]
fn sync_request_vectors() {
    for (name, want) in [
        (
            "sync_request_direct",
            SyncRequest {
                kind: 18,
                to: 2,
                after: 41,
                limit: Some(100),
            },
        ),
        (
            "sync_request_group",
            SyncRequest {
                kind: 20,
                to: 100,
                after: 0,
                limit: Some(0),
            },
        ),
    ] {
        let v = vector(name);
        let bin = decode_tcp(&v.tcp);
        assert_eq!((bin.op, bin.body.len()), (op::SYNC, 17), "{name}");
        assert_eq!(
            SyncRequest::decode(WireMode::Binary, &bin.body).unwrap(),
            want
        );
        let txt = json::decode_frame(v.json.clone().into()).unwrap();
        assert_eq!(
            SyncRequest::decode(WireMode::Json, &txt.body).unwrap(),
            want
        );
        // A client encoding the request produces the vector's bytes.
        let frame = Frame::new(1, op::SYNC, bin.seq, want.encode(WireMode::Binary));
        assert_eq!(codec::frame_to_bytes(&frame).to_vec(), v.tcp, "{name}");
        let frame = Frame::new(1, op::SYNC, bin.seq, want.encode(WireMode::Json));
        json_eq(&json::frame_to_bytes(&frame), v.json.as_bytes());
    }
}

#[test]
fn sync_reply_vectors() {
    let ok = vector("sync_reply_ok");
    let req = Frame::new(1, op::SYNC, 5, "");
    for mode in [WireMode::Binary, WireMode::Json] {
        let reply = req.reply(op::SYNC_REPLY, SyncReply::ok(12, 57).encode(mode));
        match mode {
            WireMode::Binary => assert_eq!(codec::to_bytes(mode, &reply).to_vec(), ok.tcp),
            WireMode::Json => json_eq(&codec::to_bytes(mode, &reply), ok.json.as_bytes()),
        }
        assert_eq!(
            SyncReply::decode(mode, &reply.body).unwrap(),
            SyncReply::ok(12, 57)
        );
    }
    let failed = vector("sync_reply_failed");
    let req = Frame::new(1, op::SYNC, 6, "");
    let reason = comet_core::SyncError::NotMember(100).to_string();
    let bin = req.reply(
        op::SYNC_REPLY,
        SyncReply::failed(&reason).encode(WireMode::Binary),
    );
    assert_eq!(codec::frame_to_bytes(&bin).to_vec(), failed.tcp);
    let txt = req.reply(
        op::SYNC_REPLY,
        SyncReply::failed(&reason).encode(WireMode::Json),
    );
    json_eq(&json::frame_to_bytes(&txt), failed.json.as_bytes());
    let back = SyncReply::decode(WireMode::Json, &txt.body).unwrap();
    assert_eq!((back.ret, back.oldest, back.head), (-1, 0, 0));
}

#[test]
fn sync_request_rules() {
    let bad = |mode, body: &str| SyncRequest::decode(mode, body.as_bytes()).is_err();
    let json = WireMode::Json;
    // Absent after = 0, absent limit = the server's cap (None).
    assert_eq!(
        SyncRequest::decode(json, br#"{"kind":20,"to":7}"#).unwrap(),
        SyncRequest {
            kind: 20,
            to: 7,
            after: 0,
            limit: None
        }
    );
    for body in [
        r#"{"kind":19,"to":2}"#,
        r#"{"kind":18,"to":0}"#,
        r#"{"kind":18,"to":2,"after":-1}"#,
        r#"{"kind":18,"to":2,"limit":-1}"#,
        r#"{"to":2}"#,
        r#"{"kind":"18","to":2}"#,
        r#"[18,2]"#,
        "",
    ] {
        assert!(bad(json, body), "{body}");
    }
    let bin = |kind: i8, to: i32, after: i64, limit: i32| {
        let mut b = vec![kind as u8];
        b.extend_from_slice(&to.to_be_bytes());
        b.extend_from_slice(&after.to_be_bytes());
        b.extend_from_slice(&limit.to_be_bytes());
        b
    };
    let binary = WireMode::Binary;
    assert!(SyncRequest::decode(binary, &bin(18, 2, 0, 5)).is_ok());
    for body in [
        bin(21, 2, 0, 5),
        bin(18, 0, 0, 5),
        bin(18, 2, -1, 5),
        bin(18, 2, 0, -1),
        bin(18, 2, 0, 5)[..16].to_vec(),
        [bin(18, 2, 0, 5), vec![0]].concat(),
    ] {
        assert!(SyncRequest::decode(binary, &body).is_err(), "{body:?}");
    }
}
