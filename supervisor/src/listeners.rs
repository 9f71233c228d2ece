//! The TCP addresses a configuration asks HAProxy to listen on, and the refusal of those that
//! cannot be bound here, before a reload ever sees them.
//!
//! Why: HAProxy 2.6 reloads by starting a new worker on the new configuration; when one of its
//! listeners cannot bind (a port that sshd, etcd, a container's `docker-proxy` or any other
//! process holds), the reload fails, and in that failure the old worker has already paused its
//! listeners: every app and service refuses connections until the last good configuration is
//! restored. A service port is chosen by whoever writes to the registry, so such a port must
//! cost that one listener, never the others. [`refuse`] finds the sections whose new addresses
//! cannot be bound (probing each with a plain bind, as HAProxy's own bind would fail) and the
//! caller applies the configuration without them; addresses HAProxy already listens on are not
//! probed (HAProxy takes them over on reload).
//!
//! Only `bind` lines of `frontend` and `listen` sections with IPv4/IPv6 addresses are checked;
//! other address families (`unix@`, `abns@`, `fd@`, ...) and host names are left to HAProxy.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::diff::{SECTIONS, words};

/// Ports of one bind address range probed at most: a larger range is left to HAProxy.
const MAX_RANGE: u32 = 256;

/// A section that would bind an address that cannot be bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The section's header line, e.g. `listen svc_ssh_22`.
    pub section: String,
    /// The address that cannot be bound.
    pub addr: SocketAddr,
    /// Why, as the bind attempt failed (e.g. "Address already in use").
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "'{}' cannot listen on {}: {}",
            self.section, self.addr, self.reason
        )
    }
}

/// Every TCP address that `config` binds.
pub fn addresses(config: &str) -> BTreeSet<SocketAddr> {
    sections(config)
        .into_iter()
        .flat_map(|section| section.addrs)
        .collect()
}

/// The sections of `config` that bind an address on a port that none of `held` (what HAProxy
/// listens on now) has and for which `probe` fails, with the first such address of each and
/// the reason.
pub fn refuse(
    config: &str,
    held: &BTreeSet<SocketAddr>,
    probe: impl Fn(SocketAddr) -> std::io::Result<()>,
) -> Vec<Refusal> {
    sections(config)
        .into_iter()
        .filter_map(|section| {
            section
                .addrs
                .iter()
                // HAProxy takes its own ports over on a reload at any address (its listeners
                // share them with SO_REUSEPORT): a port it listens on is not probed.
                .filter(|addr| !held.iter().any(|h| h.port() == addr.port()))
                .find_map(|&addr| {
                    probe(addr).err().map(|e| Refusal {
                        section: section.header.to_owned(),
                        addr,
                        reason: e.to_string(),
                    })
                })
        })
        .collect()
}

/// `config` without the sections whose header line is one of `headers`: each from its header
/// to the line before the next section.
pub fn without(config: &str, headers: &[&str]) -> String {
    let mut out = String::with_capacity(config.len());
    let mut skipping = false;
    for line in config.split_inclusive('\n') {
        if let Some(first) = words(line).next()
            && SECTIONS.contains(&first)
        {
            skipping = headers.contains(&line.trim());
        }
        if !skipping {
            out.push_str(line);
        }
    }
    out
}

/// The `listen` sections of `config` whose addresses all share one port, by name: a TCP
/// service as an operator knows it, by its port.
pub fn listen_ports(config: &str) -> Vec<(&str, u16)> {
    sections(config)
        .into_iter()
        .filter_map(|section| {
            let mut words = words(section.header);
            let (Some("listen"), Some(name)) = (words.next(), words.next()) else {
                return None;
            };
            let port = section.addrs.first()?.port();
            section
                .addrs
                .iter()
                .all(|a| a.port() == port)
                .then_some((name, port))
        })
        .collect()
}

/// Binds `addr` and lets it go at once: whether HAProxy's bind would succeed, short of
/// `SO_REUSEPORT` sharing (refusing such a port is the safe side).
pub fn probe(addr: SocketAddr) -> std::io::Result<()> {
    std::net::TcpListener::bind(addr).map(drop)
}

struct Section<'a> {
    header: &'a str,
    addrs: Vec<SocketAddr>,
}

fn sections(config: &str) -> Vec<Section<'_>> {
    let mut sections: Vec<Section<'_>> = Vec::new();
    let mut listening = false;
    for line in config.lines() {
        let mut words = words(line).take_while(|w| !w.starts_with('#'));
        let Some(first) = words.next() else { continue };
        if SECTIONS.contains(&first) {
            listening = matches!(first, "frontend" | "listen");
            if listening {
                sections.push(Section {
                    header: line.trim(),
                    addrs: Vec::new(),
                });
            }
            continue;
        }
        if !listening || first != "bind" {
            continue;
        }
        let Some(list) = words.next() else { continue };
        if let Some(section) = sections.last_mut() {
            section.addrs.extend(list.split(',').flat_map(parse));
        }
    }
    sections.retain(|s| !s.addrs.is_empty());
    sections
}

/// One address of a `bind` line: `[ipv4@|ipv6@]<address>:<port>[-<port>]`, where an empty
/// address or `*` is every IPv4 address. Anything else yields nothing.
fn parse(spec: &str) -> Vec<SocketAddr> {
    let (family, rest) = match spec.split_once('@') {
        Some(("ipv4" | "tcp4", rest)) => (Some(false), rest),
        Some(("ipv6" | "tcp6", rest)) => (Some(true), rest),
        Some(("tcp", rest)) => (None, rest),
        Some(_) => return Vec::new(),
        None => (None, spec),
    };
    let Some((host, ports)) = rest.rsplit_once(':') else {
        return Vec::new();
    };
    let ip = match host {
        "" | "*" if family == Some(true) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        "" | "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        host => match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => ip,
            Err(_) => return Vec::new(),
        },
    };
    let (low, high) = ports.split_once('-').unwrap_or((ports, ports));
    let (Ok(low), Ok(high)) = (low.parse::<u16>(), high.parse::<u16>()) else {
        return Vec::new();
    };
    if low == 0 || high < low || u32::from(high - low) >= MAX_RANGE {
        return Vec::new();
    }
    (low..=high).map(|port| SocketAddr::new(ip, port)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "defaults\n    mode http\n\n\
        frontend http\n    bind :8080\n    default_backend b\n\n\
        backend b\n    server s 127.0.0.1:9000\n\n\
        listen svc_ssh_22\n    mode tcp\n    bind 127.0.0.1:22 # the host's sshd\n    \
        server s 10.0.0.1:2222\n\n\
        listen svc_db_3306\n    mode tcp\n    bind ipv6@:::3306,127.0.0.2:3306\n    \
        server s 10.0.0.1:3306\n";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_tcp_address_of_frontends_and_listens_is_found() {
        let found: Vec<SocketAddr> = addresses(CONFIG).into_iter().collect();
        let mut expected = vec![
            addr("0.0.0.0:8080"),
            addr("127.0.0.1:22"),
            addr("[::]:3306"),
            addr("127.0.0.2:3306"),
        ];
        expected.sort();
        assert_eq!(found, expected);
    }

    #[test]
    fn bind_address_forms() {
        assert_eq!(parse("*:80"), [addr("0.0.0.0:80")]);
        assert_eq!(parse("ipv4@:80"), [addr("0.0.0.0:80")]);
        assert_eq!(parse("ipv6@:80"), [addr("[::]:80")]);
        assert_eq!(parse("::1:80"), [addr("[::1]:80")]);
        assert_eq!(parse("[::1]:80"), [addr("[::1]:80")]);
        assert_eq!(
            parse("10.0.0.1:80-82"),
            [
                addr("10.0.0.1:80"),
                addr("10.0.0.1:81"),
                addr("10.0.0.1:82")
            ]
        );
        for other in [
            "unix@/run/x.sock",
            "abns@x",
            "fd@3",
            "localhost:80",
            ":0",
            ":70000",
            ":1-65535",
            "/run/x.sock",
        ] {
            assert!(parse(other).is_empty(), "{other} parsed");
        }
    }

    #[test]
    fn only_sections_with_an_unbindable_new_address_are_refused() {
        let busy = [addr("127.0.0.1:22"), addr("0.0.0.0:8080")];
        let probe = |a: SocketAddr| {
            if busy.contains(&a) {
                Err(std::io::Error::from(std::io::ErrorKind::AddrInUse))
            } else {
                Ok(())
            }
        };
        // 8080 is busy because HAProxy itself holds it: not probed, not refused.
        let held = BTreeSet::from([addr("0.0.0.0:8080")]);
        let refused = refuse(CONFIG, &held, probe);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].section, "listen svc_ssh_22");
        assert_eq!(refused[0].addr, addr("127.0.0.1:22"));
        assert!(refused[0].to_string().contains("127.0.0.1:22"));
        // Nobody holds 8080 yet: the HTTP frontend is refused too.
        assert_eq!(refuse(CONFIG, &BTreeSet::new(), probe).len(), 2);
        // HAProxy holds 8080 on loopback only: moving it to every address is not probed (the
        // kernel would refuse a plain bind, HAProxy's shared one succeeds).
        let loopback = BTreeSet::from([addr("127.0.0.1:8080")]);
        assert_eq!(refuse(CONFIG, &loopback, probe).len(), 1);
    }

    #[test]
    fn a_refused_section_is_cut_from_its_header_to_the_next_section() {
        let cut = without(CONFIG, &["listen svc_ssh_22"]);
        assert!(!cut.contains("svc_ssh_22") && !cut.contains(":22"), "{cut}");
        assert!(!cut.contains("10.0.0.1:2222"), "{cut}");
        assert!(cut.contains("listen svc_db_3306") && cut.contains("frontend http"));
        assert_eq!(
            cut.lines().count(),
            CONFIG.lines().count() - 5,
            "exactly the section's lines"
        );
        assert_eq!(without(CONFIG, &[]), CONFIG);
    }

    #[test]
    fn a_port_held_by_another_socket_cannot_be_probed() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = held.local_addr().unwrap();
        assert!(probe(busy).is_err());
        drop(held);
        assert!(probe(busy).is_ok());
    }
}
