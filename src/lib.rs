//! BeeMesh: a Kubernetes virtual kubelet whose pods run on a libp2p mesh of Podman agents.

pub mod agent;
pub mod audit;
pub mod cli;
pub mod cli_reference;
pub mod cluster;
pub mod commands;
pub mod durable;
pub mod fencing;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod gateway;
pub mod health;
pub mod kubelet;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod raft;
pub mod retry;
pub mod runtime;
pub mod tables;
pub mod trust;
pub mod view;
pub mod wire;
