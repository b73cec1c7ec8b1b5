//! The suite-wide leak audit: no ServiceAccount, Role, RoleBinding, Secret or credentials entry
//! made for a grant outlives that grant. `tests/run` runs it again after every other test.

use std::collections::BTreeMap;

use agentid::api::{AccessGrant, GrantPhase};
use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, PartialObjectMeta},
};
use serde::de::DeserializeOwned;

use crate::harness::{cluster, install_crds};

/// Whether the grant `uid` in `ns/name` still holds a credential (so its objects may exist).
async fn grant_holds_credential(client: &Client, ns: &str, name: &str, uid: &str) -> anyhow::Result<bool> {
    let grant = Api::<AccessGrant>::namespaced(client.clone(), ns).get_opt(name).await?;
    Ok(grant.is_some_and(|g| {
        g.uid().as_deref() == Some(uid)
            && g.metadata.deletion_timestamp.is_none()
            && !g.status.as_ref().and_then(|s| s.phase).is_some_and(GrantPhase::is_terminal)
    }))
}

async fn leaked<K>(client: &Client) -> anyhow::Result<Vec<String>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let selector = "app.kubernetes.io/managed-by=agentid,agentid.dev/component=grant";
    let listed: Vec<PartialObjectMeta<K>> =
        Api::<K>::all(client.clone()).list_metadata(&ListParams::default().labels(selector)).await?.items;
    let mut leaks = Vec::new();
    for obj in listed {
        let labels = obj.labels();
        let (ns, name, uid) = (
            labels.get("agentid.dev/grant-namespace").cloned().unwrap_or_default(),
            labels.get("agentid.dev/grant").cloned().unwrap_or_default(),
            labels.get("agentid.dev/grant-uid").cloned().unwrap_or_default(),
        );
        if grant_holds_credential(client, &ns, &name, &uid).await? {
            continue;
        }
        // Listed before the grant ended? Revocation removes objects before the grant's phase or
        // existence changes, so an object still present now is a real leak.
        let own_ns = obj.namespace().unwrap_or_default();
        if Api::<K>::namespaced(client.clone(), &own_ns).get_metadata_opt(&obj.name_any()).await?.is_some() {
            leaks.push(format!("{} {own_ns}/{} of grant {ns}/{name}", K::kind(&()), obj.name_any()));
        }
    }
    Ok(leaks)
}

#[tokio::test]
async fn audit_no_object_outlives_its_grant() -> anyhow::Result<()> {
    install_crds().await?;
    let client = cluster().admin().await?;
    let mut leaks = Vec::new();
    leaks.extend(leaked::<ServiceAccount>(&client).await?);
    leaks.extend(leaked::<Role>(&client).await?);
    leaks.extend(leaked::<RoleBinding>(&client).await?);
    leaks.extend(leaked::<Secret>(&client).await?);

    // Entries in identities' credentials Secrets: `<grant>.<key>` only for grants holding one.
    let identity_secrets = Api::<Secret>::all(client.clone())
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=agentid,agentid.dev/component=base"))
        .await?;
    for secret in identity_secrets {
        let ns = secret.namespace().unwrap_or_default();
        let mut grants: BTreeMap<String, ()> = BTreeMap::new();
        for key in secret.data.clone().unwrap_or_default().keys() {
            if let Some((grant, _)) = key.split_once('.') {
                grants.insert(grant.to_string(), ());
            }
        }
        for grant in grants.keys() {
            let live = Api::<AccessGrant>::namespaced(client.clone(), &ns).get_opt(grant).await?;
            let holds = live.is_some_and(|g| {
                g.metadata.deletion_timestamp.is_none()
                    && g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active)
            });
            if !holds {
                // Re-read: the entry may have been removed since the list.
                let now = Api::<Secret>::namespaced(client.clone(), &ns).get(&secret.name_any()).await?;
                if now.data.unwrap_or_default().keys().any(|k| k.starts_with(&format!("{grant}."))) {
                    leaks.push(format!("entry {grant}.* in Secret {ns}/{}", secret.name_any()));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "objects outlived their grants:\n{}", leaks.join("\n"));
    Ok(())
}
