//! The AgentIdentity reconciler: the base ServiceAccount, the credentials Secret, the one
//! standing right (request grants), and status.

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{ClusterRoleBinding, Role, RoleBinding, Subject},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, events::EventType, reflector::ObjectRef},
};
use tracing::{info, instrument, warn};

use super::{Context, Error, apply_status, grant, kube_err, reconcile_with_finalizer, requeue_at};
use crate::credentials::{Object, create, server_side_apply};
use crate::{
    api::{AccessGrant, AgentIdentity, AgentIdentityStatus, ExposureSummary, GrantPhase},
    policy::{
        ceiling,
        conditions::{Desired, Summary, set, set_summary},
        desired, drift, exposure, names,
    },
};

/// Reconciles one AgentIdentity.
#[instrument(skip_all, fields(kind = "AgentIdentity", namespace = identity.namespace().unwrap_or_default(), name = identity.name_any()))]
pub async fn reconcile(identity: Arc<AgentIdentity>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("AgentIdentity");
    reconcile_with_finalizer(identity, &ctx, names::IDENTITY_FINALIZER, apply, cleanup).await
}

/// The identity's grants that hold a credential and are not being revoked.
async fn active_grants(identity: &AgentIdentity, ctx: &Context) -> Result<Vec<Arc<AccessGrant>>, Error> {
    let (ns, name) = (identity.namespace().unwrap_or_default(), identity.name_any());
    let mut grants = ctx.grants_of(&ns, &name).await?;
    grants.retain(|g| super::triggers::holds_credential(g));
    Ok(grants)
}

/// The uids of the identity's base ServiceAccount and credentials Secret where they exist and are
/// agentid's for it; Err: the first of their names that an object agentid did not make holds.
async fn base_uids(
    identity: &AgentIdentity,
    ctx: &Context,
) -> Result<Result<(Option<String>, Option<String>), String>, Error> {
    let ns = identity.namespace().unwrap_or_default();
    let name = identity.name_any();
    let sa = names::identity_service_account(&name);
    let secret = names::identity_credentials_secret(&name);
    let (found_sa, found_secret) = tokio::try_join!(
        async {
            Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns)
                .get_metadata_opt(&sa)
                .await
                .map_err(kube_err(format!("reading ServiceAccount {sa}")))
        },
        async {
            Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                .get_metadata_opt(&secret)
                .await
                .map_err(kube_err(format!("reading Secret {secret}")))
        },
    )?;
    let uid = |found: Option<ObjectMeta>, what: String| match found {
        None => Ok(None),
        Some(m) if names::owned_by(&m, "AgentIdentity", &name) => Ok(m.uid),
        Some(_) => Err(what),
    };
    Ok(uid(found_sa.map(|m| m.metadata), format!("ServiceAccount {sa}"))
        .and_then(|sa_uid| Ok((sa_uid, uid(found_secret.map(|m| m.metadata), format!("Secret {secret}"))?))))
}

/// Makes a base object whose name was found free (`found` None) or agentid's (its uid): a free
/// name is taken with a create, which fails if someone made an object under it meanwhile (an
/// apply would adopt theirs); an existing one is applied only while it is the object checked.
async fn make_base<K: Object>(ctx: &Context, mut obj: K, found: Option<String>) -> Result<(), Error> {
    if found.is_some() {
        obj.meta_mut().uid = found;
        server_side_apply(&ctx.client, &obj).await?;
    } else {
        create(&ctx.client, &obj).await?;
    }
    Ok(())
}

async fn apply(identity: &AgentIdentity, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    // Outside the installation, agentid has no rights: say so before trying anything.
    let home = identity.namespace().unwrap_or_default();
    if let Err(message) = ctx.installation.check_identity(&home, &identity.spec.allowed_namespaces) {
        return stall(identity, ctx, "OutsideInstallation", message, now).await;
    }
    // Waiting for the binding caches with the base objects applied (or found made) lately: nothing to do
    // until the analysis can run (their own caches may not show them yet either, and applying
    // them again at every retry would compete with the listings waited for).
    if ctx.base_applied_recently(identity) && bindings_view(ctx).is_none() {
        return bindings_not_cached(ctx);
    }
    if !ctx.base_objects_current(identity) {
        let (sa_uid, secret_uid) = match base_uids(identity, ctx).await? {
            Ok(uids) => uids,
            Err(taken) => {
                let message = format!(
                    "{taken} already exists and was not made by agentid for this identity; agentid will not adopt it (it could hold privileges or be readable by others): remove or rename it"
                );
                return stall(identity, ctx, "NameTaken", message, now).await;
            }
        };
        let (sa, secret) =
            (desired::identity_service_account(identity), desired::identity_credentials_secret(identity));
        let (role, binding) =
            (desired::identity_requester_role(identity), desired::identity_requester_binding(identity));
        tokio::try_join!(
            make_base::<ServiceAccount>(ctx, sa, sa_uid),
            make_base::<Secret>(ctx, secret, secret_uid),
            async { server_side_apply::<Role>(&ctx.client, &role).await.map_err(Error::from) },
        )?;
        // After its Role: unless the operator may `bind` it, the apiserver checks a binding
        // against the Role it names, and one it cannot see yet fails (as a misleading 404 for
        // the binding, seen with the chart's confined RBAC).
        server_side_apply::<RoleBinding>(&ctx.client, &binding).await?;
        ctx.base_objects_applied(identity);
    }

    let name = identity.name_any();
    let active = active_grants(identity, ctx).await?;
    let principals = exposure::principals(&home, &name, active.iter().map(|g| g.as_ref()));
    // From the binding caches, which fill once this controller runs: until they hold their first
    // list, look again shortly. (Each reconcile used to list every binding of the cluster
    // instead; with many identities reconciled at once at start-up, those lists held hundreds
    // of megabytes at a time.)
    let Some(bindings) = Bindings::cached(ctx, &principals) else {
        return bindings_not_cached(ctx);
    };

    let old = identity.status.clone().unwrap_or_default();
    let mut status = AgentIdentityStatus {
        service_account_name: Some(names::identity_service_account(&name)),
        credentials_secret: Some(names::identity_credentials_secret(&name)),
        active_grants: count(active.len()),
        exposure: old.exposure.clone(),
        conditions: old.conditions.clone(),
        observed_generation: identity.metadata.generation,
    };
    let generation = identity.metadata.generation;
    let (reason, message) = match ceiling::identity_usable(identity, &ctx.installation, now) {
        Ok(()) => (
            "Ready",
            format!(
                "base ServiceAccount {} holds no privilege; {} active grant(s)",
                names::identity_service_account(&name),
                active.len()
            ),
        ),
        Err(v) => (v.reason(), format!("{v}: every grant is revoked and none is issued")),
    };
    set_summary(&mut status.conditions, Summary::Ready, reason, message.clone(), generation, now);
    let findings = standing_privilege(identity, ctx, &active, &bindings).await?;
    set(&mut status.conditions, drift_condition(&findings), generation, now);
    let was_drifting = old.conditions.iter().any(|c| c.type_ == STANDING_PRIVILEGE && c.status == "True");
    if !findings.is_empty() && (!was_drifting || status != old) {
        ctx.metrics.standing_privilege_detections.inc_by(findings.len() as u64);
        let text: Vec<String> = findings.iter().map(ToString::to_string).collect();
        ctx.event(identity, EventType::Warning, STANDING_PRIVILEGE, text.join("; ")).await;
    }
    let exposed = credential_exposure(identity, ctx, &principals, &bindings);
    if let Some(exposed) = &exposed {
        let c = exposure::counts(exposed);
        status.exposure = Some(ExposureSummary {
            legacy_tokens: count(c.legacy_tokens),
            secrets: count(c.secrets),
            token_minting: count(c.token_minting),
            pods: count(c.pods),
            impersonation: count(c.impersonation),
        });
        let desired = exposure_condition(exposed, &name);
        let was = old.conditions.iter().find(|c| c.type_ == EXPOSURE).map(|c| (c.status.as_str(), c.message.as_str()));
        if desired.status && was != Some(("True", desired.message.as_str())) {
            ctx.event(identity, EventType::Warning, EXPOSURE, desired.message.clone()).await;
        }
        set(&mut status.conditions, desired, generation, now);
    }
    if status != old {
        apply_status(&ctx.client, identity, &status).await?;
        let old_reason = old.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.reason.clone());
        if old_reason.as_deref() != Some(reason) {
            ctx.event(identity, EventType::Normal, reason, message).await;
        }
    }
    // Look again at retirement, so that status and Events say so on time; and, while standing
    // privilege is reported, every minute (a binding edited to drop the subject is not mapped back
    // to this identity by the watch).
    let retire_at = identity.spec.retire_at.as_ref().map(|t| t.0).filter(|t| *t > now);
    let drift_recheck = (!findings.is_empty()).then(|| now + jiff::SignedDuration::from_secs(60));
    // Exposure also changes with Roles and Secrets not its own, which do not trigger a reconcile:
    // look again every five minutes and up to a minute more (by uid: identities made together,
    // thousands at once from GitOps, do not all look again in the same seconds), or soon while
    // the caches are still filling.
    let exposure_recheck = match exposed {
        Some(_) => now + EXPOSURE_RECHECK + super::spread(&identity.uid().unwrap_or_default(), EXPOSURE_RECHECK_SPREAD),
        None => now + std::time::Duration::from_secs(5),
    };
    let next = [retire_at, drift_recheck, Some(exposure_recheck)].into_iter().flatten().min();
    Ok(requeue_at(next, now))
}

/// How often an identity's exposure is looked at again, at least ...
const EXPOSURE_RECHECK: std::time::Duration = std::time::Duration::from_secs(300);

/// ... and up to how much later, by identity.
const EXPOSURE_RECHECK_SPREAD: std::time::Duration = std::time::Duration::from_secs(60);

/// Marks the identity Stalled (a human must change something) and looks again in a minute.
async fn stall(
    identity: &AgentIdentity,
    ctx: &Context,
    reason: &str,
    message: String,
    now: Timestamp,
) -> Result<Action, Error> {
    let old = identity.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = identity.metadata.generation;
    set_summary(&mut status.conditions, Summary::Stalled, reason, message.clone(), identity.metadata.generation, now);
    if status != old {
        apply_status(&ctx.client, identity, &status).await?;
        ctx.event(identity, EventType::Warning, reason, message).await;
    }
    Ok(Action::requeue(std::time::Duration::from_secs(60)))
}

/// The condition that reports standing privilege.
pub const STANDING_PRIVILEGE: &str = "StandingPrivilegeDetected";

fn drift_condition(findings: &[drift::Finding]) -> Desired<'static> {
    if findings.is_empty() {
        return Desired {
            type_: STANDING_PRIVILEGE,
            status: false,
            reason: "None",
            message: "no binding outside agentid gives this identity anything".into(),
        };
    }
    let shown: Vec<String> = findings.iter().take(5).map(ToString::to_string).collect();
    let more = findings.len().saturating_sub(shown.len());
    let mut message = shown.join("; ");
    if more > 0 {
        message.push_str(&format!("; and {more} more"));
    }
    Desired { type_: STANDING_PRIVILEGE, status: true, reason: "BindingsFound", message }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// How soon an identity reconciled before the binding caches were filled is looked at again.
const BINDINGS_FILLING_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the binding caches may take to fill before the wait is reported as a failure. Their
/// first lists took 15 s at 10,000 identities and 50,000 grants on the benchmark machine.
const BINDINGS_FILL_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// An identity reconcile that found the binding caches not yet filled: look again shortly, or,
/// once the wait has lasted longer than [`BINDINGS_FILL_LIMIT`] (their watches cannot list), fail —
/// logged, counted and backed off like any failed reconcile — rather than wait in silence.
fn bindings_not_cached(ctx: &Context) -> Result<Action, Error> {
    waiting_for_bindings(ctx.view.as_ref().map(|v| v.waiting_since.get_or_init(std::time::Instant::now).elapsed()))
}

/// The caches, once the binding caches have had their first full list.
fn bindings_view(ctx: &Context) -> Option<&super::cache::ClusterView> {
    ctx.view.as_ref().filter(|v| v.bindings_ready())
}

/// [`bindings_not_cached`] for a wait begun `waited` ago (None: there are no caches).
fn waiting_for_bindings(waited: Option<std::time::Duration>) -> Result<Action, Error> {
    match waited {
        Some(waited) if waited < BINDINGS_FILL_LIMIT => Ok(Action::requeue(BINDINGS_FILLING_RETRY)),
        waited => Err(Error::BindingsNotCached(waited.unwrap_or_default().as_secs())),
    }
}

/// The RoleBindings and ClusterRoleBindings that may reach an identity's ServiceAccounts, from
/// the caches (which hold a binding before the reconcile it triggers runs) through the binding
/// index; None until the caches have their first full list.
struct Bindings {
    role_bindings: Vec<Arc<RoleBinding>>,
    cluster_role_bindings: Vec<Arc<ClusterRoleBinding>>,
}

impl Bindings {
    fn cached(ctx: &Context, principals: &[exposure::Principal]) -> Option<Self> {
        let view = bindings_view(ctx)?;
        let accounts: Vec<(&str, &str)> = principals.iter().map(|p| (p.namespace.as_str(), p.name.as_str())).collect();
        let found = ctx.binding_index.candidates(&view.role_bindings, &view.cluster_role_bindings, &accounts);
        Some(Self { role_bindings: found.role_bindings, cluster_role_bindings: found.cluster_role_bindings })
    }
}

/// The condition that reports credential exposure.
pub const EXPOSURE: &str = "CredentialExposureDetected";

/// What the identity's base ServiceAccount and active grants (`principals`) can reach that yields
/// credentials; None while the caches are still filling.
fn credential_exposure(
    identity: &AgentIdentity,
    ctx: &Context,
    principals: &[exposure::Principal],
    bindings: &Bindings,
) -> Option<Vec<exposure::Exposed>> {
    let view = ctx.view.as_ref().filter(|v| v.ready())?;
    let ns = identity.namespace().unwrap_or_default();
    let name = identity.name_any();
    // Only the roles the bindings name: hashing every Role in the cluster per reconcile was most
    // of an identity reconcile at scale.
    let (mut roles, mut cluster_roles) = (Vec::new(), Vec::new());
    for b in &bindings.role_bindings {
        let name = &b.role_ref.name;
        match b.role_ref.kind.as_str() {
            "Role" => roles.extend(view.roles.get(&ObjectRef::new(name).within(&b.namespace().unwrap_or_default()))),
            _ => cluster_roles.extend(view.cluster_roles.get(&ObjectRef::new(name))),
        }
    }
    cluster_roles.extend(
        bindings.cluster_role_bindings.iter().filter_map(|b| view.cluster_roles.get(&ObjectRef::new(&b.role_ref.name))),
    );
    let rbac = exposure::Rbac::<super::store::CachedRole> {
        roles: &roles,
        cluster_roles: &cluster_roles,
        role_bindings: &bindings.role_bindings,
        cluster_role_bindings: &bindings.cluster_role_bindings,
    };
    Some(exposure::exposure(&ns, &name, principals, &rbac, &CachedSecrets::new(&view.secrets)))
}

/// The Secret caches, read only for a principal that can read Secrets (each reconcile used to
/// copy a pointer to every cached Secret of the cluster, whether or not the identity could read
/// any). The pointers are copied once, at the first such principal, so that no cache stays
/// locked while they are analysed and every principal of the reconcile reads the same Secrets.
struct CachedSecrets<'a> {
    caches: &'a [super::store::Cache<super::store::Meta<Secret>>],
    copied: std::cell::OnceCell<Vec<Arc<super::store::Meta<Secret>>>>,
}

impl<'a> CachedSecrets<'a> {
    fn new(caches: &'a [super::store::Cache<super::store::Meta<Secret>>]) -> Self {
        Self { caches, copied: std::cell::OnceCell::new() }
    }
}

impl exposure::Secrets for CachedSecrets<'_> {
    fn each(&self, f: &mut dyn FnMut(exposure::SecretRef<'_>)) {
        let copied = self.copied.get_or_init(|| self.caches.iter().flat_map(|cache| cache.state()).collect());
        copied.iter().for_each(|s| f(s.as_secret()));
    }
}

fn exposure_condition(found: &[exposure::Exposed], identity: &str) -> Desired<'static> {
    if found.is_empty() {
        return Desired {
            type_: EXPOSURE,
            status: false,
            reason: "None",
            message: "its ServiceAccounts can reach no Secret, token or more powerful ServiceAccount".into(),
        };
    }
    let shown: Vec<String> = found.iter().take(3).map(|f| format!("{} ({})", f.detail, f.via)).collect();
    let more = found.len().saturating_sub(shown.len());
    let mut message = shown.join("; ");
    if more > 0 {
        message.push_str(&format!("; and {more} more"));
    }
    message.push_str(&format!("; see kubectl agentid exposure {identity}"));
    Desired { type_: EXPOSURE, status: true, reason: "CredentialsReachable", message }
}

/// Bindings not made by agentid that reach the identity; with `spec.enforce`, each such subject is
/// taken out of its binding first, and only what could not be removed is reported.
async fn standing_privilege(
    identity: &AgentIdentity,
    ctx: &Context,
    active: &[Arc<AccessGrant>],
    bindings: &Bindings,
) -> Result<Vec<drift::Finding>, Error> {
    let ns = identity.namespace().unwrap_or_default();
    let name = identity.name_any();
    let grants = drift::active_grants(active.iter().map(|g| g.as_ref()));
    let findings =
        drift::standing_privileges(&ns, &name, &grants, &bindings.role_bindings, &bindings.cluster_role_bindings);
    if !identity.spec.enforce || findings.is_empty() {
        return Ok(findings);
    }
    let mut left = Vec::new();
    for finding in findings {
        if !drift::removable(&finding.subject) {
            left.push(finding);
            continue;
        }
        match remove_subject(ctx, &finding, &ns, &name).await {
            Ok(()) => {
                let message = format!("removed: {finding}");
                info!(binding = %finding.binding, "standing privilege removed");
                ctx.event(identity, EventType::Warning, "StandingPrivilegeRemoved", message).await;
            }
            Err(e) => {
                warn!(binding = %finding.binding, error = %e, "could not remove standing privilege");
                left.push(finding);
            }
        }
    }
    Ok(left)
}

/// Takes the subjects that reach the identity out of the binding (guarded by resourceVersion).
async fn remove_subject(ctx: &Context, finding: &drift::Finding, ns: &str, identity: &str) -> Result<(), Error> {
    let keep = |subjects: Option<Vec<Subject>>| -> Vec<Subject> {
        subjects
            .unwrap_or_default()
            .into_iter()
            .filter(|s| !(drift::removable(s) && drift::reaches_in(s, finding.namespace.as_deref(), ns, identity)))
            .collect()
    };
    match &finding.namespace {
        Some(binding_ns) => {
            let api: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), binding_ns);
            rewrite_subjects(&api, finding, |b: RoleBinding| (b.metadata.resource_version, keep(b.subjects))).await
        }
        None => {
            let api: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
            rewrite_subjects(&api, finding, |b: ClusterRoleBinding| (b.metadata.resource_version, keep(b.subjects)))
                .await
        }
    }
}

/// Replaces a binding's subjects with what `edit` keeps, only if the binding did not change since
/// it was read.
async fn rewrite_subjects<K>(
    api: &Api<K>,
    finding: &drift::Finding,
    edit: impl FnOnce(K) -> (Option<String>, Vec<Subject>),
) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let binding = api.get(&finding.name).await.map_err(kube_err(format!("reading {}", finding.binding)))?;
    let (resource_version, subjects) = edit(binding);
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "replace", "path": "/subjects", "value": subjects}
    ]))
    .map_err(|e| Error::Kube { action: "building a patch".into(), source: kube::Error::SerdeError(e) })?;
    api.patch(&finding.name, &kube::api::PatchParams::default(), &kube::api::Patch::<()>::Json(patch))
        .await
        .map_err(kube_err(format!("editing {}", finding.binding)))?;
    Ok(())
}

/// The identity is being deleted: revoke every grant it holds, then let it go. Its own
/// ServiceAccount, Secret, Role and RoleBinding are owned by it and garbage-collected.
async fn cleanup(identity: &AgentIdentity, ctx: &Context) -> Result<Action, Error> {
    let mut revoked = 0;
    // Read, not cached: a grant made a moment ago must be revoked too.
    for g in ctx.list_grants_of(&identity.namespace().unwrap_or_default(), &identity.name_any()).await? {
        let phase = g.status.as_ref().and_then(|s| s.phase);
        if phase.is_some_and(GrantPhase::is_terminal) && g.status.as_ref().is_some_and(|s| s.revoked_at.is_some()) {
            continue;
        }
        // With the identity going away, the grant's own decision is to revoke.
        grant::reevaluate(&g, ctx).await?;
        revoked += 1;
    }
    ctx.forget_identity(identity);
    info!(revoked, "identity deleted; its grants are revoked");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_wait_for_the_binding_caches_is_short_and_then_reported() {
        let retry = waiting_for_bindings(Some(Duration::from_secs(3))).expect("still waiting");
        assert_eq!(retry, Action::requeue(BINDINGS_FILLING_RETRY));
        for waited in [Some(BINDINGS_FILL_LIMIT), Some(Duration::from_secs(600)), None] {
            let error = waiting_for_bindings(waited).expect_err("waited too long, or no caches");
            assert_eq!(error.category(), "caches");
            assert!(!error.is_permanent(), "retried, with backoff");
            assert!(error.to_string().contains("watch failed"), "says where to look: {error}");
        }
    }

    /// The operator's exposure analysis reads compact cached forms (Roles as `CachedRole`,
    /// Secrets as `Meta` in one cache per namespace); the CLI whole objects. Both must find the
    /// same.
    #[test]
    fn exposure_from_the_caches_finds_what_it_finds_from_whole_objects() {
        use crate::controller::store::{self, CachedRole, Meta};
        use k8s_openapi::api::rbac::v1::ClusterRole;
        use kube::api::PartialObjectMeta;
        use kube::runtime::watcher::Event;

        let identity = crate::policy::testing::identity("fixer", &["prod"]);
        let grant_sa = "agentid-grant-g-1234abcd";
        let role = |ns: &str, name: &str, rules: serde_json::Value| -> Role {
            serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": ns}, "rules": rules}))
                .expect("a Role")
        };
        let roles = vec![
            desired::identity_requester_role(&identity),
            role(
                "prod",
                "read-secrets",
                serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]),
            ),
            role(
                "agents",
                "read-one",
                serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"], "resourceNames": ["agentid-other-credentials"]}]),
            ),
        ];
        let binding = |ns: &str, role: &str, sa: &str| -> RoleBinding {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("{role}-{sa}"), "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": "agents"}]
            }))
            .expect("a RoleBinding")
        };
        let bindings: Vec<Arc<RoleBinding>> = [
            desired::identity_requester_binding(&identity),
            binding("prod", "read-secrets", grant_sa),
            binding("agents", "read-one", "agentid-fixer"),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let secret = |ns: &str, name: &str, annotations: serde_json::Value| -> PartialObjectMeta<Secret> {
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "namespace": ns, "annotations": annotations}}),
            )
            .expect("metadata")
        };
        let (legacy, plain) =
            (serde_json::json!({crate::policy::exposure::LEGACY_TOKEN_ANNOTATION: "db"}), serde_json::json!({}));
        // Two caches, as a confined installation has one per namespace.
        let per_cache = [
            vec![secret("prod", "db-token", legacy.clone()), secret("prod", "tls", plain.clone())],
            vec![
                secret("agents", "agentid-other-credentials", plain.clone()),
                secret("agents", "agentid-fixer-credentials", plain.clone()),
                secret("agents", grant_sa, plain.clone()),
                secret("agents", "unrelated", legacy.clone()),
            ],
        ];

        let (role_cache, mut role_filler) = store::cache::<CachedRole>();
        roles.iter().for_each(|r| role_filler.apply(&Event::Apply(r.clone())));
        let secret_caches: Vec<store::Cache<Meta<Secret>>> = per_cache
            .iter()
            .map(|secrets| {
                let (cache, mut filler) = store::cache::<Meta<Secret>>();
                secrets.iter().for_each(|s| filler.apply(&Event::Apply(s.clone())));
                cache
            })
            .collect();
        let mut grant = crate::policy::testing::grant("g", "fixer", "15m", vec![]);
        grant.status =
            Some(crate::api::AccessGrantStatus { service_account_name: Some(grant_sa.into()), ..Default::default() });
        let principals = exposure::principals("agents", "fixer", [&grant]);
        let no_cluster: [Arc<ClusterRole>; 0] = [];

        let cached_roles = role_cache.state();
        let from_caches = exposure::exposure(
            "agents",
            "fixer",
            &principals,
            &exposure::Rbac::<CachedRole> {
                roles: &cached_roles,
                cluster_roles: &no_cluster,
                role_bindings: &bindings,
                cluster_role_bindings: &[],
            },
            &CachedSecrets::new(&secret_caches),
        );
        let whole_roles: Vec<Arc<Role>> = roles.into_iter().map(Arc::new).collect();
        let metas: Vec<ObjectMeta> = per_cache.iter().flatten().map(|s| s.metadata.clone()).collect();
        let from_objects = exposure::exposure(
            "agents",
            "fixer",
            &principals,
            &exposure::Rbac::<Role> {
                roles: &whole_roles,
                cluster_roles: &no_cluster,
                role_bindings: &bindings,
                cluster_role_bindings: &[],
            },
            &metas[..],
        );
        let found: Vec<(&str, &str)> = from_caches.iter().map(|f| (f.namespace.as_str(), f.target.as_str())).collect();
        assert_eq!(
            found,
            // By kind: a legacy token, another identity's credentials, a Secret; not its own
            // Secrets, nor one it may not read.
            [("prod", "db-token"), ("agents", "agentid-other-credentials"), ("prod", "tls")],
            "{from_caches:#?}"
        );
        assert_eq!(from_caches, from_objects);
    }
}
