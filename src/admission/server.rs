//! The webhook's HTTPS server: parses AdmissionReviews, looks up the facts the pure checks need,
//! answers. A body that is not an AdmissionReview gets 400; a lookup that fails denies (fail
//! closed) — the apiserver then refuses the request.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use k8s_openapi::api::{
    admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    authorization::v1::SubjectAccessReviewSpec,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
};
use tracing::{info, warn};

use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::api::core::v1::Secret;

use super::{
    ApprovalFacts,
    certs::{self, ServingCert},
    mutate,
    register::{self, Endpoint},
    validate_approval, validate_grant,
};
use crate::{
    api::{AccessGrant, AgentIdentity},
    policy::{install::Installation, names},
};

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TLS material was unusable.
    #[error("loading the webhook certificate: {0}")]
    Tls(#[source] std::io::Error),
    /// Serving failed.
    #[error("serving the webhook: {0}")]
    Serve(#[source] std::io::Error),
    /// Installing the webhook configurations (or storing the certificate) failed.
    #[error("installing the webhook: {0}")]
    Register(#[source] kube::Error),
    /// The certificate could not be made.
    #[error(transparent)]
    Cert(#[from] certs::Error),
}

#[derive(Clone)]
struct AppState {
    client: Client,
    own_namespace: Option<String>,
    installation: Installation,
}

/// Asks the authorizer whether the requesting user may `verb` agentid's `resource` (named
/// `name`) in `namespace`.
async fn may(
    client: &Client,
    req: &AdmissionRequest<DynamicObject>,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: Option<String>,
) -> kube::Result<bool> {
    let subject = SubjectAccessReviewSpec {
        user: req.user_info.username.clone(),
        groups: req.user_info.groups.clone(),
        uid: req.user_info.uid.clone(),
        extra: req.user_info.extra.clone().map(|e| e.into_iter().collect()),
        ..Default::default()
    };
    crate::authz::may(client, subject, verb, resource, namespace, name.as_deref()).await
}

/// A body that is not an AdmissionReview with a request: 400 and why.
type BadRequest = (StatusCode, String);

fn parse(body: &Bytes) -> Result<AdmissionRequest<DynamicObject>, BadRequest> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("not an AdmissionReview: {e}")))?;
    review.try_into().map_err(|e| (StatusCode::BAD_REQUEST, format!("AdmissionReview without a request: {e}")))
}

fn answer(response: AdmissionResponse) -> Response {
    Json(response.into_review()).into_response()
}

async fn mutate_handler(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(req) => req,
        Err(bad) => return bad.into_response(),
    };
    if req.kind.kind != "Pod" {
        return answer(mutate(&req));
    }
    let identity =
        req.object.as_ref().and_then(|o| o.metadata.labels.as_ref()).and_then(|l| l.get(names::IDENTITY_LABEL));
    let exists = match identity {
        None => false,
        Some(name) => {
            let api =
                Api::<AgentIdentity>::namespaced(state.client.clone(), req.namespace.as_deref().unwrap_or_default());
            match api.get_metadata_opt(name).await {
                Ok(found) => found.is_some(),
                Err(e) => {
                    warn!(error = %e, "could not look up a pod's AgentIdentity; refusing the pod");
                    return answer(
                        AdmissionResponse::from(&req)
                            .deny(format!("agentid could not look up AgentIdentity {name:?} ({e}); try again")),
                    );
                }
            }
        }
    };
    answer(super::pods::mutate(&req, exists))
}

async fn approval_facts(client: &Client, req: &AdmissionRequest<DynamicObject>) -> kube::Result<ApprovalFacts> {
    let ns = req.namespace.clone().unwrap_or_default();
    let Some(spec) = req.object.as_ref().and_then(|o| o.data.get("spec")) else {
        return Ok(ApprovalFacts::default());
    };
    let grant_name = spec.get("grant").and_then(|g| g.as_str()).unwrap_or_default().to_string();
    let grant = if grant_name.is_empty() {
        None
    } else {
        Api::<AccessGrant>::namespaced(client.clone(), &ns).get_opt(&grant_name).await?
    };
    let identity = match &grant {
        Some(g) => Api::<AgentIdentity>::namespaced(client.clone(), &ns).get_opt(&g.spec.identity).await?,
        None => None,
    };
    let may_approve = may(client, req, "approve", "accessgrants", &ns, Some(grant_name)).await?;
    Ok(ApprovalFacts { grant, identity, may_approve })
}

async fn validate_handler(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(req) => req,
        Err(bad) => return bad.into_response(),
    };
    let response = match req.kind.kind.as_str() {
        "Pod"
        | "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job"
        | "CronJob" => {
            let identity = match super::pods::pod_of(&req) {
                Some(Ok(pod)) => super::pods::identity_to_authorize(&req, &pod),
                _ => None,
            };
            let may_use = match identity {
                None => true,
                Some(identity) => {
                    let ns = req.namespace.clone().unwrap_or_default();
                    match may(&state.client, &req, "use", "agentidentities", &ns, Some(identity)).await {
                        Ok(allowed) => allowed,
                        Err(e) => {
                            let message = format!("agentid could not check who may use the identity ({e}); try again");
                            return answer(AdmissionResponse::from(&req).deny(message));
                        }
                    }
                }
            };
            super::pods::validate(&req, may_use)
        }
        "AgentIdentity" => {
            let mut refused = Vec::new();
            for ns in super::newly_allowed(&req).unwrap_or_default() {
                match may(&state.client, &req, "delegate", "agentidentities", &ns, None).await {
                    Ok(true) => {}
                    Ok(false) => refused.push(ns),
                    Err(e) => {
                        let message = format!("agentid could not check delegation to {ns:?} ({e}); try again");
                        return answer(AdmissionResponse::from(&req).deny(message));
                    }
                }
            }
            super::validate_identity(&req, state.own_namespace.as_deref(), &state.installation, &refused)
        }
        "AccessGrant" => validate_grant(&req),
        "Approval" if req.operation == Operation::Create => match approval_facts(&state.client, &req).await {
            Ok(facts) => validate_approval(&req, &facts),
            Err(e) => {
                warn!(error = %e, "could not look up the facts for an Approval; refusing it");
                AdmissionResponse::from(&req).deny(format!("agentid could not check this Approval ({e}); try again"))
            }
        },
        "Approval" => validate_approval(&req, &ApprovalFacts::default()),
        other => AdmissionResponse::from(&req).deny(format!("agentid does not review kind {other:?}")),
    };
    answer(response)
}

/// The webhook's routes (without TLS), for the server and for tests.
pub fn router(client: Client, own_namespace: Option<String>, installation: Installation) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler))
        .route("/validate", post(validate_handler))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(AppState { client, own_namespace, installation }))
}

/// How the webhook is served and registered.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Where it listens.
    pub addr: SocketAddr,
    /// How the apiserver reaches it; None: serve, but do not register.
    pub endpoint: Option<Endpoint>,
    /// The Secret (namespace, name) that keeps the certificate; None: a new one each start.
    pub cert_secret: Option<(String, String)>,
    /// The certificate in `cert_secret` is made by someone else (cert-manager): agentid only
    /// reads it (`tls.crt`, `tls.key`), reloads it when it changes, and leaves each webhook's
    /// caBundle to whoever injects it (cert-manager's cainjector).
    pub cert_external: bool,
    /// agentid's own namespace, whose pods the webhook never blocks.
    pub own_namespace: Option<String>,
    /// The namespaces this installation serves: identities outside them are refused.
    pub installation: Installation,
}

impl WebhookSettings {
    fn hosts(&self) -> Vec<String> {
        self.endpoint.as_ref().map(Endpoint::hosts).unwrap_or_else(|| vec!["localhost".into()])
    }
}

/// The stored certificate if it is still good for `hosts`, else a new one (stored when a Secret
/// is named). Only this one Secret is read, by name.
async fn current_cert(client: &Client, settings: &WebhookSettings) -> Result<ServingCert, Error> {
    let hosts = settings.hosts();
    let now = jiff::Timestamp::now();
    let Some((ns, name)) = &settings.cert_secret else {
        return certs::generate(&hosts, now).map_err(Error::Cert);
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let stored = secrets.get_opt(name).await.map_err(Error::Register)?;
    if let Some(cert) = stored.and_then(|s| s.data).as_ref().and_then(ServingCert::from_secret_data)
        && !cert.needs_renewal(&hosts, now)
    {
        return Ok(cert);
    }
    let cert = certs::generate(&hosts, now).map_err(Error::Cert)?;
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns, "labels": {names::MANAGED_BY_LABEL: names::MANAGED_BY}},
        "stringData": cert.to_secret_data(),
    });
    secrets
        .patch(name, &PatchParams::apply(names::FIELD_MANAGER).force(), &Patch::Apply(&secret))
        .await
        .map_err(Error::Register)?;
    info!(secret = %name, not_after = %cert.not_after, "webhook certificate stored");
    Ok(cert)
}

/// `tls.crt` and `tls.key` of an externally managed Secret, waiting up to a minute for them to
/// appear (cert-manager fills the Secret shortly after install). Only this Secret is read.
async fn external_cert(client: &Client, ns: &str, name: &str) -> Result<(String, String), Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for attempt in 0..60 {
        let data = secrets.get_opt(name).await.map_err(Error::Register)?.and_then(|s| s.data).unwrap_or_default();
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|t| !t.is_empty());
        if let (Some(cert), Some(key)) = (text("tls.crt"), text("tls.key")) {
            return Ok((cert, key));
        }
        if attempt == 0 {
            info!(secret = %name, "waiting for the webhook certificate Secret to be filled");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    Err(Error::Tls(std::io::Error::other(format!(
        "Secret {ns}/{name} has no tls.crt and tls.key after a minute: is cert-manager issuing the Certificate?"
    ))))
}

/// Starts the webhook: certificate, registration (caBundle), the HTTPS server, and a task that
/// renews (or, when external, reloads) the certificate. Returns once the webhook is registered.
pub async fn start(client: Client, settings: WebhookSettings) -> Result<(), Error> {
    // Both kube's client and this server use ring; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if settings.cert_external {
        return start_external(client, settings).await;
    }
    let cert = current_cert(&client, &settings).await?;
    let tls = RustlsConfig::from_pem(cert.cert_pem.clone().into_bytes(), cert.key_pem.clone().into_bytes())
        .await
        .map_err(Error::Tls)?;
    serve(&client, &settings, tls.clone())?;
    let own = settings.own_namespace.as_deref();
    match &settings.endpoint {
        Some(endpoint) => register(&client, endpoint, Some(&cert.ca_pem), own).await?,
        None => warn!(
            "no --webhook-url or --webhook-service: the admission webhook is not registered, so requesters are not recorded, no approval can count and pods are not injected"
        ),
    }
    tokio::spawn(rotate(client, settings, tls, cert));
    Ok(())
}

/// The external-certificate variant of [`start`].
async fn start_external(client: Client, settings: WebhookSettings) -> Result<(), Error> {
    let (ns, name) = settings.cert_secret.clone().ok_or_else(|| {
        Error::Tls(std::io::Error::other("an external webhook certificate needs --webhook-cert-secret NAMESPACE/NAME"))
    })?;
    let (mut cert, key) = external_cert(&client, &ns, &name).await?;
    let tls = RustlsConfig::from_pem(cert.clone().into_bytes(), key.into_bytes()).await.map_err(Error::Tls)?;
    serve(&client, &settings, tls.clone())?;
    if let Some(endpoint) = &settings.endpoint {
        register(&client, endpoint, None, settings.own_namespace.as_deref()).await?;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            match external_cert(&client, &ns, &name).await {
                Ok((new_cert, new_key)) if new_cert != cert => {
                    match tls.reload_from_pem(new_cert.clone().into_bytes(), new_key.into_bytes()).await {
                        Ok(()) => {
                            info!(secret = %name, "webhook certificate reloaded");
                            cert = new_cert;
                        }
                        Err(e) => warn!(error = %e, "could not load the new webhook certificate; will retry"),
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "could not read the webhook certificate; will retry"),
            }
        }
    });
    Ok(())
}

/// Binds the webhook's port and serves it in the background. Bound before the webhook is
/// registered, so the apiserver is never sent to a closed port (which, failing closed, would
/// refuse requests).
fn serve(client: &Client, settings: &WebhookSettings, tls: RustlsConfig) -> Result<(), Error> {
    let listener = std::net::TcpListener::bind(settings.addr).map_err(Error::Serve)?;
    listener.set_nonblocking(true).map_err(Error::Serve)?;
    info!(addr = %settings.addr, "admission webhook listening");
    let server = axum_server::from_tcp_rustls(listener, tls).map_err(Error::Serve)?.serve(
        router(client.clone(), settings.own_namespace.clone(), settings.installation.clone()).into_make_service(),
    );
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "admission webhook stopped");
        }
    });
    Ok(())
}

async fn rotate(client: Client, settings: WebhookSettings, tls: RustlsConfig, mut cert: ServingCert) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(6 * 3600)).await;
        if !cert.needs_renewal(&settings.hosts(), jiff::Timestamp::now()) {
            continue;
        }
        let renewed = match current_cert(&client, &settings).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "could not renew the webhook certificate; will retry");
                continue;
            }
        };
        // Trust both CAs while the apiserver and the server switch over.
        let bundle = format!("{}{}", renewed.ca_pem, cert.ca_pem);
        if let Some(endpoint) = &settings.endpoint
            && let Err(e) = register(&client, endpoint, Some(&bundle), settings.own_namespace.as_deref()).await
        {
            warn!(error = %e, "could not update the caBundle; will retry");
            continue;
        }
        if let Err(e) =
            tls.reload_from_pem(renewed.cert_pem.clone().into_bytes(), renewed.key_pem.clone().into_bytes()).await
        {
            warn!(error = %e, "could not load the renewed certificate; will retry");
            continue;
        }
        info!(not_after = %renewed.not_after, "webhook certificate renewed");
        cert = renewed;
    }
}

/// Installs (or updates) agentid's webhook configurations pointing at `endpoint`, with `ca_pem`
/// as caBundle (None: left to whoever injects it).
pub async fn register(
    client: &Client,
    endpoint: &Endpoint,
    ca_pem: Option<&str>,
    own_namespace: Option<&str>,
) -> Result<(), Error> {
    let ssa = PatchParams::apply(names::FIELD_MANAGER).force();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(register::CONFIGURATION_NAME, &ssa, &Patch::Apply(register::mutating(endpoint, ca_pem, own_namespace)))
        .await
        .map_err(Error::Register)?;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(register::CONFIGURATION_NAME, &ssa, &Patch::Apply(register::validating(endpoint, ca_pem, own_namespace)))
        .await
        .map_err(Error::Register)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    use super::*;

    async fn post(path: &str, body: &'static str) -> StatusCode {
        // The routes that never reach the apiserver: any client will do.
        let config = kube::Config::new("https://127.0.0.1:1".parse().expect("uri"));
        let client = Client::try_from(config).expect("client");
        let request =
            Request::post(path).header("content-type", "application/json").body(Body::from(body)).expect("request");
        router(client, None, Installation::ANYWHERE).oneshot(request).await.expect("response").status()
    }

    /// A small deterministic generator, so that a failure reproduces.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[tokio::test]
    async fn random_and_truncated_bodies_never_panic_and_get_4xx() {
        let valid = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
                "userInfo": {"username": "u"}, "object": {"metadata": {"name": "p", "labels": {"agentid.dev/identity": "x"}}}}
        })
        .to_string();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let config = kube::Config::new("https://127.0.0.1:1".parse().expect("uri"));
        let client = Client::try_from(config).expect("client");
        for round in 0..300 {
            let body: Vec<u8> = match round % 3 {
                // Random bytes.
                0 => (0..(xorshift(&mut state) % 200)).map(|_| xorshift(&mut state) as u8).collect(),
                // A valid review cut short.
                1 => valid.as_bytes()[..(xorshift(&mut state) as usize % valid.len())].to_vec(),
                // A valid review with one byte flipped.
                _ => {
                    let mut b = valid.clone().into_bytes();
                    let i = xorshift(&mut state) as usize % b.len();
                    b[i] = xorshift(&mut state) as u8;
                    b
                }
            };
            for path in ["/validate", "/mutate"] {
                let request = Request::post(path).body(Body::from(body.clone())).expect("request");
                let status = router(client.clone(), None, Installation::ANYWHERE)
                    .oneshot(request)
                    .await
                    .expect("response")
                    .status();
                // Either refused as malformed (4xx) or parsed and answered (200, allowed or not).
                assert!(status.is_client_error() || status == StatusCode::OK, "{path} answered {status} to {body:?}");
            }
        }
    }

    #[tokio::test]
    async fn malformed_bodies_get_400_not_a_panic() {
        for body in ["", "{", "[]", "null", "{\"kind\":\"AdmissionReview\"}", "{\"request\": 5}", "\u{0}"] {
            assert_eq!(post("/mutate", body).await, StatusCode::BAD_REQUEST, "{body:?}");
            assert_eq!(post("/validate", body).await, StatusCode::BAD_REQUEST, "{body:?}");
        }
    }
}
