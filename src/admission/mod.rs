//! Admission: agentid's webhook. Pure functions decide over an AdmissionRequest plus the cluster
//! facts they need; `server` does the I/O (TLS, lookups) and `register` installs the webhook
//! configurations (failurePolicy Fail: if agentid's admission is down, nothing it guards passes).
//!
//! What it enforces:
//! - AccessGrant CREATE: the creating user is recorded in `agentid.dev/requested-by`, where the
//!   requester cannot choose it, and the revocation finalizer is added (so the operator's first
//!   reconcile need not add it: one write and one watch round trip less per grant); an identity's
//!   base ServiceAccount may request grants only for its own identity. UPDATE: the record cannot
//!   change.
//! - Approval CREATE: the approver is the creating user, not a ServiceAccount, not the requester,
//!   listed by the identity, holds RBAC verb `approve`, and the grant exists with that UID. The
//!   approver's groups are recorded in `agentid.dev/approver-groups`. UPDATE: records cannot change.

pub mod certs;
pub mod pods;
pub mod register;
pub mod server;

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use kube::{
    ResourceExt,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, Operation},
    },
};
use serde_json::Value;

use crate::{
    api::{AccessGrant, AgentIdentity, Approval},
    policy::{
        approval::{self, APPROVER_GROUPS, Approver, REQUESTED_BY},
        decide,
        install::Installation,
        names::SETTLED_LABEL,
    },
};

/// Namespaces that no identity may open to agents: the pod webhook does not guard them.
pub const NEVER_DELEGATED: &[&str] = &["kube-system"];

/// The namespaces an AgentIdentity change newly opens to agents (all of them on CREATE).
pub fn newly_allowed(req: &AdmissionRequest<DynamicObject>) -> Result<Vec<String>, String> {
    let allowed = |obj: &Option<DynamicObject>| -> Result<Vec<String>, String> {
        Ok(typed::<AgentIdentity>(obj)?.map(|i| i.spec.allowed_namespaces).unwrap_or_default())
    };
    let new = allowed(&req.object)?;
    let old = if req.operation == Operation::Update { allowed(&req.old_object)? } else { vec![] };
    let mut added: Vec<String> = new.into_iter().filter(|n| !old.contains(n)).collect();
    added.sort();
    added.dedup();
    Ok(added)
}

/// The validating webhook for AgentIdentities: whoever lets an identity's grants into a namespace
/// must be allowed to delegate there (RBAC verb `delegate` on `agentidentities` in that
/// namespace); `not_delegable` lists those the authorizer refused.
pub fn validate_identity(
    req: &AdmissionRequest<DynamicObject>,
    own_namespace: Option<&str>,
    installation: &Installation,
    not_delegable: &[String],
) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    let added = match newly_allowed(req) {
        Ok(added) => added,
        Err(e) => return response.deny(e),
    };
    // Outside the installation agentid has no rights. Only what is new is checked, so that an
    // identity left outside by a narrower installation can still be narrowed, or deleted.
    let home = req.namespace.as_deref().unwrap_or_default();
    let home_checked = if req.operation == Operation::Create { home } else { "" };
    let scope = Installation {
        agent_namespaces: if home_checked.is_empty() { vec![] } else { installation.agent_namespaces.clone() },
        target_namespaces: installation.target_namespaces.clone(),
    };
    if let Err(message) = scope.check_identity(home_checked, &added) {
        return response.deny(message);
    }
    let forbidden: Vec<&String> =
        added.iter().filter(|n| NEVER_DELEGATED.contains(&n.as_str()) || Some(n.as_str()) == own_namespace).collect();
    if !forbidden.is_empty() {
        return response
            .deny(format!("allowedNamespaces may not include {forbidden:?}: agentid does not guard pods there"));
    }
    if !not_delegable.is_empty() {
        let user = req.user_info.username.as_deref().unwrap_or("");
        return response.deny(format!(
            "{user} may not open namespace(s) {not_delegable:?} to agents: that needs RBAC verb delegate on agentidentities.agentid.dev in each"
        ));
    }
    response
}

/// The cluster facts an Approval is checked against.
#[derive(Debug, Clone, Default)]
pub struct ApprovalFacts {
    /// The AccessGrant the Approval names, if it exists.
    pub grant: Option<AccessGrant>,
    /// That grant's AgentIdentity, if it exists.
    pub identity: Option<AgentIdentity>,
    /// The authorizer's answer: may the user `approve` the grant?
    pub may_approve: bool,
}

fn typed<K: serde::de::DeserializeOwned>(obj: &Option<DynamicObject>) -> Result<Option<K>, String> {
    obj.as_ref()
        .map(|o| serde_json::to_value(o).and_then(serde_json::from_value).map_err(|e| format!("malformed object: {e}")))
        .transpose()
}

/// Adds `finalizer` unless the object already carries it.
fn add_finalizer(obj: &DynamicObject, finalizer: &str) -> Vec<PatchOperation> {
    let op = match &obj.metadata.finalizers {
        Some(list) if list.iter().any(|f| f == finalizer) => return vec![],
        Some(_) => AddOperation {
            path: PointerBuf::from_tokens(["metadata", "finalizers", "-"]),
            value: Value::String(finalizer.into()),
        },
        None => AddOperation {
            path: PointerBuf::from_tokens(["metadata", "finalizers"]),
            value: serde_json::json!([finalizer]),
        },
    };
    vec![PatchOperation::Add(op)]
}

/// Sets one annotation, creating the annotations map if needed.
fn annotate(obj: &DynamicObject, key: &str, value: &str) -> Patch {
    let op = if obj.metadata.annotations.is_some() {
        AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations", key]),
            value: Value::String(value.into()),
        }
    } else {
        AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations"]),
            value: serde_json::json!({ key: value }),
        }
    };
    Patch(vec![PatchOperation::Add(op)])
}

fn with_patch(response: AdmissionResponse, patch: Patch) -> AdmissionResponse {
    // Serializing a JSON patch cannot fail; if it ever did, refusing is the safe answer.
    match response.clone().with_patch(patch) {
        Ok(r) => r,
        Err(e) => response.deny(format!("agentid could not build its patch: {e}")),
    }
}

/// The mutating webhook: records who created an AccessGrant (and adds its finalizer), and an
/// approver's groups.
pub fn mutate(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    if req.operation != Operation::Create {
        return response;
    }
    let Some(obj) = req.object.as_ref() else {
        return response.deny("the request carries no object");
    };
    match req.kind.kind.as_str() {
        "AccessGrant" => {
            let Patch(mut ops) = annotate(obj, REQUESTED_BY, req.user_info.username.as_deref().unwrap_or(""));
            ops.extend(add_finalizer(obj, crate::policy::names::GRANT_FINALIZER));
            with_patch(response, Patch(ops))
        }
        "Approval" => {
            let groups = req.user_info.groups.clone().unwrap_or_default();
            let json = serde_json::to_string(&groups).unwrap_or_else(|_| "[]".into());
            with_patch(response, annotate(obj, APPROVER_GROUPS, &json))
        }
        _ => response,
    }
}

/// If `username` is an identity's base ServiceAccount, that identity's namespace and name.
fn base_identity(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, sa) = rest.split_once(':')?;
    let identity = sa.strip_prefix("agentid-")?;
    // Per-grant ServiceAccounts are `agentid-grant-…`; identities cannot be named `grant-…`.
    (!identity.starts_with("grant-")).then_some((namespace, identity))
}

fn annotation_changed(old: &DynamicObject, new: &DynamicObject, key: &str) -> bool {
    old.annotations().get(key) != new.annotations().get(key)
}

/// The validating webhook for AccessGrants.
pub fn validate_grant(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    let username = req.user_info.username.as_deref().unwrap_or("");
    let (Some(obj), grant) = (req.object.as_ref(), typed::<AccessGrant>(&req.object)) else {
        return response.deny("the request carries no object");
    };
    match req.operation {
        Operation::Create => {
            let grant = match grant {
                Ok(Some(g)) => g,
                Ok(None) => return response.deny("the request carries no object"),
                Err(e) => return response.deny(e),
            };
            if approval::requested_by(&grant) != Some(username) {
                return response.deny(format!(
                    "annotation {REQUESTED_BY} must be the creating user {username:?}: agentid records the requester itself"
                ));
            }
            if let Some(message) = settled_label_refused(obj, None, &grant) {
                return response.deny(message);
            }
            if let Some((namespace, identity)) = base_identity(username)
                && (grant.spec.identity != identity || req.namespace.as_deref() != Some(namespace))
            {
                return response.deny(format!(
                    "{username} is the base ServiceAccount of AgentIdentity {identity:?} in {namespace:?}: it may request grants only for that identity, not {:?}",
                    grant.spec.identity
                ));
            }
            response
        }
        Operation::Update => match req.old_object.as_ref() {
            Some(old) if annotation_changed(old, obj, REQUESTED_BY) => {
                response.deny(format!("annotation {REQUESTED_BY} records who asked for the grant and cannot change"))
            }
            old => match grant {
                Ok(Some(grant)) => match settled_label_refused(obj, old, &grant) {
                    Some(message) => response.deny(message),
                    None => response,
                },
                Ok(None) => response.deny("the request carries no object"),
                Err(e) => response.deny(e),
            },
        },
        _ => response,
    }
}

/// Why the settled label may not go on this grant, if it may not: the operator's grant watch
/// leaves settled grants out, so on a grant that is still live (or whose revocation is not
/// finished) the label would hide it, and its credential, from the operator.
fn settled_label_refused(obj: &DynamicObject, old: Option<&DynamicObject>, grant: &AccessGrant) -> Option<String> {
    let label = |o: &DynamicObject| o.labels().get(SETTLED_LABEL).cloned();
    let new = label(obj)?;
    if old.and_then(label) == Some(new) || decide::settled(grant) {
        return None;
    }
    Some(format!(
        "label {SETTLED_LABEL} is agentid's mark of a grant that has ended and been cleaned up; this one has not"
    ))
}

/// The validating webhook for Approvals; `facts` are looked up for CREATE.
pub fn validate_approval(req: &AdmissionRequest<DynamicObject>, facts: &ApprovalFacts) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    let Some(obj) = req.object.as_ref() else {
        return response.deny("the request carries no object");
    };
    match req.operation {
        Operation::Create => {
            let approval = match typed::<Approval>(&req.object) {
                Ok(Some(a)) => a,
                Ok(None) => return response.deny("the request carries no object"),
                Err(e) => return response.deny(e),
            };
            let username = req.user_info.username.as_deref().unwrap_or("");
            let groups = req.user_info.groups.clone().unwrap_or_default();
            let recorded: Option<Vec<String>> =
                approval.annotations().get(APPROVER_GROUPS).and_then(|g| serde_json::from_str(g).ok());
            if recorded.as_ref() != Some(&groups) {
                return response.deny(format!(
                    "annotation {APPROVER_GROUPS} must hold the creating user's groups: agentid records them itself"
                ));
            }
            let approver = Approver { username, groups: &groups };
            match approval::check(
                &approver,
                &approval.spec,
                facts.grant.as_ref(),
                facts.identity.as_ref(),
                facts.may_approve,
            ) {
                Ok(()) => response,
                Err(refusal) => response.deny(refusal.to_string()),
            }
        }
        Operation::Update => match req.old_object.as_ref() {
            Some(old) if annotation_changed(old, obj, APPROVER_GROUPS) => {
                response.deny(format!("annotation {APPROVER_GROUPS} records the approver's groups and cannot change"))
            }
            _ => response,
        },
        _ => response,
    }
}

#[cfg(test)]
mod tests;
