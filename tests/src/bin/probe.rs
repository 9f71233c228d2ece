//! `legate-probe`: one gRPC call to a legate service, as whatever user runs it; the attack tests
//! run it as an unprivileged user.
//!
//! `legate-probe <endpoint> <call> [node]` prints `OK` or the gRPC status code's name (e.g.
//! `PermissionDenied`), or `connect: <error>` when the endpoint cannot be reached. Calls:
//! `apply` (Supervisor.Apply of an empty configuration), `supervisor-status`, `watch` and
//! `report` (Confgen, for `node`), `confgen-status`, `list` and `resync` (Registrar).

use anyhow::{Context, Result, bail};
use legate_proto::v1;
use legate_proto::v1::confgen_client::ConfgenClient;
use legate_proto::v1::registrar_client::RegistrarClient;
use legate_proto::v1::supervisor_client::SupervisorClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: legate-probe <endpoint> <call> [node]";
    let endpoint = args.next().context(usage)?;
    let call = args.next().context(usage)?;
    let node = args.next().unwrap_or_else(|| "probe".to_owned());
    let channel =
        legate_proto::transport::channel(&endpoint, &legate_proto::transport::TlsArgs::default())?;
    let status = match call.as_str() {
        "apply" => SupervisorClient::new(channel)
            .apply(v1::ConfigSnapshot::default())
            .await
            .map(drop),
        "supervisor-status" => SupervisorClient::new(channel)
            .status(v1::SupervisorStatusRequest::default())
            .await
            .map(drop),
        "watch" => ConfgenClient::new(channel)
            .watch(v1::WatchRequest {
                node_id: node,
                ..Default::default()
            })
            .await
            .map(drop),
        "report" => ConfgenClient::new(channel)
            .report(v1::ApplyReport {
                node_id: node,
                result: Some(v1::ApplyResult::default()),
            })
            .await
            .map(drop),
        "confgen-status" => ConfgenClient::new(channel)
            .status(v1::ConfgenStatusRequest {})
            .await
            .map(drop),
        "list" => RegistrarClient::new(channel)
            .list(v1::ListRequest {})
            .await
            .map(drop),
        "resync" => RegistrarClient::new(channel)
            .resync(v1::ResyncRequest {})
            .await
            .map(drop),
        other => bail!("unknown call {other:?}; {usage}"),
    };
    let said = match status {
        Ok(()) => "OK".to_owned(),
        // A call that never reached the service.
        Err(status) if status.code() == tonic::Code::Unavailable => {
            format!("connect: {}", status.message())
        }
        Err(status) => format!("{:?}", status.code()),
    };
    #[allow(clippy::print_stdout)]
    {
        println!("{said}");
    }
    Ok(())
}
