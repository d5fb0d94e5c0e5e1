//! End-to-end harness: a node and agents as separate `beemesh` processes on loopback,
//! running pods in the machine's real Podman (set up by hack/install-podman.sh and
//! hack/build-test-image.sh). Everything a test starts is killed, and every Podman pod
//! its agents created is removed, when the harness is dropped.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod group;
pub mod registry;

pub const IMAGE: &str = "localhost/busybox:1.35";
pub const SOCKET: &str = "/run/podman/podman.sock";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_beemesh")
}

/// Fails the test with instructions when Podman or the test image is missing.
pub fn require_podman() {
    let ping = Command::new("curl")
        .args([
            "-fsS",
            "--max-time",
            "3",
            "--unix-socket",
            SOCKET,
            "http://d/v4.0.0/libpod/_ping",
        ])
        .output();
    assert!(
        ping.is_ok_and(|o| o.status.success()),
        "the Podman REST service is not answering on {SOCKET}: run `bash hack/install-podman.sh`"
    );
    let image = Command::new("podman")
        .args(["image", "exists", IMAGE])
        .status();
    assert!(
        image.is_ok_and(|s| s.success()),
        "the test image {IMAGE} is missing: run `bash hack/build-test-image.sh`"
    );
}

/// A loopback address for a mesh peer to listen on: TCP, or QUIC when
/// `BEEMESH_TEST_TRANSPORT=quic` (benchmarks compare the two transports).
pub fn mesh_listen_addr() -> String {
    match std::env::var("BEEMESH_TEST_TRANSPORT").as_deref() {
        Ok("quic") => format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_port()),
        _ => format!("/ip4/127.0.0.1/tcp/{}", free_port()),
    }
}

/// A loopback port nothing listens on, never the same twice in one test binary: the
/// ports are bound later, by other processes, so the OS could hand one out again.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `beemesh token create --state-dir DIR <extra>`: the new token.
pub fn create_token(state_dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(bin())
        .args(["token", "create", "--state-dir"])
        .arg(state_dir)
        .args(extra)
        .output()
        .expect("beemesh token create runs");
    assert!(out.status.success(), "beemesh token create failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn peer_id(state_dir: &Path) -> String {
    beemesh_id("--state-dir", state_dir)
}

/// `beemesh id --state-dir DIR` or `beemesh id --identity-key-file FILE`.
fn beemesh_id(flag: &str, path: &Path) -> String {
    let out = Command::new(bin())
        .args(["id", flag])
        .arg(path)
        .output()
        .expect("beemesh id runs");
    assert!(out.status.success(), "beemesh id failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs a `curl` command (given its options and URL) and returns the HTTP status and
/// the body; status 0 when no answer came (refused, TLS failure, timeout).
pub fn curl(mut command: Command) -> (u16, String) {
    let out = command
        .args(["-sS", "-w", "\n%{http_code}"])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `helm template beemesh charts/beemesh --namespace beemesh <args>`: the rendered YAML.
pub fn helm_template(args: &[&str]) -> String {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/beemesh");
    let out = Command::new("helm")
        .args(["template", "beemesh", chart, "--namespace", "beemesh"])
        .args(args)
        .output()
        .expect("helm is missing: run `bash hack/install-helm.sh`");
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A running `beemesh` process whose stdout lines are collected.
pub struct Process {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub state_dir: PathBuf,
    pub peer: String,
    pub addr: String,
}

impl Process {
    fn spawn(
        args: &[String],
        state_dir: PathBuf,
        peer: String,
        addr: String,
        log: PathBuf,
    ) -> Process {
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(bin())
            .args(args)
            .env("RUST_LOG", "info,beemesh=debug")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("beemesh starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout piped");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Process {
            child,
            lines,
            state_dir,
            peer,
            addr,
        }
    }

    pub fn output(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A node (standalone, with a manifest directory) and its agents.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    /// Memory-backed: the agents' --secrets-dir, one subdirectory each.
    pub shm: tempfile::TempDir,
    pub manifests: PathBuf,
    pub node: Option<Process>,
    pub agents: Vec<Process>,
    node_state: PathBuf,
    node_addr: String,
    node_peer: String,
    node_args: Vec<String>,
    agent_count: usize,
    /// The node's kubelet API port (each test node has its own).
    pub kubelet_port: u16,
    /// A join token of the node, which agents are started with.
    pub join_token: String,
}

impl Mesh {
    pub fn new() -> Mesh {
        Mesh::with_node_args(&[])
    }

    /// A mesh whose node gets extra flags.
    pub fn with_node_args(node_args: &[&str]) -> Mesh {
        require_podman();
        let dir = tempfile::tempdir().expect("tempdir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("manifest dir");
        let node_state = dir.path().join("node");
        let node_args: Vec<String> = node_args.iter().map(ToString::to_string).collect();
        // A key file among the node's flags wins over its state directory.
        let peer = match node_args.iter().position(|a| a == "--identity-key-file") {
            Some(i) => beemesh_id("--identity-key-file", Path::new(&node_args[i + 1])),
            None => peer_id(&node_state),
        };
        let node_addr = format!("{}/p2p/{peer}", mesh_listen_addr());
        let join_token = create_token(&node_state, &[]);
        let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs directory in /dev/shm");
        let mut mesh = Mesh {
            dir,
            shm,
            manifests,
            node: None,
            agents: Vec::new(),
            node_state,
            node_addr,
            node_peer: peer,
            node_args,
            agent_count: 0,
            kubelet_port: free_port(),
            join_token,
        };
        mesh.start_node();
        mesh
    }

    pub fn node_addr(&self) -> &str {
        &self.node_addr
    }

    /// The node's state directory: its identity, join tokens and client key.
    pub fn node_state(&self) -> &Path {
        &self.node_state
    }

    pub fn start_node(&mut self) {
        let listen = self
            .node_addr
            .rsplit_once("/p2p/")
            .map(|(l, _)| l.to_string())
            .expect("addr");
        let args: Vec<String> = [
            "node",
            "--state-dir",
            &self.node_state.display().to_string(),
            "--listen",
            &listen,
            "--pod-manifest-path",
            &self.manifests.display().to_string(),
            "--kubelet-port",
            &self.kubelet_port.to_string(),
        ]
        .iter()
        .map(ToString::to_string)
        .chain(self.node_args.iter().cloned())
        .collect();
        let log = self.dir.path().join(format!("node-{}.log", now_millis()));
        self.node = Some(Process::spawn(
            &args,
            self.node_state.clone(),
            self.node_peer.clone(),
            self.node_addr.clone(),
            log,
        ));
    }

    /// Starts an agent with extra flags; returns its index.
    pub fn start_agent(&mut self, extra: &[&str]) -> usize {
        let n = self.agent_count;
        self.agent_count += 1;
        let state = self.dir.path().join(format!("agent{n}"));
        self.start_agent_in(state, extra)
    }

    /// Starts an agent on an existing state directory (a restart keeps its identity).
    /// It joins with the mesh's token unless `extra` says whom to trust.
    pub fn start_agent_in(&mut self, state: PathBuf, extra: &[&str]) -> usize {
        let peer = peer_id(&state);
        let listen = mesh_listen_addr();
        let mut args: Vec<String> = [
            "agent",
            "--state-dir",
            &state.display().to_string(),
            "--listen",
            &listen,
            "--bootstrap",
            &self.node_addr,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        if !extra
            .iter()
            .any(|a| matches!(*a, "--trust" | "--join" | "--insecure-trust-any"))
        {
            args.extend(["--join".to_string(), self.join_token.clone()]);
        }
        // Kept per state directory: a restarted agent finds its records again.
        if !extra.contains(&"--secrets-dir") {
            let secrets = self
                .shm
                .path()
                .join(state.file_name().expect("state dir name"));
            args.extend(["--secrets-dir".to_string(), secrets.display().to_string()]);
        }
        args.extend(extra.iter().map(ToString::to_string));
        let log = self
            .dir
            .path()
            .join(format!("agent-{peer}-{}.log", now_millis()));
        let process = Process::spawn(&args, state, peer, listen, log);
        self.agents.push(process);
        self.agents.len() - 1
    }

    pub fn node(&mut self) -> &mut Process {
        self.node.as_mut().expect("node running")
    }

    pub fn write_manifest(&self, file: &str, text: &str) {
        // Written aside and renamed, so that a scan never sees half a file.
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.manifests.join(file)).expect("rename manifest");
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests.join(file)).expect("remove manifest");
    }

    /// `beemesh status -o json` against the node, with its client key.
    pub fn status(&self) -> Option<Value> {
        self.try_status().ok()
    }

    /// As [`Mesh::status`], with what went wrong.
    pub fn try_status(&self) -> Result<Value, String> {
        let out = self.status_output("json")?;
        serde_json::from_str(&out).map_err(|e| e.to_string())
    }

    /// `beemesh status -o <format>`'s output against the node, with its client key.
    pub fn status_output(&self, format: &str) -> Result<String, String> {
        let out = Command::new(bin())
            .args([
                "status",
                "-o",
                format,
                "--timeout-seconds",
                "5",
                "--bootstrap",
                &self.node_addr,
            ])
            .arg("--client-key")
            .arg(self.node_state.join("client.key"))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node's view of one pod (namespace/name).
    pub fn pod_status(&self, namespace: &str, name: &str) -> Option<Value> {
        let status = self.status()?;
        status["pods"]
            .as_array()?
            .iter()
            .find(|p| p["pod"]["namespace"] == namespace && p["pod"]["name"] == name)
            .cloned()
    }

    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check() {
                return found;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        if let Some(node) = &self.node {
            out.push_str(&format!("--- node stdout\n{}\n", node.output()));
        }
        for (path, text) in self.logs() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!(
                "--- {}\n{}\n",
                path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        out
    }

    /// Every log file of the node and agents (their stderr), with its text.
    pub fn logs(&self) -> Vec<(PathBuf, String)> {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "log"))
            .map(|path| {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                (path, text)
            })
            .collect()
    }

    /// Kills (SIGKILL) the agent with peer ID `peer`; returns its index.
    pub fn kill_agent(&mut self, peer: &str) -> usize {
        let index = self
            .agents
            .iter()
            .position(|a| a.peer == peer)
            .unwrap_or_else(|| panic!("{peer} is none of this mesh's agents"));
        self.agents[index].kill();
        index
    }

    pub fn agent_peers(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.peer.clone()).collect()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some(node) = self.node.as_mut() {
            node.kill();
        }
        for agent in &mut self.agents {
            agent.kill();
        }
        if std::thread::panicking() {
            self.keep_logs();
        }
        let mut peers: Vec<String> = self.agents.iter().map(|a| a.peer.clone()).collect();
        peers.sort();
        peers.dedup();
        for peer in peers {
            for pod in podman_pods(&format!("io.beemesh.agent={peer}")) {
                let _ = Command::new("podman")
                    .args(["pod", "rm", "-f", "-t", "0", &pod.id])
                    .output();
            }
            // A killed agent cannot remove its redirects; Podman gives their pods'
            // addresses to other tests' pods.
            let table = beemesh::agent::egress::nft::table_name(&peer);
            let _ = Command::new("nft")
                .args(["delete", "table", "ip", &table])
                .output();
        }
    }
}

impl Mesh {
    /// A failed test's node and agent logs: copied to `/tmp/beemesh-test-logs`, and
    /// their last lines printed (all CI keeps of a failed run is its output).
    fn keep_logs(&self) {
        let kept = PathBuf::from(format!(
            "/tmp/beemesh-test-logs/{}-{}",
            now_millis(),
            std::process::id()
        ));
        let _ = std::fs::create_dir_all(&kept);
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|x| x != "log") {
                continue;
            }
            let Some(name) = path.file_name() else {
                continue;
            };
            let _ = std::fs::copy(&path, kept.join(name));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {}", name.to_string_lossy());
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
        eprintln!("--- logs kept in {}", kept.display());
    }
}

fn now_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// A Podman pod as `podman pod ps` shows it.
#[derive(Debug, Clone)]
pub struct PodmanPod {
    pub id: String,
    pub name: String,
    pub status: String,
    pub labels: BTreeMap<String, String>,
}

/// Podman pods matching a label filter, read with the podman CLI (the tests' own
/// view of the truth, independent of BeeMesh).
pub fn podman_pods(label: &str) -> Vec<PodmanPod> {
    podman_list(&["pod", "ps"], label)
        .into_iter()
        .map(|p| PodmanPod {
            id: p["Id"].as_str().unwrap_or_default().to_string(),
            name: p["Name"].as_str().unwrap_or_default().to_string(),
            status: p["Status"].as_str().unwrap_or_default().to_string(),
            labels: p["Labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// Runs `f` on a thread inside the network namespace of process `pid` (setns moves
/// only the calling thread).
pub fn in_netns<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("the pod's netns");
        // SAFETY: setns on a valid namespace descriptor affects this thread only.
        let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the pod's netns")
}

/// Containers (not infra) of the pods matching a label, with their state.
pub fn podman_containers(label: &str) -> Vec<Value> {
    podman_list(&["ps", "-a"], label)
        .into_iter()
        .filter(|c| c["IsInfra"] != true)
        .collect()
}

/// `podman <command> --filter label=<label> --format json`, parsed.
fn podman_list(command: &[&str], label: &str) -> Vec<Value> {
    let filter = format!("label={label}");
    let out = Command::new("podman")
        .args(command)
        .args(["--filter", &filter, "--format", "json"])
        .output()
        .expect("podman runs");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

pub fn podman_logs(container: &str) -> String {
    let out = Command::new("podman")
        .args(["logs", container])
        .output()
        .expect("podman logs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A client CA and one certificate it signed, as PEM files in `dir`.
pub struct ClientCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn client_certs(dir: &Path, user: &str) -> ClientCerts {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test client CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, user);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:masters");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("cert");
    let certs = ClientCerts {
        ca: dir.join("client-ca.crt"),
        cert: dir.join("client.crt"),
        key: dir.join("client.key"),
    };
    std::fs::write(&certs.ca, ca.pem()).expect("write");
    std::fs::write(&certs.cert, cert.pem()).expect("write");
    std::fs::write(&certs.key, key.serialize_pem()).expect("write");
    certs
}

/// The Prometheus text a process serves on `addr`.
pub fn scrape(addr: &str) -> String {
    let mut command = Command::new("curl");
    command.args(["--max-time", "5", &format!("http://{addr}/metrics")]);
    let (code, body) = curl(command);
    assert_eq!(code, 200, "metrics of {addr}: {body}");
    body
}

/// A counter's value for one label set (0 when absent).
pub fn counter(text: &str, metric: &str, labels: &str) -> u64 {
    let needle = format!("{metric}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Resident memory of a process, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    memory_kib(pid, "VmRSS")
}

/// A memory figure of a process from `/proc/PID/status` (`VmRSS`, `RssAnon`, ...), in
/// KiB (0 once it is gone).
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `ip <args>`, which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A veth pair on the host, made by the test; removed when dropped.
pub struct HostNetwork(pub String);

impl HostNetwork {
    /// One whose first end holds `address` (a network the host reaches, or with a /32
    /// an address of the host's own).
    pub fn up(address: &str) -> HostNetwork {
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
        let name = format!("bmt{}x{made}", std::process::id() % 10_000);
        let peer = format!("{name}p");
        ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
        let network = HostNetwork(name.clone());
        ip(&["addr", "add", address, "dev", &name]);
        ip(&["link", "set", &name, "up"]);
        ip(&["link", "set", &peer, "up"]);
        network
    }

    /// One named `name` whose first end, with hardware address `mac`, is a port of
    /// `bridge`.
    pub fn bridge_port(bridge: &str, name: &str, mac: &str) -> HostNetwork {
        let peer = format!("{name}p");
        ip(&[
            "link", "add", name, "address", mac, "type", "veth", "peer", "name", &peer,
        ]);
        let port = HostNetwork(name.to_owned());
        ip(&["link", "set", name, "master", bridge]);
        port
    }
}

impl Drop for HostNetwork {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}

/// `GET /<path>` over HTTP/1.0 at `address`: the body's length and the time from
/// connecting to its last byte.
pub fn timed_get(address: std::net::SocketAddr, path: &str) -> (usize, Duration) {
    use std::io::{Read, Write};
    let started = std::time::Instant::now();
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .write_all(format!("GET /{path} HTTP/1.0\r\n\r\n").as_bytes())
        .expect("request");
    let mut buffer = vec![0; 256 * 1024];
    let (mut total, mut head) = (0, Vec::new());
    let mut body = None;
    loop {
        let n = stream.read(&mut buffer).expect("read");
        if n == 0 {
            break;
        }
        match body {
            Some(ref mut length) => *length += n,
            None => {
                head.extend_from_slice(&buffer[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    body = Some(head.len() - end - 4);
                }
            }
        }
        total += n;
    }
    assert!(total > 0, "no answer from {address}");
    (body.unwrap_or_default(), started.elapsed())
}

/// A benchmark's size from the environment (the suite runs the small default).
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Times, over each of `paths` (the first the floor), one `GET /bulk` of `mib` MiB and
/// the median of `runs` `GET /small`s, each on a new connection after one to warm up;
/// prints them as a Markdown table with the last path's ratio to the first.
pub fn compare_paths(paths: &[(&str, std::net::SocketAddr)], mib: usize, runs: usize) {
    let mut figures = Vec::new();
    for &(name, address) in paths {
        // Warm: the first connection over the mesh opens the agents' connection.
        timed_get(address, "small");
        let (bytes, took) = timed_get(address, "bulk");
        assert_eq!(bytes, mib << 20, "{name}");
        let mut latencies: Vec<Duration> =
            (0..runs).map(|_| timed_get(address, "small").1).collect();
        latencies.sort();
        figures.push((name, took, latencies[latencies.len() / 2]));
    }
    println!("| path | GET of {mib} MiB | throughput | small GET, median of {runs} (connect to last byte) |");
    println!("|---|---|---|---|");
    for (name, took, median) in &figures {
        println!(
            "| {name} | {:.2} s | {:.1} MiB/s | {:.2} ms |",
            took.as_secs_f64(),
            mib as f64 / took.as_secs_f64(),
            median.as_secs_f64() * 1000.0
        );
    }
    let (first, last) = (figures[0], figures[figures.len() - 1]);
    let ratio = first.1.as_secs_f64() / last.1.as_secs_f64();
    let added = last.2.as_secs_f64() - first.2.as_secs_f64();
    println!(
        "{} throughput / {}: {ratio:.2}x; added latency: {:.2} ms",
        last.0,
        first.0,
        added * 1000.0
    );
}
