//! BeeMesh: a Kubernetes virtual kubelet whose pods run on a libp2p mesh of Podman agents.

pub mod mesh;
pub mod metrics;
pub mod runtime;
pub mod trust;
pub mod wire;
