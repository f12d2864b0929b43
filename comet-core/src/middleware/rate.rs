//! A per-connection frame-rate limit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::{Layer, Service};

use super::{FrameRequest, FrameResponse};
use crate::error::BoxError;

/// Closes (1008, policy violation) a connection that sends frames faster than `per_second` on
/// average, allowing bursts of up to `burst` frames (a token bucket). Each
/// closure is logged with the peer address and counted in
/// [`StatsSnapshot::rate_limited`](crate::StatsSnapshot::rate_limited).
///
/// Add it with [`CometBuilder::layer`](crate::CometBuilder::layer); every
/// connection gets its own bucket.
///
/// ```
/// # use comet_core::middleware::FrameRateLimitLayer;
/// let layer = FrameRateLimitLayer::new(50, 200); // 50 frames/s, bursts of 200
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug)]
pub struct FrameRateLimitLayer {
    per_second: u32,
    burst: u32,
}

impl FrameRateLimitLayer {
    /// `per_second` frames per second on average, bursts up to `burst`.
    pub fn new(per_second: u32, burst: u32) -> Self {
        FrameRateLimitLayer {
            per_second: per_second.max(1),
            burst: burst.max(1),
        }
    }
}

impl<S> Layer<S> for FrameRateLimitLayer {
    type Service = FrameRateLimit<S>;

    fn layer(&self, inner: S) -> FrameRateLimit<S> {
        FrameRateLimit {
            inner,
            per_second: f64::from(self.per_second),
            burst: f64::from(self.burst),
            tokens: f64::from(self.burst),
            last: Instant::now(),
        }
    }
}

/// The service of [`FrameRateLimitLayer`].
#[derive(Debug)]
pub struct FrameRateLimit<S> {
    inner: S,
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

/// The error that closes a connection over its frame rate.
#[derive(Debug, thiserror::Error)]
#[error("frame rate limit of {0} frames per second exceeded")]
pub struct RateLimited(pub u32);

type BoxFuture = Pin<Box<dyn Future<Output = Result<FrameResponse, BoxError>> + Send>>;

impl<S> Service<FrameRequest> for FrameRateLimit<S>
where
    S: Service<FrameRequest, Response = FrameResponse, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = FrameResponse;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: FrameRequest) -> BoxFuture {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Box::pin(self.inner.call(req))
        } else {
            req.ctx.comet.engine().stats.rate_limit();
            tracing::warn!(peer = %req.ctx.conn.peer, mid = req.ctx.mid(), "closing connection: frame rate limit exceeded");
            let limit = self.per_second as u32;
            Box::pin(async move { Err(RateLimited(limit).into()) })
        }
    }
}
