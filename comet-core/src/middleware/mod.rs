//! The tower middleware stack over decoded frames.
//!
//! Every frame a client sends after op 7 becomes a [`FrameRequest`] that runs
//! through the application's layers (outermost first, in the order they were
//! added to the builder) down to the innermost service, which handles the
//! protocol's own ops (2, 18, 20) and routes any other op to the
//! application's handler for it. A handler or layer answers `Ok(Some(frame))`
//! to reply, `Ok(None)` to stay silent, and `Err(_)` to close the connection
//! (logged with the peer address).

mod rate;
mod router;

pub use rate::{FrameRateLimit, FrameRateLimitLayer, RateLimited};
pub(crate) use router::Router;

use std::sync::Arc;

use tower::util::{BoxCloneSyncService, BoxService as TowerBoxService};

use crate::auth::{ConnId, ConnInfo, Extensions, Identity};
use crate::comet::Comet;
use crate::error::BoxError;
use crate::frame::Frame;
use crate::registry::SessionHandle;
use crate::Mid;

/// One decoded frame from an authenticated connection, with its context.
#[derive(Clone, Debug)]
pub struct FrameRequest {
    /// The frame; its body is in the connection's wire mode.
    pub frame: Frame,
    /// Who sent it, and over what.
    pub ctx: Arc<ConnContext>,
}

/// What a service answers: a frame to write back on the connection (in its
/// wire mode, usually made with [`Frame::reply`]), or nothing.
pub type FrameResponse = Option<Frame>;

/// A type-erased frame service: what each layer wraps. A connection's stack
/// is built when it authenticates, so layers with per-connection state (a
/// `tower::limit::RateLimitLayer`, say) limit that connection alone.
pub type BoxService = TowerBoxService<FrameRequest, FrameResponse, BoxError>;

/// A type-erased application handler for one op (cloned per call).
pub(crate) type Handler = BoxCloneSyncService<FrameRequest, FrameResponse, BoxError>;

/// A connection's service: the router alone when the application added no
/// layer, or the boxed stack. Without layers this saves boxing every
/// frame's (already boxed) future a second time.
pub(crate) enum Stack {
    Bare(Router),
    Layered(BoxService),
}

impl tower::Service<FrameRequest> for Stack {
    type Response = FrameResponse;
    type Error = BoxError;
    type Future = router::BoxFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        match self {
            Stack::Bare(router) => router.poll_ready(cx),
            Stack::Layered(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, req: FrameRequest) -> Self::Future {
        match self {
            Stack::Bare(router) => router.call(req),
            Stack::Layered(service) => service.call(req),
        }
    }
}

/// The context of an authenticated connection.
#[derive(Debug)]
pub struct ConnContext {
    /// Transport, wire mode, peer address and connection id.
    pub conn: ConnInfo,
    /// Who the connection authenticated as.
    pub identity: Identity,
    pub(crate) comet: Comet,
    pub(crate) handle: SessionHandle,
}

impl ConnContext {
    /// The authenticated mid.
    pub fn mid(&self) -> Mid {
        self.identity.mid
    }

    /// The connection's id (as in [`Event`](crate::Event)s).
    pub fn conn_id(&self) -> ConnId {
        self.conn.conn_id
    }

    /// The typed per-session data the login attached
    /// ([`Identity::with_extension`]).
    pub fn extensions(&self) -> &Extensions {
        self.identity.extensions()
    }

    /// The comet this connection belongs to (to send messages, look up who is
    /// online, ...).
    pub fn comet(&self) -> &Comet {
        &self.comet
    }

    /// Queues an extra frame for this connection (body in its wire mode),
    /// after everything already queued. Returns `false` if the connection is
    /// closing or over its outbound bound.
    pub fn push(&self, frame: Frame) -> bool {
        self.handle.push_frame(frame)
    }
}
