//! confgen's pure core: the registry as read from etcd, and the model built from it.
//!
//! [`Registry`] holds every key of the registry directories (`apps/`, `services/`, `hosts/`)
//! parsed once, when it is put: a key or value that does not parse or validate is kept as a
//! skipped entry with its reason, never dropped silently and never rendered. [`Registry::model`]
//! groups the parsed entries into a [`Model`]: apps by domain, services by port, live hosts,
//! all in a deterministic order, so the same registry always renders byte-identical output
//! from a fresh [`Slots`] pool (which pooled backend serves which domain depends on the order
//! domains came in, see [`Slots`]). No I/O here: the watcher feeds it, the renderer reads its models.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use legate_proto::registry::{
    AppKey, ContainerId, Endpoint, HostKey, HostRecord, Key, KeyError, KeyKind, Refusal,
    RefusedKey, RegistrationValue, Schema, ServiceKey,
};
use legate_proto::v1;

/// One key of the registry directories, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    App(AppKey, RegistrationValue),
    Service(ServiceKey, RegistrationValue),
    Host(HostKey, HostRecord),
    /// A container a registrar refused: not routed, shown in the status.
    Refused(RefusedKey, Refusal),
    /// The key or its value does not parse or validate.
    Skipped(String),
}

/// Every registry key confgen has read, parsed, at one etcd revision.
#[derive(Debug, Clone)]
pub struct Registry {
    schema: Schema,
    /// The prefixes of the directories this registry reads: `<prefix>/apps/`, ...
    dirs: [String; 4],
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
        let dirs = [
            KeyKind::App,
            KeyKind::Service,
            KeyKind::Host,
            KeyKind::Refused,
        ]
        .map(|kind| schema.dir(kind));
        Self {
            schema,
            dirs,
            entries: BTreeMap::new(),
            revision: 0,
        }
    }

    /// The directory of one kind of key, with its trailing slash: `<prefix>/apps/`.
    pub fn dir(&self, kind: KeyKind) -> String {
        self.schema.dir(kind)
    }

    /// The etcd range that holds every registry directory: `[<prefix>/apps/, <prefix>/services0)`
    /// (`0` follows `/`; `hosts/` and `refused/` sort between). Keys in it outside the four
    /// directories are ignored.
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
            Ok(Key::Refused(key)) => match Refusal::parse(value) {
                Ok(refusal) => Entry::Refused(key, refusal),
                Err(e) => Entry::Skipped(format!("value: {e}")),
            },
            Err(e @ KeyError::NotUtf8) => Entry::Skipped(e.to_string()),
            Err(e) => Entry::Skipped(format!("key: {e}")),
        }
    }

    /// The containers the registrars refused, in key order (host id, then container id).
    pub fn refusals(&self) -> Vec<v1::HostRefusal> {
        self.entries
            .values()
            .filter_map(|entry| match entry {
                Entry::Refused(key, refusal) => Some(v1::HostRefusal {
                    host_id: key.host_id.to_string(),
                    container_id: key.container_id.to_string(),
                    container_name: refusal
                        .container_name
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    reason: refusal.reason.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Builds the model of the current registry. Service ports in `reserved_ports` (the
    /// ambassador's own listeners) are not routed: their keys are skipped with a reason.
    pub fn model(&self, reserved_ports: &[u16]) -> Model {
        let mut apps: BTreeMap<&str, (&AppKey, Vec<Sortable>)> = BTreeMap::new();
        let mut services: BTreeMap<u16, (BTreeSet<&str>, Vec<Sortable>)> = BTreeMap::new();
        let mut hosts = Vec::new();
        let mut skipped = Vec::new();
        for (raw, entry) in &self.entries {
            match entry {
                Entry::App(key, value) => {
                    let server = server(&key.container_id, key.endpoint, value);
                    apps.entry(key.domain.as_str())
                        .or_insert_with(|| (key, Vec::new()))
                        .1
                        .push(server);
                }
                Entry::Service(key, value) => {
                    let port = key.service_port.get();
                    if reserved_ports.contains(&port) {
                        skipped.push(v1::SkippedKey {
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
                        .push(server(&key.container_id, key.endpoint, value));
                }
                Entry::Host(key, record) => hosts.push(v1::Host {
                    host_id: key.host_id.to_string(),
                    ip: record.ip.to_string(),
                    version: record.version.clone(),
                }),
                Entry::Refused(..) => {}
                Entry::Skipped(reason) => skipped.push(v1::SkippedKey {
                    key: raw.clone(),
                    reason: reason.clone(),
                }),
            }
        }
        skipped.sort_by(|a, b| a.key.cmp(&b.key));
        let apps = apps
            .into_values()
            .map(|(key, servers)| {
                let servers = arrange(servers);
                let wildcard = key.domain.is_wildcard();
                let domain = key.domain.to_string();
                v1::App {
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
                    slot: 0,
                }
            })
            .collect();
        let services = services
            .into_iter()
            .map(|(port, (names, servers))| v1::Service {
                port: u32::from(port),
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
            etcd_revision: self.revision,
            slots: 0,
        }
    }
}

/// The pool of identical backends (`slot_1` ... `slot_<n>`) that plain apps (no HTTP health
/// check, no wildcard) are served by. HAProxy cannot add a backend at runtime, but it can add
/// servers to one and entries to a map: a new domain that takes a free slot is applied without a
/// reload. A domain keeps its slot while it exists; a slot it leaves is free for the next one.
/// The pool grows, by a reload, only when no slot is free, and is compacted, by a reload too,
/// when the apps shrank to far below it. A fresh pool numbers the apps in domain order, so a
/// new confgen renders the same registry identically; a long-running one may differ from it in
/// which slot serves which domain.
#[derive(Debug, Default, Clone)]
pub struct Slots {
    taken: HashMap<String, u32>,
    free: BTreeSet<u32>,
    total: u32,
}

/// The backend name of pool slot `slot`.
pub fn slot_backend(slot: u32) -> String {
    format!("slot_{slot}")
}

/// Pool size for `apps` pooled apps: a quarter more, at least 32 more, in steps of 32.
fn pool_size(apps: u32) -> u32 {
    (apps + (apps / 4).max(32)).div_ceil(32) * 32
}

impl Slots {
    /// Gives each plain app of `model` its slot (and backend name), and the model the pool size.
    pub fn assign(&mut self, model: &mut Model) {
        let pooled = |app: &v1::App| !app.wildcard && app.check_path.is_empty();
        let wanted: BTreeSet<&str> = model
            .apps
            .iter()
            .filter(|app| pooled(app))
            .map(|app| app.domain.as_str())
            .collect();
        let needed = u32::try_from(wanted.len()).unwrap_or(u32::MAX);
        if self.total > 2 * pool_size(needed) {
            *self = Self::default();
        }
        let free = &mut self.free;
        self.taken.retain(|domain, slot| {
            let keep = wanted.contains(domain.as_str());
            if !keep {
                free.insert(*slot);
            }
            keep
        });
        let new = wanted.len() - self.taken.len();
        if new > self.free.len() {
            let total = pool_size(needed);
            self.free.extend(self.total + 1..=total);
            self.total = total;
        }
        for app in model.apps.iter_mut().filter(|app| pooled(app)) {
            let slot = match self.taken.get(&app.domain) {
                Some(slot) => *slot,
                None => {
                    // The pool was sized for every pooled app above.
                    let Some(slot) = self.free.pop_first() else {
                        continue;
                    };
                    self.taken.insert(app.domain.clone(), slot);
                    slot
                }
            };
            app.slot = slot;
            app.backend = slot_backend(slot);
        }
        model.slots = self.total;
    }
}

/// A server with the address it is ordered by.
type Sortable = (IpAddr, v1::Server);

fn server(container_id: &ContainerId, endpoint: Endpoint, value: &RegistrationValue) -> Sortable {
    let ip = endpoint.ip.get();
    let server = v1::Server {
        name: format!("{}-{ip}-{}", container_id.short(), endpoint.port),
        container_id: container_id.to_string(),
        ip: ip.to_string(),
        port: u32::from(endpoint.port.get()),
        host_id: text(value.host_id.as_ref()),
        container_name: text(value.container_name.as_ref()),
        weight: u32::from(value.weight.unwrap_or_default().get()),
        check_path: text(value.check_path.as_ref()),
        address: endpoint.to_string(),
    };
    (ip, server)
}

fn text(value: Option<&impl ToString>) -> String {
    value.map(ToString::to_string).unwrap_or_default()
}

/// Orders servers by (ip, port, container id), drops duplicates of one container endpoint (one
/// container registered under two names of one service port) and makes names unique.
fn arrange(mut servers: Vec<Sortable>) -> Vec<v1::Server> {
    let order = |(ip, s): &Sortable| (*ip, s.port, s.container_id.clone());
    servers.sort_by_cached_key(order);
    servers.dedup_by(|a, b| order(a) == order(b));
    let mut names = BTreeSet::new();
    servers
        .into_iter()
        .map(|(_, mut server)| {
            // Names derive from a 12-digit id prefix: two ids sharing it at one endpoint can
            // only come from hand-written keys, and still get distinct, stable names.
            let base = server.name.clone();
            let mut n = 1;
            while !names.insert(server.name.clone()) {
                n += 1;
                server.name = format!("{base}-{n}");
            }
            server
        })
        .collect()
}

/// The printable form of a raw key, for logs: escaped, at most 200 characters.
pub fn printable(key: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(key).escape_debug().collect();
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text,
    }
}

/// Everything rendered from one registry revision: the `legate.v1` model, built directly so
/// that a large registry is held once, not once more for the snapshot. Every string in it has
/// passed the registry validation.
pub type Model = v1::Model;

/// Map file of exact host names: `<domain> <backend>` lines.
pub const HOSTS_MAP: &str = "hosts.map";
/// Map file of wildcard suffixes: `.<suffix> <backend>` lines, longest suffix first (HAProxy's
/// `map_end` returns the first match in file order).
pub const WILDCARDS_MAP: &str = "wildcards.map";

/// The map files routing host names to backends, ordered by name.
pub fn maps(model: &Model) -> Vec<v1::ConfigFile> {
    let mut hosts = String::new();
    let mut wildcards: Vec<(&str, &str)> = Vec::new();
    for app in &model.apps {
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
pub fn shared_ports(model: &Model) -> Vec<v1::SharedPort> {
    model
        .services
        .iter()
        .filter(|s| s.names.len() > 1)
        .map(|s| v1::SharedPort {
            port: s.port,
            names: s.names.clone(),
        })
        .collect()
}
