//! Group membership: the [`GroupDirectory`] hook.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::{GroupId, Mid};

/// The members of a group, shared without copying.
pub type Members = Arc<[Mid]>;

/// Answers who is in a group. A group that does not exist has no members.
///
/// An extension point: applications implement it.
#[async_trait]
pub trait GroupDirectory: Send + Sync + 'static {
    /// Whether `mid` is a member of `group`.
    async fn is_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError>;

    /// Every member of `group` (empty for an unknown group).
    async fn members(&self, group: GroupId) -> Result<Members, BoxError>;

    /// The membership changes this directory accepts, if any: an optional
    /// capability, used by the admin API's group routes. The default is
    /// `None` (membership is managed elsewhere, e.g. in the application's
    /// own database).
    fn membership(&self) -> Option<&dyn GroupMembership> {
        None
    }
}

/// Membership changes, for a [`GroupDirectory`] that accepts them (see
/// [`GroupDirectory::membership`]). A change shows in the next send: the
/// engine reads members per send.
#[async_trait]
pub trait GroupMembership: Send + Sync {
    /// Adds `mid` to `group` (creating the group); returns whether it was
    /// new.
    async fn add_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError>;

    /// Removes `mid` from `group`; returns whether it was a member.
    async fn remove_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError>;
}
