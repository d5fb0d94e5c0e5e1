//! Mesh pods' UDP to cluster Services. nftables redirects (DNAT) a pod's datagrams to
//! its cluster ranges to the agent's UDP proxy, as it does TCP connections; a datagram
//! has no `SO_ORIGINAL_DST`, so the proxy asks conntrack where each new flow was going
//! (ctnetlink, by the redirected flow's reply tuple). The answers the proxy sends back
//! to the pod match that conntrack entry, which rewrites their source to the Service's.
//!
//! `tproxy` would keep the destination, but it loses the datagram wherever
//! `br_netfilter` runs the hooks on bridged frames (most Kubernetes and Podman hosts):
//! the socket it assigns is dropped before the IP layer.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

/// How long a flow lives without a datagram either way (conntrack's UDP timeout).
pub const FLOW_IDLE: Duration = Duration::from_secs(30);
/// Datagrams of a flow waiting for its stream; more are dropped, as UDP may.
pub const FLOW_QUEUE: usize = 64;

/// The flows being relayed, by the pod address and port they come from.
#[derive(Clone, Default)]
pub struct Flows(Arc<Mutex<HashMap<SocketAddrV4, mpsc::Sender<Vec<u8>>>>>);

/// What became of a datagram handed to [`Flows::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Queued for its flow.
    Queued,
    /// No flow from there yet.
    NoFlow,
    /// Its flow's queue is full: dropped, as UDP may.
    Dropped,
}

impl Flows {
    /// Hands a datagram to its flow.
    pub fn send(&self, from: SocketAddrV4, datagram: &[u8]) -> Handed {
        let flows = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match flows.get(&from) {
            Some(flow) => match flow.try_send(datagram.to_vec()) {
                Ok(()) => Handed::Queued,
                Err(_) => Handed::Dropped,
            },
            None => Handed::NoFlow,
        }
    }

    /// A new flow from `from`; its datagrams come out of the receiver.
    pub fn open(&self, from: SocketAddrV4) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(from, tx);
        rx
    }

    pub fn close(&self, from: SocketAddrV4) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&from);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    #[error("conntrack has no such flow (error {0})")]
    Refused(i32),
    #[error("bad netlink answer: {0}")]
    Malformed(&'static str),
}

// ctnetlink, from linux/netfilter/nfnetlink.h and nfnetlink_conntrack.h.
const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLMSG_HEADER: usize = 16;
const NFGENMSG: usize = 4;

/// Where the UDP flow from `pod` to the proxy at `proxy` was going before the redirect.
/// Blocking (one netlink round trip).
pub fn original_destination(
    proxy: SocketAddrV4,
    pod: SocketAddrV4,
) -> Result<SocketAddrV4, ConntrackError> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a valid descriptor and a timeval of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let request = get_by_reply(proxy, pod);
    // SAFETY: the buffer is live and of the stated length; netlink's kernel end is the
    // default destination of an unbound netlink socket.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let mut answer = vec![0u8; 8192];
    // SAFETY: as above, into a live buffer of its length.
    let len = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            answer.as_mut_ptr().cast(),
            answer.len(),
            0,
        )
    };
    let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
    parse_original(&answer[..len])
}

/// A ctnetlink GET of the UDP entry whose reply goes from `proxy` to `pod`.
pub fn get_by_reply(proxy: SocketAddrV4, pod: SocketAddrV4) -> Vec<u8> {
    let ip = [
        attribute(CTA_IP_V4_SRC, &proxy.ip().octets()),
        attribute(CTA_IP_V4_DST, &pod.ip().octets()),
    ]
    .concat();
    let proto = [
        attribute(CTA_PROTO_NUM, &[libc::IPPROTO_UDP as u8]),
        attribute(CTA_PROTO_SRC_PORT, &proxy.port().to_be_bytes()),
        attribute(CTA_PROTO_DST_PORT, &pod.port().to_be_bytes()),
    ]
    .concat();
    let tuple = [
        attribute(CTA_TUPLE_IP | NLA_F_NESTED, &ip),
        attribute(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto),
    ]
    .concat();
    let body = attribute(CTA_TUPLE_REPLY | NLA_F_NESTED, &tuple);
    let len = NLMSG_HEADER + NFGENMSG + body.len();
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&(len as u32).to_ne_bytes());
    message.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    message.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]); // nfgenmsg
    message.extend_from_slice(&body);
    message
}

/// One netlink attribute: length, type, the value, padded to 4 bytes.
fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut attribute = Vec::with_capacity(len.next_multiple_of(4));
    attribute.extend_from_slice(&(len as u16).to_ne_bytes());
    attribute.extend_from_slice(&kind.to_ne_bytes());
    attribute.extend_from_slice(value);
    attribute.resize(len.next_multiple_of(4), 0);
    attribute
}

/// The attributes in `bytes`, as (type without flags, value).
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let header = bytes.get(..4)?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & !NLA_F_NESTED;
        let value = bytes.get(4..len)?;
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, value))
    })
}

fn find(bytes: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(bytes).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// The original tuple's destination in ctnetlink's answer to [`get_by_reply`].
pub fn parse_original(answer: &[u8]) -> Result<SocketAddrV4, ConntrackError> {
    let header = answer
        .get(..NLMSG_HEADER)
        .ok_or(ConntrackError::Malformed("short header"))?;
    let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let kind = u16::from_ne_bytes([header[4], header[5]]);
    let message = answer
        .get(NLMSG_HEADER..len)
        .ok_or(ConntrackError::Malformed("short message"))?;
    if kind == NLMSG_ERROR {
        let code = message
            .get(..4)
            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .ok_or(ConntrackError::Malformed("short error"))?;
        return Err(ConntrackError::Refused(code));
    }
    if kind != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
        return Err(ConntrackError::Malformed("not a conntrack entry"));
    }
    let attributes = message
        .get(NFGENMSG..)
        .ok_or(ConntrackError::Malformed("no attributes"))?;
    let tuple = find(attributes, CTA_TUPLE_ORIG).ok_or(ConntrackError::Malformed("no tuple"))?;
    let ip = find(tuple, CTA_TUPLE_IP).ok_or(ConntrackError::Malformed("no address"))?;
    let proto = find(tuple, CTA_TUPLE_PROTO).ok_or(ConntrackError::Malformed("no port"))?;
    let address: [u8; 4] = find(ip, CTA_IP_V4_DST)
        .and_then(|a| a.try_into().ok())
        .ok_or(ConntrackError::Malformed("no IPv4 destination"))?;
    let port: [u8; 2] = find(proto, CTA_PROTO_DST_PORT)
        .and_then(|p| p.try_into().ok())
        .ok_or(ConntrackError::Malformed("no destination port"))?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(address),
        u16::from_be_bytes(port),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddrV4 {
        text.parse().expect("address")
    }

    /// The kernel's answer: the entry with both tuples, as `conntrack -G` gets it.
    fn entry(
        original: (SocketAddrV4, SocketAddrV4),
        reply: (SocketAddrV4, SocketAddrV4),
    ) -> Vec<u8> {
        let tuple = |(src, dst): (SocketAddrV4, SocketAddrV4)| {
            let ip = [
                attribute(CTA_IP_V4_SRC, &src.ip().octets()),
                attribute(CTA_IP_V4_DST, &dst.ip().octets()),
            ]
            .concat();
            let proto = [
                attribute(CTA_PROTO_NUM, &[17]),
                attribute(CTA_PROTO_SRC_PORT, &src.port().to_be_bytes()),
                attribute(CTA_PROTO_DST_PORT, &dst.port().to_be_bytes()),
            ]
            .concat();
            [
                attribute(CTA_TUPLE_IP | NLA_F_NESTED, &ip),
                attribute(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto),
            ]
            .concat()
        };
        let body = [
            attribute(CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple(original)),
            attribute(CTA_TUPLE_REPLY | NLA_F_NESTED, &tuple(reply)),
            attribute(3, &[0, 0, 0, 8]), // CTA_STATUS
        ]
        .concat();
        let len = NLMSG_HEADER + NFGENMSG + body.len();
        let mut message = Vec::new();
        message.extend_from_slice(&(len as u32).to_ne_bytes());
        message.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8).to_ne_bytes());
        message.extend_from_slice(&[0; 10]);
        message.extend_from_slice(&[2, 0, 0, 0]);
        message.extend_from_slice(&body);
        message
    }

    #[test]
    fn the_request_names_the_reply_tuple() {
        let request = get_by_reply(addr("10.64.0.1:40000"), addr("10.64.0.7:5353"));
        assert_eq!(request.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(request[..4].try_into().expect("len")) as usize,
            request.len()
        );
        assert_eq!(u16::from_ne_bytes([request[4], request[5]]), 0x0101);
        let reply = find(&request[NLMSG_HEADER + NFGENMSG..], CTA_TUPLE_REPLY).expect("reply");
        let ip = find(reply, CTA_TUPLE_IP).expect("ip");
        assert_eq!(find(ip, CTA_IP_V4_SRC), Some(&[10, 64, 0, 1][..]));
        assert_eq!(find(ip, CTA_IP_V4_DST), Some(&[10, 64, 0, 7][..]));
        let proto = find(reply, CTA_TUPLE_PROTO).expect("proto");
        assert_eq!(find(proto, CTA_PROTO_NUM), Some(&[17][..]));
        assert_eq!(
            find(proto, CTA_PROTO_SRC_PORT),
            Some(&40000u16.to_be_bytes()[..])
        );
        assert_eq!(
            find(proto, CTA_PROTO_DST_PORT),
            Some(&5353u16.to_be_bytes()[..])
        );
    }

    #[test]
    fn the_original_destination_is_read_from_the_entry() {
        let (pod, service, proxy) = (
            addr("10.64.0.7:5353"),
            addr("10.43.0.10:53"),
            addr("10.64.0.1:40000"),
        );
        let answer = entry((pod, service), (proxy, pod));
        assert_eq!(parse_original(&answer).expect("parsed"), service);
    }

    #[test]
    fn errors_and_garbage_are_errors() {
        let mut error = Vec::new();
        error.extend_from_slice(&36u32.to_ne_bytes());
        error.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error.extend_from_slice(&[0; 10]);
        error.extend_from_slice(&(-2i32).to_ne_bytes());
        error.extend_from_slice(&[0; 16]);
        assert!(matches!(
            parse_original(&error),
            Err(ConntrackError::Refused(-2))
        ));
        let good = entry(
            (addr("10.64.0.7:1"), addr("10.43.0.10:53")),
            (addr("10.64.0.1:2"), addr("10.64.0.7:1")),
        );
        // Cut anywhere before the original tuple's end.
        let original_end =
            NLMSG_HEADER + NFGENMSG + usize::from(u16::from_ne_bytes([good[20], good[21]]));
        for cut in 0..original_end {
            let mut truncated = good[..cut].to_vec();
            if cut >= 4 {
                truncated[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            assert!(parse_original(&truncated).is_err(), "cut at {cut}");
        }
        let mut lying = good.clone();
        lying[16 + 4] = 0xff; // the first attribute's length past the end
        assert!(parse_original(&lying).is_err());
    }
}
