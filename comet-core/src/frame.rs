//! The protocol frame and its operation codes (PROTOCOL.md 1 and 2).

use bytes::Bytes;

/// Length of the fixed TCP / binary-WebSocket frame header, in bytes.
pub const HEADER_LEN: usize = 16;

/// Default upper bound of a frame body, in bytes (64 KiB). A body of exactly
/// this many bytes is accepted.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// Bytes of `max_body` that a delivered message needs besides its `msg`:
/// the inner frame header (16) plus chatId, from and to (16). A `msg` of at
/// most `max_body - MSG_OVERHEAD` bytes therefore always fits one op 9.
pub const MSG_OVERHEAD: usize = 32;

/// The `ver` that server-initiated frames carry.
pub const SERVER_VER: u16 = 1;

/// Operation codes of PROTOCOL.md section 2. Every other value is free for
/// applications.
pub mod op {
    /// Client → server heartbeat.
    pub const HEARTBEAT: u32 = 2;
    /// Server → client heartbeat reply.
    pub const HEARTBEAT_REPLY: u32 = 3;
    /// Client → server authentication.
    pub const AUTH: u32 = 7;
    /// Server → client authentication reply.
    pub const AUTH_REPLY: u32 = 8;
    /// Server → client batch of delivered messages.
    pub const BATCH: u32 = 9;
    /// Client → server send to a user; also the op of a delivered 1:1 message.
    pub const SEND_TO_USER: u32 = 18;
    /// Server → client send-to-user reply.
    pub const SEND_TO_USER_REPLY: u32 = 19;
    /// Client → server send to a group; also the op of a delivered group message.
    pub const SEND_TO_GROUP: u32 = 20;
    /// Server → client send-to-group reply.
    pub const SEND_TO_GROUP_REPLY: u32 = 21;
    /// Client → server sync: replay a conversation's stored messages
    /// (PROTOCOL.md 2.7).
    pub const SYNC: u32 = 22;
    /// Server → client sync reply.
    pub const SYNC_REPLY: u32 = 23;

    /// Whether `op` is one of the protocol's own operations (and therefore not
    /// free for applications).
    pub const fn is_builtin(op: u32) -> bool {
        matches!(op, 2 | 3 | 7 | 8 | 9 | 18..=23)
    }
}

/// One protocol frame, in either direction.
///
/// The body is kept in the connection's wire mode: raw bytes for TCP and
/// binary WebSocket, the JSON text of the `body` value for text WebSocket (an
/// empty body stands for an absent or `null` body). The typed payloads in
/// [`crate::payload`] encode and decode bodies for a given [`WireMode`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Frame {
    /// Protocol version; replies echo the request's.
    pub ver: u16,
    /// Operation code, see [`op`].
    pub op: u32,
    /// Sequence number; replies echo the request's, server-initiated frames use 0.
    pub seq: u32,
    /// The body, shared without copying.
    pub body: Bytes,
}

impl Frame {
    /// A frame with the given fields.
    pub fn new(ver: u16, op: u32, seq: u32, body: impl Into<Bytes>) -> Self {
        Frame {
            ver,
            op,
            seq,
            body: body.into(),
        }
    }

    /// A reply to `self`: same `ver` and `seq`, the given op and body.
    pub fn reply(&self, op: u32, body: impl Into<Bytes>) -> Self {
        Frame::new(self.ver, op, self.seq, body)
    }
}

/// How a connection encodes frames on the wire. Fixed for a connection's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WireMode {
    /// TCP framing (PROTOCOL.md 1.1): TCP connections and binary WebSocket.
    Binary,
    /// One JSON object per WebSocket text frame (PROTOCOL.md 1.2).
    Json,
}

/// The transport a connection arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Plain or TLS TCP with binary frames.
    Tcp,
    /// WebSocket (either mode).
    WebSocket,
    /// An in-process connection (tests, bridges).
    Local,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::WebSocket => "websocket",
            Transport::Local => "local",
        })
    }
}
