//! Unit tests: head parsing, reject rules, framing decisions.

use super::*;

fn req(s: &str) -> Result<Status<RequestHead>, Error> {
    parse_request(s.as_bytes(), &Limits::default())
}

fn res(s: &str) -> Result<Status<ResponseHead>, Error> {
    parse_response(s.as_bytes(), &Limits::default())
}

fn req_ok(s: &str) -> (RequestHead, usize) {
    match req(s) {
        Ok(Status::Complete(h, n)) => (h, n),
        other => panic!("{s:?}: {other:?}"),
    }
}

fn res_ok(s: &str) -> (ResponseHead, usize) {
    match res(s) {
        Ok(Status::Complete(h, n)) => (h, n),
        other => panic!("{s:?}: {other:?}"),
    }
}

fn req_err(s: &str) -> Error {
    match req(s) {
        Err(e) => e,
        other => panic!("{s:?} should fail: {other:?}"),
    }
}

fn res_err(s: &str) -> Error {
    match res(s) {
        Err(e) => e,
        other => panic!("{s:?} should fail: {other:?}"),
    }
}

/// A request head with `extra` header lines.
fn with(extra: &str) -> String {
    format!("POST /x HTTP/1.1\r\nHost: a\r\n{extra}\r\n")
}

fn resp_with(extra: &str) -> String {
    format!("HTTP/1.1 200 OK\r\n{extra}\r\n")
}

#[test]
fn parses_request_and_reports_consumed() {
    let s = "GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Y:  v w \r\n\r\nBODY";
    let (h, n) = req_ok(s);
    assert_eq!(n, s.len() - 4);
    assert_eq!(h.method, "GET");
    assert_eq!(h.target, "/a?b=1");
    assert_eq!(h.version, Version::Http11);
    assert_eq!(h.headers[1], Header::new("X-Y", "v w"));
    assert_eq!(h.header("host"), Some(&b"example.com"[..]));
}

#[test]
fn every_prefix_is_partial() {
    let s = "GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n";
    for i in 0..s.len() {
        assert_eq!(req(&s[..i]), Ok(Status::Partial), "prefix {i}");
    }
    let r = "HTTP/1.1 204 No Content\r\nX: y\r\n\r\n";
    for i in 0..r.len() {
        assert_eq!(res(&r[..i]), Ok(Status::Partial), "prefix {i}");
    }
}

/// Found by the `http1_response` fuzz target: a leading empty line whose LF had not yet
/// arrived (`\r\n\r`) was refused as an unsupported version, while the complete
/// `\r\n\r\n\r\n` waits for more: the verdict depended on where a read split a CRLF.
#[test]
fn every_prefix_of_a_response_after_empty_lines_is_partial() {
    let r = "\r\n\r\nHTTP/1.1 204 No Content\r\nX: y\r\n\r\n";
    for i in 0..r.len() {
        assert_eq!(res(&r[..i]), Ok(Status::Partial), "prefix {i}");
    }
    let (h, n) = res_ok(r);
    assert_eq!((h.status, n), (204, r.len()));
    assert_eq!(res_err("\r\n\rX"), Error::UnsupportedVersion);
}

#[test]
fn skips_empty_lines_before_request_line() {
    let s = "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let (h, n) = req_ok(s);
    assert_eq!(n, s.len());
    assert_eq!(h.target, "/");
}

#[test]
fn parses_response() {
    let s = "HTTP/1.0 404 Not Found\r\nContent-Length: 3\r\n\r\nabc";
    let (h, n) = res_ok(s);
    assert_eq!(n, s.len() - 3);
    assert_eq!(
        (h.version, h.status, h.reason.as_str()),
        (Version::Http10, 404, "Not Found")
    );
    let (h, _) = res_ok("HTTP/1.1 200\r\n\r\n");
    assert_eq!(h.reason, "");
}

#[test]
fn rejects_content_length_with_transfer_encoding() {
    let e = Error::ContentLengthAndTransferEncoding;
    assert_eq!(
        req_err(&with("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n")),
        e
    );
    assert_eq!(
        res_err(&resp_with(
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"
        )),
        e
    );
}

#[test]
fn content_length_duplicates() {
    let ok = "Content-Length: 5\r\nContent-Length: 5\r\n";
    assert_eq!(req_ok(&with(ok)).0.body_kind(), Ok(BodyKind::Length(5)));
    // One number a line: a list is refused, equal or not (as hyper does).
    for bad in ["Content-Length: 5, 5\r\n", "Content-Length: 5, 6\r\n"] {
        assert_eq!(req_err(&with(bad)), Error::InvalidContentLength, "{bad}");
        assert_eq!(
            res_err(&resp_with(bad)),
            Error::InvalidContentLength,
            "{bad}"
        );
    }
    for bad in [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 0\r\ncontent-length: 1\r\n",
    ] {
        assert_eq!(
            req_err(&with(bad)),
            Error::ConflictingContentLength,
            "{bad}"
        );
        assert_eq!(
            res_err(&resp_with(bad)),
            Error::ConflictingContentLength,
            "{bad}"
        );
    }
}

#[test]
fn rejects_invalid_content_length() {
    for v in [
        "abc",
        "-1",
        "+5",
        "0x10",
        "5 5",
        "5,",
        "",
        "1.0",
        "18446744073709551616",
    ] {
        let s = with(&format!("Content-Length: {v}\r\n"));
        assert_eq!(req_err(&s), Error::InvalidContentLength, "{v:?}");
    }
    let max = with("Content-Length: 18446744073709551615\r\n");
    assert_eq!(req_ok(&max).0.body_kind(), Ok(BodyKind::Length(u64::MAX)));
}

#[test]
fn transfer_encoding_must_be_exactly_chunked() {
    for v in [
        "gzip",
        "chunked, gzip",
        "gzip, chunked",
        "identity",
        "chunked, chunked",
        "",
    ] {
        let s = with(&format!("Transfer-Encoding: {v}\r\n"));
        assert_eq!(req_err(&s), Error::UnsupportedTransferEncoding, "{v:?}");
        assert_eq!(
            res_err(&resp_with(&format!("Transfer-Encoding: {v}\r\n"))),
            Error::UnsupportedTransferEncoding
        );
    }
    let two = with("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n");
    assert_eq!(req_err(&two), Error::UnsupportedTransferEncoding);
    let ok = with("Transfer-Encoding: ChunKed\r\n");
    assert_eq!(req_ok(&ok).0.body_kind(), Ok(BodyKind::Chunked));
}

#[test]
fn transfer_encoding_in_http10_is_rejected() {
    let s = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(req_err(s), Error::UnsupportedTransferEncoding);
    let r = "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(res_err(r), Error::UnsupportedTransferEncoding);
}

#[test]
fn rejects_obs_fold() {
    assert_eq!(req_err(&with("X: a\r\n b\r\n")), Error::ObsFold);
    assert_eq!(req_err(&with("X: a\r\n\tb\r\n")), Error::ObsFold);
    assert_eq!(
        req_err("GET / HTTP/1.1\r\n Host: a\r\n\r\n"),
        Error::ObsFold
    );
    assert_eq!(res_err(&resp_with("X: a\r\n b\r\n")), Error::ObsFold);
    // Detected before the head is complete.
    assert_eq!(req_err("GET / HTTP/1.1\r\nX: a\r\n "), Error::ObsFold);
}

#[test]
fn rejects_bare_cr() {
    assert_eq!(req_err(&with("X: a\rb\r\n")), Error::BareCr);
    assert_eq!(
        req_err("GET /\r HTTP/1.1\r\nHost: a\r\n\r\n"),
        Error::BareCr
    );
    assert_eq!(
        req_err("GET / HTTP/1.1\r\nHost: a\r\n\r\r\n"),
        Error::BareCr
    );
    assert_eq!(res_err("HTTP/1.1 200 O\rK\r\n\r\n"), Error::BareCr);
    // A CR at the very end may still get its LF.
    assert_eq!(req("GET / HTTP/1.1\r"), Ok(Status::Partial));
}

#[test]
fn rejects_bare_lf() {
    assert_eq!(req_err("GET / HTTP/1.1\nHost: a\n\n"), Error::BareLf);
    assert_eq!(req_err(&with("X: a\n")), Error::BareLf);
    assert_eq!(res_err("HTTP/1.1 200 OK\r\nX: y\n\r\n"), Error::BareLf);
    assert_eq!(req_err("\nGET / HTTP/1.1\r\n\r\n"), Error::BareLf);
}

#[test]
fn rejects_invalid_header_names() {
    for line in [
        "Bad Name: x",
        "X : y",
        ": empty",
        "X@Y: z",
        "X\"Y: z",
        "Ü: z",
    ] {
        assert_eq!(
            req_err(&with(&format!("{line}\r\n"))),
            Error::InvalidHeaderName,
            "{line}"
        );
        assert_eq!(
            res_err(&resp_with(&format!("{line}\r\n"))),
            Error::InvalidHeaderName,
            "{line}"
        );
    }
    assert_eq!(req_err(&with("NoColon\r\n")), Error::InvalidHeaderName);
}

#[test]
fn rejects_control_chars_in_values() {
    assert_eq!(req_err(&with("X: a\0b\r\n")), Error::InvalidHeaderValue);
    assert_eq!(req_err(&with("X: a\x7fb\r\n")), Error::InvalidHeaderValue);
    assert_eq!(
        res_err(&resp_with("X: \x01\r\n")),
        Error::InvalidHeaderValue
    );
}

#[test]
fn rejects_request_without_version() {
    assert_eq!(req_err("GET /\r\n\r\n"), Error::MissingVersion);
    assert_eq!(
        req_err("GET /index.html\r\nHost: a\r\n\r\n"),
        Error::MissingVersion
    );
}

#[test]
fn rejects_unsupported_versions() {
    for v in [
        "HTTP/2.0",
        "HTTP/1.2",
        "HTTP/0.9",
        "HTTP/1.10",
        "HTTP/3",
        "http/1.1",
        "HTTP/1.1x",
    ] {
        let s = format!("GET / {v}\r\nHost: a\r\n\r\n");
        assert_eq!(req_err(&s), Error::UnsupportedVersion, "{v}");
    }
    assert_eq!(
        req_err("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        Error::UnsupportedVersion
    );
    for v in ["HTTP/2 200 OK", "HTTP/1.2 200 OK", "HTTP/0.9 200 OK"] {
        assert_eq!(
            res_err(&format!("{v}\r\n\r\n")),
            Error::UnsupportedVersion,
            "{v}"
        );
    }
}

#[test]
fn rejects_malformed_request_lines() {
    for line in [
        "GET  / HTTP/1.1",
        "GET / HTTP/1.1 ",
        "G(T / HTTP/1.1",
        " GET / HTTP/1.1",
        "GET",
    ] {
        let s = format!("{line}\r\nHost: a\r\n\r\n");
        assert_eq!(req_err(&s), Error::InvalidRequestLine, "{line:?}");
    }
}

#[test]
fn rejects_malformed_status_lines() {
    for line in [
        "HTTP/1.1 99 x",
        "HTTP/1.1 099 x",
        "HTTP/1.1 2000 x",
        "HTTP/1.1 abc",
        "HTTP/1.1 200 a\x01b",
    ] {
        assert_eq!(
            res_err(&format!("{line}\r\n\r\n")),
            Error::InvalidStatusLine,
            "{line:?}"
        );
    }
}

#[test]
fn request_targets() {
    for ok in ["/", "/a/b?c=d", "http://h:1/x", "HTTPS://h", "http://h?q"] {
        req_ok(&format!("GET {ok} HTTP/1.1\r\nHost: a\r\n\r\n"));
    }
    req_ok("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
    for bad in [
        "GET * ",
        "GET a/b ",
        "GET http:// ",
        "GET http://u@h/ ",
        "GET ftp://h/ ",
        "CONNECT h:443 ",
        "CONNECT / ",
    ] {
        let s = format!("{bad}HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(req_err(&s), Error::InvalidTarget, "{bad}");
    }
}

#[test]
fn host_rules() {
    assert_eq!(req_err("GET / HTTP/1.1\r\n\r\n"), Error::InvalidHost);
    assert_eq!(
        req_err("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n"),
        Error::InvalidHost
    );
    assert_eq!(
        req_err("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
        Error::InvalidHost
    );
    assert_eq!(
        req_err("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
        Error::InvalidHost
    );
    assert_eq!(
        req_err("GET / HTTP/1.0\r\nHost: u@h\r\n\r\n"),
        Error::InvalidHost
    );
    req_ok("GET / HTTP/1.0\r\n\r\n");
    req_ok("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n");
    req_ok("GET / HTTP/1.1\r\nHost:\r\n\r\n");
}

#[test]
fn head_size_limit() {
    let limits = Limits {
        max_head_bytes: 40,
        max_headers: 10,
    };
    let head = "GET / HTTP/1.1\r\nHost: a\r\nX: 01234567\r\n\r\n";
    assert_eq!(head.len(), 40);
    assert!(matches!(
        parse_request(head.as_bytes(), &limits),
        Ok(Status::Complete(_, 40))
    ));
    let bigger = head.replace("01234567", "012345678");
    assert_eq!(
        parse_request(bigger.as_bytes(), &limits),
        Err(Error::HeadTooLarge)
    );
    // Without the end in sight, too many bytes is already an error.
    let endless = "GET / HTTP/1.1\r\nX: ".to_string() + &"a".repeat(DEFAULT_MAX_HEAD_BYTES);
    assert_eq!(req_err(&endless), Error::HeadTooLarge);
    assert_eq!(Error::HeadTooLarge.status(), 431);
    let r = format!(
        "HTTP/1.1 200 OK\r\nX: {}\r\n\r\n",
        "a".repeat(DEFAULT_MAX_HEAD_BYTES)
    );
    assert_eq!(res_err(&r), Error::HeadTooLarge);
    // A request line that alone outgrows the limit: its target is too long (414).
    let long_url = format!("GET /{} HTTP/1.1\r\n", "a".repeat(DEFAULT_MAX_HEAD_BYTES));
    assert_eq!(req_err(&long_url), Error::UriTooLong);
    assert_eq!(Error::UriTooLong.status(), 414);
    let long_status = format!("HTTP/1.1 200 {}\r\n", "a".repeat(DEFAULT_MAX_HEAD_BYTES));
    assert_eq!(res_err(&long_status), Error::HeadTooLarge);
}

#[test]
fn header_count_limit() {
    let limits = Limits {
        max_head_bytes: 1024,
        max_headers: 3,
    };
    let three = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n";
    assert!(matches!(
        parse_request(three.as_bytes(), &limits),
        Ok(Status::Complete(..))
    ));
    let four = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n";
    assert_eq!(
        parse_request(four.as_bytes(), &limits),
        Err(Error::TooManyHeaders)
    );
    let four = "HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
    assert_eq!(
        parse_response(four.as_bytes(), &limits),
        Err(Error::TooManyHeaders)
    );
    assert_eq!(Error::TooManyHeaders.status(), 431);
}

#[test]
fn error_status_and_messages() {
    assert_eq!(Error::ObsFold.status(), 400);
    assert_eq!(Error::ContentLengthAndTransferEncoding.status(), 400);
    let msg = Error::ContentLengthAndTransferEncoding.to_string();
    assert!(msg.contains("Content-Length") && msg.contains("Transfer-Encoding"));
}

#[test]
fn keep_alive_rules() {
    let ka = |s: &str| req_ok(s).0.keep_alive();
    assert!(ka("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
    assert!(!ka(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n"
    ));
    assert!(!ka(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n"
    ));
    assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
    assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    assert!(!res_ok("HTTP/1.0 200 OK\r\n\r\n").0.keep_alive());
    assert!(res_ok("HTTP/1.1 200 OK\r\nConnection: foo\r\n\r\n")
        .0
        .keep_alive());
    assert!(
        !res_ok("HTTP/1.1 200 OK\r\nConnection: foo\r\nConnection: close\r\n\r\n")
            .0
            .keep_alive()
    );
}

#[test]
fn upgrade_and_expect() {
    let ws = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
    assert!(req_ok(ws).0.is_upgrade());
    assert!(
        !req_ok("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
            .0
            .is_upgrade()
    );
    assert!(
        !req_ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n")
            .0
            .is_upgrade()
    );
    assert!(
        !req_ok("GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            .0
            .is_upgrade()
    );
    assert!(req_ok(&with("Expect: 100-Continue\r\n"))
        .0
        .expects_continue());
    assert!(!req_ok(&with("")).0.expects_continue());
    assert!(!req_ok("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")
        .0
        .expects_continue());
}

#[test]
fn request_framing() {
    let kind = |extra: &str| req_ok(&with(extra)).0.body_kind();
    assert_eq!(kind(""), Ok(BodyKind::None));
    assert_eq!(kind("Content-Length: 0\r\n"), Ok(BodyKind::Length(0)));
    assert_eq!(kind("Content-Length: 12\r\n"), Ok(BodyKind::Length(12)));
    assert_eq!(
        kind("Transfer-Encoding: chunked\r\n"),
        Ok(BodyKind::Chunked)
    );
}

#[test]
fn response_framing() {
    let get = req_ok("GET / HTTP/1.1\r\nHost: a\r\n\r\n").0;
    let head = req_ok("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n").0;
    let ws =
        req_ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n").0;
    let kind = |r: &str, q: &RequestHead| res_ok(r).0.body_kind(q);

    assert_eq!(
        kind("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", &get),
        Ok(BodyKind::Length(5))
    );
    assert_eq!(
        kind("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", &head),
        Ok(BodyKind::None)
    );
    assert_eq!(
        kind(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            &head
        ),
        Ok(BodyKind::None)
    );
    assert_eq!(
        kind(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            &get
        ),
        Ok(BodyKind::Chunked)
    );
    assert_eq!(
        kind("HTTP/1.1 200 OK\r\n\r\n", &get),
        Ok(BodyKind::CloseDelimited)
    );
    assert_eq!(
        kind("HTTP/1.0 200 OK\r\n\r\n", &get),
        Ok(BodyKind::CloseDelimited)
    );
    for status in [
        "100 Continue",
        "103 Early Hints",
        "204 No Content",
        "304 Not Modified",
    ] {
        let r = format!("HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(kind(&r, &get), Ok(BodyKind::None), "{status}");
    }
    let switching =
        "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    assert_eq!(kind(switching, &ws), Ok(BodyKind::Tunnel));
    assert_eq!(kind(switching, &get), Err(Error::UnexpectedUpgrade));
    assert_eq!(
        kind("HTTP/1.1 101 Switching Protocols\r\n\r\n", &ws),
        Err(Error::UnexpectedUpgrade)
    );
    // A declined upgrade is an ordinary response.
    assert_eq!(
        kind("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", &ws),
        Ok(BodyKind::Length(2))
    );
}

#[test]
fn write_round_trips() {
    let s = "PUT /a%20b?c HTTP/1.0\r\nHost: h:1\r\nX-Empty: \r\nX-Bin: é\r\n\r\n";
    let (h, _) = req_ok(s);
    let mut out = Vec::new();
    h.write(&mut out);
    assert_eq!(out, s.as_bytes());
    let r = "HTTP/1.1 418 I'm a teapot\r\nA: b\r\n\r\n";
    let (h, _) = res_ok(r);
    let mut out = Vec::new();
    h.write(&mut out);
    assert_eq!(out, r.as_bytes());
}

#[test]
fn keep_alive_timeouts() {
    use super::keep_alive_timeout as t;
    assert_eq!(t(b"timeout=5, max=100"), Some(5));
    assert_eq!(t(b"max=100, Timeout = 2"), Some(2));
    assert_eq!(t(b"timeout=\"7\""), Some(7));
    assert_eq!(t(b"max=100"), None);
    assert_eq!(t(b"timeout=soon"), None);
    assert_eq!(t(b"timeout=-1"), None);
    assert_eq!(t(b""), None);
}

#[test]
fn a_response_that_is_not_http_is_refused_before_its_head_ends() {
    let limits = Limits::default();
    for partial in [
        "HTTP/1.1 200 OK\r\nX: y\r\n",
        "HTTP/1.",
        "HT",
        "",
        "\r\nHTTP/1.0 204",
    ] {
        assert_eq!(
            parse_response(partial.as_bytes(), &limits),
            Ok(Status::Partial),
            "{partial:?}"
        );
    }
    for garbage in [
        "SSH-2.0-OpenSSH_9.6\r\n",
        "SSH",
        "HTTP/2 200\r\n",
        "HTTP/1.2",
    ] {
        assert_eq!(
            parse_response(garbage.as_bytes(), &limits),
            Err(Error::UnsupportedVersion),
            "{garbage:?}"
        );
    }
    for garbage in ["HTTP/1.1 20x\r\nX", "HTTP/1.1 2000\r\n", "HTTP/1.1\r\n"] {
        let e = parse_response(garbage.as_bytes(), &limits).unwrap_err();
        assert!(
            matches!(e, Error::InvalidStatusLine | Error::UnsupportedVersion),
            "{garbage:?}: {e:?}"
        );
    }
}

#[test]
fn leading_empty_lines_cut_at_a_cr_are_incomplete() {
    // Found by fuzzing: "\r\n\r\n\r" was refused while "\r\n\r\n\r\n" waits for more.
    for s in ["\r", "\r\n\r", "\r\n\r\n\r"] {
        assert!(matches!(res(s), Ok(Status::Partial)), "{s:?}: {:?}", res(s));
    }
    assert!(matches!(res("\r\n\r\n\r\n"), Ok(Status::Partial)));
    let (head, _) = res_ok("\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(head.status, 200);
}

#[test]
fn line_bytes_are_found_at_every_offset() {
    for len in 0..40 {
        for at in 0..=len {
            for end in [b'\r', b'\n'] {
                // Bytes that sit next to CR and LF, and obs-text, around the one to find.
                let mut s: Vec<u8> = (0..len)
                    .map(|i| [b'\x0b', b'\x0c', b'\x8d', b'a'][i % 4])
                    .collect();
                if at < len {
                    s[at] = end;
                }
                let want = (at < len).then_some(at);
                assert_eq!(crate::head::next_line_byte(&s), want, "{len} {at}");
            }
        }
    }
}

#[test]
fn header_names_compare_case_insensitively_known_or_not() {
    let h = Header::new("Content-LENGTH", "1");
    assert!(h.is("content-length") && h.is("CONTENT-length"));
    assert!(!h.is("content-type") && !h.is("content-lengthx"));
    let x = Header::new("X-Custom", "");
    assert!(x.is("x-custom") && !x.is("x-customs") && !x.is("host"));
    assert!(!Header::new("Hos", "").is("host"));
    assert_eq!(h.name(), b"Content-LENGTH");
    assert_eq!(h.value(), b"1");
}

#[test]
fn known_names_are_recognised_in_any_case_and_only_them() {
    use crate::head::Known;
    let names = [
        "te",
        "host",
        "date",
        "expect",
        "upgrade",
        "connection",
        "keep-alive",
        "user-agent",
        "content-type",
        "x-request-id",
        "content-length",
        "x-forwarded-for",
        "proxy-connection",
        "x-forwarded-host",
        "transfer-encoding",
        "x-forwarded-proto",
        "proxy-authenticate",
        "proxy-authorization",
    ];
    let mut seen = std::collections::HashSet::new();
    for n in names {
        let k = Known::of(n.as_bytes());
        assert_ne!(k, Known::Other, "{n}");
        assert!(seen.insert(k), "{n}");
        assert_eq!(Known::of(n.to_ascii_uppercase().as_bytes()), k, "{n}");
        // One byte off (a letter's neighbour in the table, or a non-letter whose
        // case bit differs) is another name.
        for i in 0..n.len() {
            for swap in [b'@', b'[', b'`', b'{', b'\r', b'_'] {
                let mut m = n.as_bytes().to_vec();
                m[i] = swap;
                assert_eq!(Known::of(&m), Known::Other, "{m:?}");
            }
        }
    }
    for n in [
        "",
        "t",
        "hos",
        "hostt",
        "x-forwarded-forx",
        "proxy-authorizationx",
    ] {
        assert_eq!(Known::of(n.as_bytes()), Known::Other, "{n}");
    }
}

#[test]
fn may_end_head_is_a_blank_line_search() {
    // Every string of up to 7 bytes over `a`, CR and LF, from every offset, against the
    // plain definition.
    let alphabet = [b'a', b'\r', b'\n'];
    for len in 0..=7u32 {
        for code in 0..3usize.pow(len) {
            let s: Vec<u8> = (0..len)
                .map(|i| alphabet[code / 3usize.pow(i) % 3])
                .collect();
            for from in 0..=s.len() {
                let w = &s[from.saturating_sub(3)..];
                let want =
                    w.windows(2).any(|w| w == b"\n\n") || w.windows(3).any(|w| w == b"\n\r\n");
                assert_eq!(may_end_head(&s, from), want, "{s:?} {from}");
            }
        }
    }
    // Longer than a word, the blank line past it.
    let head = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";
    assert!(may_end_head(head, 0));
    assert!(!may_end_head(&head[..head.len() - 1], 0));
}

#[test]
fn what_cannot_start_a_request_is_known_from_its_first_bytes() {
    let tls_hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03AAAA";
    assert!(crate::cannot_start_request(tls_hello));
    assert!(crate::cannot_start_request(b"\r\nGE\x00"));
    assert!(crate::cannot_start_request(b"GET/x\r"));
    for ok in [
        &b""[..],
        b"G",
        b"GET",
        b"GET /",
        b"\r\n\r\nPOST /x HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"M-SEARCH * HTTP/1.1",
    ] {
        assert!(
            !crate::cannot_start_request(ok),
            "{:?}",
            String::from_utf8_lossy(ok)
        );
    }
    // Only the first 32 bytes of the method are looked at: a long one is left to the
    // parser.
    let mut long = vec![b'A'; 40];
    long.push(b'\x00');
    assert!(!crate::cannot_start_request(&long));
    // Nor more than 64 bytes in all: a trickle of bare CRs costs each read the same.
    let mut crs = vec![b'\r'; 63];
    crs.push(b'\x00');
    assert!(crate::cannot_start_request(&crs));
    crs.insert(0, b'\r');
    assert!(!crate::cannot_start_request(&crs));
}
