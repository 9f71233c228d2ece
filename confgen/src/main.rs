use std::process::ExitCode;

use legate_confgen::Config;
use legate_proto::runtime;

fn main() -> ExitCode {
    let config: Config = match runtime::parse_args() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let common = config.common.clone();
    let metrics_listen = config.metrics_listen;
    runtime::run_service(
        "legate-confgen",
        &common,
        metrics_listen,
        runtime::Threads::One,
        |shutdown| legate_confgen::run(config, shutdown),
    )
}
