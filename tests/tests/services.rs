//! What every service binary does: configuration, health, metrics, clean shutdown.

#![allow(clippy::unwrap_used)]

use legate_proto::v1::ApplyOutcome;
use legate_proto::v1::supervisor_client::SupervisorClient;
use legate_tests::WAIT;
use legate_tests::etcd::Etcd;
use legate_tests::free_port;
use legate_tests::service::Service;
use legate_tests::supervisor::{Supervised, config};

const BINARIES: [&str; 3] = ["legate-registrar", "legate-confgen", "legate-supervisor"];

#[tokio::test]
async fn each_service_serves_health_and_metrics_and_stops_on_sigterm() {
    let etcd = Etcd::start().await.unwrap();
    let endpoint = etcd.endpoint();
    for binary in BINARIES {
        // The registrar reports SERVING once it holds its host id in etcd.
        let env = [
            ("ETCD_ENDPOINTS", endpoint.as_str()),
            ("HOST_IP", "127.0.0.1"),
            ("HOST_ID", "services-test"),
        ];
        let args = ["--log-format", "json"];
        // The supervisor reports SERVING once HAProxy runs a configuration.
        let supervised = Supervised::new().unwrap();
        let mut service = if binary == "legate-supervisor" {
            let service = supervised.start(None, &args).unwrap();
            apply_minimal_config(&service).await;
            service
        } else {
            Service::start(binary, &args, &env).unwrap()
        };
        service.wait_serving().await.unwrap();
        let metrics = service.metrics_text().await.unwrap();
        let service_name = binary.trim_start_matches("legate-");
        assert!(
            metrics.contains(&format!("legate_build_info{{service=\"{binary}\"")),
            "{service_name} metrics: {metrics}"
        );
        let status = service.terminate(WAIT).await.unwrap();
        assert!(
            status.success(),
            "{binary} exited with {status}:\n{}",
            service.log()
        );
        let log = service.log();
        let first = log.lines().next().unwrap_or_default();
        assert!(
            serde_json::from_str::<serde_json::Value>(first).is_ok(),
            "{binary} logs JSON with --log-format json: {first}"
        );
        assert!(log.contains("SIGTERM"), "{binary} logs the signal:\n{log}");
    }
}

async fn apply_minimal_config(supervisor: &Service) {
    let mut client = SupervisorClient::new(supervisor.connect().await.unwrap());
    let snapshot = config(free_port().unwrap(), &[], "");
    let result = client.apply(snapshot).await.unwrap().into_inner();
    assert_eq!(result.outcome(), ApplyOutcome::Reloaded, "{result:?}");
}

#[tokio::test]
async fn a_bad_configuration_exits_with_64_and_says_why() {
    type Case = (
        &'static str,
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: [Case; 9] = [
        (
            "legate-registrar",
            &[],
            &[("HOST_IP", "0.0.0.0")],
            "unspecified",
        ),
        (
            "legate-registrar",
            &[],
            &[("ETCD_HOST", "https://etcd:2379")],
            "need --etcd-cacert",
        ),
        (
            "legate-registrar",
            &["--etcd-cacert", "/ca.pem"],
            &[],
            "use https://",
        ),
        (
            "legate-confgen",
            &["--listen", "127.0.0.1:7999"],
            &[],
            "needs mutual TLS",
        ),
        (
            "legate-supervisor",
            &["--grpc-ca", "/ca.pem"],
            &[],
            "go together",
        ),
        ("legate-confgen", &["--prefix", "legate/"], &[], "prefix"),
        ("legate-supervisor", &["--log-format", "xml"], &[], "xml"),
        // Would break HAProxy's configuration: refused before anything is written.
        (
            "legate-supervisor",
            &["--state-dir", "/tmp/a b"],
            &[],
            "without spaces",
        ),
        (
            "legate-supervisor",
            &[],
            &[("LEGATE_HARD_STOP_AFTER", "10 minutes")],
            "unit",
        ),
    ];
    for (binary, args, env, says) in cases {
        let mut service = Service::start(binary, args, env).unwrap();
        let status = service.wait_exit(WAIT).await.unwrap();
        assert_eq!(
            status.code(),
            Some(64),
            "{binary} {args:?} {env:?}: {}",
            service.log()
        );
        assert!(
            service.log().contains(says),
            "{binary} error says {says:?}: {}",
            service.log()
        );
    }
}

/// Regression (#13, item 11): the configuration table gave confgen's and the supervisor's
/// listeners as `:7402`/`:7403` (every interface) while they bind 127.0.0.1. The table
/// (docs/configuration.md, once in the README) states what each binary's `--help` says.
#[test]
fn the_configuration_table_states_each_services_default_listeners() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let readme = std::fs::read_to_string(path).unwrap();
    for flag in ["--listen", "--metrics-listen"] {
        let row = readme
            .lines()
            .find(|line| line.starts_with(&format!("| `{flag}` ")))
            .unwrap_or_else(|| panic!("no row for {flag} in {path}"));
        for binary in BINARIES {
            let help = std::process::Command::new(legate_tests::service::binary(binary).unwrap())
                .arg("--help")
                .output()
                .unwrap();
            let help = String::from_utf8_lossy(&help.stdout);
            // clap prints the flag's help, then "[env: ...] [default: <addr>]".
            let after = &help[help.find(&format!("{flag} <")).unwrap()..];
            let default = after
                .split("[default: ")
                .nth(1)
                .and_then(|rest| rest.split(']').next())
                .unwrap();
            let name = binary.trim_start_matches("legate-");
            assert!(
                row.contains(&format!("{name} `{default}`")),
                "{path} says {row:?}, {binary} {flag} defaults to {default}"
            );
        }
    }
}

/// A metrics port that another process holds: each service names the process and exits 64 at
/// once, which the systemd units do not restart (a loop on "address in use" said nothing new).
#[tokio::test]
async fn a_taken_metrics_port_is_named_with_its_holder_and_exits_64() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    for binary in BINARIES {
        let socket = format!(
            "unix:{}",
            dir.path().join(format!("{binary}.sock")).display()
        );
        let output = tokio::process::Command::new(legate_tests::service::binary(binary).unwrap())
            .args(["--metrics-listen", &addr, "--listen", &socket])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .output()
            .await
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(64), "{binary}: {log}");
        for said in [
            "cannot serve metrics".to_owned(),
            format!("(pid {}) holds it", std::process::id()),
            "--metrics-listen (LEGATE_METRICS_LISTEN)".to_owned(),
        ] {
            assert!(log.contains(&said), "{binary} does not say {said:?}: {log}");
        }
    }
    drop(holder);
}
