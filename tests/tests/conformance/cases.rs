//! The table: each case a raw client request and the raw backend answer,
//! with what each build must do besides agreeing with the other.

use std::sync::Arc;

use lb_tests::{Received, Script};

use crate::client::{method_of, values, ConnState};
use crate::transcript::{sample, show_bytes, show_value, DateRule, Outcome};
use crate::{Build, HOST};

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

/// A predicate on an outcome: `Err` says what is wrong.
pub(crate) type CheckFn = dyn Fn(&Outcome) -> Result<(), String> + Send + Sync;

/// An extra check on an outcome.
#[derive(Clone)]
pub(crate) struct Check {
    pub(crate) what: String,
    pub(crate) f: Arc<CheckFn>,
}

/// What a build must do with a case (`None`: anything).
#[derive(Clone, Default)]
pub(crate) struct Expect {
    pub(crate) status: Option<u16>,
    pub(crate) forwarded: Option<bool>,
    pub(crate) keep_alive: Option<bool>,
    pub(crate) checks: Vec<Check>,
}

impl Expect {
    /// This expectation with `over`'s fields put over it (its checks added).
    pub(crate) fn with(&self, over: &Expect) -> Expect {
        let mut checks = self.checks.clone();
        checks.extend(over.checks.iter().cloned());
        Expect {
            status: over.status.or(self.status),
            forwarded: over.forwarded.or(self.forwarded),
            keep_alive: over.keep_alive.or(self.keep_alive),
            checks,
        }
    }

    /// What of this `o` misses.
    pub(crate) fn misses(&self, o: &Outcome) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = self.status {
            if o.status() != Some(s) {
                let got = o
                    .status()
                    .map_or_else(|| "no response".to_string(), |s| s.to_string());
                out.push(format!("status {s} expected, got {got}"));
            }
        }
        if let Some(f) = self.forwarded {
            if o.forwarded() != f {
                out.push(if f {
                    "should reach the backend, did not".to_string()
                } else {
                    format!(
                        "must not reach the backend, got {}",
                        o.all_received()
                            .map(|r| show_value(&r.request_line))
                            .collect::<Vec<_>>()
                            .join(" + ")
                    )
                });
            }
        }
        if let Some(k) = self.keep_alive {
            let open = o.client.conn == ConnState::Open;
            if open != k {
                out.push(format!(
                    "client connection should be {}, is {:?}",
                    if k { "kept open" } else { "closed" },
                    o.client.conn
                ));
            }
        }
        for c in &self.checks {
            if let Err(e) = (c.f)(o) {
                out.push(format!("{}: {e}", c.what));
            }
        }
        out
    }
}

pub(crate) struct Case {
    pub(crate) name: &'static str,
    /// The raw bytes the client sends first.
    pub(crate) request: Vec<u8>,
    /// The method of `request` (for the framing of the response body).
    pub(crate) method: String,
    /// Sent after a `100 Continue`, or after [`CONTINUE_WAIT`] without one.
    pub(crate) body_after_100: Option<Vec<u8>>,
    pub(crate) script: Script,
    pub(crate) expect: Expect,
    pub(crate) tokio: Expect,
    pub(crate) smol: Expect,
    /// Why the two builds may answer differently (then only their own
    /// expectations are checked).
    pub(crate) differ: Option<&'static str>,
    /// Compare whether `lb` adds a `Date` the backend did not send.
    pub(crate) compare_date: bool,
}

impl Case {
    pub(crate) fn new(
        name: &'static str,
        request: impl Into<Vec<u8>>,
        response: impl Into<Vec<u8>>,
    ) -> Case {
        let request = request.into();
        Case {
            name,
            method: method_of(&request),
            request,
            body_after_100: None,
            script: Script::new(response),
            expect: Expect::default(),
            tokio: Expect::default(),
            smol: Expect::default(),
            differ: None,
            compare_date: false,
        }
    }

    pub(crate) fn status(mut self, s: u16) -> Case {
        self.expect.status = Some(s);
        self
    }

    pub(crate) fn forwarded(mut self, f: bool) -> Case {
        self.expect.forwarded = Some(f);
        self
    }

    pub(crate) fn keep_alive(mut self, k: bool) -> Case {
        self.expect.keep_alive = Some(k);
        self
    }

    /// A malformed request: `400`, never forwarded, connection closed (the
    /// README's error table).
    pub(crate) fn rejected_400(self) -> Case {
        self.status(400).forwarded(false).keep_alive(false)
    }

    pub(crate) fn check(
        mut self,
        what: impl Into<String>,
        f: impl Fn(&Outcome) -> Result<(), String> + Send + Sync + 'static,
    ) -> Case {
        self.expect.checks.push(Check {
            what: what.into(),
            f: Arc::new(f),
        });
        self
    }

    pub(crate) fn closing(mut self) -> Case {
        self.script = self.script.closing();
        self
    }

    pub(crate) fn never_continue(mut self) -> Case {
        self.script = self.script.never_continue();
        self
    }

    pub(crate) fn body_after_100(mut self, body: &str) -> Case {
        self.body_after_100 = Some(body.as_bytes().to_vec());
        self
    }

    /// Per-build expectations over the common ones.
    pub(crate) fn on(mut self, build: Build, e: Expect) -> Case {
        match build {
            Build::Tokio => self.tokio = e,
            Build::Smol => self.smol = e,
        }
        self
    }

    pub(crate) fn differ(mut self, why: &'static str) -> Case {
        self.differ = Some(why);
        self
    }

    pub(crate) fn compare_date(mut self) -> Case {
        self.compare_date = true;
        self
    }

    /// How the client's `Date` fields are compared in this case.
    pub(crate) fn date_rule(&self) -> DateRule {
        let head_end = self
            .script
            .response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(self.script.response.len());
        let head = String::from_utf8_lossy(&self.script.response[..head_end]).to_ascii_lowercase();
        if head.contains("\r\ndate:") {
            DateRule::Exact
        } else if self.compare_date {
            DateRule::Presence
        } else {
            DateRule::Skip
        }
    }

    pub(crate) fn expect_for(&self, build: Build) -> Expect {
        match build {
            Build::Tokio => self.expect.with(&self.tokio),
            Build::Smol => self.expect.with(&self.smol),
        }
    }
}

/// A raw message: `lines` joined with CRLF, the empty line, then `body`.
pub(crate) fn raw(lines: &[&str], body: &str) -> Vec<u8> {
    let mut out = String::new();
    for l in lines {
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// The usual backend answer: `200`, `Content-Length`, keep-alive.
pub(crate) fn ok(body: &str) -> Vec<u8> {
    raw(
        &[
            "HTTP/1.1 200 OK",
            "Content-Type: text/plain",
            &format!("Content-Length: {}", body.len()),
        ],
        body,
    )
}

// Checks -------------------------------------------------------------------

pub(crate) fn first_received(o: &Outcome) -> Result<&Received, String> {
    o.all_received()
        .next()
        .ok_or_else(|| "the backend got nothing".to_string())
}

/// The backend got none of the fields `names`.
pub(crate) fn backend_lacks(
    names: &'static [&'static str],
) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        let r = first_received(o)?;
        let found: Vec<String> = names
            .iter()
            .filter_map(|n| r.header(n).map(|v| format!("{n}: {v}")))
            .collect();
        if found.is_empty() {
            Ok(())
        } else {
            Err(format!("the backend got {}", found.join(", ")))
        }
    }
}

/// The backend got `name` with exactly these values, in order.
pub(crate) fn backend_values(
    name: &'static str,
    want: &'static [&'static str],
) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        let r = first_received(o)?;
        let got = r.header_all(name);
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "the backend got {name}: {got:?}, expected {want:?}"
            ))
        }
    }
}

/// The backend got `body` (de-chunked).
pub(crate) fn backend_body(body: &'static str) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        let r = first_received(o)?;
        if r.body == body.as_bytes() {
            Ok(())
        } else {
            Err(format!("the backend got body {}", show_bytes(&r.body, 60)))
        }
    }
}

/// The backend got the trailer `name: value`.
pub(crate) fn backend_trailer(
    name: &'static str,
    value: &'static str,
) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        let r = first_received(o)?;
        if values(&r.trailers, name) == [value] {
            Ok(())
        } else {
            Err(format!("the backend got trailers {:?}", r.trailers))
        }
    }
}

/// The backend got no trailers.
pub(crate) fn backend_no_trailers(o: &Outcome) -> Result<(), String> {
    let r = first_received(o)?;
    if r.trailers.is_empty() {
        Ok(())
    } else {
        Err(format!("the backend got trailers {:?}", r.trailers))
    }
}

/// The client got the trailer `name: value`.
pub(crate) fn client_trailer(
    name: &'static str,
    value: &'static str,
) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        if values(&o.client.trailers, name) == [value] {
            Ok(())
        } else {
            Err(format!("the client got trailers {:?}", o.client.trailers))
        }
    }
}

/// The client got no trailers.
pub(crate) fn client_no_trailers(o: &Outcome) -> Result<(), String> {
    if o.client.trailers.is_empty() {
        Ok(())
    } else {
        Err(format!("the client got trailers {:?}", o.client.trailers))
    }
}

/// The client's final response has none of the fields `names`.
pub(crate) fn client_lacks(
    names: &'static [&'static str],
) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        let m = o.client.response.as_ref().ok_or("no response")?;
        let found: Vec<String> = names
            .iter()
            .flat_map(|n| m.values(n).into_iter().map(move |v| format!("{n}: {v}")))
            .collect();
        if found.is_empty() {
            Ok(())
        } else {
            Err(format!("the client got {}", found.join(", ")))
        }
    }
}

/// The client got `name` with exactly these values.
pub(crate) fn client_values(
    name: &'static str,
    want: &'static [&'static str],
) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        let m = o.client.response.as_ref().ok_or("no response")?;
        let got = m.values(name);
        if got == want {
            Ok(())
        } else {
            Err(format!("the client got {name}: {got:?}, expected {want:?}"))
        }
    }
}

/// The client got `body` (de-chunked).
pub(crate) fn client_body(body: &'static str) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        if o.client.body == body.as_bytes() {
            Ok(())
        } else {
            Err(format!(
                "the client got body {}",
                show_bytes(&o.client.body, 60)
            ))
        }
    }
}

/// The client got an interim response `status` before the final one.
pub(crate) fn client_interim(status: u16) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        if o.client.interim.iter().any(|m| m.status == status) {
            Ok(())
        } else {
            let got: Vec<u16> = o.client.interim.iter().map(|m| m.status).collect();
            Err(format!("interim responses {got:?}"))
        }
    }
}

/// The final status is one of `allowed`.
pub(crate) fn status_in(allowed: &'static [u16]) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| match o.status() {
        Some(s) if allowed.contains(&s) => Ok(()),
        s => Err(format!("status {s:?}")),
    }
}

/// The table. Expectations on top of "both builds agree" come from the
/// conformance issue (marked "issue") or from what the README and the
/// existing black-box suite already promise for both builds ("README",
/// "bad_input.rs").
pub(crate) fn cases() -> Vec<Case> {
    let h = format!("Host: {HOST}");
    let h = h.as_str();
    let big_value = "a".repeat(70 * 1024);
    let big_url = format!("GET /{} HTTP/1.1", "u".repeat(100 * 1024));
    let big_resp_value = format!("X-Big: {}", "b".repeat(100 * 1024));
    let chunked_hello = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let chunked_trailer = "5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n";
    vec![
        // -- baseline ---------------------------------------------------
        Case::new(
            "get_plain",
            raw(&["GET /plain HTTP/1.1", h], ""),
            ok("hello"),
        )
        .status(200)
        .forwarded(true)
        .keep_alive(true)
        .check("client body", client_body("hello")),
        Case::new(
            "resp_without_date",
            raw(&["GET /nodate HTTP/1.1", h], ""),
            ok("no date"),
        )
        .compare_date()
        .status(200),
        Case::new(
            "resp_with_date",
            raw(&["GET /date HTTP/1.1", h], ""),
            raw(
                &[
                    "HTTP/1.1 200 OK",
                    "Date: Tue, 01 Jan 2030 00:00:00 GMT",
                    "Content-Length: 4",
                ],
                "date",
            ),
        )
        .status(200)
        .check(
            "the backend's Date passes",
            client_values("date", &["Tue, 01 Jan 2030 00:00:00 GMT"]),
        ),
        Case::new(
            "post_content_length",
            raw(
                &["POST /upload HTTP/1.1", h, "Content-Length: 11"],
                "hello world",
            ),
            raw(&["HTTP/1.1 201 Created", "Content-Length: 2"], "ok"),
        )
        .status(201)
        .forwarded(true)
        .keep_alive(true)
        .check("backend body", backend_body("hello world")),
        // -- hop-by-hop, request -> backend -----------------------------
        Case::new(
            "req_fields_named_in_connection",
            raw(
                &[
                    "GET /hop HTTP/1.1",
                    h,
                    "Connection: keep-alive, X-Private",
                    "X-Private: secret",
                    "X-Public: ok",
                ],
                "",
            ),
            ok("hop"),
        )
        .status(200)
        .check(
            "README: fields named in Connection are dropped",
            backend_lacks(&["x-private"]),
        )
        .check(
            "README: other fields pass",
            backend_values("x-public", &["ok"]),
        ),
        Case::new(
            "req_keep_alive_proxy_te_trailer",
            raw(
                &[
                    "GET /hop HTTP/1.1",
                    h,
                    "Keep-Alive: timeout=5",
                    "Proxy-Connection: keep-alive",
                    "Proxy-Authorization: Basic Zm9vOmJhcg==",
                    "TE: trailers, deflate",
                    "Trailer: X-Checksum",
                ],
                "",
            ),
            ok("hop"),
        )
        .status(200)
        .check(
            "RFC 9110 §7.6.1: Keep-Alive, Proxy-Connection are dropped",
            backend_lacks(&["keep-alive", "proxy-connection"]),
        )
        .check("RFC 9110 §7.6.1: TE is not passed on as is", |o| {
            let r = first_received(o)?;
            match r.header_all("te").as_slice() {
                [] | ["trailers"] => Ok(()),
                v => Err(format!("the backend got TE: {v:?}")),
            }
        }),
        Case::new(
            "req_upgrade_answered_without_101",
            raw(
                &[
                    "GET /ws HTTP/1.1",
                    h,
                    "Connection: Upgrade",
                    "Upgrade: websocket",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version: 13",
                ],
                "",
            ),
            ok("no upgrade"),
        )
        .status(200)
        .forwarded(true)
        .check("client body", client_body("no upgrade")),
        Case::new(
            "req_upgrade_not_named_in_connection",
            raw(&["GET /h2c HTTP/1.1", h, "Upgrade: h2c"], ""),
            ok("h2c"),
        )
        .status(200)
        .check(
            "RFC 9110 §7.6.1: Upgrade is dropped",
            backend_lacks(&["upgrade"]),
        ),
        // -- hop-by-hop, backend -> client ------------------------------
        Case::new(
            "resp_fields_named_in_connection",
            raw(&["GET /hop HTTP/1.1", h], ""),
            raw(
                &[
                    "HTTP/1.1 200 OK",
                    "Connection: X-Internal",
                    "X-Internal: 1",
                    "X-Public: 2",
                    "Content-Length: 3",
                ],
                "hop",
            ),
        )
        .status(200)
        .keep_alive(true)
        .check(
            "README: fields named in Connection are dropped",
            client_lacks(&["x-internal"]),
        )
        .check(
            "README: other fields pass",
            client_values("x-public", &["2"]),
        ),
        Case::new(
            "resp_keep_alive_proxy_authenticate_trailer_upgrade",
            raw(&["GET /hop HTTP/1.1", h], ""),
            raw(
                &[
                    "HTTP/1.1 200 OK",
                    "Keep-Alive: timeout=5, max=100",
                    "Proxy-Authenticate: Basic realm=\"lb\"",
                    "Trailer: X-Checksum",
                    "Upgrade: h2c",
                    "Content-Length: 3",
                ],
                "hop",
            ),
        )
        .status(200)
        .keep_alive(true)
        .check(
            "RFC 9110 §7.6.1: Keep-Alive and Upgrade (no 101) are dropped",
            client_lacks(&["keep-alive", "upgrade"]),
        ),
        Case::new(
            "resp_connection_close_from_backend",
            raw(&["GET /closing HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "Connection: close", "Content-Length: 3"],
                "bye",
            ),
        )
        .closing()
        .status(200)
        .check("client body", client_body("bye")),
        // -- X-Forwarded-* ----------------------------------------------
        Case::new(
            "xff_none_from_client",
            raw(&["GET /xff HTTP/1.1", h], ""),
            ok("xff"),
        )
        .status(200)
        .check(
            "README: X-Forwarded-For is the client",
            backend_values("x-forwarded-for", &["127.0.0.1"]),
        )
        .check(
            "README: X-Forwarded-Proto http",
            backend_values("x-forwarded-proto", &["http"]),
        )
        .check(
            "README: X-Forwarded-Host is the client's Host",
            backend_values("x-forwarded-host", &[HOST]),
        ),
        Case::new(
            "xff_one_from_client",
            raw(&["GET /xff HTTP/1.1", h, "X-Forwarded-For: 10.0.0.1"], ""),
            ok("xff"),
        )
        .status(200)
        .check(
            "README: the client address is appended",
            backend_values("x-forwarded-for", &["10.0.0.1, 127.0.0.1"]),
        ),
        Case::new(
            "xff_several_lines_from_client",
            raw(
                &[
                    "GET /xff HTTP/1.1",
                    h,
                    "X-Forwarded-For: 10.0.0.1",
                    "X-Forwarded-For: 10.0.0.2, 10.0.0.3",
                ],
                "",
            ),
            ok("xff"),
        )
        .status(200)
        .check("the list is kept whole, in order, then the client", |o| {
            let r = first_received(o)?;
            let all = r.header_all("x-forwarded-for").join(", ");
            if all == "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1" {
                Ok(())
            } else {
                Err(format!("the backend got X-Forwarded-For {all:?}"))
            }
        }),
        Case::new(
            "xfp_xfh_from_client_are_replaced",
            raw(
                &[
                    "GET /xff HTTP/1.1",
                    h,
                    "X-Forwarded-Proto: https",
                    "X-Forwarded-Host: evil.test",
                ],
                "",
            ),
            ok("xff"),
        )
        .status(200)
        .check(
            "README: X-Forwarded-Proto overwritten",
            backend_values("x-forwarded-proto", &["http"]),
        )
        .check(
            "README: X-Forwarded-Host overwritten",
            backend_values("x-forwarded-host", &[HOST]),
        ),
        // -- request framing ----------------------------------------------
        Case::new(
            "req_chunked",
            raw(
                &["POST /upload HTTP/1.1", h, "Transfer-Encoding: chunked"],
                chunked_hello,
            ),
            ok("got it"),
        )
        .status(200)
        .forwarded(true)
        .keep_alive(true)
        .check("backend body", backend_body("hello world")),
        Case::new(
            "req_te_chunked_capitalised",
            raw(
                &["POST /upload HTTP/1.1", h, "Transfer-Encoding: Chunked"],
                chunked_hello,
            ),
            ok("got it"),
        )
        .status(200)
        .check("backend body", backend_body("hello world")),
        Case::new(
            "req_te_gzip_chunked",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Transfer-Encoding: gzip, chunked",
                ],
                chunked_hello,
            ),
            ok("got it"),
        )
        .rejected_400(),
        Case::new(
            "req_te_chunked_gzip",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Transfer-Encoding: chunked, gzip",
                ],
                chunked_hello,
            ),
            ok("got it"),
        )
        .rejected_400(),
        Case::new(
            "req_te_identity",
            raw(
                &["POST /upload HTTP/1.1", h, "Transfer-Encoding: identity"],
                "hello",
            ),
            ok("got it"),
        )
        .rejected_400(),
        // A body that turns out badly framed: `lb` answers 400 itself and says the
        // connection ends (the rest of the body is not read).
        Case::new(
            "req_chunked_bad_size",
            raw(
                &["POST /upload HTTP/1.1", h, "Transfer-Encoding: chunked"],
                "zz\r\nhello\r\n0\r\n\r\n",
            ),
            ok("got it"),
        )
        .status(400)
        .keep_alive(false)
        .check("says close", client_values("connection", &["close"])),
        Case::new(
            "req_te_chunked_on_two_lines",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Transfer-Encoding: chunked",
                    "Transfer-Encoding: chunked",
                ],
                chunked_hello,
            ),
            ok("got it"),
        )
        .rejected_400(),
        Case::new(
            "req_cl_then_te",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Content-Length: 5",
                    "Transfer-Encoding: chunked",
                ],
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            ok("got it"),
        )
        .differ(CL_TE)
        .on(Build::Smol, cl_te_smol())
        .on(Build::Tokio, cl_te_tokio()),
        Case::new(
            "req_te_then_cl",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Transfer-Encoding: chunked",
                    "Content-Length: 15",
                ],
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            ok("got it"),
        )
        .differ(CL_TE)
        .on(Build::Smol, cl_te_smol())
        .on(Build::Tokio, cl_te_tokio()),
        Case::new(
            "req_cl_duplicate_equal",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Content-Length: 5",
                    "Content-Length: 5",
                ],
                "hello",
            ),
            ok("got it"),
        )
        .status(200)
        .check(
            "bad_input.rs: identical lengths are one",
            backend_body("hello"),
        ),
        Case::new(
            "req_cl_duplicate_differing",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Content-Length: 5",
                    "Content-Length: 7",
                ],
                "hello",
            ),
            ok("got it"),
        )
        .rejected_400(),
        Case::new(
            "req_cl_list_equal",
            raw(
                &["POST /upload HTTP/1.1", h, "Content-Length: 5, 5"],
                "hello",
            ),
            ok("got it"),
        ),
        Case::new(
            "req_cl_plus_sign",
            raw(&["POST /upload HTTP/1.1", h, "Content-Length: +5"], "hello"),
            ok("got it"),
        ),
        Case::new(
            "req_cl_surrounding_spaces",
            raw(
                &["POST /upload HTTP/1.1", h, "Content-Length:    5   "],
                "hello",
            ),
            ok("got it"),
        ),
        Case::new(
            "req_cl_inner_space",
            raw(
                &["POST /upload HTTP/1.1", h, "Content-Length: 1 1"],
                "hello world",
            ),
            ok("got it"),
        ),
        // -- response framing ---------------------------------------------
        Case::new(
            "resp_chunked",
            raw(&["GET /chunked HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "Transfer-Encoding: chunked"],
                chunked_hello,
            ),
        )
        .status(200)
        .keep_alive(true)
        .check("client body", client_body("hello world")),
        Case::new(
            "resp_te_gzip_chunked",
            raw(&["GET /gz HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "Transfer-Encoding: gzip, chunked"],
                chunked_hello,
            ),
        )
        .status(502),
        Case::new(
            "resp_te_chunked_gzip",
            raw(&["GET /gz HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "Transfer-Encoding: chunked, gzip"],
                chunked_hello,
            ),
        )
        .closing()
        .status(502),
        Case::new(
            "resp_te_chunked_on_two_lines",
            raw(&["GET /te2 HTTP/1.1", h], ""),
            raw(
                &[
                    "HTTP/1.1 200 OK",
                    "Transfer-Encoding: chunked",
                    "Transfer-Encoding: chunked",
                ],
                chunked_hello,
            ),
        ),
        Case::new(
            "resp_cl_and_te",
            raw(&["GET /clte HTTP/1.1", h], ""),
            raw(
                &[
                    "HTTP/1.1 200 OK",
                    "Content-Length: 5",
                    "Transfer-Encoding: chunked",
                ],
                chunked_hello,
            ),
        )
        .status(502),
        Case::new(
            "resp_cl_duplicate_equal",
            raw(&["GET /cl2 HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "Content-Length: 5", "Content-Length: 5"],
                "hello",
            ),
        ),
        Case::new(
            "resp_cl_duplicate_differing",
            raw(&["GET /cl2 HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "Content-Length: 5", "Content-Length: 6"],
                "hello!",
            ),
        )
        .closing()
        .status(502),
        // A list, even of equal values, is not one length (hyper read it as one and
        // passed the list on).
        Case::new(
            "resp_cl_list_equal",
            raw(&["GET /cllist HTTP/1.1", h], ""),
            raw(&["HTTP/1.1 200 OK", "Content-Length: 2, 2"], "ok"),
        )
        .closing()
        .status(502),
        Case::new(
            "resp_cl_plus_sign",
            raw(&["GET /clplus HTTP/1.1", h], ""),
            raw(&["HTTP/1.1 200 OK", "Content-Length: +5"], "hello"),
        )
        .closing(),
        Case::new(
            "resp_cl_surrounding_spaces",
            raw(&["GET /clspaces HTTP/1.1", h], ""),
            raw(&["HTTP/1.1 200 OK", "Content-Length:    5   "], "hello"),
        ),
        Case::new(
            "resp_close_delimited",
            raw(&["GET /eof HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "Content-Type: text/plain"],
                "until the backend closes",
            ),
        )
        .closing()
        .status(200)
        .check("client body", client_body("until the backend closes")),
        // -- Expect: 100-continue, 103 ------------------------------------
        Case::new(
            "expect_100_backend_sends_100",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Content-Length: 5",
                    "Expect: 100-continue",
                ],
                "",
            ),
            ok("got it"),
        )
        .body_after_100("hello")
        .status(200)
        .check("backend body", backend_body("hello")),
        Case::new(
            "expect_100_backend_never_sends_100",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Content-Length: 5",
                    "Expect: 100-continue",
                ],
                "",
            ),
            ok("got it"),
        )
        .never_continue()
        .body_after_100("hello")
        .status(200)
        .check("issue: lb answers 100 Continue itself", client_interim(100))
        .check("backend body", backend_body("hello")),
        Case::new(
            "resp_103_early_hints",
            raw(&["GET /hints HTTP/1.1", h], ""),
            [
                raw(
                    &[
                        "HTTP/1.1 103 Early Hints",
                        "Link: </style.css>; rel=preload; as=style",
                    ],
                    "",
                ),
                ok("hinted"),
            ]
            .concat(),
        )
        .status(200)
        .check("client body", client_body("hinted"))
        .differ(
            "RFC 9110 §15.2 has a proxy forward 1xx responses; hyper's client consumes them \
             and its server cannot send one (but the 100 it makes itself): the tokio build \
             drops 103 Early Hints",
        )
        .on(
            Build::Smol,
            expect_check("RFC 9110 §15.2: the 103 is forwarded", client_interim(103)),
        )
        .on(
            Build::Tokio,
            expect_check("hyper: the 103 is dropped", |o: &Outcome| {
                match o.client.interim.is_empty() {
                    true => Ok(()),
                    false => Err(format!("{} interim responses", o.client.interim.len())),
                }
            }),
        ),
        // -- responses without a body, with a Content-Length ---------------
        Case::new(
            "head_with_content_length",
            raw(&["HEAD /file HTTP/1.1", h], ""),
            raw(&["HTTP/1.1 200 OK", "Content-Length: 1234"], ""),
        )
        .status(200)
        .keep_alive(true),
        Case::new(
            "resp_204_with_content_length",
            raw(&["DELETE /thing HTTP/1.1", h], ""),
            raw(&["HTTP/1.1 204 No Content", "Content-Length: 5"], ""),
        )
        .status(204),
        Case::new(
            "resp_304_with_content_length",
            raw(&["GET /cached HTTP/1.1", h, "If-None-Match: \"v1\""], ""),
            raw(
                &[
                    "HTTP/1.1 304 Not Modified",
                    "ETag: \"v1\"",
                    "Content-Length: 1234",
                ],
                "",
            ),
        )
        .status(304)
        .keep_alive(true),
        // -- trailers -------------------------------------------------------
        Case::new(
            "req_trailers_declared",
            raw(
                &[
                    "POST /upload HTTP/1.1",
                    h,
                    "Transfer-Encoding: chunked",
                    "Trailer: X-Checksum",
                ],
                chunked_trailer,
            ),
            ok("got it"),
        )
        .status(200)
        .check("backend body", backend_body("hello"))
        .check(
            "issue: request trailers are forwarded",
            backend_trailer("x-checksum", "abc"),
        ),
        Case::new(
            "req_trailers_undeclared",
            raw(
                &["POST /upload HTTP/1.1", h, "Transfer-Encoding: chunked"],
                chunked_trailer,
            ),
            ok("got it"),
        )
        .status(200)
        .check("backend body", backend_body("hello"))
        .differ(
            "hyper's client writes only the trailer fields the request's `Trailer` field \
             names, and an undeclared trailer is known only at the end of the body: the \
             tokio build cannot forward it",
        )
        .on(
            Build::Smol,
            expect_check(
                "issue: request trailers are forwarded",
                backend_trailer("x-checksum", "abc"),
            ),
        )
        .on(
            Build::Tokio,
            expect_check(
                "hyper: undeclared request trailers are dropped",
                backend_no_trailers,
            ),
        ),
        Case::new(
            "resp_trailers_declared_te_trailers",
            raw(&["GET /trailers HTTP/1.1", h, "TE: trailers"], ""),
            raw(
                &[
                    "HTTP/1.1 200 OK",
                    "Transfer-Encoding: chunked",
                    "Trailer: X-Checksum",
                ],
                chunked_trailer,
            ),
        )
        .status(200)
        .check("client body", client_body("hello")),
        Case::new(
            "resp_trailers_undeclared",
            raw(&["GET /trailers HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "Transfer-Encoding: chunked"],
                chunked_trailer,
            ),
        )
        .status(200)
        .check("client body", client_body("hello"))
        .differ(
            "hyper's server writes only the trailer fields the response's `Trailer` field \
             names (and only to a client that sent `TE: trailers`); RFC 9110 §6.5.1 lets a \
             recipient discard trailers: the tokio build drops undeclared ones, the smol \
             build passes the chunked body on as it came",
        )
        .on(
            Build::Smol,
            expect_check(
                "the trailer is passed on",
                client_trailer("x-checksum", "abc"),
            ),
        )
        .on(
            Build::Tokio,
            expect_check("hyper: undeclared trailers are dropped", client_no_trailers),
        ),
        // -- HTTP/1.0 -------------------------------------------------------
        Case::new(
            "http10_client",
            raw(&["GET /old HTTP/1.0", h], ""),
            ok("old"),
        )
        .status(200)
        .keep_alive(false)
        .check("client body", client_body("old")),
        Case::new(
            "http10_client_keep_alive",
            raw(&["GET /old HTTP/1.0", h, "Connection: keep-alive"], ""),
            ok("old"),
        )
        .status(200)
        .keep_alive(true)
        .check("client body", client_body("old")),
        Case::new(
            "http10_client_without_host",
            raw(&["GET /old HTTP/1.0"], ""),
            ok("old"),
        ),
        Case::new(
            "http10_backend_content_length",
            raw(&["GET /old-backend HTTP/1.1", h], ""),
            raw(&["HTTP/1.0 200 OK", "Content-Length: 5"], "hello"),
        )
        .closing()
        .status(200)
        .check("client body", client_body("hello")),
        Case::new(
            "http10_backend_close_delimited",
            raw(&["GET /old-backend HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.0 200 OK", "Content-Type: text/plain"],
                "hello from 1.0",
            ),
        )
        .closing()
        .status(200)
        .check("client body", client_body("hello from 1.0")),
        // An HTTP/1.0 client asked to keep the connection, but the body can only end
        // with it: both builds say `close` (hyper alone said `keep-alive`).
        Case::new(
            "http10_keep_alive_close_delimited_answer",
            raw(
                &["GET /old-stream HTTP/1.0", h, "Connection: keep-alive"],
                "",
            ),
            raw(
                &["HTTP/1.0 200 OK", "Content-Type: text/event-stream"],
                "data: 1\n\n",
            ),
        )
        .closing()
        .status(200)
        .keep_alive(false)
        .check("client body", client_body("data: 1\n\n"))
        .check("says close", client_values("connection", &["close"])),
        // A backend that answers an HTTP/1.0 request in chunks (RFC 9112 §6.1 forbids it):
        // the client gets the data alone, delimited by the close.
        Case::new(
            "http10_client_chunked_answer",
            raw(
                &["GET /old-chunks HTTP/1.0", h, "Connection: keep-alive"],
                "",
            ),
            raw(
                &["HTTP/1.1 200 OK", "Transfer-Encoding: chunked"],
                "5;ext=1\r\nhello\r\n0\r\n\r\n",
            ),
        )
        .status(200)
        .keep_alive(false)
        .check("client body", client_body("hello"))
        .check("no chunks", client_lacks(&["transfer-encoding"]))
        .check("says close", client_values("connection", &["close"])),
        // `Upgrade` in HTTP/1.0 is ignored (RFC 9110 §7.8): a plain request.
        Case::new(
            "http10_upgrade_ignored",
            raw(
                &[
                    "GET /ws HTTP/1.0",
                    h,
                    "Connection: Upgrade",
                    "Upgrade: websocket",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version: 13",
                ],
                "",
            ),
            ok("plain"),
        )
        .status(200)
        .forwarded(true)
        .check("no upgrade upstream", backend_lacks(&["upgrade"]))
        .check("client body", client_body("plain")),
        // -- request targets and methods -------------------------------------
        // Authority-form is CONNECT's alone, `*` OPTIONS' alone (RFC 9112 §3.2.3-4);
        // an absolute-form target is `http(s)` without user info (RFC 9110 §4.2.4).
        Case::new(
            "authority_form_target",
            raw(&["GET b.example:443 HTTP/1.1", h], ""),
            ok("no"),
        )
        .rejected_400(),
        Case::new(
            "bare_word_target",
            raw(&["GET x HTTP/1.1", h], ""),
            ok("no"),
        )
        .rejected_400(),
        Case::new(
            "asterisk_target_not_options",
            raw(&["GET * HTTP/1.1", h], ""),
            ok("no"),
        )
        .rejected_400(),
        Case::new(
            "absolute_form_with_user_info",
            raw(&["GET http://u:p@b.example:99/x HTTP/1.1", h], ""),
            ok("no"),
        )
        .rejected_400(),
        Case::new(
            "absolute_form_other_scheme",
            raw(&["GET ftp://b.example/x HTTP/1.1", h], ""),
            ok("no"),
        )
        .rejected_400(),
        // Bytes that cannot begin a request (a TLS ClientHello on the plain port): 400 at
        // once, not after the head timeout.
        Case::new(
            "tls_client_hello",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03AAAAAAAAAAAAAAAAAAAAAAAA".to_vec(),
            ok("no"),
        )
        .rejected_400(),
        Case::new(
            "absolute_form_target",
            raw(&["GET http://conformance.test/abs?q=1 HTTP/1.1", h], ""),
            ok("abs"),
        )
        .status(200),
        Case::new(
            "absolute_form_target_other_host",
            raw(&["GET http://other.test/abs HTTP/1.1", h], ""),
            ok("abs"),
        ),
        Case::new(
            "options_asterisk",
            raw(&["OPTIONS * HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "Allow: GET, POST", "Content-Length: 0"],
                "",
            ),
        ),
        Case::new(
            "connect_method",
            raw(
                &["CONNECT example.com:443 HTTP/1.1", "Host: example.com:443"],
                "",
            ),
            raw(&["HTTP/1.1 200 Connection Established"], ""),
        )
        .forwarded(false)
        .check(
            "issue: CONNECT is refused (400, 405 or 501)",
            status_in(&[400, 405, 501]),
        ),
        // -- Host -------------------------------------------------------------
        Case::new(
            "host_missing",
            raw(&["GET /nohost HTTP/1.1"], ""),
            ok("nohost"),
        )
        .status(400)
        .forwarded(false),
        Case::new(
            "host_twice",
            raw(&["GET /twohosts HTTP/1.1", h, "Host: other.test"], ""),
            ok("twohosts"),
        )
        .status(400)
        .forwarded(false),
        Case::new(
            "host_with_space",
            raw(&["GET /badhost HTTP/1.1", "Host: a b"], ""),
            ok("badhost"),
        )
        .status(400)
        .forwarded(false),
        // -- obs-fold -----------------------------------------------------------
        Case::new(
            "req_obs_fold",
            raw(&["GET /fold HTTP/1.1", h, "X-Folded: a", " b"], ""),
            ok("fold"),
        )
        .rejected_400(),
        Case::new(
            "resp_obs_fold",
            raw(&["GET /fold HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", "X-Folded: a", " b", "Content-Length: 4"],
                "fold",
            ),
        )
        .closing()
        .status(502),
        // -- sizes and garbage ------------------------------------------------
        Case::new(
            "req_head_over_64k",
            raw(
                &["GET /huge HTTP/1.1", h, &format!("X-Huge: {big_value}")],
                "",
            ),
            ok("huge"),
        )
        .status(431)
        .forwarded(false),
        Case::new("req_url_100k", raw(&[&big_url, h], ""), ok("long url"))
            .status(414)
            .forwarded(false),
        Case::new(
            "resp_head_100k",
            raw(&["GET /bighead HTTP/1.1", h], ""),
            raw(
                &["HTTP/1.1 200 OK", &big_resp_value, "Content-Length: 2"],
                "ok",
            ),
        )
        .closing()
        .status(502),
        Case::new(
            "resp_garbage_status_line",
            raw(&["GET /garbage HTTP/1.1", h], ""),
            raw(&["HTTP/1.1 abc OK", "Content-Length: 2"], "ok"),
        )
        .closing()
        .status(502),
        Case::new(
            "resp_not_http",
            raw(&["GET /garbage HTTP/1.1", h], ""),
            b"hello, this is not HTTP\r\n\r\n".to_vec(),
        )
        .closing()
        .status(502),
        Case::new(
            "resp_101_without_upgrade_request",
            raw(&["GET /surprise HTTP/1.1", h], ""),
            raw(
                &[
                    "HTTP/1.1 101 Switching Protocols",
                    "Connection: upgrade",
                    "Upgrade: h2c",
                ],
                "",
            ),
        )
        .closing(),
    ]
}

pub(crate) const CL_TE: &str =
    "RFC 9112 §6.3 lets a server reject a request with both Content-Length and \
                     Transfer-Encoding or let the chunked framing win and close the connection: \
                     the smol build answers 400; in the tokio build hyper drops the \
                     Content-Length before lb sees it, so it forwards the body re-framed as \
                     chunked and closes the client connection (README, Limitations)";

pub(crate) fn cl_te_smol() -> Expect {
    Expect {
        status: Some(400),
        forwarded: Some(false),
        keep_alive: Some(false),
        checks: Vec::new(),
    }
}

pub(crate) fn cl_te_tokio() -> Expect {
    let mut e = Expect {
        status: Some(200),
        forwarded: Some(true),
        keep_alive: Some(false),
        checks: Vec::new(),
    };
    e.checks.push(Check {
        what: "the body goes out chunked, without Content-Length".into(),
        f: Arc::new(|o: &Outcome| {
            let r = first_received(o)?;
            if r.framing == "chunked" && r.header("content-length").is_none() && r.body == b"hello"
            {
                Ok(())
            } else {
                Err(format!(
                    "the backend got framing {}, Content-Length {:?}, body {}",
                    r.framing,
                    r.header("content-length"),
                    show_bytes(&r.body, 40)
                ))
            }
        }),
    });
    e
}

pub(crate) fn expect_check(
    what: &str,
    f: impl Fn(&Outcome) -> Result<(), String> + Send + Sync + 'static,
) -> Expect {
    Expect {
        checks: vec![Check {
            what: what.into(),
            f: Arc::new(f),
        }],
        ..Expect::default()
    }
}

#[test]
fn every_expectation_can_fail() {
    let o = sample(&[("Content-Length", "5")], &[]);
    let holds = |e: Expect| assert!(e.misses(&o).is_empty(), "{:?}", e.misses(&o));
    let fails = |e: Expect| assert_eq!(e.misses(&o).len(), 1, "{:?}", e.misses(&o));
    holds(Expect {
        status: Some(200),
        forwarded: Some(true),
        keep_alive: Some(true),
        checks: Vec::new(),
    });
    fails(Expect {
        status: Some(400),
        ..Expect::default()
    });
    fails(Expect {
        forwarded: Some(false),
        ..Expect::default()
    });
    fails(Expect {
        keep_alive: Some(false),
        ..Expect::default()
    });
    fails(expect_check("a check", |_| Err("no".into())));
    // Per-build expectations go over the common ones.
    let common = Expect {
        status: Some(400),
        ..Expect::default()
    };
    let over = Expect {
        status: Some(200),
        ..Expect::default()
    };
    assert!(common.with(&over).misses(&o).is_empty());
    // The check helpers.
    assert!(client_body("hello")(&o).is_ok());
    assert!(client_body("hell")(&o).is_err());
    assert!(client_values("content-length", &["5"])(&o).is_ok());
    assert!(client_values("content-length", &["6"])(&o).is_err());
    assert!(client_lacks(&["x-a"])(&o).is_ok());
    assert!(client_lacks(&["content-length"])(&o).is_err());
    assert!(client_interim(100)(&o).is_err());
    assert!(status_in(&[400, 200])(&o).is_ok());
    assert!(status_in(&[400, 405])(&o).is_err());
    let o = sample(&[], &[("X-Forwarded-For", "10.0.0.1, 127.0.0.1")]);
    assert!(backend_values("x-forwarded-for", &["10.0.0.1, 127.0.0.1"])(&o).is_ok());
    assert!(backend_values("x-forwarded-for", &["127.0.0.1"])(&o).is_err());
    assert!(backend_lacks(&["x-private"])(&o).is_ok());
    assert!(backend_lacks(&["x-forwarded-for"])(&o).is_err());
    assert!(backend_body("")(&o).is_ok());
    assert!(backend_body("x")(&o).is_err());
    assert!(backend_no_trailers(&o).is_ok());
    assert!(backend_trailer("x-checksum", "abc")(&o).is_err());
}
