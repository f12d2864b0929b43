//! Errors of comet-core.

/// A boxed error from a plug-in (database down, timeout, ...).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A frame that breaks PROTOCOL.md's framing rules. Any of these closes the
/// connection it arrived on, and nobody else's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// headerLen was not 16.
    #[error("headerLen is {0}, must be 16")]
    BadHeaderLen(u16),
    /// packLen was smaller than the header.
    #[error("packLen is {0}, must be at least 16")]
    PackLenTooSmall(u32),
    /// The body is longer than the configured maximum.
    #[error("body of {len} bytes exceeds max_body of {max} bytes")]
    BodyTooLarge {
        /// Announced body length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A text-mode frame that is not a valid frame object.
    #[error("invalid JSON frame: {0}")]
    Json(String),
    /// A binary WebSocket message that ends inside a frame.
    #[error("binary message ends inside a frame ({0} bytes left over)")]
    Truncated(usize),
    /// A data frame of the other mode than the one the connection uses.
    #[error("{0} frame on a {1} connection")]
    WrongMode(&'static str, &'static str),
    /// The transport's own framing was broken (e.g. a bad WebSocket frame).
    #[error("{0}")]
    Transport(String),
    /// A message too large for the transport's limit.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Size of the message (as far as known).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The transport failed.
    #[error("transport error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The WebSocket close code for this error: 1007 (invalid payload) for a
    /// body that cannot be read, 1009 (too big) for an oversized message,
    /// 1002 (protocol error) for everything else.
    pub fn ws_close_code(&self) -> u16 {
        match self {
            FrameError::Json(_) => 1007,
            FrameError::MessageTooLarge { .. } => 1009,
            _ => 1002,
        }
    }
}

/// A plug-in call that did not answer within
/// [`Config::hook_timeout`](crate::Config::hook_timeout): the source of a
/// [`SendError`] or [`SyncError`] then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} timed out")]
pub struct PluginTimeout(pub(crate) &'static str);

impl PluginTimeout {
    /// Which plug-in timed out ("message store", "group directory", ...).
    pub fn plugin(&self) -> &'static str {
        self.0
    }
}

/// A payload that cannot be read (body too short, bad JSON, ...). Answered
/// with a failure reply; the connection stays open where PROTOCOL.md says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PayloadError(pub String);

impl PayloadError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        PayloadError(reason.into())
    }
}

/// Why sending a message (op 18 / op 20, or [`crate::Comet::send_to_user`])
/// failed. The `Display` text is the reason put in a ret -1 reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// `from` is not the mid the connection authenticated as.
    #[error("from does not match the authenticated mid")]
    Spoofed,
    /// `to` is zero or negative.
    #[error("to must be a positive id")]
    BadRecipient,
    /// The sender is not a member of the target group (or it does not exist).
    #[error("sender is not a member of group {0}")]
    NotMember(i32),
    /// The recipient is not a user, as the application's
    /// [`UserDirectory`](crate::UserDirectory) says.
    #[error("unknown user {0}")]
    UnknownUser(i32),
    /// The user directory failed or timed out.
    #[error("user directory unavailable: {0}")]
    Users(#[source] BoxError),
    /// `msg` is empty.
    #[error("msg must not be empty")]
    EmptyMessage,
    /// `msg` is longer than the message limit.
    #[error("msg of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Length of the message.
        len: usize,
        /// The limit (`max_body - 32`).
        max: usize,
    },
    /// The request body could not be read.
    #[error("{0}")]
    Payload(#[from] PayloadError),
    /// The message store failed or timed out; no chatId was consumed.
    #[error("message store unavailable: {0}")]
    Store(#[source] BoxError),
    /// The group directory failed or timed out.
    #[error("group directory unavailable: {0}")]
    Groups(#[source] BoxError),
}

/// Why a sync (op 22, or [`crate::Comet::history`]) failed. The `Display`
/// text is the reason put in a ret -1 op 23 reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The request body breaks PROTOCOL.md 2.7 (size, shape, kind, `to`,
    /// negative `after` or `limit`).
    #[error("{0}")]
    Payload(#[from] PayloadError),
    /// The requester is not a member of the group (or it does not exist).
    #[error("not a member of group {0}")]
    NotMember(i32),
    /// The message store failed or timed out.
    #[error("message store unavailable: {0}")]
    Store(#[source] BoxError),
    /// The group directory failed or timed out.
    #[error("group directory unavailable: {0}")]
    Groups(#[source] BoxError),
}
