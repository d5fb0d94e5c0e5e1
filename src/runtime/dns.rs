//! A pod's resolver configuration (`/etc/resolv.conf`) from its `dnsPolicy` and
//! `dnsConfig`, formed as the kubelet forms it (`pkg/kubelet/network/dns`): the agent's
//! own resolv.conf is the base (none for `None`), the pod's `dnsConfig` is appended
//! without duplicates (options merged by name, the pod's winning), and the result is cut
//! to the resolver's limits with a `DNSConfigForming` warning.
//!
//! `ClusterFirst` takes the cluster's DNS where the pod's owner relays it ([`ClusterDns`]:
//! the agent's stub on the pod network's gateway); without it, it falls back to
//! `Default` with the kubelet's `MissingClusterDNS` warning, as a kubelet without
//! `--cluster-dns` does. Pure: the agent reads its resolv.conf ([`parse_resolv_conf`])
//! and hands it in.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{PodDNSConfig, PodSpec};

/// glibc reads at most three nameservers (the API's `MaxDNSNameservers`).
pub const MAX_NAMESERVERS: usize = 3;
/// The API's `MaxDNSSearchPaths` and `MaxDNSSearchListChars` (expanded DNS config, GA in
/// Kubernetes 1.28).
pub const MAX_SEARCH_PATHS: usize = 32;
pub const MAX_SEARCH_LIST_CHARS: usize = 2048;
/// Longer search paths make some resolvers (glibc 2.28) abort.
const MAX_SEARCH_PATH_LEN: usize = 253;
/// The kubelet reads at most this much of a resolv.conf.
pub const MAX_RESOLV_CONF_BYTES: u64 = 10 << 20;

/// The kubelet's warning when a pod asks for cluster DNS it cannot give.
pub const MISSING_CLUSTER_DNS: &str = "MissingClusterDNS";

/// What a resolv.conf says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    /// `name` or `name:value`, as on an `options` line.
    pub options: Vec<String>,
}

/// Parses a resolv.conf as the kubelet does: `nameserver` lines accumulate, the last
/// `search` and `options` lines win, a trailing dot on a search path is dropped.
/// Nameservers on loopback are left out: they answer on the agent's host, not inside the
/// pod's network namespace (Podman leaves them out too).
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("nameserver") => {
                if let Some(server) = fields.next() {
                    let loopback = server.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                    if !loopback {
                        conf.nameservers.push(server.to_owned());
                    }
                }
            }
            Some("search") => {
                conf.searches = fields.map(|s| s.trim_end_matches('.').to_owned()).collect();
            }
            Some("options") => conf.options = fields.map(str::to_owned).collect(),
            _ => {}
        }
    }
    conf
}

/// A pod's resolver configuration and what forming it should tell the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDns {
    /// None: the runtime's default, which is the agent's own configuration (`Default`
    /// without a `dnsConfig`).
    pub resolv: Option<ResolvConf>,
    /// Messages of `DNSConfigForming` warnings: what had to be cut.
    pub warnings: Vec<String>,
}

/// The cluster's DNS as a pod on the mesh reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDns {
    /// Where the pod sends its queries (the agent relays them to the pod's owner).
    pub nameserver: IpAddr,
    /// The cluster's domain (the kubelet's `--cluster-domain`), e.g. `cluster.local`.
    pub domain: String,
}

/// The kubelet's options for `ClusterFirst` (`defaultDNSOptions`).
const CLUSTER_OPTIONS: &str = "ndots:5";

/// The resolver configuration for a pod in `namespace` with `spec`, `host` being the
/// agent's. `ClusterFirst` (and an unset policy) uses `cluster` as the kubelet uses `--cluster-dns` (the only
/// nameserver; the cluster's search paths before the host's; `ndots:5`), and is
/// `Default` without it; see [`wants_cluster_dns`] for its warning then.
pub fn pod_dns(
    spec: &PodSpec,
    namespace: &str,
    host: &ResolvConf,
    cluster: Option<&ClusterDns>,
) -> PodDns {
    let mut warnings = Vec::new();
    let base = match (spec.dns_policy.as_deref(), cluster) {
        (Some("None"), _) => Some(ResolvConf::default()),
        // Unset is ClusterFirst, as the API server defaults it, where there are cluster
        // names (a standalone node's Services).
        (None | Some("ClusterFirst" | "ClusterFirstWithHostNet"), Some(cluster)) => {
            let domain = &cluster.domain;
            let searches = [
                format!("{namespace}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.clone(),
            ];
            Some(ResolvConf {
                nameservers: vec![cluster.nameserver.to_string()],
                searches: without_duplicates(searches.into_iter().chain(host.searches.clone())),
                options: vec![CLUSTER_OPTIONS.to_owned()],
            })
        }
        _ => None,
    };
    let Some(config) = &spec.dns_config else {
        let resolv = base.map(|mut resolv| {
            fit_limits(&mut resolv, &mut warnings);
            resolv
        });
        return PodDns { resolv, warnings };
    };
    let mut resolv = append(base.unwrap_or_else(|| host.clone()), config);
    fit_limits(&mut resolv, &mut warnings);
    PodDns {
        resolv: Some(resolv),
        warnings,
    }
}

/// The pod's event message for `ClusterFirst`, as a kubelet without cluster DNS words it;
/// `pod` as the kubelet names it, `name_namespace(uid)`.
pub fn missing_cluster_dns(pod: &str) -> String {
    format!(
        "pod: \"{pod}\". agent does not have ClusterDNS IP configured and cannot create Pod \
         using \"ClusterFirst\" policy. Falling back to \"Default\" policy."
    )
}

/// Whether a pod with `spec` gets the `MissingClusterDNS` warning. An unset policy comes
/// only from manifests written for BeeMesh (the API server defaults the field), where
/// there is no cluster to expect names from.
pub fn wants_cluster_dns(spec: &PodSpec) -> bool {
    matches!(
        spec.dns_policy.as_deref(),
        Some("ClusterFirst" | "ClusterFirstWithHostNet")
    )
}

fn append(mut base: ResolvConf, config: &PodDNSConfig) -> ResolvConf {
    base.nameservers = without_duplicates(
        base.nameservers
            .into_iter()
            .chain(config.nameservers.iter().flatten().cloned()),
    );
    base.searches = without_duplicates(
        base.searches
            .into_iter()
            .chain(config.searches.iter().flatten().cloned()),
    );
    // Ordered by name, so that the same pod gets the same file every time (the kubelet's
    // map gives a random order).
    let mut options: BTreeMap<String, Option<String>> = base
        .options
        .iter()
        .map(|option| match option.split_once(':') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (option.clone(), None),
        })
        .collect();
    for option in config.options.iter().flatten() {
        let Some(name) = option.name.clone() else {
            continue;
        };
        options.insert(name, option.value.clone().filter(|v| !v.is_empty()));
    }
    base.options = options
        .into_iter()
        .map(|(name, value)| match value {
            Some(value) => format!("{name}:{value}"),
            None => name,
        })
        .collect();
    base
}

fn without_duplicates(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen = Vec::new();
    for item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen
}

fn fit_limits(resolv: &mut ResolvConf, warnings: &mut Vec<String>) {
    if resolv.nameservers.len() > MAX_NAMESERVERS {
        resolv.nameservers.truncate(MAX_NAMESERVERS);
        warnings.push(format!(
            "Nameserver limits were exceeded, some nameservers have been omitted, the \
             applied nameserver line is: {}",
            resolv.nameservers.join(" ")
        ));
    }
    let before = resolv.searches.len();
    resolv.searches.truncate(MAX_SEARCH_PATHS);
    let mut cut = resolv.searches.len() < before;
    let count = resolv.searches.len();
    resolv.searches.retain(|s| s.len() <= MAX_SEARCH_PATH_LEN);
    cut |= resolv.searches.len() < count;
    while resolv.searches.join(" ").len() > MAX_SEARCH_LIST_CHARS {
        resolv.searches.pop();
        cut = true;
    }
    if cut {
        warnings.push(format!(
            "Search Line limits were exceeded, some search paths have been omitted, the \
             applied search line is: {}",
            resolv.searches.join(" ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodDNSConfigOption;

    impl ResolvConf {
        /// The file's text, as the runtime would write it.
        fn render(&self) -> String {
            let mut text = String::new();
            for server in &self.nameservers {
                text.push_str(&format!("nameserver {server}\n"));
            }
            if !self.searches.is_empty() {
                text.push_str(&format!("search {}\n", self.searches.join(" ")));
            }
            if !self.options.is_empty() {
                text.push_str(&format!("options {}\n", self.options.join(" ")));
            }
            text
        }
    }

    fn host() -> ResolvConf {
        parse_resolv_conf(
            "# generated\nnameserver 10.0.0.2\nnameserver 127.0.0.53\nsearch old.example\n\
             search corp.example. lab.example\noptions ndots:2 edns0\n",
        )
    }

    fn spec(policy: Option<&str>, config: Option<PodDNSConfig>) -> PodSpec {
        PodSpec {
            dns_policy: policy.map(str::to_owned),
            dns_config: config,
            ..Default::default()
        }
    }

    fn option(name: &str, value: Option<&str>) -> PodDNSConfigOption {
        PodDNSConfigOption {
            name: Some(name.into()),
            value: value.map(str::to_owned),
        }
    }

    #[test]
    fn the_host_file_is_read_as_the_kubelet_reads_it_without_loopback_servers() {
        assert_eq!(
            host(),
            ResolvConf {
                nameservers: vec!["10.0.0.2".into()],
                searches: vec!["corp.example".into(), "lab.example".into()],
                options: vec!["ndots:2".into(), "edns0".into()],
            }
        );
    }

    #[test]
    fn default_without_dns_config_is_the_runtimes_own_and_tells_nothing() {
        let dns = pod_dns(&spec(Some("Default"), None), "shop", &host(), None);
        assert_eq!(dns.resolv, None);
        assert!(dns.warnings.is_empty());
        assert_eq!(
            pod_dns(&spec(None, None), "shop", &host(), None).resolv,
            None
        );
    }

    #[test]
    fn cluster_first_uses_the_relayed_cluster_dns_as_the_kubelet_uses_cluster_dns() {
        let cluster = ClusterDns {
            nameserver: "10.64.3.1".parse().expect("ip"),
            domain: "cluster.local".into(),
        };
        let dns = pod_dns(
            &spec(Some("ClusterFirst"), None),
            "shop",
            &host(),
            Some(&cluster),
        );
        assert_eq!(
            dns.resolv.expect("resolv").render(),
            "nameserver 10.64.3.1\nsearch shop.svc.cluster.local svc.cluster.local cluster.local corp.example lab.example\noptions ndots:5\n"
        );
        // dnsConfig is appended, as to any policy's base.
        let config = PodDNSConfig {
            nameservers: Some(vec!["192.0.2.53".into()]),
            searches: None,
            options: Some(vec![option("ndots", Some("2"))]),
        };
        let dns = pod_dns(
            &spec(Some("ClusterFirst"), Some(config)),
            "shop",
            &host(),
            Some(&cluster),
        );
        let resolv = dns.resolv.expect("resolv");
        assert_eq!(resolv.nameservers, ["10.64.3.1", "192.0.2.53"]);
        assert_eq!(resolv.options, ["ndots:2"]);
        // Unset is ClusterFirst.
        let unset = pod_dns(&spec(None, None), "shop", &host(), Some(&cluster));
        assert_eq!(unset.resolv.expect("resolv").nameservers, ["10.64.3.1"]);
        // Default stays the agent's own.
        let dns = pod_dns(
            &spec(Some("Default"), None),
            "shop",
            &host(),
            Some(&cluster),
        );
        assert_eq!(dns.resolv, None);
    }

    #[test]
    fn cluster_first_falls_back_to_default_with_the_kubelets_warning() {
        let dns = pod_dns(&spec(Some("ClusterFirst"), None), "shop", &host(), None);
        assert_eq!(dns.resolv, None);
        assert!(wants_cluster_dns(&spec(Some("ClusterFirst"), None)));
        assert!(
            missing_cluster_dns("web_shop(1f)").starts_with("pod: \"web_shop(1f)\". agent does")
        );
        assert!(!wants_cluster_dns(&spec(None, None)));
    }

    #[test]
    fn none_uses_only_the_pods_dns_config() {
        let config = PodDNSConfig {
            nameservers: Some(vec!["192.0.2.53".into()]),
            searches: Some(vec!["svc.example".into()]),
            options: Some(vec![option("ndots", Some("1"))]),
        };
        let dns = pod_dns(&spec(Some("None"), Some(config)), "shop", &host(), None);
        assert_eq!(
            dns.resolv.unwrap().render(),
            "nameserver 192.0.2.53\nsearch svc.example\noptions ndots:1\n"
        );
    }

    #[test]
    fn dns_config_is_appended_to_the_hosts_with_the_pods_options_winning() {
        let config = PodDNSConfig {
            nameservers: Some(vec!["10.0.0.2".into(), "192.0.2.53".into()]),
            searches: Some(vec!["lab.example".into(), "extra.example".into()]),
            options: Some(vec![
                option("ndots", Some("5")),
                option("single-request", None),
            ]),
        };
        let dns = pod_dns(&spec(Some("Default"), Some(config)), "shop", &host(), None);
        let resolv = dns.resolv.unwrap();
        assert_eq!(resolv.nameservers, ["10.0.0.2", "192.0.2.53"]);
        assert_eq!(
            resolv.searches,
            ["corp.example", "lab.example", "extra.example"]
        );
        assert_eq!(resolv.options, ["edns0", "ndots:5", "single-request"]);
        assert!(dns.warnings.is_empty());
    }

    #[test]
    fn what_exceeds_the_resolvers_limits_is_cut_and_said() {
        let config = PodDNSConfig {
            nameservers: Some(vec![
                "192.0.2.1".into(),
                "192.0.2.2".into(),
                "192.0.2.3".into(),
            ]),
            searches: Some(
                (0..40)
                    .map(|i| format!("{i}.{}", "s".repeat(60)))
                    .chain(std::iter::once("x".repeat(300)))
                    .collect(),
            ),
            options: None,
        };
        let dns = pod_dns(&spec(Some("Default"), Some(config)), "shop", &host(), None);
        let resolv = dns.resolv.unwrap();
        assert_eq!(resolv.nameservers, ["10.0.0.2", "192.0.2.1", "192.0.2.2"]);
        assert!(resolv.searches.len() <= MAX_SEARCH_PATHS);
        assert!(resolv.searches.join(" ").len() <= MAX_SEARCH_LIST_CHARS);
        assert_eq!(dns.warnings.len(), 2);
        assert!(dns.warnings[0].ends_with("nameserver line is: 10.0.0.2 192.0.2.1 192.0.2.2"));
        assert!(dns.warnings[1].starts_with("Search Line limits were exceeded"));
    }
}
