//! What every party to a `ConfigSnapshot` computes alike: its checksum, from scratch or updated
//! where the text changed ([`Digest`]), and the deltas that carry a snapshot as the change from
//! the previous one of a `Confgen.Watch` stream ([`delta`], [`rebuild`]). `config.proto` says
//! what each field means; this module is its one implementation.

use sha2::{Digest as _, Sha256};

use crate::v1::{ConfigFile, ConfigSnapshot, MapDelta, SnapshotDelta, TextDelta};

/// The prefix of a checksum in the scheme confgen and supervisors compute.
pub const SCHEME: &str = "sha256g:";
/// The prefix of a checksum in the scheme the first delta streams carried: the parts' hashes
/// hashed in one run (supervisors still read it in the record of what runs).
pub const PARTS_SCHEME: &str = "sha256s:";
/// The prefix of a checksum in the scheme of earlier versions.
pub const LEGACY_SCHEME: &str = "sha256:";

/// How many consecutive parts' hashes the `"sha256g:"` scheme hashes into one group hash: a
/// change costs its group (8 KiB of hashes) and the groups' hashes (32 bytes per group), not
/// every part's hash (800 KiB at 25,000 parts).
const GROUP: usize = 256;

type Hash = [u8; 32];

/// The checksum of a configuration: `"sha256g:"` and the hex SHA-256 over its parts' hashes
/// in groups, and its maps (`config.proto`).
pub fn checksum(haproxy_config: &str, maps: &[ConfigFile]) -> String {
    Digest::of(haproxy_config, maps).checksum().to_owned()
}

/// The checksum in the `"sha256s:"` scheme: the hex SHA-256 over the number of parts, every
/// part's hash and the maps, in one run.
fn parts_checksum(haproxy_config: &str, maps: &[ConfigFile]) -> String {
    let digest = Digest::of(haproxy_config, maps);
    let mut hasher = Sha256::new();
    hasher.update((digest.parts.len() as u64).to_be_bytes());
    for (_, hash) in &digest.parts {
        hasher.update(hash);
    }
    hash_maps(&mut hasher, &digest.maps);
    hex(PARTS_SCHEME, &hasher.finalize().into())
}

/// The checksum in the scheme of earlier versions: `"sha256:"` and the hex SHA-256 over
/// `haproxy_config`, then each map's name and content, each preceded by its length in bytes as
/// a big-endian u64 (so no two different configurations hash the same parts).
pub fn legacy_checksum(haproxy_config: &str, maps: &[ConfigFile]) -> String {
    let mut hasher = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    part(haproxy_config.as_bytes());
    for map in maps {
        part(map.name.as_bytes());
        part(map.content.as_bytes());
    }
    hex(LEGACY_SCHEME, &hasher.finalize().into())
}

/// Whether `checksum`, in any of the three schemes, is the checksum of `haproxy_config` and
/// `maps`.
pub fn verify(checksum: &str, haproxy_config: &str, maps: &[ConfigFile]) -> bool {
    if checksum.starts_with(SCHEME) {
        Digest::of(haproxy_config, maps).checksum() == checksum
    } else if checksum.starts_with(PARTS_SCHEME) {
        parts_checksum(haproxy_config, maps) == checksum
    } else {
        legacy_checksum(haproxy_config, maps) == checksum
    }
}

fn hex(scheme: &str, hash: &Hash) -> String {
    use std::fmt::Write;
    let mut hex = String::with_capacity(scheme.len() + 64);
    hex.push_str(scheme);
    for byte in hash {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// A configuration's checksum with the hashes it was computed from, so that the checksum of
/// the next configuration costs the parts that changed: [`Digest::next`].
#[derive(Debug, Clone)]
pub struct Digest {
    /// Where each part of the configuration starts (the first at 0), and its SHA-256.
    parts: Vec<(usize, Hash)>,
    /// How many parts make a group (the scheme's [`GROUP`]; fewer in tests, to have many).
    group: usize,
    /// The SHA-256 of each group's parts' hashes, in order.
    groups: Vec<Hash>,
    /// Length of the configuration.
    len: usize,
    /// Each map's name and the SHA-256 of its content, in order.
    maps: Vec<(String, Hash)>,
    checksum: String,
}

impl Digest {
    /// Hashes `haproxy_config` and `maps` whole.
    pub fn of(haproxy_config: &str, maps: &[ConfigFile]) -> Self {
        Self::grouped(haproxy_config, maps, GROUP)
    }

    fn grouped(haproxy_config: &str, maps: &[ConfigFile], group: usize) -> Self {
        let mut parts = Vec::new();
        split(haproxy_config, 0, haproxy_config.len(), &mut parts);
        let maps = maps
            .iter()
            .map(|m| (m.name.clone(), sha256(m.content.as_bytes())))
            .collect();
        let groups = parts.chunks(group).map(group_hash).collect();
        Self::finish(parts, group, groups, haproxy_config.len(), maps)
    }

    /// The digest of `(config, maps)` when `self` is the digest of `(old_config, old_maps)`:
    /// only the parts of the text between the two texts' common start and common end are
    /// hashed again, and only the maps whose content differs.
    pub fn next(
        &self,
        (old_config, old_maps): (&str, &[ConfigFile]),
        (config, maps): (&str, &[ConfigFile]),
    ) -> Self {
        debug_assert_eq!(self.len, old_config.len(), "a digest of another text");
        let (old, new) = (old_config.as_bytes(), config.as_bytes());
        let prefix = common_prefix(old, new);
        let suffix = common_suffix(old, new, old.len().min(new.len()) - prefix);
        self.next_within(old_maps, (config, maps), Span { prefix, suffix })
    }

    /// [`Digest::next`] when the caller knows a span the two texts share: the configuration
    /// is the old one's first `span.prefix` bytes and last `span.suffix` bytes with something
    /// else between (what a delta says, or what a renderer knows from the pieces it reused).
    /// Shorter spans than the longest only cost more hashing. The old maps are compared.
    pub fn next_within(
        &self,
        old_maps: &[ConfigFile],
        (config, maps): (&str, &[ConfigFile]),
        Span { prefix, suffix }: Span,
    ) -> Self {
        let new = config.as_bytes();
        let old_len = self.len;
        assert!(
            prefix + suffix <= old_len.min(new.len()),
            "a span longer than a text"
        );
        // A part is the same in both when it and the bytes on each side of its bounds (which
        // decide the bounds) lie in the common start, or in the common end. Part i ends where
        // part i + 1 starts: the parts kept at the front are those before the last one that
        // starts in the common start.
        let front = self
            .parts
            .partition_point(|&(start, _)| start < prefix)
            .saturating_sub(1);
        let back = self
            .parts
            .partition_point(|&(start, _)| start <= old_len - suffix);
        let from = if front == 0 { 0 } else { self.parts[front].0 };
        let to = self
            .parts
            .get(back)
            .map_or(new.len(), |p| p.0 + new.len() - old_len);
        let mut parts = Vec::with_capacity(self.parts.len() + 8);
        parts.extend_from_slice(&self.parts[..front]);
        split(config, from, to, &mut parts);
        // Parts from `front` to `split_end` were hashed again; those after are the old ones
        // from `back`. The groups they fall in are hashed again, and when the number of parts
        // changed, every group after them (each part moved).
        let split_end = parts.len();
        parts.extend(
            self.parts[back..]
                .iter()
                .map(|&(start, hash)| (start + new.len() - old_len, hash)),
        );
        let group = self.group;
        let first = front / group;
        let end = if parts.len() == self.parts.len() {
            split_end.div_ceil(group)
        } else {
            parts.len().div_ceil(group)
        };
        let mut groups = Vec::with_capacity(parts.len().div_ceil(group));
        groups.extend_from_slice(&self.groups[..first]);
        let changed = parts[first * group..].chunks(group).take(end - first);
        groups.extend(changed.map(group_hash));
        if parts.len() == self.parts.len() {
            groups.extend_from_slice(&self.groups[end..]);
        }
        let maps = maps
            .iter()
            .map(|map| {
                let kept = old_maps
                    .binary_search_by(|old| old.name.cmp(&map.name))
                    .ok()
                    .filter(|&i| old_maps[i].content == map.content)
                    .and_then(|i| self.maps.get(i).filter(|(name, _)| *name == map.name));
                match kept {
                    Some((_, hash)) => (map.name.clone(), *hash),
                    None => (map.name.clone(), sha256(map.content.as_bytes())),
                }
            })
            .collect();
        Self::finish(parts, group, groups, config.len(), maps)
    }

    fn finish(
        parts: Vec<(usize, Hash)>,
        group: usize,
        groups: Vec<Hash>,
        len: usize,
        maps: Vec<(String, Hash)>,
    ) -> Self {
        let mut hasher = Sha256::new();
        hasher.update((parts.len() as u64).to_be_bytes());
        for hash in &groups {
            hasher.update(hash);
        }
        hash_maps(&mut hasher, &maps);
        let checksum = hex(SCHEME, &hasher.finalize().into());
        Self {
            parts,
            group,
            groups,
            len,
            maps,
            checksum,
        }
    }

    /// The checksum (`"sha256g:"` scheme).
    pub fn checksum(&self) -> &str {
        &self.checksum
    }
}

fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// The SHA-256 of a group's parts' hashes, one after the other.
fn group_hash(parts: &[(usize, Hash)]) -> Hash {
    let mut hasher = Sha256::new();
    for (_, hash) in parts {
        hasher.update(hash);
    }
    hasher.finalize().into()
}

/// Each map's name's length as a big-endian u64, its name and its content's hash.
fn hash_maps(hasher: &mut Sha256, maps: &[(String, Hash)]) {
    for (name, hash) in maps {
        hasher.update((name.len() as u64).to_be_bytes());
        hasher.update(name.as_bytes());
        hasher.update(hash);
    }
}

/// Appends the parts of `text[from..to]` with their hashes; `from` starts a part (or the text)
/// and `to` starts one (or ends the text).
fn split(text: &str, from: usize, to: usize, parts: &mut Vec<(usize, Hash)>) {
    let bytes = text.as_bytes();
    let mut start = from;
    if from < to {
        for newline in memchr::memchr_iter(b'\n', &bytes[from..to - 1]) {
            let next = from + newline + 1;
            if bytes[next].is_ascii_alphabetic() {
                parts.push((start, sha256(&bytes[start..next])));
                start = next;
            }
        }
        parts.push((start, sha256(&bytes[start..to])));
    }
}

/// How many bytes `a` and `b` share at their start, compared a block at a time.
pub fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    i + a[i..n]
        .iter()
        .zip(&b[i..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// How many bytes `a` and `b` share at their end, at most `max`.
pub fn common_suffix(a: &[u8], b: &[u8], max: usize) -> usize {
    const BLOCK: usize = 4096;
    let (la, lb) = (a.len(), b.len());
    let mut i = 0;
    while i + BLOCK <= max && a[la - i - BLOCK..la - i] == b[lb - i - BLOCK..lb - i] {
        i += BLOCK;
    }
    i + a[..la - i]
        .iter()
        .rev()
        .zip(b[..lb - i].iter().rev())
        .take(max - i)
        .take_while(|(x, y)| x == y)
        .count()
}

/// What two texts share: the first `prefix` bytes and the last `suffix` bytes of each are the
/// same, and `prefix + suffix` is at most the shorter length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub prefix: usize,
    pub suffix: usize,
}

/// `text` as the change from `base`: their common start and end kept, the middle inserted.
pub fn text_delta(base: &str, text: &str) -> TextDelta {
    let (a, b) = (base.as_bytes(), text.as_bytes());
    let mut prefix = common_prefix(a, b);
    while !(base.is_char_boundary(prefix) && text.is_char_boundary(prefix)) {
        prefix -= 1;
    }
    let mut suffix = common_suffix(a, b, a.len().min(b.len()) - prefix);
    while !(base.is_char_boundary(a.len() - suffix) && text.is_char_boundary(b.len() - suffix)) {
        suffix -= 1;
    }
    text_delta_within(text, Span { prefix, suffix })
}

/// `text` as the change from a base it shares `span` with, which falls on character boundaries
/// of both.
pub fn text_delta_within(text: &str, span: Span) -> TextDelta {
    TextDelta {
        keep_prefix: span.prefix as u64,
        keep_suffix: span.suffix as u64,
        insert: text[span.prefix..text.len() - span.suffix].to_owned(),
    }
}

/// Why a delta cannot be applied to the receiver's base.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A delta arrived before any whole snapshot.
    #[error("a delta without a base snapshot")]
    NoBase,
    /// The delta is against another snapshot than the receiver's base.
    #[error("a delta against {expected}, but the base is {base}")]
    OtherBase { expected: String, base: String },
    /// The kept prefix and suffix do not fit the base.
    #[error("{what}: keeps {prefix} + {suffix} bytes of a {len}-byte base, or cuts a character")]
    Range {
        what: String,
        prefix: u64,
        suffix: u64,
        len: usize,
    },
    /// The rebuilt configuration does not have the snapshot's checksum.
    #[error("the rebuilt configuration is {rebuilt}, not {stated}")]
    Checksum { stated: String, rebuilt: String },
    /// Map names out of order or repeated.
    #[error("map '{0}' out of order or repeated")]
    MapOrder(String),
}

/// Applies `delta` to `base`.
pub fn apply_text(what: &str, base: &str, delta: &TextDelta) -> Result<String, DeltaError> {
    apply_text_in(what, base, delta, String::new())
}

/// [`apply_text`], written into `buffer` (emptied first): a spent text's allocation, which
/// spares allocating and faulting in fresh pages for each new text of a few megabytes.
fn apply_text_in(
    what: &str,
    base: &str,
    delta: &TextDelta,
    mut text: String,
) -> Result<String, DeltaError> {
    let range = || DeltaError::Range {
        what: what.to_owned(),
        prefix: delta.keep_prefix,
        suffix: delta.keep_suffix,
        len: base.len(),
    };
    let prefix = usize::try_from(delta.keep_prefix).map_err(|_| range())?;
    let suffix = usize::try_from(delta.keep_suffix).map_err(|_| range())?;
    let tail = base.len().checked_sub(suffix).ok_or_else(range)?;
    if prefix > tail || !base.is_char_boundary(prefix) || !base.is_char_boundary(tail) {
        return Err(range());
    }
    text.clear();
    text.reserve(prefix + delta.insert.len() + suffix);
    text.push_str(&base[..prefix]);
    text.push_str(&delta.insert);
    text.push_str(&base[tail..]);
    Ok(text)
}

/// `snapshot` as a message of a delta stream whose previous message was `base`: its
/// configuration and maps replaced by the change from `base`'s, without its model.
pub fn delta(base: &ConfigSnapshot, snapshot: &ConfigSnapshot) -> ConfigSnapshot {
    let config = text_delta(&base.haproxy_config, &snapshot.haproxy_config);
    message(snapshot, snapshot_delta(base, snapshot, config))
}

/// The change from `base` to `snapshot` when their configurations share `span` (on character
/// boundaries): computed once by a generator that knows it, for every stream whose previous
/// message was `base`.
pub fn delta_within(base: &ConfigSnapshot, snapshot: &ConfigSnapshot, span: Span) -> SnapshotDelta {
    let config = text_delta_within(&snapshot.haproxy_config, span);
    snapshot_delta(base, snapshot, config)
}

/// `snapshot` as a message carrying `delta` instead of its configuration and maps, without its
/// model.
pub fn message(snapshot: &ConfigSnapshot, delta: SnapshotDelta) -> ConfigSnapshot {
    ConfigSnapshot {
        version: snapshot.version,
        checksum: snapshot.checksum.clone(),
        haproxy_config: String::new(),
        maps: Vec::new(),
        model: None,
        generator: snapshot.generator.clone(),
        delta: Some(delta),
    }
}

fn snapshot_delta(
    base: &ConfigSnapshot,
    snapshot: &ConfigSnapshot,
    config: TextDelta,
) -> SnapshotDelta {
    let maps = snapshot
        .maps
        .iter()
        .map(|map| {
            let old = base
                .maps
                .binary_search_by(|old| old.name.cmp(&map.name))
                .map_or("", |i| base.maps[i].content.as_str());
            MapDelta {
                name: map.name.clone(),
                content: Some(text_delta(old, &map.content)),
            }
        })
        .collect();
    SnapshotDelta {
        base_checksum: base.checksum.clone(),
        config: Some(config),
        maps,
    }
}

/// The whole snapshot that `message` of a delta stream stands for, checked against its
/// checksum, with its digest; `base` is the previous snapshot of the stream and its digest
/// (`None` before the first). A whole message is checked in full, in either scheme.
pub fn rebuild(
    base: Option<(&ConfigSnapshot, &Digest)>,
    message: ConfigSnapshot,
) -> Result<(ConfigSnapshot, Digest), DeltaError> {
    rebuild_in(base, message, String::new())
}

/// [`rebuild`], the configuration of a delta written into `buffer`: the text of a snapshot
/// that is no longer needed, whose allocation it reuses.
pub fn rebuild_in(
    base: Option<(&ConfigSnapshot, &Digest)>,
    mut message: ConfigSnapshot,
    buffer: String,
) -> Result<(ConfigSnapshot, Digest), DeltaError> {
    let digest = match message.delta.take() {
        None => {
            let digest = Digest::of(&message.haproxy_config, &message.maps);
            // From a confgen of an earlier version.
            if message.checksum.starts_with(LEGACY_SCHEME)
                && legacy_checksum(&message.haproxy_config, &message.maps) == message.checksum
            {
                return Ok((message, digest));
            }
            digest
        }
        Some(delta) => {
            let (base, base_digest) = base.ok_or(DeltaError::NoBase)?;
            if delta.base_checksum != base.checksum {
                return Err(DeltaError::OtherBase {
                    expected: delta.base_checksum,
                    base: base.checksum.clone(),
                });
            }
            let config = delta.config.unwrap_or_default();
            message.haproxy_config =
                apply_text_in("the configuration", &base.haproxy_config, &config, buffer)?;
            // What the delta kept is the same in both: only the rest is hashed again.
            let span = Span {
                prefix: config.keep_prefix as usize,
                suffix: config.keep_suffix as usize,
            };
            let mut maps: Vec<ConfigFile> = Vec::with_capacity(delta.maps.len());
            for map in delta.maps {
                if maps.last().is_some_and(|last| last.name >= map.name) {
                    return Err(DeltaError::MapOrder(map.name));
                }
                let old = base
                    .maps
                    .binary_search_by(|old| old.name.cmp(&map.name))
                    .map_or("", |i| base.maps[i].content.as_str());
                let content = apply_text(&map.name, old, &map.content.unwrap_or_default())?;
                maps.push(ConfigFile {
                    name: map.name,
                    content,
                });
            }
            message.maps = maps;
            base_digest.next_within(&base.maps, (&message.haproxy_config, &message.maps), span)
        }
    };
    if digest.checksum() != message.checksum {
        return Err(DeltaError::Checksum {
            stated: message.checksum,
            rebuilt: digest.checksum().to_owned(),
        });
    }
    Ok((message, digest))
}

#[cfg(test)]
mod tests;
