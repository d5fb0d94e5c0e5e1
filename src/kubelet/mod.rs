//! The kubelet API of the virtual node, relayed to the agents that run the pods.

pub mod auth;
pub mod relay;
pub mod server;
pub mod stats;
pub mod tls;
