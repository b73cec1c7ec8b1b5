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
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
};
use tracing::{info, warn};

use super::{
    ApprovalFacts,
    certs::ServingCert,
    mutate,
    register::{self, Endpoint},
    validate_approval, validate_grant,
};
use crate::{
    api::{AccessGrant, AgentIdentity},
    policy::names,
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
    /// Installing the webhook configurations failed.
    #[error("installing the webhook configurations: {0}")]
    Register(#[source] kube::Error),
}

#[derive(Clone)]
struct AppState {
    client: Client,
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
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: req.user_info.username.clone(),
            groups: req.user_info.groups.clone(),
            uid: req.user_info.uid.clone(),
            extra: req.user_info.extra.clone().map(|e| e.into_iter().collect()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns),
                verb: Some("approve".into()),
                group: Some(crate::api::GROUP.into()),
                resource: Some("accessgrants".into()),
                name: Some(grant_name),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let may_approve = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?
        .status
        .is_some_and(|s| s.allowed);
    Ok(ApprovalFacts { grant, identity, may_approve })
}

async fn validate_handler(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(req) => req,
        Err(bad) => return bad.into_response(),
    };
    let response = match req.kind.kind.as_str() {
        "Pod" => super::pods::validate(&req),
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
pub fn router(client: Client) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler))
        .route("/validate", post(validate_handler))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(AppState { client }))
}

/// Serves the webhook over TLS on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, cert: &ServingCert, client: Client) -> Result<(), Error> {
    // Both kube's client and this server use ring; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        cert.cert_pem.clone().into_bytes(),
        cert.key_pem.clone().into_bytes(),
    )
    .await
    .map_err(Error::Tls)?;
    info!(%addr, "admission webhook listening");
    axum_server::bind_rustls(addr, tls).serve(router(client).into_make_service()).await.map_err(Error::Serve)
}

/// Installs (or updates) agentid's webhook configurations pointing at `endpoint`.
pub async fn register(
    client: &Client,
    endpoint: &Endpoint,
    ca_pem: &str,
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
        router(client).oneshot(request).await.expect("response").status()
    }

    #[tokio::test]
    async fn malformed_bodies_get_400_not_a_panic() {
        for body in ["", "{", "[]", "null", "{\"kind\":\"AdmissionReview\"}", "{\"request\": 5}", "\u{0}"] {
            assert_eq!(post("/mutate", body).await, StatusCode::BAD_REQUEST, "{body:?}");
            assert_eq!(post("/validate", body).await, StatusCode::BAD_REQUEST, "{body:?}");
        }
    }
}
