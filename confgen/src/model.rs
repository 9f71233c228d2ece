//! confgen's pure core: the registry as read from etcd, and the model built from it.
//!
//! [`Registry`] holds every key of the registry directories (`apps/`, `services/`, `hosts/`)
//! validated when it is put: a key or value that does not parse or validate is kept as a
//! skipped entry with its reason, never dropped silently and never rendered. [`Registry::model`]
//! groups the parsed entries into a [`Model`]: apps by domain, services by port, live hosts,
//! all in a deterministic order, so the same registry always renders byte-identical output
//! from a fresh [`Slots`] pool (which pooled backend serves which domain depends on the order
//! domains came in, see [`Slots`]). No I/O here: the watcher feeds it, the renderer reads its models.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use legate_proto::registry::{
    AppKey, ContainerId, Endpoint, HostKey, HostRecord, Key, KeyError, KeyKind, Refusal,
    RefusedKey, RegistrationValue, Schema, ServiceKey,
};
use legate_proto::v1;

use crate::render::View;

/// One key of the registry directories, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// An app's key and value, both valid, with the raw value: they are parsed again where
    /// they are read ([`Registry::app`], a few keys at a time). Kept parsed, every key held its
    /// domain and container id once more, in allocations of their own (confgen's RSS after a
    /// sync of 31,000 keys: 70.0 MiB then, 55.9 MiB now).
    App(Box<[u8]>),
    Service(Box<(ServiceKey, RegistrationValue)>),
    Host(Box<(HostKey, HostRecord)>),
    /// A container a registrar refused: not routed, shown in the status.
    Refused(Box<(RefusedKey, Refusal)>),
    /// The key or its value does not parse or validate.
    Skipped(Box<str>),
}

/// Every registry key confgen has read, validated, at one etcd revision.
#[derive(Debug, Clone)]
pub struct Registry {
    schema: Schema,
    /// The prefixes of the directories this registry reads: `<prefix>/apps/`, ...
    dirs: [String; 4],
    entries: BTreeMap<Vec<u8>, Entry>,
    /// The raw keys of apps whose domain is not written in lower case, by the domain they
    /// serve (lower-cased): [`Registry::app`] finds the others by their prefix.
    folded: BTreeMap<String, BTreeSet<Vec<u8>>>,
    revision: i64,
    /// The names registered on each service port, with how many keys each has there.
    port_names: BTreeMap<u16, BTreeMap<String, usize>>,
    /// What changed since the last [`Registry::take_changes`].
    changes: Changes,
}

/// What changed in a [`Registry`]: the apps, service ports and keys that [`Routes`] must look
/// at again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Domains with a key put or deleted.
    pub apps: BTreeSet<String>,
    /// Service ports with a key put or deleted.
    pub ports: BTreeSet<u16>,
    /// Whether a host key changed.
    pub hosts: bool,
    /// Every key put or deleted (for the list of skipped keys).
    pub keys: BTreeSet<Vec<u8>>,
}

impl Changes {
    /// Notes that the key `raw` (under `apps`, the apps' directory, when an app's) was put
    /// with `entry` or held it.
    fn note(&mut self, raw: &[u8], entry: &Entry, apps: &str) {
        match entry {
            Entry::App(_) => {
                if let Some(domain) = raw_domain(raw, apps) {
                    self.apps.insert(domain.to_ascii_lowercase());
                }
            }
            Entry::Service(service) => {
                self.ports.insert(service.0.service_port.get());
            }
            Entry::Host(..) => self.hosts = true,
            Entry::Refused(..) | Entry::Skipped(_) => {}
        }
        // Only these can be skipped ([`Registry::skipped`]): a full listing of 30,000 keys
        // does not copy each one here.
        if matches!(entry, Entry::Skipped(_) | Entry::Service(..)) {
            self.keys.insert(raw.to_vec());
        }
    }
}

/// The domain segment of the raw key of an app, as written (a valid domain, the key having
/// parsed, but perhaps in capitals).
fn raw_domain<'a>(raw: &'a [u8], apps: &str) -> Option<&'a str> {
    let rest = raw.strip_prefix(apps.as_bytes())?;
    let end = rest.iter().position(|&b| b == b'/')?;
    std::str::from_utf8(&rest[..end]).ok()
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
            folded: BTreeMap::new(),
            revision: 0,
            port_names: BTreeMap::new(),
            changes: Changes::default(),
        }
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Stores `entry` under `key`, or removes the key, recording what changed.
    fn set(&mut self, key: Vec<u8>, entry: Option<Entry>) {
        if self.entries.get(&key) == entry.as_ref() {
            return;
        }
        if let Some(entry) = &entry {
            self.noted(&key, entry, true);
        }
        self.fold(&key, matches!(entry, Some(Entry::App(_))));
        let old = match entry {
            Some(entry) => self.entries.insert(key.clone(), entry),
            None => self.entries.remove(&key),
        };
        if let Some(old) = old {
            self.noted(&key, &old, false);
        }
    }

    /// Records that `entry` was `added` under `key`, or went.
    fn noted(&mut self, key: &[u8], entry: &Entry, added: bool) {
        self.changes.note(key, entry, &self.dirs[0]);
        self.count_name(entry, added);
    }

    /// Keeps `raw` in [`Registry::folded`] while it is an `app` key with capitals in its domain.
    fn fold(&mut self, raw: &[u8], app: bool) {
        let Some(domain) = raw_domain(raw, &self.dirs[0]) else {
            return;
        };
        if !domain.bytes().any(|b| b.is_ascii_uppercase()) {
            return;
        }
        let domain = domain.to_ascii_lowercase();
        if app {
            self.folded.entry(domain).or_default().insert(raw.to_vec());
        } else if let Some(keys) = self.folded.get_mut(&domain) {
            keys.remove(raw);
            if keys.is_empty() {
                self.folded.remove(&domain);
            }
        }
    }

    fn count_name(&mut self, entry: &Entry, added: bool) {
        let Entry::Service(service) = entry else {
            return;
        };
        let key = &service.0;
        let port = key.service_port.get();
        let names = self.port_names.entry(port).or_default();
        let name = key.name.as_str();
        if added {
            *names.entry(name.to_owned()).or_default() += 1;
        } else if let Some(count) = names.get_mut(name) {
            *count -= 1;
            if *count == 0 {
                names.remove(name);
                if names.is_empty() {
                    self.port_names.remove(&port);
                }
            }
        }
    }

    /// The entries whose raw key starts with `prefix`, in key order.
    fn prefixed<'a>(&'a self, prefix: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a Entry)> {
        self.entries
            .range::<[u8], _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(key, _)| key.starts_with(prefix))
            .map(|(key, entry)| (key.as_slice(), entry))
    }

    /// The parsed key and value of an app's entry (both parsed when the key was put).
    fn parse_app(&self, raw: &[u8], value: &[u8]) -> Option<(AppKey, RegistrationValue)> {
        let Ok(Key::App(key)) = self.schema.parse(raw) else {
            return None;
        };
        let value = RegistrationValue::parse(value, &key.endpoint).ok()?;
        Some((key, value))
    }

    /// The app of `domain` (lower case) as the registry has it now (`backend` named after the
    /// domain, no slot), or `None` when no key of it parses.
    pub fn app(&self, domain: &str) -> Option<v1::App> {
        let prefix = format!("{}{domain}/", self.dirs[0]);
        let folded = self.folded.get(domain).into_iter().flatten();
        let folded = folded.filter_map(|raw| Some((raw.as_slice(), self.entries.get(raw)?)));
        let mut found: Option<AppKey> = None;
        let mut servers = Vec::new();
        // In key order, as [`Registry::model`] reads them (of two keys of one container
        // endpoint, the first counts): a key with capitals in its domain sorts before the one
        // without, where their domains first differ.
        for (raw, entry) in folded.chain(self.prefixed(prefix.as_bytes())) {
            if let Entry::App(value) = entry
                && let Some((key, value)) = self.parse_app(raw, value)
            {
                servers.push(server(&key.container_id, key.endpoint, &value));
                found.get_or_insert(key);
            }
        }
        found.map(|key| build_app(&key, servers))
    }

    /// The service on `port` as the registry has it now, or `None` when no key of it parses.
    pub fn service(&self, port: u16) -> Option<v1::Service> {
        let names = self.port_names.get(&port)?;
        let mut servers = Vec::new();
        for name in names.keys() {
            let prefix = format!("{}{name}/{port}/", self.dirs[1]);
            for (_, entry) in self.prefixed(prefix.as_bytes()) {
                if let Entry::Service(service) = entry {
                    let (key, value) = &**service;
                    servers.push(server(&key.container_id, key.endpoint, value));
                }
            }
        }
        Some(build_service(
            port,
            names.keys().map(String::as_str),
            servers,
        ))
    }

    /// The live hosts, in key order.
    pub fn hosts(&self) -> Vec<v1::Host> {
        self.prefixed(self.dirs[2].as_bytes())
            .filter_map(|(_, entry)| match entry {
                Entry::Host(host_entry) => Some(host(&host_entry.0, &host_entry.1)),
                _ => None,
            })
            .collect()
    }

    /// Why the key `raw` is skipped, if it is, with `reserved_ports` not routed.
    pub fn skipped(&self, raw: &[u8], reserved_ports: &[u16]) -> Option<String> {
        match self.entries.get(raw)? {
            Entry::Skipped(reason) => Some(reason.to_string()),
            Entry::Service(service) if reserved_ports.contains(&service.0.service_port.get()) => {
                Some(reserved(service.0.service_port.get()))
            }
            _ => None,
        }
    }

    /// Every skipped key with its reason, with `reserved_ports` not routed.
    pub fn all_skipped(&self, reserved_ports: &[u16]) -> BTreeMap<Vec<u8>, String> {
        self.entries
            .keys()
            .filter_map(|raw| Some((raw.clone(), self.skipped(raw, reserved_ports)?)))
            .collect()
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
    /// that were not skipped for the same reason before. Only what differs from the entries held
    /// before counts as changed.
    pub fn reset(
        &mut self,
        kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        revision: i64,
    ) -> Vec<SkipNotice> {
        let mut previous: BTreeSet<Vec<u8>> = self.entries.keys().cloned().collect();
        let mut notices = Vec::new();
        // The first listing builds the map at once, its nodes full (inserted one by one, in
        // order, they would stay half empty: twice the memory).
        let mut first = self.entries.is_empty().then(Vec::new);
        for (key, value) in kvs {
            if !self.owns(&key) {
                continue;
            }
            let entry = self.parse(&key, &value);
            previous.remove(&key);
            if let Entry::Skipped(reason) = &entry
                && self.entries.get(&key) != Some(&entry)
            {
                notices.push(SkipNotice {
                    key: printable(&key),
                    reason: reason.to_string(),
                });
            }
            match &mut first {
                Some(first) => {
                    self.noted(&key, &entry, true);
                    self.fold(&key, matches!(entry, Entry::App(_)));
                    first.push((key, entry));
                }
                None => self.set(key, Some(entry)),
            }
        }
        if let Some(first) = first {
            // An etcd listing holds each key once.
            self.entries = first.into_iter().collect();
        }
        for key in previous {
            self.set(key, None);
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
                reason: reason.to_string(),
            }),
            _ => None,
        };
        self.set(key, Some(entry));
        notice
    }

    /// Applies a delete seen at `revision`.
    pub fn delete(&mut self, key: &[u8], revision: i64) {
        self.revision = self.revision.max(revision);
        self.set(key.to_vec(), None);
    }

    fn owns(&self, key: &[u8]) -> bool {
        self.dirs.iter().any(|dir| key.starts_with(dir.as_bytes()))
    }

    fn parse(&self, key: &[u8], value: &[u8]) -> Entry {
        let skipped = |e: String| Entry::Skipped(e.into_boxed_str());
        match self.schema.parse(key) {
            Ok(Key::App(key)) => match RegistrationValue::parse(value, &key.endpoint) {
                Ok(_) => Entry::App(value.into()),
                Err(e) => skipped(format!("value: {e}")),
            },
            Ok(Key::Service(key)) => match RegistrationValue::parse(value, &key.endpoint) {
                Ok(value) => Entry::Service(Box::new((key, value))),
                Err(e) => skipped(format!("value: {e}")),
            },
            Ok(Key::Host(key)) => match HostRecord::parse(value) {
                Ok(record) => Entry::Host(Box::new((key, record))),
                Err(e) => skipped(format!("value: {e}")),
            },
            Ok(Key::Refused(key)) => match Refusal::parse(value) {
                Ok(refusal) => Entry::Refused(Box::new((key, refusal))),
                Err(e) => skipped(format!("value: {e}")),
            },
            Err(e @ KeyError::NotUtf8) => skipped(e.to_string()),
            Err(e) => skipped(format!("key: {e}")),
        }
    }

    /// The containers the registrars refused, in key order (host id, then container id).
    pub fn refusals(&self) -> Vec<v1::HostRefusal> {
        self.prefixed(self.dirs[3].as_bytes())
            .filter_map(|(_, entry)| match entry {
                Entry::Refused(refused) => {
                    let (key, refusal) = &**refused;
                    Some(v1::HostRefusal {
                        host_id: key.host_id.to_string(),
                        container_id: key.container_id.to_string(),
                        container_name: refusal
                            .container_name
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        reason: refusal.reason.clone(),
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// Builds the model of the current registry from scratch, as a fresh confgen does (no
    /// slots assigned: [`Slots::assign`]). Service ports in `reserved_ports` (the ambassador's
    /// own listeners) are not routed: their keys are skipped with a reason.
    pub fn model(&self, reserved_ports: &[u16]) -> Model {
        let mut apps: BTreeMap<String, (AppKey, Vec<Sortable>)> = BTreeMap::new();
        let mut services: BTreeMap<u16, (BTreeSet<&str>, Vec<Sortable>)> = BTreeMap::new();
        let mut hosts = Vec::new();
        for (raw, entry) in &self.entries {
            match entry {
                Entry::App(value) => {
                    let Some((key, value)) = self.parse_app(raw, value) else {
                        continue;
                    };
                    let server = server(&key.container_id, key.endpoint, &value);
                    apps.entry(key.domain.to_string())
                        .or_insert_with(|| (key, Vec::new()))
                        .1
                        .push(server);
                }
                Entry::Service(service) => {
                    let (key, value) = &**service;
                    let port = key.service_port.get();
                    if reserved_ports.contains(&port) {
                        continue;
                    }
                    let service = services.entry(port).or_default();
                    service.0.insert(key.name.as_str());
                    service
                        .1
                        .push(server(&key.container_id, key.endpoint, value));
                }
                Entry::Host(host_entry) => hosts.push(host(&host_entry.0, &host_entry.1)),
                Entry::Refused(..) | Entry::Skipped(_) => {}
            }
        }
        Model {
            apps: apps
                .into_values()
                .map(|(key, servers)| build_app(&key, servers))
                .collect(),
            services: services
                .into_iter()
                .map(|(port, (names, servers))| build_service(port, names.into_iter(), servers))
                .collect(),
            hosts,
            skipped: skipped_keys(self.all_skipped(reserved_ports)),
            etcd_revision: self.revision,
            slots: 0,
        }
    }
}

/// Why a service key on a reserved port is skipped.
fn reserved(port: u16) -> String {
    format!("service port {port} is taken by the ambassador's own listener")
}

/// The skipped keys as the model lists them, in key order.
fn skipped_keys(skipped: BTreeMap<Vec<u8>, String>) -> Vec<v1::SkippedKey> {
    skipped
        .into_iter()
        .map(|(key, reason)| v1::SkippedKey { key, reason })
        .collect()
}

fn host(key: &HostKey, record: &HostRecord) -> v1::Host {
    v1::Host {
        host_id: key.host_id.to_string(),
        ip: record.ip.to_string(),
        version: record.version.clone(),
    }
}

/// The app of `key`'s domain with these servers, its backend named after the domain.
fn build_app(key: &AppKey, servers: Vec<Sortable>) -> v1::App {
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
}

fn build_service<'a>(
    port: u16,
    names: impl Iterator<Item = &'a str>,
    servers: Vec<Sortable>,
) -> v1::Service {
    v1::Service {
        port: u32::from(port),
        names: names.map(str::to_owned).collect(),
        backend: format!("svc_{port}"),
        servers: arrange(servers),
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
#[derive(Debug, Clone)]
pub struct Slots {
    taken: HashMap<String, u32>,
    free: BTreeSet<u32>,
    total: u32,
    /// Free slots a fresh pool has, in percent of its apps ([`DEFAULT_HEADROOM`]).
    headroom: u32,
}

impl Default for Slots {
    fn default() -> Self {
        Self::with_headroom(DEFAULT_HEADROOM)
    }
}

/// The backend name of pool slot `slot`.
pub fn slot_backend(slot: u32) -> String {
    format!("slot_{slot}")
}

/// Taken over total beyond which the pool is tight ([`Routes::pool_tight`]): 80 %. A fresh pool
/// with the default headroom (half as many free slots as apps) is two thirds taken.
const TIGHT: (u64, u64) = (4, 5);

/// Free slots of a fresh pool, in percent of its apps, unless `--pool-headroom` says otherwise:
/// a burst of new domains half as many as the apps is routed without a reload.
pub const DEFAULT_HEADROOM: u32 = 50;

/// `apps` and `percent` % more.
fn plus(apps: u32, percent: u32) -> u32 {
    let more = u64::from(apps) * u64::from(percent) / 100;
    apps.saturating_add(u32::try_from(more).unwrap_or(u32::MAX))
}

impl Slots {
    /// An empty pool whose fresh size is `headroom` % more than its apps.
    pub fn with_headroom(headroom: u32) -> Self {
        Self {
            taken: HashMap::new(),
            free: BTreeSet::new(),
            total: 0,
            headroom,
        }
    }

    /// Pool size for `apps` pooled apps: the headroom more, at least 32 more, in steps of 32.
    fn pool_size(&self, apps: u32) -> u32 {
        let more = plus(apps, self.headroom).max(apps.saturating_add(32));
        more.div_ceil(32).saturating_mul(32)
    }

    /// Size of a pool grown for `apps` pooled apps: as a fresh pool, and at most two thirds
    /// taken whatever the headroom, so that it is far from both the next growth (over 80 %
    /// taken) and a compaction (over twice a fresh pool's size).
    fn grown_size(&self, apps: u32) -> u32 {
        let two_thirds = plus(apps, 50).div_ceil(32).saturating_mul(32);
        self.pool_size(apps).max(two_thirds)
    }

    /// Gives each plain app of `model` its slot (and backend name), and the model the pool size:
    /// the whole model at once, as [`Routes`] does change by change.
    pub fn assign(&mut self, model: &mut Model) {
        let wanted: BTreeSet<&str> = model
            .apps
            .iter()
            .filter(|app| pooled(app))
            .map(|app| app.domain.as_str())
            .collect();
        let gone: Vec<String> = self
            .taken
            .keys()
            .filter(|domain| !wanted.contains(domain.as_str()))
            .cloned()
            .collect();
        for domain in gone {
            self.release(&domain);
        }
        let new = wanted.len() - self.taken.len();
        self.fit(wanted.len(), new);
        for app in model.apps.iter_mut().filter(|app| pooled(app)) {
            if let Some(slot) = self.place(&app.domain) {
                app.slot = slot;
                app.backend = slot_backend(slot);
            }
        }
        model.slots = self.total;
    }

    /// Frees the slot of `domain`, if it has one.
    fn release(&mut self, domain: &str) {
        if let Some(slot) = self.taken.remove(domain) {
            self.free.insert(slot);
        }
    }

    /// Readies the pool for `needed` pooled apps, `new` of which have no slot yet: a pool far
    /// larger than they need is emptied (returns true: every app must be placed again, which
    /// numbers them afresh), one without enough free slots grows.
    fn fit(&mut self, needed: usize, new: usize) -> bool {
        let needed = u32::try_from(needed).unwrap_or(u32::MAX);
        let compacted = self.total > 2 * self.pool_size(needed);
        let new = if compacted {
            *self = Self::with_headroom(self.headroom);
            needed as usize
        } else {
            new
        };
        if new > self.free.len() {
            // A pool that overflows grows as one grown ahead of need does ([`Routes::grow`]),
            // so that the burst of new domains that filled it does not fill it again at once
            // (each time a reload); a fresh one is sized for its apps.
            let total = if self.total == 0 {
                self.pool_size(needed)
            } else {
                self.grown_size(needed)
            };
            self.free.extend(self.total + 1..=total);
            self.total = total;
        }
        compacted
    }

    /// The slot of `domain`, a free one if it has none yet (`None` only if the pool, which
    /// [`Slots::fit`] sized, is full).
    fn place(&mut self, domain: &str) -> Option<u32> {
        if let Some(slot) = self.taken.get(domain) {
            return Some(*slot);
        }
        let slot = self.free.pop_first()?;
        self.taken.insert(domain.to_owned(), slot);
        Some(slot)
    }

    /// Size of the pool.
    pub fn total(&self) -> u32 {
        self.total
    }
}

/// Whether `app` is served by a pooled backend: a plain domain without an HTTP health check.
fn pooled(app: &v1::App) -> bool {
    !app.wildcard && app.check_path.is_empty()
}

/// The model kept up to date change by change: the registry's [`Changes`] rebuild only the
/// apps and services they touch. An app or service that comes out equal to what it was stays
/// the same `Arc`, so the renderer's cache of its block stays valid; the others are new ones.
/// Slots are assigned as [`Slots::assign`] assigns them over the whole model after the same
/// changes, so the same history gives the same model either way.
#[derive(Debug, Default)]
pub struct Routes {
    reserved_ports: Vec<u16>,
    /// Apps by domain.
    pub apps: Arc<BTreeMap<String, Arc<v1::App>>>,
    /// Services by port.
    pub services: Arc<BTreeMap<u16, Arc<v1::Service>>>,
    /// Live hosts.
    pub hosts: Arc<Vec<v1::Host>>,
    /// The app in each slot of the pool (index: slot - 1).
    pub pool: Arc<Vec<Option<Arc<v1::App>>>>,
    skipped: BTreeMap<Vec<u8>, String>,
    slots: Slots,
    revision: i64,
    /// Changes to what the map files say: a domain that comes or goes, a backend or wildcard
    /// that changes.
    maps_generation: u64,
    /// Views given so far ([`Routes::view`]).
    views: u64,
    /// What changed since the last view.
    touched: Touched,
}

/// What changed in a [`Routes`] between two of its views, so that a renderer can render again
/// only the blocks of what changed ([`crate::render::Renderer`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// The view these changes lead to (the previous one is `view - 1`).
    pub view: u64,
    /// Whether something changed beyond apps and services in place and pooled apps that came
    /// or went: an app with a backend of its own or a service that came or went, an app that
    /// moved to another slot, the pool's size, the hosts. Then the items' positions and the
    /// root of a template's context may have changed.
    pub reshaped: bool,
    /// Domains whose app may have changed in place: the same domain, in the same slot or (gone
    /// and back between two views) another one.
    pub apps: BTreeSet<String>,
    /// Domains of pooled apps that came: each took a free slot.
    pub arrived: BTreeSet<String>,
    /// Domains of pooled apps that went: each freed its slot.
    pub left: BTreeSet<String>,
    /// Slots that an app took or freed: those of `arrived`, `left`, and apps gone and back.
    pub slots: BTreeSet<u32>,
    /// Ports whose service may have changed in place.
    pub services: BTreeSet<u16>,
}

impl Touched {
    /// Records that the app of `domain` went from slot `before` to slot `after` (`None`: no
    /// app; `Some(0)`: a backend of its own). A pooled app that comes and goes again between
    /// two views is no change; one that goes and comes again changed in place.
    fn app(&mut self, domain: String, before: Option<u32>, after: Option<u32>) {
        match (before, after) {
            (None, None) => {}
            (Some(before), Some(after)) if before == after => {
                if !self.arrived.contains(&domain) {
                    self.apps.insert(domain);
                }
            }
            (None, Some(slot)) if slot > 0 => {
                self.slots.insert(slot);
                if self.left.remove(&domain) {
                    self.apps.insert(domain);
                } else {
                    self.arrived.insert(domain);
                }
            }
            (Some(slot), None) if slot > 0 => {
                self.slots.insert(slot);
                self.apps.remove(&domain);
                if !self.arrived.remove(&domain) {
                    self.left.insert(domain);
                }
            }
            _ => self.reshaped = true,
        }
    }
}

impl Routes {
    /// An empty model; service ports in `reserved_ports` are never routed; the pool of a
    /// fresh model is `headroom` % larger than its apps need.
    pub fn new(reserved_ports: Vec<u16>, headroom: u32) -> Self {
        Self {
            reserved_ports,
            slots: Slots::with_headroom(headroom),
            ..Self::default()
        }
    }

    /// Applies what changed in `registry` since the last update. Returns whether backends came
    /// or went (a service port, an app with a backend of its own, the pool's size): then the
    /// configuration changes beyond servers and map entries, and HAProxy reloads anyway.
    pub fn update(&mut self, registry: &mut Registry) -> bool {
        let changes = registry.take_changes();
        self.revision = registry.revision();
        let pool_before = self.slots.total;
        let mut sections = self.update_apps(registry, &changes.apps);
        if self.slots.total != pool_before {
            sections = true;
            self.touched.reshaped = true;
        }
        let services = Arc::make_mut(&mut self.services);
        for &port in &changes.ports {
            let service = (!self.reserved_ports.contains(&port))
                .then(|| registry.service(port))
                .flatten();
            let before = services.contains_key(&port);
            let after = keep_or_replace(services, port, service).is_some();
            if after != before {
                sections = true;
                self.touched.reshaped = true;
            } else if after {
                self.touched.services.insert(port);
            }
        }
        if changes.hosts {
            self.hosts = Arc::new(registry.hosts());
            self.touched.reshaped = true;
        }
        for key in changes.keys {
            match registry.skipped(&key, &self.reserved_ports) {
                Some(reason) => self.skipped.insert(key, reason),
                None => self.skipped.remove(&key),
            };
        }
        sections
    }

    /// Returns whether an app's own backend (not a pooled one) came, went or was renamed.
    fn update_apps(&mut self, registry: &Registry, domains: &BTreeSet<String>) -> bool {
        let mut sections = false;
        let apps = Arc::make_mut(&mut self.apps);
        let mut built: Vec<(String, Option<v1::App>)> = Vec::with_capacity(domains.len());
        for domain in domains {
            let app = registry.app(domain);
            if !app.as_ref().is_some_and(pooled) {
                self.slots.release(domain);
            }
            built.push((domain.clone(), app));
        }
        let placing = built
            .iter()
            .filter(|(domain, app)| {
                app.as_ref().is_some_and(pooled) && !self.slots.taken.contains_key(domain)
            })
            .count();
        let needed = self.slots.taken.len() + placing;
        let before = self.slots.total;
        if self.slots.fit(needed, placing) {
            // Numbered afresh: every pooled app takes a new slot, in domain order.
            let mut all: BTreeMap<String, Option<v1::App>> = apps
                .iter()
                .filter(|(_, app)| pooled(app))
                .map(|(domain, app)| (domain.clone(), Some(v1::App::clone(app))))
                .collect();
            all.extend(built);
            built = all.into_iter().collect();
        }
        let pool = Arc::make_mut(&mut self.pool);
        if self.slots.total != before {
            pool.clear();
            pool.resize(self.slots.total as usize, None);
            // Every app in the pool is placed again below, or was placed before in a slot
            // that survives a growth.
            for app in apps.values().filter(|app| app.slot > 0) {
                if let Some(entry) = pool.get_mut(app.slot as usize - 1) {
                    *entry = Some(app.clone());
                }
            }
        }
        for (domain, app) in built {
            let own =
                |app: Option<&v1::App>| app.filter(|a| a.slot == 0).map(|a| a.backend.clone());
            let mapped = |app: Option<&v1::App>| app.map(|a| (a.wildcard, a.backend.clone()));
            let own_before = own(apps.get(&domain).map(|a| &**a));
            let mapped_before = mapped(apps.get(&domain).map(|a| &**a));
            let slot_before = apps.get(&domain).map(|a| a.slot);
            if let Some(old) = apps.get(&domain)
                && old.slot > 0
                && let Some(entry) = pool.get_mut(old.slot as usize - 1)
                && entry.as_ref().is_some_and(|a| Arc::ptr_eq(a, old))
            {
                *entry = None;
            }
            let app = app.map(|mut app| {
                if pooled(&app)
                    && let Some(slot) = self.slots.place(&domain)
                {
                    app.slot = slot;
                    app.backend = slot_backend(slot);
                }
                app
            });
            let kept = keep_or_replace(apps, domain.clone(), app);
            sections |= own(kept.as_deref()) != own_before;
            if mapped(kept.as_deref()) != mapped_before {
                self.maps_generation += 1;
            }
            self.touched
                .app(domain, slot_before, kept.as_ref().map(|a| a.slot));
            if let Some(app) = kept.filter(|app| app.slot > 0)
                && let Some(entry) = pool.get_mut(app.slot as usize - 1)
            {
                *entry = Some(app);
            }
        }
        sections
    }

    /// The model as a renderer reads it, with what changed since the last view.
    pub fn view(&mut self) -> View {
        self.views += 1;
        let touched = Touched {
            view: self.views,
            ..std::mem::take(&mut self.touched)
        };
        View {
            touched: Some(Arc::new(touched)),
            ..View::of(self)
        }
    }

    /// Changes so far to what the map files say.
    pub fn maps_generation(&self) -> u64 {
        self.maps_generation
    }

    /// Size of the pool.
    pub fn slot_count(&self) -> u32 {
        self.slots.total
    }

    /// Whether more than [`TIGHT`] of the pool is taken: it should grow before a new domain
    /// finds it full, which would put a reload in that domain's path.
    pub fn pool_tight(&self) -> bool {
        let taken = self.slots.taken.len() as u64;
        taken * TIGHT.1 > u64::from(self.slots.total) * TIGHT.0
    }

    /// Grows a tight pool: new free slots at the end, every app keeps its own. Returns whether
    /// it grew.
    pub fn grow(&mut self) -> bool {
        if !self.pool_tight() {
            return false;
        }
        let taken = u32::try_from(self.slots.taken.len()).unwrap_or(u32::MAX);
        let slots = &self.slots;
        let total = slots.grown_size(taken).max(slots.total + 32);
        self.slots.free.extend(self.slots.total + 1..=total);
        self.slots.total = total;
        self.touched.reshaped = true;
        Arc::make_mut(&mut self.pool).resize(total as usize, None);
        true
    }

    /// The keys skipped, with their reasons, in key order.
    pub fn skipped(&self) -> Vec<v1::SkippedKey> {
        skipped_keys(self.skipped.clone())
    }

    /// The whole model, copied out (for subscribers that ask for it and for tests).
    pub fn model(&self) -> Model {
        Model {
            apps: self.apps.values().map(|app| v1::App::clone(app)).collect(),
            services: self
                .services
                .values()
                .map(|service| v1::Service::clone(service))
                .collect(),
            hosts: self.hosts.to_vec(),
            skipped: self.skipped(),
            etcd_revision: self.revision,
            slots: self.slots.total,
        }
    }
}

/// Puts `value` under `key` unless an equal one is there (then the old `Arc` stays), removes the
/// key for `None`. Returns what is under the key afterwards.
fn keep_or_replace<K: Ord, V: PartialEq>(
    map: &mut BTreeMap<K, Arc<V>>,
    key: K,
    value: Option<V>,
) -> Option<Arc<V>> {
    match value {
        None => {
            map.remove(&key);
            None
        }
        Some(value) => match map.get(&key) {
            Some(old) if **old == value => Some(old.clone()),
            _ => {
                let value = Arc::new(value);
                map.insert(key, value.clone());
                Some(value)
            }
        },
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
        check_path: text(value.check.as_ref().and_then(|check| check.path())),
        check: value.check.is_some(),
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
    // Collected into a buffer of their own size: reusing the sortable pairs' buffer would keep
    // its larger allocation with each app.
    let mut arranged = Vec::with_capacity(servers.len());
    arranged.extend(servers.into_iter().map(|(_, mut server)| {
        // Names derive from a 12-digit id prefix: two ids sharing it at one endpoint can
        // only come from hand-written keys, and still get distinct, stable names.
        let base = server.name.clone();
        let mut n = 1;
        while !names.insert(server.name.clone()) {
            n += 1;
            server.name = format!("{base}-{n}");
        }
        server
    }));
    arranged
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
    maps_from(hosts, wildcards)
}

/// The map files from the hosts map's text and the wildcards' `(suffix, backend)` pairs.
pub fn maps_from(hosts: String, mut wildcards: Vec<(&str, &str)>) -> Vec<v1::ConfigFile> {
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
pub fn shared_ports<'a>(
    services: impl IntoIterator<Item = &'a v1::Service>,
) -> Vec<v1::SharedPort> {
    services
        .into_iter()
        .filter(|s| s.names.len() > 1)
        .map(|s| v1::SharedPort {
            port: s.port,
            names: s.names.clone(),
        })
        .collect()
}
