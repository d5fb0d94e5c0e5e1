//! Who may use the kubelet API, as the kubelet decides with
//! `--authentication-token-webhook --authorization-mode=Webhook`: a verified client
//! certificate or a bearer token (checked with a TokenReview) names the user, and a
//! SubjectAccessReview on the node's `nodes` resource, with the subresource the path
//! maps to, decides. Standalone there is no API server: client certificates only, and
//! every verified one is allowed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use kube::Client;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
    pub uid: Option<String>,
}

/// What a request asks to do, as the kubelet's authorizer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub verb: &'static str,
    pub subresource: &'static str,
}

/// The kubelet's mapping of a request onto the `nodes` resource.
pub fn attributes(method: &str, path: &str) -> Attributes {
    let verb = match method {
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "get",
    };
    let is_under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    let subresource = if is_under("/stats") {
        "stats"
    } else if is_under("/metrics") {
        "metrics"
    } else if is_under("/logs") {
        "log"
    } else if is_under("/spec") {
        "spec"
    } else if is_under("/checkpoint") {
        "checkpoint"
    } else {
        "proxy"
    };
    Attributes { verb, subresource }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot ask the API server")]
pub struct AuthError(#[from] kube::Error);

/// Checks callers against the API server, or (standalone) lets every verified client
/// certificate in.
#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// The user a bearer token belongs to; None if it is not valid.
    async fn authenticate(&self, token: &str) -> Result<Option<UserInfo>, AuthError>;
    async fn allowed(&self, user: &UserInfo, attributes: Attributes) -> Result<bool, AuthError>;
}

/// Standalone: no tokens, and every user of a verified client certificate.
pub struct ClientCertsOnly;

#[async_trait]
impl Authorizer for ClientCertsOnly {
    async fn authenticate(&self, _token: &str) -> Result<Option<UserInfo>, AuthError> {
        Ok(None)
    }

    async fn allowed(&self, _user: &UserInfo, _attributes: Attributes) -> Result<bool, AuthError> {
        Ok(true)
    }
}

/// How long answers are cached, as the kubelet's flags of the same names set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTtls {
    /// `--authentication-token-webhook-cache-ttl`: TokenReview answers (2 min).
    pub token: Duration,
    /// `--authorization-webhook-cache-authorized-ttl`: allowed decisions (5 min).
    pub authorized: Duration,
    /// `--authorization-webhook-cache-unauthorized-ttl`: denied decisions (30 s).
    pub unauthorized: Duration,
}

impl CacheTtls {
    fn decision(&self, allowed: bool) -> Duration {
        if allowed {
            self.authorized
        } else {
            self.unauthorized
        }
    }
}

/// At most this many answers are kept per cache: a flood of distinct bogus tokens costs
/// TokenReviews (as on the kubelet), never unbounded memory.
const CACHE_ENTRIES: usize = 4096;
/// TokenReviews and SubjectAccessReviews in flight at once: a flood of distinct bogus
/// tokens waits its turn instead of multiplying requests to the API server.
const REVIEWS_IN_FLIGHT: usize = 16;

/// Remembers `value` under `key` unless the cache is full of entries still `fresh`
/// (expired ones go first).
fn remember<K: std::hash::Hash + Eq, V>(
    cache: &mut HashMap<K, (V, Instant)>,
    key: K,
    value: V,
    fresh: impl Fn(&V, &Instant) -> bool,
) {
    if cache.len() >= CACHE_ENTRIES {
        cache.retain(|_, (value, at)| fresh(value, at));
    }
    if cache.len() < CACHE_ENTRIES {
        cache.insert(key, (value, Instant::now()));
    }
}

/// Answers by key, with when they came.
type Cache<K, V> = Mutex<HashMap<K, (V, Instant)>>;

/// TokenReview and SubjectAccessReview, with the kubelet's caching. Tokens are kept
/// only as their SHA-256.
pub struct ApiServerAuth {
    client: Client,
    node_name: String,
    ttls: CacheTtls,
    tokens: Cache<[u8; 32], Option<UserInfo>>,
    decisions: Cache<(UserInfo, Attributes), bool>,
    reviews: tokio::sync::Semaphore,
}

impl ApiServerAuth {
    pub fn new(client: Client, node_name: String, ttls: CacheTtls) -> ApiServerAuth {
        ApiServerAuth {
            client,
            node_name,
            ttls,
            tokens: Mutex::default(),
            decisions: Mutex::default(),
            reviews: tokio::sync::Semaphore::new(REVIEWS_IN_FLIGHT),
        }
    }
}

#[async_trait]
impl Authorizer for ApiServerAuth {
    async fn authenticate(&self, token: &str) -> Result<Option<UserInfo>, AuthError> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let cached = self.tokens.lock().ok().and_then(|cache| {
            cache
                .get(&digest)
                .filter(|(_, at)| at.elapsed() < self.ttls.token)
                .map(|(user, _)| user.clone())
        });
        if let Some(user) = cached {
            return Ok(user);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = {
            let _turn = self.reviews.acquire().await;
            Api::<TokenReview>::all(self.client.clone())
                .create(&PostParams::default(), &review)
                .await?
        };
        let user = answer
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .and_then(|u| {
                Some(UserInfo {
                    name: u.username?,
                    groups: u.groups.unwrap_or_default(),
                    uid: u.uid,
                })
            });
        if let Ok(mut cache) = self.tokens.lock() {
            let ttl = self.ttls.token;
            remember(&mut cache, digest, user.clone(), |_, at| at.elapsed() < ttl);
        }
        Ok(user)
    }

    async fn allowed(&self, user: &UserInfo, attributes: Attributes) -> Result<bool, AuthError> {
        let key = (user.clone(), attributes);
        let cached = self.decisions.lock().ok().and_then(|cache| {
            cache
                .get(&key)
                .filter(|(allowed, at)| at.elapsed() < self.ttls.decision(*allowed))
                .map(|(allowed, _)| *allowed)
        });
        if let Some(allowed) = cached {
            return Ok(allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                uid: user.uid.clone(),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(attributes.verb.into()),
                    version: Some("v1".into()),
                    resource: Some("nodes".into()),
                    subresource: Some(attributes.subresource.into()),
                    name: Some(self.node_name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = {
            let _turn = self.reviews.acquire().await;
            Api::<SubjectAccessReview>::all(self.client.clone())
                .create(&PostParams::default(), &review)
                .await?
        };
        let allowed = answer.status.is_some_and(|s| s.allowed);
        if let Ok(mut cache) = self.decisions.lock() {
            let ttls = self.ttls;
            remember(&mut cache, key, allowed, |allowed, at| {
                at.elapsed() < ttls.decision(*allowed)
            });
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_stay_bounded_and_make_room_from_expired_answers() {
        let mut cache: HashMap<u32, (bool, Instant)> = HashMap::new();
        for key in 0..(CACHE_ENTRIES as u32 + 100) {
            remember(&mut cache, key, true, |_, _| true);
        }
        assert_eq!(
            cache.len(),
            CACHE_ENTRIES,
            "full of fresh answers: new ones wait"
        );
        remember(&mut cache, u32::MAX, false, |_, _| false);
        assert_eq!(cache.len(), 1, "expired answers make room");
        assert!(cache.contains_key(&u32::MAX));
    }

    #[test]
    fn paths_map_to_the_kubelets_subresources_and_verbs() {
        let cases = [
            ("GET", "/stats/summary", "get", "stats"),
            ("GET", "/metrics/resource", "get", "metrics"),
            ("GET", "/metrics", "get", "metrics"),
            ("GET", "/logs/syslog", "get", "log"),
            ("GET", "/containerLogs/default/web/c", "get", "proxy"),
            ("POST", "/exec/default/web/c", "create", "proxy"),
            ("GET", "/portForward/default/web", "get", "proxy"),
            ("GET", "/pods", "get", "proxy"),
            ("GET", "/statsfoo", "get", "proxy"),
        ];
        for (method, path, verb, subresource) in cases {
            assert_eq!(
                attributes(method, path),
                Attributes { verb, subresource },
                "{method} {path}"
            );
        }
    }
}
