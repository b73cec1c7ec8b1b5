//! The AgentIdentity reconciler: the base ServiceAccount, the credentials Secret, the one
//! standing right (request grants), and status.

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::EventType,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::{info, instrument};

use super::{Context, Error, apply_status, grant, kube_err, requeue_at};
use crate::{
    api::{AccessGrant, AgentIdentity, AgentIdentityStatus, GrantPhase},
    policy::{
        ceiling,
        conditions::{Summary, set_summary},
        desired, names,
    },
};

/// Reconciles one AgentIdentity.
#[instrument(skip_all, fields(kind = "AgentIdentity", namespace = identity.namespace().unwrap_or_default(), name = identity.name_any()))]
pub async fn reconcile(identity: Arc<AgentIdentity>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("AgentIdentity");
    let api: Api<AgentIdentity> = Api::namespaced(ctx.client.clone(), &identity.namespace().unwrap_or_default());
    let result = finalizer(&api, names::IDENTITY_FINALIZER, identity.clone(), |event| async {
        match event {
            Finalizer::Apply(i) => apply(&i, &ctx).await,
            Finalizer::Cleanup(i) => cleanup(&i, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.succeeded(identity.as_ref());
    }
    result
}

async fn ssa<K>(ctx: &Context, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let name = obj.name_any();
    api.patch(&name, &PatchParams::apply(names::FIELD_MANAGER).force(), &Patch::Apply(obj))
        .await
        .map_err(kube_err(format!("applying {} {name}", K::kind(&()))))?;
    Ok(())
}

async fn grants_of(identity: &AgentIdentity, ctx: &Context) -> Result<Vec<AccessGrant>, Error> {
    let name = identity.name_any();
    let grants = Api::<AccessGrant>::namespaced(ctx.client.clone(), &identity.namespace().unwrap_or_default())
        .list(&ListParams::default())
        .await
        .map_err(kube_err("listing AccessGrants"))?;
    Ok(grants.items.into_iter().filter(|g| g.spec.identity == name).collect())
}

async fn apply(identity: &AgentIdentity, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    ssa::<ServiceAccount>(ctx, &desired::identity_service_account(identity)).await?;
    ssa::<Secret>(ctx, &desired::identity_credentials_secret(identity)).await?;
    ssa::<Role>(ctx, &desired::identity_requester_role(identity)).await?;
    ssa::<RoleBinding>(ctx, &desired::identity_requester_binding(identity)).await?;

    let name = identity.name_any();
    let active = grants_of(identity, ctx)
        .await?
        .iter()
        .filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active))
        .count();

    let old = identity.status.clone().unwrap_or_default();
    let mut status = AgentIdentityStatus {
        service_account_name: Some(names::identity_service_account(&name)),
        credentials_secret: Some(names::identity_credentials_secret(&name)),
        active_grants: i32::try_from(active).unwrap_or(i32::MAX),
        conditions: old.conditions.clone(),
        observed_generation: identity.metadata.generation,
    };
    let generation = identity.metadata.generation;
    let (reason, message) = match ceiling::identity_usable(identity, now) {
        Ok(()) => (
            "Ready",
            format!(
                "base ServiceAccount {} holds no privilege; {active} active grant(s)",
                names::identity_service_account(&name)
            ),
        ),
        Err(v) => (v.reason(), format!("{v}: every grant is revoked and none is issued")),
    };
    set_summary(&mut status.conditions, Summary::Ready, reason, message.clone(), generation, now);
    if status != old {
        apply_status(&ctx.client, identity, &status).await?;
        let old_reason = old.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.reason.clone());
        if old_reason.as_deref() != Some(reason) {
            ctx.event(identity, EventType::Normal, reason, message).await;
        }
    }
    // Look again at retirement, so that status and Events say so on time.
    let retire_at = identity.spec.retire_at.as_ref().map(|t| t.0).filter(|t| *t > now);
    Ok(requeue_at(retire_at, now))
}

/// The identity is being deleted: revoke every grant it holds, then let it go. Its own
/// ServiceAccount, Secret, Role and RoleBinding are owned by it and garbage-collected.
async fn cleanup(identity: &AgentIdentity, ctx: &Context) -> Result<Action, Error> {
    let mut revoked = 0;
    for g in grants_of(identity, ctx).await? {
        let phase = g.status.as_ref().and_then(|s| s.phase);
        if phase.is_some_and(GrantPhase::is_terminal) && g.status.as_ref().is_some_and(|s| s.revoked_at.is_some()) {
            continue;
        }
        // With the identity going away, the grant's own decision is to revoke.
        grant::reevaluate(&g, ctx).await?;
        revoked += 1;
    }
    info!(revoked, "identity deleted; its grants are revoked");
    Ok(Action::await_change())
}
