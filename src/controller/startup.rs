//! Start-up: before anything is issued, finish every revocation that fell due while the
//! operator was down, and remove objects of grants that no longer exist.

use std::{collections::HashSet, sync::Arc};

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

/// Objects listed per request.
const LIST_PAGE: u32 = 500;
/// Grants re-evaluated at once by the start-up sweep.
const SWEEP_CONCURRENCY: usize = 32;

/// Every AccessGrant, from the grant cache. The sweep runs once the cache holds its first full
/// list: a LIST of its own held every grant of a large cluster (with managed fields) at once.
fn cached_grants(ctx: &Context) -> Result<Vec<Arc<AccessGrant>>, Error> {
    match ctx.grants.as_ref().filter(|s| super::cache::ready(s)) {
        Some(store) => Ok(store.state()),
        None => Err(Error::Credentials(crate::credentials::Error::NotReady(
            "the AccessGrant cache has not been filled yet".into(),
        ))),
    }
}

/// Runs the start-up sweep (the grant cache must be filled).
pub async fn sweep(ctx: &Context) -> Result<(), Error> {
    let started = std::time::Instant::now();
    // Listed first: the orphan sweep below needs them listed before the grants are read, and an
    // issuance interrupted before its status write is recorded only on its ServiceAccount.
    let service_accounts = list_grant_objects(Api::<ServiceAccount>::all(ctx.client.clone())).await?;
    let recorded: std::collections::HashMap<&str, jiff::Timestamp> =
        service_accounts.iter().filter_map(|o| Some((o.grant_uid.as_str(), o.expires_at?))).collect();
    let grants = cached_grants(ctx)?;
    let mut recheck = Vec::new();
    for g in &grants {
        let status = g.status.as_ref();
        let uid = g.uid().unwrap_or_default();
        // The end status records, or else the one an interrupted issuance's ServiceAccount does
        // (as `decide` reads them).
        let issued =
            status.and_then(|s| s.expires_at.as_ref()).map(|t| t.0).or_else(|| recorded.get(uid.as_str()).copied());
        let phase = status.and_then(|s| s.phase);
        let unfinished = matches!(phase, Some(GrantPhase::Expired | GrantPhase::Revoked | GrantPhase::Denied))
            && status.is_some_and(|s| s.revoked_at.is_none());
        // An interrupted issuance (its ServiceAccount records an end; not ended): it keeps its
        // place under its identity's cap, before any new grant can take it.
        if status.and_then(|s| s.expires_at.as_ref()).is_none()
            && recorded.contains_key(uid.as_str())
            && !phase.is_some_and(GrantPhase::is_terminal)
        {
            let _ = ctx.reserve_slot(g).await?;
        }
        // Every grant that holds (or held) a credential is looked at again: overdue ones, and those
        // whose identity was suspended, retired or deleted, or that were denied while agentid was down.
        // (Interrupted issuances are resumed later by the controller, after this sweep; those
        // past the end their ServiceAccount records are revoked here.)
        let holds = phase == Some(GrantPhase::Active);
        let overdue = issued.is_some_and(|at| at <= jiff::Timestamp::now());
        if holds || overdue || unfinished {
            recheck.push(g);
        }
    }
    // Together, not one after another: 9,000 active grants took 68 s in turn.
    let rechecked = recheck.len();
    let listed = started.elapsed();
    futures::stream::iter(recheck.into_iter().map(|g| grant::reevaluate(g.as_ref(), ctx)))
        .buffer_unordered(SWEEP_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;

    let swept = started.elapsed();
    let orphans = sweep_orphans_after(ctx, service_accounts).await?;
    let seconds = |d: std::time::Duration| (d.as_secs_f64() * 10.0).round() / 10.0;
    info!(
        rechecked,
        orphans,
        listing_seconds = seconds(listed),
        recheck_seconds = seconds(swept - listed),
        orphans_seconds = seconds(started.elapsed() - swept),
        "start-up sweep done"
    );
    Ok(())
}

/// Deletes objects labelled for a grant UID that no longer exists (e.g. a finalizer removed by
/// hand) or has settled (its revocation deleted them; the cache no longer holds it), ServiceAccounts
/// first. Safe while controllers run: objects are listed before the grants
/// are read from the cache, and a grant's objects are only made by a reconcile of it, which the
/// cache held before that reconcile began.
pub async fn sweep_orphans(ctx: &Context) -> Result<usize, Error> {
    let service_accounts = list_grant_objects(Api::<ServiceAccount>::all(ctx.client.clone())).await?;
    sweep_orphans_after(ctx, service_accounts).await
}

/// [`sweep_orphans`] with the grants' ServiceAccounts already listed.
async fn sweep_orphans_after(ctx: &Context, service_accounts: Vec<GrantObject>) -> Result<usize, Error> {
    let bindings = list_grant_objects(Api::<RoleBinding>::all(ctx.client.clone())).await?;
    let roles = list_grant_objects(Api::<Role>::all(ctx.client.clone())).await?;
    let mut secrets = Vec::new();
    for api in super::secret_apis::<Secret>(&ctx.client, &ctx.installation.agent_namespaces) {
        secrets.extend(list_grant_objects(api).await?);
    }
    let live: HashSet<String> = cached_grants(ctx)?.iter().filter_map(|g| g.uid()).collect();
    Ok(delete_orphans::<ServiceAccount>(ctx, service_accounts, &live).await?
        + delete_orphans::<RoleBinding>(ctx, bindings, &live).await?
        + delete_orphans::<Role>(ctx, roles, &live).await?
        + delete_orphans::<Secret>(ctx, secrets, &live).await?)
}

/// An object made for a grant: its namespace, name and the grant's UID (from its label).
struct GrantObject {
    namespace: String,
    name: String,
    grant_uid: String,
    /// The end of the issuance a ServiceAccount records ([`names::EXPIRES_AT_ANNOTATION`]).
    expires_at: Option<jiff::Timestamp>,
}

async fn list_grant_objects<K>(api: Api<K>) -> Result<Vec<GrantObject>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    // Metadata only (listing Secrets this way never brings their data into the operator), in
    // pages, keeping three strings of each.
    let mut objects = Vec::new();
    let mut page = ListParams::default().labels(&names::all_grants_selector()).limit(LIST_PAGE);
    loop {
        let list: kube::core::ObjectList<PartialObjectMeta<K>> =
            api.list_metadata(&page).await.map_err(kube_err(format!("listing {}s of grants", K::kind(&()))))?;
        objects.extend(list.items.into_iter().map(|mut obj| {
            let grant_uid = obj.labels().get(names::GRANT_UID_LABEL).cloned().unwrap_or_default();
            let expires_at = names::recorded_expiry(&obj.metadata, &grant_uid);
            GrantObject {
                namespace: obj.metadata.namespace.take().unwrap_or_default(),
                name: obj.metadata.name.take().unwrap_or_default(),
                expires_at,
                grant_uid,
            }
        }));
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => page = page.continue_token(&token),
            None => return Ok(objects),
        }
    }
}

async fn delete_orphans<K>(ctx: &Context, listed: Vec<GrantObject>, live: &HashSet<String>) -> Result<usize, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let mut deleted = 0;
    for obj in listed {
        if live.contains(&obj.grant_uid) {
            continue;
        }
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace);
        match api.delete(&obj.name, &DeleteParams::background()).await {
            Ok(_) => deleted += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err(format!("deleting orphaned {} {}", K::kind(&()), obj.name))(e)),
        }
    }
    Ok(deleted)
}
