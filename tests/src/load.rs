//! Bounded HTTP load with `wrk` (Debian's), against loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::task::JoinHandle;

use crate::{http_get, tcp_banner};

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
    Wrk::start(addr, host, duration, connections, close)?
        .finish()
        .await
}

/// A `wrk` run in the background: it ends by itself after its duration, or earlier at
/// [`Wrk::stop`], so that load lasts exactly as long as what it is the load of, however slow
/// the machine, and never longer than its bound.
#[derive(Debug)]
pub struct Wrk {
    child: tokio::process::Child,
    duration: Duration,
    started: tokio::time::Instant,
}

impl Wrk {
    /// Starts `wrk` as [`wrk`] does.
    pub fn start(
        addr: SocketAddr,
        host: &str,
        duration: Duration,
        connections: u32,
        close: bool,
    ) -> Result<Self> {
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
        command
            .arg(format!("http://{addr}/"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let child = command
            .spawn()
            .context("running wrk (apt-get install wrk)")?;
        Ok(Self {
            child,
            duration,
            started: tokio::time::Instant::now(),
        })
    }

    /// Whether it ended by itself: its duration is over.
    pub fn is_finished(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|status| status.is_some())
    }

    /// Stops it once it has run for `at_least` (SIGINT: wrk stops its connections and prints
    /// its summary) and reads its report.
    pub async fn stop_after(self, at_least: Duration) -> Result<Report> {
        tokio::time::sleep_until(self.started + at_least).await;
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            // It may have ended by itself meanwhile: its report is read all the same.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        }
        self.finish().await
    }

    /// Waits for the end of its duration and reads its report.
    pub async fn finish(self) -> Result<Report> {
        let limit = self.duration + Duration::from_secs(30);
        let output = tokio::time::timeout(limit, self.child.wait_with_output())
            .await
            .context("wrk did not finish")?
            .context("waiting for wrk")?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "wrk failed: {text}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        parse(&text)
    }
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

/// What fresh-connection probes saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeCounts {
    /// Answers from what was asked for.
    pub answered: u64,
    /// Connections refused or reset, timeouts, error statuses.
    pub failed: u64,
    /// Answers from something else than what was asked for.
    pub misrouted: u64,
    /// The last failure or misroute, for a message.
    pub last_failure: String,
}

/// Probes on fresh connections, one after another until stopped: an HTTP app by its domain
/// (expecting `200` and its body) and a TCP service (expecting its first line).
#[derive(Debug)]
pub struct Probe {
    stop: Arc<AtomicBool>,
    task: JoinHandle<ProbeCounts>,
}

impl Probe {
    /// Starts probing `domain` on `http` and the TCP service on `service`, both on loopback.
    pub fn start(
        http: SocketAddr,
        domain: &str,
        body: &str,
        service: SocketAddr,
        banner: &str,
    ) -> Result<Self> {
        if !http.ip().is_loopback() || !service.ip().is_loopback() {
            bail!("probes go to loopback only, not {http} or {service}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (domain, app, banner) = (domain.to_owned(), format!("200 {body}"), banner.to_owned());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut counts = ProbeCounts::default();
            while !stopped.load(Ordering::Relaxed) {
                let answer = http_get(http, &domain, "/")
                    .await
                    .map(|(status, body)| format!("{status} {}", body.trim()));
                counts.count(answer, &app);
                counts.count(tcp_banner(service).await, &banner);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            counts
        });
        Ok(Self { stop, task })
    }

    /// Stops the probes; what they saw.
    pub async fn stop(self) -> Result<ProbeCounts> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

impl ProbeCounts {
    /// Says the counts of `step` and fails it unless every probe of many (over 10) was
    /// answered by what it asked for.
    pub fn assert_clean(&self, step: &str) {
        eprintln!(
            "{step}: probes {} answered, {} failed, {} misrouted",
            self.answered, self.failed, self.misrouted
        );
        assert!(self.answered > 10, "{step}: {self:?}");
        assert_eq!((self.failed, self.misrouted), (0, 0), "{step}: {self:?}");
    }

    fn count(&mut self, answer: Result<String>, expected: &str) {
        match answer {
            Ok(answer) if answer == expected => self.answered += 1,
            Ok(answer) if answer.starts_with(['5', '4']) => {
                self.failed += 1;
                self.last_failure = answer;
            }
            Ok(answer) => {
                self.misrouted += 1;
                self.last_failure = answer;
            }
            Err(e) => {
                self.failed += 1;
                self.last_failure = format!("{e:#}");
            }
        }
    }
}

/// The `ss` command whose output [`listening_sockets`] reads.
pub const SS_LISTENING: [&str; 6] = [
    "ss",
    "--listening",
    "--tcp",
    "--numeric",
    "--extended",
    "--no-header",
];

/// The TCP sockets listening on `ports` on this host (`ss`), as [`listening_sockets`] says.
pub fn host_listening_sockets(ports: &[u16]) -> Vec<(u16, String)> {
    let output = std::process::Command::new(SS_LISTENING[0])
        .args(&SS_LISTENING[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    listening_sockets(&output, ports)
}

/// The TCP sockets listening on `ports` in the output of [`SS_LISTENING`], as (port, inode)
/// sorted: the same inodes mean the same sockets, never closed in between.
pub fn listening_sockets(ss: &str, ports: &[u16]) -> Vec<(u16, String)> {
    let mut found: Vec<(u16, String)> = ss
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields
                .get(3)?
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .filter(|p| ports.contains(p))?;
            let inode = fields.iter().find_map(|f| f.strip_prefix("ino:"))?;
            Some((port, inode.to_owned()))
        })
        .collect();
    found.sort();
    found
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

    #[test]
    fn listening_sockets_are_read_from_ss() {
        let ss = "LISTEN 0 1024 0.0.0.0:80 0.0.0.0:* ino:4242 sk:1 cgroup:/ <->\n\
                  LISTEN 0 4096 127.0.0.1:2379 0.0.0.0:* uid:105 ino:77 sk:2 cgroup:/ <->\n\
                  LISTEN 0 1024 [::]:80 [::]:* ino:4243 sk:3 v6only:1 <->\n";
        assert_eq!(
            listening_sockets(ss, &[80, 3306]),
            [(80, "4242".to_owned()), (80, "4243".to_owned())]
        );
        assert!(listening_sockets(ss, &[8080]).is_empty());
    }
}
