//! `Approval`: one human's decision on one exact AccessGrant.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A human's decision on an AccessGrant that needs approval. Bound to the grant's UID, so a grant
/// deleted and recreated under the same name starts from zero. Immutable once created.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentid.dev",
    version = "v1alpha1",
    kind = "Approval",
    plural = "approvals",
    singular = "approval",
    shortname = "agapproval",
    category = "agentid",
    namespaced,
    status = "ApprovalStatus",
    derive = "PartialEq",
    doc = "One authorized human's decision (Approve or Deny) on one exact AccessGrant.",
    printcolumn(name = "Grant", type_ = "string", json_path = ".spec.grant"),
    printcolumn(name = "Decision", type_ = "string", json_path = ".spec.decision"),
    printcolumn(name = "Approver", type_ = "string", json_path = ".spec.approver"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".spec.reason", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("Approval spec is immutable: a decision cannot be edited; delete it and create a new Approval"))]
#[x_kube(validation = Rule::new("self.decision != 'Deny' || self.reason.trim().size() > 0").message("a Deny must give a reason"))]
#[serde(rename_all = "camelCase")]
pub struct ApprovalSpec {
    /// The AccessGrant, in the same namespace, this decision is about.
    #[x_kube(validation = Rule::new("self.size() > 0").message("grant must name an AccessGrant in this namespace"))]
    #[schemars(length(max = 253))]
    pub grant: String,

    /// The grant's metadata.uid: binds the decision to that exact object.
    #[serde(rename = "grantUID")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("grantUID must be the AccessGrant's metadata.uid"))]
    #[schemars(length(max = 64))]
    pub grant_uid: String,

    /// Approve or Deny.
    pub decision: Decision,

    /// Why; required for Deny.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub reason: String,

    /// The approving user; must equal the user who creates this object.
    #[x_kube(validation = Rule::new("self.size() > 0").message("approver must be your user name"))]
    #[schemars(length(max = 253))]
    pub approver: String,
}

/// An approver's decision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Decision {
    /// Allow the grant to be issued (counts toward requiredApprovals).
    Approve,
    /// End the grant; one Deny is final.
    Deny,
}

/// Whether agentid counted this Approval.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStatus {
    /// Counted, or why not.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
