//! A private image registry on loopback for the tests: Debian's `docker-registry`
//! (the distribution registry, installed by hack/install-registry.sh) with TLS and
//! htpasswd logins, holding the test image. Podman trusts its certificate through a
//! per-registry `certs.d` directory, the way a private registry's CA is given to it;
//! everything is removed when the registry is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, IMAGE};

pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    pub username: String,
    pub password: String,
    child: Child,
    certs_dir: PathBuf,
    _dir: tempfile::TempDir,
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Registry {
    /// Starts a registry that only `username`:`password` may read, holding the test
    /// image as `<host>/private/busybox:1.35`, which Podman does not have.
    pub fn start(username: &str, password: &str) -> Registry {
        for program in ["docker-registry", "htpasswd"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {program}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "{program} is missing: run `bash hack/install-registry.sh`"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let htpasswd = run("htpasswd", &["-Bbn", username, password]);
        std::fs::write(path("htpasswd"), htpasswd).expect("htpasswd");
        run(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                &path("key.pem"),
                "-out",
                &path("cert.pem"),
            ],
        );
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {data}}}}}\n\
             http:\n  addr: {host}\n  tls: {{certificate: {cert}, key: {key}}}\n\
             auth:\n  htpasswd: {{realm: beemesh-test, path: {htpasswd}}}\n",
            data = path("data"),
            cert = path("cert.pem"),
            key = path("key.pem"),
            htpasswd = path("htpasswd"),
        );
        std::fs::write(path("config.yml"), config).expect("config");
        let child = Command::new("docker-registry")
            .args(["serve", &path("config.yml")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(path("registry.log")).expect("log"))
            .spawn()
            .expect("docker-registry");
        let certs_dir = Path::new("/etc/containers/certs.d").join(&host);
        std::fs::create_dir_all(&certs_dir).expect("certs.d");
        std::fs::copy(path("cert.pem"), certs_dir.join("ca.crt")).expect("ca.crt");
        let registry = Registry {
            host,
            username: username.into(),
            password: password.into(),
            child,
            certs_dir,
            _dir: dir,
        };
        registry.wait_listening();
        let image = registry.image();
        run("podman", &["tag", IMAGE, &image]);
        let creds = format!("{username}:{password}");
        run("podman", &["push", "--quiet", "--creds", &creds, &image]);
        run("podman", &["rmi", &image]);
        registry
    }

    /// The test image in this registry.
    pub fn image(&self) -> String {
        format!("{}/private/busybox:1.35", self.host)
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&self.host).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.certs_dir);
        let _ = Command::new("podman")
            .args(["rmi", "--force", &self.image()])
            .output();
    }
}
