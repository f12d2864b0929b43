//! # comet
//!
//! A Rust framework for long-connection servers: the "comet" tier of a chat or
//! push system. It holds TCP and WebSocket connections, authenticates them,
//! keeps them alive and routes 1:1 and group messages between them, speaking
//! the goim-compatible protocol described in `PROTOCOL.md`.
//!
//! This facade re-exports the three crates of the workspace:
//!
//! - [`core`] (`comet-core`): frames, codecs, the plug-in traits
//!   ([`Authenticator`](core::Authenticator), [`MessageStore`](core::MessageStore),
//!   [`GroupDirectory`](core::GroupDirectory)), the session
//!   engine and the middleware stack;
//! - [`transports`] (`comet-transports`): TCP and WebSocket listeners, and a
//!   tower/axum service to mount the WebSocket endpoint in an existing app;
//! - [`plugins`] (`comet-plugins`): in-memory defaults for the traits.
//!
//! ## Quick start: a comet with your own user database
//!
//! ```
//! use comet::core::{async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, Identity};
//! use comet::plugins::memory::{MemoryGroups, MemoryStore};
//! use std::sync::Arc;
//!
//! /// Checks logins against the application's own user table.
//! struct MyUsers;
//!
//! #[async_trait]
//! impl Authenticator for MyUsers {
//!     async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
//!         let req = ctx.auth_request();
//!         match (req.mid(), req.mkey()) {
//!             (Some(mid), Some("let-me-in")) => Ok(AuthOutcome::Accepted(Identity::new(mid))),
//!             _ => Ok(AuthOutcome::Denied("unknown mid or wrong mkey".into())),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let comet = comet::Comet::builder()
//!     .authenticator(Arc::new(MyUsers))
//!     .store(Arc::new(MemoryStore::default()))
//!     .groups(Arc::new(MemoryGroups::default()))
//!     .build()
//!     .expect("every plug-in given");
//!
//! // The handle sends as if a client had sent op 18: stored, chatId assigned, delivered.
//! let chat_id = comet.send_to_user(1, 2, "hello from the backend".into()).await.unwrap();
//! assert_eq!(chat_id, 1);
//! # }
//! ```
//!
//! Serve it with [`transports::tcp::serve`] or [`transports::ws::serve`], mount
//! it on an axum `Router` with [`transports::axum`], or start a ready server
//! from a TOML file with [`server`].

// The README's Rust snippets compile (and run) as doctests of this module,
// which exists only for `cargo test --doc`.
#[cfg(all(doctest, feature = "tcp", feature = "axum"))]
#[doc = include_str!("../README.md")]
mod readme {}

#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "ws")]
pub mod web;

#[doc(inline)]
pub use comet_core as core;
#[doc(inline)]
pub use comet_plugins as plugins;
#[doc(inline)]
pub use comet_transports as transports;

#[doc(no_inline)]
pub use comet_core::{Comet, CometBuilder, Config};
