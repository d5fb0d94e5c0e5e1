//! The kubelet's streaming protocols, as pure framing and byte streams with no HTTP in them:
//! [`spdy`] is the SPDY/3.1 session that `kubectl exec/attach/port-forward` reach the kubelet
//! with (through the API server), and [`channel`] is the WebSocket side (the
//! `v4`/`v5.channel.k8s.io` channel framing, port-forward framing, subprotocol negotiation,
//! the exec error-stream Status, and SPDY tunnelled in WebSocket messages). The HTTP server
//! upgrades a request and hands the raw connection or message stream to these modules.

pub mod channel;
pub mod spdy;
