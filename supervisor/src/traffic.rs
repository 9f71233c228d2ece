//! Each route's traffic, as an operator names the route: by its domain or its service port.
//!
//! HAProxy counts per backend, and a pooled backend's name (`slot_17`) says nothing about the
//! domain it serves, which changes as domains come and go. Every `--stats-interval` the poller
//! reads `show info` (which worker answers) and `show stat` (backends and servers) on the admin
//! socket, and [`Traffic::update`] folds the counters into per-route totals:
//!
//! - a backend's route is read from the configuration that runs ([`routes`]): the keys of the
//!   map files that point at it are its domains, a `listen` section's one port is its service;
//! - totals stay monotonic across reloads (a new worker counts from zero: what it counted is
//!   all new) and across a slot changing hands (what the slot counted meanwhile is given to
//!   nobody, never to the wrong domain);
//! - a route that goes away takes its series with it.
//!
//! The totals are served as Prometheus series on the metrics listener ([`Traffic::metrics`]),
//! to `Supervisor.Routes` with the servers' live states, and to the status page.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use legate_proto::runtime;
use legate_proto::v1::{self, ConfigFile, ConfigSnapshot};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::diff::words;
use crate::haproxy;
use crate::listeners;

/// Replaced workers remembered.
const RETIRED: usize = 16;

/// What one backend serves, read from the configuration that runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// Host names routed to it by the map files, sorted; a wildcard as `*.suffix`.
    pub domains: Vec<String>,
    /// The port of a `listen` section (a TCP service); 0 otherwise.
    pub service_port: u16,
}

/// A route's identity in the series: its service port, or its domains.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Label {
    Domain(String),
    Port(u16),
}

impl Route {
    fn label(&self) -> Option<Label> {
        if self.service_port != 0 {
            Some(Label::Port(self.service_port))
        } else if self.domains.is_empty() {
            None
        } else {
            Some(Label::Domain(self.domains.join(",")))
        }
    }
}

/// The routes of a configuration, by backend name: every backend or `listen` section that a
/// map entry points at or that listens on one port. Backends serving nothing (free pooled
/// backends, a no-route backend) are absent.
pub fn routes(config: &str, maps: &[ConfigFile]) -> BTreeMap<String, Route> {
    let backends: BTreeSet<&str> = config
        .lines()
        .filter_map(|line| {
            let mut words = words(line);
            match (words.next(), words.next()) {
                (Some("backend" | "listen"), Some(name)) => Some(name),
                _ => None,
            }
        })
        .collect();
    let mut routes: BTreeMap<String, Route> = BTreeMap::new();
    for map in maps {
        for line in map.content.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            if key.starts_with('#') || !backends.contains(value) {
                continue;
            }
            let domain = if key.starts_with('.') {
                format!("*{key}")
            } else {
                key.to_owned()
            };
            routes
                .entry(value.to_owned())
                .or_default()
                .domains
                .push(domain);
        }
    }
    for route in routes.values_mut() {
        route.domains.sort();
        route.domains.dedup();
    }
    for (name, port) in listeners::listen_ports(config) {
        routes.entry(name.to_owned()).or_default().service_port = port;
    }
    routes
}

/// HAProxy's cumulative counters of one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    /// HTTP requests (`req_tot`), or connections (`stot`) for a TCP backend.
    requests: u64,
    /// HTTP responses: 1xx, 2xx, 3xx, 4xx, 5xx, other.
    responses: [u64; 6],
    connection_errors: u64,
    response_errors: u64,
    retries: u64,
    redispatches: u64,
    bytes_in: u64,
    bytes_out: u64,
}

impl Counters {
    fn fields(&mut self) -> [&mut u64; 13] {
        let [r1, r2, r3, r4, r5, ro] = &mut self.responses;
        [
            &mut self.requests,
            r1,
            r2,
            r3,
            r4,
            r5,
            ro,
            &mut self.connection_errors,
            &mut self.response_errors,
            &mut self.retries,
            &mut self.redispatches,
            &mut self.bytes_in,
            &mut self.bytes_out,
        ]
    }

    /// What was counted since `before` (a counter that went back counts from zero).
    fn since(mut self, mut before: Counters) -> Counters {
        for (now, then) in self.fields().into_iter().zip(before.fields()) {
            if *now >= *then {
                *now -= *then;
            }
        }
        self
    }

    fn add(&mut self, mut delta: Counters) {
        for (total, more) in self.fields().into_iter().zip(delta.fields()) {
            *total = total.saturating_add(*more);
        }
    }
}

/// One backend row of `show stat`.
#[derive(Debug, Clone, Default, PartialEq)]
struct BackendRow {
    name: String,
    counters: Counters,
    sessions: u64,
    queue: u64,
    response_time_ms: u32,
    queue_time_ms: u32,
}

/// One server row of `show stat`.
#[derive(Debug, Clone, Default, PartialEq)]
struct ServerRow {
    backend: String,
    state: v1::ServerState,
}

/// `show stat` of backends and servers, parsed by its header's column names.
#[derive(Debug, Default)]
struct Stat {
    backends: Vec<BackendRow>,
    servers: Vec<ServerRow>,
}

impl Stat {
    fn parse(csv: &str) -> Result<Stat, String> {
        let mut lines = csv.lines();
        let header = lines
            .next()
            .and_then(|line| line.strip_prefix("# "))
            .ok_or_else(|| format!("not a stat header: {:?}", csv.lines().next()))?;
        let columns: HashMap<&str, usize> = header
            .split(',')
            .enumerate()
            .map(|(i, name)| (name, i))
            .collect();
        let column = |name: &str| {
            columns
                .get(name)
                .copied()
                .ok_or_else(|| format!("show stat has no column '{name}'"))
        };
        let [
            pxname,
            svname,
            stot,
            scur,
            qcur,
            bin,
            bout,
            econ,
            eresp,
            wretr,
            wredis,
            status,
        ] = [
            "pxname", "svname", "stot", "scur", "qcur", "bin", "bout", "econ", "eresp", "wretr",
            "wredis", "status",
        ]
        .map(column);
        let [req_tot, rtime, qtime, addr, check_status, weight] = [
            "req_tot",
            "rtime",
            "qtime",
            "addr",
            "check_status",
            "weight",
        ]
        .map(column);
        let hrsp = [
            "hrsp_1xx",
            "hrsp_2xx",
            "hrsp_3xx",
            "hrsp_4xx",
            "hrsp_5xx",
            "hrsp_other",
        ]
        .map(column);
        let (pxname, svname, stot, scur, qcur, bin, bout, econ, eresp, wretr, wredis, status) = (
            pxname?, svname?, stot?, scur?, qcur?, bin?, bout?, econ?, eresp?, wretr?, wredis?,
            status?,
        );
        let (req_tot, rtime, qtime, addr, check_status, weight) =
            (req_tot?, rtime?, qtime?, addr?, check_status?, weight?);
        let hrsp: Vec<usize> = hrsp.into_iter().collect::<Result<_, _>>()?;

        let mut stat = Stat::default();
        for line in lines.filter(|l| !l.is_empty()) {
            let fields: Vec<&str> = line.split(',').collect();
            let text = |i: usize| fields.get(i).copied().unwrap_or_default();
            let number = |i: usize| text(i).parse::<u64>().unwrap_or(0);
            if text(svname) == "BACKEND" {
                let mut responses = [0; 6];
                for (count, &i) in responses.iter_mut().zip(&hrsp) {
                    *count = number(i);
                }
                // TCP backends have no request counter: a connection is their request.
                let requests = if text(req_tot).is_empty() {
                    number(stot)
                } else {
                    number(req_tot)
                };
                stat.backends.push(BackendRow {
                    name: text(pxname).to_owned(),
                    counters: Counters {
                        requests,
                        responses,
                        connection_errors: number(econ),
                        response_errors: number(eresp),
                        retries: number(wretr),
                        redispatches: number(wredis),
                        bytes_in: number(bin),
                        bytes_out: number(bout),
                    },
                    sessions: number(scur),
                    queue: number(qcur),
                    response_time_ms: u32::try_from(number(rtime)).unwrap_or(u32::MAX),
                    queue_time_ms: u32::try_from(number(qtime)).unwrap_or(u32::MAX),
                });
            } else if text(svname) != "FRONTEND" {
                stat.servers.push(ServerRow {
                    backend: text(pxname).to_owned(),
                    state: v1::ServerState {
                        name: text(svname).to_owned(),
                        address: text(addr).to_owned(),
                        state: text(status).to_owned(),
                        sessions_current: number(scur),
                        sessions_total: number(stot),
                        check: text(check_status).trim_start_matches('*').to_owned(),
                        weight: u32::try_from(number(weight)).unwrap_or(u32::MAX),
                    },
                });
            }
        }
        Ok(stat)
    }
}

/// The pid of the worker that answered `show info`.
fn worker_pid(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// The kind of a server's state, for `legate_route_servers{state}`: `up`, `down`, `maint`,
/// `drain` or `other`.
pub fn state_kind(state: &str) -> &'static str {
    match state.split_whitespace().next().unwrap_or_default() {
        "UP" | "no" => "up",
        "DOWN" => "down",
        "MAINT" => "maint",
        "DRAIN" | "NOLB" => "drain",
        _ => "other",
    }
}

/// One route as the last poll saw it.
#[derive(Debug, Clone)]
struct Entry {
    label: Label,
    /// Counted since the supervisor started or the route appeared.
    totals: Counters,
    view: v1::RouteTraffic,
}

/// The per-route totals, and what the last poll saw.
#[derive(Debug, Default)]
pub struct Traffic {
    /// The worker whose counters were read last.
    worker: Option<u32>,
    /// Workers replaced since (the last few): one still answering in a reload's overlap
    /// shows counters already folded in.
    retired: VecDeque<u32>,
    /// Each backend's counters at the last poll, and the route they were counted for.
    last: HashMap<String, (Option<Label>, Counters)>,
    /// The routes of the last poll, ordered by backend.
    entries: Vec<Entry>,
    polled_at: Option<SystemTime>,
    polled: Option<Instant>,
    error: String,
}

impl Traffic {
    /// Folds one poll in: `worker` answered, `stat` is what it counts, `routes` what each
    /// backend serves in the configuration that runs; the poll began at `now` (`wall`).
    fn update(
        &mut self,
        worker: Option<u32>,
        stat: Stat,
        routes: &BTreeMap<String, Route>,
        (now, wall): (Instant, SystemTime),
    ) {
        if worker.is_some_and(|w| self.retired.contains(&w)) {
            return;
        }
        // A new worker (a reload, a restart) counts from zero: everything it shows is new.
        let fresh = worker.is_none() || worker != self.worker;
        if let Some(old) = self.worker.filter(|_| fresh) {
            self.retired.push_back(old);
            if self.retired.len() > RETIRED {
                self.retired.pop_front();
            }
        }
        let elapsed = self
            .polled
            .map(|at| now.saturating_duration_since(at))
            .filter(|e| !e.is_zero());
        let mut totals: HashMap<Label, Counters> = self
            .entries
            .drain(..)
            .map(|entry| (entry.label, entry.totals))
            .collect();
        let mut servers: HashMap<String, Vec<v1::ServerState>> = HashMap::new();
        for row in stat.servers {
            servers.entry(row.backend).or_default().push(row.state);
        }
        let mut last = HashMap::with_capacity(stat.backends.len());
        for row in stat.backends {
            let route = routes.get(&row.name);
            let label = route.and_then(Route::label);
            let delta = match self.last.get(&row.name) {
                Some((was, before)) if !fresh && *was == label => row.counters.since(*before),
                // The backend changed hands since the last poll: what it counted meanwhile
                // cannot be split between the two, so it goes to neither.
                Some(_) if !fresh => Counters::default(),
                _ => row.counters,
            };
            last.insert(row.name.clone(), (label.clone(), row.counters));
            let (Some(route), Some(label)) = (route, label) else {
                continue;
            };
            let mut total = totals.remove(&label).unwrap_or_default();
            total.add(delta);
            let view = v1::RouteTraffic {
                servers: servers.remove(&row.name).unwrap_or_default(),
                domains: route.domains.clone(),
                service_port: u32::from(route.service_port),
                requests_total: total.requests,
                requests_per_second: elapsed
                    .map_or(0.0, |e| delta.requests as f64 / e.as_secs_f64()),
                sessions_current: row.sessions,
                queue_current: row.queue,
                responses: total.responses.to_vec(),
                connection_errors_total: total.connection_errors,
                response_errors_total: total.response_errors,
                retries_total: total.retries,
                redispatches_total: total.redispatches,
                response_time_ms: row.response_time_ms,
                queue_time_ms: row.queue_time_ms,
                backend: row.name,
            };
            self.entries.push(Entry {
                label,
                totals: total,
                view,
            });
        }
        // Routes no backend serves any more are dropped with their series.
        self.last = last;
        self.worker = worker;
        self.polled = Some(now);
        self.polled_at = Some(wall);
        self.error.clear();
    }

    fn failed(&mut self, error: String) {
        self.error = error;
    }

    /// `Supervisor.Routes`.
    pub fn routes(&self) -> v1::RoutesResponse {
        v1::RoutesResponse {
            routes: self.entries.iter().map(|e| e.view.clone()).collect(),
            polled_at_unix_ms: self.polled_at.map_or(0, legate_proto::unix_ms),
            error: self.error.clone(),
        }
    }

    /// Appends the per-route series in Prometheus' text format.
    pub fn metrics(&self, out: &mut String) {
        let counter = |name: &str, help: &str, value: fn(&Counters) -> u64, out: &mut String| {
            family(out, name, "counter", help);
            for entry in &self.entries {
                let _ = writeln!(out, "{name}{{{}}} {}", entry.label, value(&entry.totals));
            }
        };
        counter(
            "legate_route_requests_total",
            "HTTP requests (apps) or connections (services) of a route",
            |c| c.requests,
            out,
        );
        family(
            out,
            "legate_route_responses_total",
            "counter",
            "HTTP responses of an app by class: 1xx to 5xx, other",
        );
        for entry in self.entries.iter().filter(|e| e.view.service_port == 0) {
            let classes = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
            for (class, n) in classes.into_iter().zip(entry.totals.responses) {
                let label = &entry.label;
                let _ = writeln!(
                    out,
                    "legate_route_responses_total{{{label},code=\"{class}\"}} {n}"
                );
            }
        }
        counter(
            "legate_route_connection_errors_total",
            "Connections to the route's servers that failed",
            |c| c.connection_errors,
            out,
        );
        counter(
            "legate_route_response_errors_total",
            "Responses from the route's servers that failed or were aborted",
            |c| c.response_errors,
            out,
        );
        counter(
            "legate_route_retries_total",
            "Connection attempts to the route's servers retried",
            |c| c.retries,
            out,
        );
        counter(
            "legate_route_redispatches_total",
            "Requests of the route redispatched to another server",
            |c| c.redispatches,
            out,
        );
        counter(
            "legate_route_received_bytes_total",
            "Bytes received from the route's clients",
            |c| c.bytes_in,
            out,
        );
        counter(
            "legate_route_sent_bytes_total",
            "Bytes sent to the route's clients",
            |c| c.bytes_out,
            out,
        );
        let gauge =
            |name: &str, help: &str, value: fn(&v1::RouteTraffic) -> f64, out: &mut String| {
                family(out, name, "gauge", help);
                for entry in &self.entries {
                    let _ = writeln!(out, "{name}{{{}}} {}", entry.label, value(&entry.view));
                }
            };
        gauge(
            "legate_route_sessions",
            "Connections open to the route's servers",
            |r| r.sessions_current as f64,
            out,
        );
        gauge(
            "legate_route_queue",
            "Requests of the route waiting for a server",
            |r| r.queue_current as f64,
            out,
        );
        gauge(
            "legate_route_response_time_seconds",
            "Average response time over the route's last 1024 requests",
            |r| f64::from(r.response_time_ms) / 1000.0,
            out,
        );
        family(
            out,
            "legate_route_servers",
            "gauge",
            "Servers of the route by state: up, down, maint, drain, other",
        );
        for entry in &self.entries {
            for kind in ["up", "down", "maint", "drain", "other"] {
                let n = entry
                    .view
                    .servers
                    .iter()
                    .filter(|s| state_kind(&s.state) == kind)
                    .count();
                let label = &entry.label;
                let _ = writeln!(out, "legate_route_servers{{{label},state=\"{kind}\"}} {n}");
            }
        }
    }
}

impl std::fmt::Display for Label {
    /// The label pair of the series: `domain="..."` or `service_port="..."`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Label::Domain(domains) => write!(f, "domain=\"{}\"", escape(domains)),
            Label::Port(port) => write!(f, "service_port=\"{port}\""),
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as Prometheus' text format takes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A poll that took `t` is followed by one at least `POLL_SHARE * t` later: at 10,000 apps a
/// `show stat` of backends and servers is 12 MB of text, a quarter to half a second of work for
/// HAProxy and the supervisor, which every 5 s would be a tenth of a core.
const POLL_SHARE: u32 = 50;
/// How long after a poll that took `took` the next one starts: `interval`, or longer when the
/// poll is costly.
fn poll_pause(interval: Duration, took: Duration) -> Duration {
    interval.max(took * POLL_SHARE)
}

/// Polls HAProxy every `interval` (longer when a poll is costly) until `shutdown`, reading the
/// routes from the configuration that `running` says runs.
pub async fn poll(
    admin: PathBuf,
    mut running: watch::Receiver<Option<Arc<ConfigSnapshot>>>,
    traffic: Arc<Mutex<Traffic>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let routes_of = |running: &Option<Arc<ConfigSnapshot>>| {
        running
            .as_ref()
            .map(|s| routes(&s.haproxy_config, &s.maps))
            .unwrap_or_default()
    };
    let mut routes = routes_of(&running.borrow_and_update());
    loop {
        if running.has_changed().unwrap_or(false) {
            routes = routes_of(&running.borrow_and_update());
        }
        let began = (Instant::now(), SystemTime::now());
        let polled = haproxy::batch(&admin, &["show info", "show stat -1 6 -1"])
            .await
            .map_err(|e| e.to_string())
            .and_then(|replies| {
                let stat = Stat::parse(replies.get(1).map_or("", String::as_str))?;
                Ok((replies.first().and_then(|info| worker_pid(info)), stat))
            });
        {
            let mut traffic = traffic.lock().unwrap_or_else(|e| e.into_inner());
            match polled {
                Ok((worker, stat)) => traffic.update(worker, stat, &routes, began),
                Err(e) => {
                    debug!(error = %e, "cannot read haproxy's counters");
                    metrics::counter!("legate_supervisor_stats_poll_errors_total").increment(1);
                    traffic.failed(e);
                }
            }
        }
        let took = began.0.elapsed();
        metrics::gauge!("legate_supervisor_stats_poll_seconds").set(took.as_secs_f64());
        if !runtime::pause(poll_pause(interval, took), &shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `show stat -1 6 -1` of HAProxy 2.6.12 (Debian 12), verbatim: an HTTP backend that
    /// answered one request (a 503: its server is down) and a TCP `listen` section.
    const SHOW_STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,
slot_1,s1,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0,1,1,1,1,,1,3,1,,0,,2,0,,0,L4CON,,1,0,0,0,0,0,0,,,,0,0,0,,,,,-1,Connection refused,,0,0,0,0,,,,Layer4 connection problem,,2,3,0,,,,127.0.0.1:18081,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
slot_1,BACKEND,0,0,0,1,999,1,38,217,0,0,,1,0,0,0,DOWN,0,0,0,,1,1,1,,1,3,0,,0,,1,1,,1,,,,0,0,0,0,1,0,,,,1,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,leastconn,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
svc_3306,s2,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0,1,1,0,0,,1,4,1,,0,,2,0,,0,L4CON,,2,,,,,,,,,,,0,0,,,,,-1,Connection refused,,0,0,0,0,,,,Layer4 connection problem,,2,3,0,,,,127.0.0.1:18082,,tcp,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
svc_3306,BACKEND,0,0,0,0,999,0,0,0,0,0,,0,0,0,0,DOWN,0,0,0,,1,0,0,,1,4,0,,0,,1,0,,0,,,,,,,,,,,,,,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,tcp,roundrobin,,,,,,,0,0,0,,,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
";

    const CONFIG: &str = "frontend http\n    bind :80\n    use_backend %[req.hdr(host),map(hosts.map)]\n\n\
        backend slot_1\n    server s1 127.0.0.1:18081 check\n\n\
        backend slot_2\n\n\
        backend app_b.test\n    server s 10.0.0.1:80\n\n\
        listen svc_3306\n    mode tcp\n    bind 127.0.0.1:3306\n    bind ipv6@::1:3306\n    server s2 127.0.0.1:18082 check\n";

    fn maps(hosts: &str) -> Vec<ConfigFile> {
        vec![
            ConfigFile {
                name: "hosts.map".to_owned(),
                content: hosts.to_owned(),
            },
            ConfigFile {
                name: "wildcards.map".to_owned(),
                content: ".w.test slot_1\n".to_owned(),
            },
        ]
    }

    /// A `show stat` of one HTTP backend `slot_1` that counted `requests` 2xx answers.
    fn stat(requests: u64) -> Stat {
        Stat {
            backends: vec![BackendRow {
                name: "slot_1".to_owned(),
                counters: Counters {
                    requests,
                    responses: [0, requests, 0, 0, 0, 0],
                    ..Counters::default()
                },
                ..BackendRow::default()
            }],
            servers: Vec::new(),
        }
    }

    fn requests(traffic: &Traffic) -> Vec<(String, u64)> {
        traffic
            .entries
            .iter()
            .map(|e| (e.label.to_string(), e.totals.requests))
            .collect()
    }

    #[test]
    fn a_backend_is_named_by_the_domains_that_map_to_it_or_its_service_port() {
        let routes = routes(
            CONFIG,
            &maps("a.test slot_1\nb.test app_b.test\nx.test nowhere\n"),
        );
        let expected: BTreeMap<String, Route> = [
            ("app_b.test", vec!["b.test"], 0),
            ("slot_1", vec!["*.w.test", "a.test"], 0),
            ("svc_3306", vec![], 3306),
        ]
        .into_iter()
        .map(|(backend, domains, port)| {
            let route = Route {
                domains: domains.into_iter().map(str::to_owned).collect(),
                service_port: port,
            };
            (backend.to_owned(), route)
        })
        .collect();
        // slot_2 is free: it serves nothing, and a map value that names no backend is no route.
        assert_eq!(routes, expected);
    }

    #[test]
    fn haproxy_2_6_show_stat_is_parsed() {
        let stat = Stat::parse(SHOW_STAT).unwrap();
        assert_eq!(stat.backends.len(), 2);
        let http = &stat.backends[0];
        assert_eq!(http.name, "slot_1");
        assert_eq!(http.counters.requests, 1, "req_tot");
        assert_eq!(http.counters.responses, [0, 0, 0, 0, 1, 0]);
        assert_eq!(
            (
                http.counters.connection_errors,
                http.counters.bytes_in,
                http.counters.bytes_out
            ),
            (1, 38, 217)
        );
        let tcp = &stat.backends[1];
        assert_eq!((tcp.name.as_str(), tcp.counters.requests), ("svc_3306", 0));
        assert_eq!(stat.servers.len(), 2);
        let server = &stat.servers[0];
        assert_eq!(server.backend, "slot_1");
        assert_eq!(
            (
                server.state.name.as_str(),
                server.state.address.as_str(),
                server.state.state.as_str(),
                server.state.check.as_str()
            ),
            ("s1", "127.0.0.1:18081", "DOWN", "L4CON")
        );
        assert!(Stat::parse("Unknown command.\n").is_err());
        assert!(Stat::parse("# pxname,svname\n").is_err(), "columns missing");
        assert_eq!(
            worker_pid("Name: HAProxy\nPid: 25223\nUptime: 0d\n"),
            Some(25223)
        );
    }

    #[test]
    fn counts_stay_monotonic_across_reloads_and_never_follow_a_slot_to_its_next_domain() {
        let a = routes(CONFIG, &maps("a.test slot_1\n"));
        let b = routes(CONFIG, &maps("b.test slot_1\n"));
        let start = Instant::now();
        let at = |secs| (start + Duration::from_secs(secs), SystemTime::now());
        let mut traffic = Traffic::default();
        traffic.update(Some(1), stat(10), &a, at(0));
        assert_eq!(
            requests(&traffic),
            [("domain=\"*.w.test,a.test\"".to_owned(), 10)]
        );
        traffic.update(Some(1), stat(15), &a, at(5));
        assert_eq!(traffic.entries[0].totals.requests, 15);
        assert_eq!(traffic.entries[0].view.requests_per_second, 1.0);
        // A reload: the new worker counts from zero, and its 3 are new.
        traffic.update(Some(2), stat(3), &a, at(10));
        assert_eq!(traffic.entries[0].totals.requests, 18);
        assert_eq!(traffic.entries[0].view.responses[1], 18);
        // The slot changes hands: what it counted meanwhile goes to nobody, and a.test's
        // series is gone.
        traffic.update(Some(2), stat(7), &b, at(15));
        assert_eq!(
            requests(&traffic),
            [("domain=\"*.w.test,b.test\"".to_owned(), 0)]
        );
        traffic.update(Some(2), stat(9), &b, at(20));
        assert_eq!(
            requests(&traffic),
            [("domain=\"*.w.test,b.test\"".to_owned(), 2)]
        );
        // The replaced worker answering once more (a reload's overlap) changes nothing.
        traffic.update(Some(1), stat(15), &b, at(22));
        assert_eq!(
            requests(&traffic),
            [("domain=\"*.w.test,b.test\"".to_owned(), 2)]
        );
        // A worker that did not say its pid: nothing can be assumed, all it shows is new.
        traffic.update(None, stat(4), &b, at(25));
        assert_eq!(traffic.entries[0].totals.requests, 6);
    }

    #[test]
    fn series_carry_the_domain_or_the_service_port() {
        let routes = routes(CONFIG, &maps("a.test slot_1\n"));
        let mut traffic = Traffic::default();
        let now = (Instant::now(), SystemTime::now());
        traffic.update(Some(1), Stat::parse(SHOW_STAT).unwrap(), &routes, now);
        let mut text = String::new();
        traffic.metrics(&mut text);
        for line in [
            "# TYPE legate_route_requests_total counter",
            "legate_route_requests_total{domain=\"*.w.test,a.test\"} 1",
            "legate_route_requests_total{service_port=\"3306\"} 0",
            "legate_route_responses_total{domain=\"*.w.test,a.test\",code=\"5xx\"} 1",
            "legate_route_connection_errors_total{domain=\"*.w.test,a.test\"} 1",
            "legate_route_servers{domain=\"*.w.test,a.test\",state=\"down\"} 1",
            "legate_route_servers{service_port=\"3306\",state=\"up\"} 0",
            "# TYPE legate_route_sessions gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("responses_total{service_port"), "{text}");
        assert!(!text.contains("slot_"), "{text}");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let routes = traffic.routes();
        assert_eq!(routes.routes.len(), 2);
        assert_eq!(routes.routes[0].servers[0].state, "DOWN");
        assert!(routes.polled_at_unix_ms > 0);
    }

    #[test]
    fn a_costly_poll_spaces_the_next_one_out() {
        let interval = Duration::from_secs(5);
        assert_eq!(poll_pause(interval, Duration::from_millis(10)), interval);
        // At 10,000 apps a poll took 0.25 to 0.5 s.
        assert_eq!(
            poll_pause(interval, Duration::from_millis(250)),
            Duration::from_millis(12_500)
        );
    }
}
