//! The Docker edge (bollard): the running containers with what the conventions need, and the
//! event stream that triggers reconciles.
//!
//! Inspections are cached by container id and dropped on any event about that container, and
//! all of them on a full resync, so a reconcile inspects only what changed.

use std::collections::{BTreeMap, HashMap};

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, EventMessage, HealthStatusEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::{Stream, StreamExt};

use crate::conventions::{Binding, ContainerInfo, Health};

/// Docker errors.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine could not be reached or answered an error.
    #[error("docker: {0}")]
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

/// The running containers of one engine, restricted by label filters.
#[derive(Debug)]
pub struct DockerSource {
    docker: Docker,
    label_filters: Vec<String>,
    cache: HashMap<String, ContainerInfo>,
}

impl DockerSource {
    /// Connects to `host` (`unix:///var/run/docker.sock`, `tcp://...`) and negotiates the API
    /// version with the engine.
    pub async fn connect(host: &str, label_filters: Vec<String>) -> Result<Self, DockerError> {
        let docker = Docker::connect_with_host(host)?.negotiate_version().await?;
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
            if let Some(info) = self.cache.get(&id) {
                containers.push(info.clone());
                continue;
            }
            match self.docker.inspect_container(&id, None).await {
                Ok(response) => {
                    let info = container_info(response);
                    self.cache.insert(id, info.clone());
                    containers.push(info);
                }
                // Gone between the listing and the inspection: not running any more.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(containers)
    }

    /// The ids of containers with relevant events, as they happen. Ends or fails when the
    /// engine's stream does.
    pub fn events(&self) -> impl Stream<Item = Result<String, DockerError>> + use<> {
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
                    Ok(message) => relevant_id(&message).map(Ok),
                    Err(e) => Some(Err(e.into())),
                }
            })
    }
}

fn relevant_id(message: &EventMessage) -> Option<String> {
    let action = message.action.as_deref()?;
    // health_status events read "health_status: healthy".
    let verb = action.split(':').next().unwrap_or(action);
    if !RELEVANT.contains(&verb) {
        return None;
    }
    message.actor.as_ref()?.id.clone()
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
        health,
        ports,
    }
}
