//! `legate explain <container|domain|:port>`: the path from a container to this host's HAProxy,
//! step by step, each step passed, doubtful or failed, with what it saw.
//!
//! For a container on this host the conventions are applied by the registrar's own code to
//! Docker's inspection, so the verdict is the registrar's; then the registrar's list, the keys
//! in etcd, confgen's status and this host's supervisor and HAProxy follow, for every route the
//! container asks for. A domain or a service port starts at the registry.

use legate_proto::registry::{Key, Schema};
use legate_proto::v1;
use legate_registrar::conventions::{self, Target, Verdict};
use legate_registrar::docker::{DockerArgs, DockerSource};
use serde::Serialize;

use crate::fleet::{Fleet, Sources};
use crate::show::{Format, Out, Tone, state_tone};

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mark {
    Ok,
    Doubt,
    Fail,
}

#[derive(Debug, Serialize)]
struct Step {
    step: String,
    result: Mark,
    detail: String,
}

#[derive(Debug, Serialize)]
struct Explanation {
    target: String,
    /// container, app or service.
    kind: &'static str,
    /// Whether this host's HAProxy routes it (every route the container asks for).
    routed: bool,
    steps: Vec<Step>,
}

struct Steps(Vec<Step>);

impl Steps {
    fn push(&mut self, step: impl Into<String>, result: Mark, detail: impl Into<String>) {
        self.0.push(Step {
            step: step.into(),
            result,
            detail: detail.into(),
        });
    }
}

/// A route the explanation follows to HAProxy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Domain(String),
    Port(u32),
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Domain(domain) => f.write_str(domain),
            Route::Port(port) => write!(f, ":{port}"),
        }
    }
}

pub(crate) async fn explain(
    sources: &Sources,
    docker: &DockerArgs,
    target: &str,
    out: &mut Out,
) -> bool {
    let fleet = match sources.registry().await {
        Ok(fleet) => fleet,
        Err(e) => {
            out.warn(format!("{e:#}"));
            return false;
        }
    };
    let mut steps = Steps(Vec::new());
    let port = target.strip_prefix(':').and_then(|p| p.parse::<u32>().ok());
    let (kind, routes) = if let Some(port) = port {
        ("service", vec![(Route::Port(port), None)])
    } else if fleet.model.apps.iter().any(|a| a.domain == target) {
        ("app", vec![(Route::Domain(target.to_owned()), None)])
    } else {
        let routes = container(sources, docker, &fleet, target, &mut steps).await;
        ("container", routes)
    };
    let mut routed = !routes.is_empty();
    if routed {
        // What this host's services say, asked once for every route followed.
        let (confgen, supervisor, live) = tokio::join!(
            sources.confgen(),
            sources.supervisor(),
            sources.live_routes()
        );
        let here = Here {
            confgen,
            supervisor,
            live,
        };
        for (route, keys) in &routes {
            routed &= follow(&fleet, &here, route, keys.as_deref(), &mut steps);
        }
    }
    let explanation = Explanation {
        target: target.to_owned(),
        kind,
        routed,
        steps: steps.0,
    };
    if out.format == Format::Json {
        out.json(&explanation);
        return routed;
    }
    for step in &explanation.steps {
        let (mark, tone) = match step.result {
            Mark::Ok => ("ok  ", Tone::Good),
            Mark::Doubt => ("??  ", Tone::Warn),
            Mark::Fail => ("FAIL", Tone::Bad),
        };
        out.toned(format!("{mark} {:<22} {}", step.step, step.detail), tone);
    }
    if routed {
        out.toned(
            format!("{target} is routed by this host's HAProxy"),
            Tone::Good,
        );
    } else {
        out.toned(format!("{target} is not routed here"), Tone::Bad);
    }
    routed
}

/// The container's steps up to etcd; returns the routes it asks for, each with the keys it
/// should have in etcd.
async fn container(
    sources: &Sources,
    docker: &DockerArgs,
    fleet: &Fleet,
    target: &str,
    steps: &mut Steps,
) -> Vec<(Route, Option<Vec<String>>)> {
    let schema = Schema::new(sources.etcd.prefix.clone());
    let inspected = match DockerSource::connect(docker, Vec::new()).await {
        Ok(mut source) => source.inspect(target).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let info = match inspected {
        Ok(Some(info)) => info,
        Ok(None) => return elsewhere(fleet, target, steps),
        Err(e) => {
            steps.push(
                "docker",
                Mark::Doubt,
                format!("cannot ask this host's engine ({e}); looking in the registry"),
            );
            return elsewhere(fleet, target, steps);
        }
    };
    let state = if info.running {
        "running".to_owned()
    } else {
        "not running (or paused)".to_owned()
    };
    steps.push(
        "docker",
        if info.running { Mark::Ok } else { Mark::Fail },
        format!(
            "{} ({}) is {state} on this host",
            info.name,
            legate_proto::short_id(&info.id)
        ),
    );
    let list = match sources.registrar().await {
        Ok(list) => list,
        Err(e) => {
            steps.push("registrar", Mark::Fail, format!("{e:#}"));
            return Vec::new();
        }
    };
    let (Ok(host_ip), Ok(host_id)) = (
        legate_proto::registry::HostIp::parse(&list.host_ip),
        legate_proto::registry::HostId::new(&list.host_id),
    ) else {
        steps.push(
            "registrar",
            Mark::Fail,
            "the registrar has not said its host IP and id yet",
        );
        return Vec::new();
    };
    let targets = match conventions::evaluate(&info, host_ip, &host_id) {
        Verdict::Ignore => {
            steps.push(
                "conventions",
                Mark::Fail,
                "not a legate container: no DOMAIN_NAME or SERVICE_PORT in its environment, \
                 no legate.domain or legate.service.port label (or legate.ignore=true)",
            );
            return Vec::new();
        }
        Verdict::NotRouted(why) => {
            steps.push("conventions", Mark::Fail, format!("not routed now: {why}"));
            return Vec::new();
        }
        Verdict::Refuse(reason) => {
            steps.push("conventions", Mark::Fail, format!("refused: {reason}"));
            return Vec::new();
        }
        Verdict::Register(targets, _) => targets,
    };
    let mut routes: Vec<(Route, Option<Vec<String>>)> = Vec::new();
    let mut asked = Vec::new();
    for target in &targets {
        let (route, key) = match target {
            Target::App(app) => (
                Route::Domain(app.domain.to_string()),
                schema.format(&Key::App(app.clone())),
            ),
            Target::Service(service) => (
                Route::Port(u32::from(service.service_port.get())),
                schema.format(&Key::Service(service.clone())),
            ),
        };
        asked.push(format!(
            "{route} at {}",
            key.rsplit('/').next().unwrap_or("")
        ));
        match routes.iter_mut().find(|(r, _)| *r == route) {
            Some((_, Some(keys))) => keys.push(key),
            _ => routes.push((route, Some(vec![key]))),
        }
    }
    steps.push(
        "conventions",
        Mark::Ok,
        format!("asks for {}", asked.join(", ")),
    );
    let keys: Vec<&String> = routes
        .iter()
        .flat_map(|(_, k)| k.iter().flatten())
        .collect();
    let listed = keys
        .iter()
        .filter(|key| list.registrations.iter().any(|r| &r.key == **key))
        .count();
    let registrar = if listed == keys.len() {
        (
            Mark::Ok,
            format!("holds its {listed} key(s) under lease {:x}", list.lease_id),
        )
    } else if !list.error.is_empty() {
        (
            Mark::Fail,
            format!(
                "holds {listed} of {} key(s); its last reconcile failed: {}",
                keys.len(),
                list.error
            ),
        )
    } else {
        (
            Mark::Doubt,
            format!(
                "holds {listed} of {} key(s) as of its last reconcile (try again)",
                keys.len()
            ),
        )
    };
    steps.push("registrar", registrar.0, registrar.1);
    routes
}

/// A container that this host's Docker does not know: found in the registry by name or id.
fn elsewhere(fleet: &Fleet, target: &str, steps: &mut Steps) -> Vec<(Route, Option<Vec<String>>)> {
    let matches =
        |name: &str, id: &str| name == target || (target.len() >= 4 && id.starts_with(target));
    if let Some(r) = fleet.refused.iter().find(|r| {
        matches(
            r.refusal.container_name.as_ref().map_or("", |n| n.as_str()),
            &r.container_id,
        )
    }) {
        steps.push(
            "registrar",
            Mark::Fail,
            format!("refused by registrar@{}: {}", r.host_id, r.refusal.reason),
        );
        return Vec::new();
    }
    let mut routes = Vec::new();
    let mut hosts = Vec::new();
    for app in &fleet.model.apps {
        for server in app
            .servers
            .iter()
            .filter(|s| matches(&s.container_name, &s.container_id))
        {
            hosts.push(server.host_id.clone());
            routes.push((Route::Domain(app.domain.clone()), None));
        }
    }
    for service in &fleet.model.services {
        for server in service
            .servers
            .iter()
            .filter(|s| matches(&s.container_name, &s.container_id))
        {
            hosts.push(server.host_id.clone());
            routes.push((Route::Port(service.port), None));
        }
    }
    routes.dedup();
    hosts.sort();
    hosts.dedup();
    if routes.is_empty() {
        steps.push(
            "registry",
            Mark::Fail,
            format!(
                "no container, domain or service port '{target}': not in this host's Docker, \
                 and no registration or refusal in etcd names it"
            ),
        );
    } else {
        steps.push(
            "docker",
            Mark::Ok,
            format!("not on this host; registered by {}", hosts.join(", ")),
        );
    }
    routes
}

/// What this host's confgen, supervisor and HAProxy said.
struct Here {
    confgen: anyhow::Result<v1::ConfgenStatus>,
    supervisor: anyhow::Result<v1::SupervisorStatus>,
    live: anyhow::Result<v1::RoutesResponse>,
}

/// The steps of one route from the registry to this host's HAProxy; whether it is routed here.
fn follow(
    fleet: &Fleet,
    here_said: &Here,
    route: &Route,
    keys: Option<&[String]>,
    steps: &mut Steps,
) -> bool {
    let servers: &[v1::Server] = match route {
        Route::Domain(domain) => fleet
            .model
            .apps
            .iter()
            .find(|a| &a.domain == domain)
            .map_or(&[], |a| &a.servers),
        Route::Port(port) => fleet
            .model
            .services
            .iter()
            .find(|s| s.port == *port)
            .map_or(&[], |s| &s.servers),
    };
    let registry_step = format!("etcd {route}");
    // The keys this route's servers were written at (all of them, or the container's).
    let revisions: Vec<(String, Option<i64>)> = match keys {
        Some(keys) => keys
            .iter()
            .map(|k| (k.clone(), fleet.mod_revisions.get(k).copied()))
            .collect(),
        None => Vec::new(),
    };
    let missing: Vec<&str> = revisions
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(k, _)| k.as_str())
        .collect();
    if !missing.is_empty() {
        steps.push(
            registry_step,
            Mark::Fail,
            format!("not in etcd: {}", missing.join(", ")),
        );
        return false;
    }
    if servers.is_empty() {
        steps.push(
            registry_step,
            Mark::Fail,
            format!("no server registered for {route} (see `legate refused`)"),
        );
        return false;
    }
    let names: Vec<String> = servers
        .iter()
        .map(|s| format!("{}@{} {}", s.container_name, s.host_id, s.address))
        .collect();
    steps.push(
        registry_step,
        Mark::Ok,
        format!("{} server(s): {}", servers.len(), names.join(", ")),
    );

    let written = revisions.iter().filter_map(|(_, r)| *r).max();
    match &here_said.confgen {
        Ok(status) => {
            let skipped: Vec<String> = status
                .skipped
                .iter()
                .filter(|s| {
                    let key = String::from_utf8_lossy(&s.key);
                    match route {
                        Route::Domain(d) => key.contains(&format!("/apps/{d}/")),
                        Route::Port(p) => key.contains(&format!("/{p}/")),
                    }
                })
                .map(|s| s.reason.clone())
                .collect();
            if !skipped.is_empty() {
                steps.push(
                    "confgen",
                    Mark::Fail,
                    format!("skipped: {}", skipped.join("; ")),
                );
                return false;
            }
            let behind = written.is_some_and(|w| status.version < u64::try_from(w).unwrap_or(0));
            let (result, detail) = if !status.last_render_error.is_empty() {
                (
                    Mark::Fail,
                    format!("its last render failed: {}", status.last_render_error),
                )
            } else if behind {
                (
                    Mark::Doubt,
                    format!(
                        "its snapshot (version {}) is older than the key (revision {}): still \
                         coalescing, or the change did not alter the configuration",
                        status.version,
                        written.unwrap_or(0)
                    ),
                )
            } else {
                (Mark::Ok, format!("renders it (version {})", status.version))
            };
            steps.push("confgen", result, detail);
        }
        Err(e) => steps.push("confgen", Mark::Doubt, format!("{e:#}")),
    }
    match &here_said.supervisor {
        Ok(status) => {
            let refused: Vec<&String> = match route {
                Route::Port(p) => status
                    .refused_listeners
                    .iter()
                    .filter(|l| l.contains(&format!(":{p}:")) || l.ends_with(&format!(":{p}")))
                    .collect(),
                Route::Domain(_) => Vec::new(),
            };
            if let Some(refusal) = refused.first() {
                steps.push("supervisor", Mark::Fail, format!("refused: {refusal}"));
                return false;
            }
            let detail = format!("runs version {}", status.running_version);
            let result = if status.last_error.is_empty() {
                Mark::Ok
            } else {
                Mark::Doubt
            };
            let detail = if status.last_error.is_empty() {
                detail
            } else {
                format!("{detail}; last error: {}", status.last_error)
            };
            steps.push("supervisor", result, detail);
        }
        Err(e) => {
            steps.push("supervisor", Mark::Fail, format!("{e:#}"));
            return false;
        }
    }
    let live = match &here_said.live {
        Ok(live) => live,
        Err(e) => {
            steps.push("haproxy", Mark::Fail, format!("{e:#}"));
            return false;
        }
    };
    let here = live.routes.iter().find(|r| match route {
        Route::Domain(d) => r.domains.contains(d),
        Route::Port(p) => r.service_port == *p,
    });
    let Some(here) = here else {
        steps.push(
            "haproxy",
            Mark::Fail,
            format!("this host's HAProxy has no route for {route} (yet: its counters are read every few seconds)"),
        );
        return false;
    };
    let mut states = Vec::new();
    let mut up = 0;
    for server in servers {
        match here.servers.iter().find(|s| s.name == server.name) {
            Some(s) => {
                if state_tone(&s.state) == Tone::Good {
                    up += 1;
                }
                let check = if s.check.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.check)
                };
                states.push(format!("{} {}{check}", server.address, s.state));
            }
            None => states.push(format!("{} absent", server.address)),
        }
    }
    let result = if up == servers.len() {
        Mark::Ok
    } else if up > 0 {
        Mark::Doubt
    } else {
        Mark::Fail
    };
    steps.push(
        "haproxy",
        result,
        format!("backend {}: {}", here.backend, states.join(", ")),
    );
    up > 0
}
