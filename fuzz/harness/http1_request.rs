//! Fuzz harness: request heads, their rewrite, and the request body framer
//! of `lb_http1`.
//!
//! `run` must never panic. Invariants checked:
//! * a prefix of the input parses as `Partial` or with the same verdict;
//! * a parsed head written back parses to the same head;
//! * the rewritten head parses, with the same body framing;
//! * framing the bytes after the head agrees between one piece and two.

use std::net::{IpAddr, Ipv6Addr};

use lb_http1::{
    parse_request, rewrite_request, BodyFramer, BodyKind, Error, Forwarding, Limits, Status,
};

const LIMITS: Limits = Limits {
    max_head_bytes: 8 * 1024,
    max_headers: 32,
};

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let full = parse_request(data, &LIMITS);
    let cut = split_point(data);
    match (parse_request(&data[..cut], &LIMITS), &full) {
        (Ok(Status::Partial), _) => {}
        (Err(e), Err(f)) => assert_eq!(e, *f),
        (prefix, Ok(Status::Complete(_, n))) if cut >= *n => assert_eq!(&prefix, &full),
        (prefix, full) => panic!("prefix {prefix:?} vs full {full:?}"),
    }
    let Ok(Status::Complete(head, n)) = full else {
        return;
    };
    assert!(n <= data.len());
    let kind = head.body_kind().expect("a parsed head has valid framing");
    assert_ne!(kind, BodyKind::CloseDelimited);
    let _ = (
        head.keep_alive(),
        head.is_upgrade(),
        head.expects_continue(),
    );

    let big = Limits {
        max_head_bytes: usize::MAX,
        max_headers: usize::MAX,
    };
    let mut out = Vec::new();
    head.write(&mut out);
    assert_eq!(
        parse_request(&out, &big),
        Ok(Status::Complete(head.clone(), out.len()))
    );

    let fwd = Forwarding {
        client_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
        client_proto: "https",
        backend_authority: "backend.internal:8443",
        backend_path_prefix: if data.len() % 2 == 0 { "/base/" } else { "" },
    };
    out.clear();
    let body = rewrite_request(&head, &fwd, &mut out).expect("rewrite of a parsed head");
    assert_eq!(body, kind);
    match parse_request(&out, &big) {
        Ok(Status::Complete(back, m)) => {
            assert_eq!(m, out.len());
            assert_eq!(back.body_kind(), Ok(kind));
            assert_eq!(back.is_upgrade(), head.is_upgrade());
            assert_eq!(back.header("host"), Some(&b"backend.internal:8443"[..]));
        }
        other => panic!("rewritten head does not parse: {other:?}"),
    }

    let rest = &data[n..];
    let cut = split_point(rest);
    assert_eq!(
        feed(kind, &[&rest[..cut], &rest[cut..]]),
        feed(kind, &[rest])
    );
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
