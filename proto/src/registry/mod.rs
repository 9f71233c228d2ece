//! The registry in etcd: key layout, values and validation, in one place.
//!
//! The registrar formats keys and values with this module before writing them; confgen parses
//! every key and value it reads with it. Whatever parses here is safe to render into an HAProxy
//! configuration (see the invariant in [`field`]); whatever does not is refused as a whole, with
//! an error that names the field and the reason.

mod field;
mod key;
mod value;

pub use field::{
    CONTAINER_ID_LEN, CheckPath, ContainerId, ContainerName, Domain, Endpoint, Field, HealthCheck,
    HostId, HostIp, MAX_CHECK_PATH_LEN, MAX_CONTAINER_NAME_LEN, MAX_DOMAIN_LEN, MAX_LABEL_LEN,
    MAX_NAME_LEN, MAX_WEIGHT, Port, Reason, ServiceName, ValidationError, Weight, is_safe_char,
};
pub use key::{AppKey, HostKey, Key, KeyError, KeyKind, Prefix, RefusedKey, Schema, ServiceKey};
pub use value::{HostRecord, MAX_VALUE_LEN, Refusal, RegistrationValue, ValueError};

#[cfg(test)]
mod tests;
