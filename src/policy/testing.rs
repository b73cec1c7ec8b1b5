//! Fixtures for the policy unit tests.

use kube::api::ObjectMeta;

use crate::api::{
    AccessGrant, AccessGrantSpec, AgentIdentity, AgentIdentitySpec, ApprovalPolicy, KubernetesAccess, KubernetesRule,
};

pub fn identity(name: &str, allowed: &[&str]) -> AgentIdentity {
    let mut id = AgentIdentity::new(
        name,
        AgentIdentitySpec {
            owner: "platform-team".into(),
            purpose: "tests".into(),
            max_grant_duration: "1h".into(),
            allowed_namespaces: allowed.iter().map(|s| s.to_string()).collect(),
            approval: ApprovalPolicy::default(),
            suspended: false,
            enforce: false,
            retire_at: None,
        },
    );
    id.metadata.namespace = Some("agents".into());
    id.metadata.uid = Some(format!("uid-{name}"));
    id
}

pub fn rule(namespace: &str, group: &str, resource: &str, verb: &str) -> KubernetesRule {
    KubernetesRule {
        namespace: namespace.into(),
        api_groups: vec![group.into()],
        resources: vec![resource.into()],
        verbs: vec![verb.into()],
        resource_names: vec![],
    }
}

pub fn grant_spec(duration: &str, namespace: &str) -> AccessGrantSpec {
    AccessGrantSpec {
        identity: "fixer".into(),
        duration: duration.into(),
        reason: "tests".into(),
        kubernetes: Some(KubernetesAccess { rules: vec![rule(namespace, "", "pods", "get")] }),
    }
}

pub fn grant(name: &str, identity: &str, duration: &str, rules: Vec<KubernetesRule>) -> AccessGrant {
    let mut g = AccessGrant::new(
        name,
        AccessGrantSpec {
            identity: identity.into(),
            duration: duration.into(),
            reason: "tests".into(),
            kubernetes: Some(KubernetesAccess { rules }),
        },
    );
    g.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some("agents".into()),
        uid: Some(format!("uid-{name}")),
        ..Default::default()
    };
    g
}
