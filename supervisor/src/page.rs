//! The status page, served read-only at `/` on the supervisor's metrics listener: this host's
//! routes with their servers' live states and request rates, and the fleet as confgen sees it
//! (every node's applied version, the live registrars, what was refused). Plain HTML with
//! inline styles: no script, nothing fetched from elsewhere, so it works offline and behind
//! any proxy; it refreshes itself every few seconds.
//!
//! The fleet's part comes from `Confgen.Status`, asked every `--stats-interval` like HAProxy's
//! counters ([`follow_confgen`]); a page request only reads what was gathered.

use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use legate_proto::runtime;
use legate_proto::v1;
use legate_proto::web::Page;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::debug;

use crate::apply::Stats;
use crate::traffic::{self, Traffic};

/// How long confgen may take to answer `Status`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// confgen's view of the fleet, as last asked.
#[derive(Debug, Default)]
pub struct Fleet {
    status: Option<v1::ConfgenStatus>,
    /// Why the last question failed; empty when it did not.
    error: String,
    /// Whether there is a confgen to ask (`--confgen none`: snapshots come from `Apply` only).
    follows: bool,
}

/// Asks confgen for its status every `interval` until `shutdown`.
pub async fn follow_confgen(
    channel: Channel,
    fleet: Arc<Mutex<Fleet>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut client = v1::confgen_client::ConfgenClient::new(channel);
    loop {
        let asked =
            tokio::time::timeout(STATUS_TIMEOUT, client.status(v1::ConfgenStatusRequest {}))
                .await
                .map_err(|_| "confgen did not answer within 2 s".to_owned())
                .and_then(|r| r.map_err(|e| runtime::error_chain(&e)));
        {
            let mut fleet = fleet.lock().unwrap_or_else(|e| e.into_inner());
            fleet.follows = true;
            match asked {
                Ok(status) => {
                    fleet.status = Some(status.into_inner());
                    fleet.error.clear();
                }
                Err(e) => {
                    debug!(error = %e, "confgen's status");
                    fleet.error = e;
                }
            }
        }
        if !runtime::pause(interval, &shutdown).await {
            return;
        }
    }
}

/// What the supervisor serves on its metrics listener besides its own metrics.
pub struct Pages {
    pub node_id: String,
    pub traffic: Arc<Mutex<Traffic>>,
    pub stats: tokio::sync::watch::Receiver<Stats>,
    pub fleet: Arc<Mutex<Fleet>>,
    pub refresh: Duration,
}

impl legate_proto::web::Pages for Pages {
    fn metrics(&self, out: &mut String) {
        lock(&self.traffic).metrics(out);
    }

    fn page(&self, path: &str) -> Option<Page> {
        (path == "/").then(|| Page {
            content_type: "text/html; charset=utf-8",
            body: self.render().into_bytes(),
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Text as HTML shows it, never as markup.
fn html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push_str(&c.escape_default().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// The CSS class of an HAProxy server state, or a node state.
fn tone(state: &str) -> &'static str {
    match traffic::state_kind(state) {
        "up" => "good",
        "down" => "bad",
        "maint" | "drain" => "warn",
        _ => match state {
            "current" => "good",
            "stale" | "failing" => "bad",
            "disconnected" => "warn",
            _ => "dim",
        },
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em;margin:0}h2{font-size:1.1em;margin:1.5em 0 .4em}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;\
border-bottom:1px solid #ddd;vertical-align:top}th{background:#f4f4f4}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
.state{display:inline-block;padding:0 .4em;margin:0 .3em .2em 0;border-radius:3px;white-space:nowrap}\
.good{background:#d9f2d9}.bad{background:#f8d0d0}.warn{background:#fbeec1}.dim{background:#eee}\
.empty{color:#777}p.note{color:#555;margin:.2em 0}code{font-size:.95em}footer{margin-top:1.5em}";

impl Pages {
    fn render(&self) -> String {
        let routes = lock(&self.traffic).routes();
        let stats = self.stats.borrow().clone();
        let (status, fleet_error, follows) = {
            let fleet = lock(&self.fleet);
            (fleet.status.clone(), fleet.error.clone(), fleet.follows)
        };
        let mut page = String::with_capacity(16 << 10);
        let _ = write!(
            page,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"{refresh}\">\
             <meta name=\"viewport\" content=\"width=device-width\">\
             <title>legate · {node}</title><style>{STYLE}</style></head><body>\
             <header id=\"summary\"><h1>legate · {node}</h1>",
            refresh = self.refresh.as_secs().max(1),
            node = html(&self.node_id),
        );
        let _ = write!(
            page,
            "<p class=\"note\">HAProxy pid {pid}, up {uptime} s · running version {version} \
             <code>{checksum}</code> · {reloads} reloads, {runtime} runtime applies, \
             {rejected} rejected</p>",
            pid = stats.master_pid,
            uptime = stats.started.map_or(0, |s| s.elapsed().as_secs()),
            version = stats.running_version,
            checksum = html(legate_proto::short_checksum(&stats.running_checksum)),
            reloads = stats.reloads,
            runtime = stats.runtime_applies,
            rejected = stats.rejected,
        );
        if !stats.last_error.is_empty() {
            let _ = write!(
                page,
                "<p class=\"note\"><span class=\"state bad\">last error</span>{}</p>",
                html(&stats.last_error)
            );
        }
        page.push_str("</header>");
        routes_section(&mut page, &routes);
        match (&status, follows) {
            (Some(status), _) => {
                if !fleet_error.is_empty() {
                    let _ = write!(
                        page,
                        "<p class=\"note\"><span class=\"state warn\">confgen</span>does not \
                         answer now ({}); the fleet below is as it last said.</p>",
                        html(&fleet_error)
                    );
                }
                fleet_sections(&mut page, status, &stats.refused_listeners);
            }
            (None, true) => {
                let _ = write!(
                    page,
                    "<h2>Fleet</h2><p class=\"note\"><span class=\"state bad\">confgen</span>\
                     has not answered yet: {}</p>",
                    html(if fleet_error.is_empty() {
                        "asking"
                    } else {
                        &fleet_error
                    })
                );
            }
            (None, false) => page.push_str(
                "<h2>Fleet</h2><p class=\"note\">This supervisor follows no confgen \
                 (<code>--confgen none</code>).</p>",
            ),
        }
        let _ = write!(
            page,
            "<footer><p class=\"note\">Counters as of the last poll of HAProxy \
             ({polled}); this page refreshes every {refresh} s. \
             <a href=\"/metrics\">Prometheus metrics</a></p></footer></body></html>",
            polled = if routes.error.is_empty() {
                let now = legate_proto::unix_ms(SystemTime::now());
                format!(
                    "{:.1} s ago",
                    (now - routes.polled_at_unix_ms) as f64 / 1000.0
                )
            } else {
                format!("the last poll failed: {}", html(&routes.error))
            },
            refresh = self.refresh.as_secs().max(1),
        );
        page
    }
}

fn routes_section(page: &mut String, routes: &v1::RoutesResponse) {
    page.push_str(
        "<section id=\"routes\"><h2>Routes on this host</h2><table><thead><tr><th>Route</th>\
         <th>Backend</th><th>Requests/s</th><th>Requests</th><th>5xx</th><th>Errors</th>\
         <th>Servers</th></tr></thead><tbody>",
    );
    for route in &routes.routes {
        let name = if route.service_port != 0 {
            format!(":{}", route.service_port)
        } else {
            route.domains.join(", ")
        };
        let mut servers = String::new();
        for server in &route.servers {
            let _ = write!(
                servers,
                "<span class=\"state {tone}\" title=\"{check}\">{address} {state} · {sessions}</span>",
                tone = tone(&server.state),
                check = html(&server.check),
                address = html(&server.address),
                state = html(&server.state),
                sessions = server.sessions_current,
            );
        }
        if servers.is_empty() {
            servers.push_str("<span class=\"empty\">no server</span>");
        }
        let _ = write!(
            page,
            "<tr data-route=\"{route_attr}\"><td>{name}</td><td><code>{backend}</code></td>\
             <td class=\"n\">{rate:.1}</td><td class=\"n\">{total}</td><td class=\"n\">{errors5}</td>\
             <td class=\"n\">{errors}</td><td>{servers}</td></tr>",
            route_attr = html(&name),
            name = html(&name),
            backend = html(&route.backend),
            rate = route.requests_per_second,
            total = route.requests_total,
            errors5 = route.responses.get(4).copied().unwrap_or(0),
            errors = route.connection_errors_total + route.response_errors_total,
        );
    }
    if routes.routes.is_empty() {
        page.push_str("<tr><td colspan=\"7\" class=\"empty\">no route yet</td></tr>");
    }
    page.push_str("</tbody></table></section>");
}

fn fleet_sections(page: &mut String, status: &v1::ConfgenStatus, listeners: &[String]) {
    let _ = write!(
        page,
        "<section id=\"nodes\"><h2>Nodes</h2><p class=\"note\">confgen's version {} \
         <code>{}</code>{}</p><table><thead><tr><th>Node</th><th>State</th><th>Running</th>\
         <th>Last apply</th></tr></thead><tbody>",
        status.version,
        html(legate_proto::short_checksum(&status.checksum)),
        if status.last_render_error.is_empty() {
            String::new()
        } else {
            format!(
                " · <span class=\"state bad\">last render failed</span>{}",
                html(&status.last_render_error)
            )
        },
    );
    for node in &status.nodes {
        let state = legate_proto::node_state(node, &status.checksum);
        let outcome = legate_proto::outcome_name(node.last_result.as_ref());
        let message = node
            .last_result
            .as_ref()
            .filter(|_| outcome == "rejected")
            .map(|r| format!(": {}", r.message))
            .unwrap_or_default();
        let _ = write!(
            page,
            "<tr data-node=\"{id}\"><td>{id}</td><td><span class=\"state {tone}\">{state}</span>\
             </td><td>{version} <code>{checksum}</code></td><td>{outcome}{message}</td></tr>",
            id = html(&node.node_id),
            tone = tone(state),
            version = node.running_version,
            checksum = html(legate_proto::short_checksum(&node.running_checksum)),
            message = html(&message),
        );
    }
    page.push_str("</tbody></table></section>");

    page.push_str(
        "<section id=\"hosts\"><h2>Hosts</h2><table><thead><tr><th>Host</th><th>IP</th>\
         <th>Version</th><th>Refused</th></tr></thead><tbody>",
    );
    for host in &status.hosts {
        let refused = status
            .refused
            .iter()
            .filter(|r| r.host_id == host.host_id)
            .count();
        let _ = write!(
            page,
            "<tr data-host=\"{id}\"><td>{id}</td><td>{ip}</td><td>{version}</td>\
             <td class=\"n\">{refused}</td></tr>",
            id = html(&host.host_id),
            ip = html(&host.ip),
            version = html(&host.version),
        );
    }
    if status.hosts.is_empty() {
        page.push_str("<tr><td colspan=\"4\" class=\"empty\">no live registrar</td></tr>");
    }
    page.push_str("</tbody></table></section>");

    page.push_str(
        "<section id=\"refused\"><h2>Refused</h2><table><thead><tr><th>Source</th>\
         <th>Subject</th><th>Reason</th></tr></thead><tbody>",
    );
    let mut rows = 0;
    for refusal in &status.refused {
        let subject = if refusal.container_name.is_empty() {
            legate_proto::short_id(&refusal.container_id)
        } else {
            &refusal.container_name
        };
        refused_row(
            page,
            &format!("registrar@{}", refusal.host_id),
            subject,
            &refusal.reason,
        );
        rows += 1;
    }
    for skipped in &status.skipped {
        let key = String::from_utf8_lossy(&skipped.key);
        refused_row(page, "confgen", &key, &skipped.reason);
        rows += 1;
    }
    for listener in listeners {
        refused_row(page, "supervisor", "listener", listener);
        rows += 1;
    }
    if rows == 0 {
        page.push_str("<tr><td colspan=\"3\" class=\"empty\">nothing refused</td></tr>");
    }
    page.push_str("</tbody></table></section>");
}

fn refused_row(page: &mut String, source: &str, subject: &str, reason: &str) {
    let _ = write!(
        page,
        "<tr><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
        html(source),
        html(subject),
        html(reason)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_from_the_registry_becomes_markup() {
        assert_eq!(
            html("<script>alert('x')</script> & \"q\"\n"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;\\n"
        );
        let status = v1::ConfgenStatus {
            refused: vec![v1::HostRefusal {
                host_id: "h".to_owned(),
                container_id: "c".repeat(64),
                container_name: "<img src=x onerror=alert(1)>".to_owned(),
                reason: "DOMAIN_NAME '<b>'".to_owned(),
            }],
            skipped: vec![v1::SkippedKey {
                key: b"/apps/</td><script>/x".to_vec(),
                reason: "bad".to_owned(),
            }],
            ..Default::default()
        };
        let mut page = String::new();
        fleet_sections(&mut page, &status, &[]);
        assert!(!page.contains("<img") && !page.contains("<script") && !page.contains("<b>"));
        assert!(
            page.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{page}"
        );
    }
}
