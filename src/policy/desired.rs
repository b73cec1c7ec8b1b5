//! The objects agentid wants to exist, built from the custom resources alone (no client).

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::{
        core::v1::{Secret, ServiceAccount},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::names;
use crate::api::{AccessGrant, AgentIdentity, KubernetesRule};

/// Where a credential's holder reaches the apiserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterAccess {
    /// The apiserver URL written into kubeconfigs.
    pub server: String,
    /// The CA bundle (PEM) that verifies the apiserver.
    pub ca_pem: String,
}

fn owner_ref<K: Resource<DynamicType = ()>>(obj: &K) -> Option<OwnerReference> {
    obj.controller_owner_ref(&())
}

fn meta(name: String, namespace: &str, labels: BTreeMap<String, String>, owner: Option<OwnerReference>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        owner_references: owner.map(|o| vec![o]),
        ..Default::default()
    }
}

/// The base ServiceAccount's `automountServiceAccountToken`: no token in pods that run as it.
pub const BASE_AUTOMOUNT_TOKEN: Option<bool> = Some(false);

/// The identity's base ServiceAccount: no token automount, no privileges.
pub fn identity_service_account(identity: &AgentIdentity) -> ServiceAccount {
    let name = identity.name_any();
    ServiceAccount {
        metadata: meta(
            names::identity_service_account(&name),
            &identity.namespace().unwrap_or_default(),
            names::identity_labels(&name),
            owner_ref(identity),
        ),
        automount_service_account_token: BASE_AUTOMOUNT_TOKEN,
        ..Default::default()
    }
}

/// The identity's credentials Secret, without data: grants add and remove their own entries.
pub fn identity_credentials_secret(identity: &AgentIdentity) -> Secret {
    let name = identity.name_any();
    Secret {
        metadata: meta(
            names::identity_credentials_secret(&name),
            &identity.namespace().unwrap_or_default(),
            names::identity_labels(&name),
            owner_ref(identity),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The rules of every identity's requester Role: create AccessGrants and read them.
pub fn requester_rules() -> Vec<PolicyRule> {
    let rule = |resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![crate::api::GROUP.into()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    };
    vec![rule(&["accessgrants"], &["create", "get", "list", "watch"]), rule(&["accessgrants/status"], &["get"])]
}

/// The one standing right of an identity: create AccessGrants and read them, in its namespace.
pub fn identity_requester_role(identity: &AgentIdentity) -> Role {
    let name = identity.name_any();
    Role {
        metadata: meta(
            names::identity_requester_role(&name),
            &identity.namespace().unwrap_or_default(),
            names::identity_labels(&name),
            owner_ref(identity),
        ),
        rules: Some(requester_rules()),
    }
}

/// Binds [`identity_requester_role`] to the base ServiceAccount.
pub fn identity_requester_binding(identity: &AgentIdentity) -> RoleBinding {
    let name = identity.name_any();
    let namespace = identity.namespace().unwrap_or_default();
    RoleBinding {
        metadata: meta(
            names::identity_requester_role(&name),
            &namespace,
            names::identity_labels(&name),
            owner_ref(identity),
        ),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: names::identity_requester_role(&name),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: names::identity_service_account(&name),
            namespace: Some(namespace),
            ..Default::default()
        }]),
    }
}

/// Whether `rules` (of a Role as a cache holds it) are still [`requester_rules`], those of
/// [`identity_requester_role`] (a list left out and an empty one alike). An edited Role is
/// applied again at once; until then drift takes its binding for agentid's own.
pub fn requester_rules_current(rules: &[PolicyRule]) -> bool {
    let normal = |rules: &[PolicyRule]| -> Vec<[Vec<String>; 5]> {
        rules
            .iter()
            .map(|p| {
                let list = |v: &Option<Vec<String>>| v.clone().unwrap_or_default();
                [
                    list(&p.api_groups),
                    list(&p.resources),
                    p.verbs.clone(),
                    list(&p.resource_names),
                    list(&p.non_resource_urls),
                ]
            })
            .collect()
    };
    normal(rules) == normal(&requester_rules())
}

/// Whether `binding` (as a cache holds it) still binds what [`identity_requester_binding`]
/// binds, to whom it binds it (a subject's `apiGroup`, which the apiserver may fill in, aside).
pub fn requester_binding_current(identity: &AgentIdentity, binding: &RoleBinding) -> bool {
    let subjects = |b: &RoleBinding| -> Vec<(String, String, Option<String>)> {
        b.subjects.iter().flatten().map(|s| (s.kind.clone(), s.name.clone(), s.namespace.clone())).collect()
    };
    let desired = identity_requester_binding(identity);
    binding.role_ref.kind == desired.role_ref.kind
        && binding.role_ref.name == desired.role_ref.name
        && subjects(binding) == subjects(&desired)
}

/// Everything about a grant's objects that follows from the grant alone.
#[derive(Debug, Clone)]
pub struct GrantObjects {
    /// The grant's namespace (where its ServiceAccount and Secret live).
    pub namespace: String,
    /// The shared name of the grant's ServiceAccount, Secret, Roles and RoleBindings.
    pub name: String,
    /// The grant's UID.
    pub uid: String,
    labels: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
}

impl GrantObjects {
    /// Names and labels for `grant`'s objects. Needs the grant's UID (any stored object has one).
    pub fn new(grant: &AccessGrant) -> Self {
        let namespace = grant.namespace().unwrap_or_default();
        let uid = grant.uid().unwrap_or_default();
        let grant_name = grant.name_any();
        Self {
            name: names::grant_object_name(&grant_name, &uid),
            labels: names::grant_labels(&namespace, &grant_name, &uid, &grant.spec.identity),
            owner: owner_ref(grant),
            namespace,
            uid,
        }
    }

    /// The grant's own ServiceAccount: what the apiserver's audit log shows for the agent's calls.
    /// It records the end of the credential being issued ([`names::EXPIRES_AT_ANNOTATION`]).
    pub fn service_account(&self, expires_at: Timestamp) -> ServiceAccount {
        let mut metadata = meta(self.name.clone(), &self.namespace, self.labels.clone(), self.owner.clone());
        metadata.annotations = Some([(names::EXPIRES_AT_ANNOTATION.to_string(), expires_at.to_string())].into());
        ServiceAccount { metadata, automount_service_account_token: Some(false), ..Default::default() }
    }

    /// The grant's Secret, without data; the token is bound to this object.
    pub fn secret(&self) -> Secret {
        Secret {
            metadata: meta(self.name.clone(), &self.namespace, self.labels.clone(), self.owner.clone()),
            type_: Some("Opaque".into()),
            ..Default::default()
        }
    }

    /// One Role per target namespace carrying exactly the rules for that namespace, in order.
    /// Cross-namespace objects cannot have owner references: revocation finds them by label.
    pub fn roles(&self, rules: &[KubernetesRule]) -> Vec<Role> {
        let mut by_namespace: BTreeMap<&str, Vec<PolicyRule>> = BTreeMap::new();
        for rule in rules {
            by_namespace.entry(&rule.namespace).or_default().push(policy_rule(rule));
        }
        by_namespace
            .into_iter()
            .map(|(namespace, rules)| Role {
                metadata: meta(self.name.clone(), namespace, self.labels.clone(), self.same_namespace_owner(namespace)),
                rules: Some(rules),
            })
            .collect()
    }

    /// One RoleBinding per Role, binding it to the grant's ServiceAccount.
    pub fn role_bindings(&self, rules: &[KubernetesRule]) -> Vec<RoleBinding> {
        self.roles(rules)
            .into_iter()
            .map(|role| {
                let namespace = role.metadata.namespace.clone().unwrap_or_default();
                RoleBinding {
                    metadata: meta(
                        self.name.clone(),
                        &namespace,
                        self.labels.clone(),
                        self.same_namespace_owner(&namespace),
                    ),
                    role_ref: RoleRef {
                        api_group: Some("rbac.authorization.k8s.io".into()),
                        kind: "Role".into(),
                        name: self.name.clone(),
                    },
                    subjects: Some(vec![Subject {
                        kind: "ServiceAccount".into(),
                        name: self.name.clone(),
                        namespace: Some(self.namespace.clone()),
                        ..Default::default()
                    }]),
                }
            })
            .collect()
    }

    fn same_namespace_owner(&self, namespace: &str) -> Option<OwnerReference> {
        (namespace == self.namespace).then(|| self.owner.clone()).flatten()
    }

    /// The namespaces the grant's Roles live in.
    pub fn target_namespaces(rules: &[KubernetesRule]) -> Vec<String> {
        let mut namespaces: Vec<String> = rules.iter().map(|r| r.namespace.clone()).collect();
        namespaces.sort();
        namespaces.dedup();
        namespaces
    }
}

fn policy_rule(rule: &KubernetesRule) -> PolicyRule {
    PolicyRule {
        api_groups: Some(rule.api_groups.clone()),
        resources: Some(rule.resources.clone()),
        verbs: rule.verbs.clone(),
        resource_names: (!rule.resource_names.is_empty()).then(|| rule.resource_names.clone()),
        non_resource_urls: None,
    }
}

/// The `scope` entry: what the credential allows and until when, for the agent and for humans.
pub fn scope_json(grant: &AccessGrant, expires_at: Timestamp) -> String {
    let rules = grant.spec.kubernetes.as_ref().map(|k| k.rules.clone()).unwrap_or_default();
    json!({
        "grant": grant.name_any(),
        "namespace": grant.namespace(),
        "identity": grant.spec.identity,
        "expiresAt": expires_at.to_string(),
        "kubernetes": {"rules": rules},
    })
    .to_string()
}

/// A kubeconfig that authenticates with `token`, defaulting to the first rule's namespace.
pub fn kubeconfig(access: &ClusterAccess, user: &str, token: &str, namespace: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(access.ca_pem.as_bytes());
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "agentid", "cluster": {"server": access.server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "agentid", "context": {"cluster": "agentid", "user": user, "namespace": namespace}}],
        "current-context": "agentid",
    });
    // A JSON document is a valid kubeconfig (YAML 1.2 is a superset of JSON).
    serde_json::to_string_pretty(&config).unwrap_or_default()
}

/// The per-grant Secret's data: token, kubeconfig, ca.crt, expires-at, scope.
pub fn credential_data(
    grant: &AccessGrant,
    access: &ClusterAccess,
    token: &str,
    expires_at: Timestamp,
) -> BTreeMap<String, ByteString> {
    let rules = grant.spec.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default();
    let namespace = rules.first().map(|r| r.namespace.as_str()).unwrap_or("default");
    let user = names::grant_object_name(&grant.name_any(), &grant.uid().unwrap_or_default());
    [
        ("token", token.to_string()),
        ("kubeconfig", kubeconfig(access, &user, token, namespace)),
        ("ca.crt", access.ca_pem.clone()),
        ("expires-at", expires_at.to_string()),
        ("scope", scope_json(grant, expires_at)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
    .collect()
}

fn names_phrase(resource: &str, names: &[String]) -> String {
    if names.is_empty() { format!("every {resource} object") } else { format!("{resource} {}", names.join(", ")) }
}

/// One rule in words, e.g. "get, delete persistentvolumeclaims db-volume in namespace staging".
pub fn rule_in_words(rule: &KubernetesRule) -> String {
    let targets: Vec<String> = rule
        .api_groups
        .iter()
        .flat_map(|g| {
            rule.resources.iter().map(move |r| {
                let qualified = if g.is_empty() { r.clone() } else { format!("{r}.{g}") };
                names_phrase(&qualified, &rule.resource_names)
            })
        })
        .collect();
    let mut text = format!("{} {} in namespace {}", rule.verbs.join(", "), targets.join(" and "), rule.namespace);
    if !rule.resource_names.is_empty() && rule.verbs.iter().any(|v| v == "list" || v == "watch") {
        text.push_str(" (list and watch do not work with names: RBAC cannot filter them)");
    }
    text
}

/// The whole scope of a grant in words, one clause per rule.
pub fn scope_in_words(grant: &AccessGrant) -> String {
    let rules = grant.spec.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default();
    rules.iter().map(rule_in_words).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{grant, identity, rule};

    #[test]
    fn base_service_account_mounts_no_token_and_is_owned_by_the_identity() {
        let id = identity("fixer", &["staging"]);
        let sa = identity_service_account(&id);
        assert_eq!(sa.metadata.name.as_deref(), Some("agentid-fixer"));
        assert_eq!(sa.automount_service_account_token, Some(false));
        assert_eq!(sa.metadata.owner_references.as_ref().map(|o| o[0].kind.as_str()), Some("AgentIdentity"));
    }

    #[test]
    fn requester_objects_are_current_only_as_made() {
        let id = identity("fixer", &["staging"]);
        // As the apiserver answers them: the subject's apiGroup filled in.
        let role: Role =
            serde_json::from_value(serde_json::to_value(identity_requester_role(&id)).expect("json")).expect("role");
        let mut binding = identity_requester_binding(&id);
        binding.subjects.as_mut().expect("subjects")[0].api_group = Some(String::new());
        let rules = |r: &Role| r.rules.clone().unwrap_or_default();
        assert!(requester_rules_current(&rules(&role)) && requester_binding_current(&id, &binding));

        let mut widened = role.clone();
        widened.rules.as_mut().expect("rules")[0].verbs.push("delete".into());
        assert!(!requester_rules_current(&rules(&widened)));
        assert!(!requester_rules_current(&[]), "no rules are not the requester's");
        let mut more = binding.clone();
        more.subjects.as_mut().expect("subjects").push(Subject {
            kind: "Group".into(),
            name: "system:serviceaccounts".into(),
            ..Default::default()
        });
        assert!(!requester_binding_current(&id, &more));
    }

    #[test]
    fn requester_role_allows_only_creating_and_reading_grants() {
        let role = identity_requester_role(&identity("fixer", &["staging"]));
        let rules = role.rules.unwrap_or_default();
        assert_eq!(rules.len(), 2);
        for r in &rules {
            assert_eq!(r.api_groups.as_deref(), Some(&["agentid.dev".to_string()][..]));
            assert!(r.resource_names.is_none());
            assert!(
                !r.verbs
                    .iter()
                    .any(|v| { ["update", "patch", "delete", "*", "deletecollection"].contains(&v.as_str()) })
            );
        }
        assert_eq!(rules[0].resources.as_deref(), Some(&["accessgrants".to_string()][..]));
        assert_eq!(rules[1].verbs, vec!["get"]);
    }

    #[test]
    fn roles_carry_exactly_the_rules_per_namespace() {
        let mut r1 = rule("staging", "apps", "deployments", "patch");
        r1.resource_names = vec!["web".into()];
        let r2 = rule("staging", "", "pods", "get");
        let r3 = rule("monitoring", "", "configmaps", "list");
        let g = grant("deploy", "ci", "15m", vec![r1.clone(), r2, r3]);
        let objects = GrantObjects::new(&g);
        let roles = objects.roles(g.spec.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default());
        assert_eq!(roles.len(), 2);
        let staging = roles.iter().find(|r| r.metadata.namespace.as_deref() == Some("staging")).expect("staging role");
        let rules = staging.rules.clone().unwrap_or_default();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].resource_names, Some(vec!["web".to_string()]));
        assert_eq!(rules[0].verbs, vec!["patch"]);
        assert_eq!(rules[1].resource_names, None);
        // The Role in another namespace cannot be owned by the grant.
        let monitoring = roles.iter().find(|r| r.metadata.namespace.as_deref() == Some("monitoring")).expect("role");
        assert!(monitoring.metadata.owner_references.is_none());
        assert_eq!(monitoring.labels().get(names::GRANT_UID_LABEL).map(String::as_str), Some("uid-deploy"));
    }

    #[test]
    fn the_grant_service_account_records_the_end_for_that_grant_only() {
        let g = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        let end: Timestamp = "2026-11-25T12:15:00Z".parse().expect("time");
        let sa = GrantObjects::new(&g).service_account(end);
        assert_eq!(
            sa.metadata.annotations.as_ref().and_then(|a| a.get(names::EXPIRES_AT_ANNOTATION)).map(String::as_str),
            Some("2026-11-25T12:15:00Z")
        );
        assert_eq!(names::recorded_expiry(&sa.metadata, "uid-read"), Some(end));
        // Another grant's ServiceAccount (by its uid label), or none of agentid's, records nothing
        // for this one; nor does a record that does not parse.
        assert_eq!(names::recorded_expiry(&sa.metadata, "uid-other"), None);
        assert_eq!(names::recorded_expiry(&sa.metadata, ""), None);
        let mut unlabelled = sa.metadata.clone();
        unlabelled.labels = None;
        assert_eq!(names::recorded_expiry(&unlabelled, "uid-read"), None);
        let mut garbled = sa.metadata.clone();
        garbled.annotations = Some([(names::EXPIRES_AT_ANNOTATION.to_string(), "soon".to_string())].into());
        assert_eq!(names::recorded_expiry(&garbled, "uid-read"), None);
    }

    #[test]
    fn bindings_bind_the_grant_service_account_only() {
        let g = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        let objects = GrantObjects::new(&g);
        let bindings = objects.role_bindings(&g.spec.kubernetes.clone().map(|k| k.rules).unwrap_or_default());
        assert_eq!(bindings.len(), 1);
        let subjects = bindings[0].subjects.clone().unwrap_or_default();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, objects.name);
        assert_eq!(subjects[0].namespace.as_deref(), Some("agents"));
        assert_eq!(bindings[0].role_ref.name, objects.name);
    }

    #[test]
    fn credential_data_has_the_documented_keys_and_a_working_kubeconfig() {
        let g = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        let access =
            ClusterAccess { server: "https://127.0.0.1:6443".into(), ca_pem: "-----BEGIN CERTIFICATE-----\n".into() };
        let at: Timestamp = "2026-11-25T12:15:00Z".parse().expect("valid");
        let data = credential_data(&g, &access, "tok", at);
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["ca.crt", "expires-at", "kubeconfig", "scope", "token"]);
        let kubeconfig: kube::config::Kubeconfig =
            serde_json::from_slice(&data["kubeconfig"].0).expect("kubeconfig parses");
        assert_eq!(
            kubeconfig.clusters[0].cluster.as_ref().and_then(|c| c.server.clone()).as_deref(),
            Some("https://127.0.0.1:6443")
        );
        assert_eq!(
            kubeconfig.contexts[0].context.as_ref().and_then(|c| c.namespace.clone()).as_deref(),
            Some("staging")
        );
        let scope: serde_json::Value = serde_json::from_slice(&data["scope"].0).expect("scope is JSON");
        assert_eq!(scope["expiresAt"], "2026-11-25T12:15:00Z");
        assert_eq!(scope["kubernetes"]["rules"][0]["resources"][0], "pods");
        assert_eq!(String::from_utf8_lossy(&data["expires-at"].0), "2026-11-25T12:15:00Z");
    }
}
