//! Fault injection on real network namespaces: `lb` between a client and backends that
//! misbehave the way real networks and servers do.
//!
//! # Topology
//!
//! Each case builds its own [`Topology`] (`lb_tests::netns`): a namespace for `lb` and
//! one per backend host, each host joined to `lb`'s namespace by a veth pair
//! (`10.77.<i>.1` on `lb`'s side, `10.77.<i>.2` on the host's). The test's thread enters
//! `lb`'s namespace (`setns`, what `ip netns exec` does) and starts `lb` there, bound to
//! `127.0.0.1`: the client talks to `lb` over the loopback of `lb`'s namespace, with the
//! harness's usual helpers. Backends (mock-backend processes, in-process scripted
//! backends, the delaying relay, a sink that never reads) are started from a thread
//! inside their host's namespace and listen on the host's address. Faults are nftables
//! rules in the host's namespace (a SYN black hole on a port, random loss, a partition),
//! and latency is a user-space relay (`lb_tests::relay`; `tc netem` is not available on
//! every machine). Every address is one the test assigned inside namespaces it made.
//!
//! Cleanup: processes are killed and in-process backends stopped when their guards drop,
//! then the thread leaves `lb`'s namespace and the namespaces are deleted, also when a
//! case fails; namespaces of a killed run are deleted by the next run.
//!
//! # What every case checks afterwards ([`Rig::after_case`])
//!
//! The client got the right status, or a truncated body (never a clean end); `/health`
//! `active_conns` is back to 0; `lb`'s open file descriptors (`/proc/<pid>/fd`) are back
//! to their count before the case (polled: pooled connections close after 4 s idle); the
//! health state is what the README says (a backend's own failure ejects it at once; a
//! response `lb` will not pass on, or a deadline passed mid-stream, does not); and a
//! normal request through `lb` succeeds.
//!
//! # Cases
//!
//! * `network.rs`: a SYN black hole (connect timeout, failover with `--connect-retries`),
//!   200 ms ± 50 ms latency and 5 % loss under 60 SSE streams (times printed), a
//!   partition mid-stream (cut by `--timeout`, or with no deadline found by TCP
//!   keep-alive on `lb`'s backend socket within about 30 s), a 64 MiB upload to a backend that never reads.
//! * `scripted.rs`: raw bytes from a backend: resets inside the head and the body, a
//!   close mid-chunk, `Content-Length` longer and shorter than the body, chunked without
//!   its last chunk, a head over 64 KiB, a head that stalls, 10,000 interim responses
//!   (`100`, `103`), a bad status code and a reply that is not HTTP; and a lone backend's
//!   passive ejection.
//!
//! Lines starting `faults:` are printed whatever the outcome (measurements, skips, and
//! which `lb` behaviour a case asserted). Without root, `ip netns`, or `nft` for the
//! cases that put faults on a link, each case says why and passes.
//!
//! ```sh
//! LB_BIN=$PWD/target/bin/lb-smol cargo test -p lb-tests --test faults
//! ```

mod network;
mod scripted;

use std::io::Read as _;
use std::time::{Duration, Instant};

use lb_tests::netns::{self, Topology};
use lb_tests::*;

/// Print a line that `cargo test` does not capture: skips and measurements must show in
/// the suite's output, also when the case passes.
macro_rules! report {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}
pub(crate) use report;

/// Whether this machine can make namespaces; says why not (and the case passes) if not.
fn namespaces_or_skip(case: &str) -> bool {
    match netns::unavailable() {
        None => true,
        Some(why) => {
            report!("faults: {case}: skipped: {why}");
            false
        }
    }
}

/// Whether this machine can also put nftables faults on a link; says why not if not.
fn nft_or_skip(case: &str) -> bool {
    if !namespaces_or_skip(case) {
        return false;
    }
    match netns::nft_unavailable() {
        None => true,
        Some(why) => {
            report!("faults: {case}: skipped: {why}");
            false
        }
    }
}

/// The health state a case leaves behind.
#[derive(Clone, Copy, Debug)]
enum Health {
    /// The backend on this port was ejected (passive health): a `[HEALTH] ... marked as
    /// unhealthy` line, and `/health` showing one backend fewer.
    Ejected(u16),
    /// Every backend is still healthy, and none was marked unhealthy.
    Kept,
}

/// A case's `lb`, in `lb`'s namespace of a [`Topology`], and the state it started from.
struct Rig {
    lb: Lb,
    total: u64,
    /// `lb`'s open descriptors before the case.
    fds: usize,
}

impl Rig {
    /// Start `lb` with `args` and `backends` (the calling thread must be in `lb`'s
    /// namespace), wait until `probed` says every backend had its start-up probe
    /// answered, and take the descriptor count once it is steady. Active probes then wait
    /// a minute (`--health-check-interval 60s`), so only the case's traffic counts.
    fn start(args: &[&str], backends: &[String], probed: impl Fn() -> bool) -> Rig {
        let mut full: Vec<String> = vec![
            "--health-check-interval".into(),
            "60s".into(),
            "--backends".into(),
        ];
        full.extend(backends.iter().cloned());
        full.extend(args.iter().map(|a| a.to_string()));
        // No `--admin-bind`: each `lb` has a namespace of its own, so the admin
        // listener's default port cannot clash with another test's.
        let lb = Lb::spawn(&full);
        wait_until(
            Duration::from_secs(15),
            "every backend's start-up probe",
            &probed,
            |done| *done,
        );
        let fds = steady_fds(lb.pid());
        Rig {
            lb,
            total: backends.len() as u64,
            fds,
        }
    }

    /// The checks every case ends with (see the crate docs). `settle` bounds how long the
    /// request may stay in flight after the client is done (a deadline still running).
    fn after_case(&self, case: &str, health: Health, settle: Duration) {
        self.settled(case, health, settle);
        let r = try_completion(self.lb.port)
            .unwrap_or_else(|e| panic!("{case}: a normal request after the fault failed: {e}"));
        assert_eq!(
            r.status,
            200,
            "{case}: a normal request after the fault: {}",
            r.text()
        );
    }

    /// [`Rig::after_case`] but for the normal request: nothing in flight, the health
    /// state, the descriptors.
    fn settled(&self, case: &str, health: Health, settle: Duration) {
        let lb = &self.lb;
        lb.wait_active(0, settle);
        match health {
            Health::Ejected(port) => {
                let line = lb
                    .log
                    .wait_for(Duration::from_secs(5), |l| is_unhealthy_line(l, port))
                    .unwrap_or_else(|| {
                        panic!("{case}: the backend on port {port} should be ejected (no [HEALTH] line)")
                    });
                // Seen at least once: a re-probe may bring the backend back soon after.
                let want = self.total - 1;
                poll(Duration::from_secs(3), || {
                    let (_, v) = lb.try_health()?;
                    (v["healthy_backends"].as_u64() == Some(want)).then_some(())
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{case}: /health never showed {want} healthy: {:?}",
                        lb.try_health()
                    )
                });
                report!("faults: {case}: ejected: {line}");
            }
            Health::Kept => {
                let (status, v) = lb.health();
                assert_eq!(status, 200, "{case}: {v}");
                assert_eq!(
                    v["healthy_backends"].as_u64(),
                    Some(self.total),
                    "{case}: {v}"
                );
                let ejections = lb.log.matching(|l| l.contains("marked as unhealthy"));
                assert!(
                    ejections.is_empty(),
                    "{case}: no backend may be ejected: {ejections:?}"
                );
            }
        }
        let t = Instant::now();
        let fds = wait_until(
            Duration::from_secs(10),
            &format!(
                "{case}: lb's descriptors back to {} (before the case)",
                self.fds
            ),
            || fd_count(lb.pid()),
            |n| *n <= self.fds,
        );
        if t.elapsed() > Duration::from_millis(200) {
            report!(
                "faults: {case}: descriptors back to {fds} (baseline {}) after {:.1?}",
                self.fds,
                t.elapsed()
            );
        }
    }
}

/// `pid`'s descriptor count once two reads 200 ms apart agree.
fn steady_fds(pid: u32) -> usize {
    let mut last = fd_count(pid);
    for _ in 0..25 {
        std::thread::sleep(Duration::from_millis(200));
        let now = fd_count(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("lb's descriptor count never settled (last {last})");
}

/// How a response reached the client.
#[derive(Debug)]
enum Got {
    /// A head and a body that ended where its framing says.
    Whole { status: u16, body: Vec<u8> },
    /// A head, then the body cut short: the connection ended before the framing did.
    Cut {
        status: u16,
        body: Vec<u8>,
        error: String,
    },
    /// No response head at all.
    Nothing { error: String },
}

impl Got {
    fn status(&self) -> Option<u16> {
        match self {
            Got::Whole { status, .. } | Got::Cut { status, .. } => Some(*status),
            Got::Nothing { .. } => None,
        }
    }

    fn body_text(&self) -> String {
        match self {
            Got::Whole { body, .. } | Got::Cut { body, .. } => {
                String::from_utf8_lossy(body).into_owned()
            }
            Got::Nothing { .. } => String::new(),
        }
    }
}

/// Read a response on `c` (after its request went out), waiting at most `limit` for
/// each read: what arrived, and how.
fn read_got(c: &mut Conn, method: &str, limit: Duration) -> Got {
    c.set_timeout(limit).expect("set timeout");
    let head = match c.read_head(method) {
        Ok(h) => h,
        Err(e) => {
            return Got::Nothing {
                error: e.to_string(),
            }
        }
    };
    let mut body = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut reader = c.body(&head);
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                return Got::Whole {
                    status: head.status,
                    body,
                }
            }
            Ok(n) => body.extend_from_slice(&buf[..n]),
            Err(e) => {
                return Got::Cut {
                    status: head.status,
                    body,
                    error: e.to_string(),
                }
            }
        }
    }
}

/// A small completion request on a fresh connection: what came back, and when it ended.
fn completion_got(port: u16, limit: Duration) -> (Got, Duration) {
    let body = br#"{"model":"m","prompt":"hello","max_tokens":4}"#;
    let t = Instant::now();
    let mut c = match Conn::open(port) {
        Ok(c) => c,
        Err(e) => {
            return (
                Got::Nothing {
                    error: format!("connect: {e}"),
                },
                t.elapsed(),
            )
        }
    };
    let sent = c
        .send_head(
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            Some(body.len() as u64),
        )
        .and_then(|()| c.write_raw(body));
    if let Err(e) = sent {
        return (
            Got::Nothing {
                error: format!("send: {e}"),
            },
            t.elapsed(),
        );
    }
    let got = read_got(&mut c, "POST", limit);
    (got, t.elapsed())
}

/// The backends' URLs as `lb --backends` takes them, with weights.
fn weighted(url: &str, weight: u32) -> String {
    format!("{url}#weight={weight}")
}

/// Percentile `p` (0..=100) of `xs` (sorted here), nearest rank, in whole milliseconds.
fn percentile_ms(xs: &mut [Duration], p: usize) -> u128 {
    xs.sort_unstable();
    let rank = (p * xs.len()).div_ceil(100).max(1);
    xs[rank - 1].as_millis()
}

/// A new topology with `hosts` backend hosts (see the crate docs).
fn topology(hosts: usize) -> Topology {
    Topology::new(hosts)
}
