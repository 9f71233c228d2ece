//! The applier over a fake HAProxy, with paused time: what it does when HAProxy dies, refuses,
//! or the supervisor stops, in the middle of an apply.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use tokio::sync::Notify;

use super::*;

/// What the next reload does.
#[derive(Debug)]
enum Reload {
    /// HAProxy confirms it.
    Confirm,
    /// HAProxy refuses it (its master survives).
    Refuse,
    /// The master dies during it.
    Die,
    /// It waits for this, then confirms.
    Wait(Arc<Notify>),
}

/// The fake HAProxy: what it runs, and what it was asked.
#[derive(Debug, Default)]
struct World {
    /// The pid of the master that runs.
    running: Option<u32>,
    /// Masters started so far.
    starts: u32,
    /// The next starts that fail.
    failed_starts: usize,
    /// The configuration each start or reload loaded, in order.
    loaded: Vec<String>,
    reloads: VecDeque<Reload>,
    /// A reload waits in the fake (see [`Reload::Wait`]).
    reloading: bool,
    /// The next `haproxy -c` that fail.
    invalid: usize,
    /// Runtime commands sent, per batch.
    batches: Vec<Vec<String>>,
    /// The master dies at the next batch.
    die_at_batch: bool,
    /// The next batch's last command is refused (the ones before it are applied).
    refuse_at_batch: bool,
    stopped: Vec<u32>,
}

type Shared = Arc<Mutex<World>>;

struct FakeProxy {
    world: Shared,
    live: PathBuf,
}

#[derive(Debug)]
struct FakeProcess {
    pid: u32,
    world: Shared,
}

impl Process for FakeProcess {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn uptime(&self) -> Duration {
        Duration::ZERO
    }
    fn external(&self) -> bool {
        false
    }
    fn alive(&mut self) -> bool {
        self.world.lock().unwrap().running == Some(self.pid)
    }
}

impl FakeProxy {
    fn live_config(&self) -> String {
        std::fs::read_to_string(self.live.join(CONFIG_FILE)).unwrap_or_default()
    }
}

impl Proxy for FakeProxy {
    type Process = FakeProcess;

    async fn adopt(&mut self) -> Option<FakeProcess> {
        None
    }
    async fn start(&mut self) -> Result<FakeProcess, ProxyError> {
        let config = self.live_config();
        let mut world = self.world.lock().unwrap();
        if world.failed_starts > 0 {
            world.failed_starts -= 1;
            let alerts = "it exited: [ALERT] cannot bind".to_owned();
            return Err(crate::haproxy::Error::Start(alerts).into());
        }
        world.starts += 1;
        let pid = 100 + world.starts;
        world.running = Some(pid);
        world.loaded.push(config);
        Ok(FakeProcess {
            pid,
            world: self.world.clone(),
        })
    }
    async fn check(&mut self, process: &mut FakeProcess) -> bool {
        process.alive()
    }
    async fn reload(&mut self, process: &mut FakeProcess) -> Result<(), ProxyError> {
        let next = self.world.lock().unwrap().reloads.pop_front();
        match next.unwrap_or(Reload::Confirm) {
            Reload::Confirm => {}
            Reload::Refuse => return Err(ProxyError::ReloadRefused("[ALERT] no".to_owned())),
            Reload::Die => {
                self.world.lock().unwrap().running = None;
                return Err(ProxyError::ReloadUnconfirmed(String::new()));
            }
            Reload::Wait(go) => {
                self.world.lock().unwrap().reloading = true;
                go.notified().await;
                self.world.lock().unwrap().reloading = false;
            }
        }
        if !process.alive() {
            return Err(ProxyError::ReloadUnconfirmed(String::new()));
        }
        let config = self.live_config();
        self.world.lock().unwrap().loaded.push(config);
        Ok(())
    }
    async fn stop(&mut self, process: FakeProcess, _: Duration) {
        let mut world = self.world.lock().unwrap();
        world.stopped.push(process.pid);
        world.running = None;
    }
    async fn validate(&mut self, _: &Path) -> Result<(), ProxyError> {
        let mut world = self.world.lock().unwrap();
        if world.invalid > 0 {
            world.invalid -= 1;
            return Err(ProxyError::Invalid("[ALERT] nonsense".to_owned()));
        }
        Ok(())
    }
    async fn batch(&mut self, commands: &[&str]) -> Result<Vec<String>, ProxyError> {
        let mut world = self.world.lock().unwrap();
        if world.die_at_batch {
            world.die_at_batch = false;
            world.running = None;
        }
        if world.running.is_none() {
            let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
            return Err(crate::haproxy::Error::Io {
                what: "connecting to the admin socket".to_owned(),
                source: refused,
            }
            .into());
        }
        world
            .batches
            .push(commands.iter().map(|c| (*c).to_owned()).collect());
        let mut replies: Vec<String> = commands.iter().map(|_| String::new()).collect();
        if std::mem::take(&mut world.refuse_at_batch)
            && let Some(last) = replies.last_mut()
        {
            *last = "Invalid weight.\n".to_owned();
        }
        Ok(replies)
    }
    async fn servers_state(&mut self) -> Result<String, ProxyError> {
        Ok("1\n".to_owned())
    }
}

/// A configuration with one server of weight `weight`, balanced by `balance`.
fn config(balance: &str, weight: u32) -> Arc<ConfigSnapshot> {
    let config = format!(
        "defaults\n    mode http\n    default-server inter 2s\n\n\
         backend app_a\n    balance {balance}\n    server a1 10.0.0.1:8080 weight {weight}\n"
    );
    let maps = Vec::new();
    Arc::new(ConfigSnapshot {
        version: u64::from(weight),
        checksum: legate_proto::checksum(&config, &maps),
        haproxy_config: config,
        maps,
        ..ConfigSnapshot::default()
    })
}

/// An applier over a fake HAProxy, running, and what to drive it with.
struct Harness {
    world: Shared,
    requests: mpsc::Sender<Request>,
    snapshots: watch::Sender<Option<Rebuilt>>,
    reports: watch::Receiver<Option<ApplyResult>>,
    stats: watch::Receiver<Stats>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(stop_haproxy: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            haproxy: PathBuf::from("haproxy"),
            paths: Paths {
                state_dir: dir.path().join("state"),
                run_dir: dir.path().join("run"),
            },
            hard_stop_after: "10s".to_owned(),
            max_reloads: 10,
            haproxy_log: "none".to_owned(),
            stop_haproxy,
            write_behind: Duration::ZERO,
            external: false,
            allowed_file_dirs: Vec::new(),
            haproxy_log_max: 1 << 20,
        };
        let world = Shared::default();
        let proxy = FakeProxy {
            world: world.clone(),
            live: settings.paths.live(),
        };
        let (stats_tx, stats) = watch::channel(Stats::default());
        let (health, _) = tonic_health::server::health_reporter();
        let (running_tx, _) = watch::channel(None);
        let applier = Applier::start(
            proxy,
            settings,
            stats_tx,
            health,
            Arc::new(AtomicU64::new(0)),
            running_tx,
        )
        .await
        .unwrap();
        let (requests, request_rx) = mpsc::channel(8);
        let (snapshots, snapshot_rx) = watch::channel(None);
        let (report_tx, reports) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(applier.run(request_rx, snapshot_rx, report_tx, shutdown.clone()));
        Self {
            world,
            requests,
            snapshots,
            reports,
            stats,
            shutdown,
            task,
            _dir: dir,
        }
    }

    /// `Supervisor.Apply` of `snapshot`.
    async fn apply(&self, snapshot: &Arc<ConfigSnapshot>) -> ApplyResult {
        let (reply, result) = oneshot::channel();
        self.requests.send((snapshot.clone(), reply)).await.unwrap();
        within(result).await.unwrap()
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    fn running_checksum(&self) -> String {
        self.stats.borrow().running_checksum.clone()
    }

    /// What the master that runs loaded last.
    fn runs(&self) -> String {
        self.world().loaded.last().cloned().unwrap_or_default()
    }

    /// HAProxy loaded `snapshot` last, and the status says it runs.
    fn assert_runs(&self, snapshot: &ConfigSnapshot) {
        assert_eq!(self.runs(), snapshot.haproxy_config);
        assert_eq!(self.running_checksum(), snapshot.checksum);
    }

    async fn stop(self) -> Shared {
        self.shutdown.cancel();
        within(self.task).await.unwrap();
        self.world
    }
}

/// `future`, failing the test if it takes a (paused) minute.
async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .expect("still waiting after a minute")
}

fn outcome(result: &ApplyResult) -> ApplyOutcome {
    ApplyOutcome::try_from(result.outcome).unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_first_snapshot_starts_haproxy_then_a_weight_is_set_at_runtime() {
    let applier = Harness::start(true).await;
    let first = config("roundrobin", 100);
    assert_eq!(
        outcome(&applier.apply(&first).await),
        ApplyOutcome::Reloaded
    );
    assert_eq!(applier.world().starts, 1);
    assert_eq!(applier.runs(), first.haproxy_config);

    let lighter = config("roundrobin", 50);
    let result = applier.apply(&lighter).await;
    assert_eq!(
        outcome(&result),
        ApplyOutcome::Runtime,
        "{}",
        result.message
    );
    assert_eq!(
        applier.world().batches,
        [vec!["set server app_a/a1 weight 50".to_owned()]]
    );
    assert_eq!(applier.running_checksum(), lighter.checksum);
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn haproxy_dying_during_a_reload_is_started_again_on_the_new_configuration() {
    let applier = Harness::start(true).await;
    let first = config("roundrobin", 100);
    applier.apply(&first).await;

    applier.world().reloads.push_back(Reload::Die);
    let second = config("leastconn", 100);
    let result = applier.apply(&second).await;
    // It passed `haproxy -c`: HAProxy's death is no reason to drop it.
    assert_eq!(
        outcome(&result),
        ApplyOutcome::Reloaded,
        "{}",
        result.message
    );
    assert_eq!(applier.world().starts, 2, "started again");
    applier.assert_runs(&second);
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn haproxy_dying_during_a_runtime_apply_is_started_again_on_the_new_configuration() {
    let applier = Harness::start(true).await;
    applier.apply(&config("roundrobin", 100)).await;

    applier.world().die_at_batch = true;
    let lighter = config("roundrobin", 50);
    let result = applier.apply(&lighter).await;
    assert_eq!(
        outcome(&result),
        ApplyOutcome::Reloaded,
        "{}",
        result.message
    );
    assert_eq!(applier.world().starts, 2);
    applier.assert_runs(&lighter);
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_haproxy_refuses_puts_the_last_good_configuration_back() {
    let applier = Harness::start(true).await;
    let first = config("roundrobin", 100);
    applier.apply(&first).await;

    applier.world().reloads.push_back(Reload::Refuse);
    let second = config("leastconn", 100);
    let result = applier.apply(&second).await;
    assert_eq!(outcome(&result), ApplyOutcome::Rejected);
    assert!(
        result.message.contains("refused the reload"),
        "{}",
        result.message
    );
    assert_eq!(applier.world().starts, 1, "the master survived");
    assert_eq!(
        applier.runs(),
        first.haproxy_config,
        "reloaded on the last good files"
    );
    assert_eq!(applier.running_checksum(), first.checksum);
    assert_eq!(applier.stats.borrow().rejected, 1);
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_configuration_that_haproxy_c_refuses_changes_nothing() {
    let applier = Harness::start(true).await;
    let first = config("roundrobin", 100);
    applier.apply(&first).await;

    applier.world().invalid = 1;
    let result = applier.apply(&config("leastconn", 100)).await;
    assert_eq!(outcome(&result), ApplyOutcome::Rejected);
    assert!(
        result.message.contains("[ALERT] nonsense"),
        "{}",
        result.message
    );
    assert_eq!(applier.world().loaded.len(), 1, "no reload, no start");
    assert_eq!(applier.running_checksum(), first.checksum);
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_runtime_batch_refused_half_way_is_put_right_by_a_reload() {
    let applier = Harness::start(true).await;
    applier.apply(&config("roundrobin", 100)).await;

    // The new configuration reloads.
    applier.world().refuse_at_batch = true;
    let lighter = config("roundrobin", 50);
    let result = applier.apply(&lighter).await;
    assert_eq!(
        outcome(&result),
        ApplyOutcome::Reloaded,
        "{}",
        result.message
    );
    assert!(
        result.message.contains("Invalid weight"),
        "{}",
        result.message
    );
    assert_eq!(applier.runs(), lighter.haproxy_config);

    // Or, when `haproxy -c` refuses it, the last good one does: HAProxy is not left between
    // the two.
    {
        let mut world = applier.world();
        world.refuse_at_batch = true;
        world.invalid = 1;
    }
    let reloads = applier.world().loaded.len();
    let result = applier.apply(&config("roundrobin", 20)).await;
    assert_eq!(outcome(&result), ApplyOutcome::Rejected);
    assert_eq!(applier.world().loaded.len(), reloads + 1, "one reload");
    applier.assert_runs(&lighter);
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_master_that_exits_is_started_again_with_backoff_on_the_last_good_configuration() {
    let applier = Harness::start(true).await;
    let first = config("roundrobin", 100);
    applier.apply(&first).await;

    {
        let mut world = applier.world();
        world.running = None;
        world.failed_starts = 3;
    }
    within(async {
        while applier.world().starts < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(applier.runs(), first.haproxy_config);
    let pid = applier.stats.borrow().master_pid;
    assert_eq!(pid, 102, "the status names the new master");
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_an_apply_lets_it_finish_then_stops_haproxy() {
    let applier = Harness::start(true).await;
    applier.apply(&config("roundrobin", 100)).await;

    let go = Arc::new(Notify::new());
    applier.world().reloads.push_back(Reload::Wait(go.clone()));
    let second = config("leastconn", 100);
    applier.snapshots.send_replace(Some(Rebuilt {
        snapshot: second.clone(),
        base: None,
    }));
    within(async {
        while !applier.world().reloading {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    applier.shutdown.cancel();
    // The apply in flight holds the shutdown back: the applier is still there.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(
        !applier.task.is_finished(),
        "the apply in flight was abandoned"
    );
    go.notify_one();
    let reports = applier.reports.clone();
    let world = applier.stop().await;

    let report = reports.borrow().clone().expect("the apply was reported");
    assert_eq!(outcome(&report), ApplyOutcome::Reloaded);
    assert_eq!(report.checksum, second.checksum);
    let world = world.lock().unwrap();
    assert_eq!(world.loaded.last(), Some(&second.haproxy_config));
    assert_eq!(
        world.stopped,
        [101],
        "--stop-haproxy: stopped once the apply ended"
    );
}

#[tokio::test(start_paused = true)]
async fn without_stop_haproxy_shutdown_leaves_it_running() {
    let applier = Harness::start(false).await;
    applier.apply(&config("roundrobin", 100)).await;
    let world = applier.stop().await;
    let world = world.lock().unwrap();
    assert!(world.stopped.is_empty());
    assert_eq!(world.running, Some(101));
}
