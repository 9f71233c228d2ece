//! `legate-backend`: the harness's fast HTTP backend as a plain process.
//!
//! `legate-backend [--listen 127.0.0.1:0] [--name NAME]` prints `listening on <addr>` on stdout
//! once bound, then serves until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut name = String::from("backend");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().context("--listen needs an address")?.parse()?,
            "--name" => name = args.next().context("--name needs a value")?,
            other => bail!(
                "unknown argument {other:?}; usage: legate-backend [--listen ADDR] [--name NAME]"
            ),
        }
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    #[allow(clippy::print_stdout)]
    {
        println!("listening on {}", listener.local_addr()?);
    }
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        () = legate_tests::backend::serve(listener, name, Arc::new(AtomicU64::new(0))) => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
