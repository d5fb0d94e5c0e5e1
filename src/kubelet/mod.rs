//! The kubelet API of the virtual node: HTTPS with the kubelet's authentication and
//! authorization ([`server`], [`tls`], [`auth`]), requests relayed to the agents that
//! run the pods ([`relay`]), usage endpoints ([`stats`]), and the streaming protocols
//! `kubectl exec/attach/port-forward` use, as framing with no HTTP in it: [`spdy`]
//! (SPDY/3.1) and [`channel`] (the WebSocket channel protocols).

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
