//! The webhook configurations agentid installs for itself. failurePolicy Fail everywhere: when
//! the webhook cannot answer, AccessGrants and Approvals cannot be created (fail closed).

use k8s_openapi::{
    ByteString,
    api::admissionregistration::v1::{
        MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference, ValidatingWebhook,
        ValidatingWebhookConfiguration, WebhookClientConfig,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
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

    fn client_config(&self, path: &str, ca_pem: &str) -> WebhookClientConfig {
        let ca_bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
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

fn meta() -> ObjectMeta {
    ObjectMeta {
        name: Some(CONFIGURATION_NAME.into()),
        labels: Some([(names::MANAGED_BY_LABEL.to_string(), names::MANAGED_BY.to_string())].into()),
        ..Default::default()
    }
}

/// The mutating configuration: record the requester and the approver's groups on CREATE.
pub fn mutating(endpoint: &Endpoint, ca_pem: &str) -> MutatingWebhookConfiguration {
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
        ]),
    }
}

/// The validating configuration: check grants and Approvals on CREATE and UPDATE.
pub fn validating(endpoint: &Endpoint, ca_pem: &str) -> ValidatingWebhookConfiguration {
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
        let v = validating(&e, "CA");
        let hooks = v.webhooks.unwrap_or_default();
        assert_eq!(hooks[0].client_config.url.as_deref(), Some("https://127.0.0.1:9443/validate"));
        assert!(hooks.iter().all(|h| h.failure_policy.as_deref() == Some("Fail")));
        assert_eq!(Endpoint::Url("https://[::1]:8443/".into()).hosts(), vec!["::1"]);
        assert_eq!(Endpoint::Url("https://agentid.example:8443".into()).hosts(), vec!["agentid.example"]);
    }

    #[test]
    fn status_subresource_is_not_intercepted() {
        let m = mutating(&Endpoint::Url("https://127.0.0.1:1".into()), "CA");
        for hook in m.webhooks.unwrap_or_default() {
            for rule in hook.rules.unwrap_or_default() {
                assert!(rule.resources.unwrap_or_default().iter().all(|r| !r.contains('/')));
            }
        }
    }
}
