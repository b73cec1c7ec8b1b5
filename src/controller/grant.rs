//! The AccessGrant reconciler: decide (policy), then issue, hold or revoke, then write status.

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, ResourceExt,
    runtime::{
        controller::Action,
        events::EventType,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use tracing::{info, instrument};

use super::{Context, Error, apply_status, kube_err, requeue_at};
use crate::{
    api::{AccessGrant, AgentIdentity, GrantPhase},
    policy::{
        conditions::{Summary, set_summary},
        decide::{Step, decide},
        desired::GrantObjects,
        names,
    },
};

/// Reconciles one AccessGrant.
#[instrument(skip_all, fields(kind = "AccessGrant", namespace = grant.namespace().unwrap_or_default(), name = grant.name_any()))]
pub async fn reconcile(grant: Arc<AccessGrant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("AccessGrant");
    let api: Api<AccessGrant> =
        Api::namespaced(ctx.client.clone(), &grant.namespace().unwrap_or_default());
    let result = finalizer(&api, names::GRANT_FINALIZER, grant.clone(), |event| async {
        match event {
            Finalizer::Apply(g) => apply(&g, &ctx).await,
            Finalizer::Cleanup(g) => cleanup(&g, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.succeeded(grant.as_ref());
    }
    result
}

/// Runs a grant's decision outside its controller: the start-up sweep revokes overdue grants
/// this way, and a deleted identity revokes its grants.
pub async fn reevaluate(grant: &AccessGrant, ctx: &Context) -> Result<(), Error> {
    apply(grant, ctx).await.map(|_| ())
}

async fn apply(grant: &AccessGrant, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    let ns = grant.namespace().unwrap_or_default();
    // A live read, not a cache: a grant must never be issued against a stale ceiling.
    let identity = Api::<AgentIdentity>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&grant.spec.identity)
        .await
        .map_err(kube_err(format!(
            "reading AgentIdentity {}",
            grant.spec.identity
        )))?
        .filter(|i| i.metadata.deletion_timestamp.is_none());

    let old = grant.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let generation = grant.metadata.generation;

    match decide(grant, identity.as_ref(), now) {
        Step::Wait { recheck_at } => Ok(requeue_at(recheck_at, now)),

        Step::Reject(violation) => {
            status.phase = Some(GrantPhase::Rejected);
            let message = format!("rejected: {violation}");
            set_summary(
                &mut status.conditions,
                Summary::Stalled,
                violation.reason(),
                message.clone(),
                generation,
                now,
            );
            apply_status(&ctx.client, grant, &status).await?;
            info!(reason = violation.reason(), "grant rejected");
            ctx.event(grant, EventType::Warning, "Rejected", message)
                .await;
            Ok(Action::await_change())
        }

        Step::AwaitApproval {
            reasons,
            recheck_at,
        } => {
            status.phase = Some(GrantPhase::AwaitingApproval);
            status.requires_approval = Some(true);
            status.approval_reasons = reasons.clone();
            let message = format!("waiting for approval: {}", reasons.join("; "));
            set_summary(
                &mut status.conditions,
                Summary::Reconciling,
                "AwaitingApproval",
                message.clone(),
                generation,
                now,
            );
            if status != old {
                apply_status(&ctx.client, grant, &status).await?;
            }
            if old.phase != status.phase {
                ctx.event(grant, EventType::Normal, "AwaitingApproval", message)
                    .await;
            }
            Ok(requeue_at(recheck_at, now))
        }

        Step::Issue { expires_at } => {
            let objects = GrantObjects::new(grant);
            if status.expires_at.is_none() {
                // Record the intent (and the fixed end) before making anything: a crash from here
                // on resumes with the same expiry instead of starting a second credential.
                status.phase = Some(GrantPhase::Pending);
                status.requires_approval = Some(false);
                status.expires_at = Some(Time(expires_at));
                status.service_account_name = Some(objects.name.clone());
                status.credentials_secret = Some(objects.name.clone());
                set_summary(
                    &mut status.conditions,
                    Summary::Reconciling,
                    "Issuing",
                    "issuing the credential".into(),
                    generation,
                    now,
                );
                apply_status(&ctx.client, grant, &status).await?;
                crate::failpoint::hit("issue:after-intent");
            }
            ctx.issuer.issue(grant, expires_at, now).await?;
            let issued_at = Timestamp::now();
            status.phase = Some(GrantPhase::Active);
            status.issued_at = Some(Time(issued_at));
            let namespaces = GrantObjects::target_namespaces(
                grant
                    .spec
                    .kubernetes
                    .as_ref()
                    .map(|k| k.rules.as_slice())
                    .unwrap_or_default(),
            );
            let message = format!(
                "credential issued in Secret {}, valid until {expires_at} in {}",
                objects.name,
                namespaces.join(", ")
            );
            set_summary(
                &mut status.conditions,
                Summary::Ready,
                "Issued",
                message.clone(),
                generation,
                issued_at,
            );
            apply_status(&ctx.client, grant, &status).await?;
            if let Some(created) = grant.metadata.creation_timestamp.as_ref() {
                ctx.metrics
                    .issuance_latency
                    .observe(issued_at.duration_since(created.0).as_secs_f64().max(0.0));
            }
            info!(%expires_at, "credential issued");
            ctx.event(grant, EventType::Normal, "Issued", message).await;
            Ok(requeue_at(Some(expires_at), Timestamp::now()))
        }

        Step::Revoke {
            phase,
            reason,
            message,
        } => {
            let sa_deleted = ctx.issuer.revoke(grant).await?;
            let revoked_at = Timestamp::now();
            if reason == "Expired"
                && let (Some(deleted), Some(expires_at)) = (sa_deleted, status.expires_at.as_ref())
            {
                ctx.metrics
                    .revocation_lag
                    .observe(deleted.duration_since(expires_at.0).as_secs_f64().max(0.0));
            }
            status.phase = Some(phase);
            status.revoked_at = Some(Time(revoked_at));
            let message = format!("credential revoked: {message}");
            set_summary(
                &mut status.conditions,
                Summary::Done,
                reason,
                message.clone(),
                generation,
                revoked_at,
            );
            apply_status(&ctx.client, grant, &status).await?;
            info!(reason, "credential revoked");
            ctx.event(grant, EventType::Normal, reason, message).await;
            Ok(Action::await_change())
        }
    }
}

/// The grant is being deleted: revoke whatever it holds, then let it go.
async fn cleanup(grant: &AccessGrant, ctx: &Context) -> Result<Action, Error> {
    let held = grant.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active);
    ctx.issuer.revoke(grant).await?;
    if held {
        info!("credential revoked: grant deleted");
        ctx.event(
            grant,
            EventType::Normal,
            "Revoked",
            "credential revoked: the grant was deleted".into(),
        )
        .await;
    }
    Ok(Action::await_change())
}
