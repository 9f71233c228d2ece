//! Output (tables with colour on a terminal, or JSON) and the listing commands: `routes`,
//! `hosts`, `refused`, `status`.

use std::io::{IsTerminal, Write};

use legate_proto::v1;
use serde::Serialize;

use crate::fleet::Sources;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
}

/// When to colour tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Color {
    Auto,
    Always,
    Never,
}

/// How a cell reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tone {
    Plain,
    Good,
    Bad,
    Warn,
    Dim,
}

/// One table cell.
#[derive(Debug, Clone)]
pub(crate) struct Cell {
    text: String,
    tone: Tone,
}

impl Cell {
    pub(crate) fn new(text: impl AsRef<str>, tone: Tone) -> Self {
        Self {
            text: printable(text.as_ref()),
            tone,
        }
    }
}

impl<T: AsRef<str>> From<T> for Cell {
    fn from(text: T) -> Self {
        Cell::new(text, Tone::Plain)
    }
}

/// Text as a terminal may show it: control characters (a hostile key, a container's value)
/// escaped, never interpreted.
pub(crate) fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        text.to_owned()
    }
}

/// Where the output goes.
pub(crate) struct Out {
    pub(crate) format: Format,
    color: bool,
}

impl Out {
    pub(crate) fn new(format: Format, color: Color) -> Self {
        let color = match color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        };
        Self { format, color }
    }

    pub(crate) fn json(&mut self, value: &impl Serialize) {
        let mut stdout = std::io::stdout().lock();
        let _ = serde_json::to_writer_pretty(&mut stdout, value);
        let _ = writeln!(stdout);
    }

    pub(crate) fn line(&mut self, text: impl AsRef<str>) {
        let _ = writeln!(std::io::stdout().lock(), "{}", text.as_ref());
    }

    /// A line in a tone.
    pub(crate) fn toned(&mut self, text: impl AsRef<str>, tone: Tone) {
        let text = self.paint(&printable(text.as_ref()), tone);
        self.line(text);
    }

    /// A failure of one source: on stderr, so that stdout stays what was asked.
    pub(crate) fn warn(&self, text: impl AsRef<str>) {
        let text = self.paint(&format!("legate: {}", printable(text.as_ref())), Tone::Bad);
        let _ = writeln!(std::io::stderr().lock(), "{text}");
    }

    fn paint(&self, text: &str, tone: Tone) -> String {
        let code = match tone {
            _ if !self.color => return text.to_owned(),
            Tone::Plain => return text.to_owned(),
            Tone::Good => "32",
            Tone::Bad => "31",
            Tone::Warn => "33",
            Tone::Dim => "2",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }

    /// A table: columns as wide as their widest cell, the last one unpadded.
    pub(crate) fn table(&mut self, header: &[&str], rows: &[Vec<Cell>]) {
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.text.chars().count());
            }
        }
        let mut text = String::new();
        let last = header.len().saturating_sub(1);
        for (i, title) in header.iter().enumerate() {
            let pad = if i == last { 0 } else { widths[i] + 2 };
            text.push_str(&format!("{title:<pad$}"));
        }
        let mut lines = vec![text.trim_end().to_owned()];
        for row in rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let pad = if i == last {
                    0
                } else {
                    widths[i] + 2 - cell.text.chars().count()
                };
                line.push_str(&self.paint(&cell.text, cell.tone));
                line.push_str(&" ".repeat(pad));
            }
            lines.push(line.trim_end().to_owned());
        }
        for line in lines {
            self.line(line);
        }
    }
}

/// A server of a route, joined from etcd and this host's HAProxy.
#[derive(Debug, Serialize)]
struct ServerOut {
    host_id: String,
    container_name: String,
    container_id: String,
    address: String,
    /// HAProxy's state here; absent when the supervisor did not say.
    state: Option<String>,
    sessions: Option<u64>,
    check: Option<String>,
}

#[derive(Debug, Serialize)]
struct RouteOut {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_port: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    service_names: Vec<String>,
    /// The HAProxy backend that serves it here; absent when this host's HAProxy does not.
    backend: Option<String>,
    requests_per_second: Option<f64>,
    servers: Vec<ServerOut>,
}

/// The tone of an HAProxy server state.
pub(crate) fn state_tone(state: &str) -> Tone {
    match state.split_whitespace().next().unwrap_or_default() {
        "UP" | "no" => Tone::Good,
        "DOWN" => Tone::Bad,
        "MAINT" | "DRAIN" | "NOLB" => Tone::Warn,
        _ => Tone::Dim,
    }
}

fn servers_out(servers: &[v1::Server], live: Option<&v1::RouteTraffic>) -> Vec<ServerOut> {
    servers
        .iter()
        .map(|server| {
            let state = live.and_then(|r| r.servers.iter().find(|s| s.name == server.name));
            ServerOut {
                host_id: server.host_id.clone(),
                container_name: server.container_name.clone(),
                container_id: server.container_id.clone(),
                address: server.address.clone(),
                state: state.map(|s| s.state.clone()),
                sessions: state.map(|s| s.sessions_current),
                check: state.map(|s| s.check.clone()).filter(|c| !c.is_empty()),
            }
        })
        .collect()
}

/// `legate routes`.
pub(crate) async fn routes(sources: &Sources, filter: Option<&str>, out: &mut Out) -> bool {
    let fleet = match sources.registry().await {
        Ok(fleet) => fleet,
        Err(e) => {
            out.warn(format!("{e:#}"));
            return false;
        }
    };
    let live = sources.live_routes().await;
    let live = match live {
        Ok(live) => Some(live),
        Err(e) => {
            out.warn(format!("live states unknown: {e:#}"));
            None
        }
    };
    let live_routes = live
        .as_ref()
        .map(|l| l.routes.as_slice())
        .unwrap_or_default();
    let wanted = |texts: &[&str]| filter.is_none_or(|f| texts.iter().any(|t| t.contains(f)));
    let mut routes = Vec::new();
    for app in &fleet.model.apps {
        if !wanted(&[&app.domain]) {
            continue;
        }
        let here = live_routes.iter().find(|r| r.domains.contains(&app.domain));
        routes.push(RouteOut {
            kind: "app",
            domain: Some(app.domain.clone()),
            service_port: None,
            service_names: Vec::new(),
            backend: here.map(|r| r.backend.clone()),
            requests_per_second: here.map(|r| r.requests_per_second),
            servers: servers_out(&app.servers, here),
        });
    }
    for service in &fleet.model.services {
        let port = service.port.to_string();
        let mut texts: Vec<&str> = service.names.iter().map(String::as_str).collect();
        texts.push(&port);
        if !wanted(&texts) {
            continue;
        }
        let here = live_routes.iter().find(|r| r.service_port == service.port);
        routes.push(RouteOut {
            kind: "service",
            domain: None,
            service_port: Some(service.port),
            service_names: service.names.clone(),
            backend: here.map(|r| r.backend.clone()),
            requests_per_second: here.map(|r| r.requests_per_second),
            servers: servers_out(&service.servers, here),
        });
    }
    if out.format == Format::Json {
        out.json(&routes);
        return live.is_some();
    }
    let mut rows = Vec::new();
    for route in &routes {
        let name = match (&route.domain, route.service_port) {
            (Some(domain), _) => domain.clone(),
            (None, Some(port)) => format!(":{port} ({})", route.service_names.join(", ")),
            (None, None) => String::new(),
        };
        let backend = match &route.backend {
            Some(backend) => Cell::new(backend, Tone::Plain),
            None if live.is_some() => Cell::new("not here", Tone::Bad),
            None => Cell::new("?", Tone::Dim),
        };
        for server in &route.servers {
            let state = match &server.state {
                Some(state) => Cell::new(state, state_tone(state)),
                None if route.backend.is_some() => Cell::new("absent", Tone::Bad),
                None => Cell::new("?", Tone::Dim),
            };
            rows.push(vec![
                Cell::from(&name),
                backend.clone(),
                Cell::from(&server.host_id),
                Cell::from(&server.container_name),
                Cell::from(&server.address),
                state,
                Cell::from(server.sessions.map_or("-".to_owned(), |s| s.to_string())),
            ]);
        }
    }
    let header = [
        "ROUTE",
        "BACKEND",
        "HOST",
        "CONTAINER",
        "ADDRESS",
        "STATE",
        "SESSIONS",
    ];
    out.table(&header, &rows);
    if routes.is_empty() {
        out.toned("no routes in the registry", Tone::Dim);
    }
    live.is_some()
}

#[derive(Debug, Serialize)]
struct HostOut {
    host_id: String,
    ip: String,
    version: String,
    /// Seconds left on its lease; its keys vanish when it reaches 0.
    lease_ttl_left_s: Option<i64>,
    registrations: usize,
    refused: usize,
}

/// `legate hosts`.
pub(crate) async fn hosts(sources: &Sources, out: &mut Out) -> bool {
    let fleet = match sources.registry().await {
        Ok(fleet) => fleet,
        Err(e) => {
            out.warn(format!("{e:#}"));
            return false;
        }
    };
    let servers = fleet
        .model
        .apps
        .iter()
        .flat_map(|a| &a.servers)
        .chain(fleet.model.services.iter().flat_map(|s| &s.servers));
    let mut registrations = std::collections::HashMap::<&str, usize>::new();
    for server in servers {
        *registrations.entry(&server.host_id).or_default() += 1;
    }
    let hosts: Vec<HostOut> = fleet
        .hosts
        .iter()
        .map(|host| HostOut {
            host_id: host.record.host_id.clone(),
            ip: host.record.ip.clone(),
            version: host.record.version.clone(),
            lease_ttl_left_s: host.ttl_left,
            registrations: registrations
                .get(host.record.host_id.as_str())
                .copied()
                .unwrap_or(0),
            refused: fleet
                .refused
                .iter()
                .filter(|r| r.host_id == host.record.host_id)
                .count(),
        })
        .collect();
    if out.format == Format::Json {
        out.json(&hosts);
        return true;
    }
    let rows: Vec<Vec<Cell>> = hosts
        .iter()
        .map(|host| {
            let ttl = match host.lease_ttl_left_s {
                Some(ttl) if ttl > 0 => Cell::new(format!("{ttl}s"), Tone::Plain),
                Some(_) => Cell::new("expiring", Tone::Bad),
                None => Cell::new("?", Tone::Dim),
            };
            let refused = Cell::new(
                host.refused.to_string(),
                if host.refused > 0 {
                    Tone::Warn
                } else {
                    Tone::Plain
                },
            );
            vec![
                Cell::from(&host.host_id),
                Cell::from(&host.ip),
                Cell::from(&host.version),
                ttl,
                Cell::from(host.registrations.to_string()),
                refused,
            ]
        })
        .collect();
    let header = ["HOST", "IP", "VERSION", "LEASE", "REGISTRATIONS", "REFUSED"];
    out.table(&header, &rows);
    if hosts.is_empty() {
        out.toned("no registrar is alive in the registry", Tone::Dim);
    }
    true
}

#[derive(Debug, Serialize)]
struct RefusedOut {
    /// Who refused: `registrar@<host>`, `confgen`, `supervisor` (this host).
    source: String,
    /// What: a container, a key, a configuration section.
    subject: String,
    reason: String,
}

/// `legate refused`.
pub(crate) async fn refused(sources: &Sources, out: &mut Out) -> bool {
    let (fleet, confgen, supervisor) =
        tokio::join!(sources.registry(), sources.confgen(), sources.supervisor());
    let mut complete = true;
    let mut refused = Vec::new();
    match &fleet {
        Ok(fleet) => refused.extend(fleet.refused.iter().map(|r| RefusedOut {
            source: format!("registrar@{}", r.host_id),
            subject: r.refusal.container_name.as_ref().map_or_else(
                || legate_proto::short_id(&r.container_id).to_owned(),
                |n| n.to_string(),
            ),
            reason: r.refusal.reason.clone(),
        })),
        Err(e) => {
            complete = false;
            out.warn(format!("{e:#}"));
        }
    }
    // confgen says what it skipped, with its own reasons (templates, reserved ports); without
    // it, what this tool reads from etcd by the same rules.
    let skipped = match (&confgen, &fleet) {
        (Ok(status), _) => Some(("confgen", &status.skipped)),
        (Err(e), Ok(fleet)) => {
            complete = false;
            out.warn(format!("{e:#} (skipped keys below as read from etcd)"));
            Some(("registry", &fleet.model.skipped))
        }
        (Err(e), Err(_)) => {
            out.warn(format!("{e:#}"));
            None
        }
    };
    if let Some((source, skipped)) = skipped {
        refused.extend(skipped.iter().map(|s| RefusedOut {
            source: source.to_owned(),
            subject: legate_confgen::model::printable(&s.key),
            reason: s.reason.clone(),
        }));
    }
    match &supervisor {
        Ok(status) => refused.extend(status.refused_listeners.iter().map(|l| RefusedOut {
            source: "supervisor".to_owned(),
            subject: "listener".to_owned(),
            reason: l.clone(),
        })),
        Err(e) => {
            complete = false;
            out.warn(format!("{e:#}"));
        }
    }
    if out.format == Format::Json {
        out.json(&refused);
        return complete;
    }
    let rows: Vec<Vec<Cell>> = refused
        .iter()
        .map(|r| {
            vec![
                Cell::from(&r.source),
                Cell::from(&r.subject),
                Cell::new(&r.reason, Tone::Warn),
            ]
        })
        .collect();
    out.table(&["SOURCE", "SUBJECT", "REASON"], &rows);
    if refused.is_empty() {
        out.toned("nothing refused", Tone::Good);
    }
    complete
}

#[derive(Debug, Serialize)]
struct ConfgenOut {
    version: u64,
    checksum: String,
    last_render_error: String,
    skipped_keys: usize,
}

#[derive(Debug, Serialize)]
struct NodeOut {
    node_id: String,
    /// current, stale (runs another configuration than confgen's), failing (its last apply
    /// was rejected), or disconnected.
    state: &'static str,
    connected: bool,
    running_version: u64,
    running_checksum: String,
    last_outcome: String,
    last_message: String,
    reported_s_ago: Option<i64>,
}

#[derive(Debug, Serialize)]
struct SupervisorOut {
    running_version: u64,
    running_checksum: String,
    reloads: u64,
    runtime_applies: u64,
    rejected: u64,
    workers: u32,
    master_pid: u32,
    haproxy_uptime_s: u64,
    last_error: String,
    refused_listeners: Vec<String>,
}

#[derive(Debug, Serialize)]
struct StatusOut {
    confgen: Option<ConfgenOut>,
    nodes: Vec<NodeOut>,
    /// This host's supervisor.
    supervisor: Option<SupervisorOut>,
}

/// `legate status`.
pub(crate) async fn status(sources: &Sources, out: &mut Out) -> bool {
    let (confgen, supervisor) = tokio::join!(sources.confgen(), sources.supervisor());
    let now = legate_proto::unix_ms(std::time::SystemTime::now());
    let mut status = StatusOut {
        confgen: None,
        nodes: Vec::new(),
        supervisor: None,
    };
    let mut complete = true;
    match confgen {
        Ok(confgen) => {
            status.nodes = confgen
                .nodes
                .iter()
                .map(|node| NodeOut {
                    node_id: node.node_id.clone(),
                    state: legate_proto::node_state(node, &confgen.checksum),
                    connected: node.connected,
                    running_version: node.running_version,
                    running_checksum: node.running_checksum.clone(),
                    last_outcome: legate_proto::outcome_name(node.last_result.as_ref()).to_owned(),
                    last_message: node
                        .last_result
                        .as_ref()
                        .map(|r| r.message.clone())
                        .unwrap_or_default(),
                    reported_s_ago: (node.reported_at_unix_ms > 0)
                        .then(|| (now - node.reported_at_unix_ms).max(0) / 1000),
                })
                .collect();
            status.confgen = Some(ConfgenOut {
                version: confgen.version,
                skipped_keys: confgen.skipped.len(),
                checksum: confgen.checksum,
                last_render_error: confgen.last_render_error,
            });
        }
        Err(e) => {
            complete = false;
            out.warn(format!("{e:#}"));
        }
    }
    match supervisor {
        Ok(s) => {
            status.supervisor = Some(SupervisorOut {
                running_version: s.running_version,
                running_checksum: s.running_checksum,
                reloads: s.reloads,
                runtime_applies: s.runtime_applies,
                rejected: s.rejected,
                workers: s.workers,
                master_pid: s.master_pid,
                haproxy_uptime_s: s.haproxy_uptime_s,
                last_error: s.last_error,
                refused_listeners: s.refused_listeners,
            });
        }
        Err(e) => {
            complete = false;
            out.warn(format!("{e:#}"));
        }
    }
    if out.format == Format::Json {
        out.json(&status);
        return complete;
    }
    if let Some(confgen) = &status.confgen {
        let rendered = if confgen.last_render_error.is_empty() {
            Cell::new("rendering", Tone::Good)
        } else {
            Cell::new(
                format!("last render failed: {}", confgen.last_render_error),
                Tone::Bad,
            )
        };
        out.line(format!(
            "confgen: version {}, {}, {} skipped keys, {}",
            confgen.version,
            legate_proto::short_checksum(&confgen.checksum),
            confgen.skipped_keys,
            out.paint(&rendered.text, rendered.tone),
        ));
        let rows: Vec<Vec<Cell>> = status
            .nodes
            .iter()
            .map(|node| {
                let tone = match node.state {
                    "current" => Tone::Good,
                    "disconnected" => Tone::Warn,
                    _ => Tone::Bad,
                };
                let result = if node.last_message.is_empty() || node.last_outcome != "rejected" {
                    node.last_outcome.clone()
                } else {
                    format!("{}: {}", node.last_outcome, node.last_message)
                };
                vec![
                    Cell::from(&node.node_id),
                    Cell::new(node.state, tone),
                    Cell::from(node.running_version.to_string()),
                    Cell::from(legate_proto::short_checksum(&node.running_checksum)),
                    Cell::new(result, tone),
                    Cell::from(
                        node.reported_s_ago
                            .map_or("never".to_owned(), |s| format!("{s}s ago")),
                    ),
                ]
            })
            .collect();
        let header = [
            "NODE",
            "STATE",
            "RUNNING",
            "CHECKSUM",
            "LAST APPLY",
            "REPORTED",
        ];
        out.table(&header, &rows);
    }
    if let Some(s) = &status.supervisor {
        out.line(format!(
            "supervisor (this host): running version {}, {}; {} reloads, {} runtime applies, \
             {} rejected; HAProxy pid {}, {} worker(s), up {}s",
            s.running_version,
            legate_proto::short_checksum(&s.running_checksum),
            s.reloads,
            s.runtime_applies,
            s.rejected,
            s.master_pid,
            s.workers,
            s.haproxy_uptime_s
        ));
        if !s.last_error.is_empty() {
            out.toned(format!("  last error: {}", s.last_error), Tone::Bad);
        }
        for listener in &s.refused_listeners {
            out.toned(format!("  refused: {listener}"), Tone::Warn);
        }
    }
    complete
}
