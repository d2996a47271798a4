//! `lb`: the command-line entry point. Parses flags, prints the startup summary, and runs
//! the proxy on the runtime chosen at build time (tokio by default, smol with
//! `--no-default-features --features smol`).
#![forbid(unsafe_code)]

mod args;
mod flag_error;
mod print;
mod reqlog;

use std::process::ExitCode;
use std::sync::Arc;

use clap::error::ErrorKind;
use clap::Parser;
use lb_proxy::reqlog::RequestLog;
use lb_proxy::{Notice, NoticeSink};

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
    let max_client_conns_given = cli.max_client_conns.is_some();
    let mut settings = match cli.into_settings() {
        Ok(s) => s,
        Err(msg) => return fail(&msg),
    };
    let mut log_writer = None;
    if let Some(path) = log_to {
        match reqlog::open(&path) {
            Ok((sink, writer)) => {
                settings.request_log = Some(RequestLog::new(sink, log_body_limit));
                log_writer = Some(writer);
            }
            Err(e) => return fail(&format!("--log-to {}: {e}", path.display())),
        }
    }
    // 1000 concurrent requests need two descriptors each; the soft limit is often 1024.
    let nofile = rlimit::increase_nofile_limit(u64::MAX);
    if !max_client_conns_given {
        if let Ok(n) = nofile {
            settings.max_client_conns = lb_proxy::settings::max_client_conns_for(n);
        }
    }
    // The summary is printed once the proxy has started (bound, backends accepted): a
    // start-up failure is then the one line `lb: error: ...`, nothing before it.
    let summary = std::sync::Mutex::new(Some(print::summary(&settings, RUNTIME)));
    let sink: NoticeSink = Arc::new(move |n: Notice| {
        if let Notice::Listening(_) = n {
            if let Some(lines) = summary.lock().unwrap_or_else(|p| p.into_inner()).take() {
                print::emit(&lines);
            }
        }
        print::emit(&print::lines(&n, verbose))
    });
    let ran = run(settings, sink);
    if let Some(writer) = log_writer {
        // The requests a graceful stop let finish are in the queue: write them out.
        writer.finish(std::time::Duration::from_secs(5));
    }
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => fail(&msg),
    }
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
