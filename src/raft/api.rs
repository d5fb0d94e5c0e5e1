//! What a grouped pod's containers get: a small HTTP API on the Unix socket mounted at
//! [`SOCKET_IN_CONTAINER`](super::SOCKET_IN_CONTAINER). Reads are linearizable (served
//! by the leader after it confirmed it leads), writes are committed by a majority
//! before they are answered. See the README's "Stateful workloads" for the API.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::groups::{Groups, ServiceError};
use super::kv::{check_key, Command, Outcome, MAX_VALUE_BYTES};
use super::rpc::Read;
use super::{node_id, GroupKey};
use crate::wire::PodRef;

/// Connections served at once on one pod's socket.
const MAX_CONNECTIONS: usize = 64;
/// The longest a long poll waits.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// One pod's view of its group.
#[derive(Clone)]
pub struct PodApi {
    pub groups: Groups,
    pub group: GroupKey,
    pub pod: PodRef,
}

/// Binds the pod's socket at `path` (any stale one removed first), open to every user
/// in the pod's containers: only they see the directory it is in.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serves the pod's API until cancelled.
pub async fn serve(listener: UnixListener, api: PodApi, cancel: CancellationToken) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        let (api, cancel) = (api.clone(), cancel.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn failed(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": message.to_string() }))
}

fn unavailable(e: ServiceError) -> Response<Full<Bytes>> {
    let status = match e {
        ServiceError::Unknown(_) => StatusCode::GATEWAY_TIMEOUT,
        ServiceError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ServiceError::NoGroup(_) | ServiceError::NoLeader => StatusCode::SERVICE_UNAVAILABLE,
    };
    failed(status, e)
}

/// `%XX` escapes decoded; anything else as it is. None for a broken escape or bytes
/// that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn query(request: &Request<Incoming>) -> Option<BTreeMap<String, String>> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn number(query: &BTreeMap<String, String>, name: &str) -> Result<Option<u64>, String> {
    query
        .get(name)
        .map(|v| {
            v.parse()
                .map_err(|_| format!("{name} must be a whole number, not {v:?}"))
        })
        .transpose()
}

impl PodApi {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(path) = percent_decode(request.uri().path()) else {
            return failed(
                StatusCode::BAD_REQUEST,
                "the path is not valid percent-encoded UTF-8",
            );
        };
        let Some(query) = query(&request) else {
            return failed(
                StatusCode::BAD_REQUEST,
                "the query is not valid percent-encoded UTF-8",
            );
        };
        let method = request.method().clone();
        let result = match (method.clone(), path.as_str()) {
            (Method::GET, "/self") => Ok(self.whoami()),
            (Method::GET, "/leader") => self.leader(&query).await,
            (Method::GET, "/kv") => self.list(&query).await,
            (_, p) if p.starts_with("/kv/") => {
                let key = &p["/kv/".len()..];
                self.key(method, key, &query, request).await
            }
            (_, p) if p.starts_with("/lock/") => {
                let name = &p["/lock/".len()..];
                self.lock(method, name, &query).await
            }
            _ => Err(failed(
                StatusCode::NOT_FOUND,
                format!("no {method} {path} here"),
            )),
        };
        result.unwrap_or_else(|response| response)
    }

    fn whoami(&self) -> Response<Full<Bytes>> {
        let me = self.groups.me();
        reply(
            StatusCode::OK,
            json!({
                "group": self.group.name,
                "namespace": self.pod.namespace,
                "pod": self.pod.name,
                "agent": me.to_string(),
                "member": node_id(&me),
            }),
        )
    }

    async fn leader(
        &self,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        let mut seen = self.groups.leader(&self.group).map_err(unavailable)?;
        // A long poll: `?wait` answers once the leader differs from the one the caller
        // saw at `term`, or after 30 s.
        if query.contains_key("wait") {
            let term = number(query, "term").map_err(|e| failed(StatusCode::BAD_REQUEST, e))?;
            if term.is_none_or(|t| t == seen.1) {
                self.groups.leader_change(&self.group, seen, MAX_WAIT).await;
                seen = self.groups.leader(&self.group).map_err(unavailable)?;
            }
        }
        let (leader, term) = seen;
        let pod = leader.and_then(|agent| {
            let word = self.groups.word(&self.group)?;
            let mut pods: Vec<&PodRef> = word
                .members
                .iter()
                .filter(|m| m.agent.0 == agent)
                .map(|m| &m.pod)
                .collect();
            // The pod that speaks for the leading agent: the first of its pods by name.
            pods.sort_by(|a, b| a.name.cmp(&b.name));
            pods.first().map(|p| p.name.clone())
        });
        Ok(reply(
            StatusCode::OK,
            json!({
                "leader": leader.map(|agent| json!({"agent": agent.to_string(), "pod": pod})),
                "term": term,
            }),
        ))
    }

    async fn list(
        &self,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        let prefix = query.get("prefix").cloned().unwrap_or_default();
        let found = self
            .groups
            .read(&self.group, Read::Prefix { prefix })
            .await
            .map_err(unavailable)?;
        let items: Vec<Value> = found
            .items
            .into_iter()
            .map(|(key, item)| json!({"key": key, "value": item.value, "revision": item.revision}))
            .collect();
        Ok(reply(
            StatusCode::OK,
            json!({"items": items, "index": found.index}),
        ))
    }

    async fn key(
        &self,
        method: Method,
        key: &str,
        query: &BTreeMap<String, String>,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        check_key(key).map_err(|e| failed(StatusCode::BAD_REQUEST, e))?;
        let revision = number(query, "revision").map_err(|e| failed(StatusCode::BAD_REQUEST, e))?;
        let command = match method {
            Method::GET => return self.get(key, query).await,
            Method::PUT => {
                let body = Limited::new(request.into_body(), MAX_VALUE_BYTES)
                    .collect()
                    .await
                    .map_err(|_| {
                        failed(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("a value is at most {MAX_VALUE_BYTES} bytes"),
                        )
                    })?
                    .to_bytes();
                let value = String::from_utf8(body.to_vec())
                    .map_err(|_| failed(StatusCode::BAD_REQUEST, "a value is UTF-8 text"))?;
                Command::Put {
                    key: key.to_owned(),
                    value,
                    expect: revision,
                }
            }
            Method::DELETE => Command::Delete {
                key: key.to_owned(),
                expect: revision,
            },
            other => {
                return Err(failed(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{other} is not served on /kv/"),
                ))
            }
        };
        self.write(command).await
    }

    async fn get(
        &self,
        key: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        // A watch: `?wait=R`, R the revision the caller has (0: none), answers once the
        // key's revision differs (0 when it is deleted), or after 30 s.
        if let Some(seen) = number(query, "wait").map_err(|e| failed(StatusCode::BAD_REQUEST, e))? {
            self.wait_for_change(key, seen).await;
        }
        let found = self
            .groups
            .read(
                &self.group,
                Read::Key {
                    key: key.to_owned(),
                },
            )
            .await
            .map_err(unavailable)?;
        Ok(match found.items.into_iter().next() {
            Some((key, item)) => reply(
                StatusCode::OK,
                json!({"key": key, "value": item.value, "revision": item.revision, "index": found.index}),
            ),
            None => reply(
                StatusCode::NOT_FOUND,
                json!({"error": format!("no key {key}"), "index": found.index}),
            ),
        })
    }

    /// Waits until this member has applied a change of the key from revision `seen`.
    async fn wait_for_change(&self, key: &str, seen: u64) {
        let Some(state) = self.groups.state(&self.group) else {
            return;
        };
        let mut applied = state.subscribe();
        let wait = async {
            loop {
                let current = state.read(|a| a.kv.get(key).map_or(0, |item| item.revision));
                if current != seen || applied.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(MAX_WAIT, wait).await;
    }

    async fn lock(
        &self,
        method: Method,
        name: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        check_key(name).map_err(|e| failed(StatusCode::BAD_REQUEST, e))?;
        let bad = |e| failed(StatusCode::BAD_REQUEST, e);
        let command = match method {
            Method::POST => Command::Lock {
                name: name.to_owned(),
                holder: self.pod.name.clone(),
                lease_ms: number(query, "lease_ms").map_err(bad)?.unwrap_or(10_000),
                now_ms: 0,
            },
            Method::DELETE => Command::Unlock {
                name: name.to_owned(),
                holder: self.pod.name.clone(),
                token: number(query, "token")
                    .map_err(bad)?
                    .ok_or_else(|| failed(StatusCode::BAD_REQUEST, "token is required"))?,
            },
            other => {
                return Err(failed(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{other} is not served on /lock/"),
                ))
            }
        };
        self.write(command).await
    }

    async fn write(
        &self,
        command: Command,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        command
            .check()
            .map_err(|e| failed(StatusCode::BAD_REQUEST, e))?;
        let (index, outcome) = self
            .groups
            .propose(&self.group, command)
            .await
            .map_err(unavailable)?;
        let status = match &outcome {
            Outcome::Stored { .. }
            | Outcome::Deleted { .. }
            | Outcome::Locked { .. }
            | Outcome::Unlocked
            | Outcome::Seated { .. }
            | Outcome::Unseated => StatusCode::OK,
            Outcome::Conflict { .. } | Outcome::Held { .. } | Outcome::SeatTaken { .. } => {
                StatusCode::CONFLICT
            }
            Outcome::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Outcome::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut body = serde_json::to_value(&outcome).unwrap_or(Value::Null);
        if let Value::Object(fields) = &mut body {
            fields.insert("index".into(), json!(index));
        }
        Ok(reply(status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_decode_and_broken_ones_are_refused() {
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("plain/key").as_deref(), Some("plain/key"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
