//! Pods and agent identities (DESIGN.md step 7): a pod labelled `agentid.dev/identity: NAME` runs
//! as that identity's base ServiceAccount with its credentials Secret mounted; no pod may borrow a
//! per-grant ServiceAccount or Secret, or another identity's.

use k8s_openapi::api::core::v1::{EnvVar, Pod, SecretVolumeSource, Volume, VolumeMount};
use kube::{
    ResourceExt,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse},
    },
};

use crate::policy::names;

/// Where the credentials Secret is mounted in every container.
pub const MOUNT_PATH: &str = "/var/run/agentid";
/// The volume agentid adds.
pub const VOLUME_NAME: &str = "agentid-credentials";
/// The environment variable that points at [`MOUNT_PATH`].
pub const ENV_NAME: &str = "AGENTID_CREDENTIALS_DIR";

/// The identity a pod asks for by label, if any.
pub fn requested_identity(pod: &Pod) -> Option<&str> {
    pod.labels().get(names::IDENTITY_LABEL).map(String::as_str)
}

/// The pod as agentid wants it: base ServiceAccount, no token automount, the credentials Secret
/// mounted read-only in every container, `AGENTID_CREDENTIALS_DIR` set. Applying it twice
/// changes nothing. Err: why the pod is refused.
pub fn inject(pod: &Pod, identity: &str) -> Result<Pod, String> {
    let mut pod = pod.clone();
    let base_sa = names::identity_service_account(identity);
    let spec = pod.spec.as_mut().ok_or("the pod has no spec")?;
    for requested in [spec.service_account_name.as_deref(), spec.service_account.as_deref()].into_iter().flatten() {
        if !requested.is_empty() && requested != "default" && requested != base_sa {
            return Err(format!(
                "the pod is labelled {}={identity} and so runs as ServiceAccount {base_sa}; remove serviceAccountName {requested:?}",
                names::IDENTITY_LABEL
            ));
        }
    }
    spec.service_account_name = Some(base_sa.clone());
    spec.service_account = Some(base_sa);
    spec.automount_service_account_token = Some(false);
    // The ServiceAccount admission plugin runs before webhooks and may already have added the
    // token volume of the `default` ServiceAccount; with automount off it must go.
    let automounted: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.name.starts_with("kube-api-access-"))
        .filter(|v| {
            v.projected
                .as_ref()
                .and_then(|p| p.sources.as_ref())
                .is_some_and(|s| s.iter().any(|s| s.service_account_token.is_some()))
        })
        .map(|v| v.name.clone())
        .collect();
    if let Some(volumes) = spec.volumes.as_mut() {
        volumes.retain(|v| !automounted.contains(&v.name));
    }
    for container in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
        if let Some(mounts) = container.volume_mounts.as_mut() {
            mounts.retain(|m| !automounted.contains(&m.name));
        }
    }

    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    match volumes.iter().find(|v| v.name == VOLUME_NAME) {
        Some(v)
            if v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
                == Some(&names::identity_credentials_secret(identity)) => {}
        Some(_) => return Err(format!("the pod already has a volume named {VOLUME_NAME}, which agentid reserves")),
        None => volumes.push(Volume {
            name: VOLUME_NAME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names::identity_credentials_secret(identity)),
                // The pod starts before any grant is issued.
                optional: Some(true),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
    let containers = spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten());
    for container in containers {
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        if let Some(clash) = mounts.iter().find(|m| m.mount_path == MOUNT_PATH && m.name != VOLUME_NAME) {
            return Err(format!(
                "container {:?} already mounts {} at {MOUNT_PATH}, which agentid reserves",
                container.name, clash.name
            ));
        }
        if !mounts.iter().any(|m| m.name == VOLUME_NAME) {
            mounts.push(VolumeMount {
                name: VOLUME_NAME.into(),
                mount_path: MOUNT_PATH.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        let env = container.env.get_or_insert_with(Vec::new);
        if !env.iter().any(|e| e.name == ENV_NAME) {
            env.push(EnvVar { name: ENV_NAME.into(), value: Some(MOUNT_PATH.into()), ..Default::default() });
        }
    }
    Ok(pod)
}

/// Every ServiceAccount and Secret a pod uses: (kind, name).
fn references(pod: &Pod) -> Vec<(&'static str, String)> {
    let mut refs = Vec::new();
    let Some(spec) = pod.spec.as_ref() else { return refs };
    for sa in [&spec.service_account_name, &spec.service_account].into_iter().flatten() {
        refs.push(("ServiceAccount", sa.clone()));
    }
    for volume in spec.volumes.iter().flatten() {
        if let Some(name) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            refs.push(("Secret", name));
        }
        for source in volume.projected.as_ref().and_then(|p| p.sources.clone()).unwrap_or_default() {
            if let Some(name) = source.secret.map(|s| s.name) {
                refs.push(("Secret", name));
            }
        }
    }
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    for c in containers {
        for e in c.env.iter().flatten() {
            if let Some(r) = e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) {
                refs.push(("Secret", r.name.clone()));
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.secret_ref {
                refs.push(("Secret", r.name.clone()));
            }
        }
    }
    for e in spec.ephemeral_containers.iter().flatten() {
        for env in e.env.iter().flatten() {
            if let Some(r) = env.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) {
                refs.push(("Secret", r.name.clone()));
            }
        }
        for env in e.env_from.iter().flatten() {
            if let Some(r) = &env.secret_ref {
                refs.push(("Secret", r.name.clone()));
            }
        }
    }
    refs
}

/// Whether the pod may use what it references. Per-grant ServiceAccounts and Secrets are never
/// for pods (the credential lives in the identity's Secret); `agentid-<X>` and
/// `agentid-<X>-credentials` only for pods labelled for identity X.
pub fn check(pod: &Pod) -> Result<(), String> {
    let own = requested_identity(pod);
    for (kind, name) in references(pod) {
        if name.starts_with(crate::policy::names::GRANT_OBJECT_PREFIX) {
            return Err(format!(
                "{kind} {name} belongs to an AccessGrant; pods use their identity's credentials (label {}: NAME)",
                names::IDENTITY_LABEL
            ));
        }
        let Some(rest) = name.strip_prefix("agentid-") else { continue };
        let identity = match kind {
            "Secret" => match rest.strip_suffix("-credentials") {
                Some(identity) => identity,
                None => continue,
            },
            _ => rest,
        };
        if own != Some(identity) {
            return Err(match own {
                Some(own) => {
                    format!("{kind} {name} belongs to AgentIdentity {identity:?}, but the pod is labelled for {own:?}")
                }
                None => format!(
                    "{kind} {name} belongs to AgentIdentity {identity:?}: only pods labelled {}: {identity} may use it",
                    names::IDENTITY_LABEL
                ),
            });
        }
    }
    Ok(())
}

/// Workload kinds whose pod template agentid checks, with the path to the template.
const WORKLOAD_TEMPLATES: &[(&str, &[&str])] = &[
    ("Deployment", &["spec", "template"]),
    ("StatefulSet", &["spec", "template"]),
    ("DaemonSet", &["spec", "template"]),
    ("ReplicaSet", &["spec", "template"]),
    ("ReplicationController", &["spec", "template"]),
    ("Job", &["spec", "template"]),
    ("CronJob", &["spec", "jobTemplate", "spec", "template"]),
];

/// The pod a request is about: the Pod itself, or a workload's pod template. None for other kinds.
pub fn pod_of(req: &AdmissionRequest<DynamicObject>) -> Option<Result<Pod, String>> {
    let kind = req.kind.kind.as_str();
    if kind == "Pod" {
        return Some(typed_pod(req.object.as_ref()));
    }
    let (_, path) = WORKLOAD_TEMPLATES.iter().find(|(k, _)| *k == kind)?;
    let Some(obj) = req.object.as_ref() else { return Some(Err("the request carries no object".into())) };
    let mut template = &obj.data;
    for key in *path {
        template = template.get(*key).unwrap_or(&serde_json::Value::Null);
    }
    Some(serde_json::from_value::<Pod>(template.clone()).map_err(|e| format!("malformed pod template: {e}")))
}

/// The kube-controller-manager controllers that make `kind` from a parent workload the webhook
/// checked when it was written: deployment → ReplicaSet, cronjob → Job, and the pod-making
/// controllers → Pod. Nothing else in kube-system is exempt.
fn made_by_its_controller(username: &str, kind: &str) -> bool {
    let Some(controller) = username.strip_prefix("system:serviceaccount:kube-system:") else {
        return username == "system:kube-controller-manager";
    };
    match kind {
        "ReplicaSet" => controller == "deployment-controller",
        "Job" => controller == "cronjob-controller",
        "Pod" => matches!(
            controller,
            "replicaset-controller"
                | "job-controller"
                | "statefulset-controller"
                | "daemon-set-controller"
                | "replication-controller"
        ),
        _ => false,
    }
}

/// The identity the requesting user must be allowed to `use` (RBAC on `agentidentities`) for this
/// pod or workload: the one its (template's) label names, unless the controller that makes this
/// kind from a checked parent creates it (Deployment → ReplicaSet → Pod, CronJob → Job → Pod,
/// StatefulSet/DaemonSet → Pod). Updates are always checked.
pub fn identity_to_authorize(req: &AdmissionRequest<DynamicObject>, pod: &Pod) -> Option<String> {
    let user = req.user_info.username.as_deref().unwrap_or("");
    if req.operation == kube::core::admission::Operation::Create && made_by_its_controller(user, &req.kind.kind) {
        return None;
    }
    requested_identity(pod).map(str::to_string)
}

fn typed_pod(obj: Option<&DynamicObject>) -> Result<Pod, String> {
    let obj = obj.ok_or("the request carries no object")?;
    serde_json::to_value(obj).and_then(serde_json::from_value).map_err(|e| format!("malformed pod: {e}"))
}

/// The mutating webhook for pods. `identity_exists` says whether the labelled identity exists in
/// the pod's namespace.
pub fn mutate(req: &AdmissionRequest<DynamicObject>, identity_exists: bool) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    let pod = match typed_pod(req.object.as_ref()) {
        Ok(p) => p,
        Err(e) => return response.deny(e),
    };
    let Some(identity) = requested_identity(&pod) else { return response };
    if !identity_exists {
        return response.deny(format!(
            "the pod is labelled {}={identity}, but there is no AgentIdentity {identity:?} in namespace {:?}",
            names::IDENTITY_LABEL,
            req.namespace.as_deref().unwrap_or_default()
        ));
    }
    let injected = match inject(&pod, identity) {
        Ok(p) => p,
        Err(e) => return response.deny(e),
    };
    let (Ok(before), Ok(after)) = (serde_json::to_value(&pod), serde_json::to_value(&injected)) else {
        return response.deny("agentid could not serialize the pod");
    };
    let patch = json_patch::diff(&before, &after);
    if patch.0.is_empty() {
        return response;
    }
    super::with_patch(response, patch)
}

/// The validating webhook for pods and workload templates (CREATE and UPDATE). `may_use` is the
/// authorizer's answer for [`identity_to_authorize`] (true when there is nothing to authorize).
pub fn validate(req: &AdmissionRequest<DynamicObject>, may_use: bool) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    let pod = match pod_of(req) {
        Some(Ok(pod)) => pod,
        Some(Err(e)) => return response.deny(e),
        None => return response,
    };
    if !may_use && let Some(identity) = identity_to_authorize(req, &pod) {
        let user = req.user_info.username.as_deref().unwrap_or("");
        return response.deny(format!(
            "{user} may not run pods as AgentIdentity {identity:?}: that needs RBAC verb use on agentidentities.agentid.dev/{identity}"
        ));
    }
    match check(&pod) {
        Ok(()) => response,
        Err(e) => response.deny(e),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(labels: serde_json::Value, spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "labels": labels}, "spec": spec})).expect("pod")
    }

    fn two_containers() -> serde_json::Value {
        json!({"containers": [{"name": "agent", "image": "a"}, {"name": "sidecar", "image": "b"}], "initContainers": [{"name": "init", "image": "c"}]})
    }

    #[test]
    fn injection_sets_sa_volume_mounts_and_env_once() {
        let p = pod(json!({"agentid.dev/identity": "fixer"}), two_containers());
        let once = inject(&p, "fixer").expect("injected");
        let spec = once.spec.clone().expect("spec");
        assert_eq!(spec.service_account_name.as_deref(), Some("agentid-fixer"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let volume = &spec.volumes.clone().expect("volumes")[0];
        let secret = volume.secret.clone().expect("secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("agentid-fixer-credentials"));
        assert_eq!(secret.optional, Some(true));
        for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            let mounts = c.volume_mounts.clone().expect("mounts");
            assert_eq!(mounts.len(), 1);
            assert_eq!((mounts[0].mount_path.as_str(), mounts[0].read_only), (MOUNT_PATH, Some(true)));
            assert!(c.env.iter().flatten().any(|e| e.name == ENV_NAME && e.value.as_deref() == Some(MOUNT_PATH)));
        }
        assert_eq!(inject(&once, "fixer").expect("again"), once, "reinvocation changes nothing");

        // The default ServiceAccount's token, added before webhooks run, is taken out again.
        let with_token = pod(
            json!({"agentid.dev/identity": "fixer"}),
            json!({
                "serviceAccountName": "default",
                "containers": [{"name": "c", "image": "a", "volumeMounts": [{"name": "kube-api-access-abcde", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
                "volumes": [{"name": "kube-api-access-abcde", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}]
            }),
        );
        let injected = inject(&with_token, "fixer").expect("injected").spec.expect("spec");
        assert_eq!(
            injected.volumes.expect("volumes").iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            vec![VOLUME_NAME]
        );
        assert_eq!(injected.containers[0].volume_mounts.clone().expect("mounts").len(), 1);
        assert_eq!(check(&once), Ok(()));
    }

    #[test]
    fn injection_refuses_a_foreign_service_account_or_reserved_names() {
        let p = pod(
            json!({"agentid.dev/identity": "fixer"}),
            json!({"serviceAccountName": "deployer", "containers": [{"name": "c", "image": "a"}]}),
        );
        assert!(inject(&p, "fixer").unwrap_err().contains("remove serviceAccountName \"deployer\""));
        let p = pod(
            json!({"agentid.dev/identity": "fixer"}),
            json!({"serviceAccountName": "default", "containers": [{"name": "c", "image": "a"}]}),
        );
        assert!(inject(&p, "fixer").is_ok());
        let p = pod(
            json!({"agentid.dev/identity": "fixer"}),
            json!({"containers": [{"name": "c", "image": "a", "volumeMounts": [{"name": "x", "mountPath": MOUNT_PATH}]}], "volumes": [{"name": "x", "emptyDir": {}}]}),
        );
        assert!(inject(&p, "fixer").unwrap_err().contains("reserves"));
    }

    #[test]
    fn borrowing_is_refused() {
        let c = json!([{"name": "c", "image": "a"}]);
        let cases = [
            (
                json!({}),
                json!({"serviceAccountName": "agentid-grant-rm-0b6f7c3e", "containers": c}),
                "belongs to an AccessGrant",
            ),
            (
                json!({"agentid.dev/identity": "fixer"}),
                json!({"serviceAccountName": "agentid-grant-rm-0b6f7c3e", "containers": c}),
                "belongs to an AccessGrant",
            ),
            (
                json!({}),
                json!({"serviceAccountName": "agentid-fixer", "containers": c}),
                "only pods labelled agentid.dev/identity: fixer",
            ),
            (
                json!({"agentid.dev/identity": "other"}),
                json!({"serviceAccountName": "agentid-fixer", "containers": c}),
                "labelled for \"other\"",
            ),
            (
                json!({}),
                json!({"containers": c, "volumes": [{"name": "v", "secret": {"secretName": "agentid-fixer-credentials"}}]}),
                "AgentIdentity \"fixer\"",
            ),
            (
                json!({}),
                json!({"containers": c, "volumes": [{"name": "v", "secret": {"secretName": "agentid-grant-rm-0b6f7c3e"}}]}),
                "AccessGrant",
            ),
            (
                json!({}),
                json!({"containers": c, "volumes": [{"name": "v", "projected": {"sources": [{"secret": {"name": "agentid-grant-rm-1"}}]}}]}),
                "AccessGrant",
            ),
            (
                json!({}),
                json!({"containers": [{"name": "c", "image": "a", "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "agentid-grant-rm-1", "key": "token"}}}]}]}),
                "AccessGrant",
            ),
            (
                json!({}),
                json!({"containers": [{"name": "c", "image": "a", "envFrom": [{"secretRef": {"name": "agentid-fixer-credentials"}}]}]}),
                "AgentIdentity \"fixer\"",
            ),
            (
                json!({}),
                json!({"containers": c, "ephemeralContainers": [{"name": "debug", "image": "a", "envFrom": [{"secretRef": {"name": "agentid-fixer-credentials"}}]}]}),
                "AgentIdentity \"fixer\"",
            ),
            (
                json!({}),
                json!({"containers": c, "ephemeralContainers": [{"name": "debug", "image": "a", "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "agentid-grant-x-1", "key": "token"}}}]}]}),
                "AccessGrant",
            ),
        ];
        for (labels, spec, expected) in cases {
            let p = pod(labels.clone(), spec.clone());
            let err = check(&p).expect_err(&format!("{labels} {spec} should be refused"));
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
        // Ordinary pods and ordinary Secrets pass.
        let fine = pod(
            json!({}),
            json!({"serviceAccountName": "builder", "containers": c, "volumes": [{"name": "v", "secret": {"secretName": "tls"}}]}),
        );
        assert_eq!(check(&fine), Ok(()));
    }
}
