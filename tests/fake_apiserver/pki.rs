//! The fake cluster's certificates: a cluster CA (what `kube-root-ca.crt` publishes, what
//! signs kubelet serving certificates, what the API server trusts kubelets with, as
//! `--kubelet-certificate-authority`) and a client CA (what kubelets trust API clients
//! with, published as `client-ca-file` in kube-system/extension-apiserver-authentication),
//! and the API server's own kubelet client certificate (CN=kube-apiserver, as recorded).
//! In k3s mode the fake serves HTTPS with a certificate from the cluster CA and
//! verifies the client certificates it is offered against the client CA.

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509CertificationRequest};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(common_name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).expect("self-signed CA");
        Ca { cert, key }
    }
}

pub(super) struct Pki {
    cluster: Ca,
    client: Ca,
    /// The API server's kubelet client certificate and key (PEM).
    apiserver_client: (String, String),
    /// TLS to kubelets: trusts the cluster CA, presents `apiserver_client`.
    pub(super) kubelet_tls: Arc<rustls::ClientConfig>,
}

/// Which CA a signer uses: kube-controller-manager's `--cluster-signing-*` files as k3s
/// sets them (kubelet-serving: the server CA; kube-apiserver-client-kubelet: the client CA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SigningCa {
    Cluster,
    Client,
}

/// A parsed, signature-checked PKCS#10 request: what the signer and its checks read.
pub(super) struct Csr {
    pub(super) common_name: String,
    pub(super) organizations: Vec<String>,
    pub(super) subject: Vec<(DnType, String)>,
    pub(super) dns_names: Vec<String>,
    pub(super) ip_addresses: Vec<IpAddr>,
    pub(super) emails: Vec<String>,
    pub(super) uris: Vec<String>,
    public_key: ForeignKey,
}

/// The requester's public key, which rcgen signs without holding its private key.
struct ForeignKey {
    der: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
}

impl rcgen::PublicKeyData for ForeignKey {
    fn der_bytes(&self) -> &[u8] {
        &self.der
    }
    fn algorithm(&self) -> &SignatureAlgorithm {
        self.algorithm
    }
}

pub(super) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// PEM blocks of one label, decoded.
pub(super) fn pem_blocks(text: &str, label: &str) -> Vec<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = vec![];
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let Some(stop) = after.find(&end) else { break };
        let body: String = after[..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if let Some(der) = base64_decode(&body) {
            out.push(der);
        }
        rest = &after[stop + end.len()..];
    }
    out
}

pub(super) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            b'\r' | b'\n' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

pub fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A leaf certificate's usual settings (signing and key encipherment for `usage`),
/// valid from an hour ago for a year.
fn leaf_for_a_year(params: &mut CertificateParams, usage: ExtendedKeyUsagePurpose) {
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
}

fn random_serial() -> SerialNumber {
    let seed = format!(
        "{:?}-{}-{:?}",
        std::time::SystemTime::now(),
        std::process::id(),
        std::thread::current().id()
    );
    let mut bytes = <sha2::Sha256 as sha2::Digest>::digest(seed.as_bytes())[..16].to_vec();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

impl Pki {
    pub(super) fn new() -> Pki {
        let cluster = Ca::new("fake-apiserver-server-ca");
        let client = Ca::new("fake-apiserver-client-ca");
        let mut pki = Pki {
            cluster,
            client,
            apiserver_client: (String::new(), String::new()),
            kubelet_tls: Arc::new(
                rustls::ClientConfig::builder_with_provider(crypto_provider())
                    .with_safe_default_protocol_versions()
                    .expect("protocols")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            ),
        };
        // Recorded: the kubelet saw a client certificate with CN=kube-apiserver only.
        pki.apiserver_client = pki.client_cert("kube-apiserver", &[]);
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(pki.cluster.cert.der().clone())
            .expect("cluster CA as root");
        let chain = vec![rustls::pki_types::CertificateDer::from(
            pem_blocks(&pki.apiserver_client.0, "CERTIFICATE").remove(0),
        )];
        let key = rustls::pki_types::PrivateKeyDer::try_from(
            pem_blocks(&pki.apiserver_client.1, "PRIVATE KEY").remove(0),
        )
        .expect("key");
        let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("client auth");
        // Upgrades are HTTP/1.1 only, as the API server's upgrade dialer asks.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        pki.kubelet_tls = Arc::new(tls);
        pki
    }

    pub(super) fn cluster_ca_pem(&self) -> String {
        self.cluster.cert.pem()
    }

    pub(super) fn client_ca_pem(&self) -> String {
        self.client.cert.pem()
    }

    /// A client certificate signed by the client CA: CN is the user, each O a group.
    pub(super) fn client_cert(&self, cn: &str, groups: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // rcgen keeps one value per attribute type: a second O goes in as the same OID
        // spelled as a custom type. More than two groups cannot be made here.
        assert!(groups.len() <= 2, "client_cert: at most two groups (O)");
        if let Some(group) = groups.first() {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        if let Some(group) = groups.get(1) {
            params
                .distinguished_name
                .push(DnType::CustomDnType(vec![2, 5, 4, 10]), *group);
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        leaf_for_a_year(&mut params, ExtendedKeyUsagePurpose::ClientAuth);
        let cert = params
            .signed_by(&key, &self.client.cert, &self.client.key)
            .expect("client certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// The API server's serving TLS in k3s mode: a certificate for 127.0.0.1 and
    /// localhost from the cluster CA; client certificates optional, verified against the
    /// client CA when offered; HTTP/1.1 only.
    pub(super) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().expect("serving key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        params.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
            SanType::DnsName("localhost".to_string().try_into().expect("dns name")),
            SanType::DnsName("kubernetes".to_string().try_into().expect("dns name")),
            SanType::DnsName(
                "kubernetes.default.svc"
                    .to_string()
                    .try_into()
                    .expect("dns name"),
            ),
        ];
        leaf_for_a_year(&mut params, ExtendedKeyUsagePurpose::ServerAuth);
        let cert = params
            .signed_by(&key, &self.cluster.cert, &self.cluster.key)
            .expect("serving certificate");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.client.cert.der().clone())
            .expect("client CA as root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            crypto_provider(),
        )
        .allow_unauthenticated()
        .build()
        .expect("client verifier");
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("serving key");
        let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone(), self.cluster.cert.der().clone()],
                key,
            )
            .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Signs a request as the csrsigning controller does
    /// (k8s.io/kubernetes/pkg/controller/certificates/authority, PermissiveSigningPolicy):
    /// subject and SANs from the request, the CSR object's usages, not a CA, 5 minutes
    /// of backdating (none for lifetimes under 8 h), never past the CA's own expiry.
    pub(super) fn sign(
        &self,
        csr: &Csr,
        usages: &[String],
        ttl_seconds: i64,
        signer: SigningCa,
    ) -> String {
        let ca = match signer {
            SigningCa::Cluster => &self.cluster,
            SigningCa::Client => &self.client,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for (ty, value) in &csr.subject {
            params.distinguished_name.push(ty.clone(), value.as_str());
        }
        for dns in &csr.dns_names {
            if let Ok(name) = dns.clone().try_into() {
                params.subject_alt_names.push(SanType::DnsName(name));
            }
        }
        for ip in &csr.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for email in &csr.emails {
            if let Ok(name) = email.clone().try_into() {
                params.subject_alt_names.push(SanType::Rfc822Name(name));
            }
        }
        for uri in &csr.uris {
            if let Ok(name) = uri.clone().try_into() {
                params.subject_alt_names.push(SanType::URI(name));
            }
        }
        for usage in usages {
            match usage.as_str() {
                "digital signature" => params.key_usages.push(KeyUsagePurpose::DigitalSignature),
                "content commitment" => params.key_usages.push(KeyUsagePurpose::ContentCommitment),
                "key encipherment" => params.key_usages.push(KeyUsagePurpose::KeyEncipherment),
                "data encipherment" => params.key_usages.push(KeyUsagePurpose::DataEncipherment),
                "key agreement" => params.key_usages.push(KeyUsagePurpose::KeyAgreement),
                "cert sign" => params.key_usages.push(KeyUsagePurpose::KeyCertSign),
                "crl sign" => params.key_usages.push(KeyUsagePurpose::CrlSign),
                "encipher only" => params.key_usages.push(KeyUsagePurpose::EncipherOnly),
                "decipher only" => params.key_usages.push(KeyUsagePurpose::DecipherOnly),
                "server auth" => params
                    .extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ServerAuth),
                "client auth" => params
                    .extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ClientAuth),
                "code signing" => params
                    .extended_key_usages
                    .push(ExtendedKeyUsagePurpose::CodeSigning),
                "email protection" => params
                    .extended_key_usages
                    .push(ExtendedKeyUsagePurpose::EmailProtection),
                "timestamping" => params
                    .extended_key_usages
                    .push(ExtendedKeyUsagePurpose::TimeStamping),
                "ocsp signing" => params
                    .extended_key_usages
                    .push(ExtendedKeyUsagePurpose::OcspSigning),
                _ => {}
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        let ttl = time::Duration::seconds(ttl_seconds);
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = if ttl < time::Duration::hours(8) {
            now + ttl
        } else {
            params.not_before + ttl
        };
        let ca_expiry = ca.cert.params().not_after;
        if params.not_after > ca_expiry {
            params.not_after = ca_expiry;
        }
        params
            .signed_by(&csr.public_key, &ca.cert, &ca.key)
            .expect("sign")
            .pem()
    }
}

/// The user a verified client certificate authenticates as (the x509 authenticator):
/// its CN, and its O values as groups.
pub(super) fn certificate_user(der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert) = x509_parser::prelude::X509Certificate::from_der(der).ok()?;
    let mut user = None;
    let mut groups = vec![];
    for attr in cert.subject().iter_attributes() {
        let Ok(value) = attr.as_str() else { continue };
        match attr.attr_type().to_id_string().as_str() {
            // Go keeps the last CN.
            "2.5.4.3" => user = Some(value.to_string()),
            "2.5.4.10" => groups.push(value.to_string()),
            _ => {}
        }
    }
    Some((user?, groups))
}

/// `certificates.ParseCSR` and `CheckSignature`, with Go's messages where the API
/// server shows them.
pub(super) fn parse_csr(pem: &[u8]) -> Result<Csr, String> {
    let text = String::from_utf8_lossy(pem);
    let der = pem_blocks(&text, "CERTIFICATE REQUEST")
        .into_iter()
        .next()
        .filter(|_| {
            text.trim_start()
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        })
        .ok_or("PEM block type must be CERTIFICATE REQUEST")?;
    let (_, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| format!("x509: malformed certificate request: {e}"))?;
    csr.verify_signature()
        .map_err(|_| "x509: ECDSA verification failure".to_string())?;
    let info = &csr.certification_request_info;
    let mut subject = vec![];
    let mut common_name = String::new();
    let mut organizations = vec![];
    for attr in info.subject.iter_attributes() {
        let Ok(value) = attr.as_str() else { continue };
        let oid = attr.attr_type().to_id_string();
        let ty = match oid.as_str() {
            "2.5.4.3" => {
                common_name = value.to_string();
                DnType::CommonName
            }
            "2.5.4.10" => {
                organizations.push(value.to_string());
                DnType::OrganizationName
            }
            "2.5.4.11" => DnType::OrganizationalUnitName,
            "2.5.4.6" => DnType::CountryName,
            "2.5.4.7" => DnType::LocalityName,
            "2.5.4.8" => DnType::StateOrProvinceName,
            _ => continue,
        };
        subject.push((ty, value.to_string()));
    }
    let (mut dns_names, mut ip_addresses, mut emails, mut uris) = (vec![], vec![], vec![], vec![]);
    for extension in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                    GeneralName::RFC822Name(e) => emails.push(e.to_string()),
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => ip_addresses
                            .push(IpAddr::from(<[u8; 4]>::try_from(*bytes).expect("4 bytes"))),
                        16 => ip_addresses.push(IpAddr::from(
                            <[u8; 16]>::try_from(*bytes).expect("16 bytes"),
                        )),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
    }
    let spki = &info.subject_pki;
    let algorithm_oid = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string())
        .unwrap_or_default();
    let algorithm: &'static SignatureAlgorithm = match (algorithm_oid.as_str(), curve.as_str()) {
        ("1.2.840.10045.2.1", "1.2.840.10045.3.1.7") => &rcgen::PKCS_ECDSA_P256_SHA256,
        ("1.2.840.10045.2.1", "1.3.132.0.34") => &rcgen::PKCS_ECDSA_P384_SHA384,
        ("1.2.840.113549.1.1.1", _) => &rcgen::PKCS_RSA_SHA256,
        ("1.3.101.112", _) => &rcgen::PKCS_ED25519,
        _ => {
            return Err(format!(
                "x509: unsupported public key algorithm {algorithm_oid}"
            ))
        }
    };
    Ok(Csr {
        common_name,
        organizations,
        subject,
        dns_names,
        ip_addresses,
        emails,
        uris,
        public_key: ForeignKey {
            der: spki.subject_public_key.data.to_vec(),
            algorithm,
        },
    })
}
