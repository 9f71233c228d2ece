//! The Docker edge (bollard): the running containers with what the conventions need, and the
//! event stream that triggers reconciles.
//!
//! Inspections are cached by container id and dropped on any event about that container, and
//! all of them on a full resync, so a reconcile inspects only what changed.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, EventMessage, HealthStatusEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::{Stream, StreamExt};

use crate::conventions::{Binding, ContainerInfo, Health};

/// How the registrar reaches the Docker engine, with the docker CLI's variables. Only read
/// calls are made (list, inspect, events), but the API has no read-only mode: whoever reaches
/// it is root on the host, hence TLS with client certificates for `tcp://`.
#[derive(Debug, Clone, clap::Args)]
pub struct DockerArgs {
    /// Docker engine to watch: `unix:///path` or `tcp://host:port`.
    #[arg(
        long = "docker-host",
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub docker_host: String,
    /// TLS to a `tcp://` engine: verify its certificate against `ca.pem` and present
    /// `cert.pem`/`key.pem`, all from `--docker-cert-path`.
    /// Any value but empty, `0`, `false`, `no`, `off` turns it on.
    #[arg(long = "docker-tls-verify", env = "DOCKER_TLS_VERIFY",
          value_parser = clap::builder::FalseyValueParser::new())]
    pub docker_tls_verify: bool,
    /// Directory of `ca.pem`, `cert.pem` and `key.pem` for `--docker-tls-verify`.
    #[arg(long = "docker-cert-path", env = "DOCKER_CERT_PATH")]
    pub docker_cert_path: Option<PathBuf>,
}

/// Seconds a Docker API call may take (bollard's default).
const DOCKER_TIMEOUT: u64 = 120;

impl DockerArgs {
    /// What the flags cannot say alone: TLS needs a `tcp://` host and the certificates'
    /// directory.
    pub fn check(&self) -> Result<(), String> {
        let tcp = self.docker_host.starts_with("tcp://");
        if !tcp && !self.docker_host.starts_with("unix://") {
            return Err(format!(
                "Docker host '{}' is neither unix:// nor tcp://",
                self.docker_host.escape_default()
            ));
        }
        if self.docker_tls_verify && !tcp {
            return Err("--docker-tls-verify needs a tcp:// Docker host".to_owned());
        }
        if self.docker_tls_verify && self.docker_cert_path.is_none() {
            return Err("--docker-tls-verify needs --docker-cert-path".to_owned());
        }
        Ok(())
    }

    /// Whether the engine is reached over TCP without TLS.
    pub fn plain_tcp(&self) -> bool {
        self.docker_host.starts_with("tcp://") && !self.docker_tls_verify
    }

    fn connect(&self) -> Result<Docker, bollard::errors::Error> {
        let version = bollard::API_DEFAULT_VERSION;
        match &self.docker_cert_path {
            Some(dir) if self.docker_tls_verify => Docker::connect_with_ssl(
                &self.docker_host,
                &dir.join("key.pem"),
                &dir.join("cert.pem"),
                &dir.join("ca.pem"),
                DOCKER_TIMEOUT,
                version,
            ),
            _ if self.docker_host.starts_with("tcp://") => {
                Docker::connect_with_http(&self.docker_host, DOCKER_TIMEOUT, version)
            }
            _ => Docker::connect_with_unix(&self.docker_host, DOCKER_TIMEOUT, version),
        }
    }
}

/// Docker errors.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine could not be reached or answered an error.
    #[error("docker: {}", legate_proto::runtime::error_chain(.0))]
    Api(#[from] bollard::errors::Error),
}

/// Container events that can change what is registered; others (exec_* of healthchecks,
/// attach, ...) are ignored.
const RELEVANT: [&str; 11] = [
    "create",
    "start",
    "restart",
    "die",
    "stop",
    "kill",
    "pause",
    "unpause",
    "health_status",
    "destroy",
    "rename",
];

/// What a container event says about routing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// The container is going away (`die`, `stop`, `destroy`): unroute it now, even while
    /// Docker still lists it as running.
    Stopping,
    /// A signal was sent to it (`kill`); a stop signal means the same as [`Sign::Stopping`].
    Killed(i32),
    /// It runs again (`start`, `restart`, `unpause`).
    Started,
    /// Anything else that may change it (`create`, `pause`, health, `rename`): inspect it.
    Changed,
}

/// One relevant event about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// Full container id.
    pub id: String,
    /// What the event means.
    pub sign: Sign,
}

/// The signals that stop a process whatever it does with them, or that ask it to stop:
/// SIGINT, SIGQUIT, SIGKILL, SIGTERM.
const STOP_SIGNALS: [i32; 4] = [2, 3, 9, 15];

/// Whether a `kill` with `signal` stops a container whose stop signal is `stop_signal`.
pub fn stops(signal: i32, stop_signal: Option<i32>) -> bool {
    STOP_SIGNALS.contains(&signal) || Some(signal) == stop_signal
}

/// A signal as Docker spells it (`SIGTERM`, `TERM`, `15`), as a number.
pub fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let name = s.trim().to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

/// The running containers of one engine, restricted by label filters.
#[derive(Debug)]
pub struct DockerSource {
    docker: Docker,
    label_filters: Vec<String>,
    cache: HashMap<String, ContainerInfo>,
}

impl DockerSource {
    /// Connects to the engine of `args` and negotiates the API version with it.
    pub async fn connect(
        args: &DockerArgs,
        label_filters: Vec<String>,
    ) -> Result<Self, DockerError> {
        let docker = args.connect()?.negotiate_version().await?;
        Ok(Self {
            docker,
            label_filters,
            cache: HashMap::new(),
        })
    }

    fn filters(&self) -> HashMap<String, Vec<String>> {
        let mut filters = HashMap::new();
        if !self.label_filters.is_empty() {
            filters.insert("label".to_owned(), self.label_filters.clone());
        }
        filters
    }

    /// Forgets every cached inspection: the next listing inspects everything again.
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// Forgets the cached inspection of one container.
    pub fn invalidate(&mut self, id: &str) {
        self.cache.remove(id);
    }

    /// One container, inspected (from the cache when an inspection is there); `None` when it
    /// is gone.
    pub async fn inspect(&mut self, id: &str) -> Result<Option<ContainerInfo>, DockerError> {
        if let Some(info) = self.cache.get(id) {
            return Ok(Some(info.clone()));
        }
        match self.docker.inspect_container(id, None).await {
            Ok(response) => {
                let info = container_info(response);
                self.cache.insert(id.to_owned(), info.clone());
                Ok(Some(info))
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The running containers (paused ones included: the conventions decide), inspected.
    pub async fn running(&mut self) -> Result<Vec<ContainerInfo>, DockerError> {
        let options = ListContainersOptions {
            all: false,
            filters: Some(self.filters()),
            ..Default::default()
        };
        let summaries = self.docker.list_containers(Some(options)).await?;
        let ids: Vec<String> = summaries.into_iter().filter_map(|s| s.id).collect();
        self.cache.retain(|id, _| ids.contains(id));
        let mut containers = Vec::with_capacity(ids.len());
        for id in ids {
            // Gone between the listing and the inspection: not running any more.
            if let Some(info) = self.inspect(&id).await? {
                containers.push(info);
            }
        }
        Ok(containers)
    }

    /// The cached inspection of a container, if any.
    pub fn cached(&self, id: &str) -> Option<&ContainerInfo> {
        self.cache.get(id)
    }

    /// Relevant events, as they happen. Ends or fails when the engine's stream does.
    pub fn events(&self) -> impl Stream<Item = Result<ContainerEvent, DockerError>> + use<> {
        let mut filters = self.filters();
        filters.insert("type".to_owned(), vec!["container".to_owned()]);
        let options = EventsOptions {
            filters: Some(filters),
            ..Default::default()
        };
        self.docker
            .events(Some(options))
            .filter_map(|event| async move {
                match event {
                    Ok(message) => relevant(&message).map(Ok),
                    Err(e) => Some(Err(e.into())),
                }
            })
    }
}

fn relevant(message: &EventMessage) -> Option<ContainerEvent> {
    let action = message.action.as_deref()?;
    // health_status events read "health_status: healthy".
    let verb = action.split(':').next().unwrap_or(action);
    if !RELEVANT.contains(&verb) {
        return None;
    }
    let actor = message.actor.as_ref()?;
    let sign = match verb {
        "die" | "stop" | "destroy" => Sign::Stopping,
        "kill" => actor
            .attributes
            .as_ref()
            .and_then(|a| a.get("signal"))
            .and_then(|s| signal_number(s))
            .map_or(Sign::Changed, Sign::Killed),
        "start" | "restart" | "unpause" => Sign::Started,
        _ => Sign::Changed,
    };
    Some(ContainerEvent {
        id: actor.id.clone()?,
        sign,
    })
}

/// Converts Docker's inspection into what the conventions read.
fn container_info(response: ContainerInspectResponse) -> ContainerInfo {
    let config = response.config.unwrap_or_default();
    let state = response.state.unwrap_or_default();
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        _ => Health::None,
    };
    let ports = response
        .network_settings
        .and_then(|n| n.ports)
        .unwrap_or_default()
        .into_iter()
        .map(|(port, bindings)| {
            let bindings = bindings
                .unwrap_or_default()
                .into_iter()
                .map(|b| Binding {
                    host_ip: b.host_ip.unwrap_or_default(),
                    host_port: b.host_port.unwrap_or_default(),
                })
                .collect();
            (port, bindings)
        })
        .collect::<BTreeMap<_, _>>();
    ContainerInfo {
        id: response.id.unwrap_or_default(),
        name: response
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        env: config.env.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        running: state.running.unwrap_or(false) && !state.paused.unwrap_or(false),
        stop_signal: config.stop_signal.as_deref().and_then(signal_number),
        health,
        ports,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bollard::models::EventActor;

    use super::*;

    fn event(action: &str, attributes: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            action: Some(action.to_owned()),
            actor: Some(EventActor {
                id: Some("c0ffee".to_owned()),
                attributes: Some(
                    attributes
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<HashMap<_, _>>(),
                ),
            }),
            ..Default::default()
        }
    }

    fn sign(action: &str, attributes: &[(&str, &str)]) -> Option<Sign> {
        relevant(&event(action, attributes)).map(|e| e.sign)
    }

    #[test]
    fn events_say_whether_a_container_is_stopping() {
        assert_eq!(sign("die", &[("exitCode", "0")]), Some(Sign::Stopping));
        assert_eq!(sign("stop", &[]), Some(Sign::Stopping));
        assert_eq!(sign("destroy", &[]), Some(Sign::Stopping));
        assert_eq!(sign("kill", &[("signal", "15")]), Some(Sign::Killed(15)));
        assert_eq!(sign("kill", &[]), Some(Sign::Changed));
        assert_eq!(sign("start", &[]), Some(Sign::Started));
        assert_eq!(sign("unpause", &[]), Some(Sign::Started));
        assert_eq!(sign("pause", &[]), Some(Sign::Changed));
        assert_eq!(sign("health_status: unhealthy", &[]), Some(Sign::Changed));
        assert_eq!(sign("exec_start: sh -c true", &[]), None);
        assert_eq!(sign("attach", &[]), None);
    }

    #[test]
    fn stop_signals_stop_and_reload_signals_do_not() {
        for signal in ["TERM", "SIGTERM", "15", "SIGINT", "QUIT", "KILL", "9"] {
            let n = signal_number(signal).unwrap();
            assert!(stops(n, None), "{signal}");
        }
        let hup = signal_number("SIGHUP").unwrap();
        assert_eq!(hup, 1);
        assert!(!stops(hup, None));
        assert!(!stops(signal_number("USR1").unwrap(), Some(15)));
        // A container whose stop signal is SIGUSR1 stops on it.
        let usr1 = signal_number("SIGUSR1").unwrap();
        assert!(stops(usr1, Some(usr1)));
        assert_eq!(signal_number("SIGNOPE"), None);
    }
}
