//! Property tests for `lb_http1`: head round trips, rewrite output,
//! split/unsplit agreement of framing (including pipelined messages), and
//! robustness of the parsers on arbitrary bytes.

use std::net::{IpAddr, Ipv4Addr};

use lb_http1::rules::HOP_BY_HOP;
use lb_http1::{
    parse_request, parse_response, rewrite_request, rewrite_response, BodyFramer, BodyKind, Error,
    Forwarding, Header, Limits, RequestHead, ResponseHead, Status, Version,
};
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------- strategies

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}"
}

/// A header name that carries no framing or Host meaning.
fn plain_name() -> impl Strategy<Value = String> {
    token().prop_filter("reserved name", |n| {
        !["host", "content-length", "transfer-encoding"]
            .iter()
            .any(|r| n.eq_ignore_ascii_case(r))
    })
}

/// A field value as the parser returns it: no surrounding whitespace.
fn value() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![Just(b' '), Just(b'\t'), 0x21u8..=0x7e, 0x80u8..=0xff];
    vec(byte, 0..24).prop_map(|v| v.trim_ascii().to_vec())
}

fn headers() -> impl Strategy<Value = Vec<Header>> {
    vec(
        (plain_name(), value()).prop_map(|(n, v)| Header::new(n, v)),
        0..8,
    )
}

fn version() -> impl Strategy<Value = Version> {
    prop_oneof![Just(Version::Http10), Just(Version::Http11)]
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "/[A-Za-z0-9/._~%?=&;:@!$'()*+,-]{0,30}",
        1 => "https?://[a-z0-9.-]{1,10}(:[0-9]{1,4})?(/[a-z0-9/?=]{0,10})?",
    ]
}

/// How a generated message frames its body.
#[derive(Debug, Clone)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

fn framing(version: Version) -> BoxedStrategy<Framing> {
    let length = (0u64..1 << 40).prop_map(Framing::Length);
    if version == Version::Http11 {
        prop_oneof![Just(Framing::None), length, Just(Framing::Chunked)].boxed()
    } else {
        prop_oneof![Just(Framing::None), length].boxed()
    }
}

fn add_framing(headers: &mut Vec<Header>, framing: &Framing) {
    match framing {
        Framing::None => {}
        Framing::Length(n) => headers.push(Header::new("Content-Length", n.to_string())),
        Framing::Chunked => headers.push(Header::new("Transfer-Encoding", "chunked")),
    }
}

fn request_head() -> impl Strategy<Value = RequestHead> {
    let method = "[A-Z]{1,10}".prop_filter("CONNECT", |m| m != "CONNECT");
    (
        method,
        target(),
        version(),
        "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
        headers(),
    )
        .prop_flat_map(|(method, target, version, host, headers)| {
            framing(version).prop_map(move |framing| {
                let mut all = vec![Header::new("Host", host.clone())];
                all.extend(headers.clone());
                add_framing(&mut all, &framing);
                RequestHead {
                    method: method.clone(),
                    target: target.clone(),
                    version,
                    headers: all,
                }
            })
        })
}

fn response_head() -> impl Strategy<Value = ResponseHead> {
    (version(), 100u16..1000, "[\t -~]{0,20}", headers()).prop_flat_map(
        |(version, status, reason, headers)| {
            framing(version).prop_map(move |framing| {
                let mut all = headers.clone();
                add_framing(&mut all, &framing);
                ResponseHead {
                    version,
                    status,
                    reason: reason.clone(),
                    headers: all,
                }
            })
        },
    )
}

/// A chunked body: chunks with optional extensions, then trailers.
fn chunked_body() -> impl Strategy<Value = Vec<u8>> {
    let chunk = (
        vec(any::<u8>(), 1..40),
        prop::option::of("[a-z]{1,5}(=[a-z0-9]{1,5})?"),
        any::<bool>(),
        0usize..3,
    );
    let trailer = (plain_name(), value());
    (vec(chunk, 0..5), vec(trailer, 0..3)).prop_map(|(chunks, trailers)| {
        let mut out = Vec::new();
        for (data, ext, upper, zeros) in chunks {
            let size = if upper {
                format!("{:X}", data.len())
            } else {
                format!("{:x}", data.len())
            };
            out.extend_from_slice("0".repeat(zeros).as_bytes());
            out.extend_from_slice(size.as_bytes());
            if let Some(ext) = ext {
                out.extend_from_slice(format!(";{ext}").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for (name, value) in trailers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    })
}

/// Cut points (sorted, deduplicated) for a buffer of length `len`.
fn cuts(len: usize, raw: &[usize]) -> Vec<usize> {
    let mut c: Vec<usize> = raw.iter().map(|r| r % (len + 1)).collect();
    c.sort_unstable();
    c.dedup();
    c
}

fn pieces<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    for &c in cuts {
        out.push(&data[start..c]);
        start = c;
    }
    out.push(&data[start..]);
    out
}

/// Pushes pieces into a framer: total consumed and whether done.
fn frame(kind: BodyKind, pieces: &[&[u8]]) -> Result<(usize, bool), Error> {
    let mut framer = BodyFramer::new(kind);
    let mut total = 0;
    for piece in pieces {
        let p = framer.push(piece)?;
        assert!(
            p.done || p.consumed == piece.len(),
            "not done but left bytes"
        );
        assert!(p.consumed <= piece.len());
        total += p.consumed;
        if p.done {
            break;
        }
    }
    Ok((total, framer.is_done()))
}

/// A simulated proxy reading a client stream that arrives in `pieces`:
/// the (head, body bytes) of each complete request, then the error if any.
fn drive(pieces: &[&[u8]]) -> (Vec<(RequestHead, Vec<u8>)>, Option<Error>) {
    let limits = Limits::default();
    let mut buf = Vec::new();
    let mut done = Vec::new();
    let mut current: Option<(RequestHead, BodyFramer, Vec<u8>)> = None;
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match current.take() {
                None => match parse_request(&buf, &limits) {
                    Ok(Status::Complete(head, n)) => {
                        buf.drain(..n);
                        let kind = head.body_kind().expect("parsed heads have valid framing");
                        current = Some((head, BodyFramer::new(kind), Vec::new()));
                    }
                    Ok(Status::Partial) => break,
                    Err(e) => return (done, Some(e)),
                },
                Some((head, mut framer, mut body)) => match framer.push(&buf) {
                    Ok(p) => {
                        body.extend(buf.drain(..p.consumed));
                        if p.done {
                            done.push((head, body));
                        } else {
                            current = Some((head, framer, body));
                            break;
                        }
                    }
                    Err(e) => return (done, Some(e)),
                },
            }
        }
    }
    (done, None)
}

/// Reference: the origin-form path of a generated (lowercase) target.
fn origin_path(target: &str) -> String {
    let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    else {
        return target.to_owned();
    };
    let path = &rest[rest.find(['/', '?']).unwrap_or(rest.len())..];
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

fn big_limits() -> Limits {
    Limits {
        max_head_bytes: 1 << 20,
        max_headers: 1000,
    }
}

const FWD: Forwarding<'static> = Forwarding {
    client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)),
    client_proto: "http",
    backend_authority: "10.1.2.3:8080",
    backend_path_prefix: "/base/",
};

/// Bytes that look like heads or chunked bodies, to reach deep states.
fn head_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        Just(&b"GET / HTTP/1.1"[..]),
        Just(&b"HTTP/1.1 200 OK"[..]),
        Just(&b"\r\n"[..]),
        Just(&b"\r"[..]),
        Just(&b"\n"[..]),
        Just(&b" "[..]),
        Just(&b"\t"[..]),
        Just(&b"Host: a"[..]),
        Just(&b"Content-Length: 3"[..]),
        Just(&b"Transfer-Encoding: chunked"[..]),
        Just(&b"Connection: upgrade"[..]),
        Just(&b"X: y"[..]),
        Just(&b":"[..]),
        Just(&b"5;e=1"[..]),
        Just(&b"0"[..]),
        Just(&b"hello"[..]),
    ];
    vec(
        prop_oneof![fragment.prop_map(|f| f.to_vec()), vec(any::<u8>(), 1..4)],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

// ---------------------------------------------------------------- properties

proptest! {
    /// A request head we emit parses back to the same fields.
    #[test]
    fn request_head_round_trips(head in request_head()) {
        let mut out = Vec::new();
        head.write(&mut out);
        let parsed = parse_request(&out, &big_limits());
        prop_assert_eq!(parsed, Ok(Status::Complete(head, out.len())));
    }

    /// A response head we emit parses back to the same fields.
    #[test]
    fn response_head_round_trips(head in response_head()) {
        let mut out = Vec::new();
        head.write(&mut out);
        let parsed = parse_response(&out, &big_limits());
        prop_assert_eq!(parsed, Ok(Status::Complete(head, out.len())));
    }

    /// The rewritten request parses, is framed the same, targets the
    /// backend and carries no hop-by-hop headers.
    #[test]
    fn rewritten_request_is_valid(head in request_head(), hop in vec(0usize..7, 0..3)) {
        let mut head = head;
        // The one table (but the framing field, which the generated head sets itself), in
        // upper case as some clients send it.
        let hop_fields: Vec<&str> =
            HOP_BY_HOP.into_iter().filter(|n| *n != "transfer-encoding").collect();
        for h in hop {
            head.headers.push(Header::new(hop_fields[h].to_ascii_uppercase(), "x"));
        }
        let mut out = Vec::new();
        let body = rewrite_request(&head, &FWD, &mut out).unwrap();
        prop_assert_eq!(Ok(body), head.body_kind());
        let Ok(Status::Complete(back, n)) = parse_request(&out, &big_limits()) else {
            panic!("rewritten request does not parse: {:?}", String::from_utf8_lossy(&out));
        };
        prop_assert_eq!(n, out.len());
        prop_assert_eq!(back.body_kind(), Ok(body));
        prop_assert_eq!(back.header("host"), Some(&b"10.1.2.3:8080"[..]));
        prop_assert_eq!(&back.target, &format!("/base{}", origin_path(&head.target)));
        let xff = back.header("x-forwarded-for").unwrap();
        prop_assert!(xff.ends_with(b"192.0.2.9"));
        // (The framing is written again from the body kind.)
        for name in hop_fields {
            prop_assert!(back.header(name).is_none(), "{} survived", name);
        }
    }

    /// The rewritten response parses and is framed like the original.
    #[test]
    fn rewritten_response_is_valid(resp in response_head(), req in request_head(), close: bool) {
        let mut out = Vec::new();
        match rewrite_response(&resp, &req, close, None, &mut out) {
            Err(e) => prop_assert_eq!(e, Error::UnexpectedUpgrade),
            Ok(_) if out.is_empty() => prop_assert!(resp.is_interim() && req.version == Version::Http10),
            Ok(plan) => {
                prop_assert_eq!(Ok(plan.body), resp.body_kind(&req));
                let Ok(Status::Complete(back, _)) = parse_response(&out, &big_limits()) else {
                    panic!("rewritten response does not parse: {:?}", String::from_utf8_lossy(&out));
                };
                // A close-delimited body goes to an HTTP/1.1 client re-chunked.
                prop_assert_eq!(back.body_kind(&req), Ok(plan.sent_body()));
                prop_assert!(!plan.rechunk || plan.body == BodyKind::CloseDelimited);
                prop_assert!(!plan.dechunk || (plan.body == BodyKind::Chunked && !plan.keep_alive));
                prop_assert_eq!(back.status, resp.status);
                prop_assert!(!plan.keep_alive || req.keep_alive());
            }
        }
    }

    /// Chunked bodies: any split gives the same result as one piece, the
    /// body ends exactly where it should, and following bytes are left.
    #[test]
    fn chunked_split_agreement(body in chunked_body(), next in vec(any::<u8>(), 0..16), raw in vec(any::<usize>(), 0..8)) {
        let mut data = body.clone();
        data.extend_from_slice(&next);
        let whole = frame(BodyKind::Chunked, &[data.as_slice()]);
        prop_assert_eq!(whole, Ok((body.len(), true)));
        prop_assert_eq!(frame(BodyKind::Chunked, &pieces(&data, &cuts(data.len(), &raw))), whole);
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        prop_assert_eq!(frame(BodyKind::Chunked, &bytes), whole);
    }

    /// Content-length bodies: same agreement.
    #[test]
    fn length_split_agreement(body in vec(any::<u8>(), 0..200), next in vec(any::<u8>(), 0..16), raw in vec(any::<usize>(), 0..8)) {
        let kind = BodyKind::Length(body.len() as u64);
        let mut data = body.clone();
        data.extend_from_slice(&next);
        let whole = frame(kind, &[data.as_slice()]);
        prop_assert_eq!(whole, Ok((body.len(), true)));
        prop_assert_eq!(frame(kind, &pieces(&data, &cuts(data.len(), &raw))), whole);
    }

    /// A pipelined stream of requests with bodies is cut into the same
    /// messages whatever the arrival chunking.
    #[test]
    fn pipelined_requests_split_agreement(
        msgs in vec((request_head(), vec(any::<u8>(), 0..50), chunked_body(), any::<bool>()), 1..4),
        raw in vec(any::<usize>(), 0..10),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (mut head, plain, chunked, use_chunked) in msgs {
            head.headers.retain(|h| !h.is("content-length") && !h.is("transfer-encoding"));
            let body = if use_chunked && head.version == Version::Http11 {
                head.headers.push(Header::new("Transfer-Encoding", "chunked"));
                chunked
            } else if !plain.is_empty() {
                head.headers.push(Header::new("Content-Length", plain.len().to_string()));
                plain
            } else {
                Vec::new()
            };
            head.write(&mut stream);
            stream.extend_from_slice(&body);
            expected.push((head, body));
        }
        let whole = drive(&[stream.as_slice()]);
        prop_assert_eq!(&whole, &(expected, None));
        prop_assert_eq!(drive(&pieces(&stream, &cuts(stream.len(), &raw))), whole.clone());
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        prop_assert_eq!(drive(&bytes), whole);
    }

    /// The chunk decoder never panics, and splitting never changes its
    /// verdict, on arbitrary and on chunk-like bytes.
    #[test]
    fn chunk_decoder_total(data in prop_oneof![vec(any::<u8>(), 0..256), head_like_bytes()], raw in vec(any::<usize>(), 0..6)) {
        let whole = frame(BodyKind::Chunked, &[data.as_slice()]);
        prop_assert_eq!(frame(BodyKind::Chunked, &pieces(&data, &cuts(data.len(), &raw))), whole);
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        prop_assert_eq!(frame(BodyKind::Chunked, &bytes), whole);
    }

    /// Head parsers never panic; a prefix of the input is `Partial` or gives
    /// the same error as the whole input, never a different verdict.
    #[test]
    fn head_parsers_are_prefix_consistent(data in prop_oneof![vec(any::<u8>(), 0..256), head_like_bytes()], cut: usize) {
        let limits = Limits { max_head_bytes: 128, max_headers: 4 };
        let cut = cut % (data.len() + 1);
        let full_req = parse_request(&data, &limits);
        match (parse_request(&data[..cut], &limits), &full_req) {
            (Ok(Status::Partial), _) => {}
            (Err(e), Err(f)) => prop_assert_eq!(&e, f),
            (prefix, Ok(Status::Complete(_, n))) if cut >= *n => prop_assert_eq!(&prefix, &full_req),
            (prefix, full) => panic!("prefix {prefix:?} vs full {full:?}"),
        }
        let full_res = parse_response(&data, &limits);
        match (parse_response(&data[..cut], &limits), &full_res) {
            (Ok(Status::Partial), _) => {}
            (Err(e), Err(f)) => prop_assert_eq!(&e, f),
            (prefix, Ok(Status::Complete(_, n))) if cut >= *n => prop_assert_eq!(&prefix, &full_res),
            (prefix, full) => panic!("prefix {prefix:?} vs full {full:?}"),
        }
    }
}
