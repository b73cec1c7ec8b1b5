//! The Kubernetes issuer: per grant a ServiceAccount, Roles + RoleBindings carrying exactly the
//! grant's rules, a Secret, and a TokenRequest token bound to that Secret.
//!
//! Issuance is idempotent (deterministic names; what already exists is server-side applied), so
//! a repeat after a crash makes no second set of objects. Revocation deletes the ServiceAccount
//! first — every token issued for it stops authenticating at once — then the rest, and
//! tolerates what is already gone.

use std::{collections::BTreeMap, sync::Arc};

use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{Secret, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::debug;

use super::{Doing, Error, create_or_apply};
use crate::{
    api::{AccessGrant, KubernetesRule},
    failpoint,
    policy::{
        desired::{ClusterAccess, GrantObjects, credential_data},
        names,
    },
};

/// Whether `token`, a ServiceAccount token, was minted for the ServiceAccount with uid `sa_uid`
/// bound to the Secret with uid `secret_uid`, by its claims. The signature is not checked here
/// (the apiserver checks it on every use): this only tells a token for the current objects from
/// a stale or foreign one, and anything that does not parse is neither.
pub fn token_bound_to(token: &str, sa_uid: &str, secret_uid: &str) -> bool {
    use base64::Engine as _;
    let Some(payload) = token.split('.').nth(1) else { return false };
    let Ok(claims) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
        return false;
    };
    let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&claims) else { return false };
    let k8s = &claims["kubernetes.io"];
    !sa_uid.is_empty()
        && !secret_uid.is_empty()
        && k8s["serviceaccount"]["uid"].as_str() == Some(sa_uid)
        && k8s["secret"]["uid"].as_str() == Some(secret_uid)
}

/// The apiserver refuses TokenRequests shorter than this; revocation, not the token's own
/// expiry, is what ends a shorter grant on time.
pub const MIN_TOKEN_SECONDS: i64 = 600;

/// Keys of an identity's credentials Secret to set (Some) or remove (None).
type Entries = BTreeMap<String, Option<ByteString>>;

/// One queued write into an identity's credentials Secret.
struct Queued {
    entries: Entries,
    /// The uid of the Secret checked to be agentid's for the identity: the entries go into that
    /// object only, never into one made since under its name. None (removals): whatever is there.
    into: Option<String>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// The queue of writes into one identity's credentials Secret.
#[derive(Default)]
struct IdentityWriter {
    queue: std::sync::Mutex<Vec<Queued>>,
    turn: tokio::sync::Mutex<()>,
}

/// Issues and revokes Kubernetes credentials.
#[derive(Clone)]
pub struct KubernetesIssuer {
    client: Client,
    access: ClusterAccess,
    identity_writers: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<IdentityWriter>>>>,
}

fn rules_of(grant: &AccessGrant) -> &[KubernetesRule] {
    grant.spec.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default()
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, Error>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(source) => Err(Error::Kube { action: format!("deleting {} {name}", K::kind(&Default::default())), source }),
    }
}

impl KubernetesIssuer {
    /// An issuer acting through `client`, writing kubeconfigs that reach the cluster via `access`.
    pub fn new(client: Client, access: ClusterAccess) -> Self {
        Self { client, access, identity_writers: Default::default() }
    }

    /// Makes (or completes) the grant's credential, valid until `expires_at`. The token is
    /// written only into Secrets; it is never returned, logged or put in status. `cached_uid`: the
    /// uid of the identity's credentials Secret where a cache shows it as agentid's, made for
    /// this identity (read live when None).
    pub async fn issue(
        &self,
        grant: &AccessGrant,
        expires_at: Timestamp,
        now: Timestamp,
        cached_uid: Option<String>,
    ) -> Result<(), Error> {
        let objects = GrantObjects::new(grant);
        let ns = &objects.namespace;
        let rules = rules_of(grant);

        let identity_secret = names::identity_credentials_secret(&grant.spec.identity);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        // The ServiceAccount first: it records the issuance (its end) until status does, so no
        // Role, RoleBinding or Secret of the grant exists without it. The others do not depend on
        // one another, so they are made together: one round trip instead of three.
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let (roles, bindings) = (objects.roles(rules), objects.role_bindings(rules));
        let service_account = async {
            let sa = create_or_apply(&self.client, &objects.service_account(expires_at)).await?;
            failpoint::hit("issue:after-service-account");
            Ok::<_, Error>(sa)
        };
        let roles = async {
            futures::future::try_join_all(roles.iter().map(|r| create_or_apply(&self.client, r))).await?;
            failpoint::hit("issue:after-roles");
            Ok(())
        };
        let bindings = async {
            futures::future::try_join_all(bindings.iter().map(|b| create_or_apply(&self.client, b))).await?;
            failpoint::hit("issue:after-role-bindings");
            Ok(())
        };
        let secret = async {
            let secret = create_or_apply(&self.client, &objects.secret()).await?;
            failpoint::hit("issue:after-secret");
            Ok(secret)
        };
        // The identity's credentials Secret must be there (and agentid's, made for this identity)
        // before any token is minted, so that a grant never holds a credential its pods cannot
        // see. Its uid is what the token is later written into (a Secret made since under that
        // name gets nothing). From the cache when it shows agentid's, else read alongside the
        // ServiceAccount: nothing carries a credential until the TokenRequest.
        let identity = &grant.spec.identity;
        let identity_secret_uid = async {
            if let Some(uid) = cached_uid {
                return Ok(uid);
            }
            let meta = secrets
                .get_metadata_opt(&identity_secret)
                .await
                .doing(|| format!("reading Secret {identity_secret}"))?
                .map(|m| m.metadata);
            match meta {
                None => Err(Error::NotReady(format!(
                    "the identity's credentials Secret {identity_secret} does not exist yet"
                ))),
                // Never write a token into a Secret agentid did not make for this identity.
                Some(m) if !names::owned_by(&m, "AgentIdentity", identity) => {
                    Err(Error::NotReady(format!("Secret {identity_secret} was not made by agentid for this identity")))
                }
                Some(m) => m.uid.ok_or_else(|| Error::Malformed(format!("Secret {identity_secret} has no uid"))),
            }
        };
        let (sa, identity_secret_uid) = tokio::try_join!(service_account, identity_secret_uid)?;
        let ((), (), secret) = tokio::try_join!(roles, bindings, secret)?;
        let secret_uid = secret.uid().ok_or_else(|| Error::Malformed(format!("Secret {} has no uid", objects.name)))?;
        let sa_uid = sa.uid().ok_or_else(|| Error::Malformed(format!("ServiceAccount {} has no uid", objects.name)))?;
        // Resumed (a crash, or a reconcile that ran on a cache not yet showing Active): the token
        // for this end is already in the grant's Secret; make sure the identity's copy is too.
        // Only a token minted for these very objects is reused: one for a ServiceAccount or
        // Secret since deleted and re-made no longer authenticates, and one written there by
        // anyone else is not ours to hand out.
        let written = |k: &str| secret.data.as_ref().and_then(|d| d.get(k)).map(|v| v.0.clone());
        if written("expires-at").as_deref() == Some(expires_at.to_string().as_bytes())
            && let Some(token) = written("token").and_then(|t| String::from_utf8(t).ok())
            && token_bound_to(&token, &sa_uid, &secret_uid)
        {
            let data = credential_data(grant, &self.access, &token, expires_at);
            return self.write_identity_entries(ns, &identity_secret, &identity_secret_uid, grant, &data).await;
        }

        let seconds = (expires_at.as_second() - now.as_second()).max(MIN_TOKEN_SECONDS);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: None,
                expiration_seconds: Some(seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Secret".into()),
                    name: Some(objects.name.clone()),
                    uid: Some(secret_uid),
                }),
            }),
            ..Default::default()
        };
        let response: TokenRequest = sas
            .create_subresource("token", &objects.name, &PostParams::default(), &request)
            .await
            .doing(|| format!("requesting a token for ServiceAccount {}", objects.name))?;
        let token = response
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Malformed("TokenRequest answered without a token".into()))?;
        failpoint::hit("issue:after-token");

        let data = credential_data(grant, &self.access, &token, expires_at);
        let grant_name = grant.name_any();
        // The grant's own Secret (where a resumed issuance finds the token) and the identity's
        // (what the pods mount) are written together.
        let own = async {
            secrets
                .patch_metadata(&objects.name, &PatchParams::default(), &Patch::Strategic(json!({"data": data})))
                .await
                .doing(|| format!("writing Secret {}", objects.name))?;
            failpoint::hit("issue:after-grant-secret");
            Ok(())
        };
        tokio::try_join!(own, self.write_identity_entries(ns, &identity_secret, &identity_secret_uid, grant, &data))?;
        debug!(grant = %grant_name, secret = %objects.name, "credential written");
        Ok(())
    }

    /// Writes `entries` (None: remove the key) into an identity's credentials Secret — into the
    /// object with uid `into` only, when given. All of an identity's grants write into that one
    /// Secret; concurrent patches of one object contend in the apiserver (100 at once had some
    /// wait past its 60 s timeout), and each patch rewrites the whole Secret. So writes queue per
    /// Secret, and whoever holds the turn writes everything queued so far in one patch.
    async fn write_identity(
        &self,
        ns: &str,
        identity_secret: &str,
        entries: Entries,
        into: Option<String>,
    ) -> Result<(), Error> {
        let writer = {
            let mut writers = self.identity_writers.lock().unwrap_or_else(|e| e.into_inner());
            writers.entry(format!("{ns}/{identity_secret}")).or_default().clone()
        };
        let (done, outcome) = tokio::sync::oneshot::channel();
        writer.queue.lock().unwrap_or_else(|e| e.into_inner()).push(Queued { entries, into, done });
        {
            let _turn = writer.turn.lock().await;
            let batch: Vec<Queued> = std::mem::take(&mut *writer.queue.lock().unwrap_or_else(|e| e.into_inner()));
            // One patch goes into one object: writes checked against another uid (the Secret was
            // replaced between their checks) fail and are tried again after a fresh check.
            let uid = batch.iter().find_map(|q| q.into.clone());
            let (batch, replaced): (Vec<Queued>, Vec<Queued>) =
                batch.into_iter().partition(|q| q.into.is_none() || q.into == uid);
            for queued in replaced {
                let _ = queued.done.send(Err(format!("Secret {identity_secret} was replaced while being written")));
            }
            if !batch.is_empty() {
                let merged = |writes: &[&Queued]| {
                    let mut merged = Entries::new();
                    for queued in writes {
                        merged.extend(queued.entries.clone());
                    }
                    merged
                };
                let removing = |queued: &&Queued| queued.entries.values().all(Option::is_none);
                let all: Vec<&Queued> = batch.iter().collect();
                let result = self.patch_identity(ns, identity_secret, merged(&all), uid.as_deref()).await;
                // A failed write must not hold up a revocation queued with it (say, new entries
                // the Secret has no room for): the removals go again on their own.
                let removals: Vec<&Queued> = all.iter().copied().filter(removing).collect();
                let removals_result = match result {
                    Err(_) if !removals.is_empty() && removals.len() < all.len() => {
                        Some(self.patch_identity(ns, identity_secret, merged(&removals), None).await)
                    }
                    _ => None,
                };
                for queued in batch {
                    let outcome = match &removals_result {
                        Some(r) if removing(&&queued) => r.clone(),
                        _ => result.clone(),
                    };
                    let _ = queued.done.send(outcome);
                }
            }
        }
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(Error::NotReady(message)),
            Err(_) => Err(Error::NotReady(format!("the write into Secret {identity_secret} was dropped"))),
        }
    }

    /// One patch of an identity's credentials Secret (of the object with uid `into` only, when
    /// given: a patch naming another uid is refused). The answer is its metadata only: the
    /// Secret holds every active grant's kubeconfig (hundreds of KB), and answering each write
    /// with all of it cost the apiserver and the operator more than the write. A strategic merge
    /// patch (a key set to null is removed, as with a merge patch): the apiserver applies it to
    /// the object as a map, where a JSON merge patch makes it render the whole Secret as JSON,
    /// merge the text and parse it back — the largest item in its CPU profile under load.
    async fn patch_identity(
        &self,
        ns: &str,
        identity_secret: &str,
        entries: Entries,
        into: Option<&str>,
    ) -> Result<(), String> {
        let removal_only = entries.values().all(Option::is_none);
        let patch = match into {
            Some(uid) => json!({"metadata": {"uid": uid}, "data": entries}),
            None => json!({"data": entries}),
        };
        match Api::<Secret>::namespaced(self.client.clone(), ns)
            .patch_metadata(identity_secret, &PatchParams::default(), &Patch::Strategic(patch))
            .await
        {
            Ok(_) => Ok(()),
            // Gone with its identity: nothing left to write into or remove from.
            Err(kube::Error::Api(s)) if s.code == 404 && removal_only => Ok(()),
            // Another object under its name (the uid is immutable, so the patch is invalid).
            Err(kube::Error::Api(s)) if s.code == 422 && into.is_some() => {
                Err(format!("Secret {identity_secret} was replaced since agentid checked it; not writing into it"))
            }
            Err(e) => Err(format!("writing Secret {identity_secret}: {e}")),
        }
    }

    async fn write_identity_entries(
        &self,
        ns: &str,
        identity_secret: &str,
        uid: &str,
        grant: &AccessGrant,
        data: &BTreeMap<String, ByteString>,
    ) -> Result<(), Error> {
        let grant_name = grant.name_any();
        let entries: Entries =
            data.iter().map(|(k, v)| (names::identity_secret_key(&grant_name, k), Some(v.clone()))).collect();
        self.write_identity(ns, identity_secret, entries, Some(uid.to_string())).await
    }

    /// Ends the credential in one call: deletes the grant's ServiceAccount, without which no
    /// token issued for it authenticates. Returns when it was deleted (None: already gone).
    pub async fn end_credential(&self, grant: &AccessGrant) -> Result<Option<Timestamp>, Error> {
        let objects = GrantObjects::new(grant);
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &objects.namespace);
        Ok(delete_if_present(&sas, &objects.name).await?.then(Timestamp::now))
    }

    /// Takes the credential away: ServiceAccount first, then bindings, roles, Secrets and the
    /// entries in the identity's Secret. Safe to repeat.
    pub async fn revoke(&self, grant: &AccessGrant) -> Result<(), Error> {
        let objects = GrantObjects::new(grant);
        let ns = &objects.namespace;
        self.end_credential(grant).await?;
        failpoint::hit("revoke:after-service-account");

        for namespace in GrantObjects::target_namespaces(rules_of(grant)) {
            let bindings: Api<RoleBinding> = Api::namespaced(self.client.clone(), &namespace);
            delete_if_present(&bindings, &objects.name).await?;
            let roles: Api<Role> = Api::namespaced(self.client.clone(), &namespace);
            delete_if_present(&roles, &objects.name).await?;
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        delete_if_present(&secrets, &objects.name).await?;

        let grant_name = grant.name_any();
        let removal: Entries = ["token", "kubeconfig", "ca.crt", "expires-at", "scope"]
            .iter()
            .map(|k| (names::identity_secret_key(&grant_name, k), None))
            .collect();
        let identity_secret = names::identity_credentials_secret(&grant.spec.identity);
        self.write_identity(ns, &identity_secret, removal, None).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::token_bound_to;
    use base64::Engine as _;

    fn token(claims: serde_json::Value) -> String {
        let enc = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.c2lnbmF0dXJl", enc(&serde_json::json!({"alg": "RS256"})), enc(&claims))
    }

    fn claims(sa_uid: &str, secret_uid: &str) -> serde_json::Value {
        serde_json::json!({"kubernetes.io": {
            "namespace": "agents",
            "serviceaccount": {"name": "agentid-grant-g-1", "uid": sa_uid},
            "secret": {"name": "agentid-grant-g-1", "uid": secret_uid},
        }})
    }

    #[test]
    fn a_token_for_the_current_objects_is_recognised() {
        assert!(token_bound_to(&token(claims("sa-1", "sec-1")), "sa-1", "sec-1"));
    }

    #[test]
    fn a_token_for_replaced_objects_or_not_a_token_is_not() {
        // The ServiceAccount or the Secret was deleted and re-made since the token was minted.
        assert!(!token_bound_to(&token(claims("sa-old", "sec-1")), "sa-1", "sec-1"));
        assert!(!token_bound_to(&token(claims("sa-1", "sec-old")), "sa-1", "sec-1"));
        // Not bound to a Secret, another shape, or not a JWT at all.
        let unbound = serde_json::json!({"kubernetes.io": {"serviceaccount": {"uid": "sa-1"}}});
        assert!(!token_bound_to(&token(unbound), "sa-1", "sec-1"));
        assert!(!token_bound_to(&token(serde_json::json!({"sub": "x"})), "sa-1", "sec-1"));
        assert!(!token_bound_to("planted-by-someone", "sa-1", "sec-1"));
        assert!(!token_bound_to("a.!!!.c", "sa-1", "sec-1"));
        assert!(!token_bound_to("", "", ""));
        assert!(!token_bound_to(&token(claims("", "")), "", ""));
    }
}
