//! Image references as Docker and the Kubernetes image conventions read them. Pure.

/// An image reference as Docker and the Kubernetes image conventions read it: a name
/// without a registry is on `docker.io`, and a single-component one under `library/`.
/// `nginx:1.25` is `docker.io/library/nginx:1.25`; `localhost/x` and `quay.io/x` stay.
pub fn normalize_image(image: &str) -> String {
    let is_registry = |c: &str| c.contains('.') || c.contains(':') || c == "localhost";
    match image.split_once('/') {
        Some(("docker.io" | "index.docker.io", path)) => on_docker_hub(path),
        Some((first, _)) if is_registry(first) => image.to_string(),
        _ => on_docker_hub(image),
    }
}

fn on_docker_hub(path: &str) -> String {
    if path.contains('/') {
        format!("docker.io/{path}")
    } else {
        format!("docker.io/library/{path}")
    }
}

/// The repository an image reference names, normalized, without tag or digest: what
/// the kubelet looks registry credentials up by (`parsers.ParseImageName`).
/// `nginx:1.25` is `docker.io/library/nginx`; `registry:5000/app@sha256:…` is
/// `registry:5000/app`.
pub fn repository(image: &str) -> String {
    let normalized = normalize_image(image);
    let without_digest = normalized
        .split_once('@')
        .map_or(normalized.as_str(), |(name, _)| name);
    // A tag is a `:` after the last `/`; one before it is a registry's port.
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].find(':') {
        Some(colon) => without_digest[..last_slash + colon].to_string(),
        None => without_digest.to_string(),
    }
}

/// The kubelet's `imageID` of a container: the repository digest that CRI runtimes
/// report (`docker.io/library/busybox@sha256:…`) for the image the container was made
/// from, or its image ID (`sha256:…`) when the image has no digest.
pub fn image_id(image_name: &str, digest: Option<&str>, id: &str) -> String {
    match digest.filter(|d| !d.is_empty()) {
        Some(digest) if !image_name.is_empty() => format!("{}@{digest}", repository(image_name)),
        _ if id.starts_with("sha256:") => id.to_string(),
        _ => format!("sha256:{id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_normalize_as_docker_reads_them() {
        let cases = [
            ("busybox", "docker.io/library/busybox"),
            ("busybox:1.35", "docker.io/library/busybox:1.35"),
            ("acme/app", "docker.io/acme/app"),
            ("docker.io/busybox", "docker.io/library/busybox"),
            ("index.docker.io/busybox", "docker.io/library/busybox"),
            ("index.docker.io/acme/app", "docker.io/acme/app"),
            ("localhost/busybox:1.35", "localhost/busybox:1.35"),
            ("registry:5000/app", "registry:5000/app"),
            ("quay.io/a/b@sha256:00", "quay.io/a/b@sha256:00"),
        ];
        for (image, normalized) in cases {
            assert_eq!(normalize_image(image), normalized, "{image}");
        }
    }

    #[test]
    fn the_image_id_is_the_repository_digest_or_else_the_image_id() {
        assert_eq!(
            image_id("localhost/busybox:1.35", Some("sha256:ef3f"), "d1cd"),
            "localhost/busybox@sha256:ef3f"
        );
        assert_eq!(
            image_id("nginx:1.25", Some("sha256:aa"), "bb"),
            "docker.io/library/nginx@sha256:aa"
        );
        assert_eq!(image_id("x", None, "d1cd"), "sha256:d1cd");
        assert_eq!(
            image_id("", Some("sha256:aa"), "sha256:d1cd"),
            "sha256:d1cd"
        );
    }

    #[test]
    fn the_repository_drops_tag_and_digest_but_not_a_port() {
        let cases = [
            ("busybox", "docker.io/library/busybox"),
            ("busybox:1.35", "docker.io/library/busybox"),
            ("registry:5000/app", "registry:5000/app"),
            ("registry:5000/team/app:v1", "registry:5000/team/app"),
            ("quay.io/a/b@sha256:00", "quay.io/a/b"),
            ("quay.io/a/b:1@sha256:00", "quay.io/a/b"),
        ];
        for (image, repository) in cases {
            assert_eq!(super::repository(image), repository, "{image}");
        }
    }
}
