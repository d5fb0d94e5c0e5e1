//! A pod network's bridge keeps one MAC address for as long as it exists.
//!
//! Linux gives a bridge whose address was never set the lowest address among its
//! ports, and netavark before 1.9 (containers/netavark#833; Debian 12 has 1.4) leaves
//! it unset. So the gateway's address moves whenever a pod joins with a (random) veth
//! address lower than the others', or the pod with the lowest leaves. A pod that has
//! another port's address in its ARP cache for the gateway then loses what it sends
//! there until the entry is resolved again: its DNS queries and cluster connections to
//! the agent's relays, and everything it sends off the host. Measured here: 25 s. An
//! address that was set once, even to the one it already had, is never recalculated
//! (`NET_ADDR_SET`); a later netavark sets it itself, and this finds it set.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use super::MacAddress;

/// `addr_assign_type` of an address set from user space (`NET_ADDR_SET` in
/// include/uapi/linux/netdevice.h).
const NET_ADDR_SET: &str = "3";

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("{0:?} is not a network interface name")]
    BadName(String),
    #[error("reading {path}: {source}", path = .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {text:?} is not a MAC address", path = .path.display())]
    BadAddress { path: PathBuf, text: String },
    #[error("setting the MAC address of {interface}: {source}")]
    Set {
        interface: String,
        source: std::io::Error,
    },
}

/// Whether the kernel would accept `name` for a network interface (`dev_valid_name`).
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// Fixes the address of `interface` to the one it has now; None if it already was
/// fixed, else the address. Blocking (sysfs and an ioctl, both quick).
pub fn pin_address(interface: &str) -> Result<Option<MacAddress>, BridgeError> {
    if !is_interface_name(interface) {
        return Err(BridgeError::BadName(interface.to_owned()));
    }
    let sysfs = PathBuf::from("/sys/class/net").join(interface);
    let read = |file: &str| {
        let path = sysfs.join(file);
        std::fs::read_to_string(&path)
            .map(|text| text.trim().to_owned())
            .map_err(|source| BridgeError::Read { path, source })
    };
    if read("addr_assign_type")? == NET_ADDR_SET {
        return Ok(None);
    }
    let text = read("address")?;
    let address: MacAddress = text.parse().map_err(|_| BridgeError::BadAddress {
        path: sysfs.join("address"),
        text,
    })?;
    set_address(interface, address).map_err(|source| BridgeError::Set {
        interface: interface.to_owned(),
        source,
    })?;
    Ok(Some(address))
}

/// `SIOCSIFHWADDR`, as `ip link set <interface> address <address>` does.
fn set_address(interface: &str, address: MacAddress) -> std::io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: `ifreq` is plain old data, for which all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name is shorter than IFNAMSIZ (checked), so the last byte stays NUL.
    for (slot, byte) in request.ifr_name.iter_mut().zip(interface.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: as above.
    let mut hardware: libc::sockaddr = unsafe { std::mem::zeroed() };
    hardware.sa_family = libc::ARPHRD_ETHER;
    for (slot, byte) in hardware.sa_data.iter_mut().zip(address.0) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_hwaddr = hardware;
    // SAFETY: the socket is open for the call's length and `request` is a valid
    // `ifreq` that outlives it; the kernel only reads it.
    let done = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFHWADDR as _, &request) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_as_the_kernel_checks_them() {
        for good in ["podman1", "br-0", "a", "fifteen_chars_x"] {
            assert!(is_interface_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen_chars_xx",
            "a/b",
            "a:b",
            "a b",
            "a\nb",
            "a\0b",
        ] {
            assert!(!is_interface_name(bad), "{bad:?}");
            assert!(matches!(pin_address(bad), Err(BridgeError::BadName(_))));
        }
    }

    #[test]
    fn a_missing_interface_is_an_error_that_names_it() {
        let error = pin_address("bm-absent0").expect_err("no such interface");
        assert!(
            error
                .to_string()
                .starts_with("reading /sys/class/net/bm-absent0/addr_assign_type"),
            "{error}"
        );
    }
}
