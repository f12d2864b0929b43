//! In-memory plug-ins: fast, process-local, lost on restart.

mod auth;
mod groups;
mod store;

pub use auth::MemoryAuth;
pub use groups::MemoryGroups;
pub use store::{MemoryLimits, MemoryStore, MemoryUsage};
