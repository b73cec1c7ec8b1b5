//! The agentid custom resources: `AgentIdentity`, `AccessGrant` and `Approval`
//! (group `agentid.dev`, version `v1alpha1`).
//!
//! Types and their schemas only; no client code. Rules that concern a single object are CEL
//! validations in the schema, so the apiserver refuses bad input before agentid ever sees it.

// kube's `printcolumn(type_ = ...)` repeats keys that clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
mod approval;
pub mod duration;
#[allow(clippy::duplicated_attributes)]
mod grant;
#[allow(clippy::duplicated_attributes)]
mod identity;

pub use approval::{Approval, ApprovalSpec, ApprovalStatus, Decision};
pub use grant::{
    AccessGrant, AccessGrantSpec, AccessGrantStatus, ApprovalRecord, GrantPhase, KubernetesAccess, KubernetesRule,
};
pub use identity::{
    AgentIdentity, AgentIdentitySpec, AgentIdentityStatus, ApprovalPolicy, Approvers, ExposureSummary,
    ProtectedResource,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every agentid kind.
pub const GROUP: &str = "agentid.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get` category that lists every agentid kind.
pub const CATEGORY: &str = "agentid";

/// Every CRD agentid installs, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![AgentIdentity::crd(), AccessGrant::crd(), Approval::crd()]
}

/// The file under `crds/` that holds a CRD: `<plural>.<group>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// A CRD as the YAML document written to `crds/` and printed by `agentid crd`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::SerializeError> {
    Ok(format!("---\n{}", serde_saphyr::to_string(crd)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crd_is_namespaced_in_the_agentid_group_and_category() {
        for crd in crds() {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.names.categories.as_deref(), Some(&[CATEGORY.to_string()][..]));
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, VERSION);
            assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        }
    }

    #[test]
    fn short_names_do_not_use_generic_words() {
        // Other projects ship kinds named AccessGrant and Approval; generic short names such as
        // `ag` or `approval` would make `kubectl get` ambiguous on a cluster that has them.
        for crd in crds() {
            for short in crd.spec.names.short_names.unwrap_or_default() {
                assert!(!["ag", "grant", "approval", "identity", "id"].contains(&short.as_str()));
            }
        }
    }
}
