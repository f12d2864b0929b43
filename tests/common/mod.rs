//! Helpers shared by the root integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod engine;
pub mod raw;
pub mod redis;
pub mod server;

use std::future::Future;
use std::time::Duration;

/// Every receive in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}
