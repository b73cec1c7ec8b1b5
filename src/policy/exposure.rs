//! Exposure: what an identity can reach, through RBAC, that yields more credentials than its
//! grants say — Secrets it can read (above all long-lived ServiceAccount tokens and other agents'
//! credentials), tokens it can mint, pods it can start or exec into as a more powerful
//! ServiceAccount, users it can impersonate.
//!
//! Computed from the RBAC objects the way the RBAC authorizer reads them (verbs, API groups,
//! resources with `*` and `*/subresource`, resourceNames; RoleBindings to Roles or ClusterRoles;
//! ClusterRoleBindings; ServiceAccount, user and group subjects). Aggregated ClusterRoles carry
//! their aggregated rules in `rules`, filled in by the controller-manager, so they need no special
//! case.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use k8s_openapi::{
    api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::ResourceExt;
use serde::Serialize;

use super::names;

/// The annotation the token controller keys legacy `kubernetes.io/service-account-token` Secrets
/// on. The API requires it on that type, and it is in metadata, so no Secret data is ever read.
pub const LEGACY_TOKEN_ANNOTATION: &str = "kubernetes.io/service-account.name";

/// A ServiceAccount whose rights are examined: the identity's base ServiceAccount or a grant's.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// How it is named to people: `base ServiceAccount` or `grant NAME`.
    pub via: String,
}

/// The ServiceAccount (namespace, name) a subject of a binding in `binding_ns` (None: a
/// ClusterRoleBinding) names, as a ServiceAccount (without a namespace: the binding's) or as the
/// user `system:serviceaccount:NS:NAME`; None for groups and other users.
pub(crate) fn named_service_account<'s>(
    subject: &'s Subject,
    binding_ns: Option<&'s str>,
) -> Option<(&'s str, &'s str)> {
    match subject.kind.as_str() {
        "ServiceAccount" => {
            Some((subject.namespace.as_deref().or(binding_ns).unwrap_or_default(), subject.name.as_str()))
        }
        "User" => subject.name.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':')),
        _ => None,
    }
}

/// Whether a group subject takes in the ServiceAccounts of namespace `ns`.
fn group_reaches(subject: &Subject, ns: &str) -> bool {
    subject.kind == "Group"
        && (subject.name == "system:serviceaccounts"
            || subject.name == "system:authenticated"
            || subject.name.strip_prefix("system:serviceaccounts:") == Some(ns))
}

/// The ServiceAccounts an identity acts as: its base ServiceAccount and the ServiceAccount of
/// each of `grants` (its active grants).
pub fn principals<'a>(
    ns: &str,
    identity: &str,
    grants: impl IntoIterator<Item = &'a crate::api::AccessGrant>,
) -> Vec<Principal> {
    let base = Principal {
        namespace: ns.into(),
        name: names::identity_service_account(identity),
        via: "base ServiceAccount".into(),
    };
    let grant_sas = grants.into_iter().filter_map(|g| {
        let name = g.status.as_ref().and_then(|s| s.service_account_name.clone())?;
        Some(Principal { namespace: ns.into(), name, via: format!("grant {}", g.name_any()) })
    });
    std::iter::once(base).chain(grant_sas).collect()
}

/// A Role (or ClusterRole) as exposure reads it: where it is and its rules.
pub trait HasRules {
    /// Its namespace (empty for a ClusterRole) and name.
    fn key(&self) -> (&str, &str);
    /// Its rules.
    fn rules(&self) -> &[PolicyRule];
}

impl HasRules for Role {
    fn key(&self) -> (&str, &str) {
        (self.metadata.namespace.as_deref().unwrap_or_default(), self.metadata.name.as_deref().unwrap_or_default())
    }

    fn rules(&self) -> &[PolicyRule] {
        self.rules.as_deref().unwrap_or_default()
    }
}

impl HasRules for ClusterRole {
    fn key(&self) -> (&str, &str) {
        ("", self.metadata.name.as_deref().unwrap_or_default())
    }

    fn rules(&self) -> &[PolicyRule] {
        self.rules.as_deref().unwrap_or_default()
    }
}

/// The RBAC objects of the cluster (shared, as a watch cache holds them: reading them copies
/// nothing); Roles as `R`, whole or as a cache keeps them.
pub struct Rbac<'a, R = Role> {
    /// Roles.
    pub roles: &'a [Arc<R>],
    /// ClusterRoles.
    pub cluster_roles: &'a [Arc<ClusterRole>],
    /// RoleBindings.
    pub role_bindings: &'a [Arc<RoleBinding>],
    /// ClusterRoleBindings.
    pub cluster_role_bindings: &'a [Arc<ClusterRoleBinding>],
}

/// Where a rule holds: one namespace, or every namespace (a ClusterRoleBinding).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Namespace(String),
    Cluster,
}

impl Scope {
    fn covers(&self, ns: &str) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Namespace(n) => n == ns,
        }
    }

    fn shown(&self) -> String {
        match self {
            Scope::Cluster => "*".into(),
            Scope::Namespace(n) => n.clone(),
        }
    }
}

impl<'a, R: HasRules> Rbac<'a, R> {
    /// For each of `principals`, every rule that applies to it, with where it applies. One pass
    /// over the bindings for all principals (an identity with a hundred grants has a hundred and
    /// one), and roles found by name, not searched for.
    fn rules_of_all(&self, principals: &[Principal]) -> Vec<Vec<(Scope, &'a PolicyRule)>> {
        let cluster_roles: HashMap<&str, &'a [PolicyRule]> =
            self.cluster_roles.iter().map(|r| (r.key().1, r.rules())).collect();
        let roles: HashMap<(&str, &str), &'a [PolicyRule]> = self.roles.iter().map(|r| (r.key(), r.rules())).collect();
        let by_name: HashMap<(&str, &str), usize> =
            principals.iter().enumerate().map(|(i, p)| ((p.namespace.as_str(), p.name.as_str()), i)).collect();
        let mut out = vec![Vec::new(); principals.len()];
        let mut reached = BTreeSet::new();
        let mut reach = |subjects: &Option<Vec<Subject>>, binding_ns: Option<&str>| {
            reached.clear();
            for s in subjects.iter().flatten() {
                match named_service_account(s, binding_ns) {
                    Some(sa) => reached.extend(by_name.get(&sa)),
                    None => reached.extend(
                        principals.iter().enumerate().filter(|(_, p)| group_reaches(s, &p.namespace)).map(|(i, _)| i),
                    ),
                }
            }
            reached.iter().copied().collect::<Vec<_>>()
        };
        for b in self.cluster_role_bindings.iter() {
            let who = reach(&b.subjects, None);
            if who.is_empty() || b.role_ref.kind != "ClusterRole" {
                continue;
            }
            let Some(role) = cluster_roles.get(b.role_ref.name.as_str()) else { continue };
            for i in who {
                out[i].extend(role.iter().map(|r| (Scope::Cluster, r)));
            }
        }
        for b in self.role_bindings.iter() {
            let ns = b.metadata.namespace.as_deref().unwrap_or_default();
            let who = reach(&b.subjects, Some(ns));
            if who.is_empty() {
                continue;
            }
            let rules = match b.role_ref.kind.as_str() {
                "ClusterRole" => cluster_roles.get(b.role_ref.name.as_str()).copied(),
                "Role" => roles.get(&(ns, b.role_ref.name.as_str())).copied(),
                _ => None,
            };
            for i in who {
                out[i].extend(rules.into_iter().flatten().map(|r| (Scope::Namespace(ns.to_string()), r)));
            }
        }
        out
    }
}

fn resource_matches(rule: &PolicyRule, resource: &str) -> bool {
    let sub = resource.split_once('/').map(|(_, s)| s);
    rule.resources.iter().flatten().any(|r| r == "*" || r == resource || sub.is_some_and(|s| *r == format!("*/{s}")))
}

fn rule_allows(rule: &PolicyRule, verb: &str, group: &str, resource: &str) -> bool {
    rule.verbs.iter().any(|v| v == "*" || v == verb)
        && rule.api_groups.iter().flatten().any(|g| g == "*" || g == group)
        && resource_matches(rule, resource)
}

/// What a set of rules allows for one verb on one resource: everything (no resourceNames), some
/// names, or nothing — per scope.
fn reach(rules: &[(Scope, &PolicyRule)], verbs: &[&str], group: &str, resource: &str) -> BTreeMap<Scope, Names> {
    let mut out: BTreeMap<Scope, Names> = BTreeMap::new();
    for (scope, rule) in rules {
        if !verbs.iter().any(|v| rule_allows(rule, v, group, resource)) {
            continue;
        }
        let names = match rule.resource_names.as_deref() {
            None | Some([]) => Names::All,
            Some(list) => Names::Some(list.iter().cloned().collect()),
        };
        let entry = out.entry(scope.clone()).or_insert(Names::Some(BTreeSet::new()));
        *entry = entry.clone().union(names);
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Names {
    All,
    Some(BTreeSet<String>),
}

impl Names {
    fn union(self, other: Names) -> Names {
        match (self, other) {
            (Names::All, _) | (_, Names::All) => Names::All,
            (Names::Some(mut a), Names::Some(b)) => {
                a.extend(b);
                Names::Some(a)
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            Names::All => true,
            Names::Some(set) => set.contains(name),
        }
    }

    fn shown(&self, all: &str) -> String {
        match self {
            Names::All => all.into(),
            Names::Some(set) => set.iter().cloned().collect::<Vec<_>>().join(", "),
        }
    }
}

fn allowed_in(reach: &BTreeMap<Scope, Names>, ns: &str, name: &str) -> bool {
    reach.iter().any(|(scope, names)| scope.covers(ns) && names.contains(name))
}

/// Kinds of exposure, most direct first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// A long-lived `kubernetes.io/service-account-token` Secret it can read: a credential that
    /// never expires.
    LegacyToken,
    /// Another identity's or grant's agentid credentials Secret.
    AgentCredentials,
    /// Any other Secret it can read.
    Secret,
    /// It can create `serviceaccounts/token`: mint a token for ServiceAccounts of a namespace.
    TokenRequest,
    /// It can create and read Secrets: the token controller fills a new
    /// `kubernetes.io/service-account-token` Secret for any ServiceAccount named in it.
    LegacyTokenMint,
    /// It can create pods, or exec/attach into them, where ServiceAccounts that hold rights live.
    PodAsServiceAccount,
    /// It can impersonate users, groups or ServiceAccounts.
    Impersonation,
}

/// One way an identity can obtain a credential it was not granted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Exposed {
    /// What kind of exposure.
    pub kind: Kind,
    /// The namespace (`*`: every namespace).
    pub namespace: String,
    /// What is reached: a Secret's name, ServiceAccount names, or `*`.
    pub target: String,
    /// Which of the identity's ServiceAccounts has the right: `base ServiceAccount` or `grant NAME`.
    pub via: String,
    /// In words.
    pub detail: String,
}

/// Counts per kind, for the identity's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Readable long-lived ServiceAccount token Secrets.
    pub legacy_tokens: usize,
    /// Readable Secrets of every kind (legacy tokens and other agents' credentials included).
    pub secrets: usize,
    /// Ways to mint tokens (TokenRequest or legacy token Secrets).
    pub token_minting: usize,
    /// Namespaces where pods could run as a more powerful ServiceAccount.
    pub pods: usize,
    /// Impersonation rights.
    pub impersonation: usize,
}

/// Counts `findings` per kind.
pub fn counts(findings: &[Exposed]) -> Counts {
    let n = |kinds: &[Kind]| findings.iter().filter(|f| kinds.contains(&f.kind)).count();
    Counts {
        legacy_tokens: n(&[Kind::LegacyToken]),
        secrets: n(&[Kind::LegacyToken, Kind::AgentCredentials, Kind::Secret]),
        token_minting: n(&[Kind::TokenRequest, Kind::LegacyTokenMint]),
        pods: n(&[Kind::PodAsServiceAccount]),
        impersonation: n(&[Kind::Impersonation]),
    }
}

/// ServiceAccounts, per namespace, that hold some right through a binding agentid did not make
/// (known by its shape, not its labels: [`drift::agentids_own`]; agentid makes no
/// ClusterRoleBindings). agentid's own ServiceAccounts are left out: admission keeps pods from
/// running as them.
fn powerful_service_accounts<R>(rbac: &Rbac<'_, R>) -> BTreeMap<String, BTreeSet<String>> {
    // (subject, the binding's namespace): a RoleBinding's ServiceAccount subject without a
    // namespace is in the binding's namespace.
    let subjects = rbac
        .role_bindings
        .iter()
        .filter(|b| !super::drift::agentids_own(b))
        .flat_map(|b| b.subjects.iter().flatten().map(move |s| (s, b.namespace())))
        .chain(rbac.cluster_role_bindings.iter().flat_map(|b| b.subjects.iter().flatten().map(|s| (s, None))));
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (s, binding_ns) in subjects.filter(|(s, _)| s.kind == "ServiceAccount" && !s.name.starts_with("agentid-")) {
        if let Some(ns) = s.namespace.clone().or(binding_ns) {
            out.entry(ns).or_default().insert(s.name.clone());
        }
    }
    out
}

/// A Secret as exposure reads it — metadata only, never data: its namespace and name, and for
/// a legacy ServiceAccount token the ServiceAccount its [`LEGACY_TOKEN_ANNOTATION`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretRef<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its name.
    pub name: &'a str,
    /// The ServiceAccount it is a long-lived token of.
    pub legacy_token_of: Option<&'a str>,
}

impl<'a> SecretRef<'a> {
    /// The Secret whose metadata is `meta`.
    pub fn of(meta: &'a ObjectMeta) -> Self {
        SecretRef {
            namespace: meta.namespace.as_deref().unwrap_or_default(),
            name: meta.name.as_deref().unwrap_or_default(),
            legacy_token_of: meta.annotations.as_ref().and_then(|a| a.get(LEGACY_TOKEN_ANNOTATION)).map(String::as_str),
        }
    }
}

/// The Secrets of the cluster, walked only for a principal that can read Secrets (most cannot:
/// an identity's analysis then never touches them).
pub trait Secrets {
    /// Calls `f` with each Secret.
    fn each(&self, f: &mut dyn FnMut(SecretRef<'_>));
}

impl<M: std::borrow::Borrow<ObjectMeta>> Secrets for [M] {
    fn each(&self, f: &mut dyn FnMut(SecretRef<'_>)) {
        self.iter().for_each(|m| f(SecretRef::of(m.borrow())));
    }
}

/// Whether a Secret is the identity's own: its credentials Secret, or the Secret of one of its
/// active grants (`principals`; a grant's Secret has its ServiceAccount's name), in the
/// identity's namespace, and never a ServiceAccount token. Known by name, not by labels: a label
/// would let anyone hide a Secret from this analysis.
fn own_secret(secret: SecretRef<'_>, ns: &str, identity: &str, principals: &[Principal]) -> bool {
    let name = secret.name;
    secret.namespace == ns
        && (name == names::identity_credentials_secret(identity)
            || principals
                .iter()
                .any(|p| p.namespace == ns && p.name == name && name.starts_with(names::GRANT_OBJECT_PREFIX)))
        && secret.legacy_token_of.is_none()
}

/// Everything the identity `identity` of namespace `ns` can reach through `principals` (its base
/// ServiceAccount and its active grants' ServiceAccounts) that yields a credential, sorted.
/// `secrets` is Secret metadata only.
pub fn exposure<R: HasRules>(
    ns: &str,
    identity: &str,
    principals: &[Principal],
    rbac: &Rbac<'_, R>,
    secrets: &(impl Secrets + ?Sized),
) -> Vec<Exposed> {
    // Which ServiceAccounts hold rights scans every binding: only when some principal can start
    // or enter pods.
    let mut powerful: Option<BTreeMap<String, BTreeSet<String>>> = None;
    let mut out = BTreeSet::new();
    let rules_of = rbac.rules_of_all(principals);
    for (p, rules) in principals.iter().zip(rules_of) {
        let finding = |kind, namespace: String, target: String, detail: String| Exposed {
            kind,
            namespace,
            target,
            via: p.via.clone(),
            detail,
        };

        let read = reach(&rules, &["get", "list", "watch"], "", "secrets");
        if !read.is_empty() {
            secrets.each(&mut |secret| {
                let SecretRef { namespace: secret_ns, name, legacy_token_of } = secret;
                if own_secret(secret, ns, identity, principals) || !allowed_in(&read, secret_ns, name) {
                    return;
                }
                let (kind, detail) = if let Some(sa) = legacy_token_of {
                    (Kind::LegacyToken, format!("long-lived token of ServiceAccount {secret_ns}/{sa}"))
                } else if let Some(whose) = names::credentials_secret_identity(name) {
                    (Kind::AgentCredentials, format!("agentid credentials of identity {secret_ns}/{whose}"))
                } else if name.starts_with(names::GRANT_OBJECT_PREFIX) {
                    (Kind::AgentCredentials, "agentid credentials of a grant".to_string())
                } else {
                    (Kind::Secret, "readable Secret".to_string())
                };
                out.insert(finding(kind, secret_ns.to_string(), name.to_string(), detail));
            });
        }

        for (scope, names) in reach(&rules, &["create"], "", "serviceaccounts/token") {
            let target = names.shown("*");
            let detail = format!("can mint tokens for ServiceAccount(s) {target} of {}", scope.shown());
            out.insert(finding(Kind::TokenRequest, scope.shown(), target, detail));
        }

        let create_secrets = reach(&rules, &["create"], "", "secrets");
        for (scope, names) in &create_secrets {
            if names != &Names::All {
                continue;
            }
            let readable = read.iter().any(|(s, n)| (s == scope || *s == Scope::Cluster) && *n == Names::All);
            if readable {
                let detail = format!(
                    "can create a kubernetes.io/service-account-token Secret in {} and read the token filled in",
                    scope.shown()
                );
                out.insert(finding(Kind::LegacyTokenMint, scope.shown(), "*".into(), detail));
            }
        }

        let pods = reach(&rules, &["create"], "", "pods");
        let exec =
            [reach(&rules, &["create", "get"], "", "pods/exec"), reach(&rules, &["create", "get"], "", "pods/attach")];
        let enters_pods = !pods.is_empty() || exec.iter().any(|r| !r.is_empty());
        let powerful = match enters_pods {
            true => powerful.get_or_insert_with(|| powerful_service_accounts(rbac)),
            false => &BTreeMap::new(),
        };
        for (pod_ns, sas) in powerful.iter() {
            let can_create = pods.iter().any(|(s, _)| s.covers(pod_ns));
            let can_exec = exec.iter().any(|r| r.iter().any(|(s, _)| s.covers(pod_ns)));
            if !(can_create || can_exec) {
                continue;
            }
            let how = match (can_create, can_exec) {
                (true, true) => "create pods and exec into them",
                (true, false) => "create pods",
                _ => "exec into pods",
            };
            let target = sas.iter().cloned().collect::<Vec<_>>().join(", ");
            let detail = format!("can {how} in {pod_ns}, where ServiceAccount(s) {target} hold rights");
            out.insert(finding(Kind::PodAsServiceAccount, pod_ns.clone(), target, detail));
        }

        for resource in ["users", "groups", "serviceaccounts"] {
            for (scope, names) in reach(&rules, &["impersonate"], "", resource) {
                let target = format!("{resource}: {}", names.shown("*"));
                let detail = format!("can impersonate {target} in {}", scope.shown());
                out.insert(finding(Kind::Impersonation, scope.shown(), target, detail));
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("object")
    }

    fn role(ns: &str, name: &str, rules: serde_json::Value) -> Role {
        obj(json!({"metadata": {"name": name, "namespace": ns}, "rules": rules}))
    }

    fn cluster_role(name: &str, rules: serde_json::Value) -> ClusterRole {
        obj(json!({"metadata": {"name": name}, "rules": rules}))
    }

    fn binding(ns: &str, name: &str, kind: &str, role: &str, subjects: serde_json::Value) -> RoleBinding {
        obj(json!({
            "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": subjects
        }))
    }

    fn shared<T: Clone>(items: &[T]) -> Vec<Arc<T>> {
        items.iter().cloned().map(Arc::new).collect()
    }

    fn sa(ns: &str, name: &str) -> serde_json::Value {
        json!({"kind": "ServiceAccount", "name": name, "namespace": ns})
    }

    fn secret(ns: &str, name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> ObjectMeta {
        obj(json!({"name": name, "namespace": ns, "labels": labels, "annotations": annotations}))
    }

    fn base() -> Principal {
        Principal { namespace: "agents".into(), name: "agentid-fixer".into(), via: "base ServiceAccount".into() }
    }

    fn grant() -> Principal {
        Principal { namespace: "agents".into(), name: "agentid-grant-g-1234abcd".into(), via: "grant g".into() }
    }

    #[test]
    fn a_grant_reading_secrets_reaches_legacy_tokens_and_other_agents_but_not_its_own() {
        let roles = [role(
            "prod",
            "read-secrets",
            json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]),
        )];
        let bindings =
            [binding("prod", "g", "Role", "read-secrets", json!([sa("agents", "agentid-grant-g-1234abcd")]))];
        let roles = shared(&roles);
        let bindings = shared(&bindings);
        let rbac = Rbac { roles: &roles, cluster_roles: &[], role_bindings: &bindings, cluster_role_bindings: &[] };
        let secrets = [
            secret("prod", "db-token", json!({}), json!({LEGACY_TOKEN_ANNOTATION: "db-admin"})),
            secret("prod", "tls", json!({}), json!({})),
            secret("prod", "agentid-other-credentials", json!({}), json!({})),
            secret(
                "agents",
                "agentid-fixer",
                json!({"app.kubernetes.io/managed-by": "agentid", "agentid.dev/identity": "fixer"}),
                json!({}),
            ),
            secret("staging", "elsewhere", json!({}), json!({LEGACY_TOKEN_ANNOTATION: "x"})),
        ];
        let found = exposure("agents", "fixer", &[base(), grant()], &rbac, &secrets[..]);
        let got: Vec<(Kind, &str, &str)> = found.iter().map(|f| (f.kind, f.target.as_str(), f.via.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (Kind::LegacyToken, "db-token", "grant g"),
                (Kind::AgentCredentials, "agentid-other-credentials", "grant g"),
                (Kind::Secret, "tls", "grant g"),
            ]
        );
        assert_eq!(found[0].detail, "long-lived token of ServiceAccount prod/db-admin");
        let c = counts(&found);
        assert_eq!((c.legacy_tokens, c.secrets, c.token_minting, c.pods, c.impersonation), (1, 3, 0, 0, 0));
    }

    #[test]
    fn labels_hide_neither_a_secret_nor_a_powerful_service_account() {
        let read = json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]);
        let roles = [role("agents", "read-secrets", read)];
        let cluster_roles =
            [cluster_role("exec", json!([{"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}]))];
        let ours = json!({"app.kubernetes.io/managed-by": "agentid", "agentid.dev/identity": "fixer"});
        let mut disguised = binding("busy", "op", "ClusterRole", "exec", json!([sa("busy", "operator")]));
        disguised.metadata.labels = serde_json::from_value(ours.clone()).expect("labels");
        let bindings = [
            binding("agents", "g", "Role", "read-secrets", json!([sa("agents", "agentid-grant-g-1234abcd")])),
            binding("busy", "b", "ClusterRole", "exec", json!([sa("agents", "agentid-grant-g-1234abcd")])),
            disguised,
        ];
        let (roles, cluster_roles, bindings) = (shared(&roles), shared(&cluster_roles), shared(&bindings));
        let rbac =
            Rbac { roles: &roles, cluster_roles: &cluster_roles, role_bindings: &bindings, cluster_role_bindings: &[] };
        let secrets = [
            secret("agents", "agentid-fixer-credentials", ours.clone(), json!({})),
            secret("agents", "agentid-grant-g-1234abcd", ours.clone(), json!({})),
            // Labelled as the identity's own, but neither its credentials nor a grant's of it.
            secret("agents", "db-password", ours.clone(), json!({})),
            secret("agents", "agentid-grant-h-5678abcd", ours, json!({})),
        ];
        let found = exposure("agents", "fixer", &[base(), grant()], &rbac, &secrets[..]);
        let got: Vec<(Kind, &str)> = found.iter().map(|f| (f.kind, f.target.as_str())).collect();
        assert_eq!(
            got,
            [
                (Kind::AgentCredentials, "agentid-grant-h-5678abcd"),
                (Kind::Secret, "db-password"),
                (Kind::PodAsServiceAccount, "operator"),
            ]
        );
    }

    #[test]
    fn each_subject_form_reaches_exactly_its_principals_among_many() {
        let grant_sa = |i: usize| format!("agentid-grant-g{i}-1234abcd");
        let principals: Vec<Principal> = std::iter::once(base())
            .chain((0..50).map(|i| Principal {
                namespace: "agents".into(),
                name: grant_sa(i),
                via: format!("grant g{i}"),
            }))
            .collect();
        let read = json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]);
        let mint = json!([{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}]);
        let roles =
            shared(&[role("a", "read", read.clone()), role("b", "read", read), role("c", "mint", mint.clone())]);
        let cluster_roles = shared(&[cluster_role("mint", mint)]);
        let bindings = shared(&[
            // By ServiceAccount, and by ServiceAccount without a namespace in the agents' own.
            binding("a", "one", "Role", "read", json!([sa("agents", &grant_sa(7))])),
            binding("agents", "local", "ClusterRole", "mint", json!([{"kind": "ServiceAccount", "name": grant_sa(9)}])),
            // As the user name of a ServiceAccount.
            binding(
                "b",
                "user",
                "Role",
                "read",
                json!([{"kind": "User", "name": format!("system:serviceaccount:agents:{}", grant_sa(3))}]),
            ),
            // A group: every principal of the namespace.
            binding("c", "all", "Role", "mint", json!([{"kind": "Group", "name": "system:serviceaccounts:agents"}])),
            // Reaches nobody here: another namespace's ServiceAccount, another group.
            binding(
                "a",
                "other",
                "Role",
                "read",
                json!([sa("elsewhere", &grant_sa(7)), {"kind": "Group", "name": "system:serviceaccounts:x"}]),
            ),
        ]);
        let rbac =
            Rbac { roles: &roles, cluster_roles: &cluster_roles, role_bindings: &bindings, cluster_role_bindings: &[] };
        let secrets = [secret("a", "s-a", json!({}), json!({})), secret("b", "s-b", json!({}), json!({}))];
        let found = exposure("agents", "fixer", &principals, &rbac, &secrets[..]);
        let of = |kind: Kind| {
            let mut via: Vec<(String, String)> =
                found.iter().filter(|f| f.kind == kind).map(|f| (f.via.clone(), f.namespace.clone())).collect();
            via.sort();
            via
        };
        let at = |via: &str, ns: &str| (via.to_string(), ns.to_string());
        assert_eq!(of(Kind::Secret), vec![at("grant g3", "b"), at("grant g7", "a")]);
        let minting = of(Kind::TokenRequest);
        assert_eq!(minting.len(), principals.len() + 1, "the group reaches all 51 in c, and g9 in agents");
        assert!(minting.contains(&at("grant g9", "agents")));
        assert!(minting.contains(&at("base ServiceAccount", "c")));
    }

    #[test]
    fn resource_names_limit_what_is_readable() {
        let roles = [role(
            "prod",
            "one",
            json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tls"], "verbs": ["get"]}]),
        )];
        let bindings = [binding("prod", "b", "Role", "one", json!([sa("agents", "agentid-fixer")]))];
        let roles = shared(&roles);
        let bindings = shared(&bindings);
        let rbac = Rbac { roles: &roles, cluster_roles: &[], role_bindings: &bindings, cluster_role_bindings: &[] };
        let secrets = [
            secret("prod", "tls", json!({}), json!({})),
            secret("prod", "db-token", json!({}), json!({LEGACY_TOKEN_ANNOTATION: "db"})),
        ];
        let found = exposure("agents", "fixer", &[base()], &rbac, &secrets[..]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].target, "tls");
    }

    #[test]
    fn cluster_bindings_groups_wildcards_and_subresource_wildcards_count() {
        let cluster_roles = [
            cluster_role("everything", json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}])),
            cluster_role("exec", json!([{"apiGroups": [""], "resources": ["*/exec"], "verbs": ["create"]}])),
        ];
        let crbs: [ClusterRoleBinding; 1] = [obj(json!({
            "metadata": {"name": "oops"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "exec"},
            "subjects": [{"kind": "Group", "name": "system:serviceaccounts:agents"}]
        }))];
        let bindings = [
            binding(
                "ci",
                "admin",
                "ClusterRole",
                "everything",
                json!([{"kind": "User", "name": "system:serviceaccount:agents:agentid-fixer"}]),
            ),
            binding("ci", "deployer", "ClusterRole", "everything", json!([sa("ci", "deployer")])),
        ];
        let cluster_roles = shared(&cluster_roles);
        let bindings = shared(&bindings);
        let crbs = shared(&crbs);
        let rbac = Rbac::<Role> {
            roles: &[],
            cluster_roles: &cluster_roles,
            role_bindings: &bindings,
            cluster_role_bindings: &crbs,
        };
        let found = exposure("agents", "fixer", &[base()], &rbac, &[] as &[ObjectMeta]);
        let kinds: Vec<(Kind, &str)> = found.iter().map(|f| (f.kind, f.namespace.as_str())).collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::TokenRequest, "ci"),
                (Kind::LegacyTokenMint, "ci"),
                (Kind::PodAsServiceAccount, "ci"),
                (Kind::Impersonation, "ci"),
                (Kind::Impersonation, "ci"),
                (Kind::Impersonation, "ci"),
            ]
        );
        let pods = &found[2];
        assert_eq!(pods.target, "deployer");
        assert_eq!(
            pods.detail,
            "can create pods and exec into them in ci, where ServiceAccount(s) deployer hold rights"
        );
    }

    #[test]
    fn exec_alone_counts_only_where_powerful_service_accounts_live() {
        let cluster_roles =
            [cluster_role("exec", json!([{"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}]))];
        let bindings = [
            binding("quiet", "b", "ClusterRole", "exec", json!([sa("agents", "agentid-fixer")])),
            binding("busy", "b", "ClusterRole", "exec", json!([sa("agents", "agentid-fixer")])),
            binding("busy", "op", "ClusterRole", "exec", json!([sa("busy", "operator")])),
        ];
        let cluster_roles = shared(&cluster_roles);
        let bindings = shared(&bindings);
        let rbac = Rbac::<Role> {
            roles: &[],
            cluster_roles: &cluster_roles,
            role_bindings: &bindings,
            cluster_role_bindings: &[],
        };
        let found = exposure("agents", "fixer", &[base()], &rbac, &[] as &[ObjectMeta]);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].namespace.as_str(), found[0].target.as_str()), ("busy", "operator"));
        assert_eq!(found[0].detail, "can exec into pods in busy, where ServiceAccount(s) operator hold rights");
    }

    #[test]
    fn a_service_account_subject_without_namespace_is_in_the_bindings_namespace() {
        let roles = [role("agents", "read", json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]))];
        let bindings =
            [binding("agents", "b", "Role", "read", json!([{"kind": "ServiceAccount", "name": "agentid-fixer"}]))];
        let roles = shared(&roles);
        let bindings = shared(&bindings);
        let rbac = Rbac { roles: &roles, cluster_roles: &[], role_bindings: &bindings, cluster_role_bindings: &[] };
        let secrets = [secret("agents", "db-token", json!({}), json!({LEGACY_TOKEN_ANNOTATION: "db"}))];
        let found = exposure("agents", "fixer", &[base()], &rbac, &secrets[..]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, Kind::LegacyToken);
    }

    #[test]
    fn nothing_reached_means_no_findings() {
        let roles = [role(
            "prod",
            "view",
            json!([{"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get"]}]),
        )];
        // Bound to someone else, and to a same-named ServiceAccount in another namespace.
        let bindings = [
            binding("prod", "b", "Role", "view", json!([sa("prod", "agentid-fixer")])),
            binding("prod", "c", "Role", "view", json!([{"kind": "User", "name": "alice"}])),
        ];
        let roles = shared(&roles);
        let bindings = shared(&bindings);
        let rbac = Rbac { roles: &roles, cluster_roles: &[], role_bindings: &bindings, cluster_role_bindings: &[] };
        let secrets = [secret("prod", "db-token", json!({}), json!({LEGACY_TOKEN_ANNOTATION: "db"}))];
        assert!(exposure("agents", "fixer", &[base()], &rbac, &secrets[..]).is_empty());
    }
}
