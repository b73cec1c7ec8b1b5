//! Asking the apiserver's authorizer (SubjectAccessReview) about agentid's own verbs: `approve`
//! on accessgrants, `delegate` and `use` on agentidentities.

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::{Api, Client, api::PostParams};

/// Whether `subject` (a spec with user, groups, uid and extra filled in) may `verb` agentid's
/// `resource`, optionally the one named `name`, in `namespace`.
pub async fn may(
    client: &Client,
    subject: SubjectAccessReviewSpec,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: Option<&str>,
) -> kube::Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.into()),
                verb: Some(verb.into()),
                group: Some(crate::api::GROUP.into()),
                resource: Some(resource.into()),
                name: name.map(str::to_string),
                ..Default::default()
            }),
            ..subject
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}
