//! Micro-benchmarks of comet-core's hot paths: the binary and JSON codecs,
//! the typed payloads, op 9 batch assembly and the per-mode wire cache of
//! [`Message`].
//!
//! Run with `cargo bench -p comet-core --bench micro`.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use comet_core::codec::{json, BatchWriter, TcpCodec};
use comet_core::frame::{op, Frame, WireMode, DEFAULT_MAX_BODY};
use comet_core::payload::{Delivered, SendRequest};
use comet_core::Message;
use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, Criterion, Throughput};
use tokio_util::codec::{Decoder, Encoder};

/// The JSON send request of the protocol's examples.
const SEND_JSON: &str = r#"{"ver":1,"op":18,"seq":7,"body":{"from":1,"to":2,"msg":"hello world"}}"#;

fn short<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    group
}

fn encoded(frame: &Frame) -> Bytes {
    let mut buf = BytesMut::new();
    TcpCodec::default()
        .encode(frame, &mut buf)
        .expect("encoding cannot fail");
    buf.freeze()
}

/// 100 bytes of valid UTF-8 with multi-byte characters.
fn utf8_msg() -> Bytes {
    let text = "héllo wörld — ".repeat(10);
    let mut end = 100;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut msg = text[..end].to_owned();
    while msg.len() < 100 {
        msg.push('.');
    }
    assert_eq!(msg.len(), 100);
    Bytes::from(msg)
}

/// 100 bytes that are not UTF-8 (the base64 path in JSON).
fn binary_msg() -> Bytes {
    let msg: Vec<u8> = (0..100u32).map(|i| (i * 37 + 0x80) as u8).collect();
    assert!(std::str::from_utf8(&msg).is_err());
    Bytes::from(msg)
}

fn codec(c: &mut Criterion) {
    let mut g = short(c, "codec");
    let mut codec = TcpCodec::new(DEFAULT_MAX_BODY);

    let heartbeat = Frame::new(1, op::HEARTBEAT, 5, "");
    let small = encoded(&heartbeat);
    assert_eq!(small.len(), 16);
    let large_frame = Frame::new(1, op::SEND_TO_USER, 9, vec![0x5a; 60 * 1024]);
    let large = encoded(&large_frame);

    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("tcp_decode/heartbeat_16B", |b| {
        b.iter_batched(
            || BytesMut::from(&small[..]),
            |mut buf| codec.decode(&mut buf).expect("valid").expect("whole"),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("tcp_encode/heartbeat_16B", |b| {
        let mut buf = BytesMut::with_capacity(64);
        b.iter(|| {
            buf.clear();
            codec
                .encode(black_box(&heartbeat), &mut buf)
                .expect("encode");
            black_box(buf.len())
        })
    });

    g.throughput(Throughput::Bytes(large.len() as u64));
    g.bench_function("tcp_decode/60KiB", |b| {
        b.iter_batched(
            || BytesMut::from(&large[..]),
            |mut buf| codec.decode(&mut buf).expect("valid").expect("whole"),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("tcp_encode/60KiB", |b| {
        let mut buf = BytesMut::with_capacity(large.len());
        b.iter(|| {
            buf.clear();
            codec
                .encode(black_box(&large_frame), &mut buf)
                .expect("encode");
            black_box(buf.len())
        })
    });

    let hundred: Vec<u8> = small
        .iter()
        .copied()
        .cycle()
        .take(100 * small.len())
        .collect();
    g.throughput(Throughput::Elements(100));
    g.bench_function("tcp_decode/100_heartbeats", |b| {
        b.iter_batched(
            || BytesMut::from(&hundred[..]),
            |mut buf| {
                let mut n = 0;
                while let Some(frame) = codec.decode(&mut buf).expect("valid") {
                    black_box(frame);
                    n += 1;
                }
                assert_eq!(n, 100);
            },
            BatchSize::SmallInput,
        )
    });

    let text = Bytes::from_static(SEND_JSON.as_bytes());
    let send_frame = json::decode_frame(text.clone()).expect("valid JSON frame");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("json_decode_frame/send", |b| {
        b.iter(|| json::decode_frame(black_box(text.clone())).expect("valid"))
    });
    g.bench_function("json_encode_frame/send", |b| {
        let mut buf = BytesMut::with_capacity(128);
        b.iter(|| {
            buf.clear();
            json::encode_frame(black_box(&send_frame), &mut buf);
            black_box(buf.len())
        })
    });
    g.finish();
}

fn payloads(c: &mut Criterion) {
    let mut g = short(c, "payload");
    let req = SendRequest {
        from: 1,
        to: 2,
        msg: Bytes::from_static(b"hello world"),
    };
    for mode in [WireMode::Binary, WireMode::Json] {
        let body = req.encode(mode);
        assert_eq!(SendRequest::decode(mode, &body).expect("valid"), req);
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("send_request_decode/{mode:?}"), |b| {
            b.iter(|| SendRequest::decode(mode, black_box(&body)).expect("valid"))
        });
    }

    for (kind, msg) in [("utf8_100B", utf8_msg()), ("nonutf8_100B", binary_msg())] {
        let delivered = Delivered {
            op: op::SEND_TO_USER,
            chat_id: 123_456,
            from: 1,
            to: 2,
            msg,
        };
        for mode in [WireMode::Binary, WireMode::Json] {
            let len = delivered.encode_frame(mode).len();
            g.throughput(Throughput::Bytes(len as u64));
            g.bench_function(format!("delivered_encode_frame/{mode:?}/{kind}"), |b| {
                b.iter(|| black_box(&delivered).encode_frame(mode))
            });
        }
    }
    g.finish();
}

fn batch(c: &mut Criterion) {
    let mut g = short(c, "batch");
    // msg of 32 bytes: a 64-byte inner frame in binary mode.
    let delivered = Delivered {
        op: op::SEND_TO_GROUP,
        chat_id: 1,
        from: 1,
        to: 2,
        msg: Bytes::from_static(b"0123456789abcdef0123456789abcdef"),
    };
    for mode in [WireMode::Binary, WireMode::Json] {
        let inner = delivered.encode_frame(mode);
        if mode == WireMode::Binary {
            assert_eq!(inner.len(), 64);
        }
        let mut writer = BatchWriter::new(mode, DEFAULT_MAX_BODY);
        g.throughput(Throughput::Elements(64));
        g.bench_function(format!("op9_64x{}B/{mode:?}", inner.len()), |b| {
            b.iter(|| {
                for _ in 0..64 {
                    assert!(writer.push(black_box(&inner)));
                }
                writer.take().expect("one batch")
            })
        });
    }

    let delivered = Delivered {
        msg: utf8_msg(),
        ..delivered
    };
    for mode in [WireMode::Binary, WireMode::Json] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("message_wire/fresh/{mode:?}"), |b| {
            b.iter(|| {
                let msg = Message::new(black_box(&delivered).clone());
                msg.wire(mode).len()
            })
        });
        let cached = Message::new(delivered.clone());
        cached.wire(mode);
        g.bench_function(format!("message_wire/cached/{mode:?}"), |b| {
            b.iter(|| black_box(&cached).wire(mode).len())
        });
    }
    g.finish();
}

// What `criterion_group!` and `criterion_main!` expand to, written out so
// that no undocumented `pub fn` trips the workspace's `missing_docs` lint.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    codec(&mut c);
    payloads(&mut c);
    batch(&mut c);
    c.final_summary();
}
