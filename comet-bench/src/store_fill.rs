//! `store-fill`: the embedded store on its own: fill it with N messages,
//! close it, open it again. Gives the numbers behind BENCHMARKS.md's
//! "open time with 1,000,000 messages" and "disk bytes per message".

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use comet::core::{Conversation, Draft, MessageStore};
use comet::plugins::embedded::{EmbeddedConfig, EmbeddedStore};
use serde_json::{json, Value};

/// Appends at once (the store's writer batches them into one commit).
const IN_FLIGHT: usize = 256;

/// Bytes of the files under `dir`.
fn disk_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Fills a fresh store in `path` and reopens it.
pub(crate) async fn run(
    path: &Path,
    messages: u64,
    size: usize,
    conversations: i32,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let _ = std::fs::remove_dir_all(path);
    let mut config = EmbeddedConfig::new(path);
    // Keep every message: the point is a store holding all of them.
    config.history_limit = usize::MAX;
    config.history_bytes = usize::MAX;
    let store = Arc::new(tokio::task::block_in_place(|| {
        EmbeddedStore::open(config.clone())
    })?);
    let body = Bytes::from(vec![b'm'; size]);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(IN_FLIGHT);
    for t in 0..IN_FLIGHT as u64 {
        let store = store.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < messages {
                let c = (i % conversations as u64) as i32 + 1;
                let draft = Draft {
                    conversation: Conversation::direct(c, c + 1_000_000),
                    op: comet::core::op::SEND_TO_USER,
                    from: c,
                    to: c + 1_000_000,
                    msg: body.clone(),
                };
                store.append(draft).await?;
                i += IN_FLIGHT as u64;
            }
            Ok::<_, comet::core::BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    drop(store);
    // The writer checkpoints and closes when the last handle goes.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let bytes = disk_bytes(path)?;
    let reopened = tokio::task::block_in_place(|| EmbeddedStore::open(config))?;
    let opened = reopened.opened().clone();
    let history = reopened
        .history(Conversation::direct(1, 1_000_001), 0, usize::MAX)
        .await?;
    Ok(json!({
        "scenario": "store-fill",
        "messages": messages,
        "msg_bytes": size,
        "conversations": conversations,
        "appends_per_s": (messages as f64 / fill_secs).round(),
        "disk_bytes": bytes,
        "disk_bytes_per_message": (bytes as f64 / messages as f64).round(),
        "open_ms": opened.elapsed.as_secs_f64() * 1000.0,
        "found_messages": opened.messages,
        "found_conversations": opened.conversations,
        "head_of_first": history.head,
        "ok": opened.messages == messages,
    }))
}
