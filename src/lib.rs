//! BeeMesh: a Kubernetes virtual kubelet whose pods run on a libp2p mesh of Podman agents.

pub mod runtime;
pub mod wire;
