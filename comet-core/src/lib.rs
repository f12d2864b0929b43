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
//! - [`session`]: one connection's life; [`middleware`]: the tower stack;
//! - [`comet`]: the [`Comet`] handle and its builder;
//! - [`telemetry`]: the `metrics` series the engine reports;
//! - [`testing`]: conformance kits for store and group-directory authors.
//!
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

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod broker;
pub mod codec;
pub mod comet;
pub mod config;
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

#[doc(inline)]
pub use crate::auth::{
    AuthContext, AuthOutcome, AuthRequest, Authenticator, ConnId, ConnInfo, Extensions, Identity,
    TlsInfo, UserDirectory,
};
#[doc(inline)]
pub use crate::broker::{Broker, BrokerError};
#[doc(inline)]
pub use crate::comet::{BuildError, Comet, CometBuilder, Event};
#[doc(inline)]
pub use crate::config::Config;
#[doc(inline)]
pub use crate::error::{BoxError, FrameError, PayloadError, SendError, SyncError};
#[doc(inline)]
pub use crate::frame::{op, Frame, Transport, WireMode};
#[doc(inline)]
pub use crate::groups::{GroupDirectory, GroupMembership, Members};
#[doc(inline)]
pub use crate::message::{Conversation, Message};
#[doc(inline)]
pub use crate::middleware::{BoxService, ConnContext, Request, Response};
#[doc(inline)]
pub use crate::registry::{Delivery, Registry, SessionHandle};
#[doc(inline)]
pub use crate::session::{Outgoing, SessionEnd};
#[doc(inline)]
pub use crate::stats::StatsSnapshot;
#[doc(inline)]
pub use crate::store::{Draft, History, MessageStore, Offline};
