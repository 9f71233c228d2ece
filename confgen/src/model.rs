//! confgen's pure core: the registry as read from etcd, and the model built from it.
//!
//! [`Registry`] holds every key of the registry directories (`apps/`, `services/`, `hosts/`)
//! parsed once, when it is put: a key or value that does not parse or validate is kept as a
//! skipped entry with its reason, never dropped silently and never rendered. [`Registry::model`]
//! groups the parsed entries into a [`Model`]: apps by domain, services by port, live hosts,
//! all in a deterministic order, so the same registry always renders byte-identical output.
//! No I/O here: the watcher feeds it, the renderer reads its models.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use legate_proto::registry::{
    AppKey, ContainerId, Endpoint, HostKey, HostRecord, Key, KeyError, KeyKind, RegistrationValue,
    Schema, ServiceKey,
};
use legate_proto::v1;
use serde::Serialize;

/// One key of the registry directories, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    App(AppKey, RegistrationValue),
    Service(ServiceKey, RegistrationValue),
    Host(HostKey, HostRecord),
    /// The key or its value does not parse or validate.
    Skipped(String),
}

/// Every registry key confgen has read, parsed, at one etcd revision.
#[derive(Debug, Clone)]
pub struct Registry {
    schema: Schema,
    /// The prefixes of the directories this registry reads: `<prefix>/apps/`, ...
    dirs: [String; 3],
    entries: BTreeMap<Vec<u8>, Entry>,
    revision: i64,
}

/// A key the registry skipped, newly or for a new reason; for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipNotice {
    /// The key, printable: escaped and shortened.
    pub key: String,
    /// Why.
    pub reason: String,
}

impl Registry {
    /// An empty registry under `schema`'s prefix.
    pub fn new(schema: Schema) -> Self {
        let dirs = [KeyKind::App, KeyKind::Service, KeyKind::Host].map(|kind| schema.dir(kind));
        Self {
            schema,
            dirs,
            entries: BTreeMap::new(),
            revision: 0,
        }
    }

    /// The etcd range that holds every registry directory: `[<prefix>/apps/, <prefix>/services0)`
    /// (`0` follows `/`). Keys in it outside the three directories are ignored.
    pub fn range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.schema.dir(KeyKind::App).into_bytes();
        let mut end = self.schema.dir(KeyKind::Service).into_bytes();
        if let Some(last) = end.last_mut() {
            *last = b'0';
        }
        (start, end)
    }

    /// The etcd revision of the last reset or event applied.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Number of registry keys held, skipped ones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Replaces everything with a full listing read at `revision`. Returns the keys skipped
    /// that were not skipped for the same reason before.
    pub fn reset(
        &mut self,
        kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        revision: i64,
    ) -> Vec<SkipNotice> {
        let mut previous = std::mem::take(&mut self.entries);
        let mut notices = Vec::new();
        for (key, value) in kvs {
            if !self.owns(&key) {
                continue;
            }
            let entry = self.parse(&key, &value);
            if let Entry::Skipped(reason) = &entry
                && previous.remove(&key).as_ref() != Some(&entry)
            {
                notices.push(SkipNotice {
                    key: printable(&key),
                    reason: reason.clone(),
                });
            }
            self.entries.insert(key, entry);
        }
        self.revision = revision;
        notices
    }

    /// Applies a put seen at `revision`. Returns the notice if the new value is skipped.
    pub fn put(&mut self, key: Vec<u8>, value: &[u8], revision: i64) -> Option<SkipNotice> {
        self.revision = self.revision.max(revision);
        if !self.owns(&key) {
            return None;
        }
        let entry = self.parse(&key, value);
        let notice = match &entry {
            Entry::Skipped(reason) => Some(SkipNotice {
                key: printable(&key),
                reason: reason.clone(),
            }),
            _ => None,
        };
        self.entries.insert(key, entry);
        notice
    }

    /// Applies a delete seen at `revision`.
    pub fn delete(&mut self, key: &[u8], revision: i64) {
        self.revision = self.revision.max(revision);
        self.entries.remove(key);
    }

    fn owns(&self, key: &[u8]) -> bool {
        self.dirs.iter().any(|dir| key.starts_with(dir.as_bytes()))
    }

    fn parse(&self, key: &[u8], value: &[u8]) -> Entry {
        match self.schema.parse(key) {
            Ok(Key::App(key)) => match RegistrationValue::parse(value, &key.endpoint) {
                Ok(value) => Entry::App(key, value),
                Err(e) => Entry::Skipped(format!("value: {e}")),
            },
            Ok(Key::Service(key)) => match RegistrationValue::parse(value, &key.endpoint) {
                Ok(value) => Entry::Service(key, value),
                Err(e) => Entry::Skipped(format!("value: {e}")),
            },
            Ok(Key::Host(key)) => match HostRecord::parse(value) {
                Ok(record) => Entry::Host(key, record),
                Err(e) => Entry::Skipped(format!("value: {e}")),
            },
            Err(e @ KeyError::NotUtf8) => Entry::Skipped(e.to_string()),
            Err(e) => Entry::Skipped(format!("key: {e}")),
        }
    }

    /// Builds the model of the current registry. Service ports in `reserved_ports` (the
    /// ambassador's own listeners) are not routed: their keys are skipped with a reason.
    pub fn model(&self, reserved_ports: &[u16]) -> Model {
        let mut apps: BTreeMap<&str, (&AppKey, Vec<Server>)> = BTreeMap::new();
        let mut services: BTreeMap<u16, (BTreeSet<&str>, Vec<Server>)> = BTreeMap::new();
        let mut hosts = Vec::new();
        let mut skipped = Vec::new();
        for (raw, entry) in &self.entries {
            match entry {
                Entry::App(key, value) => {
                    let server = Server::new(&key.container_id, key.endpoint, value);
                    apps.entry(key.domain.as_str())
                        .or_insert_with(|| (key, Vec::new()))
                        .1
                        .push(server);
                }
                Entry::Service(key, value) => {
                    let port = key.service_port.get();
                    if reserved_ports.contains(&port) {
                        skipped.push(SkippedKey {
                            key: raw.clone(),
                            reason: format!(
                                "service port {port} is taken by the ambassador's own listener"
                            ),
                        });
                        continue;
                    }
                    let service = services.entry(port).or_default();
                    service.0.insert(key.name.as_str());
                    service
                        .1
                        .push(Server::new(&key.container_id, key.endpoint, value));
                }
                Entry::Host(key, record) => hosts.push(Host {
                    host_id: key.host_id.to_string(),
                    ip: record.ip.to_string(),
                    version: record.version.clone(),
                }),
                Entry::Skipped(reason) => skipped.push(SkippedKey {
                    key: raw.clone(),
                    reason: reason.clone(),
                }),
            }
        }
        skipped.sort();
        let apps = apps
            .into_values()
            .map(|(key, servers)| {
                let servers = arrange(servers);
                let wildcard = key.domain.is_wildcard();
                let domain = key.domain.to_string();
                App {
                    backend: if wildcard {
                        format!("wild_{}", &domain[2..])
                    } else {
                        format!("app_{domain}")
                    },
                    check_path: servers
                        .iter()
                        .map(|s| s.check_path.as_str())
                        .find(|p| !p.is_empty())
                        .unwrap_or_default()
                        .to_owned(),
                    domain,
                    wildcard,
                    servers,
                }
            })
            .collect();
        let services = services
            .into_iter()
            .map(|(port, (names, servers))| Service {
                port,
                names: names.into_iter().map(str::to_owned).collect(),
                backend: format!("svc_{port}"),
                servers: arrange(servers),
            })
            .collect();
        Model {
            apps,
            services,
            hosts,
            skipped,
            revision: self.revision,
        }
    }
}

/// Orders servers by (ip, port, container id), drops duplicates of one container endpoint (one
/// container registered under two names of one service port) and makes names unique.
fn arrange(mut servers: Vec<Server>) -> Vec<Server> {
    servers.sort_by(|a, b| {
        (a.ip_addr, a.port, &a.container_id).cmp(&(b.ip_addr, b.port, &b.container_id))
    });
    servers.dedup_by(|a, b| {
        (a.ip_addr, a.port, &a.container_id) == (b.ip_addr, b.port, &b.container_id)
    });
    let mut names = BTreeSet::new();
    for server in &mut servers {
        // Names derive from a 12-digit id prefix: two ids sharing it at one endpoint can only
        // come from hand-written keys, and still get distinct, stable names.
        let base = server.name.clone();
        let mut n = 1;
        while !names.insert(server.name.clone()) {
            n += 1;
            server.name = format!("{base}-{n}");
        }
    }
    servers
}

/// The printable form of a raw key, for logs: escaped, at most 200 characters.
pub fn printable(key: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(key).escape_debug().collect();
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text,
    }
}

/// One backend endpoint. Every string field has passed the registry validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Server {
    /// Name inside its backend: `<12-digit id>-<ip>-<port>`, stable across renders.
    pub name: String,
    /// Full container id.
    pub container_id: String,
    /// Host IP, without brackets.
    pub ip: String,
    /// Published host port.
    pub port: u16,
    /// `ip:port`, with brackets around an IPv6 address: what an HAProxy `server` line takes.
    pub address: String,
    /// Host id of the registrar that wrote it; empty for seed-era keys.
    pub host_id: String,
    /// Container name; empty when unknown.
    pub container_name: String,
    /// HAProxy weight, 0-256.
    pub weight: u16,
    /// HTTP health-check path; empty for a plain TCP check.
    pub check_path: String,
    #[serde(skip)]
    ip_addr: IpAddr,
}

impl Server {
    fn new(container_id: &ContainerId, endpoint: Endpoint, value: &RegistrationValue) -> Self {
        let ip = endpoint.ip.get();
        Self {
            name: format!("{}-{ip}-{}", container_id.short(), endpoint.port),
            container_id: container_id.to_string(),
            ip: ip.to_string(),
            port: endpoint.port.get(),
            address: endpoint.to_string(),
            host_id: value
                .host_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            container_name: value
                .container_name
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            weight: value.weight.unwrap_or_default().get(),
            check_path: value
                .check_path
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            ip_addr: ip,
        }
    }

    fn to_proto(&self) -> v1::Server {
        v1::Server {
            name: self.name.clone(),
            container_id: self.container_id.clone(),
            ip: self.ip.clone(),
            port: u32::from(self.port),
            host_id: self.host_id.clone(),
            container_name: self.container_name.clone(),
            weight: u32::from(self.weight),
            check_path: self.check_path.clone(),
        }
    }
}

/// An HTTP app: the servers of one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct App {
    /// Lower-case domain, possibly `*.example.com`.
    pub domain: String,
    /// Whether the domain is a wildcard.
    pub wildcard: bool,
    /// Backend name: `app_<domain>`, or `wild_<suffix>` for `*.<suffix>`.
    pub backend: String,
    /// The first non-empty check path of its servers; empty: TCP checks.
    pub check_path: String,
    /// Servers ordered by (ip, port, container id).
    pub servers: Vec<Server>,
}

/// A TCP service: the servers of one service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// The service port.
    pub port: u16,
    /// Names registered on it, sorted; several share one listener.
    pub names: Vec<String>,
    /// Backend (listener) name: `svc_<port>`.
    pub backend: String,
    /// Servers ordered by (ip, port, container id).
    pub servers: Vec<Server>,
}

/// A live registrar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    /// Its host id.
    pub host_id: String,
    /// The IP it publishes under.
    pub ip: String,
    /// Its legate version.
    pub version: String,
}

/// A registry key that is not rendered, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SkippedKey {
    /// The raw key.
    pub key: Vec<u8>,
    /// Why it is skipped.
    pub reason: String,
}

/// Everything rendered from one registry revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// Apps ordered by domain.
    pub apps: Vec<App>,
    /// Services ordered by port.
    pub services: Vec<Service>,
    /// Live registrars ordered by host id.
    pub hosts: Vec<Host>,
    /// Skipped keys ordered by key. Not given to templates: a key is hostile text.
    pub skipped: Vec<SkippedKey>,
    /// The etcd revision it was read at.
    pub revision: i64,
}

/// Map file of exact host names: `<domain> <backend>` lines.
pub const HOSTS_MAP: &str = "hosts.map";
/// Map file of wildcard suffixes: `.<suffix> <backend>` lines, longest suffix first (HAProxy's
/// `map_end` returns the first match in file order).
pub const WILDCARDS_MAP: &str = "wildcards.map";

impl Model {
    /// The map files routing host names to backends, ordered by name.
    pub fn maps(&self) -> Vec<v1::ConfigFile> {
        let mut hosts = String::new();
        let mut wildcards: Vec<(&str, &str)> = Vec::new();
        for app in &self.apps {
            if app.wildcard {
                wildcards.push((&app.domain[1..], &app.backend));
            } else {
                hosts.push_str(&format!("{} {}\n", app.domain, app.backend));
            }
        }
        wildcards.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        let wildcards: String = wildcards
            .into_iter()
            .map(|(suffix, backend)| format!("{suffix} {backend}\n"))
            .collect();
        vec![
            v1::ConfigFile {
                name: HOSTS_MAP.to_owned(),
                content: hosts,
            },
            v1::ConfigFile {
                name: WILDCARDS_MAP.to_owned(),
                content: wildcards,
            },
        ]
    }

    /// Service ports that several names share.
    pub fn shared_ports(&self) -> Vec<v1::SharedPort> {
        self.services
            .iter()
            .filter(|s| s.names.len() > 1)
            .map(|s| v1::SharedPort {
                port: u32::from(s.port),
                names: s.names.clone(),
            })
            .collect()
    }

    /// The model as sent to supervisors.
    pub fn to_proto(&self) -> v1::Model {
        v1::Model {
            apps: self
                .apps
                .iter()
                .map(|a| v1::App {
                    domain: a.domain.clone(),
                    backend: a.backend.clone(),
                    servers: a.servers.iter().map(Server::to_proto).collect(),
                })
                .collect(),
            services: self
                .services
                .iter()
                .map(|s| v1::Service {
                    port: u32::from(s.port),
                    names: s.names.clone(),
                    backend: s.backend.clone(),
                    servers: s.servers.iter().map(Server::to_proto).collect(),
                })
                .collect(),
            hosts: self
                .hosts
                .iter()
                .map(|h| v1::Host {
                    host_id: h.host_id.clone(),
                    ip: h.ip.clone(),
                    version: h.version.clone(),
                })
                .collect(),
            skipped: self.skipped_proto(),
            etcd_revision: self.revision,
        }
    }

    /// The skipped keys as in `Model.skipped` and `ConfgenStatus.skipped`.
    pub fn skipped_proto(&self) -> Vec<v1::SkippedKey> {
        self.skipped
            .iter()
            .map(|s| v1::SkippedKey {
                key: s.key.clone(),
                reason: s.reason.clone(),
            })
            .collect()
    }
}
