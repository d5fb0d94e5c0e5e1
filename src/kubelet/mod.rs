//! The kubelet API of the virtual node: HTTPS with the kubelet's authentication and
//! authorization ([`server`], [`tls`], [`auth`]), requests relayed to the agents that
//! run the pods ([`relay`]), usage endpoints ([`stats`]), and the streaming protocols
//! `kubectl exec/attach/port-forward` use, as framing with no HTTP in it: [`spdy`]
//! (SPDY/3.1) and [`channel`] (the WebSocket channel protocols). The node's certificates
//! come from the cluster ([`csr`]); on k3s the API server reaches this API through the
//! agent tunnel the node opens ([`tunnel`]).

pub mod auth;
pub mod channel;
pub mod csr;
pub mod exec;
pub mod port_forward;
pub mod relay;
pub mod server;
pub mod spdy;
pub mod stats;
pub mod tls;
pub mod tunnel;
