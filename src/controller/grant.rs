//! The AccessGrant reconciler: decide (policy), then issue, hold or revoke, then write status.

use std::sync::Arc;

use jiff::Timestamp;
use json_patch::{AddOperation, PatchOperation, RemoveOperation, TestOperation, jsonptr::PointerBuf};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;
use tracing::{info, instrument};

use super::{Context, Error, kube_err, reconcile_with_finalizer, requeue_at};
use crate::{
    api::{AccessGrant, AccessGrantStatus, AgentIdentity, Approval, GrantPhase},
    policy::{
        approval::{self, Candidate, Verdict},
        ceiling::Violation,
        conditions::{Summary, set_summary},
        decide::{self, Facts, Step, decide},
        desired::GrantObjects,
        names,
    },
};

/// Asks the apiserver's authorizer, now, whether `user` in `groups` may `approve` the grant.
async fn may_approve(ctx: &Context, user: &str, groups: &[String], ns: &str, grant: &str) -> Result<bool, Error> {
    let subject = k8s_openapi::api::authorization::v1::SubjectAccessReviewSpec {
        user: Some(user.into()),
        groups: Some(groups.to_vec()),
        ..Default::default()
    };
    crate::authz::may(&ctx.client, subject, "approve", "accessgrants", ns, Some(grant))
        .await
        .map_err(kube_err("asking the authorizer whether an approver may approve"))
}

/// The Approvals that name the grant, read from the apiserver.
async fn approvals_of(grant: &AccessGrant, ctx: &Context) -> Result<Vec<Approval>, Error> {
    let name = grant.name_any();
    let approvals = Api::<Approval>::namespaced(ctx.client.clone(), &grant.namespace().unwrap_or_default())
        .list(&kube::api::ListParams::default())
        .await
        .map_err(kube_err("listing Approvals"))?;
    Ok(approvals.items.into_iter().filter(|a| a.spec.grant == name).collect())
}

/// The Approvals that name a grant needing no approval, for which only a Deny counts: from the
/// Approval cache, which has each one before the watch event that triggers the grant's
/// reconcile (a consistent list cost every reconcile tens of milliseconds). Read from the
/// apiserver while the cache is still filling.
async fn denials_of(grant: &AccessGrant, ctx: &Context) -> Result<Vec<Approval>, Error> {
    let Some(store) = ctx.approvals.as_ref().filter(|s| super::cache::ready(s)) else {
        return approvals_of(grant, ctx).await;
    };
    let (ns, name) = (grant.namespace().unwrap_or_default(), grant.name_any());
    Ok(store
        .state()
        .iter()
        .filter(|a| a.spec.grant == name && a.metadata.namespace.as_deref() == Some(ns.as_str()))
        .map(|a| a.as_ref().clone())
        .collect())
}

/// What the grant's Approvals add up to, each approver re-checked against RBAC now.
async fn verdict(
    grant: &AccessGrant,
    identity: Option<&AgentIdentity>,
    approvals: Vec<Approval>,
    ctx: &Context,
    now: Timestamp,
) -> Result<Verdict, Error> {
    let ns = grant.namespace().unwrap_or_default();
    let name = grant.name_any();
    if !ctx.admission_registered {
        // Without admission, who asked and who approved were written by the users themselves.
        let why = "agentid's admission webhook is not registered, so no Approval can be trusted";
        let ignored = approvals.iter().map(|a| (a.name_any(), why.to_string())).collect();
        return Ok(Verdict::Waiting { counted: vec![], ignored });
    }
    let mut candidates = Vec::with_capacity(approvals.len());
    for a in &approvals {
        let groups = Candidate::recorded_groups(a);
        let may = may_approve(ctx, &a.spec.approver, &groups, &ns, &name).await?;
        candidates.push(Candidate { approval: a, groups, may_approve: may });
    }
    Ok(approval::tally(grant, identity, &candidates, now))
}

/// Reconciles one AccessGrant.
#[instrument(skip_all, fields(kind = "AccessGrant", namespace = grant.namespace().unwrap_or_default(), name = grant.name_any()))]
pub async fn reconcile(grant: Arc<AccessGrant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("AccessGrant");
    tracing::debug!(phase = ?grant.status.as_ref().and_then(|s| s.phase), "reconciling");
    if grant.metadata.deletion_timestamp.is_none() && decide::settled(&grant) {
        return settle(&grant, &ctx).await;
    }
    reconcile_with_finalizer(grant, &ctx, names::GRANT_FINALIZER, apply, cleanup).await
}

/// A settled grant (ended, its revocation finished) is labelled [`names::SETTLED_LABEL`], which
/// takes it out of the operator's grant watch (and so out of memory and the start-up listing),
/// and loses its finalizer: nothing is left to revoke, and once out of the watch its deletion
/// would never be reconciled. Only with admission registered: admission is what keeps the label
/// off a grant that is still live (without it the watch keeps every grant, see `run`).
async fn settle(grant: &AccessGrant, ctx: &Context) -> Result<Action, Error> {
    if ctx.admission_registered
        && let Some(patch) = settle_patch(&grant.metadata)
    {
        let api = Api::<AccessGrant>::namespaced(ctx.client.clone(), &grant.namespace().unwrap_or_default());
        let name = grant.name_any();
        let failed = || kube_err(format!("marking AccessGrant {name} settled"));
        let params = PatchParams::default();
        match api.patch_metadata(&name, &params, &Patch::<()>::Json(patch)).await {
            Ok(_) => {}
            // Refused as a whole, its test having seen other finalizers or another uid: the copy
            // this reconcile ran on is older than the grant. Most often this process settled it
            // moments ago and the watch has not taken it out of the cache yet (under a flood of
            // grants, thousands of times, each a failed reconcile and a retry). Settle what the
            // grant is now — the same grant only: one made again under its name is not this one.
            Err(kube::Error::Api(refused)) if refused.code == 422 => {
                let live = api.get_metadata_opt(&name).await.map_err(failed())?;
                if let Some(patch) =
                    live.filter(|m| m.metadata.uid == grant.metadata.uid).and_then(|m| settle_patch(&m.metadata))
                {
                    api.patch_metadata(&name, &params, &Patch::<()>::Json(patch)).await.map_err(failed())?;
                }
            }
            Err(e) => return Err(failed()(e)),
        }
        ctx.forget_grant(grant);
    }
    // As `reconcile_with_finalizer` does on success, which a settled grant no longer goes through.
    ctx.succeeded(grant);
    Ok(Action::await_change())
}

/// The patch that marks the grant of `meta` settled and takes off its finalizer; None when it is
/// already so. A JSON patch whose test fails (someone changed the finalizers meanwhile, or the
/// name is another grant's now) is refused as a whole.
fn settle_patch(meta: &ObjectMeta) -> Option<json_patch::Patch> {
    let labelled = meta.labels.as_ref().and_then(|l| l.get(names::SETTLED_LABEL)).is_some_and(|v| v == "true");
    let finalizer = meta.finalizers.iter().flatten().position(|f| f == names::GRANT_FINALIZER);
    if labelled && finalizer.is_none() {
        return None;
    }
    let mut ops = Vec::new();
    if let Some(uid) = &meta.uid {
        let path = PointerBuf::from_tokens(["metadata", "uid"]);
        ops.push(PatchOperation::Test(TestOperation { path, value: uid.as_str().into() }));
    }
    if let Some(i) = finalizer {
        let path = PointerBuf::from_tokens(["metadata".to_string(), "finalizers".to_string(), i.to_string()]);
        ops.push(PatchOperation::Test(TestOperation { path: path.clone(), value: names::GRANT_FINALIZER.into() }));
        ops.push(PatchOperation::Remove(RemoveOperation { path }));
    }
    ops.push(PatchOperation::Add(match meta.labels {
        Some(_) => AddOperation {
            path: PointerBuf::from_tokens(["metadata", "labels", names::SETTLED_LABEL]),
            value: "true".into(),
        },
        None => AddOperation {
            path: PointerBuf::from_tokens(["metadata", "labels"]),
            value: json!({names::SETTLED_LABEL: "true"}),
        },
    }));
    Some(json_patch::Patch(ops))
}

/// [`settle`] right after the status write that ended the grant: the watch event of that write
/// is the operator's own and triggers nothing, so no later reconcile would. Settling only saves
/// memory, so a failure here is logged and not retried: a retry would run the ended grant's last
/// step again (a second audit line and Event); the grant is settled when next reconciled, at the
/// latest when the operator starts.
async fn settle_if_done(grant: &AccessGrant, status: &AccessGrantStatus, ctx: &Context) -> Action {
    let mut ended = grant.clone();
    ended.status = Some(status.clone());
    if decide::settled(&ended)
        && let Err(e) = settle(&ended, ctx).await
    {
        tracing::warn!(error = %e, "could not mark the ended grant settled; it stays in the cache until its next reconcile");
    }
    Action::await_change()
}

/// One structured audit line per lifecycle transition (target `agentid::audit`): who asked, who
/// approved, what the credential allows and until when — never the credential itself.
fn audit(grant: &AccessGrant, status: &AccessGrantStatus, transition: &str, reason: &str) {
    let approvers: Vec<&str> = status.approvals.iter().map(|a| a.approver.as_str()).collect();
    info!(
        target: "agentid::audit",
        transition,
        reason,
        namespace = grant.namespace().unwrap_or_default(),
        grant = grant.name_any(),
        grant_uid = grant.uid().unwrap_or_default(),
        identity = grant.spec.identity,
        requester = status.requested_by.as_deref().unwrap_or(""),
        approvers = approvers.join(","),
        scope = crate::policy::desired::scope_in_words(grant),
        duration = grant.spec.duration,
        expires_at = status.expires_at.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
        service_account = status.service_account_name.as_deref().unwrap_or(""),
        "grant {transition}"
    );
}

/// Runs a grant's decision outside its controller: the start-up sweep revokes overdue grants
/// this way, and a deleted identity revokes its grants.
pub async fn reevaluate(grant: &AccessGrant, ctx: &Context) -> Result<(), Error> {
    // A revocation ends the credential first and asks to be run again for the rest, and a copy
    // older than this process's own status write asks to wait for the cache: either way, again on
    // the grant as it is now (a few times at most: each step moves it on).
    let again = [Action::requeue(std::time::Duration::ZERO), Action::requeue(STALE_COPY_RETRY)];
    let mut action = apply(grant, ctx).await?;
    for _ in 0..3 {
        if !again.contains(&action) {
            break;
        }
        let api = Api::<AccessGrant>::namespaced(ctx.client.clone(), &grant.namespace().unwrap_or_default());
        let live = api
            .get_opt(&grant.name_any())
            .await
            .map_err(kube_err(format!("reading AccessGrant {}", grant.name_any())))?;
        let Some(live) = live.filter(|l| l.metadata.uid == grant.metadata.uid) else { break };
        action = apply(&live, ctx).await?;
    }
    Ok(())
}

async fn apply(grant: &AccessGrant, ctx: &Context) -> Result<Action, Error> {
    // Done for good (the decision would be to wait, whatever the look-ups said): every grant is
    // reconciled once when the operator starts, and most are long over.
    if decide::settled(grant) {
        return Ok(Action::await_change());
    }
    // Never decide on a copy older than a status this process wrote: its decision could undo that
    // write or, a revocation begun (its ServiceAccount gone), issue afresh. Read live only while
    // such a write is not in the cache yet; when the copy is behind, wait for the cache.
    let uid = grant.uid().unwrap_or_default();
    if ctx.own_writes.unseen(&uid) && copy_is_stale(grant, ctx).await? {
        return Ok(Action::requeue(STALE_COPY_RETRY));
    }
    let now = Timestamp::now();
    let ns = grant.namespace().unwrap_or_default();
    let terminal = grant.status.as_ref().and_then(|s| s.phase).is_some_and(GrantPhase::is_terminal);
    let overdue = grant.status.as_ref().and_then(|s| s.expires_at.as_ref()).is_some_and(|t| t.0 <= now);
    let no_verdict = Verdict::Waiting { counted: vec![], ignored: vec![] };
    let (identity, verdict, service_account) = if overdue && !terminal {
        // Past its end nothing else matters: revoke without waiting on any look-up that could fail.
        (None, no_verdict, None)
    } else {
        // Live reads, not a cache: a grant must never be issued against a stale ceiling, nor on an
        // Approval withdrawn a moment ago. They are independent, so they go out together (one
        // round trip, not three); a grant's Approvals are read live only when it needs approval,
        // known before its identity is read when its own rules say so.
        let identity = async {
            Api::<AgentIdentity>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&grant.spec.identity)
                .await
                .map_err(kube_err(format!("reading AgentIdentity {}", grant.spec.identity)))
        };
        let surely_held = decide::needs_approval_by_itself(grant, &ctx.protected);
        let approvals = async {
            if terminal || !surely_held {
                return Ok(None);
            }
            approvals_of(grant, ctx).await.map(Some)
        };
        let sa_name = GrantObjects::new(grant).name;
        let sa_created = async {
            Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(ctx.client.clone(), &ns)
                .get_metadata_opt(&sa_name)
                .await
                .map_err(kube_err(format!("reading ServiceAccount {sa_name}")))
        };
        let (identity, approvals, sa_created) = tokio::join!(identity, approvals, sa_created);
        // When its ServiceAccount was made, and the end of the issuance it records.
        let service_account = sa_created?.map(|sa| {
            (
                sa.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now),
                names::recorded_expiry(&sa.metadata, &uid),
            )
        });
        // An issuance only its ServiceAccount records, past that end: revoked as one that status
        // shows overdue is, whatever the other look-ups said or failed to say.
        let recorded_overdue = grant.status.as_ref().and_then(|s| s.expires_at.as_ref()).is_none()
            && service_account.is_some_and(|(_, recorded)| recorded.is_some_and(|t| t <= now));
        if recorded_overdue && !terminal {
            (None, no_verdict, service_account)
        } else {
            let identity = identity?.filter(|i| i.metadata.deletion_timestamp.is_none());
            let approvals = match approvals? {
                Some(approvals) => Some(approvals),
                None if terminal => None,
                // Held by what its identity protects: read live after all.
                None if identity
                    .as_ref()
                    .is_some_and(|i| !decide::approval_reasons(grant, i, &ctx.protected).is_empty()) =>
                {
                    Some(approvals_of(grant, ctx).await?)
                }
                None => Some(denials_of(grant, ctx).await?),
            };
            let verdict = match approvals {
                Some(approvals) => verdict(grant, identity.as_ref(), approvals, ctx, now).await?,
                None => no_verdict,
            };
            (identity, verdict, service_account)
        }
    };
    let service_account_created = service_account.map(|(created, _)| created);
    let recorded_expiry = service_account.and_then(|(_, recorded)| recorded);

    let old = grant.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let generation = grant.metadata.generation;
    status.requested_by = approval::requested_by(grant).map(str::to_string);
    match &verdict {
        Verdict::Approved(records) => status.approvals = records.clone(),
        Verdict::Waiting { counted, .. } => status.approvals = counted.clone(),
        Verdict::Denied { .. } => {}
    }
    // Keep the time each approval was first counted.
    for record in &mut status.approvals {
        if let Some(seen) = old.approvals.iter().find(|o| o.approval == record.approval) {
            record.at = seen.at.clone();
        }
    }

    let facts = Facts {
        identity: identity.as_ref(),
        verdict: &verdict,
        protected: &ctx.protected,
        installation: &ctx.installation,
        service_account_created,
        recorded_expiry,
        now,
    };
    match decide(grant, facts) {
        Step::Wait { recheck_at } => Ok(requeue_at(recheck_at, now)),

        Step::Reject(violation) => reject(grant, ctx, status, &violation, now).await,

        Step::AwaitApproval { reasons, recheck_at } => {
            status.phase = Some(GrantPhase::AwaitingApproval);
            status.requires_approval = Some(true);
            status.approval_reasons = reasons.clone();
            let need = identity.as_ref().map(|i| i.spec.approval.required_approvals).unwrap_or(1);
            let mut message =
                format!("waiting for approval ({} of {need}): {}", status.approvals.len(), reasons.join("; "));
            if let Verdict::Waiting { ignored, .. } = &verdict
                && !ignored.is_empty()
            {
                let why: Vec<String> =
                    ignored.iter().map(|(name, why)| format!("Approval {name} does not count: {why}")).collect();
                message.push_str(&format!(". {}", why.join(". ")));
            }
            set_summary(
                &mut status.conditions,
                Summary::Reconciling,
                "AwaitingApproval",
                message.clone(),
                generation,
                now,
            );
            if status != old {
                ctx.write_grant_status(grant, &status).await?;
            }
            if old.phase != status.phase {
                audit(grant, &status, "awaiting-approval", "AwaitingApproval");
                ctx.event(grant, EventType::Normal, "AwaitingApproval", message).await;
            }
            Ok(requeue_at(recheck_at, now))
        }

        Step::Issue { expires_at } => {
            let objects = GrantObjects::new(grant);
            // Never issued afresh once this process began ending it: status wiped meanwhile
            // (between the two steps of a revocation) would look like a grant never issued.
            if status.expires_at.is_none() && recorded_expiry.is_none() && ctx.ended(grant) {
                let message = "status was rewritten while the credential was being revoked".to_string();
                let end = Ending { phase: GrantPhase::Revoked, reason: "InvalidStatus", message };
                return revoke(grant, ctx, status, end, service_account_created.is_some(), recorded_expiry, now).await;
            }
            // Counted against the identity's cap until it is Active, also when only its
            // ServiceAccount records it (a restarted process reserves those first, at start-up).
            if let Err(held) = ctx.reserve_slot(grant).await? {
                let limit = ctx.max_active_grants;
                let identity = grant.spec.identity.clone();
                let violation = Violation::TooManyActiveGrants { identity, held, limit };
                if service_account_created.is_none() {
                    return reject(grant, ctx, status, &violation, now).await;
                }
                // Its ServiceAccount exists: whatever it may hold is revoked, not left behind.
                let end =
                    Ending { phase: GrantPhase::Revoked, reason: violation.reason(), message: violation.to_string() };
                return revoke(grant, ctx, status, end, service_account_created.is_some(), recorded_expiry, now).await;
            }
            // The record of the issuance, until status shows it, is its ServiceAccount: made
            // with the fixed end (`names::EXPIRES_AT_ANNOTATION`) before any token exists,
            // so a crash from here on resumes with the same end instead of starting a second
            // credential. Status is written once, when the credential is there (a write of its
            // own before anything was made cost every grant a round trip and the apiserver a
            // status write).
            // A held grant that was approved keeps saying it needed approval.
            status.requires_approval = Some(status.requires_approval.unwrap_or(false));
            let cached_uid = ctx.identity_secret_uid(&ns, &grant.spec.identity);
            if let Err(e) = ctx.issuer.issue(grant, expires_at, now, cached_uid).await {
                // Say so in status: the error's category only (an apiserver's answer could quote
                // what was written). Not the end: status records one only with the credential
                // there (see `decide`); the ServiceAccount, when made, records it.
                status.phase = Some(GrantPhase::Pending);
                let message = format!(
                    "issuing the credential; the last attempt failed ({}) and is retried, see the operator's log",
                    e.category()
                );
                set_summary(&mut status.conditions, Summary::Reconciling, "Issuing", message, generation, now);
                if let Err(not_written) = ctx.write_grant_status(grant, &status).await {
                    tracing::warn!(error = %not_written, "could not record the failed issuance in status");
                }
                return Err(e.into());
            }
            let issued_at = Timestamp::now();
            status.phase = Some(GrantPhase::Active);
            status.expires_at = Some(Time(expires_at));
            status.service_account_name = Some(objects.name.clone());
            status.credentials_secret = Some(objects.name.clone());
            status.issued_at = Some(Time(issued_at));
            let namespaces = GrantObjects::target_namespaces(
                grant.spec.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default(),
            );
            let message = format!(
                "credential issued in Secret {}, valid until {expires_at} in {}",
                objects.name,
                namespaces.join(", ")
            );
            set_summary(&mut status.conditions, Summary::Ready, "Issued", message.clone(), generation, issued_at);
            ctx.write_grant_status(grant, &status).await?;
            if let Some(created) = grant.metadata.creation_timestamp.as_ref() {
                ctx.metrics.issuance_latency.observe(issued_at.duration_since(created.0).as_secs_f64().max(0.0));
            }
            audit(grant, &status, "issued", "Issued");
            ctx.event(grant, EventType::Normal, "Issued", message).await;
            Ok(requeue_at(Some(expires_at), Timestamp::now()))
        }

        Step::Revoke { phase, reason, message } => {
            let end = Ending { phase, reason, message };
            revoke(grant, ctx, status, end, service_account_created.is_some(), recorded_expiry, now).await
        }
    }
}

/// How a grant ends: its phase, the condition's reason and a sentence for humans.
struct Ending {
    phase: GrantPhase,
    reason: &'static str,
    message: String,
}

/// Takes the grant's credential away and ends it as `end` says. `service_account`: its
/// ServiceAccount exists; `recorded`: the end that ServiceAccount records.
async fn revoke(
    grant: &AccessGrant,
    ctx: &Context,
    mut status: AccessGrantStatus,
    end: Ending,
    service_account: bool,
    recorded: Option<Timestamp>,
    now: Timestamp,
) -> Result<Action, Error> {
    let Ending { phase, reason, message } = end;
    let generation = grant.metadata.generation;
    // Status records no issuance, yet its ServiceAccount exists (an issuance interrupted before
    // its one status write, or a record removed): status says the grant is ending, with the end,
    // before that ServiceAccount — the only other record — goes. Else the next reconcile, finding
    // neither, would issue afresh. Then the whole revocation runs here: this is rare.
    let unrecorded = status.expires_at.is_none() && service_account;
    if unrecorded {
        let name = GrantObjects::new(grant).name;
        status.phase = Some(phase);
        status.expires_at = Some(Time(recorded.unwrap_or(now)));
        status.service_account_name = Some(name.clone());
        status.credentials_secret = Some(name);
        let revoking = format!("revoking the credential: {message}");
        set_summary(&mut status.conditions, Summary::Reconciling, reason, revoking, generation, now);
        ctx.write_grant_status(grant, &status).await?;
    }
    // First only the call that ends the credential, then the rest in a reconcile of its own:
    // when many grants end in the same second, every credential dies before any grant's clean-up
    // takes a worker.
    ctx.ending(grant);
    if let Some(deleted) = ctx.issuer.end_credential(grant).await? {
        if reason == "Expired"
            && let Some(expires_at) = status.expires_at.as_ref()
        {
            ctx.metrics.revocation_lag.observe(deleted.duration_since(expires_at.0).as_secs_f64().max(0.0));
        }
        if !unrecorded {
            return Ok(Action::requeue(std::time::Duration::ZERO));
        }
    }
    ctx.issuer.revoke(grant).await?;
    let revoked_at = Timestamp::now();
    status.phase = Some(phase);
    status.revoked_at = Some(Time(revoked_at));
    let message = format!("credential revoked: {message}");
    set_summary(&mut status.conditions, Summary::Done, reason, message.clone(), generation, revoked_at);
    ctx.write_grant_status(grant, &status).await?;
    let transition = match phase {
        GrantPhase::Expired => "expired",
        GrantPhase::Denied => "denied",
        _ => "revoked",
    };
    audit(grant, &status, transition, reason);
    let kind = if phase == GrantPhase::Denied { EventType::Warning } else { EventType::Normal };
    ctx.event(grant, kind, reason, message).await;
    Ok(settle_if_done(grant, &status, ctx).await)
}

/// How soon a reconcile that found its copy of the grant stale runs again (the watch delivers
/// the newer version within milliseconds).
const STALE_COPY_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Whether the apiserver holds a newer version of `grant` than the copy this reconcile runs on
/// (or none, or another grant under its name).
async fn copy_is_stale(grant: &AccessGrant, ctx: &Context) -> Result<bool, Error> {
    let live = Api::<AccessGrant>::namespaced(ctx.client.clone(), &grant.namespace().unwrap_or_default())
        .get_metadata_opt(&grant.name_any())
        .await
        .map_err(kube_err(format!("reading AccessGrant {}", grant.name_any())))?;
    Ok(live.is_none_or(|l| l.metadata.resource_version != grant.metadata.resource_version))
}

/// Ends the grant as Rejected: it never held a credential and never will.
async fn reject(
    grant: &AccessGrant,
    ctx: &Context,
    mut status: AccessGrantStatus,
    violation: &Violation,
    now: Timestamp,
) -> Result<Action, Error> {
    status.phase = Some(GrantPhase::Rejected);
    let message = format!("rejected: {violation}");
    let generation = grant.metadata.generation;
    set_summary(&mut status.conditions, Summary::Stalled, violation.reason(), message.clone(), generation, now);
    ctx.write_grant_status(grant, &status).await?;
    audit(grant, &status, "rejected", violation.reason());
    ctx.event(grant, EventType::Warning, "Rejected", message).await;
    Ok(settle_if_done(grant, &status, ctx).await)
}

/// The grant is being deleted: revoke whatever it holds, then let it go.
async fn cleanup(grant: &AccessGrant, ctx: &Context) -> Result<Action, Error> {
    let held = grant.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active);
    ctx.issuer.revoke(grant).await?;
    ctx.forget_grant(grant);
    if held {
        audit(grant, &grant.status.clone().unwrap_or_default(), "revoked", "GrantDeleted");
        ctx.event(grant, EventType::Normal, "Revoked", "credential revoked: the grant was deleted".into()).await;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{grant, rule};

    /// The settle patch applied to `g` as the apiserver would: its labels and finalizers after.
    fn settled(g: &AccessGrant) -> (serde_json::Value, serde_json::Value) {
        let mut doc = serde_json::to_value(g).expect("a grant serializes");
        if let Some(patch) = settle_patch(&g.metadata) {
            json_patch::patch(&mut doc, &patch).expect("the patch applies");
        }
        (doc["metadata"]["labels"].clone(), doc["metadata"]["finalizers"].clone())
    }

    #[test]
    fn the_settle_patch_labels_and_drops_only_agentids_finalizer() {
        let mut g = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        g.metadata.finalizers = Some(vec!["other/keep".into(), names::GRANT_FINALIZER.into()]);
        // Without labels, and with labels of its own (the key has a '/': escaped in the path).
        let (labels, finalizers) = settled(&g);
        assert_eq!(labels, json!({names::SETTLED_LABEL: "true"}));
        assert_eq!(finalizers, json!(["other/keep"]));
        g.metadata.labels = Some([("team".to_string(), "a".to_string())].into());
        let (labels, finalizers) = settled(&g);
        assert_eq!(labels, json!({"team": "a", names::SETTLED_LABEL: "true"}));
        assert_eq!(finalizers, json!(["other/keep"]));
        // Already settled: nothing to write.
        g.metadata.labels = Some([(names::SETTLED_LABEL.to_string(), "true".to_string())].into());
        g.metadata.finalizers = Some(vec!["other/keep".into()]);
        assert!(settle_patch(&g.metadata).is_none());
        // The test op guards the index: had the finalizers moved, the patch would be refused.
        g.metadata.finalizers = Some(vec![names::GRANT_FINALIZER.into()]);
        let patch = settle_patch(&g.metadata).expect("a patch");
        let mut moved = serde_json::to_value(&g).expect("serializes");
        moved["metadata"]["finalizers"] = json!(["someone/else"]);
        assert!(json_patch::patch(&mut moved, &patch).is_err());
        // And the uid: a grant made again under the same name is not the one that ended.
        g.metadata.uid = Some("uid-ended".into());
        let patch = settle_patch(&g.metadata).expect("a patch");
        let mut again = serde_json::to_value(&g).expect("serializes");
        again["metadata"]["uid"] = json!("uid-new");
        assert!(json_patch::patch(&mut again, &patch).is_err());
        let mut same = serde_json::to_value(&g).expect("serializes");
        assert!(json_patch::patch(&mut same, &patch).is_ok());
    }
}
