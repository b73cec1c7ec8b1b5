//! The `agentid` command.
#![forbid(unsafe_code)]

use std::{io::Write, net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

/// agentid: zero standing privilege for AI agents on Kubernetes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML, or write one file per kind.
    Crd {
        /// Write `<plural>.agentid.dev.yaml` files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Run the operator against the cluster of the current kubeconfig (or in-cluster config).
    Run {
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:8080", env = "AGENTID_METRICS_ADDR")]
        metrics_addr: SocketAddr,
        /// The apiserver URL written into issued kubeconfigs [default: the URL agentid itself uses].
        #[arg(long, env = "AGENTID_API_SERVER_URL")]
        api_server_url: Option<String>,
        /// PEM file with the CA that issued kubeconfigs trust [default: the CA agentid itself trusts].
        #[arg(long, env = "AGENTID_API_SERVER_CA_FILE")]
        api_server_ca_file: Option<PathBuf>,
        /// Exit when standard input closes: lets a test harness tie the operator to its lifetime.
        #[arg(long, hide = true)]
        exit_on_stdin_eof: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd { out_dir } => crd(out_dir),
        Command::Run {
            metrics_addr,
            api_server_url,
            api_server_ca_file,
            exit_on_stdin_eof,
        } => {
            if exit_on_stdin_eof {
                std::thread::spawn(|| {
                    // Reads until EOF (or an error): the parent is gone, and so is the reason to run.
                    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                    std::process::exit(0);
                });
            }
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(run(metrics_addr, api_server_url, api_server_ca_file))
        }
    }
}

fn crd(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    for crd in agentid::api::crds() {
        let yaml = agentid::api::crd_yaml(&crd)?;
        match &out_dir {
            Some(dir) => {
                let path = dir.join(agentid::api::crd_file_name(&crd));
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            None => stdout.write_all(yaml.as_bytes())?,
        }
    }
    Ok(())
}

async fn run(
    metrics_addr: SocketAddr,
    server: Option<String>,
    ca_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let config = kube::Config::infer()
        .await
        .context("loading kubeconfig or in-cluster config")?;
    let server = server.unwrap_or_else(|| {
        config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string()
    });
    let ca_pem = match ca_file {
        Some(path) => {
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        }
        None => {
            agentid::credentials::pem_certificates(config.root_cert.as_deref().unwrap_or_default())
        }
    };
    anyhow::ensure!(
        !ca_pem.is_empty(),
        "no CA for issued kubeconfigs: the current config trusts system roots; pass --api-server-ca-file"
    );
    let client = kube::Client::try_from(config)?;
    let access = agentid::policy::desired::ClusterAccess { server, ca_pem };
    agentid::controller::run(
        client,
        agentid::controller::Settings {
            metrics_addr,
            access,
        },
    )
    .await
}
