//! `legate`: what the fleet routes, and why. Reads the registry in etcd (every host's
//! registrations, records and refusals) and asks this host's services (registrar, confgen,
//! supervisor) over their gRPC sockets; prints tables on a terminal or JSON for scripts.
//!
//! Exit status: 0 when every source answered (and, for `explain`, the target is routed),
//! 1 otherwise (what could be shown is shown, and each failure says what to do), 64 for a
//! command line that does not parse.

mod explain;
mod fleet;
mod show;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use legate_proto::runtime::EtcdArgs;
use legate_proto::transport::TlsArgs;
use legate_registrar::docker::DockerArgs;

use crate::fleet::Sources;
use crate::show::{Color, Format, Out};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "legate",
    version,
    about = "What the legate fleet routes, and why",
    after_help = "Sources: etcd (every host's registrations), and this host's registrar, confgen \
                  and supervisor over their sockets. Options before the command; the \
                  environment variables are those of the services."
)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// This host's registrar: `unix:<path>`, `https://host:port` (with --grpc-ca, --grpc-cert,
    /// --grpc-key) or `http://host:port`.
    #[arg(
        long,
        env = "LEGATE_REGISTRAR",
        default_value = "unix:/run/legate/registrar.sock"
    )]
    registrar: String,
    /// confgen's gRPC endpoint, as for --registrar.
    #[arg(
        long,
        env = "LEGATE_CONFGEN",
        default_value = "unix:/run/legate/confgen.sock"
    )]
    confgen: String,
    /// This host's supervisor, as for --registrar.
    #[arg(
        long,
        env = "LEGATE_SUPERVISOR",
        default_value = "unix:/run/legate/supervisor.sock"
    )]
    supervisor: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// This host's Docker engine, for `explain` (as the registrar reaches it).
    #[command(flatten)]
    docker: DockerArgs,
    /// Output: a table for people, JSON for scripts.
    #[arg(long, short, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    /// Colour in tables: on a terminal only (and not with NO_COLOR set), always, or never.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    color: Color,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every domain and service port, its servers (host, container, address) and their live
    /// state in this host's HAProxy.
    Routes {
        /// Only routes whose domain, service name or port contains this.
        filter: Option<String>,
    },
    /// Every live registrar: its IP, version, lease time left, registrations and refusals.
    Hosts,
    /// Containers refused by any registrar, keys confgen skipped, and listeners this host's
    /// supervisor refused, with the reasons.
    Refused,
    /// confgen's version and every node's running version and last result: a stale or
    /// failing node stands out.
    Status,
    /// Why a container, a domain or a service port is routed or not, step by step: Docker and
    /// the conventions, the registrar, etcd, confgen, this host's HAProxy.
    Explain {
        /// A container name or id (prefix) on this host or any host, a domain, or a service
        /// port (`:3306`).
        target: String,
    },
    /// Prints a shell completion script, e.g. `legate completions bash >
    /// /etc/bash_completion.d/legate`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage {
                ExitCode::from(legate_proto::runtime::EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "legate", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("legate: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = Out::new(cli.output, cli.color);
    let sources = Sources {
        etcd: cli.etcd,
        registrar: cli.registrar,
        confgen: cli.confgen,
        supervisor: cli.supervisor,
        tls: cli.tls,
    };
    let complete = runtime.block_on(async {
        match cli.command {
            Command::Routes { filter } => show::routes(&sources, filter.as_deref(), &mut out).await,
            Command::Hosts => show::hosts(&sources, &mut out).await,
            Command::Refused => show::refused(&sources, &mut out).await,
            Command::Status => show::status(&sources, &mut out).await,
            Command::Explain { target } => {
                explain::explain(&sources, &cli.docker, &target, &mut out).await
            }
            Command::Completions { .. } => true,
        }
    });
    if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
