//! Differential conformance: the same raw HTTP/1 exchanges through the tokio
//! build and the smol build of `lb`, which must answer alike.
//!
//! Each [`Case`] is a raw client request and the raw response a
//! [`ScriptedBackend`] answers it with. Every case runs against both builds
//! (one `lb` and one scripted backend per build, a fresh client connection
//! per case); the two builds run side by side on their own threads. For each
//! build the test records a transcript ([`Outcome`]):
//!
//! * what the client got: interim responses, the final status code, the
//!   header fields, the body (de-chunked), the trailers, how the body was
//!   framed, and whether the connection stayed open (a second request on the
//!   same connection must be answered);
//! * what the backend got: request line, header fields, body (de-chunked),
//!   trailers, framing.
//!
//! Header names are compared case-insensitively; the values of one name keep
//! their order, different names are sorted. Only what is generated is
//! normalised: `Date` and `x-request-id` values (and an error body's `request_id`), the ports in `Host` and
//! `X-Forwarded-Host`. A case whose two transcripts differ fails with both
//! printed side by side, unless the case documents why the builds may differ
//! ([`Case::differ`]). Besides agreeing, each build must meet the case's
//! expectations (status, forwarded or not, connection kept, extra checks),
//! which may be set per build where the builds legitimately differ.
//!
//! The binaries come from `LB_BIN_TOKIO` and `LB_BIN_SMOL`; without both the
//! test says so and passes, so `cargo test -p lb-tests` with only `LB_BIN`
//! (the per-build runs of `tests/run.sh`) skips it. `tests/run.sh` runs it
//! once with both set:
//!
//! ```sh
//! LB_BIN_TOKIO=$PWD/target/bin/lb-tokio LB_BIN_SMOL=$PWD/target/bin/lb-smol \
//!   cargo test -p lb-tests --test conformance
//! ```
//!
//! It prints a summary table (one line per case: agree or not, each build's
//! status, forwarding and connection) and fails with every failing case's
//! transcripts side by side. `CONFORMANCE_SHOW=all` (or a comma-separated
//! list of case names) prints the transcripts of passing cases too.

mod cases;
mod client;
mod transcript;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::*;

use cases::{cases, Case};
use client::exchange;
use transcript::{show_bytes, side_by_side, transcript, Outcome};

/// The `Host` every case's client sends unless it tests `Host` itself.
const HOST: &str = "conformance.test";

// ---------------------------------------------------------------------------
// Builds
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Build {
    Tokio,
    Smol,
}

impl Build {
    const BOTH: [Build; 2] = [Build::Tokio, Build::Smol];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Build::Tokio => "tokio",
            Build::Smol => "smol",
        }
    }

    fn env(self) -> &'static str {
        match self {
            Build::Tokio => "LB_BIN_TOKIO",
            Build::Smol => "LB_BIN_SMOL",
        }
    }
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

/// The `lb` flags for a conformance run: one backend, probes rare, passive
/// health off (cases answered 502 on purpose must not eject the backend).
fn lb_args(backend: &ScriptedBackend) -> Vec<String> {
    [
        "--backends",
        &backend.url(),
        "--health-check-interval",
        "60s",
        "--passive-threshold",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Run every case, in order, against `bin`.
fn run_build(bin: PathBuf, cases: Arc<Vec<Case>>) -> Vec<Outcome> {
    let backend = ScriptedBackend::spawn();
    let mut lb = spawn_lb(&bin, &backend);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(cases.len());
    for case in cases.iter() {
        let late = backend.take_received();
        if let Some(prev) = outcomes.last_mut() {
            prev.late = late;
        }
        backend.set_script(case.script.clone());
        let client = exchange(lb.port, case);
        let received = backend.take_received();
        let lb_died = !lb.running();
        if lb_died {
            eprintln!(
                "conformance: {} exited during case {}; stderr:\n{}",
                bin.display(),
                case.name,
                lb.log.text()
            );
            lb = spawn_lb(&bin, &backend);
        }
        outcomes.push(Outcome {
            client,
            backend: received,
            late: Vec::new(),
            lb_died,
        });
    }
    // Give a request that lb forwards late a moment to arrive (polled).
    let late = poll(Duration::from_millis(200), || {
        let r = backend.take_received();
        (!r.is_empty()).then_some(r)
    });
    if let (Some(prev), Some(late)) = (outcomes.last_mut(), late) {
        prev.late = late;
    }
    outcomes
}

/// Start `lb` (`bin`) in front of `backend` and wait until it answers.
fn spawn_lb(bin: &Path, backend: &ScriptedBackend) -> Lb {
    Lb::spawn_with(
        &lb_args(backend),
        LbOptions {
            bin: Some(bin.to_path_buf()),
            ..LbOptions::default()
        },
    )
}

#[test]
fn both_builds_answer_every_case_alike() {
    let bins: Vec<PathBuf> = match Build::BOTH
        .iter()
        .map(|b| std::env::var_os(b.env()).map(PathBuf::from))
        .collect::<Option<Vec<_>>>()
    {
        Some(b) => b,
        None => {
            eprintln!(
                "conformance: skipped: set both LB_BIN_TOKIO and LB_BIN_SMOL to the two lb \
                 binaries to compare them (tests/run.sh does)"
            );
            return;
        }
    };
    for (b, p) in Build::BOTH.iter().zip(&bins) {
        assert!(p.exists(), "{}={} does not exist", b.env(), p.display());
    }
    let cases = Arc::new(cases());
    assert!(cases.len() >= 40, "the table has {} cases", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names must be unique");

    let started = Instant::now();
    let runs: Vec<_> = bins
        .into_iter()
        .map(|bin| {
            let cases = cases.clone();
            thread::spawn(move || run_build(bin, cases))
        })
        .collect();
    let results: Vec<Vec<Outcome>> = runs
        .into_iter()
        .map(|t| t.join().expect("a build's run panicked"))
        .collect();
    let (tokio, smol) = (&results[0], &results[1]);
    eprintln!(
        "conformance: {} cases through both builds in {:.1?}",
        cases.len(),
        started.elapsed()
    );

    // CONFORMANCE_SHOW=all (or case names, comma-separated) prints those
    // cases' transcripts even when they pass.
    let show: Vec<String> = std::env::var("CONFORMANCE_SHOW")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut failures = Vec::new();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<52} {:<10} {:<44} {:<44}",
        "case", "builds", "tokio", "smol"
    );
    for (i, case) in cases.iter().enumerate() {
        let (t, s) = (&tokio[i], &smol[i]);
        let date = case.date_rule();
        let (tt, st) = (transcript(t, date), transcript(s, date));
        let agree = tt == st;
        let mut problems = Vec::new();
        if !agree && case.differ.is_none() {
            problems.push(format!(
                "the builds disagree:\n{}  status lines as sent: tokio {:?}, smol {:?}",
                side_by_side(&tt, &st, ("tokio", "smol")),
                t.client.response.as_ref().map(|m| m.line.as_str()),
                s.client.response.as_ref().map(|m| m.line.as_str()),
            ));
        }
        let mut marks = Vec::new();
        for (b, o) in [(Build::Tokio, t), (Build::Smol, s)] {
            let misses = case.expect_for(b).misses(o);
            if !misses.is_empty() {
                marks.push(b.name());
                problems.push(format!(
                    "the {} build misses what is expected:\n    {}",
                    b.name(),
                    misses.join("\n    ")
                ));
            }
            if o.lb_died {
                problems.push(format!("the {} build's lb exited", b.name()));
            }
        }
        if !agree && case.differ.is_some() || show.iter().any(|n| n == "all" || n == case.name) {
            eprintln!(
                "conformance: {}: {}\n{}",
                case.name,
                match (agree, case.differ) {
                    (true, _) => "the builds agree".to_string(),
                    (false, Some(why)) => format!("the builds differ as documented ({why})"),
                    (false, None) => "the builds disagree".to_string(),
                },
                side_by_side(&tt, &st, ("tokio", "smol"))
            );
        }
        let verdict = match (agree, case.differ.is_some()) {
            (true, _) => "agree",
            (false, true) => "differ(ok)",
            (false, false) => "DISAGREE",
        };
        let miss = if marks.is_empty() {
            String::new()
        } else {
            format!("  MISSES: {}", marks.join(", "))
        };
        let _ = writeln!(
            table,
            "{:<52} {:<10} {:<44} {:<44}{miss}",
            case.name,
            verdict,
            t.summary(),
            s.summary()
        );
        if !problems.is_empty() {
            failures.push(format!(
                "=== case {}: {}\n  request: {}\n  backend answer: {}\n  {}",
                case.name,
                problems.len(),
                show_bytes(&case.request, 160),
                show_bytes(&case.script.response, 160),
                problems.join("\n  ")
            ));
        }
    }
    eprintln!("conformance summary:\n{table}");
    assert!(
        failures.is_empty(),
        "{} of {} cases fail:\n\n{}\n\nsummary:\n{table}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
