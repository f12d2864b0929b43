//! # comet-core
//!
//! The engine of comet: frames and codecs, the traits applications plug in,
//! the session engine and the middleware stack. Transports
//! (`comet-transports`) feed it connections; plug-ins (`comet-plugins`)
//! provide default implementations of the traits.
//!
//! ## Layout
//!
//! - [`frame`]: [`Frame`], op codes, wire modes;
//! - [`codec`]: the binary codec, the JSON mapping, op 9 batches;
//! - [`payload`]: typed bodies of ops 7/8, 18–21 in both modes;
//! - [`auth`], [`store`], [`groups`]: the plug-in traits [`Authenticator`],
//!   [`MessageStore`], [`GroupDirectory`];
//! - [`registry`]: live sessions and the [`Delivery`] seam;
//! - [`middleware`]: the tower stack; [`session`]: one connection's life;
//! - [`comet`]: the [`Comet`] handle and its builder;
//! - [`telemetry`]: the `metrics` series the engine reports;
//! - [`testing`]: conformance kits for store and group-directory authors.
//!
//! The modules depend on each other in one direction, read top-down:
//! frame → codec → queue (a session's outbound queue) → registry → engine
//! (the state one comet's sessions share: plug-ins, settings, the send
//! path) → middleware → session → comet (the handle). A module calls only
//! into those before it. Two type names point the other way, without
//! calls: the engine keeps the middleware's router and layers (to build
//! each connection's stack), and the middleware's [`ConnContext`] holds a
//! [`Comet`] handle to give handlers.

//! ## Quick start
//!
//! ```
//! use comet_core::{async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, Identity};
//! # use comet_core::{Conversation, Draft, History, MessageStore, Message, Offline, GroupDirectory, Members};
//! use std::sync::Arc;
//!
//! /// Logins checked against the application's own user database.
//! struct Users;
//!
//! #[async_trait]
//! impl Authenticator for Users {
//!     async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
//!         let req = ctx.auth_request();
//!         Ok(match (req.mid(), req.mkey()) {
//!             (Some(mid), Some(key)) if key == format!("secret-{mid}") => {
//!                 AuthOutcome::Accepted(Identity::new(mid))
//!             }
//!             _ => AuthOutcome::Denied(format!("bad login from {}", ctx.peer())),
//!         })
//!     }
//! }
//! # struct S; #[async_trait] impl MessageStore for S {
//! #   async fn append(&self, d: Draft) -> Result<Arc<Message>, BoxError> { Ok(d.into_message(1)) }
//! #   async fn history(&self, _: Conversation, _: i64, _: usize) -> Result<History, BoxError> { Ok(History::default()) }
//! #   async fn push_offline(&self, _: i32, _: Arc<Message>) -> Result<(), BoxError> { Ok(()) }
//! #   async fn offline(&self, _: i32, _: usize) -> Result<Vec<Offline>, BoxError> { Ok(vec![]) }
//! #   async fn remove_offline(&self, _: i32, _: u64) -> Result<(), BoxError> { Ok(()) } }
//! # struct G; #[async_trait] impl GroupDirectory for G {
//! #   async fn is_member(&self, _: i32, _: i32) -> Result<bool, BoxError> { Ok(false) }
//! #   async fn members(&self, _: i32) -> Result<Members, BoxError> { Ok(Arc::from(vec![])) } }
//!
//! let comet = comet_core::Comet::builder()
//!     .authenticator(Arc::new(Users))
//!     .store(Arc::new(S)) // e.g. comet_plugins::memory::MemoryStore
//!     .groups(Arc::new(G)) // e.g. comet_plugins::memory::MemoryGroups
//!     .build()
//!     .expect("all plug-ins given");
//! assert_eq!(comet.session_count(), 0);
//! ```

//! ## Where items live
//!
//! Every item has one home, its module, where it is documented. The crate
//! root re-exports the ones an embedder names most (the handle, the plug-in
//! traits, frames, errors) as plain re-exports that link to that page, so
//! `comet_core::Comet` and `comet_core::comet::Comet` are the same item,
//! documented once.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod broker;
pub mod codec;
pub mod comet;
pub mod config;
mod engine;
pub mod error;
pub mod frame;
pub mod groups;
pub mod message;
pub mod middleware;
pub mod payload;
mod queue;
pub mod registry;
pub mod session;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod testing;

/// A user id (signed 32-bit on the wire).
pub type Mid = i32;
/// A group id (signed 32-bit on the wire).
pub type GroupId = i32;

#[doc(no_inline)]
pub use async_trait::async_trait;
/// The `http` crate whose types [`AuthContext`] hands out (headers, URI,
/// request parts) and [`Extensions`] come from, re-exported so that
/// embedders use the same version.
pub use http;

#[doc(no_inline)]
pub use crate::auth::{
    AuthContext, AuthOutcome, AuthRequest, Authenticator, ConnId, ConnInfo, Extensions, Identity,
    TlsInfo, UserDirectory,
};
#[doc(no_inline)]
pub use crate::broker::{Broker, BrokerError, NodeStatus};
#[doc(no_inline)]
pub use crate::comet::{BuildError, Comet, CometBuilder, Event};
#[doc(no_inline)]
pub use crate::config::Config;
#[doc(no_inline)]
pub use crate::error::{BoxError, FrameError, PayloadError, PluginTimeout, SendError, SyncError};
#[doc(no_inline)]
pub use crate::frame::{op, Frame, Transport, WireMode};
#[doc(no_inline)]
pub use crate::groups::{GroupDirectory, GroupMembership, Members};
#[doc(no_inline)]
pub use crate::message::{Conversation, Message};
#[doc(no_inline)]
pub use crate::middleware::{BoxService, ConnContext, FrameRequest, FrameResponse};
#[doc(no_inline)]
pub use crate::registry::{Delivery, Registry, SessionHandle};
#[doc(no_inline)]
pub use crate::session::{Outgoing, SessionEnd};
#[doc(no_inline)]
pub use crate::stats::StatsSnapshot;
#[doc(no_inline)]
pub use crate::store::{Draft, History, MessageStore, Offline};
