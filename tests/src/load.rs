//! Bounded HTTP load with `wrk` (Debian's), against loopback only.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// What one `wrk` run reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Responses received.
    pub requests: u64,
    /// Connect, read, write errors and timeouts.
    pub socket_errors: u64,
    /// Responses that were not 2xx or 3xx.
    pub non_2xx: u64,
    /// wrk's own output.
    pub output: String,
}

/// Runs `wrk` on `addr` with the Host header `host` for `duration` over `connections`
/// connections (2 threads); `close` sends `Connection: close` on every request.
pub async fn wrk(
    addr: SocketAddr,
    host: &str,
    duration: Duration,
    connections: u32,
    close: bool,
) -> Result<Report> {
    if !addr.ip().is_loopback() {
        bail!("load goes to loopback only, not {addr}");
    }
    let mut command = tokio::process::Command::new("wrk");
    command
        .arg("-t2")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("5s")
        .arg("-H")
        .arg(format!("Host: {host}"));
    if close {
        command.arg("-H").arg("Connection: close");
    }
    command.arg(format!("http://{addr}/")).kill_on_drop(true);
    let output = tokio::time::timeout(duration + Duration::from_secs(30), command.output())
        .await
        .context("wrk did not finish")?
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&text)
}

/// Parses wrk's summary.
pub fn parse(text: &str) -> Result<Report> {
    let mut report = Report {
        output: text.to_owned(),
        ..Report::default()
    };
    let number = |s: &str| s.trim().trim_end_matches(',').parse::<u64>().ok();
    let mut seen = false;
    for line in text.lines().map(str::trim) {
        if let Some((count, rest)) = line.split_once(' ')
            && rest.starts_with("requests in")
        {
            report.requests = number(count).context("request count")?;
            seen = true;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            report.socket_errors = errors
                .split(',')
                .filter_map(|part| part.split_whitespace().last().and_then(number))
                .sum();
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            report.non_2xx = number(count).context("non-2xx count")?;
        }
    }
    if !seen {
        bail!("no request count in wrk's output: {text}");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_summaries_are_parsed() {
        let text = "Running 2s test @ http://127.0.0.1:1/\n  2 threads and 8 connections\n\
                    \x20 12345 requests in 2.00s, 1.23MB read\n\
                    \x20 Socket errors: connect 1, read 2, write 3, timeout 4\n\
                    \x20 Non-2xx or 3xx responses: 7\nRequests/sec:   6172.50\n";
        let report = parse(text).unwrap();
        assert_eq!(
            (report.requests, report.socket_errors, report.non_2xx),
            (12345, 10, 7)
        );
        let clean = parse("  10 requests in 1.00s, 1KB read\n").unwrap();
        assert_eq!((clean.socket_errors, clean.non_2xx), (0, 0));
        assert!(parse("garbage").is_err());
    }
}
