//! Credential issuers. Each turns an approved, in-ceiling grant into a credential that dies at
//! the grant's end, and takes it away again. `kubernetes` (ServiceAccount + RBAC +
//! TokenRequest) is the only one so far.

pub mod kubernetes;

/// Why issuing or revoking failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused or failed a call.
    #[error("{action}: {source}")]
    Kube {
        /// What agentid was doing, e.g. "creating the grant's token".
        action: String,
        /// The apiserver's answer.
        #[source]
        source: kube::Error,
    },
    /// Something agentid needs is not there yet (e.g. the identity's credentials Secret).
    #[error("{0}")]
    NotReady(String),
    /// The apiserver answered without what it must contain.
    #[error("{0}")]
    Malformed(String),
}

impl Error {
    /// A bounded label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube { source: kube::Error::Api(s), .. } if s.code == 403 => "forbidden",
            Self::Kube { source: kube::Error::Api(s), .. } if s.code == 409 => "conflict",
            Self::Kube { source: kube::Error::Api(s), .. } if s.code == 422 => "invalid",
            Self::Kube { .. } => "kube",
            Self::NotReady(_) => "not-ready",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// A namespaced object agentid makes and reads back (every bound the helpers below need).
pub(crate) trait Object:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
{
}

impl<K> Object for K where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
{
}

/// agentid's server-side apply: its field manager, taking over fields others set.
fn apply_params() -> kube::api::PatchParams {
    kube::api::PatchParams::apply(crate::policy::names::FIELD_MANAGER).force()
}

/// The Api for `obj`'s kind in its namespace, and its name.
fn api_of<K: Object>(client: &kube::Client, obj: &K) -> (kube::Api<K>, String) {
    use kube::ResourceExt as _;
    (kube::Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default()), obj.name_any())
}

/// Server-side applies `obj`; the answer is its metadata only (an identity's credentials Secret
/// holds every active grant's kubeconfig, and nobody needs it back).
pub(crate) async fn server_side_apply<K: Object>(
    client: &kube::Client,
    obj: &K,
) -> Result<kube::core::PartialObjectMeta<K>, Error> {
    let (api, name) = api_of(client, obj);
    api.patch_metadata(&name, &apply_params(), &kube::api::Patch::Apply(obj))
        .await
        .doing(|| format!("applying {} {name}", K::kind(&())))
}

/// Creates `obj` under agentid's field manager; fails (409) if its name is taken.
pub(crate) async fn create<K: Object>(client: &kube::Client, obj: &K) -> Result<K, Error> {
    let (api, name) = api_of(client, obj);
    let params =
        kube::api::PostParams { field_manager: Some(crate::policy::names::FIELD_MANAGER.into()), ..Default::default() };
    api.create(&params, obj).await.doing(|| format!("creating {} {name}", K::kind(&())))
}

/// Creates `obj` under agentid's field manager, or server-side applies it when it already exists
/// (a resumed issuance): a fresh object costs the apiserver a plain create rather than an apply's
/// field-set merge, and what exists ends up as agentid wants it either way.
pub(crate) async fn create_or_apply<K: Object>(client: &kube::Client, obj: &K) -> Result<K, Error> {
    match create(client, obj).await {
        Err(Error::Kube { source: kube::Error::Api(s), .. }) if s.code == 409 => {
            let (api, name) = api_of(client, obj);
            api.patch(&name, &apply_params(), &kube::api::Patch::Apply(obj))
                .await
                .doing(|| format!("applying {} {name}", K::kind(&())))
        }
        created => created,
    }
}

/// Adds what agentid was doing to a kube error.
pub(crate) trait Doing<T> {
    fn doing(self, action: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> Doing<T> for kube::Result<T> {
    fn doing(self, action: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::Kube { action: action(), source })
    }
}

/// DER certificates as one PEM bundle.
pub fn pem_certificates(ders: &[Vec<u8>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for der in ders {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}
