//! What it takes to go from the configuration HAProxy runs to a new one (pure, no I/O).
//!
//! The runtime API can change servers of existing backends and entries of loaded maps; anything
//! else needs a reload. [`plan`] compares the two configurations as text, so it serves confgen's
//! snapshots and hand-made ones alike: when every line other than the `server` lines of
//! `backend`/`listen` sections is identical and every map keeps its name and entry order, the
//! difference becomes runtime API commands; otherwise the answer is a reload, with the reason.
//!
//! Every word that goes into a command has passed [`cli_safe`]: the admin socket splits commands
//! on `;` and new lines, so nothing from a snapshot can smuggle a second command in. A server
//! line or map entry that is not safe, or not understood, simply takes the reload path, where
//! `haproxy -c` judges it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};

use legate_proto::snapshot::{Span, common_prefix, common_suffix};
use legate_proto::v1::ConfigFile;
use memchr::memmem;

/// A configuration as files: the text after `global` and its maps.
#[derive(Debug, Clone, Copy)]
pub struct Files<'a> {
    pub config: &'a str,
    pub maps: &'a [ConfigFile],
}

/// How to apply a new configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The runtime API can do it: no reload.
    Runtime(Runtime),
    /// A reload is needed, for this reason.
    Reload(String),
}

/// Runtime API work, in the order it must run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runtime {
    /// Orders for the admin socket: servers added, map entries changed, servers changed,
    /// removed servers put into maintenance (they drain their connections from then on).
    pub commands: Vec<Order>,
    /// Servers to delete (`del server`) once drained, with their definition.
    pub removed: Vec<(ServerId, String)>,
    /// Servers that were draining and are back as they were: ready again, no longer draining.
    pub revived: Vec<ServerId>,
}

/// `(backend, server)`.
pub type ServerId = (String, String);

/// Servers removed at runtime that HAProxy still has, in maintenance until their connections
/// end, with their definition (`address args...`).
pub type Draining = BTreeMap<ServerId, String>;

/// One order for HAProxy's admin socket. Its command text and the replies that mean it worked
/// are written here and nowhere else. Every word in it has passed [`cli_safe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// `add server <backend>/<name> <address> <args...>`: it starts in maintenance.
    AddServer {
        backend: String,
        name: String,
        address: String,
        /// The `default-server` arguments, then the server's own.
        args: Vec<String>,
    },
    /// `enable health <backend>/<name>`: an added server's checks start.
    EnableHealth { backend: String, name: String },
    /// `enable agent <backend>/<name>`.
    EnableAgent { backend: String, name: String },
    /// `set server <backend>/<name> state ready|maint`.
    SetState {
        backend: String,
        name: String,
        state: State,
    },
    /// `set server <backend>/<name> addr <ip> port <port>`.
    SetAddress {
        backend: String,
        name: String,
        ip: IpAddr,
        port: u16,
    },
    /// `set server <backend>/<name> weight <weight>`.
    SetWeight {
        backend: String,
        name: String,
        weight: String,
    },
    /// `del server <backend>/<name>` (a server in maintenance without connections).
    DelServer { backend: String, name: String },
    /// `add map <map> <key> <value>`, `set map ...`, `del map <map> <key>`.
    Map {
        map: String,
        key: String,
        change: MapChange,
    },
}

/// A server's administrative state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Takes traffic.
    Ready,
    /// Takes no new traffic; its connections go on (it drains).
    Maint,
}

/// What an [`Order::Map`] does to its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapChange {
    /// A new entry, added at the end.
    Add(String),
    /// The entry's value changes in place.
    Set(String),
    /// The entry goes.
    Del,
}

impl Order {
    /// A server's state.
    pub fn set_state(backend: &str, name: &str, state: State) -> Self {
        Self::SetState {
            backend: backend.to_owned(),
            name: name.to_owned(),
            state,
        }
    }

    /// The command line, without its new line.
    pub fn line(&self) -> String {
        match self {
            Self::AddServer {
                backend,
                name,
                address,
                args,
            } => {
                let mut line = format!("add server {backend}/{name} {address}");
                for arg in args {
                    line.push(' ');
                    line.push_str(arg);
                }
                line
            }
            Self::EnableHealth { backend, name } => format!("enable health {backend}/{name}"),
            Self::EnableAgent { backend, name } => format!("enable agent {backend}/{name}"),
            Self::SetState {
                backend,
                name,
                state,
            } => {
                let state = match state {
                    State::Ready => "ready",
                    State::Maint => "maint",
                };
                format!("set server {backend}/{name} state {state}")
            }
            Self::SetAddress {
                backend,
                name,
                ip,
                port,
            } => format!("set server {backend}/{name} addr {ip} port {port}"),
            Self::SetWeight {
                backend,
                name,
                weight,
            } => format!("set server {backend}/{name} weight {weight}"),
            Self::DelServer { backend, name } => format!("del server {backend}/{name}"),
            Self::Map { map, key, change } => match change {
                MapChange::Add(value) => format!("add map {map} {key} {value}"),
                MapChange::Set(value) => format!("set map {map} {key} {value}"),
                MapChange::Del => format!("del map {map} {key}"),
            },
        }
    }

    /// Whether `reply` says the order was carried out (HAProxy 2.6's replies).
    pub fn succeeded(&self, reply: &str) -> bool {
        let reply = reply.trim();
        match self {
            Self::AddServer { .. } => reply.starts_with("New server registered."),
            Self::SetAddress { .. } => {
                reply.starts_with("IP changed from") || reply.starts_with("no need to change")
            }
            // Deleted now, or gone already.
            Self::DelServer { .. } => reply == "Server deleted." || reply == "No such server.",
            _ => reply.is_empty(),
        }
    }
}

/// Whether `word` can go into an admin socket command as one argument: printable ASCII
/// without `;` (command separator), `#` (comment), quotes or backslashes (which the CLI
/// interprets).
pub fn cli_safe(word: &str) -> bool {
    !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b";#'\"\\".contains(&b))
}

/// The plan that takes HAProxy from `old` to `new`. `draining` lists servers removed by earlier
/// runtime applies that HAProxy still has: one that comes back as it was is made ready again;
/// one that comes back changed needs a reload.
pub fn plan(old: Files<'_>, new: Files<'_>, draining: &Draining) -> Plan {
    match runtime(old, new, draining) {
        Ok(runtime) => Plan::Runtime(runtime),
        Err(reason) => Plan::Reload(reason),
    }
}

fn runtime(old: Files<'_>, new: Files<'_>, draining: &Draining) -> Result<Runtime, String> {
    let before = Parsed::new(old.config)?;
    let after = Parsed::new(new.config)?;
    if before.skeleton != after.skeleton {
        let line = before
            .skeleton
            .iter()
            .zip(&after.skeleton)
            .find(|(a, b)| a != b)
            .map_or_else(
                || "lines were added or removed".to_owned(),
                |(_, b)| format!("'{}' changed", b.trim()),
            );
        return Err(format!("the configuration changed beyond servers: {line}"));
    }
    let maps = MapsDiff::new(old.maps, new.maps, new.config)?;
    runtime_of(&before, &after, &maps, old, new, draining)
}

/// The same plan as [`plan`], reading only the sections that differ: the usual case, a few
/// servers changed in a large configuration, costs a comparison of the two texts and the
/// parsing of those sections, not of the whole. Whenever its answer could differ from
/// [`plan`]'s (anything but `backend`/`listen` sections changed, sections added, removed or
/// renamed, more than one `defaults` section, map keys moving onto backends other keys leave,
/// a reload needed), it is [`plan`]'s answer.
pub fn plan_changed(old: Files<'_>, new: Files<'_>, draining: &Draining) -> Plan {
    plan_within(
        old,
        new,
        draining,
        changed_region(old.config, new.config),
        None,
    )
}

/// [`plan_changed`] with the [`Region`] where the configurations differ already found
/// ([`changed_region`] of the two, or a wider one), and the `defaults` sections of `old` when
/// they are known ([`Defaults::of`]).
pub fn plan_within(
    old: Files<'_>,
    new: Files<'_>,
    draining: &Draining,
    region: Option<Region>,
    defaults: Option<Defaults>,
) -> Plan {
    let Some(changed) = differing(old.config, new.config, region, defaults) else {
        return plan(old, new, draining);
    };
    match changed.runtime(old, new, draining) {
        Some(Ok(runtime)) => Plan::Runtime(runtime),
        Some(Err(_)) | None => plan(old, new, draining),
    }
}

/// The `backend` and `listen` sections that differ between two configurations, each with the
/// `defaults` section in force there.
#[derive(Debug)]
struct Differing<'a> {
    /// The configuration's only `defaults` section, if any.
    defaults: &'a str,
    /// `(old section, new section)`, in order.
    pairs: Vec<(&'a str, &'a str)>,
}

/// Where `old` and `new` differ, as whole sections one for one: `None` when they differ in
/// anything but the text of `backend`/`listen` sections under unchanged headers, or have more
/// than one `defaults` section.
fn differing<'a>(
    old: &'a str,
    new: &'a str,
    region: Option<Region>,
    defaults: Option<Defaults>,
) -> Option<Differing<'a>> {
    let region = region?;
    let before = split_sections(old.get(region.start..region.end_old)?);
    let after = split_sections(new.get(region.start..region.end_new)?);
    if before.len() != after.len() {
        return None;
    }
    let mut pairs = Vec::new();
    for (a, b) in before.into_iter().zip(after) {
        if a == b {
            continue;
        }
        let header = |s: &'a str| s.lines().find(|l| !l.trim().is_empty());
        if header(a) != header(b)
            || !matches!(
                header(a).and_then(|h| words(h).next()),
                Some("backend" | "listen")
            )
        {
            return None;
        }
        pairs.push((a, b));
    }
    let defaults = defaults.unwrap_or_else(|| Defaults::of(old));
    Some(Differing {
        defaults: defaults.text(old)?,
        pairs,
    })
}

/// Where two configurations differ, widened to whole sections: `old[start..end_old]` became
/// `new[start..end_new]`, and what comes before and after is the same in both, with each part
/// starting at a section header (or at the start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Where the first differing section starts in both.
    pub start: usize,
    /// Where the common rest starts in `old`.
    pub end_old: usize,
    /// Where the common rest starts in `new`.
    pub end_new: usize,
}

/// The [`Region`] where `old` and `new` differ; `None` when the common rest does not start a
/// line in `new`.
pub fn changed_region(old: &str, new: &str) -> Option<Region> {
    let (a, b) = (old.as_bytes(), new.as_bytes());
    let prefix = common_prefix(a, b);
    let suffix = common_suffix(a, b, a.len().min(b.len()) - prefix);
    region_within(old, new, Span { prefix, suffix })
}

/// [`changed_region`] when the caller knows a span the two share (a delta's kept start and
/// end): the differences lie between, and no text is compared. A shorter span than the longest
/// gives a wider region. `None` also when the span does not fit the texts.
pub fn region_within(old: &str, new: &str, Span { prefix, suffix }: Span) -> Option<Region> {
    let (a, b) = (old.as_bytes(), new.as_bytes());
    if prefix + suffix > a.len().min(b.len())
        || !old.is_char_boundary(prefix)
        || !old.is_char_boundary(a.len() - suffix)
    {
        return None;
    }
    // Back from the first difference to the start of its section, forward from the last to
    // the start of the next one (or the end): both lie in text the two share.
    let start = section_start(old, prefix);
    let end_old = next_section(old, a.len() - suffix);
    let end_new = b.len() - (a.len() - end_old);
    if end_new > 0 && end_new < b.len() && b[end_new - 1] != b'\n' {
        return None;
    }
    Some(Region {
        start,
        end_old,
        end_new,
    })
}

/// Whether `line` starts a section.
fn is_header(line: &str) -> bool {
    words(line)
        .next()
        .is_some_and(|first| SECTIONS.contains(&first))
}

/// Where the line holding byte `at` of `config` starts.
fn line_start(config: &str, at: usize) -> usize {
    config.as_bytes()[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1)
}

/// The line starting at `start`, without its new line.
fn line_at(config: &str, start: usize) -> &str {
    let rest = &config[start..];
    rest.find('\n').map_or(rest, |end| &rest[..end])
}

/// The start of the header line of the section holding byte `at` of `config` (0 before any
/// section).
fn section_start(config: &str, at: usize) -> usize {
    let mut start = line_start(config, at);
    loop {
        if is_header(line_at(config, start)) || start == 0 {
            return start;
        }
        start = line_start(config, start - 1);
    }
}

/// The start of the first section header line that starts at or after byte `at` of `config`
/// (the end of `config` when none does).
fn next_section(config: &str, at: usize) -> usize {
    let mut start = line_start(config, at);
    if start < at {
        start += line_at(config, start).len() + 1;
    }
    while start < config.len() {
        let line = line_at(config, start);
        if is_header(line) {
            return start;
        }
        start += line.len() + 1;
    }
    config.len()
}

/// `text` cut before each section header line.
fn split_sections(text: &str) -> Vec<&str> {
    let mut sections = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if at > start && is_header(line) {
            sections.push(&text[start..at]);
            start = at;
        }
        at += line.len();
    }
    if at > start {
        sections.push(&text[start..at]);
    }
    sections
}

/// Where the `defaults` section of a configuration is: [`plan_within`] reads the servers of
/// the sections that changed with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defaults {
    /// It has none.
    Missing,
    /// It has one, at `config[start..end]`.
    One(usize, usize),
    /// It has several: which one applies where is left to [`plan`].
    Several,
}

impl Defaults {
    /// The `defaults` sections of `config`, searched for in all of it.
    pub fn of(config: &str) -> Self {
        let mut found = Self::Missing;
        for at in memmem::find_iter(config.as_bytes(), "defaults") {
            let start = line_start(config, at);
            let line = line_at(config, start);
            if words(line).next() != Some("defaults") {
                continue;
            }
            if found != Self::Missing {
                return Self::Several;
            }
            let end = next_section(config, (start + line.len() + 1).min(config.len()));
            found = Self::One(start, end);
        }
        found
    }

    /// The `defaults` sections of `new`, which `region` makes of `old` whose sections these
    /// are, reading only the region; `None` when a `defaults` section lies in it (then
    /// [`Defaults::of`] tells).
    pub fn after(self, old: &str, new: &str, region: Region) -> Option<Self> {
        let has_defaults = |text: &str| {
            text.lines()
                .any(|line| is_header(line) && words(line).next() == Some("defaults"))
        };
        if has_defaults(old.get(region.start..region.end_old)?)
            || has_defaults(new.get(region.start..region.end_new)?)
        {
            return None;
        }
        match self {
            Self::One(_, end) if end <= region.start => Some(self),
            Self::One(start, end) if start >= region.end_old => {
                let moved = |at: usize| at - region.end_old + region.end_new;
                Some(Self::One(moved(start), moved(end)))
            }
            Self::One(..) => None,
            other => Some(other),
        }
    }

    /// The text of the only `defaults` section ("" when there is none); `None` for several.
    fn text(self, config: &str) -> Option<&str> {
        match self {
            Self::Missing => Some(""),
            Self::One(start, end) => config.get(start..end),
            Self::Several => None,
        }
    }
}

impl Differing<'_> {
    /// [`runtime`] over the differing sections only; `None` where only [`plan`] can answer.
    fn runtime(
        &self,
        old: Files<'_>,
        new: Files<'_>,
        draining: &Draining,
    ) -> Option<Result<Runtime, String>> {
        let maps = MapsDiff::new(old.maps, new.maps, new.config).ok()?;
        if maps.swaps() {
            return None;
        }
        let texts: Vec<(String, String)> = self
            .pairs
            .iter()
            .map(|(a, b)| {
                (
                    format!("{}{a}", self.defaults),
                    format!("{}{b}", self.defaults),
                )
            })
            .collect();
        let mut before = Parsed::default();
        let mut after = Parsed::default();
        for (a, b) in &texts {
            let (a, b) = (Parsed::new(a).ok()?, Parsed::new(b).ok()?);
            if a.skeleton != b.skeleton {
                return None;
            }
            before.servers.extend(a.servers);
            before.fixed.extend(a.fixed);
            after.servers.extend(b.servers);
            after.fixed.extend(b.fixed);
        }
        Some(runtime_of(&before, &after, &maps, old, new, draining))
    }
}

/// The map files of two snapshots, each map that changed parsed once per plan (a map of 10,000
/// domains costs one pass, not one per question asked of it).
#[derive(Debug, Default)]
struct MapsDiff<'a> {
    changed: Vec<MapPair<'a>>,
}

/// One map file whose content changed: the entries of the lines where the old and new file
/// differ, and what they say.
#[derive(Debug)]
struct MapPair<'a> {
    name: &'a str,
    /// Whether the configuration uses it only through exact matches (see [`exact_only`]).
    exact: bool,
    /// The entries of the old file's differing lines, in order.
    before: Vec<(&'a str, &'a str)>,
    /// The entries of the new file's differing lines, in order.
    after: Vec<(&'a str, &'a str)>,
    /// The lines after the differing ones (the same in both files).
    rest: &'a str,
    /// Every key whose value differs, `(key, old value, new value)`: removed keys in the old
    /// file's order, then added and changed ones in the new file's order.
    keys: Vec<(&'a str, Option<&'a str>, Option<&'a str>)>,
}

impl<'a> MapsDiff<'a> {
    /// `config`: the new configuration, which uses the new maps.
    fn new(old: &'a [ConfigFile], new: &'a [ConfigFile], config: &str) -> Result<Self, String> {
        Self::read(old, new, config, Some(REGION_KEYS))
    }

    /// [`MapsDiff::new`], reading a map's differing lines alone when they have at most `most`
    /// keys, both files whole otherwise or when `most` is `None`.
    fn read(
        old: &'a [ConfigFile],
        new: &'a [ConfigFile],
        config: &str,
        most: Option<usize>,
    ) -> Result<Self, String> {
        if !old.iter().map(|m| &m.name).eq(new.iter().map(|m| &m.name)) {
            return Err("the set of map files changed".to_owned());
        }
        let mut changed = Vec::new();
        for (was, now) in old.iter().zip(new) {
            if was.content == now.content {
                continue;
            }
            let (before, after, rest) =
                differing_entries(&now.name, &was.content, &now.content, most)?;
            let old_values: HashMap<&str, &str> = before.iter().copied().collect();
            let new_values: HashMap<&str, &str> = after.iter().copied().collect();
            let removed = before
                .iter()
                .filter(|(key, _)| !new_values.contains_key(key))
                .map(|&(key, value)| (key, Some(value), None));
            let differ = after
                .iter()
                .filter(|(key, value)| old_values.get(key) != Some(value))
                .map(|&(key, value)| (key, old_values.get(key).copied(), Some(value)));
            let keys = removed.chain(differ).collect();
            changed.push(MapPair {
                name: &now.name,
                exact: exact_only(config, &now.name),
                before,
                after,
                rest,
                keys,
            });
        }
        Ok(Self { changed })
    }

    /// Every `(map, key, old value, new value)` that differs.
    fn keys(&self) -> impl Iterator<Item = (&'a str, &'a str, Option<&'a str>, Option<&'a str>)> {
        self.changed.iter().flat_map(|pair| {
            pair.keys
                .iter()
                .map(|&(key, old, new)| (pair.name, key, old, new))
        })
    }

    /// The backends that a key leaves: pointed at before by a key that no longer points there.
    fn left(&self) -> BTreeSet<&'a str> {
        self.keys().filter_map(|(_, _, old, _)| old).collect()
    }

    /// Whether a key of an exactly matched map moves onto a backend that another key leaves
    /// (the hand-over of [`hand_over`], which reads the whole configuration).
    fn swaps(&self) -> bool {
        let left = self.left();
        self.keys()
            .any(|(_, _, old, new)| old.is_some() && new.is_some_and(|new| left.contains(new)))
    }

    /// How the keys move between backends (map values): `gained`, the backends that some
    /// `(map, key)` points to in the new maps and not in the old; `lost`, those that some key
    /// points to in the old maps and not in the new.
    fn moves(&self) -> Moves<'a> {
        Moves {
            gained: self.keys().filter_map(|(_, _, _, new)| new).collect(),
            lost: self.left(),
        }
    }
}

fn runtime_of(
    before: &Parsed<'_>,
    after: &Parsed<'_>,
    maps: &MapsDiff<'_>,
    old: Files<'_>,
    new: Files<'_>,
    draining: &Draining,
) -> Result<Runtime, String> {
    let hand_over = hand_over(before, after, maps, old, new, draining)?;
    let handed;
    let maps = match &hand_over.maps {
        Some((first, last)) => {
            handed = MapsDiff::new(first, last, new.config)?;
            &handed
        }
        None => maps,
    };
    let moves = maps.moves();
    let maps = map_commands(maps)?;
    // Servers made ready and put into maintenance, each in the backend's phase (see below).
    let (mut ready_early, mut ready_late) = (Vec::new(), Vec::new());
    let (mut maint_early, mut maint_late) = (Vec::new(), Vec::new());
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    let mut revived = Vec::new();
    for (&(backend, name), server) in &after.servers {
        let key = (backend.to_owned(), name.to_owned());
        let ready = if moves.lost.contains(backend) {
            &mut ready_late
        } else {
            &mut ready_early
        };
        match before.servers.get(&(backend, name)) {
            Some(was) if was == server => continue,
            None => match draining.get(&key) {
                Some(line) if *line == server.line() => {
                    ready.push(Order::set_state(backend, name, State::Ready));
                    revived.push(key);
                }
                Some(_) => {
                    return Err(format!(
                        "server {backend}/{name} is back, changed, while it drains"
                    ));
                }
                None => ready.extend(add_server(backend, name, server)?),
            },
            Some(was) => changed.extend(change_server(backend, name, was, server)?),
        }
        check_dynamic(after, backend)?;
    }
    for (&(backend, name), server) in &before.servers {
        if !after.servers.contains_key(&(backend, name)) {
            check_dynamic(before, backend)?;
            let maint = if moves.gained.contains(backend) {
                &mut maint_early
            } else {
                &mut maint_late
            };
            maint.push(Order::set_state(backend, name, State::Maint));
            removed.push(((backend.to_owned(), name.to_owned()), server.line()));
        }
    }
    // Requests are served between any two commands of the batch, so the order is what keeps
    // each request on its own domain's servers. By default a backend gains its new servers
    // first and loses its old ones last: it never runs out of servers. But a backend that a
    // map key newly points to (a slot taken, or given to another domain by a restarted
    // confgen) loses its old servers *before* the maps change, and one that a key stops
    // pointing to (a slot freed or given away) gets its new servers only *after*. A key whose
    // new slot another key leaves in the same batch waits on a free twin of that slot
    // meanwhile ([`hand_over`]): no request reaches another domain's server, and none finds
    // its domain without a server; a domain moving to a free slot finds it ready.
    let mut commands = hand_over.enter;
    commands.extend(ready_early);
    commands.extend(changed);
    commands.extend(maint_early);
    commands.extend(maps);
    commands.extend(ready_late);
    commands.extend(maint_late);
    commands.extend(hand_over.leave);
    removed.extend(hand_over.removed);
    Ok(Runtime {
        commands,
        removed,
        revived,
    })
}

/// Keys handed over through a temporary backend: a key whose new backend is one that another
/// key leaves in the same batch (two domains swapping slots after a confgen restart) would find
/// it empty between the two moves. Instead it first moves to a free twin of its new backend
/// (same section lines, under the same `defaults`, no servers, no key pointing at it before or
/// after), filled with its new servers; the rest of the batch runs with it there; then it moves
/// to its new backend, by then filled, and the twin's servers go to maintenance and are deleted
/// once drained. Only for maps matched exactly (entry order does not matter); a key with no free
/// twin keeps the direct move.
#[derive(Debug, Default)]
struct HandOver {
    /// The old and the new maps with each handed-over key on its twin; `None`: no hand-over.
    maps: Option<(Vec<ConfigFile>, Vec<ConfigFile>)>,
    /// Twins filled, keys moved onto them: before anything else.
    enter: Vec<Order>,
    /// Keys moved to their new backends, twins emptied: after everything else.
    leave: Vec<Order>,
    /// The twins' servers, deleted once drained.
    removed: Vec<(ServerId, String)>,
}

fn hand_over(
    before: &Parsed<'_>,
    after: &Parsed<'_>,
    maps: &MapsDiff<'_>,
    old: Files<'_>,
    new: Files<'_>,
    draining: &Draining,
) -> Result<HandOver, String> {
    let left = maps.left();
    let mut handed: Vec<((&str, &str), &str)> = maps
        .changed
        .iter()
        .filter(|pair| pair.exact)
        .flat_map(|pair| {
            pair.keys.iter().filter_map(|&(key, old, new)| {
                let new = new.filter(|new| old.is_some() && left.contains(new))?;
                servers_of(after, new)
                    .next()
                    .map(|_| ((pair.name, key), new))
            })
        })
        .collect();
    handed.sort_unstable();
    if handed.is_empty() {
        return Ok(HandOver::default());
    }
    // Every backend a key points to, before or after, in any map: not free to serve as a twin.
    let mut referenced = BTreeSet::new();
    for map in old.maps.iter().chain(new.maps) {
        referenced.extend(
            map_entries(&map.name, &map.content)?
                .into_iter()
                .map(|(_, v)| v),
        );
    }
    let bodies = bodies(new.config);
    let mut busy: BTreeSet<&str> = referenced;
    busy.extend(before.servers.keys().map(|(backend, _)| *backend));
    busy.extend(after.servers.keys().map(|(backend, _)| *backend));
    busy.extend(after.fixed.iter().copied());
    let mut result = HandOver::default();
    let mut moved: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    let mut arrive = Vec::new();
    for ((map, key), target) in handed {
        let Some(body) = bodies.get(target) else {
            continue;
        };
        // A twin may still hold servers draining from an earlier hand-over, in maintenance:
        // fine, unless one has the name of a server it would get.
        let names: Vec<&str> = servers_of(after, target).map(|(name, _)| name).collect();
        let collides = |twin: &str| {
            names
                .iter()
                .any(|name| draining.contains_key(&(twin.to_owned(), (*name).to_owned())))
        };
        let twin = bodies.iter().find(|(name, b)| {
            *b == body && !busy.contains(*name) && cli_safe(name) && !collides(name)
        });
        let Some((&twin, _)) = twin else {
            continue;
        };
        busy.insert(twin);
        for (name, server) in servers_of(after, target) {
            result.enter.extend(add_server(twin, name, server)?);
            result
                .leave
                .push(Order::set_state(twin, name, State::Maint));
            result
                .removed
                .push(((twin.to_owned(), name.to_owned()), server.line()));
        }
        let set_map = |value: &str| Order::Map {
            map: map.to_owned(),
            key: key.to_owned(),
            change: MapChange::Set(value.to_owned()),
        };
        result.enter.push(set_map(twin));
        arrive.push(set_map(target));
        moved.insert((map, key), twin);
    }
    if moved.is_empty() {
        return Ok(HandOver::default());
    }
    arrive.append(&mut result.leave);
    result.leave = arrive;
    let rewrite = |maps: &[ConfigFile]| -> Vec<ConfigFile> {
        maps.iter()
            .map(|map| {
                let mut content = String::with_capacity(map.content.len());
                for line in map.content.lines() {
                    let mut words = words(line.trim());
                    let twin = words
                        .next()
                        .and_then(|key| Some((key, moved.get(&(map.name.as_str(), key))?)));
                    match twin {
                        Some((key, twin)) => content.push_str(&format!("{key} {twin}")),
                        None => content.push_str(line),
                    }
                    content.push('\n');
                }
                ConfigFile {
                    name: map.name.clone(),
                    content,
                }
            })
            .collect()
    };
    result.maps = Some((rewrite(old.maps), rewrite(new.maps)));
    Ok(result)
}

/// The servers of `backend` in `parsed`, by name.
fn servers_of<'a>(
    parsed: &'a Parsed<'a>,
    backend: &'a str,
) -> impl Iterator<Item = (&'a str, &'a Server<'a>)> + 'a {
    parsed
        .servers
        .range((backend, "")..)
        .take_while(move |((b, _), _)| *b == backend)
        .map(|((_, name), server)| (*name, server))
}

/// Each `backend` and `listen` section's lines but its header and its servers, with the number
/// of the `defaults` section it follows: sections with the same are interchangeable.
fn bodies(config: &str) -> BTreeMap<&str, (usize, Vec<&str>)> {
    let mut bodies = BTreeMap::new();
    let mut defaults = 0;
    let mut current: Option<&str> = None;
    for line in config.lines() {
        let mut words = words(line);
        let Some(first) = words.next() else {
            continue;
        };
        if SECTIONS.contains(&first) {
            current = None;
            match first {
                "defaults" => defaults += 1,
                "backend" | "listen" => {
                    if let Some(name) = words.next() {
                        bodies.insert(name, (defaults, Vec::new()));
                        current = Some(name);
                    }
                }
                _ => {}
            }
            continue;
        }
        if let Some((_, body)) = current.and_then(|name| bodies.get_mut(name))
            && first != "server"
        {
            body.push(line.trim());
        }
    }
    bodies
}

/// How the maps' keys move between backends: see [`MapsDiff::moves`].
#[derive(Debug, Default)]
struct Moves<'a> {
    gained: BTreeSet<&'a str>,
    lost: BTreeSet<&'a str>,
}

fn check_dynamic(parsed: &Parsed<'_>, backend: &str) -> Result<(), String> {
    if parsed.fixed.contains(backend) {
        return Err(format!(
            "servers of '{backend}' changed, and its section header is not plain \
             ('backend <name>' or 'listen <name>')"
        ));
    }
    Ok(())
}

fn add_server(backend: &str, name: &str, server: &Server<'_>) -> Result<Vec<Order>, String> {
    let words =
        server
            .defaults
            .iter()
            .chain(&server.args)
            .copied()
            .chain([server.address, name, backend]);
    unsafe_word(words, backend, name)?;
    let id = || (backend.to_owned(), name.to_owned());
    let mut commands = vec![Order::AddServer {
        backend: backend.to_owned(),
        name: name.to_owned(),
        address: server.address.to_owned(),
        args: (server.defaults.iter().chain(&server.args))
            .map(|arg| (*arg).to_owned())
            .collect(),
    }];
    let has = |word: &str| {
        server
            .defaults
            .iter()
            .chain(&server.args)
            .any(|a| *a == word)
    };
    if has("check") {
        let (backend, name) = id();
        commands.push(Order::EnableHealth { backend, name });
    }
    if has("agent-check") {
        let (backend, name) = id();
        commands.push(Order::EnableAgent { backend, name });
    }
    // Added servers start in maintenance.
    if !has("disabled") {
        commands.push(Order::set_state(backend, name, State::Ready));
    }
    Ok(commands)
}

fn change_server(
    backend: &str,
    name: &str,
    was: &Server<'_>,
    now: &Server<'_>,
) -> Result<Vec<Order>, String> {
    let mut commands = Vec::new();
    if was.defaults != now.defaults || without_weight(&was.args) != without_weight(&now.args) {
        return Err(format!(
            "server {backend}/{name} changed options other than address and weight"
        ));
    }
    if was.address != now.address {
        let (ip, port) = split_address(now.address).ok_or_else(|| {
            format!(
                "server {backend}/{name}: address '{}' is not ip:port",
                now.address
            )
        })?;
        commands.push(Order::SetAddress {
            backend: backend.to_owned(),
            name: name.to_owned(),
            ip,
            port,
        });
    }
    let weight = weight(&now.args);
    if weight != self::weight(&was.args) {
        let weight = weight.unwrap_or("1");
        unsafe_word([weight], backend, name)?;
        commands.push(Order::SetWeight {
            backend: backend.to_owned(),
            name: name.to_owned(),
            weight: weight.to_owned(),
        });
    }
    Ok(commands)
}

fn unsafe_word<'a>(
    words: impl IntoIterator<Item = &'a str>,
    backend: &str,
    name: &str,
) -> Result<(), String> {
    match words.into_iter().find(|w| !cli_safe(w)) {
        Some(word) => Err(format!(
            "server {}/{}: '{}' cannot go through the runtime API",
            backend.escape_default(),
            name.escape_default(),
            word.escape_default()
        )),
        None => Ok(()),
    }
}

fn weight<'a>(args: &[&'a str]) -> Option<&'a str> {
    args.windows(2)
        .rev()
        .find(|pair| pair[0] == "weight")
        .map(|pair| pair[1])
}

fn without_weight<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut out = Vec::with_capacity(args.len());
    let mut words = args.iter();
    while let Some(&word) = words.next() {
        if word == "weight" {
            words.next();
        } else {
            out.push(word);
        }
    }
    out
}

/// `ip:port` or `[ipv6]:port` with a literal IP and a port.
fn split_address(address: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = address.rsplit_once(':')?;
    let ip: IpAddr = match ip.strip_prefix('[').and_then(|ip| ip.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().ok()?.into(),
        None => ip.parse::<std::net::Ipv4Addr>().ok()?.into(),
    };
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    Some((ip, port))
}

/// Orders that turn each old map into the new one, if the runtime API can.
fn map_commands(maps: &MapsDiff<'_>) -> Result<Vec<Order>, String> {
    let mut commands = Vec::new();
    for pair in &maps.changed {
        commands.extend(map_diff(pair)?);
    }
    Ok(commands)
}

/// Whether `config` uses the map file `name` only through exact matches (`map(name)`,
/// `map_str(name)`, with or without a default value), where the order of entries does not
/// matter; and uses it at all.
fn exact_only(config: &str, name: &str) -> bool {
    let mut used = false;
    for at in memmem::find_iter(config.as_bytes(), name) {
        let before = &config[..at];
        let after = &config[at + name.len()..];
        if !(before.ends_with("map(") || before.ends_with("map_str("))
            || !(after.starts_with(')') || after.starts_with(','))
        {
            return false;
        }
        used = true;
    }
    used
}

/// Entries are `key value` lines. Some matches (`map_end`, `map_beg`, `map_reg`, ...) take the
/// first entry that matches, in file order, and `add map` appends: for an `ordered` map the
/// runtime API is used only when the new file's order is the old one minus removed keys, plus
/// added keys at the end. Exact matches look keys up in a tree: any order will do.
fn map_diff(pair: &MapPair<'_>) -> Result<Vec<Order>, String> {
    let name = pair.name;
    if !cli_safe(name) {
        return Err(format!("map name '{}' is not safe", name.escape_default()));
    }
    if !pair.exact {
        let removed: HashSet<&str> = (pair.keys.iter())
            .filter(|(_, _, new)| new.is_none())
            .map(|(key, _, _)| *key)
            .collect();
        let added: HashSet<&str> = (pair.keys.iter())
            .filter(|(_, old, _)| old.is_none())
            .map(|(key, _, _)| *key)
            .collect();
        let kept = (pair.before.iter())
            .map(|(key, _)| *key)
            .filter(|key| !removed.contains(key));
        let appended = !added.is_empty();
        let added = (pair.after.iter())
            .map(|(key, _)| *key)
            .filter(|key| added.contains(key));
        let entry = |line: &str| !line.trim().is_empty() && !line.trim().starts_with('#');
        if (appended && pair.rest.lines().any(entry))
            || !kept.chain(added).eq(pair.after.iter().map(|(key, _)| *key))
        {
            return Err(format!(
                "map {name}: entries were inserted before existing ones or reordered"
            ));
        }
    }
    Ok((pair.keys.iter())
        .map(|&(key, old, new)| Order::Map {
            map: name.to_owned(),
            key: key.to_owned(),
            change: match (old, new) {
                (_, None) => MapChange::Del,
                (Some(_), Some(value)) => MapChange::Set(value.to_owned()),
                (None, Some(value)) => MapChange::Add(value.to_owned()),
            },
        })
        .collect())
}

/// Most keys in the differing lines of a map for [`differing_entries`] to read those lines
/// alone; beyond them, it reads both files whole.
const REGION_KEYS: usize = 16;

/// The entries of the lines where two versions of a map differ (the old's, the new's), and
/// the lines that follow them. The lines before and after are the same in both files:
/// their entries are the same, and only when no key of the differing lines appears among them
/// too, which is checked. Otherwise, or for more than `most` keys, both files whole (a map of
/// 10,000 domains that gains one costs a comparison and a search per key, not two parses).
#[allow(clippy::type_complexity)]
fn differing_entries<'a>(
    name: &str,
    was: &'a str,
    now: &'a str,
    most: Option<usize>,
) -> Result<(Vec<(&'a str, &'a str)>, Vec<(&'a str, &'a str)>, &'a str), String> {
    let whole = || Ok((map_entries(name, was)?, map_entries(name, now)?, ""));
    let Some(most) = most else {
        return whole();
    };
    let (x, y) = (was.as_bytes(), now.as_bytes());
    let prefix = common_prefix(x, y);
    let start = x[..prefix]
        .iter()
        .rposition(|&c| c == b'\n')
        .map_or(0, |i| i + 1);
    let mut suffix = common_suffix(x, y, x.len().min(y.len()) - start);
    let at_line = |text: &[u8], at: usize| at == 0 || text[at - 1] == b'\n';
    if !(at_line(x, x.len() - suffix) && at_line(y, y.len() - suffix)) {
        let common = &x[x.len() - suffix..];
        suffix = common
            .iter()
            .position(|&c| c == b'\n')
            .map_or(0, |i| suffix - i - 1);
    }
    let (end_was, end_now) = (x.len() - suffix, y.len() - suffix);
    let before = map_entries(name, &was[start..end_was])?;
    let after = map_entries(name, &now[start..end_now])?;
    let (head, tail) = (&was[..start], &was[end_was..]);
    let alone = before.len() + after.len() <= most
        && (before.iter().chain(&after)).all(|(key, _)| !has_key(head, key) && !has_key(tail, key));
    if alone {
        Ok((before, after, tail))
    } else {
        whole()
    }
}

/// Whether a line of the map text `text` has the key `key`.
fn has_key(text: &str, key: &str) -> bool {
    memmem::find_iter(text.as_bytes(), key).any(|at| {
        let line = text[..at].rfind('\n').map_or(0, |i| i + 1);
        text[line..at].bytes().all(|c| c == b' ' || c == b'\t')
            && text[at + key.len()..]
                .bytes()
                .next()
                .is_none_or(|c| c.is_ascii_whitespace())
    })
}

fn map_entries<'a>(name: &str, content: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    for line in content.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = words(line);
        let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "map {name}: '{}' is not 'key value'",
                line.escape_default()
            ));
        };
        if !cli_safe(key) || !cli_safe(value) {
            return Err(format!(
                "map {name}: '{}' cannot go through the runtime API",
                line.escape_default()
            ));
        }
        if !seen.insert(key) {
            return Err(format!("map {name}: key '{key}' appears twice"));
        }
        entries.push((key, value));
    }
    Ok(entries)
}

/// The words of a line as HAProxy splits them: on spaces and tabs only.
pub(crate) fn words(line: &str) -> impl Iterator<Item = &str> {
    line.split([' ', '\t']).filter(|word| !word.is_empty())
}

/// A `server` line: `server <name> <address> <args>...`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Server<'a> {
    address: &'a str,
    args: Vec<&'a str>,
    /// Arguments of the `default-server` lines in force where the server is declared (its
    /// `defaults` section's, then its own section's): `add server` does not apply them itself.
    defaults: Vec<&'a str>,
}

impl Server<'_> {
    /// The definition as one string, to recognise a draining server that comes back.
    fn line(&self) -> String {
        let mut line = self.address.to_owned();
        for word in self.defaults.iter().chain(&self.args) {
            line.push(' ');
            line.push_str(word);
        }
        line
    }
}

/// Sections whose header starts a new section.
pub(crate) use legate_proto::policy::SECTIONS;

#[derive(Debug, Default)]
struct Parsed<'a> {
    /// Every line but the server lines of backends, as is.
    skeleton: Vec<&'a str>,
    /// `(backend, server)` -> its line.
    servers: BTreeMap<(&'a str, &'a str), Server<'a>>,
    /// Backends whose header is not plain `backend <name>`/`listen <name>` (`from`, a bind
    /// address): their servers are left to reloads.
    fixed: BTreeSet<&'a str>,
}

impl<'a> Parsed<'a> {
    fn new(config: &'a str) -> Result<Self, String> {
        let mut parsed = Self::default();
        let mut backend: Option<&'a str> = None;
        let mut defaults: Vec<&'a str> = Vec::new();
        let mut own_defaults: Vec<&'a str> = Vec::new();
        for line in config.lines() {
            let words: Vec<&'a str> = words(line).collect();
            let Some(&first) = words.first() else {
                parsed.skeleton.push(line);
                continue;
            };
            if SECTIONS.contains(&first) {
                own_defaults.clear();
                backend = None;
                match first {
                    "defaults" => defaults.clear(),
                    "backend" | "listen" => {
                        let name = words.get(1).copied().unwrap_or_default();
                        if words.len() != 2 {
                            parsed.fixed.insert(name);
                        }
                        backend = Some(name);
                    }
                    _ => {}
                }
                parsed.skeleton.push(line);
                continue;
            }
            if first == "default-server" {
                if backend.is_some() {
                    own_defaults.extend(&words[1..]);
                } else {
                    defaults.extend(&words[1..]);
                }
            }
            match (backend, first, words.as_slice()) {
                (Some(backend), "server", [_, name, address, args @ ..]) => {
                    let server = Server {
                        address,
                        args: args.to_vec(),
                        defaults: defaults.iter().chain(&own_defaults).copied().collect(),
                    };
                    if parsed.servers.insert((backend, name), server).is_some() {
                        return Err(format!("server {backend}/{name} is declared twice"));
                    }
                }
                _ => parsed.skeleton.push(line),
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "defaults\n    mode http\n    default-server inter 2s\n\n\
                        frontend http\n    bind :80\n    default_backend app_a\n\n\
                        backend app_a\n    balance roundrobin\n\
                        \x20   server a1 10.0.0.1:8080 weight 100 check\n\
                        \x20   server a2 10.0.0.2:8080 weight 100 check\n\n\
                        listen svc_3306\n    mode tcp\n    bind :3306\n\
                        \x20   server m1 10.0.0.3:3306 weight 100 check\n";

    fn map(name: &str, content: &str) -> ConfigFile {
        ConfigFile {
            name: name.to_owned(),
            content: content.to_owned(),
        }
    }

    fn plan_of(old: &str, new: &str) -> Plan {
        plan(
            Files {
                config: old,
                maps: &[],
            },
            Files {
                config: new,
                maps: &[],
            },
            &Draining::new(),
        )
    }

    fn lines(plan: &Plan) -> Vec<String> {
        match plan {
            Plan::Runtime(runtime) => runtime.commands.iter().map(Order::line).collect(),
            Plan::Reload(reason) => panic!("reload: {reason}"),
        }
    }

    fn reload_reason(plan: Plan) -> String {
        match plan {
            Plan::Reload(reason) => reason,
            Plan::Runtime(runtime) => panic!("runtime: {runtime:?}"),
        }
    }

    #[test]
    fn identical_configurations_need_nothing() {
        assert_eq!(plan_of(BASE, BASE), Plan::Runtime(Runtime::default()));
    }

    #[test]
    fn an_added_server_gets_the_defaults_its_line_would_get_and_is_made_ready() {
        let new = BASE.replace(
            "    server m1",
            "    server m2 [fd00::1]:3306 weight 5 check\n    server m1",
        );
        assert_eq!(
            lines(&plan_of(BASE, &new)),
            [
                "add server svc_3306/m2 [fd00::1]:3306 inter 2s weight 5 check",
                "enable health svc_3306/m2",
                "set server svc_3306/m2 state ready",
            ]
        );
    }

    #[test]
    fn each_order_says_its_command_and_which_replies_mean_it_worked() {
        let (b, s) = (|| "app_a".to_owned(), || "a1".to_owned());
        let add = Order::AddServer {
            backend: b(),
            name: s(),
            address: "10.0.0.1:80".to_owned(),
            args: vec!["weight".to_owned(), "5".to_owned()],
        };
        assert_eq!(add.line(), "add server app_a/a1 10.0.0.1:80 weight 5");
        assert!(add.succeeded("New server registered.\n"));
        assert!(!add.succeeded("Already exists a server with the same name in backend.\n"));
        let delete = Order::DelServer {
            backend: b(),
            name: s(),
        };
        assert_eq!(delete.line(), "del server app_a/a1");
        assert!(delete.succeeded("Server deleted.\n") && delete.succeeded("No such server.\n"));
        assert!(!delete.succeeded("Server still has connections attached to it.\n"));
        let state = Order::set_state("app_a", "a1", State::Maint);
        assert_eq!(state.line(), "set server app_a/a1 state maint");
        assert!(state.succeeded("\n") && !state.succeeded("No such server.\n"));
        let map = Order::Map {
            map: "hosts.map".to_owned(),
            key: "a.test".to_owned(),
            change: MapChange::Add("slot_1".to_owned()),
        };
        assert_eq!(map.line(), "add map hosts.map a.test slot_1");
        assert!(map.succeeded("") && !map.succeeded("Unknown map identifier.\n"));
    }

    #[test]
    fn a_removed_server_goes_to_maintenance_then_is_deleted() {
        let new = BASE.replace("    server a2 10.0.0.2:8080 weight 100 check\n", "");
        let Plan::Runtime(runtime) = plan_of(BASE, &new) else {
            panic!("reload")
        };
        assert_eq!(
            runtime.commands[0].line(),
            "set server app_a/a2 state maint"
        );
        assert_eq!(
            runtime.removed,
            [(
                ("app_a".to_owned(), "a2".to_owned()),
                "10.0.0.2:8080 inter 2s weight 100 check".to_owned()
            )]
        );
    }

    #[test]
    fn address_and_weight_changes_are_set_in_place() {
        let new = BASE.replace(
            "server a1 10.0.0.1:8080 weight 100",
            "server a1 10.0.0.9:9090 weight 0",
        );
        let plan = plan_of(BASE, &new);
        assert_eq!(
            lines(&plan),
            [
                "set server app_a/a1 addr 10.0.0.9 port 9090",
                "set server app_a/a1 weight 0",
            ]
        );
        let Plan::Runtime(runtime) = plan else {
            unreachable!()
        };
        assert!(runtime.commands[0].succeeded("IP changed from '10.0.0.1' to '10.0.0.9'\n"));
        assert!(!runtime.commands[0].succeeded("No such server.\n"));
        assert!(runtime.commands[1].succeeded("\n"));
        assert!(!runtime.commands[1].succeeded("Invalid weight.\n"));
    }

    #[test]
    fn anything_beyond_servers_and_map_entries_reloads() {
        let cases = [
            BASE.replace("bind :3306", "bind :3307"),
            BASE.replace("inter 2s", "inter 3s"),
            BASE.replace("listen svc_3306", "listen svc_3306 from x"),
            BASE.replace("weight 100 check\n\n", "weight 100 check backup\n\n"),
            format!("{BASE}\nbackend app_b\n    server b1 10.0.0.4:80\n"),
            BASE.replace("10.0.0.3:3306", "db.example:3306"),
        ];
        for new in cases {
            reload_reason(plan_of(BASE, &new));
        }
    }

    /// HAProxy as the runtime API leaves it between two commands: which servers of which
    /// backend are ready, and where each map key points.
    #[derive(Debug, Default)]
    struct Between {
        ready: BTreeSet<(String, String)>,
        maps: BTreeMap<(String, String), String>,
    }

    impl Between {
        fn new(config: &str, maps: &[ConfigFile]) -> Self {
            let mut state = Self::default();
            for (backend, server) in Parsed::new(config).unwrap().servers.keys() {
                state
                    .ready
                    .insert(((*backend).to_owned(), (*server).to_owned()));
            }
            for map in maps {
                for (key, value) in map_entries(&map.name, &map.content).unwrap() {
                    state
                        .maps
                        .insert((map.name.clone(), key.to_owned()), value.to_owned());
                }
            }
            state
        }

        fn run(&mut self, line: &str) {
            let words: Vec<&str> = line.split(' ').collect();
            let server = |id: &str| {
                let (backend, server) = id.split_once('/').unwrap();
                (backend.to_owned(), server.to_owned())
            };
            match words.as_slice() {
                ["set", "server", id, "state", "ready"] => {
                    self.ready.insert(server(id));
                }
                ["set", "server", id, "state", "maint"] => {
                    self.ready.remove(&server(id));
                }
                ["add" | "set", "map", map, key, value] => {
                    self.maps
                        .insert(((*map).to_owned(), (*key).to_owned()), (*value).to_owned());
                }
                ["del", "map", map, key] => {
                    self.maps.remove(&((*map).to_owned(), (*key).to_owned()));
                }
                // Added servers start in maintenance; health and weights route nothing.
                ["add" | "enable", ..] | ["set", "server", _, "weight", _] => {}
                other => panic!("unexpected command {other:?}"),
            }
        }
    }

    /// The domain each server serves, in a configuration and its hosts map.
    fn owners(config: &str, hosts: &str) -> BTreeMap<(String, String), String> {
        let backends: BTreeMap<&str, &str> = hosts
            .lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(domain, backend)| (backend, domain))
            .collect();
        Parsed::new(config)
            .unwrap()
            .servers
            .keys()
            .filter_map(|(backend, server)| {
                let domain = backends.get(backend)?;
                Some((
                    ((*backend).to_owned(), (*server).to_owned()),
                    (*domain).to_owned(),
                ))
            })
            .collect()
    }

    /// Pooled backends `slot_1..=slots`, and the servers of each domain in its slot.
    fn pooled(slots: u32, apps: &[(&str, u32, &[&str])]) -> (String, Vec<ConfigFile>) {
        let mut config = "defaults\n    mode http\n\nfrontend http\n    bind :80\n    \
                          use_backend %[req.hdr(host),lower,map(hosts.map)]\n"
            .to_owned();
        let mut hosts = String::new();
        for slot in 1..=slots {
            config.push_str(&format!("\nbackend slot_{slot}\n    balance roundrobin\n"));
            for (_, at, servers) in apps {
                if *at == slot {
                    for server in *servers {
                        config.push_str(&format!("    server {server} {server}:80 check\n"));
                    }
                }
            }
        }
        for (domain, slot, _) in apps {
            hosts.push_str(&format!("{domain} slot_{slot}\n"));
        }
        (config, vec![map("hosts.map", &hosts)])
    }

    /// Regression (#13, item 5): a restarted confgen numbered the slots afresh, and the batch
    /// made the new slot's servers ready while the map still sent another domain there: a
    /// request for one domain reached another's server. After every command of the batch,
    /// each domain's slot may hold ready servers of that domain only.
    #[test]
    fn no_request_reaches_another_domains_server_at_any_point_of_a_batch() {
        let cases = [
            // Two domains swap slots; a third moves into a free one. Slots 5 and 6 are free
            // before and after: the swapping domains wait there, and are never without a server.
            (
                pooled(
                    6,
                    &[
                        ("a.test", 1, &["10.0.0.1"]),
                        ("m.test", 2, &["10.0.0.2", "10.0.0.3"]),
                        ("z.test", 3, &["10.0.0.4"]),
                    ],
                ),
                pooled(
                    6,
                    &[
                        ("a.test", 2, &["10.0.0.1"]),
                        ("m.test", 1, &["10.0.0.2", "10.0.0.3"]),
                        ("z.test", 4, &["10.0.0.4"]),
                    ],
                ),
                // Moving to a free slot: ready before the map points there.
                &["a.test", "m.test", "z.test"][..],
            ),
            // A chain: m.test takes a.test's slot, a.test takes a free one; one twin (slot 4).
            (
                pooled(
                    4,
                    &[("a.test", 1, &["10.0.0.1"]), ("m.test", 2, &["10.0.0.2"])],
                ),
                pooled(
                    4,
                    &[("a.test", 3, &["10.0.0.1"]), ("m.test", 1, &["10.0.0.2"])],
                ),
                &["a.test", "m.test"][..],
            ),
            // The same swap with no free twin: the direct move, empty for a moment, never
            // another domain's server.
            (
                pooled(
                    3,
                    &[
                        ("a.test", 1, &["10.0.0.1"]),
                        ("m.test", 2, &["10.0.0.2", "10.0.0.3"]),
                        ("z.test", 3, &["10.0.0.4"]),
                    ],
                ),
                pooled(
                    3,
                    &[
                        ("a.test", 2, &["10.0.0.1"]),
                        ("m.test", 1, &["10.0.0.2", "10.0.0.3"]),
                        ("z.test", 3, &["10.0.0.4"]),
                    ],
                ),
                &["z.test"][..],
            ),
            // A domain goes and a new one takes its slot at once; another gains a server.
            (
                pooled(
                    2,
                    &[("a.test", 1, &["10.0.0.1"]), ("m.test", 2, &["10.0.0.2"])],
                ),
                pooled(
                    2,
                    &[
                        ("b.test", 1, &["10.0.0.5"]),
                        ("m.test", 2, &["10.0.0.2", "10.0.0.6"]),
                    ],
                ),
                // Keeping its slot: a new server first, the old ones kept.
                &["m.test"][..],
            ),
        ];
        for ((old, old_maps), (new, new_maps), always_served) in cases {
            let old_maps_text = &old_maps[0].content;
            let new_maps_text = &new_maps[0].content;
            // A server may serve its domain as in either configuration, and only that one.
            let mut allowed = owners(&old, old_maps_text);
            allowed.extend(owners(&new, new_maps_text));
            let plan = plan(
                Files {
                    config: &old,
                    maps: &old_maps,
                },
                Files {
                    config: &new,
                    maps: &new_maps,
                },
                &Draining::new(),
            );
            let mut state = Between::new(&old, &old_maps);
            for line in lines(&plan) {
                state.run(&line);
                for ((_, domain), backend) in &state.maps {
                    for (at, server) in &state.ready {
                        if at == backend {
                            // By name: a twin holds a domain's servers under their names.
                            let owner = allowed
                                .iter()
                                .find(|((_, name), _)| name == server)
                                .map(|(_, domain)| domain)
                                .unwrap();
                            assert_eq!(
                                owner, domain,
                                "after '{line}': {domain} reaches {at}/{server}"
                            );
                        }
                    }
                }
                for domain in always_served {
                    let backend = &state.maps[&("hosts.map".to_owned(), (*domain).to_owned())];
                    assert!(
                        state.ready.iter().any(|(at, _)| at == backend),
                        "after '{line}': {domain} has no server in {backend}"
                    );
                }
            }
            // And the batch ends where the new configuration is.
            assert_eq!(state.maps, Between::new(&new, &new_maps).maps);
            assert_eq!(state.ready, Between::new(&new, &new_maps).ready);
        }
    }

    #[test]
    fn nothing_from_a_snapshot_can_inject_a_command() {
        for hostile in [
            "server a3 10.0.0.5:80 check;shutdown sessions",
            "server a3 10.0.0.5:80 # comment",
            "server a3 10.0.0.5:80 'quoted'",
            "server a3;x 10.0.0.5:80",
            "server a3 10.0.0.5:80 weight\x0b1",
            "server a3 10.0.0.5:80 weight\u{a0}1",
        ] {
            let new = BASE.replace("    server a2", &format!("    {hostile}\n    server a2"));
            let reason = reload_reason(plan_of(BASE, &new));
            assert!(reason.contains("runtime API"), "{hostile}: {reason}");
        }
        let maps = [map("hosts.map", "a.example app_a\n")];
        for hostile in [
            "a.example app_a;del map hosts.map a",
            "b\x01 app_a",
            "b app a",
        ] {
            let new = [map("hosts.map", &format!("a.example app_a\n{hostile}\n"))];
            let plan = plan(
                Files {
                    config: BASE,
                    maps: &maps,
                },
                Files {
                    config: BASE,
                    maps: &new,
                },
                &Draining::new(),
            );
            reload_reason(plan);
        }
    }

    fn map_plan(old: &str, new: &str) -> Plan {
        plan(
            Files {
                config: BASE,
                maps: &[map("wild.map", old)],
            },
            Files {
                config: BASE,
                maps: &[map("wild.map", new)],
            },
            &Draining::new(),
        )
    }

    #[test]
    fn map_entries_change_in_place_when_the_order_is_kept() {
        let plan = map_plan(
            ".a.example x\n.b.example y\n.c.example z\n",
            "# comment\n.a.example x2\n.c.example z\n.d.example w\n",
        );
        assert_eq!(
            lines(&plan),
            [
                "del map wild.map .b.example",
                "set map wild.map .a.example x2",
                "add map wild.map .d.example w",
            ]
        );
        // A new first entry would be matched after the others at runtime.
        reload_reason(map_plan(".b.example y\n", ".a.b.example x\n.b.example y\n"));
        reload_reason(map_plan("a x\nb y\n", "b y\na x\n"));
        reload_reason(map_plan("a x\n", "a x\na y\n"));
    }

    #[test]
    fn exact_match_maps_take_new_entries_anywhere() {
        let uses = |converter: &str| {
            BASE.replace(
                "    default_backend app_a\n",
                &format!(
                    "    use_backend %[req.hdr(host),{converter}(hosts.map)] if {{ req.hdr(host),{converter}(hosts.map) -m found }}\n    default_backend app_a\n"
                ),
            )
        };
        let plan_with = |config: &str| {
            plan(
                Files {
                    config,
                    maps: &[map("hosts.map", "a.example app_a\nc.example app_a\n")],
                },
                Files {
                    config,
                    maps: &[map(
                        "hosts.map",
                        "a.example app_a\nb.example app_a\nc.example app_a\n",
                    )],
                },
                &Draining::new(),
            )
        };
        for exact in ["map", "map_str"] {
            assert_eq!(
                lines(&plan_with(&uses(exact))),
                ["add map hosts.map b.example app_a"],
                "{exact}"
            );
        }
        // A suffix match takes the first entry that matches: an entry in the middle reloads.
        reload_reason(plan_with(&uses("map_end")));
        // So does a map used both ways, or not named in the configuration at all.
        reload_reason(plan_with(&format!(
            "{}    http-request set-var(txn.x) req.hdr(host),map_beg(hosts.map)\n",
            uses("map")
        )));
        reload_reason(plan_with(BASE));
    }

    #[test]
    fn a_draining_server_comes_back_ready_if_unchanged_and_by_reload_otherwise() {
        let without = BASE.replace("    server a2 10.0.0.2:8080 weight 100 check\n", "");
        let Plan::Runtime(removal) = plan_of(BASE, &without) else {
            panic!("reload")
        };
        let draining: Draining = removal.removed.into_iter().collect();
        let back = |config: &str| {
            plan(
                Files {
                    config: &without,
                    maps: &[],
                },
                Files { config, maps: &[] },
                &draining,
            )
        };
        let plan = back(BASE);
        assert_eq!(lines(&plan), ["set server app_a/a2 state ready"]);
        let Plan::Runtime(runtime) = plan else {
            unreachable!()
        };
        assert_eq!(runtime.revived, [("app_a".to_owned(), "a2".to_owned())]);
        let moved = BASE.replace("10.0.0.2:8080", "10.0.0.7:8080");
        assert!(reload_reason(back(&moved)).contains("drains"));
    }
}

#[cfg(test)]
mod section_tests {
    use super::*;

    /// A map of random lines (keys and values from small sets, so that keys repeat; comments,
    /// blank lines and indentation now and then).
    fn random_map(rng: &mut Rng) -> Vec<String> {
        (0..rng.below(12)).map(|_| random_line(rng)).collect()
    }

    fn random_line(rng: &mut Rng) -> String {
        match rng.below(10) {
            0 => "# note".to_owned(),
            1 => String::new(),
            2 => format!("  k{} v{}", rng.below(16), rng.below(3)),
            _ => format!("k{} v{}", rng.below(16), rng.below(3)),
        }
    }

    /// Reading only the lines where two maps differ gives the same keys and the same orders (or
    /// the same refusal) as reading both whole, used by exact matches or in entry order, when
    /// the old map reads whole; and refuses a new map that does not (a key twice, a line that
    /// is not `key value`).
    #[test]
    fn a_map_read_where_it_differs_plans_as_one_read_whole() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut compared = 0;
        for case in 0..4000 {
            let mut lines = random_map(&mut rng);
            let old = lines.join("\n") + "\n";
            for _ in 0..=rng.below(3) {
                let at = rng.below(lines.len() + 1);
                match rng.below(4) {
                    0 => lines.insert(at, random_line(&mut rng)),
                    1 if at < lines.len() => drop(lines.remove(at)),
                    2 if at < lines.len() => lines[at] = random_line(&mut rng),
                    _ => lines.push(random_line(&mut rng)),
                }
            }
            let new = lines.join("\n") + "\n";
            if map_entries("m", &old).is_err() {
                continue;
            }
            let valid = map_entries("m", &new).is_ok();
            compared += usize::from(valid);
            let file = |content: String| ConfigFile {
                name: "m".to_owned(),
                content,
            };
            let (old, new) = ([file(old)], [file(new)]);
            for config in ["use_backend %[x,map(m)]\n", "use_backend %[x,map_end(m)]\n"] {
                let read = |most| {
                    let diff = MapsDiff::read(&old, &new, config, most)?;
                    let keys: Vec<_> = diff.keys().collect();
                    Ok::<_, String>((keys, map_commands(&diff)?))
                };
                let (region, whole) = (read(Some(REGION_KEYS)), read(None));
                let case = format!(
                    "case {case}: {:?} -> {:?} with {config}",
                    old[0].content, new[0].content
                );
                if valid {
                    assert_eq!(region, whole, "{case}");
                } else {
                    assert!(region.is_err() && whole.is_err(), "{case}: {region:?}");
                }
            }
        }
        assert!(compared > 1000, "{compared} cases compared");
    }

    /// A small deterministic generator (xorshift), so that a failing case can be replayed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn chance(&mut self, in_: usize) -> bool {
            self.below(in_) == 0
        }
    }

    #[derive(Debug, Clone)]
    struct Backend {
        header: String,
        lines: Vec<String>,
        servers: Vec<(String, String)>,
    }

    #[derive(Debug, Clone)]
    struct World {
        defaults: Vec<String>,
        two_defaults: bool,
        backends: Vec<Backend>,
        hosts: Vec<(String, String)>,
        wildcards: Vec<(String, String)>,
    }

    impl World {
        fn new(rng: &mut Rng) -> Self {
            let mut world = World {
                defaults: vec!["    mode http".to_owned()],
                two_defaults: false,
                backends: Vec::new(),
                hosts: Vec::new(),
                wildcards: Vec::new(),
            };
            if rng.chance(2) {
                world
                    .defaults
                    .push("    default-server inter 2s observe layer4".to_owned());
            }
            for b in 0..2 + rng.below(6) {
                let kind = if rng.chance(4) { "listen" } else { "backend" };
                let mut backend = Backend {
                    header: format!("{kind} b{b}"),
                    lines: vec!["    balance leastconn".to_owned()],
                    servers: Vec::new(),
                };
                for _ in 0..rng.below(4) {
                    world.add_server(rng, &mut backend);
                }
                world.backends.push(backend);
            }
            for d in 0..rng.below(5) {
                let b = rng.below(world.backends.len() + 2);
                world.hosts.push((format!("d{d}.test"), format!("b{b}")));
            }
            world
        }

        fn add_server(&self, rng: &mut Rng, backend: &mut Backend) {
            let n = rng.below(9);
            let name = format!("s{n}");
            if backend.servers.iter().any(|(s, _)| *s == name) {
                return;
            }
            let check = if rng.chance(2) { " check" } else { "" };
            let args = format!("10.0.0.{n}:80 weight {}{check}", rng.below(3) * 50);
            backend.servers.push((name, args));
        }

        fn mutate(&mut self, rng: &mut Rng) {
            for _ in 0..1 + rng.below(3) {
                match rng.below(15) {
                    14 if self.hosts.len() > 1 => {
                        // Two domains swap backends (a restarted confgen numbering slots anew).
                        let (a, b) = (rng.below(self.hosts.len()), rng.below(self.hosts.len()));
                        let value = self.hosts[a].1.clone();
                        self.hosts[a].1 = std::mem::replace(&mut self.hosts[b].1, value);
                    }
                    0..=5 => {
                        let b = rng.below(self.backends.len());
                        let mut backend = self.backends[b].clone();
                        match rng.below(4) {
                            0 => self.add_server(rng, &mut backend),
                            1 if !backend.servers.is_empty() => {
                                let s = rng.below(backend.servers.len());
                                backend.servers.remove(s);
                            }
                            2 if !backend.servers.is_empty() => {
                                let s = rng.below(backend.servers.len());
                                backend.servers[s].1 = format!(
                                    "10.0.1.{}:80 weight {}",
                                    rng.below(4),
                                    rng.below(3) * 50
                                );
                            }
                            _ if !backend.servers.is_empty() => {
                                let s = rng.below(backend.servers.len());
                                backend.servers[s].1.push_str(" backup");
                            }
                            _ => {}
                        }
                        self.backends[b] = backend;
                    }
                    6 => {
                        let b = rng.below(self.backends.len());
                        self.backends[b].lines.push("    option httpchk".to_owned());
                    }
                    7 => {
                        let b = rng.below(self.backends.len());
                        self.backends[b].header.push_str(" from defaults");
                    }
                    8 => {
                        let n = self.backends.len();
                        self.backends.push(Backend {
                            header: format!("backend b{n}"),
                            lines: Vec::new(),
                            servers: vec![("s1".to_owned(), "10.0.9.1:80".to_owned())],
                        });
                    }
                    9 if self.backends.len() > 1 => {
                        let b = rng.below(self.backends.len());
                        self.backends.remove(b);
                    }
                    10 => self.two_defaults = !self.two_defaults,
                    11 => self.defaults.push("    timeout connect 3s".to_owned()),
                    12 => {
                        let d = rng.below(6);
                        let b = rng.below(self.backends.len());
                        self.hosts
                            .retain(|(domain, _)| *domain != format!("d{d}.test"));
                        if rng.chance(3) {
                            self.hosts.push((format!("d{d}.test"), format!("b{b}")));
                        }
                    }
                    _ => {
                        let b = rng.below(self.backends.len());
                        self.wildcards
                            .push((format!(".w{b}.test"), format!("b{b}")));
                    }
                }
            }
        }

        fn config(&self) -> String {
            let mut text = String::from("# generated\ndefaults\n");
            for line in &self.defaults {
                text.push_str(line);
                text.push('\n');
            }
            text.push_str(
                "\nfrontend http\n    bind :80\n    use_backend %[req.hdr(host),map(hosts.map)]\n    \
                 use_backend %[req.hdr(host),map_end(wildcards.map)]\n",
            );
            for (i, backend) in self.backends.iter().enumerate() {
                if self.two_defaults && i == self.backends.len() / 2 {
                    text.push_str("\ndefaults\n    mode tcp\n");
                }
                text.push('\n');
                text.push_str(&backend.header);
                text.push('\n');
                for line in &backend.lines {
                    text.push_str(line);
                    text.push('\n');
                }
                for (name, args) in &backend.servers {
                    text.push_str(&format!("    server {name} {args}\n"));
                }
            }
            text
        }

        fn maps(&self) -> Vec<ConfigFile> {
            let lines = |entries: &[(String, String)]| -> String {
                entries.iter().map(|(k, v)| format!("{k} {v}\n")).collect()
            };
            vec![
                ConfigFile {
                    name: "hosts.map".to_owned(),
                    content: lines(&self.hosts),
                },
                ConfigFile {
                    name: "wildcards.map".to_owned(),
                    content: lines(&self.wildcards),
                },
            ]
        }
    }

    /// The section-level plan is the text-level plan, whatever changed: servers, section lines,
    /// headers, sections added or removed, `defaults`, map entries, servers draining.
    #[test]
    fn the_section_level_plan_equals_the_text_level_plan() {
        let mut runtime = 0;
        let mut carried = 0;
        for seed in 1..3000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let old = World::new(&mut rng);
            let mut new = old.clone();
            new.mutate(&mut rng);
            let (old_config, new_config) = (old.config(), new.config());
            let (old_maps, new_maps) = (old.maps(), new.maps());
            let mut draining = Draining::new();
            if rng.chance(3) {
                draining.insert(
                    ("b0".to_owned(), "s1".to_owned()),
                    "10.0.0.1:80 weight 50".to_owned(),
                );
            }
            let files = |config, maps| Files { config, maps };
            let text = plan(
                files(&old_config, &old_maps),
                files(&new_config, &new_maps),
                &draining,
            );
            let sections = plan_changed(
                files(&old_config, &old_maps),
                files(&new_config, &new_maps),
                &draining,
            );
            assert_eq!(
                sections, text,
                "seed {seed}\n--- old\n{old_config}\n--- new\n{new_config}"
            );
            // From a span the two share that is shorter than the longest (a delta's may be):
            // a wider region, the same plan.
            let (a, b) = (old_config.as_bytes(), new_config.as_bytes());
            let prefix = common_prefix(a, b);
            let suffix = common_suffix(a, b, a.len().min(b.len()) - prefix);
            let span = Span {
                prefix: prefix - rng.below(prefix + 1),
                suffix: suffix - rng.below(suffix + 1),
            };
            let region = region_within(&old_config, &new_config, span);
            let defaults = Defaults::of(&old_config);
            let within = plan_within(
                files(&old_config, &old_maps),
                files(&new_config, &new_maps),
                &draining,
                region,
                Some(defaults),
            );
            assert_eq!(within, text, "seed {seed}, {span:?}");
            // The defaults sections carried over to the new text are where a search finds them.
            if let Some(after) = region.and_then(|r| defaults.after(&old_config, &new_config, r)) {
                assert_eq!(after, Defaults::of(&new_config), "seed {seed}");
                carried += 1;
            }
            if matches!(text, Plan::Runtime(_)) {
                runtime += 1;
            }
        }
        // Both paths were exercised: runtime plans and reloads.
        assert!(runtime > 500 && runtime < 2500, "{runtime} runtime plans");
        assert!(carried > 1000, "{carried} defaults carried over");
    }

    #[test]
    fn defaults_are_carried_over_a_change_before_after_or_around_them() {
        let old = "backend a\n    server a1 10.0.0.1:80\n\ndefaults\n    mode http\n\nbackend b\n    server b1 10.0.0.2:80\n";
        let cases = [
            // A server more before the defaults section: it moves.
            old.replace(
                "a1 10.0.0.1:80\n",
                "a1 10.0.0.1:80\n    server a2 10.0.0.3:80\n",
            ),
            // After it: it stays.
            old.replace(
                "b1 10.0.0.2:80\n",
                "b1 10.0.0.2:80\n    server b2 10.0.0.4:80\n",
            ),
        ];
        for new in &cases {
            let region = changed_region(old, new).unwrap();
            let after = Defaults::of(old).after(old, new, region);
            assert_eq!(after, Some(Defaults::of(new)), "{new}");
            assert!(matches!(after, Some(Defaults::One(..))));
        }
        // A second defaults section in the change: only a search can tell.
        let two = old.replace("backend b\n", "defaults\n    mode tcp\n\nbackend b\n");
        let region = changed_region(old, &two).unwrap();
        assert_eq!(Defaults::of(old).after(old, &two, region), None);
        assert_eq!(Defaults::of(&two), Defaults::Several);
    }

    #[test]
    fn only_the_differing_sections_are_read() {
        let mut config = String::from("defaults\n    mode http\n\nfrontend f\n    bind :80\n");
        for b in 0..500 {
            config.push_str(&format!(
                "\nbackend b{b}\n    server s 10.0.0.1:{}\n",
                1000 + b
            ));
        }
        let new = config.replace("10.0.0.1:1250\n", "10.0.0.2:1250\n");
        let found = differing(&config, &new, changed_region(&config, &new), None)
            .expect("sections one for one");
        assert_eq!(
            found.pairs,
            [(
                "backend b250\n    server s 10.0.0.1:1250\n\n",
                "backend b250\n    server s 10.0.0.2:1250\n\n"
            )]
        );
        assert_eq!(found.defaults, "defaults\n    mode http\n\n");
        // A new section, a changed frontend, two defaults: left to the text-level plan.
        let added = format!("{config}\nbackend extra\n");
        assert!(differing(&config, &added, changed_region(&config, &added), None).is_none());
        let frontend = config.replace("bind :80", "bind :81");
        assert!(differing(&config, &frontend, changed_region(&config, &frontend), None).is_none());
        let two = format!("{config}\ndefaults\n");
        let moved = two.replace("10.0.0.1:1250", "10.0.0.3:1250");
        assert!(differing(&two, &moved, changed_region(&two, &moved), None).is_none());
    }
}
