//! The Podman runtime against the machine's real Podman (hack/install-podman.sh) and
//! the local test image (hack/build-test-image.sh).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use beemesh::runtime::dns::ResolvConf;
use beemesh::runtime::podman::Podman;
use beemesh::runtime::{
    labels, ContainerEvent, ContainerPlan, ContainerStatus, Interactive, MemoryVolume, Mount,
    Output, PodNetwork, PodPlan, PortMapping, Protocol, PullPolicy, Runtime, RuntimeError, Streams,
    TerminalSize, TerminationMessage,
};
use beemesh::wire::{Epoch, PodUid, RegistryCredential};
use common::{free_port, ip, require_podman, HostNetwork, IMAGE};

const LABEL: &str = "io.beemesh.test";

/// A Podman pod for one test, removed (with its containers) when dropped.
struct TestPod {
    runtime: Podman,
    id: String,
    name: String,
    /// For the containers' termination message files.
    dir: tempfile::TempDir,
}

impl Drop for TestPod {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman")
            .args(["pod", "rm", "-f", "-t", "0", &self.id])
            .output();
        let _ = std::process::Command::new("podman")
            .args(["volume", "prune", "-f", "--filter"])
            .arg(format!("label={LABEL}={}", self.name))
            .output();
    }
}

fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("rt-{test}-{}-{nanos}", std::process::id())
}

async fn pod(test: &str, ports: Vec<PortMapping>) -> TestPod {
    pod_with(test, |plan| plan.ports = ports).await
}

async fn pod_with(test: &str, change: impl FnOnce(&mut PodPlan)) -> TestPod {
    require_podman();
    let runtime = Podman::new(&format!("unix://{}", common::SOCKET)).expect("client");
    let name = unique(test);
    let mut plan = PodPlan {
        name: name.clone(),
        hostname: "testhost".into(),
        labels: BTreeMap::from([(LABEL.to_string(), name.clone())]),
        ports: Vec::new(),
        dns: None,
        dns_warnings: Vec::new(),
        host_aliases: Vec::new(),
        memory_volumes: Vec::new(),
        network: None,
    };
    change(&mut plan);
    let id = runtime.create_pod(&plan).await.expect("pod created");
    runtime
        .start_pod(&id, plan.network.as_ref())
        .await
        .expect("pod started");
    let dir = tempfile::tempdir().expect("tempdir");
    TestPod {
        runtime,
        id,
        name,
        dir,
    }
}

fn plan(pod: &TestPod, name: &str, command: &[&str]) -> ContainerPlan {
    ContainerPlan {
        name: format!("{}_{name}", pod.name),
        image: IMAGE.into(),
        pull_policy: PullPolicy::IfNotPresent,
        command: Some(command.iter().map(|s| s.to_string()).collect()),
        args: None,
        env: vec![],
        working_dir: None,
        memory_limit_bytes: None,
        cpu_limit_millis: None,
        mounts: vec![],
        termination_message: TerminationMessage {
            host_file: {
                let file = pod.dir.path().join(name);
                std::fs::write(&file, "").expect("termination message file");
                file
            },
            container_path: "/dev/termination-log".into(),
        },
        labels: BTreeMap::from([(LABEL.to_string(), pod.name.clone())]),
        tty: false,
        stdin: false,
        stdin_once: false,
        user: None,
        privileged: false,
        read_only_root_fs: false,
        no_new_privileges: false,
        cap_add: vec![],
        cap_drop: vec![],
        supplemental_groups: vec![],
        sysctls: BTreeMap::new(),
        stop_timeout_secs: 1,
        pid_namespace_of: None,
    }
}

async fn start(pod: &TestPod, plan: &ContainerPlan) -> String {
    let id = pod
        .runtime
        .create_container(&pod.id, plan)
        .await
        .expect("container created");
    pod.runtime.start_container(&id).await.expect("started");
    id
}

async fn wait_exit(pod: &TestPod, id: &str) -> beemesh::runtime::ContainerState {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = pod.runtime.container_state(id).await.expect("state");
        if state.status == ContainerStatus::Exited {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "container did not exit: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn logs(id: &str) -> String {
    let out = std::process::Command::new("podman")
        .args(["logs", id])
        .output()
        .expect("podman logs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn command_args_env_and_working_dir_and_the_exit_code() {
    let pod = pod("run", vec![]).await;
    let mut p = plan(&pod, "main", &["sh", "-c"]);
    p.args = Some(vec!["echo \"$GREETING from $(pwd)\"; exit 7".into()]);
    p.env = vec![("GREETING".into(), "hello".into())];
    // Missing, as a working directory may be: created, as by the kubelet's runtimes.
    p.working_dir = Some("/tmp/made/for/us".into());
    let id = start(&pod, &p).await;
    let state = wait_exit(&pod, &id).await;
    assert_eq!(state.exit_code, Some(7));
    assert!(state.status == ContainerStatus::Exited);
    let (started, finished) = (
        state.started_at.expect("started"),
        state.finished_at.expect("finished"),
    );
    // Podman writes the two times from different processes; an instant exit can be
    // stamped a hair before its start.
    assert!(
        finished.as_second() + 1 >= started.as_second(),
        "{started} .. {finished}"
    );
    assert_eq!(logs(&id).trim(), "hello from /tmp/made/for/us");
}

#[tokio::test]
async fn the_pods_resolver_configuration_and_host_aliases_are_what_its_containers_read() {
    let pod = pod_with("dns", |plan| {
        plan.dns = Some(ResolvConf {
            nameservers: vec!["192.0.2.53".into()],
            searches: Vec::new(),
            options: Vec::new(),
        });
        plan.host_aliases = vec![
            ("db.internal".into(), [192, 0, 2, 10].into()),
            ("cache.internal".into(), [192, 0, 2, 10].into()),
        ];
    })
    .await;
    let mut p = plan(&pod, "main", &["sh", "-c"]);
    p.args = Some(vec!["cat /etc/resolv.conf /etc/hosts".into()]);
    let id = start(&pod, &p).await;
    wait_exit(&pod, &id).await;
    let files = logs(&id);
    let resolv: Vec<&str> = files
        .lines()
        .filter(|l| l.starts_with("nameserver") || l.starts_with("search"))
        .collect();
    // Only the pod's server, and none of the host's search paths.
    assert_eq!(resolv, ["nameserver 192.0.2.53"], "{files}");
    let options: Vec<&str> = files.lines().filter(|l| l.starts_with("options")).collect();
    assert!(
        options.iter().all(|l| l.trim() == "options ndots:1"),
        "{files}"
    );
    for name in ["db.internal", "cache.internal"] {
        assert!(
            files
                .lines()
                .any(|l| l.starts_with("192.0.2.10") && l.split_whitespace().any(|w| w == name)),
            "{name} not in /etc/hosts:\n{files}"
        );
    }
}

#[tokio::test]
async fn a_containers_sysctls_are_set_in_the_pods_namespaces() {
    let pod = pod("sysctl", vec![]).await;
    let mut p = plan(&pod, "main", &["sh", "-c"]);
    p.args = Some(vec![
        "cat /proc/sys/net/ipv4/ip_local_port_range /proc/sys/kernel/shm_rmid_forced".into(),
    ]);
    p.sysctls = BTreeMap::from([
        (
            "net.ipv4.ip_local_port_range".to_owned(),
            "2000\t60000".to_owned(),
        ),
        ("kernel.shm_rmid_forced".to_owned(), "1".to_owned()),
    ]);
    let id = start(&pod, &p).await;
    wait_exit(&pod, &id).await;
    let values: Vec<String> = logs(&id)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(values, ["2000 60000", "1"]);
}

#[tokio::test]
async fn the_image_user_is_what_its_configuration_says() {
    require_podman();
    let runtime = Podman::new(&format!("unix://{}", common::SOCKET)).expect("client");
    // The test image sets no user: root.
    assert_eq!(runtime.image_user(IMAGE).await.expect("inspect"), "");
    assert!(matches!(
        runtime.image_user("localhost/no-such-image:1").await,
        Err(RuntimeError::NotFound(_))
    ));
}

#[tokio::test]
async fn args_alone_keep_the_image_entrypoint_and_a_command_alone_drops_its_cmd() {
    let pod = pod("entry", vec![]).await;
    // The image's CMD is /bin/sh; args replace it.
    let mut p = plan(&pod, "args", &[]);
    p.command = None;
    p.args = Some(vec!["echo".into(), "args-only".into()]);
    let id = start(&pod, &p).await;
    wait_exit(&pod, &id).await;
    assert_eq!(logs(&id).trim(), "args-only");
}

#[tokio::test]
async fn stopping_honours_the_grace_period_and_sigterm_reaches_pid_1() {
    let pod = pod("stop", vec![]).await;
    let id = start(&pod, &plan(&pod, "sleeper", &["sleep", "1000"])).await;
    let began = Instant::now();
    pod.runtime
        .stop_container(&id, Duration::from_secs(5))
        .await
        .expect("stopped");
    // sleep ignores SIGTERM as PID 1; the init process makes it stop at once.
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "took {:?}",
        began.elapsed()
    );
    let state = pod.runtime.container_state(&id).await.expect("state");
    assert_eq!(state.status, ContainerStatus::Exited);
    // A trap that ignores SIGTERM is SIGKILLed after the grace period.
    let stubborn = start(
        &pod,
        &plan(
            &pod,
            "stubborn",
            &["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = Instant::now();
    pod.runtime
        .stop_container(&stubborn, Duration::from_secs(1))
        .await
        .expect("killed");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "took {took:?}"
    );
    // Stopping what already stopped is fine.
    pod.runtime
        .stop_container(&id, Duration::from_secs(1))
        .await
        .expect("idempotent");
}

#[tokio::test]
async fn a_paused_container_is_frozen_until_unpaused() {
    // The agent pauses the containers that could change a volume while another
    // container's subPath of it is mounted.
    let pod = pod("pause", vec![]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut counter = plan(
        &pod,
        "counter",
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /out/n; sleep 0.05; done",
        ],
    );
    counter.mounts = vec![Mount {
        volume: "out".into(),
        volume_dir: dir.path().to_path_buf(),
        sub_path: None,
        container_path: "/out".into(),
        read_only: false,
    }];
    let id = start(&pod, &counter).await;
    let count = || std::fs::read_to_string(dir.path().join("n")).unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!count().is_empty());

    pod.runtime.pause_container(&id).await.expect("paused");
    let state = pod.runtime.container_state(&id).await.expect("state");
    assert_eq!(state.status, ContainerStatus::Paused);
    let frozen = count();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(), frozen, "it wrote while paused");

    pod.runtime.unpause_container(&id).await.expect("unpaused");
    let state = pod.runtime.container_state(&id).await.expect("state");
    assert_eq!(state.status, ContainerStatus::Running);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(count(), frozen, "it runs again");

    // Pausing one that does not run is an error, not a panic.
    let done = start(&pod, &plan(&pod, "done", &["true"])).await;
    wait_exit(&pod, &done).await;
    assert!(pod.runtime.pause_container(&done).await.is_err());
}

#[tokio::test]
async fn exec_returns_output_and_exit_code() {
    let pod = pod("exec", vec![]).await;
    let id = start(&pod, &plan(&pod, "main", &["sleep", "1000"])).await;
    let cmd = ["sh", "-c", "echo hi; echo err >&2; exit 3"].map(String::from);
    let out = pod
        .runtime
        .exec(&id, &cmd, Duration::from_secs(10))
        .await
        .expect("exec");
    assert_eq!(out.exit_code, 3);
    let text = String::from_utf8_lossy(&out.output);
    assert!(text.contains("hi") && text.contains("err"), "{text}");
    // Output is capped: a chatty command cannot grow the agent's memory.
    let chatty = ["sh", "-c", "yes | head -c 1000000"].map(String::from);
    let out = pod
        .runtime
        .exec(&id, &chatty, Duration::from_secs(20))
        .await
        .expect("exec");
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.output.len(), 64 * 1024);
    let slow = ["sleep", "5"].map(String::from);
    assert!(pod
        .runtime
        .exec(&id, &slow, Duration::from_millis(300))
        .await
        .is_err());
}

#[tokio::test]
async fn an_interactive_exec_takes_stdin_and_terminal_resizes_and_tells_its_exit_code() {
    use futures::{AsyncWriteExt, StreamExt};
    let pod = pod("interactive", vec![]).await;
    let id = start(&pod, &plan(&pod, "main", &["sleep", "1000"])).await;
    let read_all = |mut session: Interactive| async move {
        let mut text = Vec::new();
        while let Some(Ok(chunk)) = session.output.next().await {
            match chunk {
                Output::Stdout(bytes) | Output::Stderr(bytes) => text.extend(bytes),
            }
        }
        (String::from_utf8_lossy(&text).into_owned(), session.control)
    };

    // A terminal resized before the command looks at it.
    let streams = Streams {
        stdin: true,
        stdout: true,
        stderr: false,
        tty: true,
    };
    let cmd = ["sh", "-c", "sleep 1; stty size"].map(String::from);
    let session = pod
        .runtime
        .exec_interactive(&id, &cmd, streams, None)
        .await
        .expect("exec");
    session.control.resize(123, 45).await.expect("resize");
    let (text, _) = read_all(session).await;
    assert!(text.contains("45 123"), "{text:?}");

    // A terminal of a given size from the start: the command reads it at once.
    let cmd = ["stty", "size"].map(String::from);
    let size = TerminalSize {
        width: 80,
        height: 24,
    };
    let session = pod
        .runtime
        .exec_interactive(&id, &cmd, streams, Some(size))
        .await
        .expect("exec");
    let (text, _) = read_all(session).await;
    assert!(text.contains("24 80"), "{text:?}");

    // stdin to the command, its end as EOF, and the exit code.
    let streams = Streams {
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let cmd = ["sh", "-c", "cat; exit 7"].map(String::from);
    let mut session = pod
        .runtime
        .exec_interactive(&id, &cmd, streams, None)
        .await
        .expect("exec");
    session
        .stdin
        .write_all(b"echoed back\n")
        .await
        .expect("stdin");
    session.stdin.close().await.expect("close stdin");
    let (text, control) = read_all(session).await;
    assert_eq!(text, "echoed back\n");
    let mut code = None;
    for _ in 0..50 {
        code = control.exit_code().await.expect("inspect");
        if code.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, Some(7));
}

#[tokio::test]
async fn images_follow_the_pull_policy() {
    require_podman();
    let runtime = Podman::new("unix:///run/podman/podman.sock").expect("client");
    for policy in [PullPolicy::IfNotPresent, PullPolicy::Never] {
        runtime
            .ensure_image(IMAGE, policy, &[])
            .await
            .expect("present image");
    }
    let absent = "localhost/does-not-exist:1";
    for policy in [PullPolicy::IfNotPresent, PullPolicy::Always] {
        match runtime.ensure_image(absent, policy, &[]).await {
            Err(RuntimeError::ImagePull(m)) => assert!(m.contains(absent), "{m}"),
            other => panic!("expected ImagePull, got {other:?}"),
        }
    }
    // A reference podman-api would put unescaped into a URL path: refused, no panic.
    for bad in ["foo bar", "x\ny", "a%20b", ""] {
        assert!(
            matches!(
                runtime
                    .ensure_image(bad, PullPolicy::IfNotPresent, &[])
                    .await,
                Err(RuntimeError::Invalid(_))
            ),
            "{bad:?}"
        );
    }
    match runtime.ensure_image(absent, PullPolicy::Never, &[]).await {
        Err(RuntimeError::ImageNeverPull(m)) => assert!(m.contains("pull policy of Never"), "{m}"),
        other => panic!("expected ImageNeverPull, got {other:?}"),
    }
    // Always pulls even a present image, and no registry answers here.
    assert!(matches!(
        runtime.ensure_image(IMAGE, PullPolicy::Always, &[]).await,
        Err(RuntimeError::ImagePull(_))
    ));
}

/// Credentials are tried in order until one pull succeeds, as the kubelet tries its
/// keyring's matches; when all fail, the error names each failure.
#[tokio::test]
async fn a_private_image_is_pulled_with_the_first_login_that_works() {
    require_podman();
    let registry = common::registry::Registry::start("bob", "right-password");
    let image = registry.image();
    let runtime = Podman::new("unix:///run/podman/podman.sock").expect("client");
    let login = |password: &str| RegistryCredential {
        registry: registry.host.clone(),
        username: "bob".into(),
        password: password.into(),
    };
    match runtime
        .ensure_image(&image, PullPolicy::IfNotPresent, &[])
        .await
    {
        Err(RuntimeError::ImagePull(m)) => {
            assert!(m.contains("authentication required"), "{m}")
        }
        other => panic!("expected ImagePull, got {other:?}"),
    }
    match runtime
        .ensure_image(
            &image,
            PullPolicy::IfNotPresent,
            &[login("wrong-1"), login("wrong-2")],
        )
        .await
    {
        Err(RuntimeError::ImagePull(m)) => assert!(
            m.starts_with(&format!("Failed to pull image \"{image}\": ["))
                && m.matches("unauthorized").count() == 2,
            "{m}"
        ),
        other => panic!("expected ImagePull, got {other:?}"),
    }
    runtime
        .ensure_image(
            &image,
            PullPolicy::IfNotPresent,
            &[login("wrong"), login("right-password")],
        )
        .await
        .expect("the second login pulls");
    assert!(std::process::Command::new("podman")
        .args(["image", "exists", &image])
        .status()
        .is_ok_and(|s| s.success()));
}

/// A memory volume is a tmpfs of its size, which outlives the containers that use it
/// (the pod's infra container holds it mounted: an emptyDir keeps its data across
/// container restarts) and goes with the pod.
#[tokio::test]
async fn a_memory_volume_is_a_sized_tmpfs_that_lives_as_long_as_its_pod() {
    let volume = unique("memory-volume");
    let pod = pod_with("memory", |plan| {
        plan.memory_volumes = vec![MemoryVolume {
            name: "cache".into(),
            volume: volume.clone(),
            size_bytes: Some(4 << 20),
            group: Some(2000),
        }]
    })
    .await;
    let dir = pod.runtime.volume_dir(&volume).await.expect("the volume");
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    let mount = mounts
        .lines()
        .find(|line| line.split_whitespace().nth(1) == dir.to_str())
        .unwrap_or_else(|| panic!("{} is not mounted", dir.display()));
    assert!(
        mount.starts_with("tmpfs ") && mount.contains("size=4096k"),
        "{mount}"
    );
    // The fsGroup's, setgid, as the kubelet leaves an emptyDir's root.
    let root = std::fs::metadata(&dir).expect("root");
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::mode(&root) & 0o7777,
            std::os::unix::fs::MetadataExt::gid(&root)
        ),
        (0o2777, 2000)
    );
    let cache = Mount {
        volume: "cache".into(),
        volume_dir: dir.clone(),
        sub_path: None,
        container_path: "/cache".into(),
        read_only: false,
    };
    let mut writer = plan(
        &pod,
        "writer",
        &[
            "sh",
            "-c",
            "echo kept > /cache/kept; dd if=/dev/zero of=/cache/big bs=1M count=8",
        ],
    );
    writer.mounts = vec![cache.clone()];
    let id = start(&pod, &writer).await;
    let ended = wait_exit(&pod, &id).await;
    assert_ne!(ended.exit_code, Some(0), "8 MiB fit in a 4 MiB volume");
    let mut reader = plan(&pod, "reader", &["cat", "/cache/kept"]);
    reader.mounts = vec![cache];
    let id = start(&pod, &reader).await;
    wait_exit(&pod, &id).await;
    assert_eq!(logs(&id).trim(), "kept", "the data outlived its writer");
    pod.runtime.remove_pod(&pod.id).await.expect("removed");
    assert!(matches!(
        pod.runtime.volume_dir(&volume).await,
        Err(RuntimeError::NotFound(_))
    ));
}

#[tokio::test]
async fn host_ports_pod_ip_mounts_limits_listing_and_removal() {
    let port = free_port();
    let pod = pod(
        "net",
        vec![PortMapping {
            container_port: 8080,
            host_port: port,
            host_ip: None,
            protocol: Protocol::Tcp,
        }],
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("index.html"), "served by httpd").expect("write");
    let mut web = plan(&pod, "web", &["httpd", "-f", "-p", "8080", "-h", "/www"]);
    web.mounts = vec![Mount {
        volume: "www".into(),
        volume_dir: PathBuf::from(dir.path()),
        sub_path: None,
        container_path: "/www".into(),
        read_only: true,
    }];
    web.memory_limit_bytes = Some(64 << 20);
    web.cpu_limit_millis = Some(250);
    let web_id = start(&pod, &web).await;
    let done_id = start(&pod, &plan(&pod, "done", &["true"])).await;
    wait_exit(&pod, &done_id).await;

    let ip = pod.runtime.pod_ip(&pod.id).await.expect("inspect");
    assert!(ip.is_some_and(|ip| !ip.is_loopback()), "{ip:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "1",
                &format!("http://127.0.0.1:{port}/"),
            ])
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        if body.contains("served") || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body, "served by httpd");

    let limit = pod
        .runtime
        .exec(
            &web_id,
            &["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"].map(String::from),
            Duration::from_secs(10),
        )
        .await
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&limit.output).trim(),
        (64u64 << 20).to_string()
    );
    let readonly = pod
        .runtime
        .exec(
            &web_id,
            &["sh", "-c", "echo x > /www/new"].map(String::from),
            Duration::from_secs(10),
        )
        .await
        .expect("exec");
    assert_ne!(readonly.exit_code, 0, "read-only mount was writable");

    let found = pod.runtime.list_pods(LABEL, &pod.name).await.expect("list");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, pod.id);
    let mut states: Vec<_> = found[0]
        .containers
        .iter()
        .map(|c| (c.name.clone(), c.state.status, c.labels.get(LABEL).cloned()))
        .collect();
    states.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        states,
        vec![
            (
                format!("{}_done", pod.name),
                ContainerStatus::Exited,
                Some(pod.name.clone())
            ),
            (
                format!("{}_web", pod.name),
                ContainerStatus::Running,
                Some(pod.name.clone())
            ),
        ]
    );

    // One running and one exited container: removal takes both and the pod.
    pod.runtime.remove_pod(&pod.id).await.expect("removed");
    assert!(pod
        .runtime
        .list_pods(LABEL, &pod.name)
        .await
        .expect("list")
        .is_empty());
    assert!(matches!(
        pod.runtime.remove_pod(&pod.id).await,
        Err(RuntimeError::NotFound(_))
    ));
}

#[tokio::test]
async fn bad_input_is_an_error_not_a_panic() {
    let pod = pod("bad", vec![]).await;
    let mut p = plan(&pod, "bad", &["true"]);
    p.image = "Not A Valid Reference!!".into();
    // Podman answers 500 here; its cause marks it as the request's fault.
    assert!(matches!(
        pod.runtime.create_container(&pod.id, &p).await,
        Err(RuntimeError::Invalid(_))
    ));
    assert!(matches!(
        pod.runtime.container_state("no-such-container").await,
        Err(RuntimeError::NotFound(_))
    ));
    let missing = plan(&pod, "missing-binary", &["/no/such/binary"]);
    let id = pod
        .runtime
        .create_container(&pod.id, &missing)
        .await
        .expect("created");
    // Either the start fails or, with the init process as PID 1, the container exits
    // at once with an error: it never counts as running.
    if pod.runtime.start_container(&id).await.is_ok() {
        let state = wait_exit(&pod, &id).await;
        assert_ne!(state.exit_code, Some(0), "{state:?}");
    }
    for uri in ["", "ftp://x", "unix:"] {
        assert!(
            matches!(Podman::new(uri), Err(RuntimeError::Invalid(_))),
            "{uri}"
        );
    }
    let unreachable = Podman::new("unix:///nonexistent/podman.sock").expect("client");
    assert!(matches!(
        unreachable.ping().await,
        Err(RuntimeError::Unavailable(_))
    ));
}

#[tokio::test]
async fn container_events_say_which_pod_copy_changed_as_it_happens() {
    let pod = pod("events", vec![]).await;
    let agent = unique("agent");
    let mut events = pod
        .runtime
        .container_events(&agent)
        .await
        .expect("subscribed");
    let labelled = |name: &str, epoch: &str, command: &[&str]| {
        let mut plan = plan(&pod, name, command);
        plan.labels.extend([
            (labels::AGENT.to_string(), agent.clone()),
            (labels::POD_UID.to_string(), pod.name.clone()),
            (labels::EPOCH.to_string(), epoch.to_string()),
        ]);
        plan
    };
    // Another agent's container says nothing to this one.
    let mut stranger = plan(&pod, "stranger", &["true"]);
    stranger
        .labels
        .insert(labels::AGENT.to_string(), unique("other-agent"));
    start(&pod, &stranger).await;
    let id = start(&pod, &labelled("main", "7", &["sh", "-c", "sleep 1"])).await;
    let expected = ContainerEvent {
        pod: PodUid(pod.name.clone()),
        epoch: Epoch(7),
    };
    // Its start, then its death a second later.
    let started = Instant::now();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event within 10 s")
            .expect("stream open");
        assert_eq!(event, expected);
        seen.push(started.elapsed());
    }
    assert_eq!(wait_exit(&pod, &id).await.status, ContainerStatus::Exited);
    assert!(seen[1] >= Duration::from_millis(900), "{seen:?}");
}

/// Removes a Podman network when dropped.
struct TestNetwork(String);

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman")
            .args(["network", "rm", "-f", &self.0])
            .output();
    }
}

#[tokio::test]
async fn pods_of_one_subnet_share_the_network_made_for_it_and_a_namesake_elsewhere_is_refused() {
    let subnet: ipnet::Ipv4Net = "10.79.250.0/24".parse().expect("cidr");
    let network = PodNetwork::on(subnet);
    assert_eq!(network.name, "beemesh-10.79.250.0-24");
    let _cleanup = TestNetwork(network.name.clone());
    // Two pods at once: one makes the network, the other finds it made (two agents on
    // one Podman given the same subnet by their owners).
    let on_subnet = |plan: &mut PodPlan| plan.network = Some(PodNetwork::on(subnet));
    let (first, second) = tokio::join!(
        pod_with("subnet-a", on_subnet),
        pod_with("subnet-b", on_subnet)
    );
    let mut ips = Vec::new();
    let mut macs = Vec::new();
    for pod in [&first, &second] {
        let address = pod.runtime.pod_address(&pod.id).await.expect("inspect");
        let Some(std::net::IpAddr::V4(ip)) = address.map(|a| a.ip) else {
            panic!("no IPv4 address: {address:?}");
        };
        // Each pod's own hardware address, which the agent's redirects match.
        macs.push(address.and_then(|a| a.mac).expect("a MAC address"));
        assert!(subnet.contains(&ip), "{ip} outside {subnet}");
        assert_ne!(ip, network.gateway, "the gateway address is the bridge's");
        ips.push(ip);
    }
    assert_ne!(ips[0], ips[1]);
    assert_ne!(macs[0], macs[1]);
    // The host reaches the pods on the bridge (the agent dials them there).
    start(&first, &plan(&first, "web", &["httpd", "-f", "-p", "8080"])).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&(ips[0], 8080).into(), Duration::from_secs(1))
        .is_err()
    {
        assert!(Instant::now() < deadline, "{}:8080 unreachable", ips[0]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A network of that name on another subnet is not silently used.
    let other: ipnet::Ipv4Net = "10.79.251.0/24".parse().expect("cidr");
    let squatter = PodNetwork::on(other);
    let _cleanup_squatter = TestNetwork(squatter.name.clone());
    let made = std::process::Command::new("podman")
        .args([
            "network",
            "create",
            "--subnet",
            "10.79.252.0/24",
            &squatter.name,
        ])
        .output()
        .expect("podman network create");
    assert!(made.status.success(), "{made:?}");
    let runtime = Podman::new(&format!("unix://{}", common::SOCKET)).expect("client");
    let plan = PodPlan {
        name: unique("squatted"),
        hostname: "testhost".into(),
        labels: BTreeMap::new(),
        ports: Vec::new(),
        dns: None,
        dns_warnings: Vec::new(),
        host_aliases: Vec::new(),
        memory_volumes: Vec::new(),
        network: Some(squatter),
    };
    match runtime.create_pod(&plan).await {
        Err(RuntimeError::Invalid(message)) => assert_eq!(
            message,
            "Podman network beemesh-10.79.251.0-24 exists with subnets [10.79.252.0/24], not 10.79.251.0/24"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop((first, second));
}

#[tokio::test]
async fn a_pod_network_removed_behind_the_agents_back_is_made_again_for_the_next_pod() {
    let subnet: ipnet::Ipv4Net = "10.79.248.0/24".parse().expect("cidr");
    let network = PodNetwork::on(subnet);
    let _cleanup = TestNetwork(network.name.clone());
    let first = pod_with("pruned-a", |plan| plan.network = Some(network.clone())).await;
    let runtime = Podman::new(&format!("unix://{}", common::SOCKET)).expect("client");
    let on_network = |name: &str| PodPlan {
        name: unique(name),
        hostname: "testhost".into(),
        labels: BTreeMap::from([(LABEL.to_string(), name.to_owned())]),
        ports: Vec::new(),
        dns: None,
        dns_warnings: Vec::new(),
        host_aliases: Vec::new(),
        memory_volumes: Vec::new(),
        network: Some(network.clone()),
    };
    // This runtime has seen the network (and remembers its bridge); then its last pod
    // goes and `podman network prune` (or rm) takes it.
    let second = runtime
        .create_pod(&on_network("pruned-b"))
        .await
        .expect("pod created");
    runtime.remove_pod(&second).await.expect("removed");
    drop(first);
    let removed = std::process::Command::new("podman")
        .args(["network", "rm", &network.name])
        .output()
        .expect("podman network rm");
    assert!(removed.status.success(), "{removed:?}");
    // The next pod gets it back, at the first try.
    let third = runtime
        .create_pod(&on_network("pruned-c"))
        .await
        .expect("pod created on the network made again");
    runtime
        .start_pod(&third, Some(&network))
        .await
        .expect("pod started");
    let address = runtime.pod_address(&third).await.expect("inspect");
    let ip = address.map(|a| a.ip).expect("an address");
    assert!(
        matches!(ip, std::net::IpAddr::V4(v4) if subnet.contains(&v4)),
        "{ip} outside {subnet}"
    );
    runtime.remove_pod(&third).await.expect("removed");
}

fn link_address(interface: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))
        .expect("the interface's address")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_pod_networks_bridge_keeps_its_mac_address_when_a_lower_one_joins() {
    let tag = std::process::id() % 100_000;
    // What the kernel does to a bridge whose address was never set: it takes the
    // lowest of its ports' addresses, so a new port can move it.
    let plain = format!("bmbr{tag}");
    ip(&["link", "add", &plain, "type", "bridge"]);
    let _plain = HostNetwork(plain.clone());
    let _high = HostNetwork::bridge_port(&plain, &format!("bmhi{tag}"), "02:00:00:00:00:50");
    assert_eq!(link_address(&plain), "02:00:00:00:00:50");
    let _low = HostNetwork::bridge_port(&plain, &format!("bmlo{tag}"), "02:00:00:00:00:01");
    assert_eq!(
        link_address(&plain),
        "02:00:00:00:00:01",
        "the kernel moved it"
    );

    // A pod network's bridge is fixed when its first pod starts.
    let subnet: ipnet::Ipv4Net = "10.79.249.0/24".parse().expect("cidr");
    let network = PodNetwork::on(subnet);
    let _cleanup = TestNetwork(network.name.clone());
    let pod = pod_with("bridge", |plan| plan.network = Some(network.clone())).await;
    let inspected = std::process::Command::new("podman")
        .args([
            "network",
            "inspect",
            "--format",
            "{{.NetworkInterface}}",
            &network.name,
        ])
        .output()
        .expect("podman network inspect");
    let bridge = String::from_utf8_lossy(&inspected.stdout).trim().to_owned();
    let assigned = std::fs::read_to_string(format!("/sys/class/net/{bridge}/addr_assign_type"))
        .expect("the bridge exists");
    assert_eq!(assigned.trim(), "3", "set (NET_ADDR_SET), not inherited");
    let fixed = link_address(&bridge);
    // Another pod's port, with an address lower than the first's, joins. (A frame to
    // a pod's own port's address is taken as the bridge's; to another's it is not.)
    let _other = HostNetwork::bridge_port(&bridge, &format!("bmlq{tag}"), "02:00:00:00:00:02");
    assert_eq!(link_address(&bridge), fixed);
    // The pod reaches its gateway, and so has its address in its ARP cache.
    let listener = std::net::TcpListener::bind((network.gateway, 0)).expect("listen");
    let port = listener.local_addr().expect("address").port();
    // Each connection closed once accepted, so that the pod's nc ends.
    std::thread::spawn(move || for _ in listener.incoming() {});
    let id = start(&pod, &plan(&pod, "main", &["sleep", "1000"])).await;
    let dial = [
        "sh".to_owned(),
        "-c".to_owned(),
        format!("echo hi | nc -w 2 {} {port}", network.gateway),
    ];
    let reaches_gateway = async |what: &str| {
        let out = pod
            .runtime
            .exec(&id, &dial, Duration::from_secs(10))
            .await
            .expect("exec");
        assert_eq!(
            out.exit_code,
            0,
            "{what}: {}",
            String::from_utf8_lossy(&out.output)
        );
    };
    reaches_gateway("before").await;

    // A port with a still lower address joins: the gateway's address stays, and the
    // pod reaches it at once (had it moved: 25 s of lost packets).
    let _lowest = HostNetwork::bridge_port(&bridge, &format!("bmlp{tag}"), "02:00:00:00:00:01");
    assert_eq!(link_address(&bridge), fixed);
    reaches_gateway("after").await;
}
