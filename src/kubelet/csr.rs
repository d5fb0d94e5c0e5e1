//! The kubelet API's serving certificate, signed by the cluster: a
//! CertificateSigningRequest for the kubernetes.io/kubelet-serving signer (CN
//! system:node:<name>, O system:nodes, the node's addresses and name), approved by the
//! node itself (its ClusterRole may approve only that signer), and renewed before it
//! expires. API servers verify kubelets against the cluster CA, so a self-signed
//! certificate would make every `kubectl logs` fail.

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
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub const SIGNER: &str = "kubernetes.io/kubelet-serving";
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

/// A serving certificate that can be replaced while the server runs.
#[derive(Debug)]
pub struct ServingCertResolver {
    current: Mutex<Arc<CertifiedKey>>,
}

impl ServingCertResolver {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(ServingCertResolver {
            current: Mutex::new(key),
        })
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        if let Ok(mut current) = self.current.lock() {
            *current = key;
        }
    }
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.lock().ok().map(|c| c.clone())
    }
}

/// A certificate with its key, ready for rustls, and when to renew it.
pub struct Issued {
    pub key: Arc<CertifiedKey>,
    pub renew_at: std::time::SystemTime,
}

/// The certificate kept in `dir` if it is still good for a while, else a new one from
/// the cluster.
pub async fn obtain(
    client: &Client,
    node_name: &str,
    addresses: &[IpAddr],
    dir: &Path,
) -> Result<Issued, CsrError> {
    if let Some(kept) = load(dir) {
        if kept.renew_at > std::time::SystemTime::now() {
            return Ok(kept);
        }
    }
    request(client, node_name, addresses, dir).await
}

fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("serving.crt"), dir.join("serving.key"))
}

fn load(dir: &Path) -> Option<Issued> {
    let (cert_path, key_path) = paths(dir);
    let cert_pem = std::fs::read(cert_path).ok()?;
    let key_pem = std::fs::read(key_path).ok()?;
    issued(&cert_pem, &key_pem).ok()
}

fn issued(cert_pem: &[u8], key_pem: &[u8]) -> Result<Issued, CsrError> {
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
    let renew = from as f64 + (until - from) as f64 * RENEW_AT;
    let renew_at = std::time::UNIX_EPOCH + Duration::from_secs(renew.max(0.0) as u64);
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| unusable("no private key"))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| CsrError::Unusable(e.to_string()))?;
    Ok(Issued {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        renew_at,
    })
}

/// Creates the CSR, approves it, waits for the signature and keeps the result.
pub async fn request(
    client: &Client,
    node_name: &str,
    addresses: &[IpAddr],
    dir: &Path,
) -> Result<Issued, CsrError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![node_name.to_owned()])?;
    params
        .subject_alt_names
        .extend(addresses.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("system:node:{node_name}"),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("csr-{node_name}-")),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.into_bytes()),
            signer_name: SIGNER.into(),
            usages: Some(vec![
                "digital signature".into(),
                "key encipherment".into(),
                "server auth".into(),
            ]),
            ..Default::default()
        },
        status: None,
    };
    let mut created = api.create(&PostParams::default(), &csr).await?;
    let name = created.metadata.name.clone().unwrap_or_default();
    tracing::info!(csr = %name, "requested a kubelet serving certificate");
    created.status = Some(CertificateSigningRequestStatus {
        conditions: Some(vec![CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some("AutoApproved".into()),
            message: Some("approved by the BeeMesh node for its own kubelet API".into()),
            ..Default::default()
        }]),
        certificate: None,
    });
    api.replace_subresource("approval", &name, &PostParams::default(), &created)
        .await?;
    let certificate = loop {
        let current = api.get(&name).await?;
        let status = current.status.unwrap_or_default();
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
        if let Some(certificate) = status.certificate.filter(|c| !c.0.is_empty()) {
            break certificate.0;
        }
        tokio::time::sleep(POLL).await;
    };
    let key_pem = key.serialize_pem();
    let issued = issued(&certificate, key_pem.as_bytes())?;
    store(dir, &certificate, key_pem.as_bytes())?;
    tracing::info!(csr = %name, "kubelet serving certificate issued");
    Ok(issued)
}

fn store(dir: &Path, cert: &[u8], key: &[u8]) -> Result<(), CsrError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (cert_path, key_path) = paths(dir);
    let write = |path: &Path, bytes: &[u8], mode: u32| {
        std::fs::create_dir_all(dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .open(path)
            })
            .and_then(|mut f| f.write_all(bytes))
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
    node_name: String,
    addresses: Vec<IpAddr>,
    dir: PathBuf,
    resolver: Arc<ServingCertResolver>,
    mut renew_at: std::time::SystemTime,
) {
    loop {
        let wait = renew_at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        match request(&client, &node_name, &addresses, &dir).await {
            Ok(issued) => {
                resolver.replace(issued.key);
                renew_at = issued.renew_at;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the kubelet serving certificate; retrying in a minute");
                renew_at = std::time::SystemTime::now() + Duration::from_secs(60);
            }
        }
    }
}
