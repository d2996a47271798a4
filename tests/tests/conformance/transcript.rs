//! What one build did with one case, as normalised lines that the two
//! builds must agree on, and the side-by-side view of two of them.

use std::fmt::Write as _;

use lb_tests::{Fnv1a, Received};

use crate::client::{ClientSide, ConnState, Message};

/// Everything one build did with one case.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    pub(crate) client: ClientSide,
    pub(crate) backend: Vec<Received>,
    /// Requests the backend read only after the client's exchange was over
    /// (found at the start of the next case).
    pub(crate) late: Vec<Received>,
    /// `lb` exited during the case (it is restarted for the next one).
    pub(crate) lb_died: bool,
}

impl Outcome {
    pub(crate) fn status(&self) -> Option<u16> {
        self.client.response.as_ref().map(|m| m.status)
    }

    pub(crate) fn forwarded(&self) -> bool {
        !self.backend.is_empty() || !self.late.is_empty()
    }

    /// The requests the backend got, late ones included.
    pub(crate) fn all_received(&self) -> impl Iterator<Item = &Received> {
        self.backend.iter().chain(self.late.iter())
    }

    pub(crate) fn summary(&self) -> String {
        let status = match &self.client.response {
            Some(m) => m.status.to_string(),
            None => "no response".into(),
        };
        let interim: Vec<String> = self
            .client
            .interim
            .iter()
            .map(|m| m.status.to_string())
            .collect();
        let conn = match &self.client.conn {
            ConnState::Open => "open".to_string(),
            ConnState::Closed => "closed".to_string(),
            ConnState::Unclear(w) => format!("unclear: {w}"),
        };
        let fwd = match self.backend.len() + self.late.len() {
            0 => "not forwarded".to_string(),
            1 => "forwarded".to_string(),
            n => format!("forwarded {n}x"),
        };
        let mut s = status;
        if !interim.is_empty() {
            s = format!("{} then {s}", interim.join("+"));
        }
        format!("{s}, {fwd}, conn {conn}")
    }
}

// ---------------------------------------------------------------------------
// Normalised, comparable transcript text
// ---------------------------------------------------------------------------

/// FNV-1a 64 of `data`, for showing long values briefly.
pub(crate) fn fnv(data: &[u8]) -> String {
    let mut h = Fnv1a::default();
    h.update(data);
    h.hex()[..8].to_string()
}

/// `data` escaped and cut to `max` characters; a cut value gets its length
/// and hash, so two long values that differ still show differently.
pub(crate) fn show_bytes(data: &[u8], max: usize) -> String {
    let text: String = data.escape_ascii().to_string();
    if text.len() <= max {
        format!("\"{text}\"")
    } else {
        format!(
            "\"{}\"...({} bytes, #{})",
            &text[..max],
            data.len(),
            fnv(data)
        )
    }
}

/// What a transcript shows of the `Date` fields `lb` sends the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DateRule {
    /// The backend sent none: one `lb` generates is left out (the builds
    /// differ on whether they add one; [`Case::compare_date`] cases compare
    /// that).
    Skip,
    /// The backend sent none: whether `lb` adds one is compared, its value
    /// is not.
    Presence,
    /// The backend sent one: it must arrive as sent.
    Exact,
}

/// The value of a field, with what is generated per run replaced.
pub(crate) fn normalise(name: &str, value: &str) -> String {
    match name {
        "date" => "<date>".into(),
        "x-request-id" => "<id>".into(),
        "host" | "x-forwarded-host" => {
            let mut out = String::new();
            let mut rest = value;
            while let Some(i) = rest.find("127.0.0.1:") {
                let after = i + "127.0.0.1:".len();
                out.push_str(&rest[..after]);
                let digits = rest[after..].bytes().take_while(u8::is_ascii_digit).count();
                out.push_str(if digits > 0 { "<port>" } else { "" });
                rest = &rest[after + digits..];
            }
            out.push_str(rest);
            out
        }
        _ => value.to_string(),
    }
}

/// Fields as comparable lines: lowercase names, sorted by name (stably, so
/// the values of one name keep their order), normalised values.
pub(crate) fn field_lines(
    prefix: &str,
    fields: &[(String, String)],
    date: DateRule,
) -> Vec<String> {
    let mut f: Vec<(String, &str)> = fields
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .filter(|(k, _)| !(k == "date" && date == DateRule::Skip))
        .collect();
    f.sort_by(|a, b| a.0.cmp(&b.0));
    f.into_iter()
        .map(|(k, v)| {
            let v = if k == "date" && date == DateRule::Exact {
                v.to_string()
            } else {
                normalise(&k, v)
            };
            format!("{prefix}{k}: {}", show_value(&v))
        })
        .collect()
}

pub(crate) fn show_value(v: &str) -> String {
    if v.len() <= 60 {
        v.to_string()
    } else {
        let cut: String = v.chars().take(40).collect();
        format!("{cut}...({} bytes, #{})", v.len(), fnv(v.as_bytes()))
    }
}

/// A body with the generated request id of an error reply (`"request_id":"..."`)
/// replaced by `<id>`, as the `x-request-id` field is.
pub(crate) fn normalise_body(body: &[u8]) -> Vec<u8> {
    const KEY: &[u8] = b"\"request_id\":\"";
    let Some(i) = body.windows(KEY.len()).position(|w| w == KEY) else {
        return body.to_vec();
    };
    let start = i + KEY.len();
    let Some(len) = body[start..].iter().position(|&b| b == b'"') else {
        return body.to_vec();
    };
    let mut out = body[..start].to_vec();
    out.extend_from_slice(b"<id>");
    out.extend_from_slice(&body[start + len..]);
    out
}

/// A body as lines of at most 56 escaped characters, at most four of them;
/// a longer body ends with its length and hash.
pub(crate) fn body_lines(body: &[u8]) -> Vec<String> {
    let body = &normalise_body(body);
    let text = body.escape_ascii().to_string();
    let mut out = vec![format!("  body {} bytes", body.len())];
    let chars: Vec<char> = text.chars().collect();
    for (i, piece) in chars.chunks(56).enumerate() {
        if i == 4 {
            out.push(format!("    ...(#{})", fnv(body)));
            break;
        }
        out.push(format!("    |{}", piece.iter().collect::<String>()));
    }
    out
}

pub(crate) fn client_lines(c: &ClientSide, date: DateRule) -> Vec<String> {
    let mut out = vec!["client got:".to_string()];
    for m in &c.interim {
        out.push(format!("  interim {}", m.status));
        out.extend(field_lines("    ", &m.headers, date));
    }
    match &c.response {
        None => out.push("  no response".into()),
        Some(m) => {
            out.push(format!("  status {}", m.status));
            out.extend(field_lines("    ", &m.headers, date));
            out.extend(body_lines(&c.body));
            if !c.trailers.is_empty() {
                out.push("  trailers".into());
                out.extend(field_lines("    ", &c.trailers, date));
            }
            out.push(format!("  body end: {}", c.body_end));
        }
    }
    for n in &c.notes {
        out.push(format!("  note: {n}"));
    }
    out.push(match &c.conn {
        ConnState::Open => "  connection: kept open".into(),
        ConnState::Closed => "  connection: closed".into(),
        ConnState::Unclear(w) => format!("  connection: {w}"),
    });
    out
}

pub(crate) fn received_lines(title: &str, reqs: &[Received]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        out.push(format!(
            "{title} #{}: {}",
            i + 1,
            show_value(&r.request_line)
        ));
        out.extend(field_lines("    ", &r.headers, DateRule::Exact));
        out.push(format!("  framing: {}", r.framing));
        out.extend(body_lines(&r.body));
        if !r.trailers.is_empty() {
            out.push("  trailers".into());
            out.extend(field_lines("    ", &r.trailers, DateRule::Exact));
        }
        if r.sent_continue {
            out.push("  backend sent 100 Continue".into());
        }
        if let Some(p) = &r.problem {
            out.push(format!("  backend could not read it: {p}"));
        }
    }
    out
}

/// The normalised transcript the two builds must agree on.
pub(crate) fn transcript(o: &Outcome, date: DateRule) -> Vec<String> {
    let mut out = client_lines(&o.client, date);
    if o.backend.is_empty() {
        out.push("backend got: nothing".into());
    } else {
        out.extend(received_lines("backend got request", &o.backend));
    }
    out.extend(received_lines("backend got LATE request", &o.late));
    if o.lb_died {
        out.push("lb EXITED during this case".into());
    }
    out
}

/// Two transcripts side by side, aligned on their common lines (longest
/// common subsequence); `!` marks a line that differs, `<` / `>` one that
/// only the left / right side has.
pub(crate) fn side_by_side(left: &[String], right: &[String], names: (&str, &str)) -> String {
    let (n, m) = (left.len(), right.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if left[i] == right[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    type Rows<'a> = Vec<(char, &'a str, &'a str)>;
    /// The lines only one side has, since the last common one, as rows.
    pub(crate) fn flush<'a>(rows: &mut Rows<'a>, l: &mut Vec<&'a str>, r: &mut Vec<&'a str>) {
        for k in 0..l.len().max(r.len()) {
            match (l.get(k), r.get(k)) {
                (Some(a), Some(b)) => rows.push(('!', a, b)),
                (Some(a), None) => rows.push(('<', a, "")),
                (None, Some(b)) => rows.push(('>', "", b)),
                (None, None) => {}
            }
        }
        l.clear();
        r.clear();
    }
    let mut rows: Rows<'_> = Vec::new();
    let (mut only_l, mut only_r): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && left[i] == right[j] {
            flush(&mut rows, &mut only_l, &mut only_r);
            rows.push((' ', &left[i], &right[j]));
            i += 1;
            j += 1;
        } else if j >= m || (i < n && lcs[i + 1][j] >= lcs[i][j + 1]) {
            only_l.push(&left[i]);
            i += 1;
        } else {
            only_r.push(&right[j]);
            j += 1;
        }
    }
    flush(&mut rows, &mut only_l, &mut only_r);
    let width = left
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(names.0.len(), 72);
    let mut out = String::new();
    let _ = writeln!(out, "  {:<width$} | {}", names.0, names.1);
    let _ = writeln!(out, "  {:-<width$}-+-{:-<20}", "", "");
    for (mark, l, r) in rows {
        let l: String = l.chars().take(width).collect();
        let _ = writeln!(out, "{mark} {l:<width$} | {r}");
    }
    out
}

// ---------------------------------------------------------------------------
// The comparison itself (no lb needed)
// ---------------------------------------------------------------------------

pub(crate) fn fields(f: &[(&str, &str)]) -> Vec<(String, String)> {
    f.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A plain outcome: `200` with `headers`, body `hello`, connection open, the
/// backend got one `GET /` with `backend_headers`.
pub(crate) fn sample(headers: &[(&str, &str)], backend_headers: &[(&str, &str)]) -> Outcome {
    Outcome {
        client: ClientSide {
            interim: Vec::new(),
            response: Some(Message {
                status: 200,
                line: "HTTP/1.1 200 OK".into(),
                headers: fields(headers),
            }),
            body: b"hello".to_vec(),
            trailers: Vec::new(),
            body_end: "content-length".into(),
            conn: ConnState::Open,
            notes: Vec::new(),
        },
        backend: vec![Received {
            request_line: "GET / HTTP/1.1".into(),
            headers: fields(backend_headers),
            framing: "none".into(),
            ..Received::default()
        }],
        late: Vec::new(),
        lb_died: false,
    }
}

#[test]
fn the_comparison_sees_every_difference_but_the_normalised_ones() {
    let base = sample(
        &[("Content-Length", "5"), ("X-A", "1"), ("X-A", "2")],
        &[("Host", "127.0.0.1:4000"), ("X-Forwarded-Host", "h:80")],
    );
    let t = |o: &Outcome| transcript(o, DateRule::Skip);
    let same = |o: &Outcome| assert_eq!(t(&base), t(o), "should compare equal");
    let differs = |o: &Outcome, what: &str| assert_ne!(t(&base), t(o), "{what} must differ");

    // Equal: name case, the order of different names, generated values.
    same(&sample(
        &[
            ("x-a", "1"),
            ("content-length", "5"),
            ("X-a", "2"),
            ("Date", "Mon, 01 Jan 2001 00:00:00 GMT"),
        ],
        &[("host", "127.0.0.1:5999"), ("x-forwarded-host", "h:80")],
    ));

    // Different: values, the order of one name's values, a field more,
    // ports outside Host/X-Forwarded-Host.
    differs(
        &sample(
            &[("Content-Length", "5"), ("X-A", "2"), ("X-A", "1")],
            &[("Host", "127.0.0.1:4000"), ("X-Forwarded-Host", "h:80")],
        ),
        "the order of one name's values",
    );
    differs(
        &sample(
            &[
                ("Content-Length", "5"),
                ("X-A", "1"),
                ("X-A", "2"),
                ("X-B", ""),
            ],
            &[("Host", "127.0.0.1:4000"), ("X-Forwarded-Host", "h:80")],
        ),
        "a field more",
    );
    differs(
        &sample(
            &[("Content-Length", "5"), ("X-A", "1"), ("X-A", "2")],
            &[("Host", "127.0.0.1:4000"), ("X-Forwarded-Host", "h:81")],
        ),
        "a port that is not lb's or the backend's",
    );
    type Change = Box<dyn Fn(&mut Outcome)>;
    let variants: Vec<(&str, Change)> = vec![
        (
            "the status",
            Box::new(|o| o.client.response.as_mut().unwrap().status = 201),
        ),
        ("the body", Box::new(|o| o.client.body = b"hellO".to_vec())),
        (
            "a trailer",
            Box::new(|o| o.client.trailers = fields(&[("X-T", "1")])),
        ),
        (
            "an interim response",
            Box::new(|o| {
                o.client.interim.push(Message {
                    status: 100,
                    line: String::new(),
                    headers: Vec::new(),
                })
            }),
        ),
        (
            "the connection",
            Box::new(|o| o.client.conn = ConnState::Closed),
        ),
        (
            "the framing",
            Box::new(|o| o.client.body_end = "chunked".into()),
        ),
        ("what was forwarded", Box::new(|o| o.backend.clear())),
        (
            "the backend's request line",
            Box::new(|o| o.backend[0].request_line = "GET /x HTTP/1.1".into()),
        ),
        (
            "the backend's body",
            Box::new(|o| o.backend[0].body = b"x".to_vec()),
        ),
        (
            "the backend's trailers",
            Box::new(|o| o.backend[0].trailers = fields(&[("X-T", "1")])),
        ),
        ("a late request", Box::new(|o| o.late = o.backend.clone())),
    ];
    for (what, change) in variants {
        let mut o = base.clone();
        change(&mut o);
        differs(&o, what);
    }

    // x-request-id: present in both is enough, its value is generated.
    let id = |v: &str| transcript(&sample(&[("X-Request-Id", v)], &[]), DateRule::Skip);
    assert_eq!(id("a1"), id("b2"));
    assert_ne!(id("a1"), transcript(&sample(&[], &[]), DateRule::Skip));

    // Date: skipped, compared by presence, or compared exactly.
    let dated = sample(&[("Date", "Mon, 01 Jan 2001 00:00:00 GMT")], &[]);
    let other_date = sample(&[("Date", "Tue, 02 Jan 2001 00:00:00 GMT")], &[]);
    let undated = sample(&[], &[]);
    assert_eq!(
        transcript(&dated, DateRule::Skip),
        transcript(&undated, DateRule::Skip)
    );
    assert_ne!(
        transcript(&dated, DateRule::Presence),
        transcript(&undated, DateRule::Presence)
    );
    assert_eq!(
        transcript(&dated, DateRule::Presence),
        transcript(&other_date, DateRule::Presence)
    );
    assert_ne!(
        transcript(&dated, DateRule::Exact),
        transcript(&other_date, DateRule::Exact)
    );

    // A long value that differs past what is shown still shows differently.
    let long_a = format!("{}a", "x".repeat(200));
    let long_b = format!("{}b", "x".repeat(200));
    assert_ne!(show_value(&long_a), show_value(&long_b));
    assert_ne!(body_lines(long_a.as_bytes()), body_lines(long_b.as_bytes()));

    // The side-by-side view marks what differs and aligns the rest.
    let view = side_by_side(
        &transcript(&base, DateRule::Skip),
        &transcript(&undated, DateRule::Skip),
        ("tokio", "smol"),
    );
    assert!(
        view.lines()
            .any(|l| l.starts_with('!') || l.starts_with('<')),
        "{view}"
    );
    assert!(
        view.lines().any(|l| l.starts_with("  client got:")),
        "{view}"
    );
}
