//! agentid: zero standing privilege for AI agents on Kubernetes.
//!
//! Each agent gets a governed identity ([`api::AgentIdentity`]) that can do nothing by itself;
//! access comes only from scoped grants that expire on their own ([`api::AccessGrant`]), and
//! destructive grants wait for an authorized human ([`api::Approval`]).
#![forbid(unsafe_code)]

pub mod admission;
pub mod alloc;
pub mod api;
pub mod authz;
pub mod cli;
pub mod client;
pub mod controller;
pub mod credentials;
pub mod failpoint;
pub mod leader;
pub mod metrics;
pub mod policy;
