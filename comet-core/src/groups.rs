//! Group membership: the [`GroupDirectory`] hook.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::{GroupId, Mid};

/// The members of a group, shared without copying.
pub type Members = Arc<[Mid]>;

/// Answers who is in a group. A group that does not exist has no members.
#[async_trait]
pub trait GroupDirectory: Send + Sync + 'static {
    /// Whether `mid` is a member of `group`.
    async fn is_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError>;

    /// Every member of `group` (empty for an unknown group).
    async fn members(&self, group: GroupId) -> Result<Members, BoxError>;
}
