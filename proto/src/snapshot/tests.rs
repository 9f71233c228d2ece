use proptest::prelude::*;

use super::*;

fn file(name: &str, content: &str) -> ConfigFile {
    ConfigFile {
        name: name.to_owned(),
        content: content.to_owned(),
    }
}

fn snapshot(config: &str, maps: &[(&str, &str)]) -> ConfigSnapshot {
    let maps: Vec<ConfigFile> = maps.iter().map(|(n, c)| file(n, c)).collect();
    ConfigSnapshot {
        version: 1,
        checksum: checksum(config, &maps),
        haproxy_config: config.to_owned(),
        maps,
        ..ConfigSnapshot::default()
    }
}

#[test]
fn the_checksum_hashes_groups_of_the_hashes_of_parts_that_start_at_unindented_lines() {
    // References computed independently (Python's hashlib): SHA-256 over the part count as a
    // big-endian u64, the SHA-256 of each run of 256 parts' SHA-256s, then the map's name
    // length, name and content hash.
    let config = "defaults\n    x\nbackend a\n    server s 1.2.3.4:80\n";
    let maps = [file("hosts.map", "a b\n")];
    assert_eq!(
        checksum(config, &maps),
        "sha256g:30c2b0621c165abeade0aeb98fe5326c9a1612403bd9c08d238013ef17f829cd"
    );
    assert_eq!(
        checksum("", &[]),
        "sha256g:af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
    );
    // 300 parts: two groups.
    let big: String = (0..300)
        .map(|i| format!("backend b{i}\n    server s {i}\n"))
        .collect();
    assert_eq!(
        checksum(&big, &[]),
        "sha256g:97068cdd2db71ca22e47ffaa652cfa0e654cbafd601bb0025467039092f3a248"
    );
    // The scheme of the first delta streams: every part's hash in one run.
    let parts = "sha256s:3e7ff97bd1ba7bafcf07f7cf2e9bdea9f31ed6c9cc1944950078bd958b198863";
    assert_eq!(parts_checksum(config, &maps), parts);
    assert!(verify(parts, config, &maps));
    assert!(!verify(parts, config, &[]));
    // Where a part ends is part of what is hashed.
    assert_ne!(checksum("a\nb\n", &[]), checksum("a\n b\n", &[]));
    assert_ne!(
        checksum("a\n", &[file("m", "x")]),
        checksum("a\n", &[file("m", "y")])
    );
    assert!(verify(&checksum(config, &[]), config, &[]));
    assert!(verify(&legacy_checksum(config, &[]), config, &[]));
    assert!(!verify(&checksum(config, &[]), "defaults\n", &[]));
    assert!(!verify(&legacy_checksum(config, &[]), "defaults\n", &[]));
}

/// Texts made of the pieces a configuration has: section headers, indented lines, blank lines,
/// and a character of more than one byte.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "backend a\n",
            "listen b\n",
            "    server s 1\n",
            "    server é 2\n",
            "\n",
            "# c\n",
            "x",
            "é",
            " ",
        ]),
        0..40,
    )
    .prop_map(|pieces| pieces.concat())
}

/// An edit: replace the characters in `[from, from + len)` (clamped) by `insert`.
fn edit() -> impl Strategy<Value = (usize, usize, String)> {
    (0usize..400, 0usize..80, text())
}

fn apply_edit(text: &str, (from, len, insert): &(usize, usize, String)) -> String {
    let chars: Vec<char> = text.chars().collect();
    let from = (*from).min(chars.len());
    let to = (from + len).min(chars.len());
    let mut out: String = chars[..from].iter().collect();
    out.push_str(insert);
    out.extend(&chars[to..]);
    out
}

proptest! {
    /// After any sequence of edits, the digest updated edit by edit is the digest computed
    /// from scratch, and each text goes through a delta unchanged.
    #[test]
    fn an_updated_digest_is_the_digest_from_scratch(
        start in text(),
        edits in prop::collection::vec((edit(), prop::option::of(text())), 1..12),
        group in prop::sample::select(vec![1, 2, 3, GROUP]),
    ) {
        let mut config = start;
        let mut maps = vec![file("hosts.map", "a b\n")];
        let mut digest = Digest::grouped(&config, &maps, group);
        for (change, map) in &edits {
            let next = apply_edit(&config, change);
            let next_maps = match map {
                Some(content) => vec![file("a.map", content), file("hosts.map", "a b\n")],
                None => maps.clone(),
            };
            let updated = digest.next((&config, &maps), (&next, &next_maps));
            let fresh = Digest::grouped(&next, &next_maps, group);
            prop_assert_eq!(updated.checksum(), fresh.checksum());
            prop_assert_eq!(&updated.parts, &fresh.parts);
            prop_assert_eq!(&updated.groups, &fresh.groups);
            let delta = text_delta(&config, &next);
            prop_assert_eq!(apply_text("t", &config, &delta).unwrap(), next.clone());
            // Rebuilt from a delta, with the digest updated from what the delta kept.
            let whole = |config: &str, maps: &[ConfigFile]| ConfigSnapshot {
                checksum: Digest::grouped(config, maps, group).checksum().to_owned(),
                haproxy_config: config.to_owned(),
                maps: maps.to_vec(),
                ..ConfigSnapshot::default()
            };
            let (base, new) = (whole(&config, &maps), whole(&next, &next_maps));
            // Written into a spent text's buffer, as the supervisor does.
            let spent = format!("{config}{next} spent");
            let (rebuilt, rebuilt_digest) =
                rebuild_in(Some((&base, &digest)), super::delta(&base, &new), spent).unwrap();
            prop_assert_eq!(&rebuilt, &new);
            prop_assert_eq!(&rebuilt_digest.parts, &fresh.parts);
            prop_assert_eq!(&rebuilt_digest.groups, &fresh.groups);
            (config, maps, digest) = (next, next_maps, updated);
        }
    }
}

#[test]
fn a_delta_carries_the_changed_middle_and_rebuilds_the_snapshot() {
    let base = snapshot(
        "defaults\nbackend a\n    server s 1\nbackend b\n    server s 2\n",
        &[("hosts.map", "a.example a\n"), ("old.map", "x y\n")],
    );
    let new = snapshot(
        "defaults\nbackend a\n    server s 1\n    server t 3\nbackend b\n    server s 2\n",
        &[
            ("hosts.map", "a.example a\nb.example b\n"),
            ("new.map", "z\n"),
        ],
    );
    let message = delta(&base, &new);
    assert!(message.haproxy_config.is_empty() && message.maps.is_empty());
    let sent = message.delta.as_ref().unwrap();
    assert_eq!(sent.base_checksum, base.checksum);
    assert_eq!(sent.config.as_ref().unwrap().insert, "    server t 3\n");
    assert_eq!(
        sent.maps
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["hosts.map", "new.map"]
    );
    let base_digest = Digest::of(&base.haproxy_config, &base.maps);
    let (rebuilt, digest) = rebuild(Some((&base, &base_digest)), message.clone()).unwrap();
    assert_eq!(rebuilt, new);
    assert_eq!(digest.checksum(), new.checksum);

    // A whole message is checked too.
    assert_eq!(rebuild(None, new.clone()).unwrap().0, new);
    let mut forged = new.clone();
    forged.haproxy_config.push_str("backend c\n");
    assert!(matches!(
        rebuild(None, forged),
        Err(DeltaError::Checksum { .. })
    ));
}

#[test]
fn a_delta_that_does_not_fit_the_base_is_refused() {
    let base = snapshot("defaults\nbackend a\n", &[]);
    let other = snapshot("defaults\nbackend é\n", &[]);
    let new = snapshot("defaults\nbackend b\n", &[]);
    let digest = Digest::of(&base.haproxy_config, &base.maps);
    let message = delta(&base, &new);
    assert_eq!(
        rebuild(None, message.clone()).unwrap_err(),
        DeltaError::NoBase
    );
    let other_digest = Digest::of(&other.haproxy_config, &other.maps);
    assert!(matches!(
        rebuild(Some((&other, &other_digest)), message.clone()),
        Err(DeltaError::OtherBase { .. })
    ));
    // Bytes kept past the base's end, or a cut through a character.
    for (prefix, suffix) in [(30, 0), (0, 30), (15, 10), (u64::MAX, 1)] {
        let mut bad = message.clone();
        let config = bad.delta.as_mut().unwrap().config.as_mut().unwrap();
        (config.keep_prefix, config.keep_suffix) = (prefix, suffix);
        assert!(
            matches!(
                rebuild(Some((&base, &digest)), bad),
                Err(DeltaError::Range { .. })
            ),
            "{prefix} {suffix}"
        );
    }
    let cut = TextDelta {
        keep_prefix: 18,
        keep_suffix: 0,
        insert: String::new(),
    };
    assert!(matches!(
        apply_text("t", &other.haproxy_config, &cut),
        Err(DeltaError::Range { .. })
    ));
    // What was sent does not rebuild what the checksum says.
    let mut tampered = message.clone();
    tampered
        .delta
        .as_mut()
        .unwrap()
        .config
        .as_mut()
        .unwrap()
        .insert = "c".to_owned();
    assert!(matches!(
        rebuild(Some((&base, &digest)), tampered),
        Err(DeltaError::Checksum { .. })
    ));
    // Maps out of order.
    let mut unordered = message;
    unordered.delta.as_mut().unwrap().maps = vec![
        MapDelta {
            name: "b.map".to_owned(),
            content: None,
        },
        MapDelta {
            name: "a.map".to_owned(),
            content: None,
        },
    ];
    assert_eq!(
        rebuild(Some((&base, &digest)), unordered).unwrap_err(),
        DeltaError::MapOrder("a.map".to_owned())
    );
}

#[test]
fn a_delta_never_cuts_a_character() {
    // 'é' and 'è' share their first byte: the kept prefix stops before it.
    let delta = text_delta("aé", "aè");
    assert_eq!((delta.keep_prefix, delta.keep_suffix), (1, 0));
    assert_eq!(delta.insert, "è");
    let delta = text_delta("éa", "èa");
    assert_eq!((delta.keep_prefix, delta.keep_suffix), (0, 1));
}
