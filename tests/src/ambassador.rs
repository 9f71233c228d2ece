//! A whole ambassador run as processes, the way the end-to-end tests use it: one etcd, confgen
//! and a supervisor with HAProxy, and registrars for "hosts" that share this Docker engine, each
//! with its own host id, address (its containers publish on it) and container label.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use crate::docker::{self, Container};
use crate::etcd::Etcd;
use crate::pki::Pki;
use crate::service::Service;
use crate::supervisor::Supervised;
use crate::{free_port, http_get};

/// etcd, confgen and a supervisor whose HAProxy listens on `bind`.
#[derive(Debug)]
pub struct Ambassador {
    /// The registry.
    pub etcd: Etcd,
    /// confgen, watching `etcd`.
    pub confgen: Service,
    /// The supervisor, following `confgen`.
    pub supervisor: Service,
    supervised: Supervised,
    bind: IpAddr,
    http: u16,
    /// The registrars' etcd flags beyond the endpoint (TLS files).
    etcd_flags: Vec<String>,
    /// The CA of a secured ambassador, whose files live as long as it.
    _pki: Option<Pki>,
}

/// An ambassador but its supervisor.
struct Parts {
    etcd: Etcd,
    confgen: Service,
    bind: IpAddr,
    http: u16,
    etcd_flags: Vec<String>,
    pki: Option<Pki>,
}

impl Parts {
    /// Starts a supervisor following confgen at `endpoint` with `flags`, and waits until it
    /// serves.
    async fn with_supervisor(self, endpoint: &str, flags: &[String]) -> Result<Ambassador> {
        let supervised = Supervised::new()?;
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut supervisor = supervised.start(Some(endpoint), &flags)?;
        supervisor.wait_serving().await?;
        Ok(Ambassador {
            etcd: self.etcd,
            confgen: self.confgen,
            supervisor,
            supervised,
            bind: self.bind,
            http: self.http,
            etcd_flags: self.etcd_flags,
            _pki: self.pki,
        })
    }
}

impl Ambassador {
    /// Starts the ambassador with its HTTP frontend and TCP listeners on `bind`, and waits
    /// until HAProxy runs the first configuration.
    pub async fn start(bind: IpAddr) -> Result<Self> {
        Self::start_with(bind, &[]).await
    }

    /// [`Ambassador::start`] with more flags for the supervisor.
    pub async fn start_with(bind: IpAddr, supervisor: &[&str]) -> Result<Self> {
        let etcd = Etcd::start().await?;
        let http = free_port()?;
        let (bind_arg, http_arg) = (bind.to_string(), http.to_string());
        let mut confgen = Service::start(
            "legate-confgen",
            &[
                "--etcd-endpoints",
                &etcd.endpoint(),
                "--bind-address",
                &bind_arg,
                "--http-port",
                &http_arg,
            ],
            &[],
        )?;
        confgen.wait_serving().await?;
        let endpoint = confgen.grpc();
        Parts {
            etcd,
            confgen,
            bind,
            http,
            etcd_flags: Vec::new(),
            pki: None,
        }
        .with_supervisor(
            &endpoint,
            &supervisor
                .iter()
                .map(|f| (*f).to_owned())
                .collect::<Vec<_>>(),
        )
        .await
    }

    /// [`Ambassador::start`] with every wire between hosts secured, as a fleet runs it: etcd
    /// speaks only TLS and wants client certificates; confgen serves supervisors on TCP with
    /// mutual TLS, and the supervisor subscribes with its node's certificate (`node-a`).
    pub async fn start_secured(bind: IpAddr) -> Result<Self> {
        let pki = Pki::new("legate fleet CA")?;
        let etcd = Etcd::start_tls(&pki).await?;
        let etcd_flags = pki.issue(&["legate"])?.etcd_flags();
        let confgen_cert = pki.issue(&["confgen", "127.0.0.1"])?;
        let node = pki.issue(&["node-a", "127.0.0.1"])?;
        let http = free_port()?;
        let grpc = crate::free_addr()?.to_string();
        let (bind_arg, http_arg) = (bind.to_string(), http.to_string());
        let mut args = vec![
            "--etcd-endpoints".to_owned(),
            etcd.endpoint(),
            "--bind-address".to_owned(),
            bind_arg,
            "--http-port".to_owned(),
            http_arg,
            "--listen".to_owned(),
            grpc.clone(),
        ];
        args.extend(etcd_flags.iter().cloned());
        args.extend(confgen_cert.grpc_flags());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut confgen = Service::start("legate-confgen", &args, &[])?.with_client_tls(node.tls());
        confgen.wait_serving().await?;
        Parts {
            etcd,
            confgen,
            bind,
            http,
            etcd_flags,
            pki: Some(pki),
        }
        .with_supervisor(&format!("https://{grpc}"), &node.grpc_flags())
        .await
    }

    /// The HTTP frontend.
    pub fn http(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.http)
    }

    /// A TCP listener of the ambassador: `port` is a service port.
    pub fn service(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.bind, port)
    }

    /// GET `path` through the ambassador with the Host header `host`.
    pub async fn get(&self, host: &str, path: &str) -> Result<(u16, String)> {
        http_get(self.http(), host, path).await
    }

    /// The supervisor's directories (HAProxy's sockets among them).
    pub fn supervised(&self) -> &Supervised {
        &self.supervised
    }

    /// Starts a registrar for a host with address `ip` (its containers publish on it) and
    /// lease TTL `ttl` seconds.
    pub async fn host(&self, ip: Ipv4Addr, ttl: u32) -> Result<Host> {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "host-{}-{}",
            docker::run_id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let label = format!("legate.test.host={id}");
        let filter = format!("label={label}");
        let (ip_env, ttl, endpoint) = (ip.to_string(), ttl.to_string(), self.etcd.endpoint());
        let mut args = vec![
            "--etcd-endpoints",
            &endpoint,
            "--filter",
            &filter,
            "--lease-ttl",
            &ttl,
        ];
        args.extend(self.etcd_flags.iter().map(String::as_str));
        let mut registrar = Service::start(
            "legate-registrar",
            &args,
            &[("HOST_IP", &ip_env), ("HOST_ID", &id)],
        )?;
        registrar.wait_serving().await?;
        Ok(Host {
            registrar,
            id,
            label,
            ip,
        })
    }

    /// The supervisor's, confgen's and the registrars' logs, for a failure message.
    pub fn logs(&self, hosts: &[&Host]) -> String {
        let mut text = format!(
            "confgen:\n{}\nsupervisor:\n{}",
            self.confgen.log(),
            self.supervisor.log()
        );
        for host in hosts {
            text.push_str(&format!(
                "\nregistrar {}:\n{}",
                host.id,
                host.registrar.log()
            ));
        }
        text
    }
}

/// A "host": a registrar that only sees the containers started through it.
#[derive(Debug)]
pub struct Host {
    /// The host's registrar.
    pub registrar: Service,
    id: String,
    label: String,
    ip: Ipv4Addr,
}

impl Host {
    /// The host id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs a container on this host: `args` are `docker run` options, the image and command;
    /// `ports` are container ports published on the host's address.
    pub async fn run(&self, ports: &[u16], args: &[&str]) -> Result<Container> {
        let args = self.args(ports, args);
        Container::run(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .await
            .with_context(|| format!("running a container on {}", self.id))
    }

    /// Creates a container on this host, like [`Host::run`] but not started.
    pub async fn create(&self, ports: &[u16], args: &[&str]) -> Result<Container> {
        let args = self.args(ports, args);
        Container::create(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .await
            .with_context(|| format!("creating a container on {}", self.id))
    }

    fn args(&self, ports: &[u16], args: &[&str]) -> Vec<String> {
        let mut full = vec!["--label".to_owned(), self.label.clone()];
        for p in ports {
            full.extend(["-p".to_owned(), format!("{}::{p}", self.ip)]);
        }
        full.extend(args.iter().map(|a| (*a).to_owned()));
        full
    }
}
