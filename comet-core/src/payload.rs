//! Typed bodies of ops 7/8, 18–21 and 22/23 in both wire modes (PROTOCOL.md
//! 2.2–2.4, 2.7).
//!
//! Binary bodies are big-endian with no padding; JSON bodies are objects. In
//! JSON, `msg` is a string holding the bytes as UTF-8, or — for bytes that are
//! not valid UTF-8 — their standard padded base64 with `"enc": "base64"`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Deserialize;

use crate::codec;
use crate::error::PayloadError;
use crate::frame::{Frame, WireMode, HEADER_LEN, SERVER_VER};

/// The op 8 reply, UTF-8 JSON in both modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthReply {
    /// `{"ret":0,"mid":123}`
    Ok {
        /// The authenticated mid.
        mid: i32,
    },
    /// `{"ret":-1,"error":"..."}`; the server closes the connection after it.
    Failed {
        /// A reason a person can read.
        error: String,
    },
}

#[derive(Deserialize)]
struct AuthReplyJson {
    ret: i64,
    #[serde(default)]
    mid: Option<i32>,
    #[serde(default)]
    error: Option<String>,
}

impl AuthReply {
    /// The JSON body.
    pub fn encode(&self) -> Bytes {
        // Written by hand to keep PROTOCOL.md's key order (`ret` first).
        Bytes::from(match self {
            AuthReply::Ok { mid } => format!(r#"{{"ret":0,"mid":{mid}}}"#),
            AuthReply::Failed { error } => {
                format!(r#"{{"ret":-1,"error":{}}}"#, json_string(error))
            }
        })
    }

    /// Reads an op 8 body (for clients and tests).
    pub fn decode(body: &[u8]) -> Result<Self, PayloadError> {
        let reply: AuthReplyJson = serde_json::from_slice(body)
            .map_err(|e| PayloadError::new(format!("invalid op 8 body: {e}")))?;
        match (reply.ret, reply.mid) {
            (0, Some(mid)) => Ok(AuthReply::Ok { mid }),
            (0, None) => Err(PayloadError::new("op 8 success without mid")),
            _ => Ok(AuthReply::Failed {
                error: reply.error.unwrap_or_default(),
            }),
        }
    }
}

/// The body of op 18 / op 20 as a client sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendRequest {
    /// The sender's mid; must be the authenticated one.
    pub from: i32,
    /// The recipient mid (op 18) or group id (op 20).
    pub to: i32,
    /// The message bytes.
    pub msg: Bytes,
}

#[derive(Deserialize)]
struct SendJson {
    from: i32,
    to: i32,
    msg: String,
    #[serde(default)]
    enc: Option<String>,
}

fn decode_msg(msg: String, enc: Option<&str>) -> Result<Bytes, PayloadError> {
    match enc {
        None => Ok(Bytes::from(msg.into_bytes())),
        Some("base64") => BASE64
            .decode(msg.as_bytes())
            .map(Bytes::from)
            .map_err(|e| PayloadError::new(format!("msg is not valid base64: {e}"))),
        Some(other) => Err(PayloadError::new(format!(
            "unknown enc {other:?}, only \"base64\" is defined"
        ))),
    }
}

/// Reads a JSON object body into `T`. serde would also take an array for a
/// struct (its fields in order); PROTOCOL.md's bodies are objects.
fn from_object<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T, PayloadError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(PayloadError::new(format!(
            "invalid {what} body: expected a JSON object"
        )));
    }
    serde_json::from_slice(body).map_err(|e| PayloadError::new(format!("invalid {what} body: {e}")))
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// The length of `text` as a JSON string literal, quotes included, as
/// serde_json writes it (control characters other than `\b \f \n \r \t`
/// take six bytes).
fn json_string_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\x08' | b'\x0c' | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Writes `,"msg":...`: a plain string for UTF-8 bytes, or their base64 and
/// `,"enc":"base64"` for bytes that are not UTF-8 or whose escaped string
/// would be longer than their base64 (PROTOCOL.md 2.4).
fn write_msg(dst: &mut BytesMut, msg: &[u8]) {
    dst.put_slice(br#","msg":"#);
    let text = std::str::from_utf8(msg).ok().filter(|text| {
        json_string_len(text) <= 2 + base64::encoded_len(msg.len(), true).unwrap_or(0)
    });
    match text {
        Some(text) => {
            // Serializing a &str into memory cannot fail.
            let _ = serde_json::to_writer(dst.writer(), text);
        }
        None => {
            dst.put_u8(b'"');
            let start = dst.len();
            dst.resize(start + base64::encoded_len(msg.len(), true).unwrap_or(0), 0);
            let written = BASE64
                .encode_slice(msg, &mut dst[start..])
                .unwrap_or_default();
            dst.truncate(start + written);
            dst.put_slice(br#"","enc":"base64""#);
        }
    }
}

impl SendRequest {
    /// Reads a request body in `mode`.
    ///
    /// Binary: `from i32, to i32, msg` — shorter than 8 bytes is an error.
    /// JSON: `{"from":1,"to":2,"msg":"hi"}`, optionally `"enc":"base64"`.
    pub fn decode(mode: WireMode, body: &Bytes) -> Result<Self, PayloadError> {
        match mode {
            WireMode::Binary => {
                if body.len() < 8 {
                    return Err(PayloadError::new(format!(
                        "body of {} bytes is too short to hold from and to",
                        body.len()
                    )));
                }
                let mut head = &body[..8];
                let from = head.get_i32();
                let to = head.get_i32();
                Ok(SendRequest {
                    from,
                    to,
                    // A copy, not `body.slice(8..)`: the body is a view into
                    // the connection's read buffer, and a message kept in
                    // history or an inbox would pin that whole buffer (and
                    // make the reader allocate tiny new ones).
                    msg: Bytes::copy_from_slice(&body[8..]),
                })
            }
            WireMode::Json => {
                let req: SendJson = from_object(body, "send")?;
                Ok(SendRequest {
                    from: req.from,
                    to: req.to,
                    msg: decode_msg(req.msg, req.enc.as_deref())?,
                })
            }
        }
    }

    /// The body in `mode` (what clients send).
    pub fn encode(&self, mode: WireMode) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.msg.len() + 48);
        match mode {
            WireMode::Binary => {
                buf.put_i32(self.from);
                buf.put_i32(self.to);
                buf.put_slice(&self.msg);
            }
            WireMode::Json => {
                use std::fmt::Write as _;
                let mut head = String::with_capacity(32);
                let _ = write!(head, r#"{{"from":{},"to":{}"#, self.from, self.to);
                buf.put_slice(head.as_bytes());
                write_msg(&mut buf, &self.msg);
                buf.put_u8(b'}');
            }
        }
        buf.freeze()
    }
}

/// The op 19 / op 21 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendReply {
    /// 0 on success, -1 on failure.
    pub ret: i8,
    /// The stored message's chatId; 0 on failure.
    pub chat_id: i64,
    /// The reason of a failure. Only the JSON encoding carries it; a binary
    /// reply is exactly 9 bytes (PROTOCOL.md 2.4).
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct SendReplyJson {
    ret: i8,
    #[serde(rename = "chatId")]
    chat_id: i64,
    #[serde(default)]
    error: Option<String>,
}

impl SendReply {
    /// A success reply for `chat_id`.
    pub fn ok(chat_id: i64) -> Self {
        SendReply {
            ret: 0,
            chat_id,
            error: None,
        }
    }

    /// A failure reply with a reason.
    pub fn failed(reason: impl Into<String>) -> Self {
        SendReply {
            ret: -1,
            chat_id: 0,
            error: Some(reason.into()),
        }
    }

    /// The body in `mode`.
    pub fn encode(&self, mode: WireMode) -> Bytes {
        match mode {
            WireMode::Binary => {
                let mut buf = BytesMut::with_capacity(9);
                buf.put_i8(self.ret);
                buf.put_i64(self.chat_id);
                buf.freeze()
            }
            WireMode::Json => Bytes::from(match &self.error {
                None => format!(r#"{{"ret":{},"chatId":{}}}"#, self.ret, self.chat_id),
                Some(error) => {
                    // PROTOCOL.md: a failure always carries a non-empty reason.
                    let error = if error.is_empty() { "failed" } else { error };
                    format!(
                        r#"{{"ret":{},"chatId":{},"error":{}}}"#,
                        self.ret,
                        self.chat_id,
                        json_string(error)
                    )
                }
            }),
        }
    }

    /// Reads a reply body in `mode` (for clients and tests).
    pub fn decode(mode: WireMode, body: &[u8]) -> Result<Self, PayloadError> {
        match mode {
            WireMode::Binary => {
                if body.len() != 9 {
                    return Err(PayloadError::new(format!(
                        "send reply must be 9 bytes, got {}",
                        body.len()
                    )));
                }
                let mut body = body;
                Ok(SendReply {
                    ret: body.get_i8(),
                    chat_id: body.get_i64(),
                    error: None,
                })
            }
            WireMode::Json => {
                let reply: SendReplyJson = serde_json::from_slice(body)
                    .map_err(|e| PayloadError::new(format!("invalid send reply: {e}")))?;
                Ok(SendReply {
                    ret: reply.ret,
                    chat_id: reply.chat_id,
                    error: reply.error,
                })
            }
        }
    }
}

/// A delivered message: an op 18 or op 20 frame inside op 9.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// 18 (to a user) or 20 (to a group).
    pub op: u32,
    /// Position in its conversation (PROTOCOL.md 2.5).
    pub chat_id: i64,
    /// The sender.
    pub from: i32,
    /// The recipient mid or group id.
    pub to: i32,
    /// The message bytes.
    pub msg: Bytes,
}

#[derive(Deserialize)]
struct DeliveredJson {
    #[serde(rename = "chatId")]
    chat_id: i64,
    from: i32,
    to: i32,
    msg: String,
    #[serde(default)]
    enc: Option<String>,
}

impl Delivered {
    /// The whole inner frame (ver 1, seq 0) in `mode`, ready for a
    /// [`BatchWriter`](crate::codec::BatchWriter).
    pub fn encode_frame(&self, mode: WireMode) -> Bytes {
        match mode {
            WireMode::Binary => {
                // Exactly sized: a full buffer freezes without allocating a
                // shared header.
                let mut buf = BytesMut::with_capacity(HEADER_LEN + 16 + self.msg.len());
                codec::put_header(&mut buf, 16 + self.msg.len(), SERVER_VER, self.op, 0);
                buf.put_i64(self.chat_id);
                buf.put_i32(self.from);
                buf.put_i32(self.to);
                buf.put_slice(&self.msg);
                buf.freeze()
            }
            WireMode::Json => {
                let mut buf = BytesMut::with_capacity(HEADER_LEN + self.msg.len() * 4 / 3 + 96);
                codec::json::write_head(&mut buf, SERVER_VER, self.op, 0);
                use std::fmt::Write as _;
                let _ = write!(
                    buf,
                    r#"{{"chatId":{},"from":{},"to":{}"#,
                    self.chat_id, self.from, self.to
                );
                write_msg(&mut buf, &self.msg);
                buf.put_slice(b"}}");
                buf.freeze()
            }
        }
    }

    /// Reads an inner frame of op 9 in `mode`.
    pub fn decode(mode: WireMode, frame: &Frame) -> Result<Self, PayloadError> {
        let body = &frame.body;
        match mode {
            WireMode::Binary => {
                if body.len() < 16 {
                    return Err(PayloadError::new(format!(
                        "delivered body of {} bytes is too short",
                        body.len()
                    )));
                }
                let mut head = &body[..16];
                Ok(Delivered {
                    op: frame.op,
                    chat_id: head.get_i64(),
                    from: head.get_i32(),
                    to: head.get_i32(),
                    msg: body.slice(16..),
                })
            }
            WireMode::Json => {
                let d: DeliveredJson = serde_json::from_slice(body)
                    .map_err(|e| PayloadError::new(format!("invalid delivered body: {e}")))?;
                Ok(Delivered {
                    op: frame.op,
                    chat_id: d.chat_id,
                    from: d.from,
                    to: d.to,
                    msg: decode_msg(d.msg, d.enc.as_deref())?,
                })
            }
        }
    }
}

/// The body of op 22: which conversation to replay, from where, how much
/// (PROTOCOL.md 2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncRequest {
    /// 18: the direct conversation with user `to`; 20: group `to`.
    pub kind: u32,
    /// The other user, or the group.
    pub to: i32,
    /// Replay the messages with a chatId above this one.
    pub after: i64,
    /// At most this many; `None` (JSON `limit` absent) means the server's
    /// cap.
    pub limit: Option<u32>,
}

#[derive(Deserialize)]
struct SyncJson {
    kind: i64,
    to: i64,
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
}

/// Length of an op 22 and an op 23 body in binary mode.
const SYNC_BODY_LEN: usize = 17;

impl SyncRequest {
    /// Reads an op 22 body in `mode` and checks every rule of PROTOCOL.md 2.7
    /// that the body alone decides: binary bodies are exactly 17 bytes,
    /// `kind` is 18 or 20, `to` is at least 1, `after` and `limit` are not
    /// negative.
    pub fn decode(mode: WireMode, body: &[u8]) -> Result<Self, PayloadError> {
        let (kind, to, after, limit) = match mode {
            WireMode::Binary => {
                if body.len() != SYNC_BODY_LEN {
                    return Err(PayloadError::new(format!(
                        "sync body must be {SYNC_BODY_LEN} bytes, got {}",
                        body.len()
                    )));
                }
                let mut body = body;
                (
                    i64::from(body.get_i8()),
                    i64::from(body.get_i32()),
                    body.get_i64(),
                    Some(i64::from(body.get_i32())),
                )
            }
            WireMode::Json => {
                let req: SyncJson = from_object(body, "sync")?;
                (req.kind, req.to, req.after.unwrap_or(0), req.limit)
            }
        };
        let kind = match kind {
            18 | 20 => kind as u32,
            other => {
                return Err(PayloadError::new(format!(
                    "kind {other} is neither 18 (direct) nor 20 (group)"
                )))
            }
        };
        let to = i32::try_from(to)
            .ok()
            .filter(|&to| to >= 1)
            .ok_or_else(|| PayloadError::new("to must be a positive id"))?;
        if after < 0 {
            return Err(PayloadError::new("after must not be negative"));
        }
        let limit = match limit {
            None => None,
            Some(n) => Some(
                u32::try_from(n)
                    .map_err(|_| PayloadError::new("limit must be between 0 and 2^31-1"))?
                    .min(i32::MAX as u32),
            ),
        };
        Ok(SyncRequest {
            kind,
            to,
            after,
            limit,
        })
    }

    /// The body in `mode` (what clients send). In binary mode an absent
    /// `limit` is written as `i32::MAX` (the server lowers it to its cap).
    pub fn encode(&self, mode: WireMode) -> Bytes {
        match mode {
            WireMode::Binary => {
                let mut buf = BytesMut::with_capacity(SYNC_BODY_LEN);
                buf.put_i8(self.kind as i8);
                buf.put_i32(self.to);
                buf.put_i64(self.after);
                buf.put_i32(
                    self.limit
                        .map_or(i32::MAX, |n| n.min(i32::MAX as u32) as i32),
                );
                buf.freeze()
            }
            WireMode::Json => {
                let limit = match self.limit {
                    Some(n) => format!(r#","limit":{n}"#),
                    None => String::new(),
                };
                Bytes::from(format!(
                    r#"{{"kind":{},"to":{},"after":{}{limit}}}"#,
                    self.kind, self.to, self.after
                ))
            }
        }
    }
}

/// The op 23 reply (PROTOCOL.md 2.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncReply {
    /// 0 on success, -1 on failure.
    pub ret: i8,
    /// The oldest chatId the store keeps (0 when failed, or when the
    /// conversation has none; `head + 1` when all were dropped).
    pub oldest: i64,
    /// The newest chatId of the conversation (0 when failed or none).
    pub head: i64,
    /// The reason of a failure. Only the JSON encoding carries it; a binary
    /// reply is exactly 17 bytes.
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct SyncReplyJson {
    ret: i8,
    oldest: i64,
    head: i64,
    #[serde(default)]
    error: Option<String>,
}

impl SyncReply {
    /// A success reply.
    pub fn ok(oldest: i64, head: i64) -> Self {
        SyncReply {
            ret: 0,
            oldest,
            head,
            error: None,
        }
    }

    /// A failure reply with a reason.
    pub fn failed(reason: impl Into<String>) -> Self {
        SyncReply {
            ret: -1,
            oldest: 0,
            head: 0,
            error: Some(reason.into()),
        }
    }

    /// The body in `mode`.
    pub fn encode(&self, mode: WireMode) -> Bytes {
        match mode {
            WireMode::Binary => {
                let mut buf = BytesMut::with_capacity(SYNC_BODY_LEN);
                buf.put_i8(self.ret);
                buf.put_i64(self.oldest);
                buf.put_i64(self.head);
                buf.freeze()
            }
            WireMode::Json => Bytes::from(match &self.error {
                None => format!(
                    r#"{{"ret":{},"oldest":{},"head":{}}}"#,
                    self.ret, self.oldest, self.head
                ),
                Some(error) => {
                    let error = if error.is_empty() { "failed" } else { error };
                    format!(
                        r#"{{"ret":{},"oldest":{},"head":{},"error":{}}}"#,
                        self.ret,
                        self.oldest,
                        self.head,
                        json_string(error)
                    )
                }
            }),
        }
    }

    /// Reads a reply body in `mode` (for clients and tests).
    pub fn decode(mode: WireMode, body: &[u8]) -> Result<Self, PayloadError> {
        match mode {
            WireMode::Binary => {
                if body.len() != SYNC_BODY_LEN {
                    return Err(PayloadError::new(format!(
                        "sync reply must be {SYNC_BODY_LEN} bytes, got {}",
                        body.len()
                    )));
                }
                let mut body = body;
                Ok(SyncReply {
                    ret: body.get_i8(),
                    oldest: body.get_i64(),
                    head: body.get_i64(),
                    error: None,
                })
            }
            WireMode::Json => {
                let reply: SyncReplyJson = serde_json::from_slice(body)
                    .map_err(|e| PayloadError::new(format!("invalid sync reply: {e}")))?;
                Ok(SyncReply {
                    ret: reply.ret,
                    oldest: reply.oldest,
                    head: reply.head,
                    error: reply.error,
                })
            }
        }
    }
}
