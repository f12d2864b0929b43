use foldhash::HashMap;
use std::sync::RwLock;

use comet_core::{
    async_trait, AuthContext, AuthOutcome, Authenticator, BoxError, Identity, Mid, UserDirectory,
};
use subtle::ConstantTimeEq;

/// Authenticates op 7 against an in-memory mid → mkey table, and tells the
/// engine which users exist ([`UserDirectory`]: the mids of the table).
///
/// Keys are compared in constant time (for keys of equal length), and the
/// refusal never says whether the mid exists. Extra fields of the op 7 body
/// are ignored: they never make a valid login fail.
///
/// ```
/// # use comet_plugins::memory::MemoryAuth;
/// let auth = MemoryAuth::from_iter([(1, "k1"), (2, "k2")]);
/// auth.insert(3, "k3");
/// assert_eq!(auth.len(), 3);
/// ```
#[derive(Debug, Default)]
pub struct MemoryAuth {
    keys: RwLock<HashMap<Mid, Box<[u8]>>>,
}

impl MemoryAuth {
    /// Adds or replaces the key of `mid`.
    pub fn insert(&self, mid: Mid, mkey: impl AsRef<[u8]>) {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(mid, mkey.as_ref().into());
    }

    /// Removes `mid`; returns whether it was there.
    pub fn remove(&self, mid: Mid) -> bool {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&mid)
            .is_some()
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn knows(&self, mid: Mid) -> bool {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.contains_key(&mid)
    }

    fn check(&self, mid: Mid, mkey: &[u8]) -> bool {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        match keys.get(&mid) {
            Some(expected) => bool::from(expected.as_ref().ct_eq(mkey)),
            None => false,
        }
    }
}

#[async_trait]
impl UserDirectory for MemoryAuth {
    async fn exists(&self, mid: Mid) -> Result<bool, BoxError> {
        Ok(self.knows(mid))
    }

    fn exists_now(&self, mid: Mid) -> Option<bool> {
        Some(self.knows(mid))
    }
}

impl<K: AsRef<[u8]>> FromIterator<(Mid, K)> for MemoryAuth {
    fn from_iter<I: IntoIterator<Item = (Mid, K)>>(iter: I) -> Self {
        let keys = iter
            .into_iter()
            .map(|(mid, key)| (mid, key.as_ref().into()))
            .collect();
        MemoryAuth {
            keys: RwLock::new(keys),
        }
    }
}

#[async_trait]
impl Authenticator for MemoryAuth {
    async fn authenticate(&self, ctx: &AuthContext) -> Result<AuthOutcome, BoxError> {
        let req = ctx.auth_request();
        let Some(mid) = req.mid() else {
            return Ok(AuthOutcome::Denied("auth body needs an integer mid".into()));
        };
        let Some(mkey) = req.mkey() else {
            return Ok(AuthOutcome::Denied("auth body needs a string mkey".into()));
        };
        Ok(if self.check(mid, mkey.as_bytes()) {
            AuthOutcome::Accepted(Identity::new(mid))
        } else {
            AuthOutcome::Denied("unknown mid or wrong mkey".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comet_core::{AuthRequest, ConnInfo, Transport, WireMode};

    fn conn() -> ConnInfo {
        ConnInfo::new(
            1,
            Transport::Local,
            WireMode::Binary,
            "127.0.0.1:1".parse().unwrap(),
        )
    }

    async fn login(auth: &MemoryAuth, body: &str) -> AuthOutcome {
        let req = AuthRequest::parse(&body.to_owned().into()).unwrap();
        auth.authenticate(&AuthContext::new(req, conn()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn accepts_right_key_and_ignores_extra_fields() {
        let auth = MemoryAuth::from_iter([(7, "seven")]);
        assert!(matches!(
            login(
                &auth,
                r#"{"mid":7,"mkey":"seven","platform":"ios","room_id":"x"}"#
            )
            .await,
            AuthOutcome::Accepted(id) if id.mid == 7
        ));
    }

    #[tokio::test]
    async fn refuses_wrong_key_unknown_mid_and_missing_fields() {
        let auth = MemoryAuth::from_iter([(7, "seven")]);
        for body in [
            r#"{"mid":7,"mkey":"seveN"}"#,
            r#"{"mid":7,"mkey":"seven "}"#,
            r#"{"mid":7,"mkey":""}"#,
            r#"{"mid":8,"mkey":"seven"}"#,
            r#"{"mid":7}"#,
            r#"{"mkey":"seven"}"#,
            r#"{"mid":"7","mkey":"seven"}"#,
            r#"{"mid":4294967303,"mkey":"seven"}"#,
        ] {
            assert!(
                matches!(login(&auth, body).await, AuthOutcome::Denied(r) if !r.is_empty()),
                "{body} must be refused"
            );
        }
        assert!(auth.remove(7));
        assert!(matches!(
            login(&auth, r#"{"mid":7,"mkey":"seven"}"#).await,
            AuthOutcome::Denied(_)
        ));
    }
}
