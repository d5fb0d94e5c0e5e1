//! A stateful workload's group, as its pods and agents show it: the group socket in a
//! pod's container (reached through the container's root), and the group state an
//! agent keeps on disk.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// The running container labelled `label` (e.g. `io.beemesh.pod.uid=<uid>`).
pub fn running_container(label: &str) -> Option<Value> {
    super::podman_containers(label)
        .into_iter()
        .find(|c| c["State"] == "running")
}

/// The group's socket as the container labelled `label` sees it.
pub fn group_socket(label: &str) -> Option<PathBuf> {
    let container = running_container(label)?;
    let id = container["Id"].as_str()?;
    let out = Command::new("podman")
        .args(["inspect", "--format", "{{.State.Pid}}", id])
        .output()
        .ok()?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Some(PathBuf::from(format!(
        "/proc/{pid}/root/run/beemesh/group.sock"
    )))
}

/// One HTTP/1.1 request on a pod's group socket: the status and the JSON body.
pub fn call(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, Value), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(40)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: group\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let json = serde_json::from_str(body).map_err(|e| format!("{e}: {body:?}"))?;
    Ok((status, json))
}

/// The groups whose state the agent with state directory `state_dir` keeps.
pub fn group_dirs(state_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state_dir.join("groups"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n != "pods"))
                .collect()
        })
        .unwrap_or_default()
}
