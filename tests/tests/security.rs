//! The attacks on legate's control plane, replayed against the real services: an unprivileged
//! local user, a TCP listener without credentials, a caller without a certificate or with the
//! wrong one, a node speaking for another. Each is refused, and the legitimate paths still work
//! with the right credentials. (Configurations that would run code or read files are refused by
//! the policy: `tests/supervisor.rs`.)

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests themselves

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use anyhow::Result;
use legate_proto::transport;
use legate_proto::v1;
use legate_proto::v1::confgen_client::ConfgenClient;
use legate_proto::v1::supervisor_client::SupervisorClient;
use legate_tests::etcd::Etcd;
use legate_tests::pki::{Issued, Pki};
use legate_tests::service::{self, Service};
use legate_tests::supervisor::Supervised;
use legate_tests::{WAIT, free_addr, free_port, wait_for};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Debian's unprivileged user and group.
const NOBODY: u32 = 65534;

/// `legate-probe <endpoint> <call> <node>` as root, or as nobody:nogroup with no supplementary
/// group; what it printed.
fn probe(as_nobody: bool, endpoint: &str, call: &str, node: &str) -> String {
    let binary = service::binary("legate-probe").unwrap();
    let mut command = if as_nobody {
        let mut command = Command::new("setpriv");
        command
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
            ])
            .arg(binary);
        command
    } else {
        Command::new(binary)
    };
    let output = command.args([endpoint, call, node]).output().unwrap();
    assert!(output.status.success(), "legate-probe: {output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A directory anyone may enter, for a socket whose own mode decides who connects.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("legate-socket-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Regression: every gRPC API was open to any local user on a loopback TCP port, `Apply` among
/// them. On the Unix socket, the kernel names the caller: a member of the socket's group may
/// read and act as a local node, only root and the service's user administer, and nobody else
/// connects at all.
#[tokio::test]
async fn on_the_unix_socket_only_root_and_the_owner_administer() {
    let dir = open_dir();
    let socket = dir.path().join("supervisor.sock");
    let endpoint = format!("unix:{}", socket.display());
    let supervised = Supervised::new().unwrap();
    let supervisor = supervised
        .start(
            None,
            &["--listen", &endpoint, "--grpc-socket-group", "nogroup"],
        )
        .unwrap();
    // Without a configuration it is not SERVING yet, but it answers.
    supervisor.connect().await.unwrap();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "the group may connect");
    assert_eq!(meta.gid(), NOBODY, "the group is nogroup");

    assert_eq!(probe(true, &endpoint, "supervisor-status", ""), "OK");
    assert_eq!(
        probe(true, &endpoint, "apply", ""),
        "PermissionDenied",
        "a group member administers"
    );
    assert_eq!(
        supervisor.metric("legate_grpc_denied_total").await.unwrap(),
        1.0
    );
    assert!(
        supervisor.log().contains("call denied"),
        "{}",
        supervisor.log()
    );
    assert_eq!(
        probe(false, &endpoint, "apply", ""),
        "OK",
        "root administers"
    );

    // Without the group, the socket is the owner's alone.
    let etcd = Etcd::start().await.unwrap();
    let dir = open_dir();
    let endpoint = format!("unix:{}", dir.path().join("confgen.sock").display());
    let mut confgen = Service::confgen(
        &etcd.endpoint(),
        free_port().unwrap(),
        &[
            "--listen",
            &endpoint,
            "--grpc-socket-group",
            "legate-absent",
        ],
        &[],
    )
    .unwrap();
    confgen.wait_serving().await.unwrap();
    let meta = std::fs::metadata(dir.path().join("confgen.sock")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    let said = probe(true, &endpoint, "confgen-status", "");
    assert!(said.starts_with("connect:"), "nobody connected: {said}");
    assert_eq!(probe(false, &endpoint, "report", "node-x"), "OK");

    // A second service on a socket that answers stops; one left by a killed process is
    // replaced.
    let mut second = Service::confgen(
        &etcd.endpoint(),
        free_port().unwrap(),
        &["--listen", &endpoint],
        &[],
    )
    .unwrap();
    assert!(!second.wait_exit(WAIT).await.unwrap().success());
    assert!(
        second.log().contains("another process serves it"),
        "{}",
        second.log()
    );
    confgen.restart().unwrap();
    confgen.wait_serving().await.unwrap();
    assert_eq!(probe(false, &endpoint, "confgen-status", ""), "OK");
}

/// Regression: a TCP listener served anyone. Now it needs mutual TLS, or the lab opt-out, which
/// the log says loudly.
#[tokio::test]
async fn tcp_without_mutual_tls_is_refused_unless_a_lab_asks_for_it() {
    let etcd = Etcd::start().await.unwrap();
    let addr = free_addr().unwrap().to_string();
    let mut refused = Service::confgen(
        &etcd.endpoint(),
        free_port().unwrap(),
        &["--listen", &addr],
        &[],
    )
    .unwrap();
    let status = refused.wait_exit(WAIT).await.unwrap();
    assert!(!status.success());
    assert!(
        refused.log().contains("needs mutual TLS"),
        "{}",
        refused.log()
    );

    let mut lab = Service::confgen(
        &etcd.endpoint(),
        free_port().unwrap(),
        &["--listen", &addr, "--grpc-insecure"],
        &[],
    )
    .unwrap();
    let endpoint = format!("http://{addr}");
    wait_for("the lab confgen to answer", WAIT, || {
        let endpoint = endpoint.clone();
        async move { Ok((probe(false, &endpoint, "confgen-status", "") == "OK").then_some(())) }
    })
    .await
    .unwrap();
    assert!(
        lab.log().contains("WITHOUT authentication"),
        "{}",
        lab.log()
    );
    lab.terminate(WAIT).await.unwrap();
}

/// A TLS client of `endpoint` with `tls`'s files.
fn tls_channel(endpoint: &str, tls: &Issued) -> Channel {
    transport::channel(endpoint, &tls.tls()).unwrap()
}

/// Flags of a gRPC listener on TCP `addr` with mutual TLS by `cert`, administered by `ops`.
fn tls_listener(addr: &str, cert: &Issued) -> Vec<String> {
    let mut args = vec![
        "--listen".to_owned(),
        addr.to_owned(),
        "--grpc-admin".to_owned(),
        "ops".to_owned(),
    ];
    args.extend(cert.grpc_flags());
    args
}

/// The call's gRPC code, `Ok` when it succeeded.
fn code<T>(result: Result<T, tonic::Status>) -> Code {
    result.map_or_else(|s| s.code(), |_| Code::Ok)
}

/// Regression: `Confgen.Watch` handed the fleet's configuration to anyone, `Confgen.Report`
/// took a forged result for another node, `Supervisor.Apply` took any configuration. Over TCP
/// now: no certificate, another CA's, or an expired one is not served; a node's certificate
/// watches and reports for that node only; only an administrator's applies. And the legitimate
/// path, a supervisor subscribed to confgen over mutual TLS, applies and reports.
#[tokio::test]
async fn over_tcp_each_caller_is_what_its_certificate_names() -> Result<()> {
    let pki = Pki::new("legate test CA")?;
    let confgen_cert = pki.issue(&["confgen", "127.0.0.1"])?;
    let node = pki.issue(&["node-a", "127.0.0.1"])?;
    let ops = pki.issue(&["ops"])?;
    let expired = pki.issue_expired(&["node-a"])?;
    let other_ca = Pki::new("another CA")?;
    let stranger = other_ca.issue(&["node-a"])?;

    let etcd = Etcd::start().await?;
    let confgen_addr = free_addr()?.to_string();
    let args = tls_listener(&confgen_addr, &confgen_cert);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _confgen = Service::confgen(&etcd.endpoint(), free_port()?, &args, &[])?;
    let confgen_url = format!("https://{confgen_addr}");
    let as_ops = ConfgenClient::new(tls_channel(&confgen_url, &ops));
    wait_for("confgen over mutual TLS", WAIT, || {
        let mut client = as_ops.clone();
        async move {
            Ok(client
                .status(v1::ConfgenStatusRequest {})
                .await
                .ok()
                .map(drop))
        }
    })
    .await?;

    // No certificate, another CA's, an expired one: the handshake fails, nothing is served.
    let ca = Certificate::from_pem(std::fs::read(pki.ca_file())?);
    let anonymous = Endpoint::from_shared(confgen_url.clone())?
        .tls_config(ClientTlsConfig::new().ca_certificate(ca.clone()))?
        .connect_lazy();
    let strangers = [
        ("no certificate", anonymous),
        ("another CA", tls_channel(&confgen_url, &stranger)),
        ("expired", tls_channel(&confgen_url, &expired)),
    ];
    for (who, channel) in strangers {
        let watched = ConfgenClient::new(channel)
            .watch(v1::WatchRequest {
                node_id: "node-a".to_owned(),
                ..Default::default()
            })
            .await;
        assert!(watched.is_err(), "{who}: served");
    }

    // A node's certificate: its own node only.
    let mut as_node = ConfgenClient::new(tls_channel(&confgen_url, &node));
    let watch = |node_id: &str| v1::WatchRequest {
        node_id: node_id.to_owned(),
        ..Default::default()
    };
    let report = |node_id: &str| v1::ApplyReport {
        node_id: node_id.to_owned(),
        result: Some(v1::ApplyResult::default()),
    };
    assert_eq!(code(as_node.watch(watch("node-a")).await), Code::Ok);
    assert_eq!(
        code(as_node.watch(watch("node-b")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(as_node.report(report("node-b")).await),
        Code::PermissionDenied,
        "a forged report"
    );
    assert_eq!(code(as_node.report(report("node-a")).await), Code::Ok);
    let mut as_ops = as_ops.clone();
    assert_eq!(code(as_ops.report(report("node-b")).await), Code::Ok);

    // A supervisor on TCP with the node's certificate, subscribed to confgen over mutual TLS.
    let supervisor_addr = free_addr()?.to_string();
    let args = tls_listener(&supervisor_addr, &node);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let supervised = Supervised::new()?;
    let supervisor = supervised.start(Some(&confgen_url), &args)?;
    wait_for("the supervisor to report to confgen", WAIT, || {
        let mut client = as_ops.clone();
        async move {
            let status = client
                .status(v1::ConfgenStatusRequest {})
                .await?
                .into_inner();
            Ok(status
                .nodes
                .into_iter()
                .find(|n| n.node_id == "node-a" && n.connected && !n.running_checksum.is_empty()))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", supervisor.log()))?;

    let supervisor_url = format!("https://{supervisor_addr}");
    let snapshot = v1::ConfigSnapshot::default();
    let mut as_node = SupervisorClient::new(tls_channel(&supervisor_url, &node));
    assert_eq!(
        code(as_node.apply(snapshot.clone()).await),
        Code::PermissionDenied,
        "a node administers the supervisor"
    );
    let mut as_ops = SupervisorClient::new(tls_channel(&supervisor_url, &ops));
    assert_eq!(code(as_ops.apply(snapshot).await), Code::Ok);
    Ok(())
}

/// Starts `binary` on etcd with `args` and waits for it to stop on its own; its log.
async fn refused(binary: &str, args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut service = match binary {
        "legate-confgen" => Service::confgen(args[1], free_port().unwrap(), &args[2..], &[]),
        _ => Service::start(
            binary,
            &args,
            &[("HOST_IP", "127.0.0.1"), ("HOST_ID", "refused")],
        ),
    }
    .unwrap();
    let status = service
        .wait_exit(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{binary} did not stop: {e}\n{}", service.log()));
    assert!(!status.success(), "{binary}: {status}");
    service.log()
}

/// `--etcd-endpoints <endpoint>` and `extra`.
fn etcd_args(endpoint: &str, extra: &[String]) -> Vec<String> {
    let mut args = vec!["--etcd-endpoints".to_owned(), endpoint.to_owned()];
    args.extend_from_slice(extra);
    args
}

/// Regression: `https://` endpoints were refused and nothing else was possible, so a fleet's
/// etcd traffic crossed the network in clear. Against an etcd that speaks only TLS and wants a
/// client certificate: the right files work for confgen and the registrar; no certificate,
/// another CA's, an expired one, or a server CA that is not etcd's stop the service at once
/// with the cause, instead of a retry loop that hides it.
#[tokio::test]
async fn etcd_over_tls_needs_a_valid_client_certificate_and_says_what_is_wrong() -> Result<()> {
    let pki = Pki::new("legate etcd CA")?;
    let etcd = Etcd::start_tls(&pki).await?;
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));
    let good = pki.issue(&["legate"])?;
    let other_ca = Pki::new("another CA")?;
    let stranger = other_ca.issue(&["legate"])?;
    let expired = pki.issue_expired(&["legate"])?;

    // The right files: confgen syncs, the registrar claims its host id.
    let args = etcd_args(&endpoint, &good.etcd_flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut confgen = Service::confgen(args[1], free_port()?, &args[2..], &[])?;
    confgen.wait_serving().await?;
    let mut registrar = Service::start(
        "legate-registrar",
        &[&args[..], &["--filter", "label=legate.test.none"]].concat(),
        &[("HOST_IP", "127.0.0.1"), ("HOST_ID", "tls-host")],
    )?;
    registrar.wait_serving().await?;
    let mut client = etcd.client().await?;
    let hosts = client.get("/hosts/tls-host", None).await?;
    assert_eq!(hosts.kvs().len(), 1, "the host record is in etcd");

    // `--etcd-cacert` from `ca`, the client certificate and key from `client`.
    let files = |ca: &std::path::Path, client: Option<&Issued>| {
        let mut flags = vec!["--etcd-cacert".to_owned(), ca.display().to_string()];
        if let Some(client) = client {
            flags.extend([
                "--etcd-cert".to_owned(),
                client.cert.display().to_string(),
                "--etcd-key".to_owned(),
                client.key.display().to_string(),
            ]);
        }
        flags
    };
    let refused_cert = "etcd refused this client's certificate";
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("no client certificate", files(&good.ca, None), refused_cert),
        (
            "another CA's",
            files(&good.ca, Some(&stranger)),
            refused_cert,
        ),
        ("expired", files(&good.ca, Some(&expired)), refused_cert),
        (
            "a server CA that is not etcd's",
            files(&other_ca.ca_file(), Some(&good)),
            "does not verify against --etcd-cacert",
        ),
        (
            "plain http to a TLS etcd with TLS files",
            good.etcd_flags(),
            "use https://",
        ),
    ];
    for (case, extra, cause) in cases {
        let target = if case.starts_with("plain") {
            endpoint.replace("https://", "http://")
        } else {
            endpoint.clone()
        };
        for binary in ["legate-confgen", "legate-registrar"] {
            let log = refused(binary, &etcd_args(&target, &extra)).await;
            assert!(
                log.contains(cause),
                "{case}, {binary}: no {cause:?} in\n{log}"
            );
        }
    }
    Ok(())
}

/// Regression: there was no etcd user or password at all, so anyone who reached etcd could
/// write registrations. With authentication on and roles limited to legate's prefix: a writer
/// registers, a reader is enough for confgen; a wrong password, no credentials, or a reader
/// as registrar stop the service with the cause.
#[tokio::test]
async fn etcd_authentication_with_roles_limited_to_the_prefix() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    etcd.enable_auth(
        &[
            (
                "legate-rw",
                etcd_client::Permission::read_write("/legate/").with_prefix(),
            ),
            (
                "legate-ro",
                etcd_client::Permission::read("/legate/").with_prefix(),
            ),
        ],
        &[
            ("registrar", "registrar-secret", "legate-rw"),
            ("reader", "reader-secret", "legate-ro"),
        ],
    )
    .await?;
    let secrets = tempfile::tempdir()?;
    let password = |name: &str, password: &str| {
        let path = secrets.path().join(name);
        std::fs::write(&path, format!("{password}\n")).unwrap();
        path.display().to_string()
    };
    let credentials = |user: &str, file: String| {
        vec![
            "--prefix".to_owned(),
            "/legate".to_owned(),
            "--etcd-user".to_owned(),
            user.to_owned(),
            "--etcd-password-file".to_owned(),
            file,
        ]
    };
    let writer = credentials("registrar", password("registrar", "registrar-secret"));
    let reader = credentials("reader", password("reader", "reader-secret"));
    let wrong = credentials("registrar", password("wrong", "guessed"));

    let args = etcd_args(&etcd.endpoint(), &writer);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut registrar = Service::start(
        "legate-registrar",
        &[&args[..], &["--filter", "label=legate.test.none"]].concat(),
        &[("HOST_IP", "127.0.0.1"), ("HOST_ID", "auth-host")],
    )?;
    registrar.wait_serving().await?;
    let mut client = etcd.client().await?;
    assert_eq!(
        client
            .get("/legate/hosts/auth-host", None)
            .await?
            .kvs()
            .len(),
        1
    );
    assert!(
        !registrar.log().contains("reader-secret") && !registrar.log().contains("registrar-secret"),
        "a password in the log"
    );

    let args = etcd_args(&etcd.endpoint(), &reader);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut confgen = Service::confgen(args[1], free_port()?, &args[2..], &[])?;
    confgen.wait_serving().await?;

    let endpoint = etcd.endpoint();
    let no_prefix_access = vec!["--prefix".to_owned(), "/other".to_owned()];
    let cases: Vec<(&str, &str, Vec<String>, &str)> = vec![
        (
            "legate-registrar",
            "a wrong password",
            wrong.clone(),
            "authentication failed",
        ),
        (
            "legate-confgen",
            "a wrong password",
            wrong,
            "authentication failed",
        ),
        (
            "legate-confgen",
            "no credentials",
            no_prefix_access,
            "--etcd-user",
        ),
        (
            "legate-registrar",
            "a reader as registrar",
            reader,
            "permission denied",
        ),
    ];
    for (binary, case, extra, cause) in cases {
        let log = refused(binary, &etcd_args(&endpoint, &extra)).await;
        assert!(
            log.contains(cause),
            "{case}, {binary}: no {cause:?} in\n{log}"
        );
    }
    Ok(())
}
