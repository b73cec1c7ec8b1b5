//! `AccessGrant`: a request for a scoped credential that expires on its own.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration;

/// A just-in-time request for access on behalf of an AgentIdentity: scoped to exact rules,
/// limited in time, and held for a human when it is destructive or widens privilege.
/// The spec cannot change after creation: a new scope is a new grant.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentid.dev",
    version = "v1alpha1",
    kind = "AccessGrant",
    plural = "accessgrants",
    singular = "accessgrant",
    shortname = "agrant",
    category = "agentid",
    namespaced,
    status = "AccessGrantStatus",
    derive = "PartialEq",
    doc = "A scoped, expiring credential request for an AgentIdentity.",
    printcolumn(name = "Identity", type_ = "string", json_path = ".spec.identity"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Needs-Approval",
        type_ = "boolean",
        json_path = ".status.requiresApproval"
    ),
    printcolumn(name = "Duration", type_ = "string", json_path = ".spec.duration"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Requested-By",
        type_ = "string",
        json_path = ".status.requestedBy",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".spec.reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = Rule::new("size(self.metadata.name) <= 63").message("an AccessGrant name must be at most 63 characters: it names the grant's credential entries and objects")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("AccessGrant spec is immutable: a new scope is a new grant, so create another AccessGrant"))]
#[x_kube(validation = Rule::new("has(self.kubernetes)").message("spec.kubernetes is required: it holds the rules the credential will carry"))]
#[serde(rename_all = "camelCase")]
pub struct AccessGrantSpec {
    /// The AgentIdentity, in the same namespace, that will hold the credential.
    #[x_kube(validation = Rule::new("self.size() > 0").message("identity must name an AgentIdentity in this namespace"))]
    #[schemars(length(max = 253))]
    pub identity: String,

    /// How long the credential lives once issued (10s..24h, and at most the identity's
    /// maxGrantDuration).
    #[x_kube(validation = duration::format_rule(), validation = duration::range_rule("10s", "24h"))]
    #[schemars(length(max = 32))]
    pub duration: String,

    /// Why the access is needed; shown to approvers and recorded in the audit trail.
    #[x_kube(validation = Rule::new("self.trim().size() > 0").message("reason must say why the access is needed"))]
    #[schemars(length(max = 1024))]
    pub reason: String,

    /// Kubernetes API access: RBAC-like rules, each bound to one namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesAccess>,
}

/// Access to the Kubernetes API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesAccess {
    /// What the credential may do; nothing else is allowed.
    #[x_kube(validation = Rule::new("self.size() > 0").message("rules must hold at least one rule"))]
    #[schemars(length(max = 32))]
    pub rules: Vec<KubernetesRule>,
}

/// One RBAC PolicyRule, bound to one namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesRule {
    /// The namespace the rule applies in.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("namespace must be a namespace name (lowercase letters, digits and '-')"))]
    #[schemars(length(max = 63))]
    pub namespace: String,

    /// API groups; `""` is the core group.
    #[x_kube(validation = Rule::new("self.size() > 0").message("apiGroups must hold at least one entry (\"\" for the core group)"))]
    #[schemars(length(max = 16), inner(length(max = 253)))]
    pub api_groups: Vec<String>,

    /// Resources, e.g. `deployments` or `pods/log`.
    #[x_kube(validation = Rule::new("self.size() > 0").message("resources must name at least one resource"))]
    #[x_kube(validation = Rule::new("self.all(r, r.size() > 0)").message("resources must not hold empty names"))]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    pub resources: Vec<String>,

    /// Verbs, e.g. `get`, `list`, `patch`, `delete`.
    #[x_kube(validation = Rule::new("self.size() > 0").message("verbs must name at least one verb"))]
    #[x_kube(validation = Rule::new("self.all(v, v.size() > 0)").message("verbs must not hold empty names"))]
    #[schemars(length(max = 16), inner(length(max = 63)))]
    pub verbs: Vec<String>,

    /// Limit the rule to these object names. Empty: every object of the resources.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 253)))]
    pub resource_names: Vec<String>,
}

/// Where a grant stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum GrantPhase {
    /// Accepted, not yet decided or issued.
    Pending,
    /// Needs approval; holds no credential.
    AwaitingApproval,
    /// Credential issued and valid until expiresAt.
    Active,
    /// Ran its course (or waited too long for approval); credential revoked.
    Expired,
    /// Ended early (deleted, identity suspended, retired or removed); credential revoked.
    Revoked,
    /// An approver denied it; never issued.
    Denied,
    /// Outside the identity's ceiling; never issued.
    Rejected,
}

impl GrantPhase {
    /// Every phase, in lifecycle order.
    pub const ALL: [GrantPhase; 7] = [
        Self::Pending,
        Self::AwaitingApproval,
        Self::Active,
        Self::Expired,
        Self::Revoked,
        Self::Denied,
        Self::Rejected,
    ];

    /// Terminal phases never change again and hold no credential.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Expired | Self::Revoked | Self::Denied | Self::Rejected)
    }
}

/// One approver's decision as agentid counted it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRecord {
    /// The approving user, as authenticated by the apiserver.
    pub approver: String,
    /// The Approval object that carried the decision.
    pub approval: String,
    /// When agentid counted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Time>,
}

/// What agentid decided and issued for a grant. Never holds secret material.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AccessGrantStatus {
    /// Pending | AwaitingApproval | Active | Expired | Revoked | Denied | Rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<GrantPhase>,

    /// Computed by agentid from the rules, never taken from the requester.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires_approval: Option<bool>,

    /// Why a human must approve, in words (e.g. "destructive: delete persistentvolumeclaims/db-volume in staging").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approval_reasons: Vec<String>,

    /// Who created the grant, as recorded by admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,

    /// Approvals that counted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<ApprovalRecord>,

    /// When the credential was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,

    /// When the credential stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// When agentid finished revoking it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Time>,

    /// The grant's own ServiceAccount: what audit logs show for the agent's calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,

    /// Secret with keys token, kubeconfig, ca.crt, expires-at, scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,

    /// Ready, Reconciling, Stalled and domain conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
