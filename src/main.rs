//! The `agentid` command.
#![forbid(unsafe_code)]

use std::{io::Write, path::PathBuf};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd { out_dir } => crd(out_dir),
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
