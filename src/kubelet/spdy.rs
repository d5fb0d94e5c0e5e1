//! Server side of SPDY/3.1, as `kubectl exec/attach/port-forward` reach the kubelet.
//!
//! The API server upgrades the HTTP connection (`Upgrade: SPDY/3.1`) and then opens one
//! stream per channel with a SYN_STREAM whose `streamtype` header names it (`error`,
//! `stdin`, `stdout`, `stderr`, `resize` for exec and attach; `data` and `error`, plus
//! `port` and `requestid`, for port-forward). Its peer library, moby/spdystream, answers
//! every SYN_STREAM with an empty SYN_REPLY, answers PINGs, and neither sends nor honours
//! WINDOW_UPDATE: see [`SessionConfig::honor_peer_window`] for what that means here.
//!
//! [`frame`] is the pure codec; [`session`] runs it over any tokio byte stream.

pub mod frame;
pub mod session;
pub mod zlib;

pub use frame::{
    Frame, FrameDecoder, FrameEncoder, FrameError, GoAwayStatus, Headers, Limits, RstStatus,
};
pub use session::{
    accept, accept_with, Session, SessionConfig, SessionEnd, SessionError, SpdyStream,
    StreamReader, StreamWriter,
};
