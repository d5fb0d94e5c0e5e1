//! The kubelet API's TLS: its serving certificate (from files, or generated and kept
//! in the state directory for a standalone node) and the client CA whose certificates
//! authenticate callers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("private key {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} holds no PEM {what}")]
    NoPem { path: PathBuf, what: &'static str },
    #[error("cannot generate a serving certificate")]
    Generate(#[from] rcgen::Error),
    #[error("invalid TLS setup")]
    Rustls(#[from] rustls::Error),
    #[error("invalid client CA")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum ServingCert {
    /// `--tls-cert-file` and `--tls-private-key-file`.
    Files { cert: PathBuf, key: PathBuf },
    /// Generated on first start for these names and addresses, kept in `dir`.
    SelfSigned { dir: PathBuf, names: Vec<String> },
    /// Signed by the cluster and renewed while serving (see `csr`).
    Renewed(Arc<super::csr::CertSlot>),
}

/// The server configuration: the serving certificate, and client certificates checked
/// against `client_ca` when presented (callers without one may still use a bearer
/// token; the HTTP layer decides).
pub fn server_config(
    serving: &ServingCert,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path)? {
                roots.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = match serving {
        ServingCert::Files { cert, key } => {
            builder.with_single_cert(read_certs(cert)?, read_key(key)?)?
        }
        ServingCert::SelfSigned { dir, names } => {
            let (chain, key) = self_signed(dir, names)?;
            builder.with_single_cert(chain, key)?
        }
        ServingCert::Renewed(resolver) => builder.with_cert_resolver(resolver.clone()),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = pem_certs(&pem);
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// A private key others can read is refused, as ssh refuses one; its group may read
/// it (a Kubernetes Secret volume is 0440 to the pod's fsGroup).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let pem = read(path)?;
    let loose = crate::trust::loose_mode(path, 0o007).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(mode) = loose {
        return Err(TlsError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoPem {
        path: path.to_path_buf(),
        what: "private key",
    })
}

fn pem_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// The generated certificate and key in `dir`, made on first use (key mode 0600).
fn self_signed(
    dir: &Path,
    names: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert_path = dir.join("kubelet.crt");
    let key_path = dir.join("kubelet.key");
    if !(cert_path.is_file() && key_path.is_file()) {
        let generated = rcgen::generate_simple_self_signed(names.to_vec())?;
        // A fresh file each time: the key is 0600 even where an old file had another mode.
        let write = |path: &Path, text: String, mode: u32| {
            crate::durable::write_atomically(path, text.as_bytes(), mode).map_err(|source| {
                TlsError::Write {
                    path: path.to_path_buf(),
                    source,
                }
            })
        };
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        write(&key_path, generated.key_pair.serialize_pem(), 0o600)?;
        write(&cert_path, generated.cert.pem(), 0o644)?;
        tracing::info!(cert = %cert_path.display(), ?names, "generated a self-signed kubelet serving certificate");
    }
    Ok((read_certs(&cert_path)?, read_key(&key_path)?))
}

/// The user a client certificate names: its CN, and its O entries as groups.
pub fn client_identity(cert: &CertificateDer<'_>) -> Option<(String, Vec<String>)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let user = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())?
        .to_owned();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    Some((user, groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_kept_and_its_key_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let serving = ServingCert::SelfSigned {
            dir: dir.path().join("tls"),
            names: vec!["beemesh".into(), "127.0.0.1".into()],
        };
        server_config(&serving, None).expect("config");
        let cert = std::fs::read(dir.path().join("tls/kubelet.crt")).expect("cert");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls/kubelet.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        server_config(&serving, None).expect("config again");
        assert_eq!(
            std::fs::read(dir.path().join("tls/kubelet.crt")).expect("cert"),
            cert
        );

        // A key file others can read (as --tls-private-key-file) is refused with the
        // fix; one its group reads (a Secret volume) is taken.
        let key = dir.path().join("tls/kubelet.key");
        let files = ServingCert::Files {
            cert: dir.path().join("tls/kubelet.crt"),
            key: key.clone(),
        };
        let chmod = |mode| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        chmod(0o644);
        let refused = server_config(&files, None).expect_err("world-readable key");
        assert!(refused.to_string().contains("chmod 600"), "{refused}");
        chmod(0o440);
        server_config(&files, None).expect("group-readable key");
    }

    #[test]
    fn a_client_certificate_names_its_user_and_groups() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:masters");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            client_identity(cert.der()),
            Some(("kube-apiserver".into(), vec!["system:masters".into()]))
        );
    }
}
