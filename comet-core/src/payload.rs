//! Typed bodies of ops 7/8 and 18–21 in both wire modes (PROTOCOL.md 2.2–2.4).
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

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// Writes `,"msg":...` (and `,"enc":"base64"` for bytes that are not UTF-8).
fn write_msg(dst: &mut BytesMut, msg: &[u8]) {
    dst.put_slice(br#","msg":"#);
    match std::str::from_utf8(msg) {
        Ok(text) => {
            // Serializing a &str into memory cannot fail.
            let _ = serde_json::to_writer(dst.writer(), text);
        }
        Err(_) => {
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
                let req: SendJson = serde_json::from_slice(body)
                    .map_err(|e| PayloadError::new(format!("invalid send body: {e}")))?;
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
