//! The WebSocket side of the kubelet's streaming API, as pure framing over binary message
//! payloads (no WebSocket library types): channel messages of `v4`/`v5.channel.k8s.io`,
//! port-forward channels, subprotocol negotiation, the exec error-stream Status
//! ([`status`]) and SPDY tunnelled in WebSocket messages ([`ws_io`]).
//!
//! Every binary message starts with one channel byte: for exec and attach 0 stdin,
//! 1 stdout, 2 stderr, 3 error, 4 resize; `v5.channel.k8s.io` adds 255, a "close" message
//! whose one-byte payload is the channel the sender is done writing (a half-close, which
//! WebSocket itself cannot express per channel). Port-forward uses channels 2i (data) and
//! 2i+1 (error) for the i-th requested port. The `base64.` variants are legacy and not
//! spoken here.

pub mod status;
pub mod ws_io;

pub use status::{error_stream_payload, parse_status, ExecOutcome, ResizeDecoder, TerminalSize};
pub use ws_io::MessageIo;

/// Exec/attach channel: the process's stdin (client to server).
pub const STDIN: u8 = 0;
/// Exec/attach channel: stdout (server to client).
pub const STDOUT: u8 = 1;
/// Exec/attach channel: stderr (server to client).
pub const STDERR: u8 = 2;
/// Exec/attach channel: the error stream (a Status from v4 on).
pub const ERROR: u8 = 3;
/// Exec/attach channel: terminal resize events, JSON `{"Width":w,"Height":h}`.
pub const RESIZE: u8 = 4;
/// `v5.channel.k8s.io` only: the payload names a channel its sender has finished.
pub const CLOSE: u8 = 255;

/// `Sec-WebSocket-Protocol` of kubectl 1.30+ port-forward: SPDY/3.1 frames inside binary
/// WebSocket messages (see [`ws_io::MessageIo`]).
pub const PORT_FORWARD_TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// `X-Stream-Protocol-Version` of port-forward over SPDY.
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";
/// The channel protocol names port-forward over plain WebSocket accepts, as the kubelet
/// ("" is a client that names none; the base64 variant is not spoken here).
pub const PORT_FORWARD_WEBSOCKET_PROTOCOLS: &[&str] = &["v4.channel.k8s.io", ""];

/// Versions of the remotecommand (exec/attach) protocol, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StreamProtocol {
    /// `channel.k8s.io`: stdin/stdout/stderr and a plain-text error.
    V1,
    /// `v2.channel.k8s.io`: streams created only when requested.
    V2,
    /// `v3.channel.k8s.io`: adds the resize stream.
    V3,
    /// `v4.channel.k8s.io`: the error stream carries a metav1.Status (exit codes).
    V4,
    /// `v5.channel.k8s.io`: adds the WebSocket close message (channel 255).
    V5,
}

impl StreamProtocol {
    /// Every version, newest first: what a server offers.
    pub const ALL: [Self; 5] = [Self::V5, Self::V4, Self::V3, Self::V2, Self::V1];

    /// The name in `X-Stream-Protocol-Version` and `Sec-WebSocket-Protocol`.
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "channel.k8s.io",
            Self::V2 => "v2.channel.k8s.io",
            Self::V3 => "v3.channel.k8s.io",
            Self::V4 => "v4.channel.k8s.io",
            Self::V5 => "v5.channel.k8s.io",
        }
    }

    /// The version a name stands for; the empty WebSocket protocol is the unnamed
    /// default, which the kubelet serves like `channel.k8s.io`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "" | "channel.k8s.io" => Some(Self::V1),
            "v2.channel.k8s.io" => Some(Self::V2),
            "v3.channel.k8s.io" => Some(Self::V3),
            "v4.channel.k8s.io" => Some(Self::V4),
            "v5.channel.k8s.io" => Some(Self::V5),
            _ => None,
        }
    }

    /// Whether the client may send terminal sizes.
    pub fn has_resize(self) -> bool {
        self >= Self::V3
    }

    /// Whether the error stream carries a Status JSON rather than plain text.
    pub fn status_on_error_stream(self) -> bool {
        self >= Self::V4
    }

    /// Whether WebSocket messages may be [`CLOSE`] messages.
    pub fn has_close(self) -> bool {
        self >= Self::V5
    }
}

/// A message or request that does not fit the protocol.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    #[error("empty WebSocket message: no channel byte")]
    Empty,
    #[error("close message of {0} bytes (want 2)")]
    BadClose(usize),
    #[error("close message (channel 255) outside v5.channel.k8s.io")]
    CloseNotNegotiated,
    #[error("channel {0} does not exist here")]
    UnknownChannel(u8),
    #[error("a message must fit the channel byte and payload")]
    TooLong,
    #[error("invalid port {0:?}")]
    BadPort(String),
    #[error("query parameter \"port\" is required")]
    NoPorts,
    #[error("too many ports: {0} (at most 127 fit the channel numbers)")]
    TooManyPorts(usize),
}

/// One received channel message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Bytes for a channel.
    Data { channel: u8, payload: &'a [u8] },
    /// v5: the sender is done writing `channel`.
    Close { channel: u8 },
}

/// Parses one binary WebSocket message of the channel protocols.
pub fn parse_message(
    message: &[u8],
    protocol: StreamProtocol,
) -> Result<Message<'_>, ChannelError> {
    let (&channel, payload) = message.split_first().ok_or(ChannelError::Empty)?;
    if channel != CLOSE {
        return Ok(Message::Data { channel, payload });
    }
    if !protocol.has_close() {
        return Err(ChannelError::CloseNotNegotiated);
    }
    match payload {
        [closed] => Ok(Message::Close { channel: *closed }),
        _ => Err(ChannelError::BadClose(message.len())),
    }
}

/// A data message for `channel`.
pub fn data_message(channel: u8, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(1 + payload.len());
    message.push(channel);
    message.extend_from_slice(payload);
    message
}

/// A v5 close message: "I am done writing `channel`".
pub fn close_message(channel: u8) -> Vec<u8> {
    vec![CLOSE, channel]
}

/// Parses the `port` query parameters of a WebSocket port-forward request (the kubelet
/// takes comma-separated values, possibly in several parameters).
pub fn parse_ports<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<u16>, ChannelError> {
    let mut ports = Vec::new();
    for value in values {
        for part in value.split(',') {
            let port = part
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ChannelError::BadPort(part.to_string()))?;
            ports.push(port);
        }
    }
    if ports.is_empty() {
        return Err(ChannelError::NoPorts);
    }
    if ports.len() > 127 {
        return Err(ChannelError::TooManyPorts(ports.len()));
    }
    Ok(ports)
}

/// Which of a port's two channels a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChannel {
    /// Channel 2i: the connection's bytes, both ways.
    Data,
    /// Channel 2i+1: error text from the server.
    Error,
}

/// A received port-forward message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMessage<'a> {
    /// Index into the requested ports.
    pub index: usize,
    pub port: u16,
    pub kind: PortChannel,
    pub payload: &'a [u8],
}

/// Port-forward over plain WebSocket (`v4.channel.k8s.io`): two channels per requested
/// port, and the server's first message on each carries the port, 2 bytes little-endian,
/// which is how the client matches channels to ports.
#[derive(Debug, Clone)]
pub struct PortForwardChannels {
    ports: Vec<u16>,
    prefixed: Vec<bool>,
}

impl PortForwardChannels {
    /// Channels for `ports` (from [`parse_ports`], so at most 127).
    pub fn new(ports: Vec<u16>) -> Result<Self, ChannelError> {
        if ports.is_empty() {
            return Err(ChannelError::NoPorts);
        }
        if ports.len() > 127 {
            return Err(ChannelError::TooManyPorts(ports.len()));
        }
        let prefixed = vec![false; ports.len() * 2];
        Ok(Self { ports, prefixed })
    }

    /// The requested ports, in channel order.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The server's first message on every channel, as the kubelet sends them on
    /// connect: just the port prefix. Channels already prefixed are skipped.
    pub fn initial_messages(&mut self) -> Vec<Vec<u8>> {
        (0..self.ports.len())
            .flat_map(|i| [(i, PortChannel::Data), (i, PortChannel::Error)])
            .filter_map(|(i, kind)| self.message(i, kind, &[]).ok())
            .collect()
    }

    /// A server message for port `index`; the first one on its channel gets the port.
    pub fn message(
        &mut self,
        index: usize,
        kind: PortChannel,
        payload: &[u8],
    ) -> Result<Vec<u8>, ChannelError> {
        let port = *self
            .ports
            .get(index)
            .ok_or(ChannelError::UnknownChannel(u8::MAX))?;
        let slot = index * 2 + usize::from(kind == PortChannel::Error);
        // At most 127 ports, so every slot fits a channel byte.
        let channel = u8::try_from(slot).map_err(|_| ChannelError::TooLong)?;
        let mut message = Vec::with_capacity(3 + payload.len());
        message.push(channel);
        if let Some(done) = self.prefixed.get_mut(slot) {
            if !*done {
                *done = true;
                message.extend_from_slice(&port.to_le_bytes());
            }
        }
        message.extend_from_slice(payload);
        Ok(message)
    }

    /// Parses a client message: which port, which channel, and the bytes. Clients send
    /// no port prefix (the kubelet copies everything after the channel byte to the port).
    pub fn parse<'a>(&self, message: &'a [u8]) -> Result<PortMessage<'a>, ChannelError> {
        let (&channel, payload) = message.split_first().ok_or(ChannelError::Empty)?;
        let index = usize::from(channel / 2);
        let port = *self
            .ports
            .get(index)
            .ok_or(ChannelError::UnknownChannel(channel))?;
        let kind = if channel % 2 == 0 {
            PortChannel::Data
        } else {
            PortChannel::Error
        };
        Ok(PortMessage {
            index,
            port,
            kind,
            payload,
        })
    }
}

/// Why no subprotocol could be agreed on.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NegotiationError {
    /// SPDY upgrade without `X-Stream-Protocol-Version` (the kubelet answers 400).
    #[error("unable to upgrade: header X-Stream-Protocol-Version does not exist in request")]
    Missing,
    /// Nothing offered is supported (the kubelet answers 403 for SPDY, and refuses the
    /// WebSocket upgrade).
    #[error("requested protocol(s) are not supported: {offered:?}; supports {supported:?}")]
    Unsupported {
        offered: Vec<String>,
        supported: Vec<String>,
    },
}

/// Splits header values that list protocols (several header lines, each possibly
/// comma-separated, as `Sec-WebSocket-Protocol` allows) into trimmed names.
pub fn offered_protocols<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    header_values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Picks the WebSocket subprotocol as the kubelet's wsstream does: the first of the
/// client's offers (client order wins) that is supported; a client that offers none gets
/// the unnamed protocol `""` if that is supported.
pub fn negotiate_websocket<'s>(
    offered: &[&str],
    supported: &[&'s str],
) -> Result<&'s str, NegotiationError> {
    let wanted: &[&str] = if offered.is_empty() { &[""] } else { offered };
    first_supported(wanted, supported).ok_or_else(|| unsupported(offered, supported))
}

/// Picks the `X-Stream-Protocol-Version` of a SPDY upgrade as httpstream.Handshake does:
/// the first of the client's offers that is supported; none offered is an error.
pub fn negotiate_stream_protocol<'s>(
    offered: &[&str],
    supported: &[&'s str],
) -> Result<&'s str, NegotiationError> {
    if offered.is_empty() {
        return Err(NegotiationError::Missing);
    }
    first_supported(offered, supported).ok_or_else(|| unsupported(offered, supported))
}

fn first_supported<'s>(offered: &[&str], supported: &[&'s str]) -> Option<&'s str> {
    offered
        .iter()
        .find_map(|o| supported.iter().find(|s| *s == o).copied())
}

fn unsupported(offered: &[&str], supported: &[&str]) -> NegotiationError {
    NegotiationError::Unsupported {
        offered: offered.iter().map(|s| s.to_string()).collect(),
        supported: supported.iter().map(|s| s.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_messages_round_trip() {
        let message = data_message(STDOUT, b"hi");
        assert_eq!(message, [1, b'h', b'i']);
        assert_eq!(
            parse_message(&message, StreamProtocol::V4),
            Ok(Message::Data {
                channel: STDOUT,
                payload: b"hi"
            })
        );
        assert_eq!(
            parse_message(&[STDIN], StreamProtocol::V4),
            Ok(Message::Data {
                channel: STDIN,
                payload: b""
            })
        );
        assert_eq!(
            parse_message(&[], StreamProtocol::V5),
            Err(ChannelError::Empty)
        );
    }

    #[test]
    fn v5_close_messages_half_close_a_channel() {
        assert_eq!(close_message(STDIN), [255, 0]);
        assert_eq!(
            parse_message(&close_message(STDIN), StreamProtocol::V5),
            Ok(Message::Close { channel: STDIN })
        );
        assert_eq!(
            parse_message(&[255, 0], StreamProtocol::V4),
            Err(ChannelError::CloseNotNegotiated)
        );
        assert_eq!(
            parse_message(&[255], StreamProtocol::V5),
            Err(ChannelError::BadClose(1))
        );
        assert_eq!(
            parse_message(&[255, 0, 1], StreamProtocol::V5),
            Err(ChannelError::BadClose(3))
        );
    }

    #[test]
    fn protocol_names_and_features() {
        for p in StreamProtocol::ALL {
            assert_eq!(StreamProtocol::from_name(p.name()), Some(p));
        }
        assert_eq!(StreamProtocol::from_name(""), Some(StreamProtocol::V1));
        assert_eq!(StreamProtocol::from_name("base64.channel.k8s.io"), None);
        assert!(!StreamProtocol::V2.has_resize() && StreamProtocol::V3.has_resize());
        assert!(!StreamProtocol::V3.status_on_error_stream());
        assert!(StreamProtocol::V4.status_on_error_stream() && !StreamProtocol::V4.has_close());
        assert!(StreamProtocol::V5.has_close());
    }

    #[test]
    fn port_forward_prefixes_the_port_once_per_channel() {
        let mut channels = PortForwardChannels::new(parse_ports(["8080,443"]).unwrap()).unwrap();
        assert_eq!(
            channels.initial_messages(),
            [
                vec![0, 0x90, 0x1f],
                vec![1, 0x90, 0x1f],
                vec![2, 0xbb, 0x01],
                vec![3, 0xbb, 0x01]
            ]
        );
        assert_eq!(
            channels.message(1, PortChannel::Data, b"x").unwrap(),
            [2, b'x']
        );

        let mut fresh = PortForwardChannels::new(vec![80]).unwrap();
        assert_eq!(
            fresh.message(0, PortChannel::Error, b"boom").unwrap(),
            [1, 80, 0, b'b', b'o', b'o', b'm']
        );
        assert_eq!(
            fresh.message(0, PortChannel::Error, b"!").unwrap(),
            [1, b'!']
        );
        assert!(fresh.message(1, PortChannel::Data, b"").is_err());

        let parsed = channels.parse(&[2, b'G', b'E', b'T']).unwrap();
        assert_eq!(
            parsed,
            PortMessage {
                index: 1,
                port: 443,
                kind: PortChannel::Data,
                payload: b"GET"
            }
        );
        assert_eq!(
            channels.parse(&[4, 0]),
            Err(ChannelError::UnknownChannel(4))
        );
        assert_eq!(channels.parse(&[]), Err(ChannelError::Empty));
    }

    #[test]
    fn ports_parameter_is_validated() {
        assert_eq!(parse_ports(["80", "443, 8080"]).unwrap(), [80, 443, 8080]);
        assert_eq!(parse_ports([]), Err(ChannelError::NoPorts));
        for bad in ["0", "65536", "http", "80,,81", "-1"] {
            assert!(parse_ports([bad]).is_err(), "{bad}");
        }
        let many = vec!["1"; 128];
        assert_eq!(parse_ports(many), Err(ChannelError::TooManyPorts(128)));
    }

    #[test]
    fn websocket_negotiation_follows_wsstream() {
        let supported = [
            "v5.channel.k8s.io",
            "v4.channel.k8s.io",
            "channel.k8s.io",
            "",
        ];
        // Recorded: kubectl 1.32 exec offers only v5 (fixtures 02 and 04).
        let offered = offered_protocols(["v5.channel.k8s.io"]);
        assert_eq!(
            negotiate_websocket(&offered, &supported),
            Ok("v5.channel.k8s.io")
        );
        // Client order wins over server order.
        let offered = offered_protocols(["channel.k8s.io, v4.channel.k8s.io"]);
        assert_eq!(
            negotiate_websocket(&offered, &supported),
            Ok("channel.k8s.io")
        );
        assert_eq!(negotiate_websocket(&[], &supported), Ok(""));
        assert!(negotiate_websocket(&[], &["v4.channel.k8s.io"]).is_err());
        // Recorded: kubectl port-forward first offers the SPDY tunnel (fixture 07).
        let offered = offered_protocols(["SPDY/3.1+portforward.k8s.io"]);
        assert_eq!(
            negotiate_websocket(&offered, &[PORT_FORWARD_TUNNEL_PROTOCOL]),
            Ok(PORT_FORWARD_TUNNEL_PROTOCOL)
        );
        assert!(matches!(
            negotiate_websocket(&offered, PORT_FORWARD_WEBSOCKET_PROTOCOLS),
            Err(NegotiationError::Unsupported { .. })
        ));
    }

    #[test]
    fn spdy_negotiation_follows_httpstream() {
        let names: Vec<&str> = StreamProtocol::ALL.iter().map(|p| p.name()).collect();
        // Recorded: the X-Stream-Protocol-Version lines of fixtures 03, 05 and 06.
        let offered = offered_protocols([
            "v5.channel.k8s.io",
            "v4.channel.k8s.io",
            "v3.channel.k8s.io",
            "v2.channel.k8s.io",
            "channel.k8s.io",
        ]);
        assert_eq!(
            negotiate_stream_protocol(&offered, &names),
            Ok("v5.channel.k8s.io")
        );
        assert_eq!(
            negotiate_stream_protocol(&offered, &["v4.channel.k8s.io"]),
            Ok("v4.channel.k8s.io")
        );
        // Fixture 08.
        assert_eq!(
            negotiate_stream_protocol(&["portforward.k8s.io"], &[PORT_FORWARD_PROTOCOL]),
            Ok(PORT_FORWARD_PROTOCOL)
        );
        assert_eq!(
            negotiate_stream_protocol(&[], &names),
            Err(NegotiationError::Missing)
        );
        assert!(negotiate_stream_protocol(&["v9.channel.k8s.io"], &names).is_err());
    }
}
