use foldhash::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use comet_core::{async_trait, BoxError, GroupDirectory, GroupId, GroupMembership, Members, Mid};

#[derive(Debug, Default)]
struct Group {
    set: HashSet<Mid>,
    list: Members,
}

impl Group {
    fn rebuild(&mut self) {
        self.list = self.set.iter().copied().collect();
    }
}

/// Group membership in memory, with join and leave.
///
/// [`members`](GroupDirectory::members) hands out a shared snapshot (no copy
/// per message); joins and leaves rebuild it, so fill big groups with
/// [`set_members`](Self::set_members) rather than one join per member.
///
/// ```
/// # use comet_plugins::memory::MemoryGroups;
/// let groups = MemoryGroups::default();
/// groups.set_members(100, [1, 2, 3]);
/// groups.join(100, 4);
/// groups.leave(100, 1);
/// assert_eq!(groups.len(100), 3);
/// ```
#[derive(Debug, Default)]
pub struct MemoryGroups {
    groups: RwLock<HashMap<GroupId, Group>>,
}

impl MemoryGroups {
    /// Replaces the members of `group` (creating it).
    pub fn set_members(&self, group: GroupId, members: impl IntoIterator<Item = Mid>) {
        let mut g = Group {
            set: members.into_iter().collect(),
            list: Arc::from(Vec::new()),
        };
        g.rebuild();
        self.write().insert(group, g);
    }

    /// Adds `mid` to `group` (creating it); returns whether it was new.
    pub fn join(&self, group: GroupId, mid: Mid) -> bool {
        let mut groups = self.write();
        let g = groups.entry(group).or_default();
        let added = g.set.insert(mid);
        if added {
            g.rebuild();
        }
        added
    }

    /// Removes `mid` from `group`; returns whether it was a member.
    pub fn leave(&self, group: GroupId, mid: Mid) -> bool {
        let mut groups = self.write();
        let Some(g) = groups.get_mut(&group) else {
            return false;
        };
        let removed = g.set.remove(&mid);
        if removed {
            if g.set.is_empty() {
                groups.remove(&group);
            } else {
                g.rebuild();
            }
        }
        removed
    }

    /// Removes a whole group.
    pub fn remove(&self, group: GroupId) -> bool {
        self.write().remove(&group).is_some()
    }

    /// Number of members of `group`.
    pub fn len(&self, group: GroupId) -> usize {
        self.read().get(&group).map_or(0, |g| g.set.len())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<GroupId, Group>> {
        self.groups.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<GroupId, Group>> {
        self.groups.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl GroupDirectory for MemoryGroups {
    async fn is_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError> {
        Ok(self
            .read()
            .get(&group)
            .is_some_and(|g| g.set.contains(&mid)))
    }

    async fn members(&self, group: GroupId) -> Result<Members, BoxError> {
        Ok(self
            .read()
            .get(&group)
            .map_or_else(|| Arc::from(Vec::new()), |g| g.list.clone()))
    }

    fn membership(&self) -> Option<&dyn GroupMembership> {
        Some(self)
    }
}

#[async_trait]
impl GroupMembership for MemoryGroups {
    async fn add_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError> {
        Ok(self.join(group, mid))
    }

    async fn remove_member(&self, group: GroupId, mid: Mid) -> Result<bool, BoxError> {
        Ok(self.leave(group, mid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_groups_conform() {
        comet_core::testing::groups_conformance(|fixture| async move {
            let groups = MemoryGroups::default();
            for (group, members) in fixture {
                groups.set_members(group, members);
            }
            Arc::new(groups)
        })
        .await;
        // The same fixture built one join at a time.
        comet_core::testing::groups_conformance(|fixture| async move {
            let groups = MemoryGroups::default();
            for (group, members) in fixture {
                for mid in members {
                    groups.join(group, mid);
                }
            }
            Arc::new(groups)
        })
        .await;
    }

    #[tokio::test]
    async fn join_leave_and_unknown_groups() {
        let groups = MemoryGroups::default();
        assert!(!groups.is_member(5, 1).await.unwrap());
        assert!(groups.members(5).await.unwrap().is_empty());
        assert!(groups.join(5, 1));
        assert!(!groups.join(5, 1));
        assert!(groups.join(5, 2));
        let mut m = groups.members(5).await.unwrap().to_vec();
        m.sort();
        assert_eq!(m, vec![1, 2]);
        assert!(groups.leave(5, 1));
        assert!(!groups.is_member(5, 1).await.unwrap());
        assert!(groups.is_member(5, 2).await.unwrap());
        assert!(groups.leave(5, 2));
        assert_eq!(groups.len(5), 0);
        assert!(!groups.leave(5, 2));
    }
}
