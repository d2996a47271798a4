//! Errors in plain words, for the log and for error replies: both builds word the same
//! failure the same way.

use std::io;

/// What went wrong on a connection to a backend that was already established, in a few
/// words. A timeout here is TCP's own (keep-alive probes unanswered, or retransmissions
/// given up): the connect timeout has its own words ([`connect_error`]).
pub fn io_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by backend".into(),
        io::ErrorKind::ConnectionAborted => "connection aborted".into(),
        io::ErrorKind::BrokenPipe => "backend closed the connection (broken pipe)".into(),
        io::ErrorKind::TimedOut => {
            "connection timed out (the backend stopped answering TCP)".into()
        }
        io::ErrorKind::UnexpectedEof => "backend closed the connection".into(),
        _ => e.to_string(),
    }
}

/// What went wrong connecting to a backend, in a few words.
pub fn connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut => CONNECT_TIMEOUT.into(),
        _ => io_error(e),
    }
}

/// The words for a connect that did not finish within `--connect-timeout`.
pub const CONNECT_TIMEOUT: &str = "connect timeout (--connect-timeout)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_is_worded_by_where_it_happened() {
        let e = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(connect_error(&e), CONNECT_TIMEOUT);
        assert!(io_error(&e).starts_with("connection timed out"));
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(connect_error(&e), io_error(&e));
    }
}
