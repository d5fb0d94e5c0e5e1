//! What travels on the exec error stream and the resize stream, for SPDY and WebSocket
//! alike.
//!
//! From v4 on the error stream carries one metav1.Status, written as the kubelet writes
//! it (no kind/apiVersion, an empty `metadata`); client-go turns `NonZeroExitCode` with an
//! `ExitCode` cause into the exit code kubectl exits with. Before v4 it carries plain
//! error text, and a clean exit writes nothing.

use serde::{Deserialize, Serialize};

use super::StreamProtocol;

/// How an exec or attach ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    /// The process exited 0.
    Success,
    /// The process exited with this code: non-zero when BeeMesh writes it; read back, any
    /// code from 0 to 255, as client-go takes it.
    ExitCode(i32),
    /// The exec could not run or failed otherwise.
    Error(String),
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct Status {
    #[serde(default)]
    metadata: Empty,
    #[serde(default)]
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    details: Option<Details>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<i32>,
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct Empty {}

#[derive(Debug, Serialize, Deserialize, Default)]
struct Details {
    #[serde(default)]
    causes: Vec<Cause>,
}

/// metav1.StatusCause: the Go field `Type` is `reason` in JSON.
#[derive(Debug, Serialize, Deserialize, Default)]
struct Cause {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl ExecOutcome {
    /// The metav1.Status JSON of the v4/v5 error stream.
    pub fn status_json(&self) -> Vec<u8> {
        let status = match self {
            Self::Success => Status {
                status: "Success".into(),
                ..Status::default()
            },
            Self::ExitCode(code) => Status {
                status: "Failure".into(),
                message: Some(format!(
                    "command terminated with non-zero exit code: exit status {code}"
                )),
                reason: Some("NonZeroExitCode".into()),
                details: Some(Details {
                    causes: vec![Cause {
                        reason: Some("ExitCode".into()),
                        message: Some(code.to_string()),
                    }],
                }),
                ..Status::default()
            },
            Self::Error(message) => Status {
                status: "Failure".into(),
                message: Some(format!("Internal error occurred: {message}")),
                reason: Some("InternalError".into()),
                details: Some(Details {
                    causes: vec![Cause {
                        reason: None,
                        message: Some(message.clone()),
                    }],
                }),
                code: Some(500),
                ..Status::default()
            },
        };
        // Serializing plain strings and numbers into a Vec cannot fail.
        serde_json::to_vec(&status).unwrap_or_default()
    }
}

/// The bytes to write on the error stream for `outcome`, in the negotiated protocol's
/// format (empty means write nothing, just close the stream).
pub fn error_stream_payload(protocol: StreamProtocol, outcome: &ExecOutcome) -> Vec<u8> {
    if protocol.status_on_error_stream() {
        return outcome.status_json();
    }
    match outcome {
        ExecOutcome::Success => Vec::new(),
        ExecOutcome::ExitCode(code) => {
            format!("command terminated with non-zero exit code: exit status {code}").into_bytes()
        }
        ExecOutcome::Error(message) => message.clone().into_bytes(),
    }
}

/// Reads an error-stream Status back as client-go's v4 error decoder does (for tests
/// and proxies): the first ExitCode cause of a NonZeroExitCode failure must be a code
/// from 0 to 255; anything that is not a Status is an error with its text.
pub fn parse_status(bytes: &[u8]) -> ExecOutcome {
    let protocol_error =
        |what: String| ExecOutcome::Error(format!("error stream protocol error: {what}"));
    let Ok(status) = serde_json::from_slice::<Status>(bytes) else {
        return ExecOutcome::Error(String::from_utf8_lossy(bytes).into_owned());
    };
    match status.status.as_str() {
        "Success" => return ExecOutcome::Success,
        "Failure" => {}
        _ => return protocol_error("unknown error".into()),
    }
    if status.reason.as_deref() == Some("NonZeroExitCode") {
        let Some(details) = status.details else {
            return protocol_error("details must be set".into());
        };
        let Some(cause) = details
            .causes
            .iter()
            .find(|c| c.reason.as_deref() == Some("ExitCode"))
        else {
            return protocol_error("no ExitCode cause given".into());
        };
        let message = cause.message.as_deref().unwrap_or_default();
        return match message.parse::<u8>() {
            Ok(code) => ExecOutcome::ExitCode(code.into()),
            Err(_) => protocol_error(format!("invalid exit code value {message:?}")),
        };
    }
    ExecOutcome::Error(status.message.unwrap_or_default())
}

/// A terminal size from the resize stream (Go field names, capitalised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Longest pending resize text; a real one is about 30 bytes.
const MAX_PENDING_RESIZE: usize = 4096;

/// Splits the resize stream into sizes. Over SPDY it is a byte stream of concatenated
/// JSON objects (Go's json.Encoder), so an object may arrive in pieces; over WebSocket
/// each message holds one.
#[derive(Debug, Default)]
pub struct ResizeDecoder {
    pending: Vec<u8>,
}

/// Resize input that is not a stream of `{"Width":w,"Height":h}` objects.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid resize event: {0}")]
pub struct ResizeError(String);

impl ResizeDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes and returns every size now complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<TerminalSize>, ResizeError> {
        self.pending.extend_from_slice(bytes);
        let mut sizes = Vec::new();
        let mut stream =
            serde_json::Deserializer::from_slice(&self.pending).into_iter::<TerminalSize>();
        let mut used = 0;
        loop {
            match stream.next() {
                Some(Ok(size)) => {
                    sizes.push(size);
                    used = stream.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => return Err(ResizeError(e.to_string())),
                None => {
                    used = stream.byte_offset();
                    break;
                }
            }
        }
        self.pending.drain(..used);
        if self.pending.len() > MAX_PENDING_RESIZE {
            return Err(ResizeError("object too long".into()));
        }
        Ok(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_what_the_kubelet_writes() {
        assert_eq!(
            ExecOutcome::Success.status_json(),
            br#"{"metadata":{},"status":"Success"}"#
        );
        assert_eq!(
            String::from_utf8(ExecOutcome::ExitCode(3).status_json()).unwrap(),
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: exit status 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
        );
        assert_eq!(
            String::from_utf8(ExecOutcome::Error("no \"such\" container".into()).status_json())
                .unwrap(),
            r#"{"metadata":{},"status":"Failure","message":"Internal error occurred: no \"such\" container","reason":"InternalError","details":{"causes":[{"message":"no \"such\" container"}]},"code":500}"#
        );
    }

    #[test]
    fn statuses_read_back_as_client_go_reads_them() {
        for outcome in [ExecOutcome::Success, ExecOutcome::ExitCode(137)] {
            assert_eq!(parse_status(&outcome.status_json()), outcome);
        }
        // A code outside a byte (a runtime that could not tell) is written as the
        // kubelet writes it; client-go refuses it.
        assert_eq!(
            parse_status(&ExecOutcome::ExitCode(-1).status_json()),
            ExecOutcome::Error(
                "error stream protocol error: invalid exit code value \"-1\"".into()
            )
        );
        assert_eq!(
            parse_status(&ExecOutcome::Error("boom".into()).status_json()),
            ExecOutcome::Error("Internal error occurred: boom".into())
        );
        assert_eq!(parse_status(b"plain"), ExecOutcome::Error("plain".into()));
        // As client-go: the exit code is a byte, zero included; anything else is a
        // protocol error (found by the ws_channel fuzz target).
        let exit = |code: &str| {
            format!(
                r#"{{"status":"Failure","reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"ExitCode","message":"{code}"}}]}}}}"#
            )
        };
        assert_eq!(parse_status(exit("0").as_bytes()), ExecOutcome::ExitCode(0));
        assert_eq!(
            parse_status(exit("255").as_bytes()),
            ExecOutcome::ExitCode(255)
        );
        for bad in ["256", "-1", "x"] {
            assert_eq!(
                parse_status(exit(bad).as_bytes()),
                ExecOutcome::Error(format!(
                    "error stream protocol error: invalid exit code value {bad:?}"
                ))
            );
        }
        assert_eq!(
            parse_status(br#"{"status":"Failure","reason":"NonZeroExitCode"}"#),
            ExecOutcome::Error("error stream protocol error: details must be set".into())
        );
        assert_eq!(
            parse_status(br#"{"status":"Pending"}"#),
            ExecOutcome::Error("error stream protocol error: unknown error".into())
        );
    }

    #[test]
    fn old_protocols_get_plain_text() {
        assert!(error_stream_payload(StreamProtocol::V3, &ExecOutcome::Success).is_empty());
        assert_eq!(
            error_stream_payload(StreamProtocol::V1, &ExecOutcome::Error("x".into())),
            b"x"
        );
        assert_eq!(
            error_stream_payload(StreamProtocol::V5, &ExecOutcome::Success),
            ExecOutcome::Success.status_json()
        );
    }

    #[test]
    fn resize_events_arrive_in_pieces_and_together() {
        let mut decoder = ResizeDecoder::new();
        assert_eq!(decoder.push(br#"{"Width":80,"#).unwrap(), []);
        assert_eq!(
            decoder
                .push(br#""Height":24}{"Width":100,"Height":40}"#)
                .unwrap(),
            [
                TerminalSize {
                    width: 80,
                    height: 24
                },
                TerminalSize {
                    width: 100,
                    height: 40
                }
            ]
        );
        assert_eq!(decoder.push(b"\n").unwrap(), []);
        assert!(ResizeDecoder::new().push(b"nonsense").is_err());
        assert!(ResizeDecoder::new()
            .push(br#"{"Width":-1,"Height":1}"#)
            .is_err());
        let mut long = ResizeDecoder::new();
        assert!(long
            .push(format!("{{\"Width\":{}", " ".repeat(5000)).as_bytes())
            .is_err());
    }
}
