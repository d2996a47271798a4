//! `lb`: the command-line entry point. Parses flags, prints the startup summary, and runs
//! the proxy on the runtime chosen at build time (tokio by default, smol with
//! `--no-default-features --features smol`).
#![forbid(unsafe_code)]

mod args;
mod flag_error;
mod jsonlog;
mod print;
mod reqlog;

use std::process::ExitCode;
use std::sync::Arc;

use clap::error::ErrorKind;
use clap::Parser;
use lb_proxy::reqlog::RequestLog;
use lb_proxy::{AccessLog, Notice, NoticeSink};

/// The start-up summary, printed once listening.
enum Summary {
    Text(Vec<String>),
    Json(serde_json::Value),
}

#[cfg(feature = "tokio")]
const RUNTIME: &str = "tokio";
#[cfg(all(feature = "smol", not(feature = "tokio")))]
const RUNTIME: &str = "smol";

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&flag_error::one_line(&e)),
    };
    let verbose = cli.verbose;
    let (log_to, log_body_limit) = (cli.log_to.clone(), cli.log_body_limit);
    let (access_log, access_log_query) = (cli.access_log.clone(), cli.access_log_query);
    let json = cli.log_format == args::LogFormat::Json;
    let fail = |msg: &str| {
        if json {
            jsonlog::emit(&[jsonlog::failure(msg)]);
            ExitCode::from(2)
        } else {
            fail(msg)
        }
    };
    let max_client_conns_given = cli.max_client_conns.is_some();
    let check_only = cli.check;
    let resolve = cli.resolve;
    let mut settings = match cli.into_settings() {
        Ok(s) => s,
        Err(msg) => return fail(&msg),
    };
    if check_only {
        // Files are checked without creating them: their directory must exist.
        for (flag, path) in [("--log-to", &log_to), ("--access-log", &access_log)] {
            if let Some(msg) = path.as_deref().and_then(|p| unwritable_dir(flag, p)) {
                return fail(&msg);
            }
        }
        let from_file = settings.backends_file.as_deref().map_or(0, |p| {
            lb_proxy::discovery::read_backends_file(p, settings.max_conns).map_or(0, |v| v.len())
        });
        let backends = settings.backends.len() + from_file;
        let mut found = 0;
        if resolve {
            for d in &settings.discover {
                match lb_proxy::dns::lookup(&d.name, settings.resolver) {
                    Ok(f) => found += f.addrs.len(),
                    Err(e) => {
                        return fail(&format!("--discover: {d}: cannot resolve {}: {e}", d.name))
                    }
                }
            }
        }
        let names = settings.discover.len();
        return match check(settings) {
            Ok(()) if names == 0 => {
                println!("lb: configuration ok ({backends} backends)");
                ExitCode::SUCCESS
            }
            Ok(()) if resolve => {
                println!("lb: configuration ok ({backends} backends, {names} names to discover: {found} addresses now)");
                ExitCode::SUCCESS
            }
            Ok(()) => {
                println!("lb: configuration ok ({backends} backends, {names} names to discover)");
                ExitCode::SUCCESS
            }
            Err(msg) => fail(&msg),
        };
    }
    let mut writers = Vec::new();
    if let Some(path) = log_to {
        match reqlog::open(&path) {
            Ok((sink, writer)) => {
                settings.request_log = Some(RequestLog::new(sink, log_body_limit));
                writers.push(writer);
            }
            Err(e) => return fail(&format!("--log-to {}: {e}", path.display())),
        }
    }
    if let Some(path) = access_log {
        match reqlog::open_lines(&path) {
            Ok((sink, writer)) => {
                settings.access_log = Some(AccessLog {
                    sink,
                    json,
                    query: access_log_query,
                });
                writers.push(writer);
            }
            Err(e) => return fail(&format!("--access-log {}: {e}", path.display())),
        }
    }
    let writers = Arc::new(writers);
    // 1000 concurrent requests need two descriptors each; the soft limit is often 1024.
    let nofile = rlimit::increase_nofile_limit(u64::MAX);
    if !max_client_conns_given {
        if let Ok(n) = nofile {
            settings.max_client_conns = lb_proxy::settings::max_client_conns_for(n);
        }
    }
    // The summary is printed once the proxy has started (bound, backends accepted): a
    // start-up failure is then the one line `lb: error: ...`, nothing before it.
    let summary = std::sync::Mutex::new(Some(if json {
        Summary::Json(jsonlog::summary(&settings, RUNTIME))
    } else {
        Summary::Text(print::summary(&settings, RUNTIME))
    }));
    let reopen = writers.clone();
    let sink: NoticeSink = Arc::new(move |n: Notice| {
        if let Notice::Listening(_) = n {
            match summary.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(Summary::Text(lines)) => print::emit(&lines),
                Some(Summary::Json(record)) => jsonlog::emit(&[record]),
                None => {}
            }
        }
        if let Notice::Hangup = n {
            for w in reopen.iter() {
                w.reopen();
            }
        }
        if json {
            jsonlog::emit(&jsonlog::records(&n, verbose))
        } else {
            print::emit(&print::lines(&n, verbose))
        }
    });
    let ran = run(settings, sink);
    for writer in writers.iter() {
        // The requests a graceful stop let finish are in the queue: write them out.
        writer.flush(std::time::Duration::from_secs(5));
    }
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => fail(&msg),
    }
}

/// For `--check`: the error for a log file whose directory does not exist.
fn unwritable_dir(flag: &str, path: &std::path::Path) -> Option<String> {
    if path.as_os_str() == "-" {
        return None;
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    (!dir.is_dir()).then(|| format!("{flag} {}: no directory {}", path.display(), dir.display()))
}

#[cfg(feature = "tokio")]
fn check(settings: lb_proxy::Settings) -> Result<(), String> {
    lb_tokio::check(settings).map_err(|e| e.to_string())
}

#[cfg(all(feature = "smol", not(feature = "tokio")))]
fn check(settings: lb_proxy::Settings) -> Result<(), String> {
    lb_smol::check(settings).map_err(|e| e.to_string())
}

#[cfg(feature = "tokio")]
fn run(settings: lb_proxy::Settings, sink: NoticeSink) -> Result<(), String> {
    lb_tokio::run(settings, sink).map_err(|e| e.to_string())
}

#[cfg(all(feature = "smol", not(feature = "tokio")))]
fn run(settings: lb_proxy::Settings, sink: NoticeSink) -> Result<(), String> {
    lb_smol::run(settings, sink).map_err(|e| e.to_string())
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("lb: error: {msg}");
    ExitCode::from(2)
}
