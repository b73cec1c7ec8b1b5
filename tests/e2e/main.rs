//! End-to-end tests on a real kube-apiserver + etcd + kube-controller-manager built from Go
//! modules (see `tests/control-plane/`). One control plane per run, one namespace per test.

mod crds;
mod fixtures;
mod harness;
mod lifecycle;
