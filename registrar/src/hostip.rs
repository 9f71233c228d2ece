//! Detects the host IP when `HOST_IP` is not set: the IPv4 address of the interface that holds
//! the default route, else the first non-loopback IPv4 address. Reads local tables only; sends
//! nothing.

use std::net::{IpAddr, Ipv4Addr};

use legate_proto::registry::HostIp;

/// Why no host IP was detected.
#[derive(Debug, thiserror::Error)]
pub enum HostIpError {
    /// The interfaces cannot be listed.
    #[error("cannot list network interfaces ({0}): set HOST_IP")]
    Interfaces(#[source] nix::errno::Errno),
    /// None has a usable address.
    #[error("cannot detect the host IP: no non-loopback IPv4 address; set HOST_IP")]
    NoAddress,
    /// The one found is not a valid host IP.
    #[error("the detected host IP is refused ({0}): set HOST_IP")]
    Invalid(#[source] legate_proto::registry::ValidationError),
}

/// The detected host IP, or why there is none.
pub(crate) fn detect() -> Result<HostIp, HostIpError> {
    let default_interface = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|routes| default_route_interface(&routes));
    let addresses: Vec<(String, Ipv4Addr)> = nix::ifaddrs::getifaddrs()
        .map_err(HostIpError::Interfaces)?
        .filter_map(|ifaddr| {
            let ip = ifaddr.address?.as_sockaddr_in()?.ip();
            Some((ifaddr.interface_name, ip))
        })
        .filter(|(_, ip)| !ip.is_loopback() && !ip.is_link_local())
        .collect();
    let chosen = default_interface
        .and_then(|name| addresses.iter().find(|(n, _)| *n == name))
        .or_else(|| addresses.first())
        .map(|(_, ip)| *ip)
        .ok_or(HostIpError::NoAddress)?;
    HostIp::new(IpAddr::V4(chosen)).map_err(HostIpError::Invalid)
}

/// The interface of the default route in `/proc/net/route`.
fn default_route_interface(routes: &str) -> Option<String> {
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&"00000000")).then(|| fields[0].to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_is_found() {
        let routes = "Iface\tDestination\tGateway\tFlags\n\
                      docker0\t000011AC\t00000000\t0001\n\
                      eth0\t00000000\t0100000A\t0003\n";
        assert_eq!(default_route_interface(routes).as_deref(), Some("eth0"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None);
    }
}
