//! # comet-plugins
//!
//! Default implementations of comet's plug-in traits, each replaceable by the
//! application's own:
//!
//! - [`memory::MemoryAuth`]: a mid → mkey table, keys compared in constant time;
//! - [`memory::MemoryStore`]: chatId sequencing per conversation, history
//!   and offline inboxes bounded in messages and bytes, a byte budget for
//!   the whole store ([`memory::MemoryLimits`]);
//! - [`memory::MemoryGroups`]: group membership with join and leave;
//! - `embedded::EmbeddedStore` (cargo feature `embedded`): the same store,
//!   crash-safe on disk (SQLite in WAL mode);
//! - `redis::RedisCluster` (cargo feature `redis`): cluster mode, many
//!   nodes sharing one Redis (store, groups, presence and routing).
//!
//! ```
//! use comet_plugins::memory::{MemoryAuth, MemoryGroups, MemoryStore};
//! use std::sync::Arc;
//!
//! let auth = MemoryAuth::default();
//! auth.insert(1, "k1");
//! let groups = MemoryGroups::default();
//! groups.set_members(100, [1, 2, 3]);
//! let comet = comet_core::Comet::builder()
//!     .authenticator(Arc::new(auth))
//!     .store(Arc::new(MemoryStore::default()))
//!     .groups(Arc::new(groups))
//!     .build()
//!     .unwrap();
//! # let _ = comet;
//! ```

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

#[cfg(feature = "embedded")]
pub mod embedded;
pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;
