//! Validated values of the registry: domains, names, ids, ports, addresses.
//!
//! Every type here can only be built through validation, and validation refuses a value as a
//! whole: nothing is trimmed, unescaped or otherwise "cleaned up" into something else. The one
//! normalisation is the ASCII lower-casing of domains, because DNS names are case-insensitive.
//!
//! INVARIANT: the text of every validated value consists only of [`is_safe_char`] characters, so
//! it can stand unquoted in an HAProxy configuration, an etcd key or a log line without changing
//! their meaning: no whitespace, control character, quote, `#`, `\`, `$`, `%` or non-ASCII.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// Longest domain, in bytes, without a trailing dot (RFC 1035).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest label of a domain, in bytes (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest service name or host id.
pub const MAX_NAME_LEN: usize = 128;
/// Longest container name (Docker itself sets no lower limit worth relying on).
pub const MAX_CONTAINER_NAME_LEN: usize = 255;
/// Length of a full Docker container id.
pub const CONTAINER_ID_LEN: usize = 64;
/// Longest health-check path.
pub const MAX_CHECK_PATH_LEN: usize = 1024;
/// Largest HAProxy server weight.
pub const MAX_WEIGHT: u16 = 256;

/// Whether `c` may appear in the text of a validated value (see the module's invariant).
pub fn is_safe_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~/?=&:@+,*[]".contains(c)
}

/// Which field of a registration a [`ValidationError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// An app's domain (`DOMAIN_NAME`, `legate.domain`, or the key's domain segment).
    Domain,
    /// A service name (`SERVICE_NAME`, `legate.service.name`).
    ServiceName,
    /// A service port (`SERVICE_PORT`, `legate.service.port`).
    ServicePort,
    /// A container port or a published host port.
    Port,
    /// A registrar's host id.
    HostId,
    /// A full Docker container id.
    ContainerId,
    /// A Docker container name.
    ContainerName,
    /// An IP address.
    Ip,
    /// An `<ip>:<port>` address.
    Address,
    /// An HAProxy server weight.
    Weight,
    /// A health-check path.
    CheckPath,
    /// An active health check: `tcp` or an HTTP path.
    Check,
    /// A version string.
    Version,
    /// A registrar instance id.
    Instance,
    /// The etcd key prefix.
    Prefix,
    /// Why a container was refused.
    Reason,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Domain => "domain",
            Field::ServiceName => "service name",
            Field::ServicePort => "service port",
            Field::Port => "port",
            Field::HostId => "host id",
            Field::ContainerId => "container id",
            Field::ContainerName => "container name",
            Field::Reason => "reason",
            Field::Ip => "ip",
            Field::Address => "address",
            Field::Weight => "weight",
            Field::CheckPath => "check path",
            Field::Check => "health check",
            Field::Version => "version",
            Field::Instance => "instance",
            Field::Prefix => "prefix",
        })
    }
}

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The value is empty.
    Empty,
    /// The value is longer than allowed.
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value has the wrong length.
    WrongLength {
        /// Its length in bytes.
        len: usize,
        /// The only length allowed.
        expected: usize,
    },
    /// A character that is not allowed in this field.
    InvalidChar {
        /// The character.
        ch: char,
        /// Its byte offset in the value.
        at: usize,
    },
    /// The first character is allowed in the field, but not first.
    InvalidStart,
    /// An empty label in a domain: a leading or trailing dot, or `..`.
    EmptyLabel {
        /// Byte offset where the empty label starts.
        at: usize,
    },
    /// A domain label longer than 63 bytes.
    LabelTooLong {
        /// Byte offset of the label.
        at: usize,
        /// Its length.
        len: usize,
    },
    /// A domain label that starts or ends with `-`.
    LabelHyphen {
        /// Byte offset of the label.
        at: usize,
    },
    /// `*` anywhere but as the whole first label of `*.domain`.
    MisplacedWildcard,
    /// The last label is all digits: an IP address is not a domain.
    NumericTopLabel,
    /// Not a decimal number.
    NotANumber,
    /// A number written with a leading zero.
    LeadingZero,
    /// A number outside its range.
    OutOfRange {
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// Not an IPv4 or IPv6 address.
    NotAnIp,
    /// Not `<ip>:<port>` (IPv6 in brackets).
    NotAnAddress,
    /// The unspecified, a multicast or the broadcast address: no host can be reached there.
    Unroutable,
    /// A valid value, but not written the one way it is always written.
    NotCanonical {
        /// How it is written.
        canonical: String,
    },
    /// A relative path or a path segment that is `.` or `..`.
    NotAbsolute,
    /// Neither `tcp` nor an HTTP path.
    NotACheck,
    /// A JSON value of the wrong type.
    WrongType {
        /// The JSON type expected.
        expected: &'static str,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Empty => write!(f, "is empty"),
            Reason::TooLong { len, max } => {
                write!(f, "is {len} bytes long, at most {max} are allowed")
            }
            Reason::WrongLength { len, expected } => {
                write!(f, "is {len} bytes long, exactly {expected} are required")
            }
            Reason::InvalidChar { ch, at } => {
                write!(
                    f,
                    "character '{}' at byte {at} is not allowed",
                    ch.escape_default()
                )
            }
            Reason::InvalidStart => write!(f, "must start with a letter or a digit"),
            Reason::EmptyLabel { at } => {
                write!(
                    f,
                    "has an empty label at byte {at} (leading, trailing or double dot)"
                )
            }
            Reason::LabelTooLong { at, len } => write!(
                f,
                "label at byte {at} is {len} bytes long, at most {MAX_LABEL_LEN} are allowed"
            ),
            Reason::LabelHyphen { at } => {
                write!(f, "label at byte {at} starts or ends with '-'")
            }
            Reason::MisplacedWildcard => {
                write!(
                    f,
                    "'*' is only allowed as a whole first label, as in '*.example.com'"
                )
            }
            Reason::NumericTopLabel => {
                write!(f, "last label is all digits: an IP address is not a domain")
            }
            Reason::NotANumber => write!(f, "is not a decimal number"),
            Reason::LeadingZero => write!(f, "has a leading zero"),
            Reason::OutOfRange { min, max } => write!(f, "is out of range {min}-{max}"),
            Reason::NotAnIp => write!(f, "is not an IPv4 or IPv6 address"),
            Reason::NotAnAddress => {
                write!(f, "is not an <ip>:<port> address (IPv6 as [ip]:port)")
            }
            Reason::Unroutable => write!(
                f,
                "is an unspecified, multicast or broadcast address, not one of a host"
            ),
            Reason::NotCanonical { canonical } => {
                write!(f, "is not in canonical form, which is '{canonical}'")
            }
            Reason::NotAbsolute => {
                write!(f, "must start with '/' and have no '.' or '..' segment")
            }
            Reason::NotACheck => {
                write!(f, "is neither `tcp` nor an HTTP path (starting with /)")
            }
            Reason::WrongType { expected } => write!(f, "must be a JSON {expected}"),
        }
    }
}

/// A value refused by validation: which field, the value as given, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} '{}': {reason}", display_value(.value))]
pub struct ValidationError {
    /// The field.
    pub field: Field,
    /// The value as it was given.
    pub value: String,
    /// Why it was refused.
    pub reason: Reason,
}

impl ValidationError {
    /// An error about `value` of `field`.
    pub fn new(field: Field, value: &str, reason: Reason) -> Self {
        Self {
            field,
            value: value.to_owned(),
            reason,
        }
    }
}

/// The value as it appears in messages: escaped, so that a hostile value cannot forge log lines,
/// and shortened, so that it cannot flood them.
fn display_value(value: &str) -> String {
    const MAX_SHOWN: usize = 80;
    let mut shown: String = value.chars().take(MAX_SHOWN).collect();
    let truncated = shown.len() < value.len();
    shown = shown.escape_default().to_string();
    if truncated {
        shown.push_str("...");
    }
    shown
}

/// The first character of `s` that `allowed` refuses, as an error.
fn check_chars(
    field: Field,
    s: &str,
    allowed: impl Fn(char) -> bool,
) -> Result<(), ValidationError> {
    match s.char_indices().find(|&(_, c)| !allowed(c)) {
        Some((at, ch)) => Err(ValidationError::new(
            field,
            s,
            Reason::InvalidChar { ch, at },
        )),
        None => Ok(()),
    }
}

fn check_len(field: Field, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::new(field, s, Reason::Empty));
    }
    if s.len() > max {
        return Err(ValidationError::new(
            field,
            s,
            Reason::TooLong { len: s.len(), max },
        ));
    }
    Ok(())
}

/// A name: a letter or digit, then letters, digits, `_`, `.` and `-` (Docker's rule for
/// container names, used for service names and host ids too).
fn validate_name(field: Field, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::new(field, s, Reason::Empty));
    }
    check_chars(field, s, |c| c.is_ascii_alphanumeric() || "_.-".contains(c))?;
    check_len(field, s, max)?;
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(ValidationError::new(field, s, Reason::InvalidStart));
    }
    Ok(())
}

/// Parses a decimal number in `min..=max`, written without sign, spaces or leading zero.
pub(crate) fn parse_decimal(
    field: Field,
    s: &str,
    min: u64,
    max: u64,
) -> Result<u64, ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::new(field, s, Reason::Empty));
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValidationError::new(field, s, Reason::NotANumber));
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(ValidationError::new(field, s, Reason::LeadingZero));
    }
    // Digits only: the parse fails only on overflow, which is out of range too.
    match s.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ValidationError::new(
            field,
            s,
            Reason::OutOfRange { min, max },
        )),
    }
}

/// Checks a number that arrived already parsed (from JSON).
pub(crate) fn check_range(
    field: Field,
    n: u64,
    min: u64,
    max: u64,
) -> Result<u64, ValidationError> {
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(ValidationError::new(
            field,
            &n.to_string(),
            Reason::OutOfRange { min, max },
        ))
    }
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The validated text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A DNS name an app is reached by: lower-case, labels of letters, digits and inner hyphens,
    /// at most 253 bytes, the last label not all digits; optionally `*.` + such a name.
    Domain
);

impl Domain {
    /// Validates `s` as a domain, lower-casing ASCII letters.
    pub fn new(s: &str) -> Result<Self, ValidationError> {
        let field = Field::Domain;
        if s.is_empty() {
            return Err(ValidationError::new(field, s, Reason::Empty));
        }
        check_chars(field, s, |c| c.is_ascii_alphanumeric() || "-.*".contains(c))?;
        check_len(field, s, MAX_DOMAIN_LEN)?;
        let (offset, rest) = match s.strip_prefix("*.") {
            Some(rest) => (2, rest),
            None => (0, s),
        };
        if rest.contains('*') {
            return Err(ValidationError::new(field, s, Reason::MisplacedWildcard));
        }
        let mut at = offset;
        let mut last = "";
        for label in rest.split('.') {
            if label.is_empty() {
                return Err(ValidationError::new(field, s, Reason::EmptyLabel { at }));
            }
            if label.len() > MAX_LABEL_LEN {
                let len = label.len();
                return Err(ValidationError::new(
                    field,
                    s,
                    Reason::LabelTooLong { at, len },
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(ValidationError::new(field, s, Reason::LabelHyphen { at }));
            }
            at += label.len() + 1;
            last = label;
        }
        if last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValidationError::new(field, s, Reason::NumericTopLabel));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// Whether this is a `*.` wildcard domain.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }
}

string_newtype!(
    /// The name of a TCP service: a letter or digit, then letters, digits, `_`, `.`, `-`;
    /// at most 128 bytes. Case is kept.
    ServiceName
);

impl ServiceName {
    /// Validates `s` as a service name.
    pub fn new(s: &str) -> Result<Self, ValidationError> {
        validate_name(Field::ServiceName, s, MAX_NAME_LEN)?;
        Ok(Self(s.to_owned()))
    }
}

string_newtype!(
    /// A registrar's host id (by default the host name): same rules as [`ServiceName`].
    HostId
);

impl HostId {
    /// Validates `s` as a host id.
    pub fn new(s: &str) -> Result<Self, ValidationError> {
        validate_name(Field::HostId, s, MAX_NAME_LEN)?;
        Ok(Self(s.to_owned()))
    }
}

string_newtype!(
    /// A Docker container name, without the leading `/` of Docker's API: Docker's own rule
    /// (a letter or digit, then letters, digits, `_`, `.`, `-`), at most 255 bytes.
    ContainerName
);

impl ContainerName {
    /// Validates `s` as a container name.
    pub fn new(s: &str) -> Result<Self, ValidationError> {
        validate_name(Field::ContainerName, s, MAX_CONTAINER_NAME_LEN)?;
        Ok(Self(s.to_owned()))
    }
}

string_newtype!(
    /// A full Docker container id: exactly 64 lower-case hexadecimal digits.
    ContainerId
);

impl ContainerId {
    /// Validates `s` as a full container id.
    pub fn new(s: &str) -> Result<Self, ValidationError> {
        let field = Field::ContainerId;
        if s.is_empty() {
            return Err(ValidationError::new(field, s, Reason::Empty));
        }
        check_chars(field, s, |c| c.is_ascii_digit() || ('a'..='f').contains(&c))?;
        if s.len() != CONTAINER_ID_LEN {
            let reason = Reason::WrongLength {
                len: s.len(),
                expected: CONTAINER_ID_LEN,
            };
            return Err(ValidationError::new(field, s, reason));
        }
        Ok(Self(s.to_owned()))
    }

    /// The 12-digit short id Docker shows.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

string_newtype!(
    /// The path of an HTTP health check: starts with `/`, at most 1024 bytes of letters, digits
    /// and `-._~/?=&:@+,`.
    CheckPath
);

impl CheckPath {
    /// Validates `s` as a health-check path.
    pub fn new(s: &str) -> Result<Self, ValidationError> {
        let field = Field::CheckPath;
        if s.is_empty() {
            return Err(ValidationError::new(field, s, Reason::Empty));
        }
        check_chars(field, s, |c| {
            c.is_ascii_alphanumeric() || "-._~/?=&:@+,".contains(c)
        })?;
        check_len(field, s, MAX_CHECK_PATH_LEN)?;
        if !s.starts_with('/') {
            return Err(ValidationError::new(field, s, Reason::NotAbsolute));
        }
        Ok(Self(s.to_owned()))
    }
}

/// The active health check a registration asks for; without one, HAProxy does not probe the
/// server (its liveness comes from the registry).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HealthCheck {
    /// A TCP connect.
    Tcp,
    /// `GET <path>` answered with 2xx or 3xx (apps; a service gets a TCP check).
    Http(CheckPath),
}

impl HealthCheck {
    /// Parses `tcp` or an HTTP path.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        if s == "tcp" {
            Ok(Self::Tcp)
        } else if s.starts_with('/') {
            CheckPath::new(s).map(Self::Http)
        } else {
            Err(ValidationError::new(Field::Check, s, Reason::NotACheck))
        }
    }

    /// `tcp` or the path.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Tcp => "tcp",
            Self::Http(path) => path.as_str(),
        }
    }

    /// The HTTP path, for an HTTP check.
    pub fn path(&self) -> Option<&CheckPath> {
        match self {
            Self::Tcp => None,
            Self::Http(path) => Some(path),
        }
    }
}

/// A TCP port, 1-65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u16);

impl Port {
    /// Parses `s` as a port of `field` (a service port, a container port, a host port): decimal,
    /// no sign, no spaces, no leading zero, 1-65535.
    pub fn parse(field: Field, s: &str) -> Result<Self, ValidationError> {
        let n = parse_decimal(field, s, 1, u64::from(u16::MAX))?;
        Ok(Self(n as u16))
    }

    /// A port from a number; 0 is refused.
    pub fn new(field: Field, n: u16) -> Result<Self, ValidationError> {
        check_range(field, u64::from(n), 1, u64::from(u16::MAX))?;
        Ok(Self(n))
    }

    /// The port number.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An HAProxy server weight, 0-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Weight(u16);

impl Weight {
    /// The weight registrars write when a container asks for none.
    pub const DEFAULT: Weight = Weight(100);

    /// A weight from a number, 0-256.
    pub fn new(n: u64) -> Result<Self, ValidationError> {
        let n = check_range(Field::Weight, n, 0, u64::from(MAX_WEIGHT))?;
        Ok(Self(n as u16))
    }

    /// The weight.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl Default for Weight {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The IP of a host: canonical text form, not unspecified, multicast or broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostIp(IpAddr);

impl HostIp {
    /// Parses `s`, which must be written the canonical way (`10.0.0.5`, `2001:db8::1`).
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let field = Field::Ip;
        if s.is_empty() {
            return Err(ValidationError::new(field, s, Reason::Empty));
        }
        let ip =
            IpAddr::from_str(s).map_err(|_| ValidationError::new(field, s, Reason::NotAnIp))?;
        let canonical = ip.to_string();
        if canonical != s {
            return Err(ValidationError::new(
                field,
                s,
                Reason::NotCanonical { canonical },
            ));
        }
        Self::new(ip)
    }

    /// Checks that `ip` is one a host can have.
    pub fn new(ip: IpAddr) -> Result<Self, ValidationError> {
        let unroutable =
            ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST);
        if unroutable {
            return Err(ValidationError::new(
                Field::Ip,
                &ip.to_string(),
                Reason::Unroutable,
            ));
        }
        Ok(Self(ip))
    }

    /// The address.
    pub fn get(self) -> IpAddr {
        self.0
    }
}

impl fmt::Display for HostIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a container is reached: host IP and published port. Written `10.0.0.5:32768` or
/// `[2001:db8::1]:32768`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// The host's IP.
    pub ip: HostIp,
    /// The published host port.
    pub port: Port,
}

impl Endpoint {
    /// Parses `<ip>:<port>`, IPv6 in brackets, both parts canonical.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let not_an_address = || ValidationError::new(Field::Address, s, Reason::NotAnAddress);
        let (host, port) = s.rsplit_once(':').ok_or_else(not_an_address)?;
        let ip = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) if v6.contains(':') => HostIp::parse(v6)?,
            Some(_) => return Err(not_an_address()),
            None if host.contains(':') || host.contains('[') => return Err(not_an_address()),
            None => HostIp::parse(host)?,
        };
        let port = Port::parse(Field::Port, port)?;
        Ok(Self { ip, port })
    }

    /// As a socket address.
    pub fn socket_addr(self) -> SocketAddr {
        SocketAddr::new(self.ip.get(), self.port.get())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.socket_addr().fmt(f)
    }
}

/// Text that identifies a software version or a process instance: letters, digits, `.`, `_`,
/// `-`, starting with a letter or digit, at most 128 bytes (e.g. `0.1.0`).
pub(crate) fn validate_token(field: Field, s: &str) -> Result<String, ValidationError> {
    validate_name(field, s, MAX_NAME_LEN)?;
    Ok(s.to_owned())
}
