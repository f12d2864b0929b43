//! Helpers shared by the root integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod engine;
pub mod http;
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

/// The `chat_server` example binary that `cargo test` built beside the test
/// binary (target/<profile>/deps/<test>-<hash> → target/<profile>/examples).
pub fn chat_server_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("chat_server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test` (which builds the examples) or \
         `cargo build --example chat_server` first",
        bin.display()
    );
    bin
}
