//! `AgentIdentity`: the governed identity of one AI agent. By itself it can do nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::duration;

/// An AI agent's governed identity: who owns it, what it is for, and the ceiling for every grant
/// it may receive. The identity's own ServiceAccount holds no privilege; access only ever comes
/// from an AccessGrant, which expires.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentid.dev",
    version = "v1alpha1",
    kind = "AgentIdentity",
    plural = "agentidentities",
    singular = "agentidentity",
    shortname = "aid",
    category = "agentid",
    namespaced,
    status = "AgentIdentityStatus",
    derive = "PartialEq",
    doc = "The governed identity of one AI agent: owner, purpose and the ceiling for its grants.",
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.owner"),
    printcolumn(
        name = "Max-Grant",
        type_ = "string",
        json_path = ".spec.maxGrantDuration"
    ),
    printcolumn(name = "Active", type_ = "integer", json_path = ".status.activeGrants"),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspended"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Purpose",
        type_ = "string",
        json_path = ".spec.purpose",
        priority = 1
    ),
    printcolumn(
        name = "Retire-At",
        type_ = "string",
        json_path = ".spec.retireAt",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = Rule::new("size(self.metadata.name) <= 63").message("an AgentIdentity name must be at most 63 characters: pods carry it in the label agentid.dev/identity"),
    validation = Rule::new("!self.metadata.name.startsWith('grant-')").message("AgentIdentity names may not start with 'grant-': agentid reserves that prefix for per-grant ServiceAccounts")
)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentitySpec {
    /// The accountable human or team.
    #[x_kube(validation = Rule::new("self.trim().size() > 0").message("owner must name the accountable human or team"))]
    #[schemars(length(max = 253))]
    pub owner: String,

    /// What the agent is for, in words a reviewer understands.
    #[x_kube(validation = Rule::new("self.trim().size() > 0").message("purpose must say what the agent is for"))]
    #[schemars(length(max = 1024))]
    pub purpose: String,

    /// Ceiling for the duration of any grant of this identity (10s..24h).
    #[serde(default = "default_max_grant_duration")]
    #[x_kube(validation = duration::format_rule(), validation = duration::range_rule("10s", "24h"))]
    #[schemars(length(max = 32))]
    pub max_grant_duration: String,

    /// Namespaces that grants of this identity may target. Empty: no grant can be issued.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self.all(ns, ns.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))").message("allowedNamespaces must hold namespace names (lowercase letters, digits and '-')"))]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    pub allowed_namespaces: Vec<String>,

    /// Who may approve this identity's grants that need a human.
    #[serde(default)]
    pub approval: ApprovalPolicy,

    /// Kill switch: true revokes every grant of this identity at once and issues none.
    #[serde(default)]
    pub suspended: bool,

    /// Remove standing privilege: when a RoleBinding or ClusterRoleBinding not made by agentid
    /// gives something to this identity's ServiceAccounts, take that subject out of it (and say so
    /// in an Event). False: only report it (condition StandingPrivilegeDetected).
    #[serde(default)]
    pub enforce: bool,

    /// After this instant the identity behaves as suspended, for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<Time>,
}

fn default_max_grant_duration() -> String {
    "1h".to_string()
}

/// Who may approve an identity's grants, and how many of them must.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalPolicy {
    /// Users and groups whose members may approve (they also need RBAC verb `approve` on
    /// `accessgrants`).
    #[serde(default)]
    pub approvers: Approvers,

    /// Distinct approvers needed before a grant that needs approval is issued (1..5).
    #[serde(default = "default_required_approvals")]
    #[schemars(range(min = 1, max = 5))]
    pub required_approvals: i32,

    /// A grant still unapproved after this long expires without ever being issued (10s..168h).
    #[serde(default = "default_pending_timeout")]
    #[x_kube(validation = duration::format_rule(), validation = duration::range_rule("10s", "168h"))]
    #[schemars(length(max = 32))]
    pub pending_timeout: String,

    /// Resources any grant of this identity may touch only with approval, whatever the verb
    /// (e.g. the ConfigMap holding production feature flags).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub protected_resources: Vec<ProtectedResource>,
}

/// A resource that always needs approval.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedResource {
    /// The API group; `""` is the core group.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub api_group: String,
    /// The resource, e.g. `configmaps`.
    #[x_kube(validation = Rule::new("self.size() > 0").message("resource must name a resource"))]
    #[schemars(length(max = 253))]
    pub resource: String,
    /// Only these objects; empty: every object of the resource.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 253)))]
    pub resource_names: Vec<String>,
    /// Only in these namespaces; empty: every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    pub namespaces: Vec<String>,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        Self {
            approvers: Approvers::default(),
            required_approvals: default_required_approvals(),
            pending_timeout: default_pending_timeout(),
            protected_resources: Vec::new(),
        }
    }
}

fn default_required_approvals() -> i32 {
    1
}

fn default_pending_timeout() -> String {
    "24h".to_string()
}

/// Users and groups allowed to approve.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Approvers {
    /// User names, as the apiserver authenticates them.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self.all(u, !u.startsWith('system:serviceaccount:'))").message("approvers must be humans: ServiceAccounts cannot approve"))]
    #[schemars(length(max = 64), inner(length(max = 253)))]
    pub users: Vec<String>,

    /// Group names, as the apiserver authenticates them.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self.all(g, !g.startsWith('system:serviceaccounts'))").message("approver groups must be groups of humans, not of ServiceAccounts"))]
    #[schemars(length(max = 64), inner(length(max = 253)))]
    pub groups: Vec<String>,
}

/// What agentid observed and made for an identity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentityStatus {
    /// The base ServiceAccount: the agent's pods run as it, and it holds no privilege.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,

    /// The Secret mounted into the agent's pods, one entry per active grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,

    /// Grants of this identity that currently hold a credential.
    #[serde(default)]
    pub active_grants: i32,

    /// What the identity can reach through RBAC that yields more credentials; the details come
    /// from `kubectl agentid exposure NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposure: Option<ExposureSummary>,

    /// Ready, Reconciling, Stalled, and warnings such as StandingPrivilegeDetected and
    /// CredentialExposureDetected.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Counts of what an identity (its base ServiceAccount and its active grants) can reach that
/// yields a credential it was not granted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExposureSummary {
    /// Readable long-lived `kubernetes.io/service-account-token` Secrets.
    pub legacy_tokens: i32,
    /// Readable Secrets of any type, legacy tokens and other agents' credentials included.
    pub secrets: i32,
    /// Ways to mint ServiceAccount tokens (`serviceaccounts/token`, or creating and reading
    /// token Secrets).
    pub token_minting: i32,
    /// Namespaces where it can create pods or exec into them while more powerful
    /// ServiceAccounts live there.
    pub pods: i32,
    /// Impersonation rights.
    pub impersonation: i32,
}
