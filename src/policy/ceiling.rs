//! The identity's ceiling: what any grant of an identity may ask for at most.

use std::time::Duration;

use jiff::Timestamp;

use super::install::Installation;
use crate::api::{AccessGrantSpec, AgentIdentity, duration};

/// A ceiling the grant breaks. Each maps to a condition reason and a message naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// `spec.identity` names no AgentIdentity in the grant's namespace.
    #[error("AgentIdentity {0:?} does not exist in this namespace")]
    IdentityNotFound(String),
    /// The identity's kill switch is on.
    #[error("AgentIdentity {0:?} is suspended")]
    IdentitySuspended(String),
    /// The identity's retireAt has passed.
    #[error("AgentIdentity {0:?} retired at {1}")]
    IdentityRetired(String, Timestamp),
    /// The grant's duration exceeds the identity's maxGrantDuration.
    #[error("duration {requested} exceeds the identity's maxGrantDuration {max}")]
    DurationOverCeiling {
        /// The grant's duration, as written.
        requested: String,
        /// The identity's ceiling, as written.
        max: String,
    },
    /// A rule targets a namespace the identity does not allow.
    #[error("namespace {namespace:?} is not in the identity's allowedNamespaces {allowed:?}")]
    NamespaceNotAllowed {
        /// The namespace of the offending rule.
        namespace: String,
        /// The identity's allowedNamespaces.
        allowed: Vec<String>,
    },
    /// A duration string that the schema should have refused.
    #[error("{0}")]
    InvalidDuration(#[from] duration::Error),
    /// The grant carries no kind of access.
    #[error("the grant has no spec.kubernetes rules")]
    NoAccess,
    /// The identity lives or reaches outside the namespaces this installation serves.
    #[error("{0}")]
    OutsideInstallation(String),
    /// The identity already holds as many credentials as the installation allows one identity.
    #[error(
        "AgentIdentity {identity:?} already holds {held} active grant(s), the most this installation allows one identity (--max-active-grants-per-identity={limit}): let one end or delete one, then ask again"
    )]
    TooManyActiveGrants {
        /// The identity.
        identity: String,
        /// How many grants it holds (or is being issued).
        held: usize,
        /// The cap.
        limit: usize,
    },
}

impl Violation {
    /// The condition reason (CamelCase) for this violation.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::IdentityNotFound(_) => "IdentityNotFound",
            Self::IdentitySuspended(_) => "IdentitySuspended",
            Self::IdentityRetired(..) => "IdentityRetired",
            Self::DurationOverCeiling { .. } => "DurationOverCeiling",
            Self::NamespaceNotAllowed { .. } => "NamespaceNotAllowed",
            Self::InvalidDuration(_) => "InvalidDuration",
            Self::NoAccess => "NoAccess",
            Self::OutsideInstallation(_) => "OutsideInstallation",
            Self::TooManyActiveGrants { .. } => "TooManyActiveGrants",
        }
    }
}

/// Whether the identity may hold credentials at all right now (inside the installation, not
/// suspended, not retired).
pub fn identity_usable(identity: &AgentIdentity, installation: &Installation, now: Timestamp) -> Result<(), Violation> {
    let name = identity.metadata.name.clone().unwrap_or_default();
    let home = identity.metadata.namespace.clone().unwrap_or_default();
    installation.check_identity(&home, &identity.spec.allowed_namespaces).map_err(Violation::OutsideInstallation)?;
    if identity.spec.suspended {
        return Err(Violation::IdentitySuspended(name));
    }
    if let Some(retire_at) = &identity.spec.retire_at
        && retire_at.0 <= now
    {
        return Err(Violation::IdentityRetired(name, retire_at.0));
    }
    Ok(())
}

/// Checks a grant against its identity's ceiling; on success returns the grant's duration.
pub fn check(
    identity: &AgentIdentity,
    grant: &AccessGrantSpec,
    installation: &Installation,
    now: Timestamp,
) -> Result<Duration, Violation> {
    identity_usable(identity, installation, now)?;
    let requested = duration::parse(&grant.duration)?;
    let max = duration::parse(&identity.spec.max_grant_duration)?;
    if requested > max || requested > duration::MAX_GRANT {
        return Err(Violation::DurationOverCeiling {
            requested: grant.duration.clone(),
            max: identity.spec.max_grant_duration.clone(),
        });
    }
    let rules = grant.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default();
    if rules.is_empty() {
        return Err(Violation::NoAccess);
    }
    for rule in rules {
        if !identity.spec.allowed_namespaces.contains(&rule.namespace) {
            return Err(Violation::NamespaceNotAllowed {
                namespace: rule.namespace.clone(),
                allowed: identity.spec.allowed_namespaces.clone(),
            });
        }
    }
    Ok(requested)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{grant_spec, identity};

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().expect("valid timestamp")
    }

    #[test]
    fn within_the_ceiling_returns_the_duration() {
        let id = identity("fixer", &["staging"]);
        assert_eq!(
            check(&id, &grant_spec("15m", "staging"), &Installation::ANYWHERE, now()),
            Ok(Duration::from_secs(900))
        );
        assert_eq!(
            check(&id, &grant_spec("1h", "staging"), &Installation::ANYWHERE, now()),
            Ok(Duration::from_secs(3600))
        );
    }

    #[test]
    fn over_the_duration_ceiling() {
        let id = identity("fixer", &["staging"]);
        let err = check(&id, &grant_spec("2h", "staging"), &Installation::ANYWHERE, now()).unwrap_err();
        assert_eq!(err.reason(), "DurationOverCeiling");
        assert_eq!(err.to_string(), "duration 2h exceeds the identity's maxGrantDuration 1h");
    }

    #[test]
    fn namespace_outside_allowed() {
        let id = identity("fixer", &["staging"]);
        let err = check(&id, &grant_spec("15m", "production"), &Installation::ANYWHERE, now()).unwrap_err();
        assert_eq!(err.reason(), "NamespaceNotAllowed");
        assert!(err.to_string().contains("\"production\""));
    }

    #[test]
    fn no_allowed_namespaces_allows_nothing() {
        let id = identity("fixer", &[]);
        assert_eq!(
            check(&id, &grant_spec("15m", "staging"), &Installation::ANYWHERE, now()).unwrap_err().reason(),
            "NamespaceNotAllowed"
        );
    }

    #[test]
    fn suspended_and_retired_identities_get_nothing() {
        let mut id = identity("fixer", &["staging"]);
        id.spec.suspended = true;
        assert_eq!(
            check(&id, &grant_spec("15m", "staging"), &Installation::ANYWHERE, now()).unwrap_err().reason(),
            "IdentitySuspended"
        );
        let mut id = identity("fixer", &["staging"]);
        id.spec.retire_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        assert_eq!(
            check(&id, &grant_spec("15m", "staging"), &Installation::ANYWHERE, now()).unwrap_err().reason(),
            "IdentityRetired"
        );
        let mut id = identity("fixer", &["staging"]);
        let later = now().checked_add(jiff::SignedDuration::from_secs(1)).expect("in range");
        id.spec.retire_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(later));
        assert!(check(&id, &grant_spec("15m", "staging"), &Installation::ANYWHERE, now()).is_ok());
    }

    #[test]
    fn an_identity_outside_the_installation_gets_nothing() {
        let install = Installation { agent_namespaces: vec![], target_namespaces: vec!["staging".into()] };
        let id = identity("fixer", &["staging", "production"]);
        let err = check(&id, &grant_spec("15m", "staging"), &install, now()).unwrap_err();
        assert_eq!(err.reason(), "OutsideInstallation");
        assert!(err.to_string().contains("[\"production\"] are outside"), "{err}");
        let id = identity("fixer", &["staging"]);
        assert!(check(&id, &grant_spec("15m", "staging"), &install, now()).is_ok());
    }

    #[test]
    fn malformed_durations_fail_closed() {
        let id = identity("fixer", &["staging"]);
        assert_eq!(
            check(&id, &grant_spec("forever", "staging"), &Installation::ANYWHERE, now()).unwrap_err().reason(),
            "InvalidDuration"
        );
        let mut id = identity("fixer", &["staging"]);
        id.spec.max_grant_duration = "lots".into();
        assert_eq!(
            check(&id, &grant_spec("15m", "staging"), &Installation::ANYWHERE, now()).unwrap_err().reason(),
            "InvalidDuration"
        );
    }
}
