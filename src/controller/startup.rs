//! Start-up: before anything is issued, finish every revocation that fell due while the
//! operator was down, and remove objects of grants that no longer exist.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, PartialObjectMeta},
};
use serde::de::DeserializeOwned;
use tracing::info;

use super::{Context, Error, grant, kube_err};
use crate::{
    api::{AccessGrant, GrantPhase},
    policy::names,
};

/// Grants listed per request.
const LIST_PAGE: u32 = 500;
/// Grants re-evaluated at once by the start-up sweep.
const SWEEP_CONCURRENCY: usize = 32;

/// Runs the start-up sweep.
pub async fn sweep(ctx: &Context) -> Result<(), Error> {
    // In pages: one answer holding every grant of a large cluster took tens of MiB at once.
    let api = Api::<AccessGrant>::all(ctx.client.clone());
    let mut grants = Vec::new();
    let mut page = ListParams::default().limit(LIST_PAGE);
    loop {
        let list = api.list(&page).await.map_err(kube_err("listing AccessGrants"))?;
        grants.extend(list.items);
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => page = page.continue_token(&token),
            None => break,
        }
    }
    let mut recheck = Vec::new();
    for g in &grants {
        let status = g.status.as_ref();
        let issued = status.and_then(|s| s.expires_at.as_ref()).map(|t| t.0);
        let phase = status.and_then(|s| s.phase);
        let unfinished = matches!(phase, Some(GrantPhase::Expired | GrantPhase::Revoked))
            && status.is_some_and(|s| s.revoked_at.is_none());
        // Every grant that holds (or held) a credential is looked at again: overdue ones, and those
        // whose identity was suspended, retired or deleted, or that were denied while agentid was down.
        // (Interrupted issuances are resumed later by the controller, after this sweep.)
        let holds = phase == Some(GrantPhase::Active);
        let overdue = issued.is_some_and(|at| at <= jiff::Timestamp::now());
        if holds || overdue || unfinished {
            recheck.push(g);
        }
    }
    // Together, not one after another: 9,000 active grants took 68 s in turn.
    let rechecked = recheck.len();
    futures::stream::iter(recheck.into_iter().map(|g| grant::reevaluate(g, ctx)))
        .buffer_unordered(SWEEP_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;

    let orphans = sweep_orphans(ctx).await?;
    info!(rechecked, orphans, "start-up sweep done");
    Ok(())
}

/// Deletes objects labelled for a grant UID that no longer exists (e.g. a finalizer removed by
/// hand), ServiceAccounts first. Safe while controllers run: objects are listed before grants, so a
/// grant made in between cannot have its fresh objects taken for orphans.
pub async fn sweep_orphans(ctx: &Context) -> Result<usize, Error> {
    let service_accounts = list_grant_objects(Api::<ServiceAccount>::all(ctx.client.clone())).await?;
    let bindings = list_grant_objects(Api::<RoleBinding>::all(ctx.client.clone())).await?;
    let roles = list_grant_objects(Api::<Role>::all(ctx.client.clone())).await?;
    let mut secrets = Vec::new();
    for api in super::secret_apis::<Secret>(&ctx.client, &ctx.installation.agent_namespaces) {
        secrets.extend(list_grant_objects(api).await?);
    }
    let grants = Api::<AccessGrant>::all(ctx.client.clone())
        .list_metadata(&ListParams::default())
        .await
        .map_err(kube_err("listing AccessGrants"))?;
    let live: HashSet<String> = grants.items.iter().filter_map(|g| g.uid()).collect();
    Ok(delete_orphans(ctx, service_accounts, &live).await?
        + delete_orphans(ctx, bindings, &live).await?
        + delete_orphans(ctx, roles, &live).await?
        + delete_orphans(ctx, secrets, &live).await?)
}

async fn list_grant_objects<K>(api: Api<K>) -> Result<Vec<PartialObjectMeta<K>>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    // Metadata only: listing Secrets this way never brings their data into the operator.
    api.list_metadata(&ListParams::default().labels(&names::all_grants_selector()))
        .await
        .map(|l| l.items)
        .map_err(kube_err(format!("listing {}s of grants", K::kind(&()))))
}

async fn delete_orphans<K>(
    ctx: &Context,
    listed: Vec<PartialObjectMeta<K>>,
    live: &HashSet<String>,
) -> Result<usize, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let mut deleted = 0;
    for obj in listed {
        let uid = obj.labels().get(names::GRANT_UID_LABEL).cloned().unwrap_or_default();
        if live.contains(&uid) {
            continue;
        }
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
        match api.delete(&obj.name_any(), &DeleteParams::background()).await {
            Ok(_) => deleted += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err(format!("deleting orphaned {} {}", K::kind(&()), obj.name_any()))(e)),
        }
    }
    Ok(deleted)
}
