//! What a configuration may ask of HAProxy, whoever wrote it: nothing that runs code, reads
//! or writes files, opens control sockets or reaches a Unix socket. Both the supervisor (every
//! snapshot, from confgen or from `Supervisor.Apply`) and confgen (its template's output) check
//! it with [`check`] before HAProxy sees the text.
//!
//! The text is read the way HAProxy 2.6 reads it ([`tokenize`]: words split on blanks, `#`
//! comments, single quotes, double quotes, backslash escapes), so no quoting or escaping hides
//! a keyword: `"global"`, `gl'o'bal` and `g\x6cobal` are all `global`. Environment variables,
//! which HAProxy expands inside double quotes, are refused outright: their values are not in
//! the text. What is refused, each with the line and the reason:
//!
//! - the `global` and `program` sections (the supervisor owns the first; the second runs
//!   commands), and the conditional and diagnostic directives (`.if`, `.diag`, ...);
//! - keywords that load code or files or run programs: `lua-load` and its kin, `external-check`
//!   (and `option external-check`), `ssl-engine`, `ssl-dh-param-file`, `h1-case-adjust-file`,
//!   `ca-base`, `crt-base`, `default-path`, `chroot`, `setenv` and its kin,
//!   `server-state-file(-name)`, `load-server-state-from-file` other than `global`/`none`,
//!   `stats socket`, `stats admin`, `filter spoe`/`filter opentracing`, any `lua.` action,
//!   fetch or service, `send-spoe-group`;
//! - the actions that let traffic rewrite map and ACL files (`set-map`, `del-map`, `add-acl`,
//!   `del-acl`) and process-wide variables (`set-var(proc.…)`, `set-var-fmt`, `unset-var`);
//! - Unix-socket, abstract-socket and inherited-fd addresses anywhere (`unix@`, `abns@`, `fd@`,
//!   `sockpair@`, `uxst@`, `uxdg@`), and paths as the address of a `server`, `bind`, `peer`,
//!   `nameserver`, `mailer` or `log` line (a `server /var/run/docker.sock` proxies to root);
//!   socket-only options on `bind` (`level`, `expose-fd`, `mode`, `uid`, `gid`, `user`, `group`);
//! - files: the argument of `crt`, `crt-list`, `ca-file`, `crl-file`, `ca-verify-file`,
//!   `ca-sign-file`, `issuers-chain-path`, `errorfile`, `file`/`lf-file` of `return` and
//!   `http-error`, `-f` of an ACL and the first argument of every `map` converter must be one of
//!   the snapshot's own map files (by bare name), or an absolute path inside one of the
//!   directories the operator allows ([`Policy::allowed_dirs`]).

use std::path::{Component, Path, PathBuf};

/// What a configuration may refer to beyond itself.
#[derive(Debug, Clone, Default)]
pub struct Policy<'a> {
    /// The snapshot's map files, referred to by bare name (`map(hosts.map)`).
    pub maps: Vec<&'a str>,
    /// Directories whose files a configuration may name (certificates, error pages).
    pub allowed_dirs: &'a [PathBuf],
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct Violation {
    /// 1-based line number.
    pub line: usize,
    /// What is not allowed there, and why.
    pub reason: String,
}

/// Checks every line of `config` against `policy`; the first violation is the answer.
pub fn check(config: &str, policy: &Policy<'_>) -> Result<(), Violation> {
    check_part(config, "", 0, policy).map(|_| ())
}

/// Checks a part of a configuration made of whole lines, which starts in section `section`
/// (the first word of the section's header, `""` before any) after `lines_before` lines.
/// Returns the section it ends in: a configuration cut into parts at line ends passes part by
/// part, each starting in the section the one before ended in, exactly when it passes whole.
pub fn check_part(
    part: &str,
    section: &'static str,
    lines_before: usize,
    policy: &Policy<'_>,
) -> Result<&'static str, Violation> {
    let mut section = section;
    let part = part.strip_suffix('\n').unwrap_or(part);
    if part.is_empty() {
        return Ok(section);
    }
    for (index, line) in part.split('\n').enumerate() {
        let violation = |reason: String| Violation {
            line: lines_before + index + 1,
            reason,
        };
        let words = tokenize(line).map_err(violation)?;
        let Some(first) = words.first() else {
            continue;
        };
        if let Some(name) = SECTIONS.iter().find(|s| **s == first.as_str()) {
            section = name;
        }
        check_words(&words, section, policy).map_err(violation)?;
    }
    Ok(section)
}

/// Words that start a section of an HAProxy configuration.
pub const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "peers",
    "resolvers",
    "userlist",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "fcgi-app",
    "log-forward",
];

/// Keywords refused wherever they appear as the first word of a line.
const DENIED: &[&str] = &[
    "global",
    "program",
    "lua-load",
    "lua-load-per-thread",
    "lua-prepend-path",
    "external-check",
    "ssl-engine",
    "ssl-dh-param-file",
    "h1-case-adjust-file",
    "ca-base",
    "crt-base",
    "default-path",
    "chroot",
    "setenv",
    "presetenv",
    "resetenv",
    "unsetenv",
    "server-state-file",
    "server-state-file-name",
    "insecure-fork-wanted",
    "insecure-setuid-wanted",
    "expose-experimental-directives",
];

/// Address prefixes of sockets that are not TCP/UDP over IP.
const LOCAL_SOCKETS: &[&str] = &["unix@", "abns@", "fd@", "sockpair@", "uxst@", "uxdg@"];

/// Keywords whose next word is a file.
const FILE_ARGUMENTS: &[&str] = &[
    "crt",
    "crt-list",
    "ca-file",
    "crl-file",
    "ca-verify-file",
    "ca-sign-file",
    "issuers-chain-path",
    "-f",
];

fn check_words(words: &[String], section: &str, policy: &Policy<'_>) -> Result<(), String> {
    let first = words[0].as_str();
    let lower = first.to_ascii_lowercase();
    if first.starts_with('.') {
        return Err(format!(
            "'{}': conditional and diagnostic directives are not allowed",
            printable(first)
        ));
    }
    if DENIED.contains(&lower.as_str()) {
        return Err(match lower.as_str() {
            "global" => "a 'global' section: the supervisor owns it".to_owned(),
            "program" => "a 'program' section runs commands".to_owned(),
            _ => format!("'{first}' loads files or code, or changes the process"),
        });
    }
    // HAProxy matches keywords as written; lower-cased here all the same, to refuse on the
    // safe side should any parser be lenient.
    let second = words
        .get(1)
        .map(|w| w.to_ascii_lowercase())
        .unwrap_or_default();
    match (lower.as_str(), second.as_str()) {
        ("option", "external-check") => return Err("'option external-check' runs programs".into()),
        ("stats", "socket" | "admin") => {
            return Err(format!("'stats {second}' opens a control interface"));
        }
        ("filter", "spoe" | "opentracing") => {
            return Err(format!("'filter {second}' loads a configuration file"));
        }
        ("load-server-state-from-file", arg) if arg != "global" && arg != "none" => {
            return Err("'load-server-state-from-file' may only be 'global' or 'none'".into());
        }
        ("errorfile", _) => {
            if let Some(path) = words.get(2) {
                allowed_file(path, policy, false)?;
            }
        }
        _ => {}
    }
    for word in words {
        check_word(word)?;
    }
    // Addresses: a path is a Unix socket.
    let address = match first {
        "bind" | "log" => Some(1),
        "server" | "peer" | "nameserver" | "mailer" => Some(2),
        "server-template" => Some(3),
        _ => None,
    };
    if let Some(address) = address.and_then(|i| words.get(i)) {
        let paths = address.split(',').any(|a| a.starts_with('/'));
        let log_target =
            first == "log" && matches!(address.as_str(), "global" | "stdout" | "stderr");
        if paths && !log_target {
            return Err(format!(
                "'{first}' with the address '{}': Unix sockets are not allowed",
                printable(address)
            ));
        }
    }
    if first == "bind"
        && let Some(option) = words[2.min(words.len())..].iter().find(|w| {
            matches!(
                w.as_str(),
                "level"
                    | "expose-fd"
                    | "mode"
                    | "uid"
                    | "gid"
                    | "user"
                    | "group"
                    | "severity-output"
            )
        })
    {
        return Err(format!("'bind ... {option}' is for control sockets"));
    }
    for (i, word) in words.iter().enumerate() {
        let next = words.get(i + 1);
        if FILE_ARGUMENTS.contains(&word.as_str())
            && let Some(path) = next
        {
            allowed_file(path, policy, word == "-f")?;
        }
        // `return ... file <path>` / `lf-file <path>`, also in `http-error` sections.
        let returns = words.iter().any(|w| w == "return") || first == "http-error";
        if matches!(word.as_str(), "file" | "lf-file")
            && (returns || section == "http-errors")
            && let Some(path) = next
        {
            allowed_file(path, policy, false)?;
        }
        for map in map_files(word) {
            allowed_file(map, policy, true)?;
        }
    }
    Ok(())
}

/// Rules for any word, wherever it stands.
fn check_word(word: &str) -> Result<(), String> {
    let lower = word.to_ascii_lowercase();
    // At the start of the word or of any of its comma-separated parts.
    if let Some(prefix) = LOCAL_SOCKETS
        .iter()
        .find(|p| lower.split(',').any(|part| part.starts_with(*p)))
    {
        return Err(format!(
            "'{}': {prefix} addresses (local sockets, inherited descriptors) are not allowed",
            printable(word)
        ));
    }
    if lower.starts_with("lua.") || lower.contains("[lua.") || lower.contains(",lua.") {
        return Err(format!("'{}': Lua is not allowed", printable(word)));
    }
    if lower == "send-spoe-group" {
        return Err("'send-spoe-group' talks to SPOE agents".into());
    }
    for action in ["set-map(", "del-map(", "add-acl(", "del-acl("] {
        if lower.starts_with(action) {
            return Err(format!(
                "'{}': traffic may not rewrite map or ACL files",
                printable(word)
            ));
        }
    }
    for var in ["set-var(proc.", "set-var-fmt(proc.", "unset-var(proc."] {
        if lower.contains(var) {
            return Err(format!(
                "'{}': process-wide variables are not allowed",
                printable(word)
            ));
        }
    }
    Ok(())
}

/// The file arguments of the map converters in `word`: `map(<file>...)`, `map_end(<file>...)`.
fn map_files(word: &str) -> Vec<&str> {
    let mut files = Vec::new();
    let bytes = word.as_bytes();
    let mut from = 0;
    while let Some(at) = word[from..].find("map") {
        let start = from + at;
        from = start + 3;
        // A whole name: not part of a longer word (`bitmap(`), `map` or `map_<suffix>`.
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        let rest = &word[start + 3..];
        let name_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let suffix = &rest[..name_len];
        if !(suffix.is_empty() || suffix.starts_with('_')) || !rest[name_len..].starts_with('(') {
            continue;
        }
        let args = &rest[name_len + 1..];
        let end = args.find([',', ')']).unwrap_or(args.len());
        files.push(&args[..end]);
    }
    files
}

/// Whether `path` may be read: one of the snapshot's maps by bare name (when `map_names`), or
/// an absolute path, without `..`, inside an allowed directory.
fn allowed_file(path: &str, policy: &Policy<'_>, map_names: bool) -> Result<(), String> {
    if map_names && policy.maps.contains(&path) {
        return Ok(());
    }
    let candidate = Path::new(path);
    let plain = candidate.is_absolute()
        && candidate
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if plain
        && policy
            .allowed_dirs
            .iter()
            .any(|dir| candidate.starts_with(dir) && candidate != dir)
    {
        return Ok(());
    }
    let allowed: Vec<String> = policy
        .allowed_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    Err(format!(
        "the file '{}' is neither one of the snapshot's maps nor inside an allowed directory ({})",
        printable(path),
        if allowed.is_empty() {
            "none is allowed".to_owned()
        } else {
            allowed.join(", ")
        }
    ))
}

/// `s` on one line, control characters escaped, for a message.
fn printable(s: &str) -> String {
    s.escape_default().to_string()
}

/// Splits one line into words as HAProxy 2.6's configuration parser does: blanks separate
/// words; `#` outside quotes starts a comment; single quotes keep everything literal; double
/// quotes keep blanks and `#` but not backslash escapes; a backslash outside single quotes
/// escapes a blank, `\`, `#`, `'`, `"` (and `$` inside double quotes), and makes `\t`, `\n`,
/// `\r` and `\xHH` control characters or bytes; any other backslash stays. A carriage return
/// or NUL ends the line. A `$` that HAProxy would expand (inside double quotes) is an error,
/// and so is a quote left open or a bad `\x`.
pub fn tokenize(line: &str) -> Result<Vec<String>, String> {
    let bytes = line.as_bytes();
    let mut words: Vec<Vec<u8>> = Vec::new();
    let mut word: Option<Vec<u8>> = None;
    let (mut squote, mut dquote) = (false, false);
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\0' | b'\n' | b'\r' => break,
            b'#' if !squote && !dquote => break,
            b'"' if !squote => {
                dquote = !dquote;
                word.get_or_insert_with(Vec::new);
                i += 1;
            }
            b'\'' if !dquote => {
                squote = !squote;
                word.get_or_insert_with(Vec::new);
                i += 1;
            }
            b'\\' if !squote => {
                let next = bytes.get(i + 1).copied();
                let (byte, used) = match next {
                    Some(b' ' | b'\\' | b'#' | b'\'' | b'"') => (next.unwrap_or(b'\\'), 2),
                    Some(b'$') if dquote => (b'$', 2),
                    Some(b't') => (b'\t', 2),
                    Some(b'n') => (b'\n', 2),
                    Some(b'r') => (b'\r', 2),
                    Some(b'x') => {
                        let hex = bytes
                            .get(i + 2..i + 4)
                            .and_then(|h| std::str::from_utf8(h).ok())
                            .and_then(|h| u8::from_str_radix(h, 16).ok());
                        match hex {
                            Some(byte) => (byte, 4),
                            None => return Err("an incomplete \\x escape".to_owned()),
                        }
                    }
                    _ => (b'\\', 1),
                };
                word.get_or_insert_with(Vec::new).push(byte);
                i += used;
            }
            b'$' if dquote => {
                return Err(
                    "an environment variable: their values are not part of the configuration"
                        .to_owned(),
                );
            }
            c if c.is_ascii_whitespace() && !squote && !dquote => {
                if let Some(done) = word.take() {
                    words.push(done);
                }
                i += 1;
            }
            c => {
                word.get_or_insert_with(Vec::new).push(c);
                i += 1;
            }
        }
    }
    if squote || dquote {
        return Err("a quote is left open".to_owned());
    }
    if let Some(done) = word.take() {
        words.push(done);
    }
    Ok(words
        .into_iter()
        .map(|w| String::from_utf8_lossy(&w).into_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn refused(config: &str) -> String {
        let dirs = [PathBuf::from("/etc/legate/files")];
        let policy = Policy {
            maps: vec!["hosts.map"],
            allowed_dirs: &dirs,
        };
        match check(config, &policy) {
            Err(violation) => violation.to_string(),
            Ok(()) => panic!("accepted: {config:?}"),
        }
    }

    fn accepted(config: &str) {
        let dirs = [PathBuf::from("/etc/legate/files")];
        let policy = Policy {
            maps: vec!["hosts.map", "wildcards.map"],
            allowed_dirs: &dirs,
        };
        if let Err(violation) = check(config, &policy) {
            panic!("refused {config:?}: {violation}");
        }
    }

    #[test]
    fn words_are_split_as_haproxy_splits_them() {
        let cases: &[(&str, &[&str])] = &[
            ("  bind   :80  # comment", &["bind", ":80"]),
            ("a\tb", &["a", "b"]),
            (r#""global""#, &["global"]),
            ("'glo'bal", &["global"]),
            (r#"g"lo"'b'al"#, &["global"]),
            (r"g\x6cobal", &["global"]),
            (r"a\ b c", &["a b", "c"]),
            (r"a\#b #c", &["a#b"]),
            (r#""a # b""#, &["a # b"]),
            (r"'a\x41'", &[r"a\x41"]),
            (r#""a\x41""#, &["aA"]),
            (r"a\qb", &[r"a\qb"]),
            (r#""a\"b""#, &[r#"a"b"#]),
            ("'' x", &["", "x"]),
            ("a$HOME", &["a$HOME"]),
            (r#""cost \$5""#, &["cost $5"]),
            ("a\rglobal", &["a"]),
            ("", &[]),
        ];
        for (line, words) in cases {
            assert_eq!(tokenize(line).unwrap(), *words, "{line:?}");
        }
        for bad in [r#""open"#, "'open", r"\x4", r#""$HOME""#, r#""${X}""#] {
            assert!(tokenize(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_built_in_shapes_pass() {
        accepted(
            "defaults\n    mode http\n    log global\n    load-server-state-from-file global\n\
             frontend http\n    bind 0.0.0.0:80\n    bind [::]:8080,127.0.0.1:81\n\
             \x20   http-request set-var(txn.legate_host) req.hdr(host),field(1,:),lower\n\
             \x20   use_backend %[var(txn.legate_host),map(hosts.map)] if { var(txn.legate_host),map(hosts.map) -m found }\n\
             \x20   use_backend %[var(txn.legate_host),map_end(wildcards.map)]\n\
             backend legate_no_route\n    http-request return status 503 content-type text/plain string \"no route\"\n\
             backend b\n    server s1 10.0.0.1:80 check\n    server s2 [fd00::1]:80 weight 5\n\
             listen svc\n    bind :3306\n    server s ipv4@10.0.0.1:3306\n\
             \x20   errorfile 503 /etc/legate/files/503.http\n    http-request set-var(sess.x) str(a)\n",
        );
    }

    #[test]
    fn every_dangerous_keyword_is_refused_however_it_is_quoted() {
        let attacks = [
            ("global", "global"),
            ("program", "program run\n    command id"),
            ("lua-load", "lua-load /tmp/x.lua"),
            ("lua-load-per-thread", "lua-load-per-thread /tmp/x.lua"),
            ("lua-prepend-path", "lua-prepend-path /tmp/?.lua"),
            ("external-check", "external-check command /bin/sh"),
            ("option external-check", "option external-check"),
            ("upper case", "OPTION External-Check"),
            ("stats admin upper", "Stats ADMIN if TRUE"),
            ("stats socket", "stats socket /tmp/s level admin"),
            ("stats admin", "stats admin if TRUE"),
            ("chroot", "chroot /"),
            ("setenv", "setenv X y"),
            ("default-path", "default-path origin"),
            ("ssl-engine", "ssl-engine rdrand"),
            (
                "server-state-file-name",
                "server-state-file-name /etc/shadow",
            ),
            (
                "load-server-state-from-file",
                "load-server-state-from-file local",
            ),
            ("filter spoe", "filter spoe config /tmp/spoe.conf"),
            (".if", ".if defined(X)"),
            (".diag", ".diag hello"),
            ("lua action", "http-request lua.run"),
            ("lua service", "http-request use-service lua.svc"),
            ("lua fetch", "http-request set-header X %[lua.f]"),
            ("send-spoe-group", "http-request send-spoe-group a b"),
            (
                "set-map",
                "http-request set-map(hosts.map) %[req.hdr(k)] %[req.hdr(v)]",
            ),
            ("del-acl", "http-request del-acl(/etc/x) %[src]"),
            ("proc var", "http-request set-var(proc.x) str(1)"),
            ("proc var fmt", "http-request set-var-fmt(proc.x) %[src]"),
            ("unix server", "server s /var/run/docker.sock"),
            ("unix@ server", "server s unix@/var/run/docker.sock"),
            ("abns server", "server s abns@x"),
            ("fd bind", "bind fd@3"),
            ("path bind", "bind /tmp/admin.sock"),
            ("bind list with unix", "bind :80,unix@/tmp/x"),
            ("sockpair", "bind sockpair@4"),
            ("log to a socket", "log /dev/log local0"),
            ("bind level", "bind :8080 level admin"),
            ("bind expose-fd", "bind :8080 expose-fd listeners"),
            (
                "return file",
                "http-request return status 200 file /etc/shadow",
            ),
            (
                "return lf-file",
                "http-response return lf-file /root/.ssh/id_rsa",
            ),
            ("http-error file", "http-error status 503 file /etc/passwd"),
            ("errorfile", "errorfile 503 /etc/shadow"),
            ("crt", "bind :443 ssl crt /root/key.pem"),
            ("ca-file", "server s 10.0.0.1:443 ssl ca-file /etc/ssl/x"),
            ("crt-list", "bind :443 ssl crt-list /tmp/l"),
            ("acl file", "acl bad src -f /etc/hosts"),
            (
                "map file",
                "http-request set-header X %[src,map(/etc/passwd)]",
            ),
            (
                "map_str file",
                "use_backend %[src,map_str(/proc/self/environ,x)]",
            ),
            ("dotdot", "errorfile 503 /etc/legate/files/../../shadow"),
            ("relative", "errorfile 503 503.http"),
            ("tcp-check unix", "tcp-check connect addr unix@/run/x"),
        ];
        for (name, line) in attacks {
            let reason = refused(&format!("backend b\n    {line}\n"));
            assert!(reason.starts_with("line 2: "), "{name}: {reason}");
        }
    }

    #[test]
    fn files_are_allowed_only_as_maps_or_inside_allowed_directories() {
        accepted("frontend f\n    bind :443 ssl crt /etc/legate/files/site.pem\n");
        accepted("backend b\n    errorfile 503 /etc/legate/files/503.http\n");
        accepted("backend b\n    http-request return status 200 file /etc/legate/files/ok.txt\n");
        accepted("frontend f\n    acl known hdr(host) -f hosts.map\n");
        accepted("frontend f\n    http-request set-header X %[src,bitmap(1)]\n");
        let reason = refused("frontend f\n    acl x src -f other.map\n");
        assert!(reason.contains("/etc/legate/files"), "{reason}");
        assert!(refused("backend b\n    errorfile 503 /etc/legate/files\n").contains("line 2"));
    }

    #[test]
    fn the_reason_names_the_line_and_what_it_is() {
        let reason = refused("defaults\n    mode http\n\"glob\"al\n    stats socket /tmp/s\n");
        assert_eq!(reason, "line 3: a 'global' section: the supervisor owns it");
        let reason = refused("frontend f\n    bind :80\n    server s /run/docker.sock\n");
        assert!(
            reason.starts_with("line 3: 'server' with the address"),
            "{reason}"
        );
    }

    /// `word` written with random quoting: each character alone, in single or double quotes,
    /// escaped, or as a `\x` byte.
    fn disguise(word: &str, styles: &[u8]) -> String {
        word.chars()
            .zip(styles.iter().cycle())
            .map(|(c, style)| match style % 5 {
                0 => c.to_string(),
                1 => format!("'{c}'"),
                2 => format!("\"{c}\""),
                3 if c.is_ascii_alphanumeric() => format!("\\x{:02x}", c as u32),
                3 => c.to_string(),
                // Characters a backslash turns into themselves; any other keeps it.
                _ if " \\#'\"".contains(c) => format!("\\{c}"),
                _ => c.to_string(),
            })
            .collect()
    }

    proptest! {
        /// No quoting or escaping of a refused keyword gets it through.
        #[test]
        fn disguised_keywords_are_refused(
            keyword in prop::sample::select(vec![
                "global", "program", "lua-load", "external-check", "chroot", "setenv",
                "ssl-engine", "default-path", "server-state-file-name",
            ]),
            styles in prop::collection::vec(any::<u8>(), 1..16),
            indent in "[ \t]{0,4}",
        ) {
            let line = format!("{indent}{} x", disguise(keyword, &styles));
            let words = tokenize(&line).unwrap();
            prop_assert_eq!(words[0].as_str(), keyword);
            let config = format!("defaults\n{line}\n");
            let dirs: [PathBuf; 0] = [];
            let policy = Policy { maps: vec![], allowed_dirs: &dirs };
            prop_assert!(check(&config, &policy).is_err());
        }

        /// Words written with any quoting come back as the words.
        #[test]
        fn quoting_round_trips(
            words in prop::collection::vec("[a-z0-9:/._-]{1,12}", 1..6),
            styles in prop::collection::vec(any::<u8>(), 1..16),
        ) {
            let line: Vec<String> = words.iter().map(|w| disguise(w, &styles)).collect();
            prop_assert_eq!(tokenize(&line.join(" ")).unwrap(), words);
        }

        /// No arbitrary line makes the tokenizer panic, and a refused one says why.
        #[test]
        fn any_line_is_judged(line in "\\PC{0,80}") {
            let dirs: [PathBuf; 0] = [];
            let _ = check(&line, &Policy { maps: vec![], allowed_dirs: &dirs });
        }
    }
}
