//! The etcd key layout of the registry (seed-compatible), under an optional prefix:
//!
//! - app: `<prefix>/apps/<domain>/<container-id>/<ip>:<port>`
//! - service: `<prefix>/services/<name>/<service-port>/<container-id>/<ip>:<port>`
//! - host: `<prefix>/hosts/<host-id>`
//! - refusal: `<prefix>/refused/<host-id>/<container-id>`: a container that asks to be routed
//!   but cannot be, and why (for operators' tools; not part of the routing model)
//!
//! `<ip>:<port>` is the host IP and the published host port. [`Schema`] formats and parses them;
//! parsing validates every segment, so a key that parses names only valid values.

use std::fmt;

use super::field::{
    ContainerId, Domain, Endpoint, Field, HostId, Port, Reason, ServiceName, ValidationError,
};

/// The prefix all registry keys live under: empty (the seed's layout) or `/a/b`, segments of
/// letters, digits, `.`, `_` and `-`, no trailing slash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    /// Longest prefix accepted.
    pub const MAX_LEN: usize = 128;

    /// Validates `s` as a prefix.
    pub fn new(s: &str) -> Result<Self, ValidationError> {
        let field = Field::Prefix;
        if s.is_empty() {
            return Ok(Self::default());
        }
        if let Some((at, ch)) = s
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
        {
            return Err(ValidationError::new(
                field,
                s,
                Reason::InvalidChar { ch, at },
            ));
        }
        if s.len() > Self::MAX_LEN {
            let reason = Reason::TooLong {
                len: s.len(),
                max: Self::MAX_LEN,
            };
            return Err(ValidationError::new(field, s, reason));
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(ValidationError::new(field, s, Reason::NotAbsolute));
        };
        let mut at = 1;
        for segment in rest.split('/') {
            if segment.is_empty() {
                return Err(ValidationError::new(field, s, Reason::EmptyLabel { at }));
            }
            if segment == "." || segment == ".." {
                return Err(ValidationError::new(field, s, Reason::NotAbsolute));
            }
            at += segment.len() + 1;
        }
        Ok(Self(s.to_owned()))
    }

    /// The prefix text, empty for none.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The kind of a registry key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyKind {
    /// `/apps/...`
    App,
    /// `/services/...`
    Service,
    /// `/hosts/...`
    Host,
    /// `/refused/...`
    Refused,
}

impl KeyKind {
    /// The directory name of this kind.
    pub fn dir(self) -> &'static str {
        match self {
            KeyKind::App => "apps",
            KeyKind::Service => "services",
            KeyKind::Host => "hosts",
            KeyKind::Refused => "refused",
        }
    }

    /// Segments after the directory.
    fn segments(self) -> usize {
        match self {
            KeyKind::App => 3,
            KeyKind::Service => 4,
            KeyKind::Host => 1,
            KeyKind::Refused => 2,
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::App => "app",
            KeyKind::Service => "service",
            KeyKind::Host => "host",
            KeyKind::Refused => "refusal",
        })
    }
}

/// An HTTP app's registration: one container port reachable at `endpoint` for `domain`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppKey {
    /// The domain the app answers for.
    pub domain: Domain,
    /// The container.
    pub container_id: ContainerId,
    /// Host IP and published port.
    pub endpoint: Endpoint,
}

/// A TCP service's registration.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// The service name.
    pub name: ServiceName,
    /// The port every ambassador listens on for it.
    pub service_port: Port,
    /// The container.
    pub container_id: ContainerId,
    /// Host IP and published port.
    pub endpoint: Endpoint,
}

/// A registrar's liveness record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostKey {
    /// The registrar's host id.
    pub host_id: HostId,
}

/// A container a registrar refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RefusedKey {
    /// The registrar's host id.
    pub host_id: HostId,
    /// The container.
    pub container_id: ContainerId,
}

/// Any registry key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// An app.
    App(AppKey),
    /// A service.
    Service(ServiceKey),
    /// A host.
    Host(HostKey),
    /// A refusal.
    Refused(RefusedKey),
}

impl Key {
    /// The kind of this key.
    pub fn kind(&self) -> KeyKind {
        match self {
            Key::App(_) => KeyKind::App,
            Key::Service(_) => KeyKind::Service,
            Key::Host(_) => KeyKind::Host,
            Key::Refused(_) => KeyKind::Refused,
        }
    }
}

/// A key that is not a registry key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is not UTF-8.
    #[error("key is not valid UTF-8")]
    NotUtf8,
    /// The key is not under the prefix.
    #[error("key is not under the prefix '{prefix}/'")]
    OutsidePrefix {
        /// The prefix.
        prefix: String,
    },
    /// The directory after the prefix is not `apps`, `services`, `hosts` or `refused`.
    #[error("unknown key kind '{}' (expected apps, services, hosts or refused)", .dir.escape_default())]
    UnknownKind {
        /// The directory found.
        dir: String,
    },
    /// Too many or too few segments for the kind.
    #[error("{kind} key has {found} segments after '/{}/', expected {expected}", .kind.dir())]
    Shape {
        /// The kind.
        kind: KeyKind,
        /// Segments required.
        expected: usize,
        /// Segments found.
        found: usize,
    },
    /// A segment that does not validate.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// Formats and parses registry keys under one prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schema {
    prefix: Prefix,
}

impl Schema {
    /// The schema under `prefix`.
    pub fn new(prefix: Prefix) -> Self {
        Self { prefix }
    }

    /// The prefix.
    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// The directory of one kind, with its trailing slash: `<prefix>/apps/`.
    pub fn dir(&self, kind: KeyKind) -> String {
        format!("{}/{}/", self.prefix, kind.dir())
    }

    /// The key of one app's registration.
    pub fn app_key(&self, key: &AppKey) -> String {
        format!(
            "{}{}/{}/{}",
            self.dir(KeyKind::App),
            key.domain,
            key.container_id,
            key.endpoint
        )
    }

    /// The key of one service's registration.
    pub fn service_key(&self, key: &ServiceKey) -> String {
        format!(
            "{}{}/{}/{}/{}",
            self.dir(KeyKind::Service),
            key.name,
            key.service_port,
            key.container_id,
            key.endpoint
        )
    }

    /// The key of a registrar's liveness record.
    pub fn host_key(&self, key: &HostKey) -> String {
        format!("{}{}", self.dir(KeyKind::Host), key.host_id)
    }

    /// The key of a container a registrar refused.
    pub fn refused_key(&self, key: &RefusedKey) -> String {
        format!(
            "{}{}/{}",
            self.dir(KeyKind::Refused),
            key.host_id,
            key.container_id
        )
    }

    /// The text of any key.
    pub fn format(&self, key: &Key) -> String {
        match key {
            Key::App(k) => self.app_key(k),
            Key::Service(k) => self.service_key(k),
            Key::Host(k) => self.host_key(k),
            Key::Refused(k) => self.refused_key(k),
        }
    }

    /// Parses and validates a key read from etcd.
    pub fn parse(&self, raw: &[u8]) -> Result<Key, KeyError> {
        let text = std::str::from_utf8(raw).map_err(|_| KeyError::NotUtf8)?;
        let outside = || KeyError::OutsidePrefix {
            prefix: self.prefix.to_string(),
        };
        let rest = text
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(outside)?;
        let (dir, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let kind = match dir {
            "apps" => KeyKind::App,
            "services" => KeyKind::Service,
            "hosts" => KeyKind::Host,
            "refused" => KeyKind::Refused,
            _ => {
                return Err(KeyError::UnknownKind {
                    dir: dir.to_owned(),
                });
            }
        };
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.len() != kind.segments() {
            return Err(KeyError::Shape {
                kind,
                expected: kind.segments(),
                found: segments.len(),
            });
        }
        Ok(match (kind, segments.as_slice()) {
            (KeyKind::App, [domain, id, endpoint]) => Key::App(AppKey {
                domain: Domain::new(domain)?,
                container_id: ContainerId::new(id)?,
                endpoint: Endpoint::parse(endpoint)?,
            }),
            (KeyKind::Service, [name, port, id, endpoint]) => Key::Service(ServiceKey {
                name: ServiceName::new(name)?,
                service_port: Port::parse(Field::ServicePort, port)?,
                container_id: ContainerId::new(id)?,
                endpoint: Endpoint::parse(endpoint)?,
            }),
            (KeyKind::Host, [host_id]) => Key::Host(HostKey {
                host_id: HostId::new(host_id)?,
            }),
            (KeyKind::Refused, [host_id, id]) => Key::Refused(RefusedKey {
                host_id: HostId::new(host_id)?,
                container_id: ContainerId::new(id)?,
            }),
            // INVARIANT: the segment count was checked against the kind above.
            _ => unreachable!("segment count checked for {kind}"),
        })
    }
}
