//! End-to-end tests on a real kube-apiserver + etcd + kube-controller-manager built from Go
//! modules (see `tests/control-plane/`). One control plane per run, one namespace per test;
//! the crash tests start control planes of their own.

mod approval;
mod audit;
mod backlog;
mod capacity;
mod chaos;
mod chart;
mod crash;
mod crds;
mod drift;
mod examples;
mod exposure;
mod failover;
mod fixtures;
mod harness;
mod injection;
mod lifecycle;
