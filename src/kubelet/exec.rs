//! `kubectl exec` at the node: the kubelet's /exec endpoint over SPDY/3.1, bridged to an
//! exec session on the agent that runs the pod (see `relay::Frame`).
//!
//! The SPDY streams (error, stdin, stdout, stderr, resize) come as the client opens
//! them; output goes to stdout/stderr, the exit code to the error stream in the
//! negotiated protocol's format, and closing either end closes the whole path.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::channel::status::{error_stream_payload, ExecOutcome, ResizeDecoder};
use super::channel::StreamProtocol;
use super::relay::{read_frame, write_frame, Exit, Frame};
use super::spdy;

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
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecOptions {
    /// Parses `command=..&command=..&stdin=1&stdout=1&stderr=1&tty=1`, refusing what the
    /// kubelet refuses.
    pub fn parse(query: &str) -> Result<ExecOptions, String> {
        let mut options = ExecOptions {
            command: Vec::new(),
            stdin: false,
            stdout: false,
            stderr: false,
            tty: false,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)?;
            let flag = matches!(value.as_str(), "1" | "true");
            match key {
                "command" => options.command.push(value),
                "input" | "stdin" => options.stdin = flag,
                "output" | "stdout" => options.stdout = flag,
                "error" | "stderr" => options.stderr = flag,
                "tty" => options.tty = flag,
                _ => {}
            }
        }
        if options.command.is_empty() {
            return Err("you must specify at least 1 command".into());
        }
        if !(options.stdin || options.stdout || options.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        if options.tty {
            // With a terminal, stderr goes to stdout.
            options.stderr = false;
        }
        Ok(options)
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
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

/// Runs an exec over an upgraded SPDY connection until the command ends or a side
/// closes.
pub async fn serve_spdy<T, A>(upgraded: T, protocol: StreamProtocol, options: ExecOptions, agent: A)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (session, mut incoming) = spdy::accept(upgraded);
    let mut streams = Streams::default();
    let wanted = |s: &Streams| {
        s.error.is_some()
            && (!options.stdin || s.stdin.is_some())
            && (!options.stdout || s.stdout.is_some())
            && (!options.stderr || s.stderr.is_some())
            && (!(options.tty && protocol.has_resize()) || s.resize.is_some())
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
    let Streams {
        error,
        stdin,
        stdout,
        stderr,
        resize,
    } = streams;
    let (mut from_agent, mut to_agent) = tokio::io::split(agent);
    let (to_agent_tx, mut to_agent_rx) = tokio::sync::mpsc::channel::<Frame>(16);
    // Client input to the agent: stdin (EOF closes the command's stdin) and resizes.
    if let Some(stdin) = stdin {
        let tx = to_agent_tx.clone();
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
    if let Some(resize) = resize {
        let tx = to_agent_tx.clone();
        tokio::spawn(async move {
            let (mut reader, _writer) = resize.into_split();
            let mut decoder = ResizeDecoder::new();
            let mut buf = vec![0u8; 1024];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let Ok(sizes) = decoder.push(&buf[..n]) else {
                    break;
                };
                for size in sizes {
                    let frame = Frame::Resize {
                        width: size.width,
                        height: size.height,
                    };
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(to_agent_tx);
    let forward = tokio::spawn(async move {
        while let Some(frame) = to_agent_rx.recv().await {
            if write_frame(&mut to_agent, &frame).await.is_err() {
                break;
            }
        }
    });
    let mut stdout = stdout.map(|s| s.into_split().1);
    let mut stderr = stderr.map(|s| s.into_split().1);
    let mut outcome = ExecOutcome::Error("the agent closed the session".into());
    loop {
        match read_frame(&mut from_agent).await {
            Ok(Some(Frame::Stdout(bytes))) => {
                if let Some(out) = stdout.as_mut() {
                    if out.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            }
            Ok(Some(Frame::Stderr(bytes))) => {
                // With a terminal the agent sends everything as stdout anyway.
                if let Some(out) = stderr.as_mut().or(stdout.as_mut()) {
                    if out.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            }
            Ok(Some(Frame::Exit(exit))) => {
                outcome = match exit {
                    Exit::Code(0) => ExecOutcome::Success,
                    Exit::Code(code) => ExecOutcome::ExitCode(code),
                    Exit::Error(message) => ExecOutcome::Error(message),
                };
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    forward.abort();
    for writer in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
        let _ = writer.shutdown().await;
    }
    if let Some(error) = error {
        let (_reader, mut writer) = error.into_split();
        let payload = error_stream_payload(protocol, &outcome);
        if !payload.is_empty() {
            let _ = writer.write_all(&payload).await;
        }
        let _ = writer.shutdown().await;
    }
    // Let the client read what was sent before the session closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    session.close();
    let _ = incoming.recv().await;
}

#[derive(Default)]
struct Streams {
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
        )
        .expect("parses");
        assert_eq!(options.command, ["sh", "-c", "echo hi; exit 3"]);
        assert!(options.stdout && options.stderr && !options.stdin && !options.tty);
        // The recorded k3s request: output/error are the old names.
        let recorded =
            ExecOptions::parse("command=echo&command=hi&error=1&output=1").expect("parses");
        assert!(recorded.stdout && recorded.stderr);
        let tty = ExecOptions::parse("command=sh&stdin=1&stdout=1&stderr=1&tty=1").expect("parses");
        assert!(tty.tty && !tty.stderr);
        assert!(ExecOptions::parse("stdout=1").is_err());
        assert!(ExecOptions::parse("command=ls").is_err());
    }
}
