//! `kubectl exec` at the node: the kubelet's /exec endpoint over SPDY/3.1, bridged to an
//! exec session on the agent that runs the pod (see `relay::Frame`).
//!
//! The SPDY streams (error, stdin, stdout, stderr, resize) come as the client opens
//! them; output goes to stdout/stderr, the exit code to the error stream in the
//! negotiated protocol's format, and closing either end closes the whole path.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::channel::status::{error_stream_payload, ExecOutcome, ResizeDecoder};
use super::channel::{self, StreamProtocol};
use super::relay::{read_frame, write_frame, Exit, Frame};
use super::spdy;
use crate::wire::Streams;
use tokio_tungstenite::tungstenite::Message;

/// The protocols the kubelet speaks over SPDY (v5 is WebSocket only), newest first.
pub const SPDY_PROTOCOLS: [&str; 4] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// How long the client gets to open its streams (the kubelet's streamCreationTimeout).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What an exec asks for, from the query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOptions {
    pub command: Vec<String>,
    pub streams: Streams,
}

impl ExecOptions {
    /// Parses `command=..&command=..&stdin=1&stdout=1&stderr=1&tty=1`, refusing what the
    /// kubelet refuses; an attach has no command.
    pub fn parse(query: &str, attach: bool) -> Result<ExecOptions, String> {
        let mut options = ExecOptions {
            command: Vec::new(),
            streams: Streams::default(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)?;
            let flag = matches!(value.as_str(), "1" | "true");
            match key {
                "command" => options.command.push(value),
                "input" | "stdin" => options.streams.stdin = flag,
                "output" | "stdout" => options.streams.stdout = flag,
                "error" | "stderr" => options.streams.stderr = flag,
                "tty" => options.streams.tty = flag,
                _ => {}
            }
        }
        if options.command.is_empty() && !attach {
            return Err("you must specify at least 1 command".into());
        }
        if !(options.streams.stdin || options.streams.stdout || options.streams.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        if options.streams.tty {
            // With a terminal, stderr goes to stdout.
            options.streams.stderr = false;
        }
        Ok(options)
    }
}

pub(super) fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("invalid escape in {text:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8"))
}

/// Where an exec's output goes: the client's SPDY streams or WebSocket channels.
#[async_trait::async_trait]
trait ClientOutput: Send {
    /// False once the client is gone.
    async fn stdout(&mut self, bytes: &[u8]) -> bool;
    async fn stderr(&mut self, bytes: &[u8]) -> bool;
    /// Sends how the command ended and closes.
    async fn finish(self: Box<Self>, outcome: ExecOutcome);
}

/// Carries an exec between the client and the agent: `input` (stdin, its end, resizes)
/// to the agent, its output and exit status to the client. Ends when the command ends
/// or either side goes.
async fn bridge<A>(
    mut input: tokio::sync::mpsc::Receiver<Frame>,
    mut output: Box<dyn ClientOutput>,
    agent: A,
) where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut from_agent, mut to_agent) = tokio::io::split(agent);
    let forward = tokio::spawn(async move {
        while let Some(frame) = input.recv().await {
            if write_frame(&mut to_agent, &frame).await.is_err() {
                break;
            }
        }
        // The client is gone: closing our half ends the command's stdin on the agent.
        let _ = to_agent.shutdown().await;
    });
    let mut outcome = ExecOutcome::Error("the agent closed the session".into());
    loop {
        let delivered = match read_frame(&mut from_agent).await {
            Ok(Some(Frame::Stdout(bytes))) => output.stdout(&bytes).await,
            Ok(Some(Frame::Stderr(bytes))) => output.stderr(&bytes).await,
            Ok(Some(Frame::Exit(exit))) => {
                outcome = match exit {
                    Exit::Code(0) => ExecOutcome::Success,
                    Exit::Code(code) => ExecOutcome::ExitCode(code),
                    Exit::Error(message) => ExecOutcome::Error(message),
                };
                break;
            }
            Ok(Some(_)) => true,
            Ok(None) | Err(_) => break,
        };
        if !delivered {
            break;
        }
    }
    forward.abort();
    output.finish(outcome).await;
}

/// Feeds a client's resize bytes to the agent as sizes.
fn resize_frames(decoder: &mut ResizeDecoder, bytes: &[u8]) -> Option<Vec<Frame>> {
    let sizes = decoder.push(bytes).ok()?;
    Some(
        sizes
            .into_iter()
            .map(|size| Frame::Resize {
                width: size.width,
                height: size.height,
            })
            .collect(),
    )
}

/// Runs an exec over an upgraded SPDY connection until the command ends or a side
/// closes.
pub async fn serve_spdy<T, A>(upgraded: T, protocol: StreamProtocol, options: ExecOptions, agent: A)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (session, mut incoming) = spdy::accept(upgraded);
    let mut streams = ClientStreams::default();
    let wanted = |s: &ClientStreams| {
        s.error.is_some()
            && (!options.streams.stdin || s.stdin.is_some())
            && (!options.streams.stdout || s.stdout.is_some())
            && (!options.streams.stderr || s.stderr.is_some())
            && (!(options.streams.tty && protocol.has_resize()) || s.resize.is_some())
    };
    let collected = tokio::time::timeout(STREAM_CREATION_TIMEOUT, async {
        while !wanted(&streams) {
            let Some(stream) = incoming.recv().await else {
                return false;
            };
            let kind = stream
                .headers()
                .get("streamtype")
                .unwrap_or_default()
                .to_owned();
            let slot = match kind.as_str() {
                "error" => &mut streams.error,
                "stdin" => &mut streams.stdin,
                "stdout" => &mut streams.stdout,
                "stderr" => &mut streams.stderr,
                "resize" => &mut streams.resize,
                _ => continue,
            };
            *slot = Some(stream);
        }
        true
    })
    .await;
    if !matches!(collected, Ok(true)) {
        tracing::debug!("exec client did not open its streams");
        session.close();
        return;
    }
    let (input_tx, input) = tokio::sync::mpsc::channel::<Frame>(16);
    if let Some(stdin) = streams.stdin.take() {
        let tx = input_tx.clone();
        tokio::spawn(async move {
            let (mut reader, _writer) = stdin.into_split();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(Frame::Stdin(buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tx.send(Frame::StdinClosed).await;
        });
    }
    if let Some(resize) = streams.resize.take() {
        let tx = input_tx.clone();
        tokio::spawn(async move {
            let (mut reader, _writer) = resize.into_split();
            let mut decoder = ResizeDecoder::new();
            let mut buf = vec![0u8; 1024];
            while let Ok(n @ 1..) = reader.read(&mut buf).await {
                let Some(frames) = resize_frames(&mut decoder, &buf[..n]) else {
                    break;
                };
                for frame in frames {
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(input_tx);
    let output = SpdyOutput {
        protocol,
        stdout: streams.stdout.take().map(|s| s.into_split().1),
        stderr: streams.stderr.take().map(|s| s.into_split().1),
        error: streams.error.take().map(|s| s.into_split().1),
    };
    bridge(input, Box::new(output), agent).await;
    // Let the client read what was sent before the session closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    session.close();
    let _ = incoming.recv().await;
}

struct SpdyOutput {
    protocol: StreamProtocol,
    stdout: Option<spdy::StreamWriter>,
    stderr: Option<spdy::StreamWriter>,
    error: Option<spdy::StreamWriter>,
}

#[async_trait::async_trait]
impl ClientOutput for SpdyOutput {
    async fn stdout(&mut self, bytes: &[u8]) -> bool {
        match self.stdout.as_mut() {
            Some(out) => out.write_all(bytes).await.is_ok(),
            None => true,
        }
    }

    async fn stderr(&mut self, bytes: &[u8]) -> bool {
        // With a terminal there is no stderr stream; the agent sends it all as stdout.
        match self.stderr.as_mut().or(self.stdout.as_mut()) {
            Some(out) => out.write_all(bytes).await.is_ok(),
            None => true,
        }
    }

    async fn finish(self: Box<Self>, outcome: ExecOutcome) {
        let SpdyOutput {
            protocol,
            stdout,
            stderr,
            error,
        } = *self;
        for mut writer in [stdout, stderr].into_iter().flatten() {
            let _ = writer.shutdown().await;
        }
        if let Some(mut error) = error {
            let payload = error_stream_payload(protocol, &outcome);
            if !payload.is_empty() {
                let _ = error.write_all(&payload).await;
            }
            let _ = error.shutdown().await;
        }
    }
}

/// Runs an exec over an accepted WebSocket (`v4`/`v5.channel.k8s.io`): binary messages
/// whose first byte is the channel.
pub async fn serve_websocket<W, A>(socket: W, protocol: StreamProtocol, agent: A)
where
    W: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures::Sink<Message>
        + Unpin
        + Send
        + 'static,
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures::StreamExt;
    let (sink, mut messages) = socket.split();
    let (input_tx, input) = tokio::sync::mpsc::channel::<Frame>(16);
    let reader = tokio::spawn(async move {
        let mut decoder = ResizeDecoder::new();
        while let Some(Ok(message)) = messages.next().await {
            let bytes = match message {
                Message::Binary(bytes) => bytes.to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            let frames = match channel::parse_message(&bytes, protocol) {
                Ok(channel::Message::Data {
                    channel: channel::STDIN,
                    payload,
                }) => {
                    vec![Frame::Stdin(payload.to_vec())]
                }
                Ok(channel::Message::Data {
                    channel: channel::RESIZE,
                    payload,
                }) => resize_frames(&mut decoder, payload).unwrap_or_default(),
                Ok(channel::Message::Close {
                    channel: channel::STDIN,
                }) => vec![Frame::StdinClosed],
                Ok(_) => Vec::new(),
                Err(e) => {
                    tracing::debug!(error = %e, "bad exec message");
                    break;
                }
            };
            for frame in frames {
                if input_tx.send(frame).await.is_err() {
                    return;
                }
            }
        }
    });
    let output = WebSocketOutput { protocol, sink };
    bridge(input, Box::new(output), agent).await;
    reader.abort();
}

struct WebSocketOutput<S> {
    protocol: StreamProtocol,
    sink: S,
}

impl<S: futures::Sink<Message> + Unpin + Send> WebSocketOutput<S> {
    async fn send(&mut self, channel: u8, bytes: &[u8]) -> bool {
        use futures::SinkExt;
        let message = Message::Binary(channel::data_message(channel, bytes).into());
        self.sink.send(message).await.is_ok()
    }
}

#[async_trait::async_trait]
impl<S: futures::Sink<Message> + Unpin + Send> ClientOutput for WebSocketOutput<S> {
    async fn stdout(&mut self, bytes: &[u8]) -> bool {
        self.send(channel::STDOUT, bytes).await
    }

    async fn stderr(&mut self, bytes: &[u8]) -> bool {
        self.send(channel::STDERR, bytes).await
    }

    async fn finish(mut self: Box<Self>, outcome: ExecOutcome) {
        use futures::SinkExt;
        let payload = error_stream_payload(self.protocol, &outcome);
        if !payload.is_empty() {
            self.send(channel::ERROR, &payload).await;
        }
        // A close without a status code is an error to client-go's reader.
        let normal = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        };
        let _ = self.sink.send(Message::Close(Some(normal))).await;
        let _ = self.sink.close().await;
    }
}

/// The SPDY streams an exec client opened, by type.
#[derive(Default)]
struct ClientStreams {
    error: Option<spdy::SpdyStream>,
    stdin: Option<spdy::SpdyStream>,
    stdout: Option<spdy::SpdyStream>,
    stderr: Option<spdy::SpdyStream>,
    resize: Option<spdy::SpdyStream>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_options_parse_as_the_kubelet_does() {
        let options = ExecOptions::parse(
            "command=sh&command=-c&command=echo%20hi%3B%20exit%203&stdout=1&stderr=true",
            false,
        )
        .expect("parses");
        assert_eq!(options.command, ["sh", "-c", "echo hi; exit 3"]);
        assert!(
            options.streams.stdout
                && options.streams.stderr
                && !options.streams.stdin
                && !options.streams.tty
        );
        // The recorded k3s request: output/error are the old names.
        let recorded =
            ExecOptions::parse("command=echo&command=hi&error=1&output=1", false).expect("parses");
        assert!(recorded.streams.stdout && recorded.streams.stderr);
        let tty = ExecOptions::parse("command=sh&stdin=1&stdout=1&stderr=1&tty=1", false)
            .expect("parses");
        assert!(tty.streams.tty && !tty.streams.stderr);
        assert!(ExecOptions::parse("stdout=1", false).is_err());
        assert!(ExecOptions::parse("stdout=1", true).is_ok());
        assert!(ExecOptions::parse("command=ls", false).is_err());
    }
}
