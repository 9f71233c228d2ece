//! The container conventions (docs/configuration.md has them): from what Docker says about one
//! container to the registrations it asks for, or the reason it is refused. Pure: no I/O,
//! fully unit tested.
//!
//! | what | environment (seed) | label |
//! |---|---|---|
//! | HTTP app | `DOMAIN_NAME` (comma list) | `legate.domain` |
//! | app's container port | `APP_PORT` (default: the only published TCP port, else 80) | `legate.port` |
//! | TCP service | `SERVICE_PORT` (comma list) | `legate.service.port` |
//! | service name | `SERVICE_NAME` (default: container name) | `legate.service.name` |
//! | active health check | `HEALTH_CHECK` (`tcp` or an HTTP path; default: none) | `legate.check` |
//! | opt out | | `legate.ignore=true` |
//!
//! Labels win over environment when both are set. Every value goes through the registry
//! validation of `legate_proto`; one bad value refuses the whole container.

use std::collections::{BTreeMap, BTreeSet};

use legate_proto::registry::{
    AppKey, ContainerId, ContainerName, Domain, Endpoint, Field, HealthCheck, HostId, HostIp, Port,
    RegistrationValue, ServiceKey, ServiceName,
};

/// Docker's health state of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The container has no healthcheck.
    None,
    /// The healthcheck has not passed yet.
    Starting,
    /// The healthcheck passes.
    Healthy,
    /// The healthcheck fails.
    Unhealthy,
}

/// One published binding of a container port, as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Host IP: empty, `0.0.0.0` or `::` for all addresses.
    pub host_ip: String,
    /// Host port, as text.
    pub host_port: String,
}

/// What the registrar needs to know about a container (filled from `docker inspect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Full container id.
    pub id: String,
    /// Name without Docker's leading `/`.
    pub name: String,
    /// Environment, `KEY=value` entries.
    pub env: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Running (and not paused).
    pub running: bool,
    /// The signal `docker stop` sends it (its `StopSignal`), when set.
    pub stop_signal: Option<i32>,
    /// Health.
    pub health: Health,
    /// Published bindings by container port, e.g. `80/tcp`.
    pub ports: BTreeMap<String, Vec<Binding>>,
}

/// One registration a container asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// An HTTP app.
    App(AppKey),
    /// A TCP service.
    Service(ServiceKey),
}

/// What to do with a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a legate container (no domain, no service port, or `legate.ignore=true`).
    Ignore,
    /// A legate container that is not to be routed now: stopped, paused, or not healthy.
    NotRouted(String),
    /// Registrations, with the value every key carries.
    Register(BTreeSet<Target>, RegistrationValue),
    /// Refused, and why.
    Refuse(String),
}

/// The label or environment variable a setting came from, for messages.
struct Setting<'a> {
    source: &'static str,
    value: &'a str,
}

/// Looks a setting up: the label wins over the environment variable.
fn setting<'a>(
    info: &'a ContainerInfo,
    label: &'static str,
    env: Option<&'static str>,
) -> Option<Setting<'a>> {
    if let Some(value) = info.labels.get(label) {
        return Some(Setting {
            source: label,
            value,
        });
    }
    let env = env?;
    // Docker keeps the last of duplicate variables; so do we.
    info.env.iter().rev().find_map(|entry| {
        let (key, value) = entry.split_once('=')?;
        (key == env).then_some(Setting { source: env, value })
    })
}

/// Applies the conventions to one container, publishing its ports under `host_ip`.
pub fn evaluate(info: &ContainerInfo, host_ip: HostIp, host_id: &HostId) -> Verdict {
    match evaluate_inner(info, host_ip, host_id) {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::Refuse(reason),
    }
}

fn evaluate_inner(
    info: &ContainerInfo,
    host_ip: HostIp,
    host_id: &HostId,
) -> Result<Verdict, String> {
    match info.labels.get("legate.ignore").map(String::as_str) {
        Some("true") => return Ok(Verdict::Ignore),
        Some("false") | None => {}
        Some(other) => {
            return Err(format!(
                "legate.ignore '{}' is neither true nor false",
                other.escape_default()
            ));
        }
    }
    let domains = setting(info, "legate.domain", Some("DOMAIN_NAME"));
    let service_ports = setting(info, "legate.service.port", Some("SERVICE_PORT"));
    if domains.is_none() && service_ports.is_none() {
        return Ok(Verdict::Ignore);
    }
    if !info.running {
        return Ok(Verdict::NotRouted("not running".to_owned()));
    }
    match info.health {
        Health::None | Health::Healthy => {}
        Health::Starting => return Ok(Verdict::NotRouted("health: starting".to_owned())),
        Health::Unhealthy => return Ok(Verdict::NotRouted("health: unhealthy".to_owned())),
    }

    let container_id = ContainerId::new(&info.id).map_err(|e| e.to_string())?;
    let container_name = ContainerName::new(&info.name).map_err(|e| e.to_string())?;
    let mut targets = BTreeSet::new();

    if let Some(domains) = domains {
        let domains = split_list(&domains, Domain::new)?;
        let port = match setting(info, "legate.port", Some("APP_PORT")) {
            Some(port) => Port::parse(Field::Port, port.value).map_err(|e| in_setting(&port, e))?,
            None => default_app_port(info)?,
        };
        for endpoint in endpoints(info, port, host_ip)? {
            for domain in &domains {
                targets.insert(Target::App(AppKey {
                    domain: domain.clone(),
                    container_id: container_id.clone(),
                    endpoint,
                }));
            }
        }
    }

    if let Some(ports) = service_ports {
        let ports = split_list(&ports, |s| Port::parse(Field::ServicePort, s))?;
        let name = match setting(info, "legate.service.name", Some("SERVICE_NAME")) {
            Some(name) => ServiceName::new(name.value).map_err(|e| in_setting(&name, e))?,
            None => ServiceName::new(&info.name).map_err(|e| e.to_string())?,
        };
        for service_port in ports {
            for endpoint in endpoints(info, service_port, host_ip)? {
                targets.insert(Target::Service(ServiceKey {
                    name: name.clone(),
                    service_port,
                    container_id: container_id.clone(),
                    endpoint,
                }));
            }
        }
    }

    let check = setting(info, "legate.check", Some("HEALTH_CHECK"))
        .map(|check| HealthCheck::parse(check.value).map_err(|e| in_setting(&check, e)))
        .transpose()?;
    let value = RegistrationValue {
        host_id: Some(host_id.clone()),
        container_name: Some(container_name),
        check,
        ..RegistrationValue::default()
    };
    Ok(Verdict::Register(targets, value))
}

fn in_setting(setting: &Setting<'_>, error: impl std::fmt::Display) -> String {
    format!("{}: {error}", setting.source)
}

/// A comma list, every element validated; nothing is trimmed.
fn split_list<T, E: std::fmt::Display>(
    setting: &Setting<'_>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Vec<T>, String> {
    setting
        .value
        .split(',')
        .map(|item| parse(item).map_err(|e| in_setting(setting, e)))
        .collect()
}

/// The only published TCP port, else 80.
fn default_app_port(info: &ContainerInfo) -> Result<Port, String> {
    let published: Vec<&String> = info
        .ports
        .iter()
        .filter(|(port, bindings)| port.ends_with("/tcp") && !bindings.is_empty())
        .map(|(port, _)| port)
        .collect();
    match published.as_slice() {
        [only] => {
            let number = only.trim_end_matches("/tcp");
            Port::parse(Field::Port, number).map_err(|e| format!("published port: {e}"))
        }
        _ => Ok(Port::new(Field::Port, 80).map_err(|e| e.to_string())?),
    }
}

/// Where `container_port` is reached from other hosts: one endpoint per distinct published
/// binding. A wildcard binding means `host_ip` when it is of the same family (`0.0.0.0` or the
/// old API's empty address for IPv4, `::` for IPv6); a wildcard of the other family is not
/// reachable there, and Docker may publish it on another port, which at `host_ip` can belong to
/// another container.
fn endpoints(
    info: &ContainerInfo,
    container_port: Port,
    host_ip: HostIp,
) -> Result<BTreeSet<Endpoint>, String> {
    let key = format!("{container_port}/tcp");
    let bindings = info.ports.get(&key).map(Vec::as_slice).unwrap_or_default();
    if bindings.is_empty() {
        return Err(format!("container port {key} is not published"));
    }
    let endpoints: BTreeSet<Endpoint> = bindings
        .iter()
        .filter_map(|binding| {
            let ip = match binding.host_ip.as_str() {
                "" | "0.0.0.0" if host_ip.get().is_ipv4() => host_ip,
                "::" if host_ip.get().is_ipv6() => host_ip,
                "" | "0.0.0.0" | "::" => return None,
                ip => match HostIp::parse(ip) {
                    Ok(ip) => ip,
                    Err(e) => return Some(Err(format!("binding of {key}: {e}"))),
                },
            };
            Some(
                Port::parse(Field::Port, &binding.host_port)
                    .map(|port| Endpoint { ip, port })
                    .map_err(|e| format!("binding of {key}: {e}")),
            )
        })
        .collect::<Result<_, _>>()?;
    if endpoints.is_empty() {
        return Err(format!(
            "container port {key} is published only on the wildcard address of the other IP \
             family than the host IP {host_ip}"
        ));
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn host() -> (HostIp, HostId) {
        (
            HostIp::parse("10.0.0.5").unwrap(),
            HostId::new("host-a").unwrap(),
        )
    }

    fn container(
        env: &[&str],
        labels: &[(&str, &str)],
        ports: &[(&str, &str, &str)],
    ) -> ContainerInfo {
        let mut map: BTreeMap<String, Vec<Binding>> = BTreeMap::new();
        for (port, ip, host_port) in ports {
            map.entry((*port).to_owned()).or_default().push(Binding {
                host_ip: (*ip).to_owned(),
                host_port: (*host_port).to_owned(),
            });
        }
        ContainerInfo {
            id: ID.to_owned(),
            name: "web-1".to_owned(),
            env: env.iter().map(|s| (*s).to_owned()).collect(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            running: true,
            stop_signal: None,
            health: Health::None,
            ports: map,
        }
    }

    fn targets(verdict: Verdict) -> Vec<String> {
        let Verdict::Register(targets, _) = verdict else {
            panic!("not registered: {verdict:?}");
        };
        targets
            .iter()
            .map(|t| match t {
                Target::App(k) => format!("app {} {}", k.domain, k.endpoint),
                Target::Service(k) => {
                    format!("service {} {} {}", k.name, k.service_port, k.endpoint)
                }
            })
            .collect()
    }

    #[test]
    fn seed_app_and_service() {
        let (ip, id) = host();
        let app = container(
            &["DOMAIN_NAME=blog.example.com"],
            &[],
            &[("80/tcp", "0.0.0.0", "32768"), ("80/tcp", "::", "32768")],
        );
        assert_eq!(
            targets(evaluate(&app, ip, &id)),
            ["app blog.example.com 10.0.0.5:32768"]
        );
        let mysql = container(
            &["MYSQL_ROOT_PASSWORD=x", "SERVICE_PORT=3306"],
            &[],
            &[("3306/tcp", "", "49153")],
        );
        assert_eq!(
            targets(evaluate(&mysql, ip, &id)),
            ["service web-1 3306 10.0.0.5:49153"]
        );
    }

    #[test]
    fn an_active_check_only_when_asked_for() {
        let (ip, id) = host();
        let check = |env: &[&str], labels: &[(&str, &str)]| {
            let mut env = env.to_vec();
            env.push("DOMAIN_NAME=blog.example.com");
            match evaluate(&container(&env, labels, &[("80/tcp", "", "8080")]), ip, &id) {
                Verdict::Register(_, value) => Ok(value.check),
                Verdict::Refuse(reason) => Err(reason),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(check(&[], &[]), Ok(None));
        assert_eq!(
            check(&["HEALTH_CHECK=tcp"], &[]),
            Ok(Some(HealthCheck::Tcp))
        );
        assert_eq!(
            check(
                &["HEALTH_CHECK=tcp"],
                &[("legate.check", "/healthz?full=1")]
            ),
            Ok(Some(HealthCheck::parse("/healthz?full=1").unwrap()))
        );
        assert_eq!(
            check(&[], &[("legate.check", "http")]),
            Err(
                "legate.check: health check 'http': is neither `tcp` nor an HTTP path \
                 (starting with /)"
                    .to_owned()
            )
        );
        let injected = check(&["HEALTH_CHECK=/x\nbackend evil"], &[]).unwrap_err();
        assert!(
            injected.starts_with("HEALTH_CHECK: check path"),
            "{injected}"
        );
    }

    #[test]
    fn a_wildcard_binding_counts_only_for_the_host_ip_of_its_family() {
        // Docker publishes the two wildcards on different ports once its allocators diverge.
        let bindings = [("80/tcp", "0.0.0.0", "32789"), ("80/tcp", "::", "32788")];
        let app = container(&["DOMAIN_NAME=blog.example.com"], &[], &bindings);
        let (ip, id) = host();
        assert_eq!(
            targets(evaluate(&app, ip, &id)),
            ["app blog.example.com 10.0.0.5:32789"]
        );
        let ipv6 = HostIp::parse("2001:db8::5").unwrap();
        assert_eq!(
            targets(evaluate(&app, ipv6, &id)),
            ["app blog.example.com [2001:db8::5]:32788"]
        );
        let only_ipv6 = container(
            &["DOMAIN_NAME=blog.example.com"],
            &[],
            &[("80/tcp", "::", "32788")],
        );
        match evaluate(&only_ipv6, ip, &id) {
            Verdict::Refuse(reason) => assert!(reason.contains("other IP family"), "{reason}"),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn comma_lists_labels_over_env_and_specific_bindings() {
        let (ip, id) = host();
        let info = container(
            &["DOMAIN_NAME=ignored.example.com", "SERVICE_PORT=1"],
            &[
                ("legate.domain", "a.example.com,B.example.com"),
                ("legate.service.port", "5432,6379"),
                ("legate.service.name", "db"),
            ],
            &[
                ("8080/tcp", "127.0.0.1", "41000"),
                ("5432/tcp", "", "41001"),
                ("6379/tcp", "192.168.1.9", "41002"),
            ],
        );
        let mut info = info;
        info.labels
            .insert("legate.port".to_owned(), "8080".to_owned());
        assert_eq!(
            targets(evaluate(&info, ip, &id)),
            [
                "app a.example.com 127.0.0.1:41000",
                "app b.example.com 127.0.0.1:41000",
                "service db 5432 10.0.0.5:41001",
                "service db 6379 192.168.1.9:41002",
            ]
        );
    }

    #[test]
    fn app_port_defaults_to_the_only_published_port_else_80() {
        let (ip, id) = host();
        let only = container(
            &["DOMAIN_NAME=a.com"],
            &[],
            &[("8080/tcp", "", "41000"), ("53/udp", "", "41001")],
        );
        assert_eq!(
            targets(evaluate(&only, ip, &id)),
            ["app a.com 10.0.0.5:41000"]
        );
        let two = container(
            &["DOMAIN_NAME=a.com"],
            &[],
            &[("8080/tcp", "", "41000"), ("80/tcp", "", "41002")],
        );
        assert_eq!(
            targets(evaluate(&two, ip, &id)),
            ["app a.com 10.0.0.5:41002"]
        );
    }

    #[test]
    fn not_routed_while_stopped_or_unhealthy() {
        let (ip, id) = host();
        let mut info = container(&["DOMAIN_NAME=a.com"], &[], &[("80/tcp", "", "41000")]);
        for health in [Health::Starting, Health::Unhealthy] {
            info.health = health;
            assert!(
                matches!(evaluate(&info, ip, &id), Verdict::NotRouted(_)),
                "{health:?}"
            );
        }
        info.health = Health::Healthy;
        assert!(matches!(evaluate(&info, ip, &id), Verdict::Register(..)));
        info.running = false;
        assert!(matches!(evaluate(&info, ip, &id), Verdict::NotRouted(_)));
    }

    #[test]
    fn ignored_containers() {
        let (ip, id) = host();
        let plain = container(&["PATH=/bin"], &[], &[("80/tcp", "", "41000")]);
        assert_eq!(evaluate(&plain, ip, &id), Verdict::Ignore);
        let opted_out = container(&["DOMAIN_NAME=a.com"], &[("legate.ignore", "true")], &[]);
        assert_eq!(evaluate(&opted_out, ip, &id), Verdict::Ignore);
    }

    #[test]
    fn refusals_name_the_setting_and_the_reason() {
        let (ip, id) = host();
        let published = [("80/tcp", "", "41000"), ("3306/tcp", "", "41001")];
        type Case = (
            Vec<&'static str>,
            Vec<(&'static str, &'static str)>,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                vec!["DOMAIN_NAME=a b.com"],
                vec![],
                "DOMAIN_NAME: domain 'a b.com': character ' ' at byte 1 is not allowed",
            ),
            (
                vec!["DOMAIN_NAME=a.com, b.com"],
                vec![],
                "DOMAIN_NAME: domain ' b.com': character ' ' at byte 0 is not allowed",
            ),
            (
                vec!["DOMAIN_NAME=a.com\nbackend x"],
                vec![],
                "DOMAIN_NAME: domain 'a.com\\nbackend x': character '\\n' at byte 5 is not allowed",
            ),
            (
                vec!["DOMAIN_NAME=a.com,"],
                vec![],
                "DOMAIN_NAME: domain '': is empty",
            ),
            (
                vec!["SERVICE_PORT=mysql"],
                vec![],
                "SERVICE_PORT: service port 'mysql': is not a decimal number",
            ),
            (
                vec!["SERVICE_PORT=70000"],
                vec![],
                "SERVICE_PORT: service port '70000': is out of range 1-65535",
            ),
            (
                vec!["SERVICE_PORT=9999"],
                vec![],
                "container port 9999/tcp is not published",
            ),
            (
                vec!["DOMAIN_NAME=a.com", "APP_PORT=8o"],
                vec![],
                "APP_PORT: port '8o': is not a decimal number",
            ),
            (
                vec!["SERVICE_PORT=3306", "SERVICE_NAME=my sql"],
                vec![],
                "SERVICE_NAME: service name 'my sql': character ' ' at byte 2 is not allowed",
            ),
            (
                vec![],
                vec![("legate.domain", "*.*.com")],
                "legate.domain: domain '*.*.com': '*' is only allowed as a whole first label, as in '*.example.com'",
            ),
            (
                vec![],
                vec![("legate.ignore", "yes"), ("legate.domain", "a.com")],
                "legate.ignore 'yes' is neither true nor false",
            ),
        ];
        for (env, labels, reason) in cases {
            let info = container(&env, &labels, &published);
            assert_eq!(
                evaluate(&info, ip, &id),
                Verdict::Refuse(reason.to_owned()),
                "{env:?} {labels:?}"
            );
        }
    }
}
