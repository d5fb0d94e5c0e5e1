//! The agent's nftables table: a pod's connections to its owner's cluster ranges are
//! redirected to the agent's proxy on the pod network's gateway address, and its UDP
//! datagrams there to the agent's UDP proxy (see [`super::udp`]). Rules are per
//! pod address, so that agents sharing one host and one pod network (tests, or two
//! owners giving the same subnet) each redirect only their own pods.

use std::fmt::Write;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

use crate::runtime::MacAddress;

/// One pod's redirects: its TCP connections to `ranges` go to `proxy`, its datagrams
/// there to `udp_proxy`, and with `dns` its DNS queries to the gateway (its nameserver)
/// go to those relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub pod_ip: Ipv4Addr,
    /// Matched too where known: an IP is reused, a MAC is not.
    pub pod_mac: Option<MacAddress>,
    pub ranges: Vec<Ipv4Net>,
    pub proxy: SocketAddrV4,
    pub udp_proxy: SocketAddrV4,
    pub dns: Option<DnsRelays>,
}

/// Where a pod network's DNS queries go: over UDP, and over TCP (after a truncated
/// answer), each to a relay of its own on the gateway address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsRelays {
    pub udp: SocketAddrV4,
    pub tcp: SocketAddrV4,
}

/// The chain of the agent's table that holds the redirects.
const CHAIN: &str = "cluster_egress";

/// The agent's table name: one per agent, as several may share a host.
pub fn table_name(agent: &str) -> String {
    let tail: String = agent
        .chars()
        .rev()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("beemesh_{tail}")
}

/// An `nft -f` script that replaces the table with one whose chain holds
/// `redirects`, in one transaction.
pub fn replace_table<'a>(table: &str, redirects: impl IntoIterator<Item = &'a Redirect>) -> String {
    let mut script = delete_table(table);
    // Before the runtime's own DNAT (iptables' nat PREROUTING, priority dstnat): the
    // first NAT of a connection is the one that holds.
    let _ = writeln!(
        script,
        "table ip {table} {{\n  chain {CHAIN} {{\n    type nat hook prerouting priority dstnat - 10; policy accept;\n  }}\n}}"
    );
    script.push_str(&add_rules(table, redirects));
    script
}

/// An `nft -f` script that adds the rules of `redirects` to the table's chain, which
/// must exist; the rules it holds stay.
pub fn add_rules<'a>(table: &str, redirects: impl IntoIterator<Item = &'a Redirect>) -> String {
    let mut script = String::new();
    for redirect in redirects {
        let rule = format!("add rule ip {table} {CHAIN} {}", source(redirect));
        if !redirect.ranges.is_empty() {
            let ranges: Vec<String> = redirect.ranges.iter().map(ToString::to_string).collect();
            for (protocol, proxy) in [("tcp", redirect.proxy), ("udp", redirect.udp_proxy)] {
                let _ = writeln!(
                    script,
                    "{rule} ip daddr {{ {} }} meta l4proto {protocol} dnat to {proxy}",
                    ranges.join(", "),
                );
            }
        }
        if let Some(dns) = redirect.dns {
            for (protocol, relay) in [("udp", dns.udp), ("tcp", dns.tcp)] {
                let _ = writeln!(
                    script,
                    "{rule} ip daddr {} {protocol} dport 53 dnat to {relay}",
                    relay.ip(),
                );
            }
        }
    }
    script
}

/// What matches a pod's packets.
fn source(redirect: &Redirect) -> String {
    match redirect.pod_mac {
        Some(mac) => format!("ether saddr {mac} ip saddr {}", redirect.pod_ip),
        None => format!("ip saddr {}", redirect.pod_ip),
    }
}

/// An `nft -f` script that removes the table.
pub fn delete_table(table: &str) -> String {
    // Made first, so that deleting it cannot fail.
    format!("table ip {table}\ndelete table ip {table}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_the_agents_and_nft_safe() {
        assert_eq!(
            table_name("12D3KooWRkGhZzekg6sHoqK7xhuZNt7UbDpUcLgStXhRUR8ciXTX"),
            "beemesh_cLgStXhRUR8ciXTX"
        );
    }

    #[test]
    fn each_pod_is_redirected_to_its_networks_proxy() {
        let redirect = |ip: &str, proxy: &str| Redirect {
            pod_ip: ip.parse().expect("ip"),
            pod_mac: None,
            ranges: vec!["10.43.0.0/16".parse().expect("cidr")],
            proxy: proxy.parse().expect("addr"),
            udp_proxy: "10.64.0.1:40009".parse().expect("addr"),
            dns: None,
        };
        let redirects = [
            redirect("10.64.0.5", "10.64.0.1:40001"),
            Redirect {
                udp_proxy: "10.64.1.1:40010".parse().expect("addr"),
                dns: Some(DnsRelays {
                    udp: "10.64.1.1:40003".parse().expect("addr"),
                    tcp: "10.64.1.1:40004".parse().expect("addr"),
                }),
                pod_mac: Some("0a:58:0A:40:01:09".parse().expect("mac")),
                ..redirect("10.64.1.9", "10.64.1.1:40002")
            },
        ];
        let script = replace_table("beemesh_x", &redirects);
        let chain = "table ip beemesh_x {\n  chain cluster_egress {\n    type nat hook prerouting priority dstnat - 10; policy accept;\n  }\n}\n";
        let first = "add rule ip beemesh_x cluster_egress ip saddr 10.64.0.5 ip daddr { 10.43.0.0/16 } meta l4proto tcp dnat to 10.64.0.1:40001\nadd rule ip beemesh_x cluster_egress ip saddr 10.64.0.5 ip daddr { 10.43.0.0/16 } meta l4proto udp dnat to 10.64.0.1:40009\n";
        let second = "add rule ip beemesh_x cluster_egress ether saddr 0a:58:0a:40:01:09 ip saddr 10.64.1.9 ip daddr { 10.43.0.0/16 } meta l4proto tcp dnat to 10.64.1.1:40002\nadd rule ip beemesh_x cluster_egress ether saddr 0a:58:0a:40:01:09 ip saddr 10.64.1.9 ip daddr { 10.43.0.0/16 } meta l4proto udp dnat to 10.64.1.1:40010\nadd rule ip beemesh_x cluster_egress ether saddr 0a:58:0a:40:01:09 ip saddr 10.64.1.9 ip daddr 10.64.1.1 udp dport 53 dnat to 10.64.1.1:40003\nadd rule ip beemesh_x cluster_egress ether saddr 0a:58:0a:40:01:09 ip saddr 10.64.1.9 ip daddr 10.64.1.1 tcp dport 53 dnat to 10.64.1.1:40004\n";
        assert_eq!(
            script,
            format!("table ip beemesh_x\ndelete table ip beemesh_x\n{chain}{first}{second}")
        );
        // A new pod's rules go into the table as it is: nothing is removed.
        assert_eq!(add_rules("beemesh_x", &redirects[1..]), second);
        // The agent starts with its chain made and empty.
        assert_eq!(
            replace_table("beemesh_x", []),
            format!("table ip beemesh_x\ndelete table ip beemesh_x\n{chain}")
        );
        assert_eq!(
            delete_table("beemesh_x"),
            "table ip beemesh_x\ndelete table ip beemesh_x\n"
        );
    }
}
