//! Names and labels of the objects agentid makes. Deterministic, so that a repeated or resumed
//! reconcile finds the objects an earlier one made instead of making a second set.

use std::collections::BTreeMap;

/// `app.kubernetes.io/managed-by` on everything agentid makes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "agentid";
/// The UID of the grant an object belongs to: the key for revocation and orphan sweeps.
pub const GRANT_UID_LABEL: &str = "agentid.dev/grant-uid";
/// The name of the grant an object belongs to (grant names are at most 63 characters).
pub const GRANT_LABEL: &str = "agentid.dev/grant";
/// The namespace of the grant an object belongs to.
pub const GRANT_NAMESPACE_LABEL: &str = "agentid.dev/grant-namespace";
/// The identity an object belongs to; also the pod label the injection webhook reads.
pub const IDENTITY_LABEL: &str = "agentid.dev/identity";
/// `base` for an identity's own objects, `grant` for a grant's.
pub const COMPONENT_LABEL: &str = "agentid.dev/component";

/// On an AccessGrant that is settled (ended, its revocation finished: `decide::settled`): the
/// operator's grant watch leaves such grants out, so that the tens of thousands that ended long
/// ago are neither held in memory nor listed at start-up. Admission refuses it on any other.
pub const SETTLED_LABEL: &str = "agentid.dev/settled";

/// The label selector of the grants the operator watches: those not settled.
pub fn unsettled_grants_selector() -> String {
    format!("{SETTLED_LABEL}!=true")
}

/// On a grant's ServiceAccount: the end of the credential being issued (RFC 3339, whole seconds),
/// written when the ServiceAccount is made, before any token exists. It is the record of an
/// issuance until status shows it: a crash before then resumes with this end instead of starting
/// a second credential. Never trusted beyond the ServiceAccount's creation time plus the grant's
/// duration (no requester can set that time), and read only while status records no `expiresAt`.
pub const EXPIRES_AT_ANNOTATION: &str = "agentid.dev/expires-at";

/// The end recorded on a grant's ServiceAccount (see [`EXPIRES_AT_ANNOTATION`]), if `meta` is one
/// made for the grant with uid `grant_uid` and its record parses.
pub fn recorded_expiry(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    grant_uid: &str,
) -> Option<jiff::Timestamp> {
    let labelled = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(GRANT_UID_LABEL))
        .is_some_and(|u| !grant_uid.is_empty() && u == grant_uid);
    labelled.then(|| meta.annotations.as_ref()?.get(EXPIRES_AT_ANNOTATION)?.parse().ok()).flatten()
}

/// The field manager of every server-side apply agentid makes.
pub const FIELD_MANAGER: &str = "agentid";
/// Finalizer on grants: the credential is revoked before the grant disappears.
pub const GRANT_FINALIZER: &str = "agentid.dev/revoke";
/// Finalizer on identities: every grant is revoked before the identity disappears.
pub const IDENTITY_FINALIZER: &str = "agentid.dev/revoke-grants";

/// The identity's base ServiceAccount: `agentid-<identity>`.
pub fn identity_service_account(identity: &str) -> String {
    format!("agentid-{identity}")
}

/// The identity's credentials Secret, mounted into its pods: `agentid-<identity>-credentials`.
pub fn identity_credentials_secret(identity: &str) -> String {
    format!("agentid-{identity}-credentials")
}

/// The identity whose credentials Secret `secret` is named as (a name tells which Secrets are
/// agentid's to a reader of findings; it proves nothing, and nothing is exempted by it).
pub fn credentials_secret_identity(secret: &str) -> Option<&str> {
    secret
        .strip_prefix("agentid-")?
        .strip_suffix("-credentials")
        .filter(|s| !s.is_empty() && *s != "grant" && !s.starts_with("grant-"))
}

/// How the objects of a grant are named: [`grant_object_name`].
pub const GRANT_OBJECT_PREFIX: &str = "agentid-grant-";

/// The Role (and RoleBinding) letting the base ServiceAccount request grants.
pub fn identity_requester_role(identity: &str) -> String {
    format!("agentid-{identity}-requester")
}

/// The name shared by a grant's ServiceAccount, Secret, Roles and RoleBindings:
/// `agentid-grant-<grant>-<first 8 of uid>`. The UID part makes a grant recreated under the same
/// name get fresh objects, and keeps grants of equal names from other namespaces apart in a
/// shared target namespace. (Identities may not be named `grant-…`, so no identity collides.)
pub fn grant_object_name(grant: &str, uid: &str) -> String {
    let short: String = uid.chars().filter(|c| *c != '-').take(8).collect();
    format!("{GRANT_OBJECT_PREFIX}{grant}-{short}")
}

/// The key prefix of a grant's entries in its identity's credentials Secret: `<grant>.`.
pub fn identity_secret_key(grant: &str, key: &str) -> String {
    format!("{grant}.{key}")
}

/// Labels for an identity's own objects.
pub fn identity_labels(identity: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (IDENTITY_LABEL.to_string(), identity.to_string()),
        (COMPONENT_LABEL.to_string(), "base".to_string()),
    ])
}

/// Labels for a grant's objects.
pub fn grant_labels(grant_namespace: &str, grant: &str, uid: &str, identity: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (IDENTITY_LABEL.to_string(), identity.to_string()),
        (COMPONENT_LABEL.to_string(), "grant".to_string()),
        (GRANT_LABEL.to_string(), grant.to_string()),
        (GRANT_NAMESPACE_LABEL.to_string(), grant_namespace.to_string()),
        (GRANT_UID_LABEL.to_string(), uid.to_string()),
    ])
}

/// Whether `owner` is an AgentIdentity of agentid's API group.
pub fn is_identity_owner(owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference) -> bool {
    owner.kind == "AgentIdentity" && agentid_api_version(&owner.api_version)
}

/// Whether an existing object is owned by the agentid object `kind`/`name` (an AgentIdentity or an
/// AccessGrant). agentid never adopts an object it did not make: a pre-existing ServiceAccount of
/// the same name could hold privileges, or a pre-existing Secret could be readable by others.
pub fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, kind: &str, name: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == kind && o.name == name && agentid_api_version(&o.api_version))
}

/// Whether `api_version` (`GROUP/VERSION`) is of agentid's API group — exactly, not by prefix:
/// `agentid.dev.example.com/v1` is someone else's.
pub fn agentid_api_version(api_version: &str) -> bool {
    api_version.split_once('/').map(|(group, _)| group) == Some(crate::api::GROUP)
}

/// Selects every grant object agentid made, in any namespace.
pub fn all_grants_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{COMPONENT_LABEL}=grant")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credentials_secret_name_tells_its_identity() {
        assert_eq!(credentials_secret_identity(&identity_credentials_secret("fixer")), Some("fixer"));
        assert_eq!(credentials_secret_identity("agentid--credentials"), None);
        assert_eq!(credentials_secret_identity("agentid-grant-credentials"), None);
        assert_eq!(credentials_secret_identity("agentid-grant-g-1234abcd"), None);
        assert_eq!(credentials_secret_identity("db-credentials"), None);
    }

    #[test]
    fn grant_objects_are_named_by_grant_and_uid() {
        let name = grant_object_name("cleanup-volume", "0b6f7c3e-5d8a-4f1e-9c2b-7a1d3e5f9b80");
        assert_eq!(name, "agentid-grant-cleanup-volume-0b6f7c3e");
        // Longest grant name still makes a valid DNS subdomain / label-free object name.
        assert!(grant_object_name(&"g".repeat(63), "0b6f7c3e-5d8a").len() <= 253);
    }

    #[test]
    fn identity_and_grant_names_cannot_collide() {
        // Identity names may not start with "grant-" (schema rule), so their SA never has the
        // grant prefix.
        assert!(!identity_service_account("fixer").starts_with("agentid-grant-"));
    }

    #[test]
    fn only_objects_owned_by_the_named_agentid_object_count_as_ours() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
        let owner = |kind: &str, name: &str, api: &str| OwnerReference {
            api_version: api.into(),
            kind: kind.into(),
            name: name.into(),
            uid: "u".into(),
            ..Default::default()
        };
        let meta = |refs: Vec<OwnerReference>| ObjectMeta { owner_references: Some(refs), ..Default::default() };
        assert!(owned_by(
            &meta(vec![owner("AgentIdentity", "fixer", "agentid.dev/v1alpha1")]),
            "AgentIdentity",
            "fixer"
        ));
        assert!(!owned_by(
            &meta(vec![owner("AgentIdentity", "other", "agentid.dev/v1alpha1")]),
            "AgentIdentity",
            "fixer"
        ));
        assert!(!owned_by(&meta(vec![owner("AgentIdentity", "fixer", "example.com/v1")]), "AgentIdentity", "fixer"));
        // A group that only starts like agentid's is someone else's.
        let lookalike = meta(vec![owner("AgentIdentity", "fixer", "agentid.dev.example.com/v1")]);
        assert!(!owned_by(&lookalike, "AgentIdentity", "fixer"));
        assert!(!agentid_api_version("agentid.dev") && agentid_api_version("agentid.dev/v1"));
        assert!(!owned_by(&ObjectMeta::default(), "AgentIdentity", "fixer"));
    }
}
