//! The JSON values stored under registry keys.
//!
//! An app or service key holds a [`RegistrationValue`]: what the key cannot say. Readers accept
//! an empty value and the seed's `<ip>:<port>` value (equal to the key's address), because the
//! original tools wrote those. A host key holds a [`HostRecord`].
//!
//! Unknown JSON fields are ignored, so that an older reader accepts what a newer registrar
//! writes; a known field of the wrong type or value refuses the whole value.

use serde::Serialize;
use serde_json::{Map, Value};

use super::field::{
    CheckPath, ContainerName, Endpoint, Field, HealthCheck, HostId, HostIp, Reason,
    ValidationError, Weight, validate_token,
};

/// Largest value accepted, in bytes.
pub const MAX_VALUE_LEN: usize = 4096;

/// A value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Larger than [`MAX_VALUE_LEN`].
    #[error("value is {len} bytes long, at most {MAX_VALUE_LEN} are allowed")]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// Not UTF-8.
    #[error("value is not valid UTF-8")]
    NotUtf8,
    /// Neither JSON nor the seed's form.
    #[error("value is neither a JSON object nor the seed's '<ip>:<port>'")]
    Unrecognized,
    /// Malformed JSON.
    #[error("value is not valid JSON: {0}")]
    Json(String),
    /// A seed-style `<ip>:<port>` value that disagrees with the key.
    #[error("value '{value}' does not match the key's address {key}")]
    AddressMismatch {
        /// The value.
        value: String,
        /// The key's address.
        key: String,
    },
    /// A required field is missing.
    #[error("value has no '{0}' field")]
    Missing(&'static str),
    /// A field that does not validate.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// What an app or service key's value says about the registration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrationValue {
    /// The registrar that wrote it.
    pub host_id: Option<HostId>,
    /// The container's name.
    pub container_name: Option<ContainerName>,
    /// The HAProxy weight; [`Weight::DEFAULT`] when absent.
    pub weight: Option<Weight>,
    /// The active health check asked for; none when absent. Written as `"check": "tcp"` or, for
    /// an HTTP check, `"check_path": "<path>"` (which readers before the `check` field know);
    /// read from either, not both.
    pub check: Option<HealthCheck>,
}

#[derive(Serialize)]
struct RegistrationWire<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    host_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    check_path: Option<&'a str>,
}

impl RegistrationValue {
    /// The JSON text written to etcd.
    pub fn to_json(&self) -> String {
        let wire = RegistrationWire {
            host_id: self.host_id.as_ref().map(HostId::as_str),
            container_name: self.container_name.as_ref().map(ContainerName::as_str),
            weight: self.weight.map(Weight::get),
            check: matches!(self.check, Some(HealthCheck::Tcp)).then_some("tcp"),
            check_path: self
                .check
                .as_ref()
                .and_then(HealthCheck::path)
                .map(CheckPath::as_str),
        };
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses the value stored under a key whose address is `endpoint`.
    pub fn parse(raw: &[u8], endpoint: &Endpoint) -> Result<Self, ValueError> {
        if raw.is_empty() {
            return Ok(Self::default());
        }
        let text = checked_text(raw)?;
        if !text.starts_with('{') {
            let legacy = Endpoint::parse(text).map_err(|_| ValueError::Unrecognized)?;
            if legacy != *endpoint {
                return Err(ValueError::AddressMismatch {
                    value: text.to_owned(),
                    key: endpoint.to_string(),
                });
            }
            return Ok(Self::default());
        }
        let object = json_object(text)?;
        Ok(Self {
            host_id: string_field(&object, "host_id", Field::HostId, HostId::new)?,
            container_name: string_field(
                &object,
                "container_name",
                Field::ContainerName,
                ContainerName::new,
            )?,
            weight: number_field(&object, "weight", Field::Weight)?
                .map(Weight::new)
                .transpose()?,
            check: check_field(&object)?,
        })
    }
}

/// A registrar's liveness record, the value of `<prefix>/hosts/<host-id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    /// The IP the registrar publishes containers under.
    pub ip: HostIp,
    /// Identifies one run of the registrar (random per process), so that a second registrar
    /// claiming the same host id can be told apart from this one.
    pub instance: String,
    /// legate version of the registrar.
    pub version: String,
}

#[derive(Serialize)]
struct HostWire<'a> {
    ip: String,
    instance: &'a str,
    version: &'a str,
}

impl HostRecord {
    /// A record, validating the instance and version tokens.
    pub fn new(ip: HostIp, instance: &str, version: &str) -> Result<Self, ValidationError> {
        Ok(Self {
            ip,
            instance: validate_token(Field::Instance, instance)?,
            version: validate_token(Field::Version, version)?,
        })
    }

    /// The JSON text written to etcd.
    pub fn to_json(&self) -> String {
        let wire = HostWire {
            ip: self.ip.to_string(),
            instance: &self.instance,
            version: &self.version,
        };
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses a host record; `ip`, `instance` and `version` are required.
    pub fn parse(raw: &[u8]) -> Result<Self, ValueError> {
        let object = json_object(checked_text(raw)?)?;
        let required = |name: &'static str, field: Field| {
            string_field(&object, name, field, |s| Ok(s.to_owned()))?
                .ok_or(ValueError::Missing(name))
        };
        let ip = HostIp::parse(&required("ip", Field::Ip)?)?;
        let instance = required("instance", Field::Instance)?;
        let version = required("version", Field::Version)?;
        Ok(Self::new(ip, &instance, &version)?)
    }
}

/// Why a registrar refused a container, the value of `<prefix>/refused/<host-id>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The container's name.
    pub container_name: Option<ContainerName>,
    /// Why, one line of at most [`Refusal::MAX_REASON`] bytes of printable text.
    pub reason: String,
}

#[derive(Serialize)]
struct RefusalWire<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    container_name: Option<&'a str>,
    reason: &'a str,
}

impl Refusal {
    /// Longest reason kept; a longer one is cut (with an ellipsis).
    pub const MAX_REASON: usize = 1024;

    /// A refusal; the reason is made one printable line and cut to [`Self::MAX_REASON`].
    pub fn new(container_name: Option<ContainerName>, reason: &str) -> Self {
        let mut line: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if line.len() > Self::MAX_REASON {
            let mut end = Self::MAX_REASON - 3;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push_str("...");
        }
        Self {
            container_name,
            reason: line,
        }
    }

    /// The JSON text written to etcd.
    pub fn to_json(&self) -> String {
        let wire = RefusalWire {
            container_name: self.container_name.as_ref().map(ContainerName::as_str),
            reason: &self.reason,
        };
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses a refusal; `reason` is required, and made printable as [`Self::new`] does.
    pub fn parse(raw: &[u8]) -> Result<Self, ValueError> {
        let object = json_object(checked_text(raw)?)?;
        let name = string_field(
            &object,
            "container_name",
            Field::ContainerName,
            ContainerName::new,
        )?;
        let reason = string_field(&object, "reason", Field::Reason, |s| Ok(s.to_owned()))?
            .ok_or(ValueError::Missing("reason"))?;
        Ok(Self::new(name, &reason))
    }
}

fn checked_text(raw: &[u8]) -> Result<&str, ValueError> {
    if raw.len() > MAX_VALUE_LEN {
        return Err(ValueError::TooLarge { len: raw.len() });
    }
    std::str::from_utf8(raw).map_err(|_| ValueError::NotUtf8)
}

fn json_object(text: &str) -> Result<Map<String, Value>, ValueError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ValueError::Json("not an object".to_owned())),
        Err(e) => Err(ValueError::Json(e.to_string())),
    }
}

/// A string field validated by `parse`; absent or `null` is `None`.
fn string_field<T>(
    object: &Map<String, Value>,
    name: &str,
    field: Field,
    parse: impl FnOnce(&str) -> Result<T, ValidationError>,
) -> Result<Option<T>, ValueError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(parse(s)?)),
        Some(other) => Err(wrong_type(field, other, "string")),
    }
}

/// The health check: `check` (`tcp` or a path) or `check_path` (a path), not both.
fn check_field(object: &Map<String, Value>) -> Result<Option<HealthCheck>, ValueError> {
    let check = string_field(object, "check", Field::Check, HealthCheck::parse)?;
    let path = string_field(object, "check_path", Field::CheckPath, CheckPath::new)?;
    match (check, path) {
        (Some(_), Some(_)) => Err(ValueError::Json(
            "both 'check' and 'check_path' are set".to_owned(),
        )),
        (check, path) => Ok(check.or(path.map(HealthCheck::Http))),
    }
}

/// A non-negative integer field; absent or `null` is `None`.
fn number_field(
    object: &Map<String, Value>,
    name: &str,
    field: Field,
) -> Result<Option<u64>, ValueError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => Ok(Some(n)),
            None => Err(wrong_type(
                field,
                &Value::Number(n.clone()),
                "non-negative integer",
            )),
        },
        Some(other) => Err(wrong_type(field, other, "non-negative integer")),
    }
}

fn wrong_type(field: Field, value: &Value, expected: &'static str) -> ValueError {
    ValidationError::new(field, &value.to_string(), Reason::WrongType { expected }).into()
}
