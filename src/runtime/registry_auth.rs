//! Registry credentials from image pull secrets, found for an image as the kubelet's
//! keyring finds them (`pkg/credentialprovider`: `BasicDockerKeyring`, `urlsMatch`,
//! `secrets.MakeDockerKeyring`). Pure.
//!
//! The owner reads the pod's `kubernetes.io/dockerconfigjson` and
//! `kubernetes.io/dockercfg` secrets into [`RegistryCredential`]s ([`credentials`]);
//! the assigned agent picks those for the image it pulls ([`lookup`]) and tries them
//! in order, as the kubelet does, until one pull succeeds.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;

use crate::runtime::image_ref;
use crate::wire::RegistryCredential;

const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
const DOCKERCFG_TYPE: &str = "kubernetes.io/dockercfg";
const DOCKERCFG_KEY: &str = ".dockercfg";
/// Docker Hub's key in a docker config; its credentials also serve images named
/// without a registry.
const DEFAULT_REGISTRY_HOST: &str = "index.docker.io";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("is of type {0:?}, not {DOCKER_CONFIG_JSON_TYPE} or {DOCKERCFG_TYPE}")]
    NotADockerConfig(String),
    #[error("has no {0} key")]
    MissingKey(&'static str),
    #[error("{key} is not a docker config: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    /// base64(`username:password`); wins over the two fields when set.
    #[serde(default)]
    auth: String,
}

/// The credentials of one image pull secret, each under its keyring key.
pub fn credentials(secret: &Secret) -> Result<Vec<RegistryCredential>, SecretError> {
    let type_ = secret.type_.as_deref().unwrap_or("Opaque");
    let key = match type_ {
        DOCKER_CONFIG_JSON_TYPE => DOCKER_CONFIG_JSON_KEY,
        DOCKERCFG_TYPE => DOCKERCFG_KEY,
        other => return Err(SecretError::NotADockerConfig(other.to_string())),
    };
    let data = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .filter(|value| !value.0.is_empty())
        .ok_or(SecretError::MissingKey(key))?;
    let invalid = |message: String| SecretError::Invalid { key, message };
    let entries = if key == DOCKER_CONFIG_JSON_KEY {
        serde_json::from_slice::<DockerConfigJson>(&data.0)
            .map_err(|e| invalid(e.to_string()))?
            .auths
    } else {
        serde_json::from_slice::<BTreeMap<String, Entry>>(&data.0)
            .map_err(|e| invalid(e.to_string()))?
    };
    let mut credentials = Vec::new();
    for (location, entry) in entries {
        let (username, password) = if entry.auth.is_empty() {
            (entry.username, entry.password)
        } else {
            decode_auth(&entry.auth).map_err(|message| invalid(format!("{location}: {message}")))?
        };
        credentials.push(RegistryCredential {
            registry: keyring_key(&location),
            username,
            password,
        });
    }
    Ok(credentials)
}

fn decode_auth(auth: &str) -> Result<(String, String), String> {
    const FORMAT: &str =
        "unable to parse auth field, must be formatted as base64(username:password)";
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .map_err(|_| FORMAT.to_string())?;
    let decoded = String::from_utf8(decoded).map_err(|_| FORMAT.to_string())?;
    let (username, password) = decoded.split_once(':').ok_or_else(|| FORMAT.to_string())?;
    Ok((username.to_string(), password.to_string()))
}

/// The keyring's key for a docker config location: scheme dropped, and a `/v1/` or
/// `/v2/` path read as the host alone (`https://index.docker.io/v1/` is
/// `index.docker.io`).
fn keyring_key(location: &str) -> String {
    let (host, path) = split_location(location);
    let effective = if path.starts_with("/v1/") || path.starts_with("/v2/") {
        &path[3..]
    } else {
        path
    };
    if effective.is_empty() || effective == "/" {
        host.to_string()
    } else {
        format!("{host}{effective}")
    }
}

/// Host (with port) and path (from its `/`) of a location with or without a scheme.
fn split_location(location: &str) -> (&str, &str) {
    let schemeless = ["https://", "http://"]
        .iter()
        .find_map(|scheme| location.strip_prefix(scheme))
        .unwrap_or(location);
    let end = schemeless.find(['/', '?', '#']).unwrap_or(schemeless.len());
    let path = &schemeless[end..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    (&schemeless[..end], path)
}

/// The credentials to try for pulling `image`, in the kubelet's order: every key that
/// matches, the most specific first, each key's credentials in the order given;
/// Docker Hub's when none matches and the image is on Docker Hub.
pub fn lookup<'a>(keyring: &'a [RegistryCredential], image: &str) -> Vec<&'a RegistryCredential> {
    let repository = image_ref::repository(image);
    let mut keys: Vec<&str> = keyring.iter().map(|c| c.registry.as_str()).collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    keys.dedup();
    let matched: Vec<&RegistryCredential> = keys
        .into_iter()
        .filter(|key| matches(key, &repository))
        .flat_map(|key| keyring.iter().filter(move |c| c.registry == key))
        .collect();
    if !matched.is_empty() {
        return matched;
    }
    if repository.starts_with("docker.io/") {
        return keyring
            .iter()
            .filter(|c| c.registry == DEFAULT_REGISTRY_HOST)
            .collect();
    }
    Vec::new()
}

/// `urlsMatch`: same port, same number of host labels each matching its glob, and the
/// key's path a prefix of the repository's.
fn matches(key: &str, repository: &str) -> bool {
    let (key_host, key_path) = split_location(key);
    let (target_host, target_path) = split_location(repository);
    let (key_labels, key_port) = split_host(key_host);
    let (target_labels, target_port) = split_host(target_host);
    key_port == target_port
        && key_labels.len() == target_labels.len()
        && target_path.starts_with(key_path)
        && key_labels
            .iter()
            .zip(&target_labels)
            .all(|(glob, label)| glob_match(glob.as_bytes(), label.as_bytes()))
}

/// A host's labels and port (`net.SplitHostPort`, the whole host when it has no port).
fn split_host(host: &str) -> (Vec<&str>, &str) {
    let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((name, rest)) => (name, rest.strip_prefix(':').unwrap_or("")),
            None => (host, ""),
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) if !port.contains(':') => (name, port),
            _ => (host, ""),
        }
    };
    (name.split('.').collect(), port)
}

/// `filepath.Match` on one host label: `*`, `?`, `[...]` (with `^` negation and
/// ranges) and `\` escapes; a malformed pattern matches nothing.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_match(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && glob_match(rest, &text[1..]),
        Some((b'[', rest)) => {
            let Some((&first, text_rest)) = text.split_first() else {
                return false;
            };
            match class_match(rest, first) {
                Some((matched, after)) => matched && glob_match(after, text_rest),
                None => false,
            }
        }
        Some((b'\\', rest)) => match (rest.split_first(), text.split_first()) {
            (Some((p, rest)), Some((t, text_rest))) => p == t && glob_match(rest, text_rest),
            _ => false,
        },
        Some((p, rest)) => text.first() == Some(p) && glob_match(rest, &text[1..]),
    }
}

/// Whether `c` is in the class that `pattern` opens (after its `[`), and the pattern
/// after the class's `]`; None when the class is malformed.
fn class_match(pattern: &[u8], c: u8) -> Option<(bool, &[u8])> {
    let (negated, mut rest) = match pattern.split_first() {
        Some((b'^', rest)) => (true, rest),
        _ => (false, pattern),
    };
    let mut matched = false;
    let mut first = true;
    loop {
        match rest.split_first() {
            None => return None,
            Some((b']', after)) if !first => return Some((matched != negated, after)),
            _ => {}
        }
        first = false;
        let (low, after) = class_char(rest)?;
        let (high, after) = match after.split_first() {
            Some((b'-', range)) if range.first() != Some(&b']') => class_char(range)?,
            _ => (low, after),
        };
        matched |= (low..=high).contains(&c);
        rest = after;
    }
}

fn class_char(pattern: &[u8]) -> Option<(u8, &[u8])> {
    match pattern.split_first()? {
        (b'\\', rest) => rest.split_first().map(|(c, rest)| (*c, rest)),
        (c, rest) => Some((*c, rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(type_: &str, key: &str, data: &str) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some([(key.to_string(), ByteString(data.as_bytes().to_vec()))].into()),
            ..Secret::default()
        }
    }

    fn credential(registry: &str, username: &str) -> RegistryCredential {
        RegistryCredential {
            registry: registry.into(),
            username: username.into(),
            password: "pw".into(),
        }
    }

    fn users(found: Vec<&RegistryCredential>) -> Vec<&str> {
        found.iter().map(|c| c.username.as_str()).collect()
    }

    #[test]
    fn a_docker_config_json_secret_gives_its_logins_with_auth_winning() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:from-auth");
        let data = format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"username": "alice", "password": "a"}},
                "registry:5000": {{"username": "x", "password": "y", "auth": "{auth}"}}}}}}"#
        );
        let found = credentials(&secret(
            DOCKER_CONFIG_JSON_TYPE,
            DOCKER_CONFIG_JSON_KEY,
            &data,
        ))
        .expect("a docker config");
        assert_eq!(
            found,
            [
                RegistryCredential {
                    registry: "index.docker.io".into(),
                    username: "alice".into(),
                    password: "a".into()
                },
                RegistryCredential {
                    registry: "registry:5000".into(),
                    username: "bob".into(),
                    password: "from-auth".into()
                },
            ]
        );
    }

    #[test]
    fn a_legacy_dockercfg_secret_is_read_too() {
        let data = r#"{"quay.io/team": {"username": "q", "password": "p"}}"#;
        let found = credentials(&secret(DOCKERCFG_TYPE, DOCKERCFG_KEY, data)).expect("dockercfg");
        assert_eq!(
            found,
            [credential("quay.io/team", "q")].map(|mut c| {
                c.password = "p".into();
                c
            })
        );
    }

    #[test]
    fn secrets_that_are_no_docker_config_are_refused_with_the_reason() {
        let opaque = secret("Opaque", DOCKER_CONFIG_JSON_KEY, "{}");
        assert_eq!(
            credentials(&opaque),
            Err(SecretError::NotADockerConfig("Opaque".into()))
        );
        let empty = secret(DOCKER_CONFIG_JSON_TYPE, "other", "{}");
        assert_eq!(
            credentials(&empty),
            Err(SecretError::MissingKey(DOCKER_CONFIG_JSON_KEY))
        );
        let bad_auth = r#"{"auths": {"r:1": {"auth": "bm9jb2xvbg=="}}}"#;
        let error = credentials(&secret(
            DOCKER_CONFIG_JSON_TYPE,
            DOCKER_CONFIG_JSON_KEY,
            bad_auth,
        ))
        .expect_err("auth without a colon");
        assert!(
            error.to_string().contains("base64(username:password)"),
            "{error}"
        );
        let not_json = secret(DOCKER_CONFIG_JSON_TYPE, DOCKER_CONFIG_JSON_KEY, "{");
        assert!(matches!(
            credentials(&not_json),
            Err(SecretError::Invalid { .. })
        ));
    }

    #[test]
    fn keys_drop_scheme_and_registry_api_paths() {
        assert_eq!(
            keyring_key("https://index.docker.io/v1/"),
            "index.docker.io"
        );
        assert_eq!(keyring_key("http://registry:5000/v2/"), "registry:5000");
        assert_eq!(keyring_key("registry:5000/v2/team"), "registry:5000/team");
        assert_eq!(keyring_key("quay.io/coreos"), "quay.io/coreos");
        assert_eq!(keyring_key("quay.io/"), "quay.io");
    }

    #[test]
    fn lookup_finds_the_most_specific_keys_first() {
        let keyring = [
            credential("quay.io", "host"),
            credential("quay.io/coreos", "path"),
            credential("quay.io/coreos", "path-2"),
            credential("gcr.io", "other"),
        ];
        assert_eq!(
            users(lookup(&keyring, "quay.io/coreos/etcd:v3")),
            ["path", "path-2", "host"]
        );
        assert_eq!(users(lookup(&keyring, "quay.io/other/etcd")), ["host"]);
        assert!(lookup(&keyring, "docker.io/library/busybox").is_empty());
    }

    #[test]
    fn hosts_match_label_by_label_with_globs_and_the_same_port() {
        let keyring = [
            credential("*.example.com", "glob"),
            credential("registry:5000", "port"),
            credential("[::1]:5000", "v6"),
        ];
        assert_eq!(users(lookup(&keyring, "a.example.com/app")), ["glob"]);
        // `*` stands for one label, not several.
        assert!(lookup(&keyring, "a.b.example.com/app").is_empty());
        assert!(lookup(&keyring, "example.com/app").is_empty());
        assert_eq!(users(lookup(&keyring, "registry:5000/app:1")), ["port"]);
        assert!(lookup(&keyring, "registry:5001/app").is_empty());
        assert!(lookup(&keyring, "registry/app").is_empty());
        assert_eq!(users(lookup(&keyring, "[::1]:5000/app")), ["v6"]);
    }

    #[test]
    fn docker_hub_credentials_serve_images_named_without_a_registry() {
        let keyring = [credential("index.docker.io", "hub")];
        assert_eq!(users(lookup(&keyring, "busybox")), ["hub"]);
        assert_eq!(users(lookup(&keyring, "acme/app:1")), ["hub"]);
        assert_eq!(users(lookup(&keyring, "docker.io/acme/app")), ["hub"]);
        assert!(lookup(&keyring, "quay.io/acme/app").is_empty());
    }

    #[test]
    fn globs_follow_filepath_match() {
        let cases = [
            ("*", "anything", true),
            ("reg?", "reg1", true),
            ("reg?", "reg", false),
            ("[a-c]x", "bx", true),
            ("[^a-c]x", "bx", false),
            ("[^a-c]x", "dx", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("[a-", "a", false),
            ("abc", "abd", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern} ~ {text}"
            );
        }
    }
}
