//! Fuzz harness: response heads, their rewrite, and the response body
//! framer of `lb_http1`.
//!
//! The first input byte picks the request being answered (GET, HEAD,
//! WebSocket upgrade, HTTP/1.0); the rest is the backend's byte stream.
//! `run` must never panic. Invariants checked:
//! * a prefix of the input parses as `Partial` or with the same verdict;
//! * a parsed head written back parses to the same head;
//! * the rewritten head parses, with the same body framing;
//! * framing the bytes after the head agrees between one piece and two.

use lb_http1::{
    parse_request, parse_response, rewrite_response, BodyFramer, BodyKind, Error, Limits,
    RequestHead, Status, Version,
};

const LIMITS: Limits = Limits {
    max_head_bytes: 8 * 1024,
    max_headers: 32,
};

const REQUESTS: [&[u8]; 4] = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
];

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let req = request(REQUESTS[usize::from(pick) % REQUESTS.len()]);
    let full = parse_response(data, &LIMITS);
    let cut = split_point(data);
    match (parse_response(&data[..cut], &LIMITS), &full) {
        (Ok(Status::Partial), _) => {}
        (Err(e), Err(f)) => assert_eq!(e, *f),
        (prefix, Ok(Status::Complete(_, n))) if cut >= *n => assert_eq!(&prefix, &full),
        (prefix, full) => panic!("prefix {prefix:?} vs full {full:?}"),
    }
    let Ok(Status::Complete(resp, n)) = full else {
        return;
    };
    assert!(n <= data.len());
    let _ = (resp.keep_alive(), resp.is_interim(), resp.is_upgrade());

    let big = Limits {
        max_head_bytes: usize::MAX,
        max_headers: usize::MAX,
    };
    let mut out = Vec::new();
    resp.write(&mut out);
    assert_eq!(
        parse_response(&out, &big),
        Ok(Status::Complete(resp.clone(), out.len()))
    );

    let kind = resp.body_kind(&req);
    out.clear();
    let plan = rewrite_response(&resp, &req, pick & 0x80 != 0, None, &mut out);
    assert_eq!(plan.map(|p| p.body), kind);
    let Ok(plan) = plan else {
        assert_eq!(kind, Err(Error::UnexpectedUpgrade));
        return;
    };
    assert!(!plan.keep_alive || req.keep_alive());
    assert_eq!(plan.is_upgrade(), plan.body == BodyKind::Tunnel);
    assert!(!plan.rechunk || plan.body == BodyKind::CloseDelimited);
    assert!(!plan.dechunk || (plan.body == BodyKind::Chunked && !plan.keep_alive));
    if out.is_empty() {
        assert!(resp.is_interim() && req.version == Version::Http10);
    } else {
        match parse_response(&out, &big) {
            Ok(Status::Complete(back, m)) => {
                assert_eq!(m, out.len());
                assert_eq!(back.status, resp.status);
                // What the client reads: chunked when a close-delimited body is re-chunked;
                // close-delimited when a chunked one goes without its chunks.
                assert_eq!(back.body_kind(&req), Ok(plan.sent_body()));
            }
            other => panic!("rewritten head does not parse: {other:?}"),
        }
    }

    let rest = &data[n..];
    let cut = split_point(rest);
    assert_eq!(
        feed(plan.body, &[&rest[..cut], &rest[cut..]]),
        feed(plan.body, &[rest])
    );
}

fn request(bytes: &[u8]) -> RequestHead {
    match parse_request(bytes, &LIMITS) {
        Ok(Status::Complete(head, _)) => head,
        other => panic!("fixed request does not parse: {other:?}"),
    }
}

/// Feeds `pieces` to a fresh framer: total consumed and done, or the error.
fn feed(kind: BodyKind, pieces: &[&[u8]]) -> Result<(usize, bool), Error> {
    let mut framer = BodyFramer::new(kind);
    let mut total = 0;
    for piece in pieces {
        let progress = framer.push(piece)?;
        assert!(progress.done || progress.consumed == piece.len());
        total += progress.consumed;
        if progress.done {
            break;
        }
    }
    Ok((total, framer.is_done()))
}

/// A cut point in `0..=data.len()` derived from the data itself.
fn split_point(data: &[u8]) -> usize {
    let seed = data
        .iter()
        .rev()
        .take(4)
        .fold(0usize, |acc, &b| acc * 31 + usize::from(b));
    seed % (data.len() + 1)
}
