//! Self-tests of the harness: each piece starts, answers, and is cleaned up.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use legate_tests::backend::Backend;
use legate_tests::docker::{self, Container, Network};
use legate_tests::etcd::Etcd;
use legate_tests::haproxy::{self, Haproxy};
use legate_tests::{WAIT, free_port, http_get, service, tcp_banner, wait_for};

/// Waits for a killed process to be gone: SIGKILL is delivered asynchronously.
async fn wait_gone(what: &str, pid: u32) -> anyhow::Result<()> {
    wait_for(&format!("{what} {pid} to be gone"), WAIT, || async {
        Ok((!legate_tests::process_alive(pid)).then_some(()))
    })
    .await
}

#[tokio::test]
async fn etcd_starts_keeps_data_across_a_restart_and_is_cleaned_up() {
    let mut etcd = Etcd::start().await.unwrap();
    let mut client = etcd.client().await.unwrap();
    client
        .put("/legate-harness/key", "value", None)
        .await
        .unwrap();

    etcd.restart().await.unwrap();
    let mut client = etcd.client().await.unwrap();
    let got = client.get("/legate-harness/key", None).await.unwrap();
    assert_eq!(
        got.kvs()[0].value(),
        b"value",
        "data kept across the restart"
    );

    let (pid, dir) = (etcd.pid(), etcd.dir().to_owned());
    assert!(legate_tests::process_alive(pid));
    drop(etcd);
    assert!(
        !legate_tests::process_alive(pid),
        "etcd {pid} still runs after drop"
    );
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
}

/// Free ports come from below the ephemeral range, where no outgoing connection or `bind(0)`
/// can take them before their user binds them, each once.
#[test]
fn free_ports_are_distinct_and_below_the_ephemeral_range() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let ports: std::collections::BTreeSet<u16> = (0..200).map(|_| free_port().unwrap()).collect();
    assert_eq!(ports.len(), 200, "each port handed out once");
    assert!(ports.iter().all(|port| *port < low), "{ports:?}");
}

/// A port found free but taken before etcd binds it: etcd exits, and is started again on
/// other ports at once.
#[tokio::test]
async fn etcd_whose_port_was_taken_meanwhile_starts_on_another() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let mut handed = 0;
    let mut ports = || {
        handed += 1;
        if handed == 1 {
            Ok(taken_port)
        } else {
            free_port()
        }
    };
    let started = std::time::Instant::now();
    let etcd = Etcd::start_on(&mut ports).await.unwrap();
    assert_ne!(etcd.port(), taken_port);
    assert_eq!(handed, 4, "two ports per attempt, two attempts");
    assert!(
        started.elapsed() < WAIT,
        "the exit was noticed at once, not after a timeout"
    );
    let mut client = etcd.client().await.unwrap();
    client
        .put("/legate-harness/port", "ok", None)
        .await
        .unwrap();
}

/// The same for a service's metrics port.
#[tokio::test]
async fn a_service_whose_metrics_port_was_taken_meanwhile_starts_on_another() {
    let etcd = Etcd::start().await.unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let args = ["--etcd-endpoints", &etcd.endpoint(), "--http-port", "8080"];
    let mut confgen = service::Service::start_on(taken, "legate-confgen", &args, &[]).unwrap();
    confgen.wait_serving().await.unwrap();
    assert_ne!(confgen.metrics(), taken);
    assert!(confgen.metrics_text().await.unwrap().contains("legate_"));
}

#[tokio::test]
async fn etcd_outage_is_visible_to_clients() {
    let mut etcd = Etcd::start().await.unwrap();
    let mut client = etcd.client().await.unwrap();
    etcd.kill();
    let put = tokio::time::timeout(Duration::from_secs(5), client.put("k", "v", None)).await;
    assert!(
        !matches!(put, Ok(Ok(_))),
        "a put succeeded while etcd was down"
    );
}

fn http_config(port: u16, body: &str) -> String {
    format!(
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
         frontend web\n    bind 127.0.0.1:{port}\n    http-request return status 200 content-type text/plain string \"{body}\"\n"
    )
}

#[tokio::test]
async fn haproxy_runs_master_worker_answers_reloads_and_is_cleaned_up() {
    let port = free_port().unwrap();
    let haproxy = Haproxy::start(&http_config(port, "one")).await.unwrap();
    let addr = ([127, 0, 0, 1], port).into();
    assert_eq!(
        http_get(addr, "x", "/").await.unwrap(),
        (200, "one".to_owned())
    );

    let procs = haproxy.procs().await.unwrap();
    assert_eq!(procs.master.map(|m| m.pid), Some(haproxy.pid()));
    let worker = procs.workers.first().unwrap().pid;
    let info = haproxy.admin("show info").await.unwrap();
    assert!(
        info.contains("Version: 2."),
        "admin socket answers show info: {info}"
    );

    haproxy.reload(&http_config(port, "two")).await.unwrap();
    assert_eq!(
        http_get(addr, "x", "/").await.unwrap(),
        (200, "two".to_owned())
    );
    let procs = haproxy.procs().await.unwrap();
    let current = procs.workers.iter().find(|w| !w.old).unwrap();
    assert_ne!(current.pid, worker, "a new worker serves after the reload");

    let (master, dir) = (haproxy.pid(), haproxy.dir().to_owned());
    drop(haproxy);
    assert!(
        !legate_tests::process_alive(master),
        "haproxy master {master} still runs"
    );
    wait_gone("haproxy worker", current.pid).await.unwrap();
    assert!(!dir.exists());
}

#[tokio::test]
async fn haproxy_check_reports_haproxy_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.cfg");
    std::fs::write(
        &bad,
        "frontend f\n    bind 127.0.0.1:1\n    no-such-keyword\n",
    )
    .unwrap();
    let err = haproxy::check(&[&bad]).unwrap_err().to_string();
    assert!(err.contains("no-such-keyword"), "{err}");
}

#[tokio::test]
async fn test_images_serve_http_and_tcp_and_containers_are_removed() {
    docker::engine_answers().unwrap();
    let images = docker::images().unwrap();

    let app = Container::run(&[
        "-p",
        "127.0.0.1::80",
        "-e",
        "RESPONSE=hello-app",
        &images.http_app,
    ])
    .await
    .unwrap();
    let addr = app.published("80/tcp").await.unwrap();
    let answer = wait_for("the http app to answer", WAIT, || async {
        Ok(http_get(addr, "app", "/").await.ok())
    })
    .await
    .unwrap();
    assert_eq!(answer, (200, "hello-app\n".to_owned()));

    let service = Container::run(&["-p", "127.0.0.1::3306", &images.tcp_service])
        .await
        .unwrap();
    let addr = service.published("3306/tcp").await.unwrap();
    let banner = wait_for("the tcp service to greet", WAIT, || async {
        Ok(tcp_banner(addr).await.ok().filter(|b| !b.is_empty()))
    })
    .await
    .unwrap();
    // Without $RESPONSE the banner is the container's host name: its short id.
    assert_eq!(banner, service.id()[..12]);

    let labels = &app.inspect().await.unwrap()["Config"]["Labels"];
    assert_eq!(labels[docker::TEST_LABEL], "1");
    assert_eq!(labels[docker::RUN_LABEL], docker::run_id());

    let ids = [app.id().to_owned(), service.id().to_owned()];
    drop(app);
    drop(service);
    for id in ids {
        assert!(!docker::exists(&id), "container {id} survived its guard");
    }
}

#[tokio::test]
async fn containers_and_networks_are_removed_when_a_test_panics() {
    let images = docker::images().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let image = images.http_app.clone();
    let panicked = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let network = Network::create("panic").await.unwrap();
            let container = Container::run(&["--network", network.name(), &image])
                .await
                .unwrap();
            tx.send((container.id().to_owned(), network.id().to_owned()))
                .unwrap();
            panic!("a failing test");
        })
    })
    .join();
    assert!(panicked.is_err());
    let (container, network) = rx.recv().unwrap();
    assert!(
        !docker::exists(&container),
        "container {container} survived the panic"
    );
    assert!(
        !docker::exists(&network),
        "network {network} survived the panic"
    );
}

#[tokio::test]
async fn backend_answers_in_process_and_counts() {
    let backend = Backend::start("b1", ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            http_get(backend.addr(), "x", "/").await.unwrap(),
            (200, "b1\n".to_owned())
        );
    }
    assert_eq!(backend.requests(), 3);
    let addr = backend.addr();
    drop(backend);
    wait_for("the dropped backend to stop listening", WAIT, || async {
        Ok(tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn backend_binary_prints_its_address_answers_and_stops_on_sigterm() {
    let path = service::binary("legate-backend").unwrap();
    let mut child = Command::new(path)
        .args(["--name", "proc"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        http_get(addr, "x", "/").await.unwrap(),
        (200, "proc\n".to_owned())
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_for("legate-backend to exit", WAIT, || {
        let status = child.try_wait();
        async move { Ok(status?) }
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
}
