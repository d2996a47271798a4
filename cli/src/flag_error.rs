//! One line for each command line `lb` refuses.
//!
//! Clap's errors span several lines, with usage and tips ("to pass '-1' as a value, use
//! '-- -1'"); a user or a script gets `lb: error: ` and one sentence that names the flag
//! and says what is wrong with it, built from the error's context rather than its text.

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// The one line (without `lb: error: `) for a command line clap refused.
pub fn one_line(e: &clap::Error) -> String {
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    let value = text(ContextKind::InvalidValue).unwrap_or_default();
    let Some(flag) = text(ContextKind::InvalidArg).map(flag_of) else {
        return match e.kind() {
            ErrorKind::InvalidUtf8 => "an argument is not valid UTF-8".into(),
            _ => clap_text(e),
        };
    };
    match e.kind() {
        // `-v=1`: clap reads the '=' as one more short flag.
        ErrorKind::UnknownArgument if flag == "-=" => {
            "short flags take no '=VALUE' (see lb --help)".into()
        }
        ErrorKind::UnknownArgument => match text(ContextKind::SuggestedArg) {
            Some(like) => format!("unknown flag {flag} (did you mean {like}? see lb --help)"),
            None => format!("unknown flag {flag} (see lb --help)"),
        },
        // A value the flag's parser refused: its message says what is wrong.
        ErrorKind::ValueValidation => match std::error::Error::source(e) {
            Some(why) => format!("{flag}: {why}"),
            None => format!("{flag}: '{value}' is not valid"),
        },
        ErrorKind::InvalidValue if value.is_empty() => format!("{flag}: missing value"),
        ErrorKind::InvalidValue => {
            let valid = match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(v)) => v.join(", "),
                _ => String::new(),
            };
            match text(ContextKind::SuggestedValue) {
                Some(like) => {
                    format!("{flag}: '{value}' is not one of {valid} (did you mean {like}?)")
                }
                None => format!("{flag}: '{value}' is not one of {valid}"),
            }
        }
        ErrorKind::TooManyValues => format!("{flag} takes no value (got '{value}')"),
        ErrorKind::ArgumentConflict => match text(ContextKind::PriorArg).map(flag_of) {
            Some(prior) if prior != flag => format!("{flag} cannot be used with {prior}"),
            _ => format!("{flag} is given more than once"),
        },
        _ => format!("{flag}: {}", clap_text(e)),
    }
}

/// `--max-conns` from clap's `--max-conns <N>`, `--foo` from `--foo=bar`.
fn flag_of(arg: &str) -> &str {
    let arg = arg.split_whitespace().next().unwrap_or(arg);
    match arg.split_once('=') {
        Some((flag, _)) if flag.starts_with("--") && flag.len() > 2 => flag,
        _ => arg,
    }
}

/// Clap's own message on one line, without its usage, tips and "error: ".
fn clap_text(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("tip:"))
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Cli;
    use clap::Parser;

    fn refusal(args: &[&str]) -> String {
        let argv = ["lb", "--backends", "a:1"].iter().chain(args).copied();
        one_line(&Cli::try_parse_from(argv).expect_err("refused"))
    }

    #[test]
    fn each_refusal_is_one_line_naming_the_flag() {
        for (args, line) in [
            (
                &["--max-conns", "-1"][..],
                "--max-conns: '-1' is not a whole number ≥ 0",
            ),
            (
                &["--max-conns=many"][..],
                "--max-conns: 'many' is not a whole number ≥ 0",
            ),
            (
                &["--max-conns", "99999999999"][..],
                "--max-conns: '99999999999' is too large (at most 4294967295)",
            ),
            (
                &["--port", "0"][..],
                "--port: '0' is not a whole number ≥ 1",
            ),
            (
                &["--port", "65536"][..],
                "--port: '65536' is too large (at most 65535)",
            ),
            (&["--foo"][..], "unknown flag --foo (see lb --help)"),
            (&["--foo=bar"][..], "unknown flag --foo (see lb --help)"),
            (
                &["--max-con", "3"][..],
                "unknown flag --max-con (did you mean --max-conns? see lb --help)",
            ),
            (&["--max-conns"][..], "--max-conns: missing value"),
            (
                &["--max-conns", "--verbose"][..],
                "--max-conns: missing value",
            ),
            (
                &["--timeout", "--verbose"][..],
                "--timeout: missing value (found the flag '--verbose')",
            ),
            (
                &["--verbose=yes"][..],
                "--verbose takes no value (got 'yes')",
            ),
            (
                &["-v=1"][..],
                "short flags take no '=VALUE' (see lb --help)",
            ),
            (&["--max-conns="][..], "--max-conns: missing value"),
            (
                &["--port", "1", "--port", "2"][..],
                "--port is given more than once",
            ),
            (
                &["--bind", "localhost"][..],
                "--bind: 'localhost' is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1)",
            ),
        ] {
            assert_eq!(refusal(args), line, "{args:?}");
        }
        let line = refusal(&["--routing", "fastest"]);
        assert!(
            line.starts_with("--routing: 'fastest' is not one of least-conn, round-robin,"),
            "{line}"
        );
    }
}
