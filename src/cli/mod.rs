//! `kubectl agentid`: review and decide grants from the terminal.
//!
//! `pending`, `approve`, `deny`, `explain`, `inventory`, `exposure`. Approve and deny fill in the grant's UID and the
//! caller's user name (asked of the apiserver), so the Approval passes admission as the caller.

pub mod render;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::Serialize;

use k8s_openapi::api::{
    core::v1::Secret,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};

use crate::{
    api::{AccessGrant, AgentIdentity, Approval, ApprovalSpec, Decision, GrantPhase},
    policy::exposure,
};

/// Review and decide agentid AccessGrants.
#[derive(Parser, Debug)]
#[command(name = "kubectl agentid", version, about)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// Path to the kubeconfig file [default: $KUBECONFIG or ~/.kube/config].
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// The namespace [default: the context's namespace].
    #[arg(short, long, global = true)]
    namespace: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List AccessGrants waiting for approval.
    Pending {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Approve an AccessGrant (as yourself).
    Approve {
        /// The AccessGrant's name.
        grant: String,
        /// Why you approve (recorded in the Approval).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Deny an AccessGrant (as yourself). One Deny is final.
    Deny {
        /// The AccessGrant's name.
        grant: String,
        /// Why you deny (required).
        #[arg(long)]
        reason: String,
    },
    /// Every identity: owner, purpose, retire date, what it holds now, standing privilege.
    Inventory {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// What an identity can reach through RBAC that yields credentials it was not granted:
    /// Secrets (legacy ServiceAccount tokens first), token minting, pods as more powerful
    /// ServiceAccounts, impersonation. Needs read access to RBAC objects and Secret metadata.
    Exposure {
        /// The AgentIdentity's name.
        identity: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Say what a grant's credential would allow, and why it needs approval.
    Explain {
        /// The AccessGrant's name.
        grant: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// How to print.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Table,
    Json,
    Yaml,
}

fn print_structured<T: Serialize>(value: &T, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(value)?),
        Output::Table => unreachable!("tables are printed by their command"),
    }
    Ok(())
}

async fn client(global: &Global) -> anyhow::Result<Client> {
    let options = KubeConfigOptions { context: global.context.clone(), ..Default::default() };
    let config = match &global.kubeconfig {
        Some(path) => Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?,
        None => Config::from_kubeconfig(&options).await.or_else(|_| Config::incluster())?,
    };
    Ok(Client::try_from(config)?)
}

async fn whoami(client: &Client) -> anyhow::Result<String> {
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("asking the apiserver who you are")?;
    review.status.and_then(|s| s.user_info).and_then(|u| u.username).context("the apiserver did not say who you are")
}

fn suffix() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{:05x}", (nanos ^ std::process::id()) & 0xfffff)
}

async fn decide(client: &Client, ns: &str, grant_name: &str, decision: Decision, reason: String) -> anyhow::Result<()> {
    let grant = Api::<AccessGrant>::namespaced(client.clone(), ns)
        .get(grant_name)
        .await
        .with_context(|| format!("reading AccessGrant {grant_name} in {ns}"))?;
    let user = whoami(client).await?;
    let name = render::approval_name(grant_name, &user, &suffix());
    let approval = Approval::new(
        &name,
        ApprovalSpec {
            grant: grant_name.into(),
            grant_uid: grant.uid().context("the grant has no uid")?,
            decision,
            reason,
            approver: user.clone(),
        },
    );
    match Api::<Approval>::namespaced(client.clone(), ns).create(&PostParams::default(), &approval).await {
        Ok(_) => {
            let verb = if decision == Decision::Approve { "approved" } else { "denied" };
            println!("accessgrant/{grant_name} {verb} by {user} (approval/{name})");
            Ok(())
        }
        // Admission says why in its message; show just that.
        Err(kube::Error::Api(status)) => bail!("{}", status.message),
        Err(e) => Err(e.into()),
    }
}

async fn list_all<K>(client: &Client, what: &str) -> anyhow::Result<Vec<std::sync::Arc<K>>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing {what} (exposure needs to read every {what})"))?
        .items
        .into_iter()
        .map(std::sync::Arc::new)
        .collect())
}

async fn exposure(client: &Client, ns: &str, name: &str) -> anyhow::Result<render::ExposureReport> {
    let identity = Api::<AgentIdentity>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("reading AgentIdentity {name} in {ns}"))?;
    let active: Vec<AccessGrant> = Api::<AccessGrant>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .context("listing AccessGrants")?
        .items
        .into_iter()
        .filter(|g| g.spec.identity == identity.name_any())
        .filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active))
        .collect();
    let roles: Vec<std::sync::Arc<Role>> = list_all(client, "Roles").await?;
    let cluster_roles: Vec<std::sync::Arc<ClusterRole>> = list_all(client, "ClusterRoles").await?;
    let role_bindings: Vec<std::sync::Arc<RoleBinding>> = list_all(client, "RoleBindings").await?;
    let cluster_role_bindings: Vec<std::sync::Arc<ClusterRoleBinding>> =
        list_all(client, "ClusterRoleBindings").await?;
    let secrets: Vec<_> = Api::<Secret>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await
        .context("listing Secret metadata (exposure reads names and annotations, never data)")?
        .items
        .into_iter()
        .map(|s| s.metadata)
        .collect();
    let rbac = exposure::Rbac {
        roles: &roles,
        cluster_roles: &cluster_roles,
        role_bindings: &role_bindings,
        cluster_role_bindings: &cluster_role_bindings,
    };
    let principals = exposure::principals(ns, name, &active);
    Ok(render::ExposureReport {
        namespace: ns.into(),
        identity: name.into(),
        findings: exposure::exposure(ns, name, &principals, &rbac, &secrets[..]),
    })
}

/// Runs the plugin.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = client(&cli.global).await?;
    let ns = cli.global.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
    match cli.command {
        Command::Pending { all_namespaces, output } => {
            let (grants, identities) = if all_namespaces {
                (Api::<AccessGrant>::all(client.clone()), Api::<AgentIdentity>::all(client.clone()))
            } else {
                (Api::namespaced(client.clone(), &ns), Api::namespaced(client.clone(), &ns))
            };
            let grants = grants.list(&ListParams::default()).await.context("listing AccessGrants")?.items;
            // Reading identities is optional: approvers may lack the right; counts then assume 1.
            let identities = identities.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            let rows = render::pending_rows(&grants, &identities, Timestamp::now());
            match output {
                Output::Table => print!("{}", render::pending_table(&rows, all_namespaces)),
                other => print_structured(&rows, other)?,
            }
        }
        Command::Inventory { all_namespaces, output } => {
            let (identities, grants) = if all_namespaces {
                (Api::<AgentIdentity>::all(client.clone()), Api::<AccessGrant>::all(client.clone()))
            } else {
                (Api::namespaced(client.clone(), &ns), Api::namespaced(client.clone(), &ns))
            };
            let identities = identities.list(&ListParams::default()).await.context("listing AgentIdentities")?.items;
            let grants = grants.list(&ListParams::default()).await.context("listing AccessGrants")?.items;
            let entries = render::inventory(&identities, &grants);
            match output {
                Output::Table => print!("{}", render::inventory_table(&entries)),
                other => print_structured(&entries, other)?,
            }
        }
        Command::Exposure { identity, output } => {
            let report = exposure(&client, &ns, &identity).await?;
            match output {
                Output::Table => print!("{}", render::exposure_table(&report)),
                other => print_structured(&report, other)?,
            }
        }
        Command::Approve { grant, reason } => decide(&client, &ns, &grant, Decision::Approve, reason).await?,
        Command::Deny { grant, reason } => {
            if reason.trim().is_empty() {
                bail!("deny needs --reason: the requester should learn why");
            }
            decide(&client, &ns, &grant, Decision::Deny, reason).await?
        }
        Command::Explain { grant, output } => {
            let g = Api::<AccessGrant>::namespaced(client.clone(), &ns)
                .get(&grant)
                .await
                .with_context(|| format!("reading AccessGrant {grant} in {ns}"))?;
            let identity =
                Api::<AgentIdentity>::namespaced(client.clone(), &ns).get_opt(&g.spec.identity).await.ok().flatten();
            let explanation = render::explain(&g, identity.as_ref());
            match output {
                Output::Table => print!("{}", render::explanation_text(&explanation)),
                other => print_structured(&explanation, other)?,
            }
        }
    }
    Ok(())
}
