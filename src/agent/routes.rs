//! The host's IPv4 routes, so that the agent never puts a pod network over a network
//! its host already reaches: a bridge for an owner's subnet that overlaps the host's
//! LAN would take the host's own traffic (agents protect their host).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// A route of the host: where it goes and through which interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub interface: String,
    pub destination: Ipv4Net,
}

/// The routes in the text of `/proc/net/route` (addresses as hexadecimal numbers in
/// the host's byte order, which is little-endian on every host BeeMesh runs on); lines
/// that do not parse are skipped.
pub fn parse_proc_net_route(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (interface, destination, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
            let address = Ipv4Addr::from(u32::from_str_radix(destination, 16).ok()?.to_le_bytes());
            let mask = u32::from_str_radix(mask, 16).ok()?.to_le_bytes();
            let prefix = u32::from_be_bytes(mask).leading_ones();
            let destination = Ipv4Net::new(address, u8::try_from(prefix).ok()?).ok()?;
            Some(Route {
                interface: (*interface).to_owned(),
                destination,
            })
        })
        .collect()
}

/// The first route of the host that a pod network on `subnet` would overlap: default
/// routes overlap everything and do not count, nor does the route of that very subnet
/// (the agent's own pod network, already up).
pub fn overlapping(routes: &[Route], subnet: Ipv4Net) -> Option<&Route> {
    routes.iter().find(|route| {
        route.destination.prefix_len() > 0
            && route.destination != subnet
            && crate::node::subnets::overlaps(route.destination, subnet)
    })
}

/// The host's routes; none where `/proc/net/route` cannot be read.
pub async fn host_routes() -> Vec<Route> {
    tokio::fs::read_to_string("/proc/net/route")
        .await
        .map(|text| parse_proc_net_route(&text))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
podman1\t0000400A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t0000480A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
broken line
";

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    #[test]
    fn proc_net_route_is_read() {
        let routes = parse_proc_net_route(ROUTES);
        let destinations: Vec<String> = routes.iter().map(|r| r.destination.to_string()).collect();
        assert_eq!(
            destinations,
            ["0.0.0.0/0", "192.0.2.0/24", "10.64.0.0/24", "10.72.0.0/16"]
        );
        assert_eq!(routes[3].interface, "wlan0");
    }

    #[test]
    fn a_subnet_over_a_host_network_is_found_and_its_own_route_is_not() {
        let routes = parse_proc_net_route(ROUTES);
        assert_eq!(overlapping(&routes, net("10.64.0.0/24")), None);
        assert_eq!(overlapping(&routes, net("10.64.1.0/24")), None);
        let hit = overlapping(&routes, net("10.72.3.0/24")).expect("overlaps wlan0");
        assert_eq!(hit.interface, "wlan0");
        assert!(overlapping(&routes, net("192.0.0.0/16")).is_some());
    }
}
