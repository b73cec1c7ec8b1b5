//! Standing privilege: RBAC bindings, not made by agentid, that give something to an identity's
//! base ServiceAccount or to a grant's ServiceAccount — directly, or through the groups that hold
//! every ServiceAccount (of a namespace). Zero standing privilege means there must be none.

use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use kube::ResourceExt;

use super::names;

/// One binding that gives an identity standing privilege.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// `RoleBinding NS/NAME` or `ClusterRoleBinding NAME`.
    pub binding: String,
    /// The binding's namespace (None for a ClusterRoleBinding).
    pub namespace: Option<String>,
    /// The binding's name.
    pub name: String,
    /// The role it grants, e.g. `ClusterRole/view`.
    pub role: String,
    /// The subject that reaches the identity, as written in the binding.
    pub subject: Subject,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = match self.subject.kind.as_str() {
            "ServiceAccount" => format!(
                "ServiceAccount {}/{}",
                self.subject.namespace.as_deref().unwrap_or_default(),
                self.subject.name
            ),
            kind => format!("{kind} {}", self.subject.name),
        };
        write!(f, "{} grants {} to {who}", self.binding, self.role)
    }
}

/// Whether `subject` reaches the identity `identity` of namespace `ns`. A ServiceAccount subject
/// without a namespace (valid in a RoleBinding) is checked by [`reaches_in`].
pub fn reaches(subject: &Subject, ns: &str, identity: &str) -> bool {
    reaches_in(subject, None, ns, identity)
}

/// [`reaches`] for a subject of a binding in `binding_ns` (None: a ClusterRoleBinding): a
/// ServiceAccount subject without a namespace is in the binding's namespace, and the user name
/// `system:serviceaccount:NS:NAME` is that ServiceAccount too.
pub fn reaches_in(subject: &Subject, binding_ns: Option<&str>, ns: &str, identity: &str) -> bool {
    if let Some((sa_ns, sa)) = super::exposure::named_service_account(subject, binding_ns) {
        // The base ServiceAccount, or any grant's ServiceAccount of the namespace (they carry the
        // grant's name, not the identity's): a superset, for finding who a binding may concern
        // and what enforcement takes out; [`standing_privileges`] counts only the identity's
        // own active grants.
        return sa_ns == ns
            && (sa == names::identity_service_account(identity) || sa.starts_with(names::GRANT_OBJECT_PREFIX));
    }
    subject.kind == "Group"
        && (subject.name == "system:serviceaccounts"
            || subject.name.strip_prefix("system:serviceaccounts:") == Some(ns))
}

fn role(r: &RoleRef) -> String {
    format!("{}/{}", r.kind, r.name)
}

/// The shape of a RoleBinding agentid makes, judged by what it binds and never by its labels
/// (whoever may create a binding may also label it "managed by agentid").
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// An identity's requester binding: `agentid-ID-requester`, binding the Role of that name to
    /// the ServiceAccount `agentid-ID` of its namespace.
    Requester {
        /// The identity (of the binding's namespace).
        identity: String,
    },
    /// A grant's: `agentid-grant-…`, binding the Role of that name to the ServiceAccount of that
    /// name. Anyone who can read a grant's ServiceAccount name can make one of this shape
    /// elsewhere, so it is agentid's only where that grant's Roles are (see
    /// [`standing_privileges`]).
    Grant,
}

/// The shape of agentid's own `binding` has, if any.
pub fn own_shape(binding: &RoleBinding) -> Option<Shape> {
    let name = binding.name_any();
    let role = &binding.role_ref;
    if role.kind != "Role" || role.name != name {
        return None;
    }
    let namespace = binding.namespace().unwrap_or_default();
    // The ServiceAccount it may bind, and where (None: a grant's, in the grant's namespace).
    let (shape, account, account_ns) = match name.strip_prefix("agentid-").and_then(|n| n.strip_suffix("-requester")) {
        // An identity's name never starts with `grant-` (reserved for grants' objects), so a
        // grant's ServiceAccount can never pass for an identity's here.
        Some(identity) if !identity.starts_with("grant-") => (
            Shape::Requester { identity: identity.to_string() },
            names::identity_service_account(identity),
            Some(namespace.as_str()),
        ),
        _ if name.starts_with(names::GRANT_OBJECT_PREFIX) => (Shape::Grant, name.clone(), None),
        _ => return None,
    };
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    let bound = !subjects.is_empty()
        && subjects.iter().all(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && account_ns.is_none_or(|ns| s.namespace.as_deref().unwrap_or(ns) == ns)
        });
    bound.then_some(shape)
}

/// Whether `binding` has the shape of one agentid makes ([`own_shape`]).
pub fn agentids_own(binding: &RoleBinding) -> bool {
    own_shape(binding).is_some()
}

/// One of the identity's active grants, as drift needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveGrant {
    /// Its ServiceAccount (in the identity's namespace).
    pub service_account: String,
    /// The namespaces its Roles and RoleBindings are in.
    pub targets: Vec<String>,
}

/// What drift needs of an identity's active `grants` (those without a ServiceAccount yet are
/// left out), as [`super::exposure::principals`] does for exposure.
pub fn active_grants<'a>(grants: impl IntoIterator<Item = &'a crate::api::AccessGrant>) -> Vec<ActiveGrant> {
    grants
        .into_iter()
        .filter_map(|g| {
            let service_account = g.status.as_ref()?.service_account_name.clone()?;
            let rules = g.spec.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default();
            Some(ActiveGrant { service_account, targets: super::desired::GrantObjects::target_namespaces(rules) })
        })
        .collect()
}

/// The label the apiserver puts on the cluster's default RBAC objects.
pub const BOOTSTRAPPING_LABEL: &str = "kubernetes.io/bootstrapping";

/// The cluster's default ClusterRoleBindings that reach every ServiceAccount, each binding the
/// ClusterRole of its name to a group (the apiserver makes and keeps them).
const DEFAULT_SERVICE_ACCOUNT_BINDINGS: &[&str] = &["system:service-account-issuer-discovery"];

/// Whether `subject` of ClusterRoleBinding `b` is the cluster's default: one of
/// [`DEFAULT_SERVICE_ACCOUNT_BINDINGS`], labelled as the apiserver labels it, binding the role of
/// its own name, and only for a group subject — the default never names one ServiceAccount, and
/// a ServiceAccount added to it is drift like any other. A label alone proves nothing: anyone
/// may set it.
fn cluster_default(b: &ClusterRoleBinding, subject: &Subject) -> bool {
    let name = b.name_any();
    b.labels().get(BOOTSTRAPPING_LABEL).map(String::as_str) == Some("rbac-defaults")
        && DEFAULT_SERVICE_ACCOUNT_BINDINGS.contains(&name.as_str())
        && b.role_ref.kind == "ClusterRole"
        && b.role_ref.name == name
        && subject.kind == "Group"
}

/// Whether enforcement may take this subject out of a binding: only the identity's own
/// ServiceAccounts. A group reaches every ServiceAccount (of a namespace); removing it would
/// change what other workloads may do, so it is reported, never removed.
pub fn removable(subject: &Subject) -> bool {
    subject.kind == "ServiceAccount"
}

/// Every binding not made by agentid that reaches the identity — its base ServiceAccount, the
/// ServiceAccount of one of its active `grants`, or a group holding them — sorted. A binding of
/// a grant's shape is agentid's only in a namespace that grant's Roles are in.
pub fn standing_privileges(
    ns: &str,
    identity: &str,
    grants: &[ActiveGrant],
    role_bindings: &[std::sync::Arc<RoleBinding>],
    cluster_role_bindings: &[std::sync::Arc<ClusterRoleBinding>],
) -> Vec<Finding> {
    let base = names::identity_service_account(identity);
    let reaches_here =
        |s: &Subject, binding_ns: Option<&str>| match super::exposure::named_service_account(s, binding_ns) {
            Some((sa_ns, sa)) => sa_ns == ns && (sa == base || grants.iter().any(|g| g.service_account == sa)),
            None => reaches_in(s, binding_ns, ns, identity),
        };
    let exempt = |b: &RoleBinding| match own_shape(b) {
        Some(Shape::Requester { .. }) => true,
        Some(Shape::Grant) => {
            let (name, namespace) = (b.name_any(), b.namespace().unwrap_or_default());
            grants.iter().any(|g| g.service_account == name && g.targets.contains(&namespace))
        }
        None => false,
    };
    let mut findings = Vec::new();
    for b in role_bindings.iter().filter(|b| !exempt(b)) {
        let namespace = b.namespace().unwrap_or_default();
        for subject in b.subjects.iter().flatten().filter(|s| reaches_here(s, Some(&namespace))) {
            findings.push(Finding {
                binding: format!("RoleBinding {namespace}/{}", b.name_any()),
                namespace: Some(namespace.clone()),
                name: b.name_any(),
                role: role(&b.role_ref),
                subject: subject.clone(),
            });
        }
    }
    for b in cluster_role_bindings {
        for subject in b.subjects.iter().flatten().filter(|s| reaches_here(s, None) && !cluster_default(b, s)) {
            findings.push(Finding {
                binding: format!("ClusterRoleBinding {}", b.name_any()),
                namespace: None,
                name: b.name_any(),
                role: role(&b.role_ref),
                subject: subject.clone(),
            });
        }
    }
    findings.sort_by(|a, b| {
        (&a.binding, &a.subject.kind, &a.subject.name).cmp(&(&b.binding, &b.subject.kind, &b.subject.name))
    });
    findings.dedup();
    findings
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rb(ns: &str, name: &str, subjects: serde_json::Value, labels: serde_json::Value) -> RoleBinding {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": subjects
        }))
        .expect("binding")
    }

    fn shared<T>(items: impl IntoIterator<Item = T>) -> Vec<std::sync::Arc<T>> {
        items.into_iter().map(std::sync::Arc::new).collect()
    }

    fn sa(ns: &str, name: &str) -> serde_json::Value {
        json!({"kind": "ServiceAccount", "name": name, "namespace": ns})
    }

    #[test]
    fn finds_direct_grant_and_group_bindings_but_not_agentids_own() {
        let bindings = vec![
            rb("prod", "direct", json!([sa("agents", "agentid-fixer")]), json!({})),
            rb("prod", "grant-sa", json!([sa("agents", "agentid-grant-x-1234abcd")]), json!({})),
            rb("prod", "all-sas", json!([{"kind": "Group", "name": "system:serviceaccounts"}]), json!({})),
            rb("prod", "ns-sas", json!([{"kind": "Group", "name": "system:serviceaccounts:agents"}]), json!({})),
            rb("prod", "other-ns-sas", json!([{"kind": "Group", "name": "system:serviceaccounts:other"}]), json!({})),
            rb("prod", "other-identity", json!([sa("agents", "agentid-other")]), json!({})),
            rb("prod", "same-name-elsewhere", json!([sa("elsewhere", "agentid-fixer")]), json!({})),
            own("agents", "agentid-fixer-requester", json!([sa("agents", "agentid-fixer")])),
            own("prod", "agentid-grant-x-1234abcd", json!([sa("agents", "agentid-grant-x-1234abcd")])),
        ];
        let found = standing_privileges("agents", "fixer", &grant_x(), &shared(bindings), &[]);
        let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, vec!["all-sas", "direct", "grant-sa", "ns-sas"]);
        assert!(found.iter().all(|f| f.namespace.as_deref() == Some("prod")));
        assert_eq!(
            found[1].to_string(),
            "RoleBinding prod/direct grants ClusterRole/view to ServiceAccount agents/agentid-fixer"
        );
    }

    /// The identity's one active grant: its ServiceAccount, its Roles in `prod`.
    fn grant_x() -> Vec<ActiveGrant> {
        vec![ActiveGrant { service_account: "agentid-grant-x-1234abcd".into(), targets: vec!["prod".into()] }]
    }

    /// A binding shaped as agentid makes them: the Role of its own name.
    fn own(ns: &str, name: &str, subjects: serde_json::Value) -> RoleBinding {
        let mut b = rb(ns, name, subjects, json!({names::MANAGED_BY_LABEL: names::MANAGED_BY}));
        b.role_ref.kind = "Role".into();
        b.role_ref.name = name.into();
        b
    }

    #[test]
    fn labels_do_not_make_a_binding_agentids_own_or_a_cluster_default() {
        let ours = json!({names::MANAGED_BY_LABEL: names::MANAGED_BY, names::IDENTITY_LABEL: "fixer"});
        let mut to_cluster_role = own("agents", "agentid-fixer-requester", json!([sa("agents", "agentid-fixer")]));
        to_cluster_role.role_ref.kind = "ClusterRole".into();
        let mut other_role = own("agents", "agentid-fixer-requester", json!([sa("agents", "agentid-fixer")]));
        other_role.role_ref.name = "admin".into();
        let bindings = vec![
            // Labelled as agentid's, binding something else.
            rb("prod", "labelled", json!([sa("agents", "agentid-fixer")]), ours.clone()),
            to_cluster_role,
            other_role,
            // agentid's name and role, with one more subject.
            own(
                "agents",
                "agentid-fixer-requester",
                json!([sa("agents", "agentid-fixer"), {"kind": "Group", "name": "system:serviceaccounts:agents"}]),
            ),
            // A requester binding made elsewhere, for a ServiceAccount of another namespace.
            own("prod", "agentid-fixer-requester", json!([sa("agents", "agentid-fixer")])),
            // A grant's name, binding the base ServiceAccount, or another grant's.
            own("prod", "agentid-grant-x-1234abcd", json!([sa("agents", "agentid-fixer")])),
            own("prod", "agentid-grant-x-1234abcd-requester", json!([sa("agents", "agentid-grant-x-1234abcd")])),
            // The grant's exact shape, where its Roles are not.
            own("staging", "agentid-grant-x-1234abcd", json!([sa("agents", "agentid-grant-x-1234abcd")])),
            // Labelled as a cluster default.
            rb(
                "prod",
                "system:backdoor",
                json!([sa("agents", "agentid-fixer")]),
                json!({"kubernetes.io/bootstrapping": "rbac-defaults"}),
            ),
        ];
        let found = standing_privileges("agents", "fixer", &grant_x(), &shared(bindings), &[]);
        let names: Vec<String> = found.iter().map(|f| format!("{}:{}", f.binding, f.role)).collect();
        assert_eq!(
            names,
            [
                "RoleBinding agents/agentid-fixer-requester:Role/agentid-fixer-requester",
                "RoleBinding agents/agentid-fixer-requester:ClusterRole/agentid-fixer-requester",
                "RoleBinding agents/agentid-fixer-requester:Role/admin",
                "RoleBinding agents/agentid-fixer-requester:Role/agentid-fixer-requester",
                "RoleBinding prod/agentid-fixer-requester:Role/agentid-fixer-requester",
                "RoleBinding prod/agentid-grant-x-1234abcd:Role/agentid-grant-x-1234abcd",
                "RoleBinding prod/agentid-grant-x-1234abcd-requester:Role/agentid-grant-x-1234abcd-requester",
                "RoleBinding prod/labelled:ClusterRole/view",
                "RoleBinding prod/system:backdoor:ClusterRole/view",
                "RoleBinding staging/agentid-grant-x-1234abcd:Role/agentid-grant-x-1234abcd",
            ]
        );

        let crb = |name: &str, role: &str, subjects: serde_json::Value| -> ClusterRoleBinding {
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": subjects
            }))
            .expect("binding")
        };
        let all = json!([{"kind": "Group", "name": "system:serviceaccounts"}]);
        let discovery = "system:service-account-issuer-discovery";
        let defaults = [
            crb(discovery, discovery, all.clone()),
            crb("system:backdoor", "system:backdoor", all.clone()),
            crb("backdoor", "backdoor", all),
        ];
        let found = standing_privileges("agents", "fixer", &[], &[], &shared(defaults));
        let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["backdoor", "system:backdoor"]);
        // The default, with the identity's ServiceAccount added to it.
        let added = crb(
            discovery,
            discovery,
            json!([{"kind": "Group", "name": "system:serviceaccounts"}, sa("agents", "agentid-fixer")]),
        );
        let found = standing_privileges("agents", "fixer", &[], &[], &shared([added]));
        assert_eq!(found.iter().map(|f| f.subject.kind.as_str()).collect::<Vec<_>>(), ["ServiceAccount"]);
    }

    #[test]
    fn agentids_own_bindings_are_known_by_their_shape() {
        assert!(agentids_own(&own("agents", "agentid-fixer-requester", json!([sa("agents", "agentid-fixer")]))));
        let implicit = json!([{"kind": "ServiceAccount", "name": "agentid-fixer"}]);
        assert!(agentids_own(&own("agents", "agentid-fixer-requester", implicit)));
        assert!(agentids_own(&own(
            "prod",
            "agentid-grant-x-1234abcd",
            json!([sa("agents", "agentid-grant-x-1234abcd")])
        )));
        assert!(!agentids_own(&own("agents", "agentid-fixer-requester", json!([]))));
        let as_user = json!([{"kind": "User", "name": "system:serviceaccount:agents:agentid-fixer"}]);
        assert!(!agentids_own(&own("agents", "agentid-fixer-requester", as_user)));
        assert!(!agentids_own(&own("agents", "fixer-requester", json!([sa("agents", "fixer")]))));
    }

    #[test]
    fn cluster_role_bindings_count_too() {
        let crb: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "oops"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [sa("agents", "agentid-fixer")]
        }))
        .expect("binding");
        let found = standing_privileges("agents", "fixer", &[], &[], &[crb.into()]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].binding, "ClusterRoleBinding oops");
        assert_eq!(found[0].namespace, None);
    }

    #[test]
    fn namespace_less_subjects_and_service_account_user_names_count() {
        let bindings = vec![
            rb("agents", "implicit-ns", json!([{"kind": "ServiceAccount", "name": "agentid-fixer"}]), json!({})),
            rb("prod", "implicit-elsewhere", json!([{"kind": "ServiceAccount", "name": "agentid-fixer"}]), json!({})),
            rb(
                "prod",
                "as-user",
                json!([{"kind": "User", "name": "system:serviceaccount:agents:agentid-fixer"}]),
                json!({}),
            ),
        ];
        let found = standing_privileges("agents", "fixer", &grant_x(), &shared(bindings), &[]);
        let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, vec!["implicit-ns", "as-user"]);
    }

    #[test]
    fn only_service_accounts_are_ever_removed() {
        assert!(removable(&serde_json::from_value(sa("agents", "agentid-fixer")).expect("subject")));
        assert!(!removable(
            &serde_json::from_value(json!({"kind": "Group", "name": "system:serviceaccounts"})).expect("subject")
        ));
    }
}
