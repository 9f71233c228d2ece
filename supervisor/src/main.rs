use std::process::ExitCode;

use legate_proto::runtime;
use legate_supervisor::Config;

fn main() -> ExitCode {
    let config: Config = match runtime::parse_args() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if config.run_haproxy {
        return legate_supervisor::run_haproxy(&config);
    }
    let common = config.common.clone();
    let metrics_listen = config.metrics_listen;
    runtime::run_service(
        "legate-supervisor",
        &common,
        metrics_listen,
        runtime::Threads::PerCore,
        |shutdown| legate_supervisor::run(config, shutdown),
    )
}
