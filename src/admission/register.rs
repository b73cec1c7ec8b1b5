//! The webhook configurations agentid installs for itself. failurePolicy Fail everywhere: when
//! the webhook cannot answer, AccessGrants and Approvals cannot be created (fail closed).

use k8s_openapi::{
    ByteString,
    api::admissionregistration::v1::{
        MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference, ValidatingWebhook,
        ValidatingWebhookConfiguration, WebhookClientConfig,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
};

use crate::policy::names;

/// Where the apiserver reaches the webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A URL (for an operator running outside the cluster, e.g. on 127.0.0.1).
    Url(String),
    /// A Service in the cluster: namespace, name, port.
    Service {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
        /// The Service's port.
        port: i32,
    },
}

impl Endpoint {
    /// The host names or IPs the serving certificate must carry.
    pub fn hosts(&self) -> Vec<String> {
        match self {
            Self::Url(url) => {
                let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
                let authority = rest.split('/').next().unwrap_or(rest);
                let host = match authority.strip_prefix('[') {
                    Some(v6) => v6.split(']').next().unwrap_or(v6),
                    None => authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority),
                };
                vec![host.to_string()]
            }
            Self::Service { namespace, name, .. } => vec![
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.cluster.local"),
                format!("{name}.{namespace}"),
            ],
        }
    }

    fn client_config(&self, path: &str, ca_pem: Option<&str>) -> WebhookClientConfig {
        let ca_bundle = ca_pem.map(|pem| ByteString(pem.as_bytes().to_vec()));
        match self {
            Self::Url(url) => WebhookClientConfig {
                url: Some(format!("{}{path}", url.trim_end_matches('/'))),
                ca_bundle,
                service: None,
            },
            Self::Service { namespace, name, port } => WebhookClientConfig {
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(path.into()),
                    port: Some(*port),
                }),
                ca_bundle,
                url: None,
            },
        }
    }
}

/// The name of both webhook configurations.
pub const CONFIGURATION_NAME: &str = "agentid";

fn rule(resource: &str, operations: &[&str]) -> RuleWithOperations {
    RuleWithOperations {
        api_groups: Some(vec![crate::api::GROUP.into()]),
        api_versions: Some(vec![crate::api::VERSION.into()]),
        resources: Some(vec![resource.into()]),
        operations: Some(operations.iter().map(|o| o.to_string()).collect()),
        scope: Some("Namespaced".into()),
    }
}

fn pod_rule(resources: &[&str], operations: &[&str]) -> RuleWithOperations {
    RuleWithOperations {
        api_groups: Some(vec!["".into()]),
        api_versions: Some(vec!["v1".into()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        operations: Some(operations.iter().map(|o| o.to_string()).collect()),
        scope: Some("Namespaced".into()),
    }
}

fn workload_rule(group: &str, resources: &[&str]) -> RuleWithOperations {
    RuleWithOperations {
        api_groups: Some(vec![group.into()]),
        api_versions: Some(vec!["v1".into()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
        scope: Some("Namespaced".into()),
    }
}

/// Namespaces whose pods agentid never blocks: kube-system and agentid's own (so that agentid can
/// always start, even when its webhook is down).
pub fn exempt_namespaces(own: Option<&str>) -> LabelSelector {
    let mut values = vec!["kube-system".to_string()];
    values.extend(own.map(str::to_string));
    LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "NotIn".into(),
            values: Some(values),
        }]),
        match_labels: None,
    }
}

fn labelled_for_an_identity() -> LabelSelector {
    LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: names::IDENTITY_LABEL.into(),
            operator: "Exists".into(),
            values: None,
        }]),
        match_labels: None,
    }
}

/// Only the name: the Helm chart creates these objects and owns their labels (Helm's
/// `app.kubernetes.io/managed-by: Helm`); agentid fills in the webhooks.
fn meta() -> ObjectMeta {
    ObjectMeta { name: Some(CONFIGURATION_NAME.into()), ..Default::default() }
}

/// The mutating configuration: record the requester and the approver's groups on CREATE, and
/// give pods labelled for an identity that identity's ServiceAccount and credentials.
pub fn mutating(
    endpoint: &Endpoint,
    ca_pem: Option<&str>,
    own_namespace: Option<&str>,
) -> MutatingWebhookConfiguration {
    let hook = |name: &str, resource: &str| MutatingWebhook {
        name: name.into(),
        client_config: endpoint.client_config("/mutate", ca_pem),
        rules: Some(vec![rule(resource, &["CREATE"])]),
        failure_policy: Some("Fail".into()),
        side_effects: "None".into(),
        admission_review_versions: vec!["v1".into()],
        timeout_seconds: Some(10),
        reinvocation_policy: Some("IfNeeded".into()),
        ..Default::default()
    };
    MutatingWebhookConfiguration {
        metadata: meta(),
        webhooks: Some(vec![
            hook("accessgrants.agentid.dev", "accessgrants"),
            hook("approvals.agentid.dev", "approvals"),
            MutatingWebhook {
                rules: Some(vec![pod_rule(&["pods"], &["CREATE"])]),
                // Only labelled pods pay for the call; the validating hook sees every pod.
                object_selector: Some(labelled_for_an_identity()),
                namespace_selector: Some(exempt_namespaces(own_namespace)),
                ..hook("pods.agentid.dev", "pods")
            },
        ]),
    }
}

/// The validating configuration: check grants and Approvals on CREATE and UPDATE, and that no
/// pod borrows an identity's or a grant's ServiceAccount or Secret.
pub fn validating(
    endpoint: &Endpoint,
    ca_pem: Option<&str>,
    own_namespace: Option<&str>,
) -> ValidatingWebhookConfiguration {
    let hook = |name: &str, resource: &str| ValidatingWebhook {
        name: name.into(),
        client_config: endpoint.client_config("/validate", ca_pem),
        rules: Some(vec![rule(resource, &["CREATE", "UPDATE"])]),
        failure_policy: Some("Fail".into()),
        side_effects: "None".into(),
        admission_review_versions: vec!["v1".into()],
        timeout_seconds: Some(10),
        ..Default::default()
    };
    ValidatingWebhookConfiguration {
        metadata: meta(),
        webhooks: Some(vec![
            hook("accessgrants.agentid.dev", "accessgrants"),
            hook("approvals.agentid.dev", "approvals"),
            hook("agentidentities.agentid.dev", "agentidentities"),
            ValidatingWebhook {
                rules: Some(vec![pod_rule(&["pods", "pods/ephemeralcontainers"], &["CREATE", "UPDATE"])]),
                namespace_selector: Some(exempt_namespaces(own_namespace)),
                ..hook("pods.agentid.dev", "pods")
            },
            ValidatingWebhook {
                rules: Some(vec![
                    workload_rule("apps", &["deployments", "statefulsets", "daemonsets", "replicasets"]),
                    workload_rule("batch", &["jobs", "cronjobs"]),
                    pod_rule(&["replicationcontrollers"], &["CREATE", "UPDATE"]),
                ]),
                namespace_selector: Some(exempt_namespaces(own_namespace)),
                ..hook("workloads.agentid.dev", "pods")
            },
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts_and_paths() {
        let e = Endpoint::Url("https://127.0.0.1:9443".into());
        assert_eq!(e.hosts(), vec!["127.0.0.1"]);
        let v = validating(&e, Some("CA"), None);
        let hooks = v.webhooks.unwrap_or_default();
        assert_eq!(hooks[0].client_config.url.as_deref(), Some("https://127.0.0.1:9443/validate"));
        assert!(hooks.iter().all(|h| h.failure_policy.as_deref() == Some("Fail")));
        assert_eq!(Endpoint::Url("https://[::1]:8443/".into()).hosts(), vec!["::1"]);
        assert_eq!(Endpoint::Url("https://agentid.example:8443".into()).hosts(), vec!["agentid.example"]);
    }

    #[test]
    fn pod_hooks_spare_kube_system_and_agentids_namespace() {
        let v = validating(&Endpoint::Url("https://127.0.0.1:1".into()), Some("CA"), Some("agentid-system"));
        let pods = v.webhooks.unwrap_or_default().into_iter().find(|h| h.name == "pods.agentid.dev").expect("pod hook");
        let exempt = pods.namespace_selector.and_then(|s| s.match_expressions).expect("selector")[0].values.clone();
        assert_eq!(exempt, Some(vec!["kube-system".to_string(), "agentid-system".to_string()]));
        assert_eq!(pods.failure_policy.as_deref(), Some("Fail"));
        let m = mutating(&Endpoint::Url("https://127.0.0.1:1".into()), Some("CA"), None);
        let pods = m.webhooks.unwrap_or_default().into_iter().find(|h| h.name == "pods.agentid.dev").expect("pod hook");
        assert!(pods.object_selector.is_some(), "only labelled pods are mutated");
    }

    #[test]
    fn status_subresource_is_not_intercepted() {
        let m = mutating(&Endpoint::Url("https://127.0.0.1:1".into()), Some("CA"), None);
        for hook in m.webhooks.unwrap_or_default().into_iter().filter(|h| h.name != "pods.agentid.dev") {
            for rule in hook.rules.unwrap_or_default() {
                assert!(rule.resources.unwrap_or_default().iter().all(|r| !r.contains('/')));
            }
        }
    }
}
