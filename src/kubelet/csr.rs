//! The node's certificates, signed by the cluster through CertificateSigningRequests
//! (CN system:node:<name>, O system:nodes; the private key made here and never sent),
//! kept in the state directory and renewed before they expire:
//! - the kubelet API's serving certificate (signer kubernetes.io/kubelet-serving, the
//!   node's addresses and name), approved by the node itself (its ClusterRole may approve
//!   only that signer). API servers verify kubelets against the cluster CA, so a
//!   self-signed certificate would make every `kubectl logs` fail;
//! - the k3s tunnel's client certificate (signer
//!   kubernetes.io/kube-apiserver-client-kubelet), approved by the controller-manager's
//!   CSR approver when the requester may create `certificatesigningrequests/nodeclient`,
//!   as for a kubelet; the node approves it itself only if that has not happened within
//!   [`APPROVER_WAIT`] and it holds the permission to.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::Client;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// How long the cluster's approver gets before the node tries to approve its client
/// certificate itself.
pub const APPROVER_WAIT: Duration = Duration::from_secs(10);
/// How often the CSR is checked for its certificate.
const POLL: Duration = Duration::from_secs(1);
/// Renewal starts when this share of the validity is left, as the kubelet's
/// certificate manager does (70-90 % through; a fixed 80 % here).
const RENEW_AT: f64 = 0.8;

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("cannot make the certificate request")]
    Generate(#[from] rcgen::Error),
    #[error("Kubernetes API request failed")]
    Api(#[from] kube::Error),
    #[error("the CSR {0} was denied or failed: {1}")]
    Refused(String, String),
    #[error("the signed certificate is unusable: {0}")]
    Unusable(String),
    #[error("cannot keep the certificate in {path}")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Which certificate, for which node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    pub node_name: String,
    pub kind: CertKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertKind {
    /// The kubelet API's serving certificate, for these addresses and the node's name.
    Serving { addresses: Vec<IpAddr> },
    /// A client certificate for the API server (the k3s tunnel's identity).
    Client,
}

impl CertSpec {
    fn signer(&self) -> &'static str {
        match self.kind {
            CertKind::Serving { .. } => SERVING_SIGNER,
            CertKind::Client => CLIENT_SIGNER,
        }
    }

    /// What the kubelet asks for: exactly one of the sets the approver accepts.
    fn usages(&self) -> Vec<String> {
        let last = match self.kind {
            CertKind::Serving { .. } => "server auth",
            CertKind::Client => "client auth",
        };
        ["digital signature", "key encipherment", last]
            .into_iter()
            .map(String::from)
            .collect()
    }

    fn what(&self) -> &'static str {
        match self.kind {
            CertKind::Serving { .. } => "kubelet serving certificate",
            CertKind::Client => "tunnel client certificate",
        }
    }

    fn paths(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let stem = match self.kind {
            CertKind::Serving { .. } => "serving",
            CertKind::Client => "client",
        };
        (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        )
    }

    fn params(&self) -> Result<rcgen::CertificateParams, rcgen::Error> {
        let mut params = match &self.kind {
            CertKind::Serving { addresses } => {
                let mut params = rcgen::CertificateParams::new(vec![self.node_name.clone()])?;
                params
                    .subject_alt_names
                    .extend(addresses.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
                params
            }
            // A node client certificate has no subject alternative names at all.
            CertKind::Client => rcgen::CertificateParams::new(Vec::<String>::new())?,
        };
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("system:node:{}", self.node_name),
        );
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        Ok(params)
    }
}

/// A certificate that can be replaced while it is in use: the serving certificate of
/// the kubelet API, or the client certificate of new tunnel sessions.
#[derive(Debug)]
pub struct CertSlot {
    current: Mutex<Arc<CertifiedKey>>,
}

impl CertSlot {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(CertSlot {
            current: Mutex::new(key),
        })
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        if let Ok(mut current) = self.current.lock() {
            *current = key;
        }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.lock().ok().map(|c| c.clone())
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A certificate with its key, ready for rustls, and when to renew it.
pub struct Issued {
    pub key: Arc<CertifiedKey>,
    pub renew_at: std::time::SystemTime,
}

/// The certificate kept in `dir` if it is still good for a while, else a new one from
/// the cluster.
pub async fn obtain(client: &Client, spec: &CertSpec, dir: &Path) -> Result<Issued, CsrError> {
    if let Some(kept) = load(spec, dir) {
        if kept.renew_at > std::time::SystemTime::now() {
            return Ok(kept);
        }
    }
    request(client, spec, dir).await
}

/// The certificate and key kept from an earlier run; not a key others could have read
/// (it is replaced by a fresh one, as is a key that is missing).
fn load(spec: &CertSpec, dir: &Path) -> Option<Issued> {
    let (cert_path, key_path) = spec.paths(dir);
    if let Ok(Some(mode)) = crate::trust::loose_mode(&key_path, 0o077) {
        tracing::warn!(path = %key_path.display(), mode = format!("{mode:o}"), "{} key readable by others; requesting a new certificate and key", spec.what());
        return None;
    }
    let cert_pem = std::fs::read(cert_path).ok()?;
    let key_pem = std::fs::read(key_path).ok()?;
    issued(&cert_pem, &key_pem, None).ok()
}

/// When to renew a certificate valid from `not_before` to `not_after` (Unix seconds): at
/// [`RENEW_AT`] of its lifetime, as the kubelet does; but one just issued at `fresh_at`
/// not before half of what is left of it (signers backdate notBefore by minutes, which
/// would otherwise make a short-lived certificate due at once, and renewal a loop).
fn renewal_time(not_before: i64, not_after: i64, fresh_at: Option<i64>) -> i64 {
    let due = not_before + ((not_after - not_before) as f64 * RENEW_AT) as i64;
    match fresh_at {
        Some(now) => due.max(now + (not_after - now) / 2),
        None => due,
    }
}

fn issued(cert_pem: &[u8], key_pem: &[u8], fresh_at: Option<i64>) -> Result<Issued, CsrError> {
    let unusable = |what: &str| CsrError::Unusable(what.to_owned());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    let leaf = chain.first().ok_or_else(|| unusable("no certificate"))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|_| unusable("not X.509"))?;
    let validity = parsed.validity();
    let (from, until) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let renew = renewal_time(from, until, fresh_at);
    let renew_at = std::time::UNIX_EPOCH + Duration::from_secs(renew.max(0) as u64);
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| unusable("no private key"))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| CsrError::Unusable(e.to_string()))?;
    Ok(Issued {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        renew_at,
    })
}

fn is_true(status: &CertificateSigningRequestStatus, type_: &str) -> bool {
    status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// Adds the Approved condition. For the client certificate this takes `approve` on
/// its signer, which the chart grants only when asked to (`kubelet.tunnelSelfApprove`).
async fn approve(
    api: &Api<CertificateSigningRequest>,
    mut csr: CertificateSigningRequest,
    message: &str,
) -> Result<(), kube::Error> {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let status = csr.status.get_or_insert_with(Default::default);
    status
        .conditions
        .get_or_insert_with(Vec::new)
        .push(CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some("AutoApproved".into()),
            message: Some(message.into()),
            ..Default::default()
        });
    api.replace_subresource("approval", &name, &PostParams::default(), &csr)
        .await
        .map(|_| ())
}

/// Creates the CSR, has it approved, waits for the signature and keeps the result.
pub async fn request(client: &Client, spec: &CertSpec, dir: &Path) -> Result<Issued, CsrError> {
    let key = rcgen::KeyPair::generate()?;
    let csr_pem = spec.params()?.serialize_request(&key)?.pem()?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("csr-{}-", spec.node_name)),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.into_bytes()),
            signer_name: spec.signer().into(),
            usages: Some(spec.usages()),
            ..Default::default()
        },
        status: None,
    };
    let created = api.create(&PostParams::default(), &csr).await?;
    let name = created.metadata.name.clone().unwrap_or_default();
    tracing::info!(csr = %name, signer = spec.signer(), "requested a {}", spec.what());
    // The approver may take this long before the node approves the request itself.
    let mut approve_after = match spec.kind {
        CertKind::Serving { .. } => Some(tokio::time::Instant::now()),
        CertKind::Client => Some(tokio::time::Instant::now() + APPROVER_WAIT),
    };
    let certificate = loop {
        let current = api.get(&name).await?;
        let status = current.status.clone().unwrap_or_default();
        let refused = status
            .conditions
            .iter()
            .flatten()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True");
        if let Some(condition) = refused {
            let why = condition
                .message
                .clone()
                .unwrap_or_else(|| condition.type_.clone());
            return Err(CsrError::Refused(name, why));
        }
        if let Some(certificate) = status.certificate.clone().filter(|c| !c.0.is_empty()) {
            break certificate.0;
        }
        let due = approve_after.is_some_and(|at| tokio::time::Instant::now() >= at);
        if due && !is_true(&status, "Approved") {
            approve_after = None;
            let message = format!("approved by the BeeMesh node for its own {}", spec.what());
            match approve(&api, current, &message).await {
                Ok(()) => tracing::info!(csr = %name, "approved the {} itself", spec.what()),
                Err(e) => tracing::warn!(
                    csr = %name,
                    error = %e,
                    "the {} is not approved yet and the node may not approve it itself: bind its ServiceAccount to ClusterRole system:certificates.k8s.io:certificatesigningrequests:nodeclient (the chart does), or approve it with `kubectl certificate approve {name}`",
                    spec.what()
                ),
            }
        }
        tokio::time::sleep(POLL).await;
    };
    let key_pem = key.serialize_pem();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let issued = issued(&certificate, key_pem.as_bytes(), Some(now))?;
    store(spec, dir, &certificate, key_pem.as_bytes())?;
    tracing::info!(csr = %name, "{} issued", spec.what());
    Ok(issued)
}

fn store(spec: &CertSpec, dir: &Path, cert: &[u8], key: &[u8]) -> Result<(), CsrError> {
    let (cert_path, key_path) = spec.paths(dir);
    // Fresh files each time: the key is 0600 even where an old file had another mode.
    let write = |path: &Path, bytes: &[u8], mode: u32| {
        std::fs::create_dir_all(dir)
            .and_then(|()| crate::durable::write_atomically(path, bytes, mode))
            .map_err(|source| CsrError::Store {
                path: path.to_path_buf(),
                source,
            })
    };
    write(&key_path, key, 0o600)?;
    write(&cert_path, cert, 0o644)
}

/// Renews the certificate when due, for as long as the node runs; failures are retried
/// every minute.
pub async fn keep_renewed(
    client: Client,
    spec: CertSpec,
    dir: PathBuf,
    slot: Arc<CertSlot>,
    mut renew_at: std::time::SystemTime,
) {
    loop {
        let wait = renew_at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        match request(&client, &spec, &dir).await {
            Ok(issued) => {
                slot.replace(issued.key);
                renew_at = issued.renew_at;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the {}; retrying in a minute", spec.what());
                renew_at = std::time::SystemTime::now() + Duration::from_secs(60);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_key_is_reused_only_while_others_cannot_read_it() {
        use std::os::unix::fs::PermissionsExt;
        let spec = CertSpec {
            node_name: "edge".into(),
            kind: CertKind::Client,
        };
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = spec
            .params()
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let dir = tempfile::tempdir().expect("tempdir");
        store(
            &spec,
            dir.path(),
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
        )
        .expect("store");
        let (_, key_path) = spec.paths(dir.path());
        let mode = std::fs::metadata(&key_path)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(load(&spec, dir.path()).is_some());
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(
            load(&spec, dir.path()).is_none(),
            "a world-readable key was reused"
        );
    }

    #[test]
    fn renewal_comes_at_four_fifths_of_the_lifetime_and_never_in_a_loop() {
        let year = 365 * 86_400;
        // A year's certificate backdated 5 minutes: at 80 %, loaded or fresh.
        let (from, until) = (1_000_000 - 300, 1_000_000 + year - 300);
        let due = from + (year as f64 * 0.8) as i64;
        assert_eq!(renewal_time(from, until, None), due);
        assert_eq!(renewal_time(from, until, Some(1_000_000)), due);
        // 40 s of validity after a 5-minute backdate: 80 % of the lifetime is already
        // past, so a fresh one waits half of what is left, 20 s.
        let (from, until) = (1_000_000 - 300, 1_000_000 + 40);
        assert!(renewal_time(from, until, None) < 1_000_000);
        assert_eq!(renewal_time(from, until, Some(1_000_000)), 1_000_020);
    }

    #[test]
    fn the_two_certificates_ask_for_what_their_approvers_accept() {
        let serving = CertSpec {
            node_name: "edge".into(),
            kind: CertKind::Serving {
                addresses: vec!["10.0.0.5".parse().expect("ip")],
            },
        };
        let client = CertSpec {
            node_name: "edge".into(),
            kind: CertKind::Client,
        };
        assert_eq!(serving.signer(), "kubernetes.io/kubelet-serving");
        assert_eq!(
            client.signer(),
            "kubernetes.io/kube-apiserver-client-kubelet"
        );
        assert_eq!(
            client.usages(),
            ["digital signature", "key encipherment", "client auth"]
        );
        assert_eq!(serving.usages()[2], "server auth");
        // A node client certificate has no subject alternative names at all
        // (IsKubeletClientCSR refuses any).
        assert!(client
            .params()
            .expect("params")
            .subject_alt_names
            .is_empty());
        assert_eq!(serving.params().expect("params").subject_alt_names.len(), 2);
        let key = rcgen::KeyPair::generate().expect("key");
        let pem = client
            .params()
            .expect("params")
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let dir = std::path::Path::new("/state/kubelet");
        assert_eq!(
            client.paths(dir),
            (dir.join("client.crt"), dir.join("client.key"))
        );
    }
}
