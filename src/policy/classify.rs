//! What needs a human: the classification of a grant's rules (DESIGN.md, "How a grant flows",
//! step 3). Fail closed: whatever this module cannot place needs approval.

use std::fmt;

use crate::api::{KubernetesRule, ProtectedResource};

/// Why a grant needs a human's approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// Deletes, or writes to RBAC, Secrets, admission, CRDs, namespaces, volumes, agentid's kinds.
    Destructive,
    /// Yields more privilege or credentials: wildcards, escalate/bind/impersonate, pod creation,
    /// exec/attach/port-forward, ServiceAccount tokens, node proxy.
    Escalation,
    /// Reads Secrets.
    Sensitive,
    /// A resource the identity or the cluster policy marks protected.
    Protected,
    /// A verb, or a write to a resource, that agentid does not know.
    Unknown,
}

impl Category {
    /// The word used in approval reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Destructive => "destructive",
            Self::Escalation => "escalation",
            Self::Sensitive => "sensitive",
            Self::Protected => "protected",
            Self::Unknown => "unknown",
        }
    }
}

/// One reason a grant needs approval, e.g. "destructive: delete persistentvolumeclaims/db-volume in staging".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reason {
    /// The kind of risk.
    pub category: Category,
    /// The verb that carries it.
    pub verb: String,
    /// `resource[.group][/name,…]`, as a reviewer reads it.
    pub target: String,
    /// The namespace of the rule.
    pub namespace: String,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {} in {}", self.category.as_str(), self.verb, self.target, self.namespace)
    }
}

const READ_VERBS: &[&str] = &["get", "list", "watch"];
const WRITE_VERBS: &[&str] = &["create", "update", "patch"];
const DELETE_VERBS: &[&str] = &["delete", "deletecollection"];
const ESCALATION_VERBS: &[&str] = &["escalate", "bind", "impersonate"];

/// API groups where any write is destructive.
const DESTRUCTIVE_GROUPS: &[&str] =
    &["rbac.authorization.k8s.io", "admissionregistration.k8s.io", "apiextensions.k8s.io", crate::api::GROUP];

/// Core resources where any write is destructive.
const DESTRUCTIVE_CORE: &[&str] = &["secrets", "namespaces", "persistentvolumeclaims", "persistentvolumes"];

/// Resources (any verb) that hand out a shell, a tunnel, a token or a node.
const ESCALATION_RESOURCES: &[(&str, &str)] = &[
    ("", "pods/exec"),
    ("", "pods/attach"),
    ("", "pods/portforward"),
    ("", "serviceaccounts/token"),
    ("", "nodes/proxy"),
    ("", "pods/proxy"),
    ("", "services/proxy"),
];

/// Workloads: whoever writes them decides what pods run, and as which ServiceAccount.
const WORKLOADS: &[(&str, &str)] = &[
    ("", "replicationcontrollers"),
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("apps", "daemonsets"),
    ("apps", "replicasets"),
    ("batch", "jobs"),
    ("batch", "cronjobs"),
];

/// Resources whose routine writes need no approval. Writes to anything else need one.
const ROUTINE_WRITES: &[(&str, &str)] = &[
    ("", "configmaps"),
    ("", "events"),
    ("", "serviceaccounts"),
    ("", "replicationcontrollers"),
    ("", "replicationcontrollers/scale"),
    ("", "limitranges"),
    ("", "resourcequotas"),
    ("apps", "deployments"),
    ("apps", "deployments/scale"),
    ("apps", "statefulsets"),
    ("apps", "statefulsets/scale"),
    ("apps", "daemonsets"),
    ("apps", "replicasets"),
    ("apps", "replicasets/scale"),
    ("batch", "jobs"),
    ("batch", "cronjobs"),
    ("autoscaling", "horizontalpodautoscalers"),
    ("policy", "poddisruptionbudgets"),
    ("networking.k8s.io", "ingresses"),
    ("networking.k8s.io", "networkpolicies"),
    ("coordination.k8s.io", "leases"),
    ("events.k8s.io", "events"),
];

/// Classifies one (group, resource, verb) of a rule; `None` when it needs no approval.
fn classify_one(group: &str, resource: &str, verb: &str) -> Option<Category> {
    // Any wildcard, including `*/exec` (that subresource of every resource) and `pods/*`.
    if group == "*" || verb == "*" || resource.contains('*') {
        return Some(Category::Escalation);
    }
    let base = resource.split('/').next().unwrap_or(resource);
    if ESCALATION_VERBS.contains(&verb) || ESCALATION_RESOURCES.contains(&(group, resource)) {
        return Some(Category::Escalation);
    }
    if DELETE_VERBS.contains(&verb) || (group.is_empty() && resource == "pods/eviction") {
        return Some(Category::Destructive);
    }
    if READ_VERBS.contains(&verb) {
        return (group.is_empty() && base == "secrets").then_some(Category::Sensitive);
    }
    if !WRITE_VERBS.contains(&verb) {
        // approve, sign, use, proxy, or anything else RBAC may grow: fail closed.
        return Some(Category::Unknown);
    }
    if DESTRUCTIVE_GROUPS.contains(&group) || (group.is_empty() && DESTRUCTIVE_CORE.contains(&base)) {
        return Some(Category::Destructive);
    }
    // Creating or changing a pod runs code as that pod's ServiceAccount; an ephemeral container
    // or a new image does the same.
    if group.is_empty() && base == "pods" {
        return Some(Category::Escalation);
    }
    if ROUTINE_WRITES.contains(&(group, resource)) {
        return None;
    }
    Some(Category::Unknown)
}

fn target(group: &str, resource: &str, names: &[String]) -> String {
    let (base, sub) = match resource.split_once('/') {
        Some((base, sub)) => (base, Some(sub)),
        None => (resource, None),
    };
    let mut out = base.to_string();
    if !group.is_empty() {
        out.push('.');
        out.push_str(group);
    }
    if !names.is_empty() {
        out.push('/');
        out.push_str(&names.join(","));
    }
    if let Some(sub) = sub {
        out.push_str(&format!(" ({sub})"));
    }
    out
}

/// Whether a rule's (group, resource) in `namespace`, limited to `names` (empty: all), can touch
/// a protected resource.
fn touches(p: &ProtectedResource, group: &str, resource: &str, names: &[String], namespace: &str) -> bool {
    let base = resource.split('/').next().unwrap_or(resource);
    let group_matches = group == "*" || group == p.api_group;
    let resource_matches = resource == "*" || base == p.resource || resource == p.resource;
    let namespace_matches = p.namespaces.is_empty() || p.namespaces.iter().any(|n| n == namespace);
    let names_match =
        p.resource_names.is_empty() || names.is_empty() || names.iter().any(|n| p.resource_names.contains(n));
    group_matches && resource_matches && namespace_matches && names_match
}

/// Every reason the rules need approval, sorted and without repeats. Empty: issue at once.
/// `protected` holds what the identity and the cluster policy mark protected; `home` is the
/// grant's own namespace, where the identities live: a pod written there may carry any identity's
/// label, so workload writes there are escalations.
pub fn classify(rules: &[KubernetesRule], protected: &[ProtectedResource], home: &str) -> Vec<Reason> {
    let mut reasons = Vec::new();
    for rule in rules {
        for group in &rule.api_groups {
            for resource in &rule.resources {
                for verb in &rule.verbs {
                    let in_home = rule.namespace == home && WRITE_VERBS.contains(&verb.as_str());
                    let category = classify_one(group, resource, verb)
                        .or_else(|| {
                            (in_home && WORKLOADS.contains(&(group.as_str(), resource.as_str())))
                                .then_some(Category::Escalation)
                        })
                        .or_else(|| {
                            protected
                                .iter()
                                .any(|p| touches(p, group, resource, &rule.resource_names, &rule.namespace))
                                .then_some(Category::Protected)
                        });
                    if let Some(category) = category {
                        let target = if resource.contains('/')
                            && ESCALATION_RESOURCES.contains(&(group.as_str(), resource.as_str()))
                        {
                            // "pods/exec" reads better than "pods (exec)" for the well-known ones.
                            resource.clone()
                        } else {
                            target(group, resource, &rule.resource_names)
                        };
                        reasons.push(Reason {
                            category,
                            verb: verb.clone(),
                            target,
                            namespace: rule.namespace.clone(),
                        });
                    }
                }
            }
        }
    }
    reasons.sort();
    reasons.dedup();
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str], names: &[&str]) -> KubernetesRule {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
        KubernetesRule {
            namespace: "staging".into(),
            api_groups: v(groups),
            resources: v(resources),
            verbs: v(verbs),
            resource_names: v(names),
        }
    }

    fn one(group: &str, resource: &str, verb: &str) -> Option<Category> {
        classify_one(group, resource, verb)
    }

    use Category::*;

    #[test]
    fn truth_table() {
        // (group, resource, verb, expected)
        let table: &[(&str, &str, &str, Option<Category>)] = &[
            // Ordinary reads are issued at once.
            ("", "pods", "get", None),
            ("", "pods", "list", None),
            ("", "pods/log", "get", None),
            ("", "configmaps", "watch", None),
            ("apps", "deployments", "get", None),
            ("example.com", "widgets", "list", None),
            ("rbac.authorization.k8s.io", "roles", "get", None),
            // Reading Secrets is sensitive.
            ("", "secrets", "get", Some(Sensitive)),
            ("", "secrets", "list", Some(Sensitive)),
            ("", "secrets", "watch", Some(Sensitive)),
            // A group named like core but not core is not Secrets.
            ("example.com", "secrets", "get", None),
            // Routine writes are issued at once.
            ("apps", "deployments", "patch", None),
            ("apps", "deployments", "update", None),
            ("apps", "deployments/scale", "patch", None),
            ("", "configmaps", "create", None),
            // Traffic and exposure: services (externalIPs, load balancers), endpoints.
            ("", "services", "create", Some(Unknown)),
            ("", "services", "patch", Some(Unknown)),
            ("", "endpoints", "update", Some(Unknown)),
            ("discovery.k8s.io", "endpointslices", "create", Some(Unknown)),
            ("", "services", "get", None),
            // Eviction deletes a pod.
            ("", "pods/eviction", "create", Some(Destructive)),
            ("batch", "jobs", "create", None),
            // Deletes are destructive anywhere.
            ("", "persistentvolumeclaims", "delete", Some(Destructive)),
            ("", "configmaps", "delete", Some(Destructive)),
            ("apps", "deployments", "deletecollection", Some(Destructive)),
            ("example.com", "widgets", "delete", Some(Destructive)),
            // Writes to protected kinds are destructive.
            ("", "secrets", "create", Some(Destructive)),
            ("", "secrets", "patch", Some(Destructive)),
            ("", "namespaces", "update", Some(Destructive)),
            ("", "persistentvolumeclaims", "create", Some(Destructive)),
            ("", "persistentvolumes", "patch", Some(Destructive)),
            ("rbac.authorization.k8s.io", "rolebindings", "create", Some(Destructive)),
            ("rbac.authorization.k8s.io", "clusterroles", "patch", Some(Destructive)),
            ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "update", Some(Destructive)),
            ("apiextensions.k8s.io", "customresourcedefinitions", "create", Some(Destructive)),
            ("agentid.dev", "accessgrants", "create", Some(Destructive)),
            ("agentid.dev", "approvals", "create", Some(Destructive)),
            ("agentid.dev", "agentidentities", "patch", Some(Destructive)),
            // Escalation.
            ("*", "pods", "get", Some(Escalation)),
            ("", "*", "get", Some(Escalation)),
            ("", "pods", "*", Some(Escalation)),
            ("", "pods/*", "get", Some(Escalation)),
            ("rbac.authorization.k8s.io", "roles", "escalate", Some(Escalation)),
            ("rbac.authorization.k8s.io", "rolebindings", "bind", Some(Escalation)),
            ("", "users", "impersonate", Some(Escalation)),
            ("", "serviceaccounts", "impersonate", Some(Escalation)),
            ("", "pods", "create", Some(Escalation)),
            ("", "pods", "patch", Some(Escalation)),
            ("", "pods/ephemeralcontainers", "patch", Some(Escalation)),
            ("", "pods/exec", "create", Some(Escalation)),
            ("", "pods/exec", "get", Some(Escalation)),
            ("", "*/exec", "get", Some(Escalation)),
            ("", "*/attach", "create", Some(Escalation)),
            ("", "*/proxy", "get", Some(Escalation)),
            ("", "pods/proxy", "get", Some(Escalation)),
            ("", "services/proxy", "create", Some(Escalation)),
            ("apps", "deploy*", "patch", Some(Escalation)),
            ("", "pods/attach", "create", Some(Escalation)),
            ("", "pods/portforward", "create", Some(Escalation)),
            ("", "serviceaccounts/token", "create", Some(Escalation)),
            ("", "nodes/proxy", "get", Some(Escalation)),
            // Unknown verbs and writes to unknown resources fail closed.
            ("certificates.k8s.io", "certificatesigningrequests/approval", "approve", Some(Unknown)),
            ("policy", "podsecuritypolicies", "use", Some(Unknown)),
            ("", "services/proxy", "proxy", Some(Escalation)),
            ("example.com", "widgets", "create", Some(Unknown)),
            ("example.com", "widgets", "patch", Some(Unknown)),
            ("apps", "controllerrevisions", "create", Some(Unknown)),
            ("", "nodes", "patch", Some(Unknown)),
        ];
        for (group, resource, verb, expected) in table {
            assert_eq!(one(group, resource, verb), *expected, "{verb} {resource} in group {group:?}");
        }
    }

    #[test]
    fn incident_grant_says_why_in_words() {
        let reasons =
            classify(&[rule(&[""], &["persistentvolumeclaims"], &["get", "delete"], &["db-volume"])], &[], "agents");
        let texts: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        assert_eq!(texts, vec!["destructive: delete persistentvolumeclaims/db-volume in staging"]);
    }

    #[test]
    fn exec_reason_names_the_subresource() {
        let reasons = classify(&[rule(&[""], &["pods/exec"], &["create"], &[])], &[], "agents");
        assert_eq!(reasons[0].to_string(), "escalation: create pods/exec in staging");
    }

    #[test]
    fn read_only_grant_needs_nothing() {
        let rules = [rule(&["", "apps"], &["pods", "deployments", "pods/log"], &["get", "list", "watch"], &[])];
        assert!(classify(&rules, &[], "agents").is_empty());
    }

    #[test]
    fn every_combination_of_a_rule_is_considered() {
        // A harmless first entry must not hide a dangerous later one.
        let reasons =
            classify(&[rule(&["apps", ""], &["deployments", "secrets"], &["get", "patch"], &[])], &[], "agents");
        let texts: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            vec![
                "destructive: patch secrets in staging",
                "sensitive: get secrets in staging",
                "unknown: patch deployments in staging",
                "unknown: patch secrets.apps in staging",
            ]
        );
    }

    #[test]
    fn reasons_are_sorted_and_unique() {
        let r = rule(&[""], &["secrets"], &["get", "get"], &[]);
        assert_eq!(classify(&[r.clone(), r], &[], "agents").len(), 1);
    }

    fn protect(group: &str, resource: &str, names: &[&str], namespaces: &[&str]) -> ProtectedResource {
        ProtectedResource {
            api_group: group.into(),
            resource: resource.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn protected_resources_need_approval_for_any_verb() {
        let flags = [protect("", "configmaps", &["feature-flags"], &[])];
        let read = rule(&[""], &["configmaps"], &["get"], &["feature-flags"]);
        let texts: Vec<String> = classify(&[read], &flags, "agents").iter().map(ToString::to_string).collect();
        assert_eq!(texts, vec!["protected: get configmaps/feature-flags in staging"]);
        // All configmaps includes the protected one.
        assert_eq!(classify(&[rule(&[""], &["configmaps"], &["list"], &[])], &flags, "agents").len(), 1);
        // Another name, another resource, another group: not protected.
        assert!(classify(&[rule(&[""], &["configmaps"], &["get"], &["other"])], &flags, "agents").is_empty());
        assert!(classify(&[rule(&[""], &["services"], &["get"], &["feature-flags"])], &flags, "agents").is_empty());
        assert!(classify(&[rule(&["example.com"], &["configmaps"], &["get"], &[])], &flags, "agents").is_empty());
        // Limited to a namespace.
        let prod_only = [protect("apps", "deployments", &[], &["production"])];
        assert!(classify(&[rule(&["apps"], &["deployments"], &["get"], &[])], &prod_only, "agents").is_empty());
        let mut in_prod = rule(&["apps"], &["deployments"], &["get"], &[]);
        in_prod.namespace = "production".into();
        assert_eq!(classify(&[in_prod], &prod_only, "agents")[0].category, Protected);
        // Subresources of a protected resource are protected too.
        assert_eq!(
            classify(
                &[rule(&["apps"], &["deployments/scale"], &["get"], &[])],
                &[protect("apps", "deployments", &[], &[])],
                "agents"
            )
            .len(),
            1
        );
    }

    #[test]
    fn workload_writes_in_the_identities_namespace_are_escalations() {
        let mut in_home = rule(&["apps"], &["deployments"], &["patch"], &["web"]);
        in_home.namespace = "agents".into();
        let texts: Vec<String> = classify(&[in_home], &[], "agents").iter().map(ToString::to_string).collect();
        assert_eq!(texts, vec!["escalation: patch deployments.apps/web in agents"]);
        // The same write in a target namespace is routine, and reads at home are fine.
        assert!(classify(&[rule(&["apps"], &["deployments"], &["patch"], &["web"])], &[], "agents").is_empty());
        let mut read_home = rule(&["apps"], &["deployments"], &["get"], &[]);
        read_home.namespace = "agents".into();
        assert!(classify(&[read_home], &[], "agents").is_empty());
    }
}
