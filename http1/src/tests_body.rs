//! Unit tests: the body framer.

use super::*;

/// Feeds `input` in one piece: `(consumed, done)` or the error.
fn whole(kind: BodyKind, input: &[u8]) -> Result<(usize, bool), Error> {
    let p = BodyFramer::new(kind).push(input)?;
    Ok((p.consumed, p.done))
}

/// Feeds `input` one byte at a time until done.
fn bytewise(kind: BodyKind, input: &[u8]) -> Result<(usize, bool), Error> {
    let mut f = BodyFramer::new(kind);
    let mut consumed = 0;
    for i in 0..input.len() {
        if f.is_done() {
            break;
        }
        consumed += f.push(&input[i..=i])?.consumed;
    }
    Ok((consumed, f.is_done()))
}

fn chunked(input: &str) -> Result<(usize, bool), Error> {
    let a = whole(BodyKind::Chunked, input.as_bytes());
    assert_eq!(
        a,
        bytewise(BodyKind::Chunked, input.as_bytes()),
        "{input:?}"
    );
    a
}

#[test]
fn no_body_is_done_at_once() {
    for kind in [BodyKind::None, BodyKind::Length(0)] {
        let mut f = BodyFramer::new(kind);
        assert!(f.is_done());
        assert_eq!(
            f.push(b"GET"),
            Ok(Progress {
                consumed: 0,
                data: 0,
                done: true
            })
        );
        assert_eq!(f.finish(), Ok(()));
    }
}

#[test]
fn content_length() {
    let mut f = BodyFramer::new(BodyKind::Length(5));
    assert_eq!(
        f.push(b"abc"),
        Ok(Progress {
            consumed: 3,
            data: 3,
            done: false
        })
    );
    assert_eq!(f.finish(), Err(Error::IncompleteBody));
    assert_eq!(
        f.push(b"deGET /"),
        Ok(Progress {
            consumed: 2,
            data: 2,
            done: true
        })
    );
    assert_eq!(
        f.push(b"more"),
        Ok(Progress {
            consumed: 0,
            data: 0,
            done: true
        })
    );
    assert_eq!(f.finish(), Ok(()));
    assert_eq!(whole(BodyKind::Length(u64::MAX), b"xyz"), Ok((3, false)));
}

#[test]
fn close_delimited_and_tunnel_end_at_eof() {
    for kind in [BodyKind::CloseDelimited, BodyKind::Tunnel] {
        let mut f = BodyFramer::new(kind);
        assert_eq!(
            f.push(b"0\r\n\r\nanything"),
            Ok(Progress {
                consumed: 13,
                data: 13,
                done: false
            })
        );
        assert!(!f.is_done());
        assert_eq!(f.finish(), Ok(()));
    }
}

#[test]
fn chunked_basic_with_pipelined_leftover() {
    let body = "5\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";
    let input = format!("{body}GET / HTTP/1.1\r\n");
    assert_eq!(chunked(&input), Ok((body.len(), true)));
    assert_eq!(chunked(body), Ok((body.len(), true)));
    assert_eq!(
        chunked(&body[..body.len() - 1]),
        Ok((body.len() - 1, false))
    );
}

#[test]
fn chunked_extensions_and_trailers() {
    let body =
        "4;name=value;q=\"a b\"\r\nwiki\r\n5 ; x\r\npedia\r\n0;last\r\nX-Sum: 1\r\nEmpty:\r\n\r\n";
    assert_eq!(chunked(&format!("{body}NEXT")), Ok((body.len(), true)));
}

#[test]
fn chunk_sizes_are_hex_any_case() {
    let body = format!("A\r\n{0}\r\na\r\n{0}\r\n00\r\n\r\n", "x".repeat(10));
    assert_eq!(chunked(&body), Ok((body.len(), true)));
    // 16 digits is fine (the data is just not there yet).
    assert_eq!(chunked("ffffffffffffffff\r\nab"), Ok((20, false)));
    assert_eq!(
        chunked("0000000000000001\r\na\r\n0\r\n\r\n"),
        Ok((26, true))
    );
}

#[test]
fn rejects_invalid_chunk_sizes() {
    for bad in [
        "g\r\n", "\r\n", " 5\r\n", "-1\r\n", "+1\r\n", "0x5\r\n", "5 \r\n", "5 x\r\n", ";ext\r\n",
        "5\t\r\n",
    ] {
        assert_eq!(chunked(bad), Err(Error::InvalidChunkSize), "{bad:?}");
    }
}

#[test]
fn rejects_chunk_size_overflow() {
    assert_eq!(
        chunked("10000000000000000\r\n"),
        Err(Error::ChunkSizeOverflow)
    );
    assert_eq!(
        chunked("00000000000000000\r\n"),
        Err(Error::ChunkSizeOverflow)
    );
}

#[test]
fn rejects_bad_chunk_line_endings() {
    for bad in [
        "5\rhello\r\n0\r\n\r\n",    // bare CR after size
        "5\r\nhelloX\r\n0\r\n\r\n", // data longer than size
        "5\r\nhello\n0\r\n\r\n",    // bare LF after data
        "5\r\nhello\rx",            // bare CR after data
        "0\r\n\n",                  // bare LF at the end
        "0\r\n\rx",                 // bare CR at the end
        "5;a\nb\r\n",               // LF in extension
        "5;a\x01\r\n",              // control in extension
    ] {
        assert_eq!(chunked(bad), Err(Error::InvalidChunk), "{bad:?}");
    }
}

#[test]
fn rejects_bad_trailers() {
    for bad in [
        "0\r\n folded: x\r\n\r\n",
        "0\r\nX: a\r\n\tb\r\n\r\n",
        "0\r\nBad Name: x\r\n\r\n",
        "0\r\n: x\r\n\r\n",
        "0\r\nNoColon\r\n\r\n",
        "0\r\nX: a\x00\r\n\r\n",
        "0\r\nX: a\nY: b\r\n\r\n",
    ] {
        assert_eq!(chunked(bad), Err(Error::InvalidChunk), "{bad:?}");
    }
}

#[test]
fn chunk_extension_and_trailer_limits() {
    let ok = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_EXTENSION));
    assert_eq!(chunked(&ok), Ok((ok.len(), true)));
    let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_EXTENSION + 1));
    assert_eq!(chunked(&long), Err(Error::InvalidChunk));
    let big = format!("0\r\nX: {}\r\n\r\n", "v".repeat(MAX_TRAILER_BYTES));
    assert_eq!(
        whole(BodyKind::Chunked, big.as_bytes()),
        Err(Error::InvalidChunk)
    );
}

#[test]
fn errors_are_sticky() {
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(f.push(b"zz"), Err(Error::InvalidChunkSize));
    assert_eq!(f.push(b"0\r\n\r\n"), Err(Error::InvalidChunkSize));
    assert_eq!(f.finish(), Err(Error::InvalidChunkSize));
    assert!(!f.is_done());
}

#[test]
fn chunked_eof_before_end_is_incomplete() {
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(
        f.push(b"5\r\nhello\r\n0\r\n"),
        Ok(Progress {
            consumed: 13,
            data: 5,
            done: false
        })
    );
    assert_eq!(f.finish(), Err(Error::IncompleteBody));
    assert_eq!(
        f.push(b"\r\n"),
        Ok(Progress {
            consumed: 2,
            data: 0,
            done: true
        })
    );
    assert_eq!(f.finish(), Ok(()));
}

#[test]
fn chunk_extensions_are_bounded_per_body() {
    // One-byte chunks, each with a 1000-byte extension: under the per-line limit, but
    // the body's extensions together outgrow MAX_CHUNK_EXTENSIONS_TOTAL.
    let chunk = format!("1;{}\r\nx\r\n", "e".repeat(999));
    let mut f = BodyFramer::new(BodyKind::Chunked);
    let mut failed = None;
    for i in 0..40 {
        if let Err(e) = f.push(chunk.as_bytes()) {
            failed = Some((i, e));
            break;
        }
    }
    let (i, e) = failed.expect("the extensions' total is bounded");
    assert_eq!(e, Error::InvalidChunk);
    assert_eq!(i as u64, MAX_CHUNK_EXTENSIONS_TOTAL / 1000);
    // A body with extensions within the bound is fine.
    let mut f = BodyFramer::new(BodyKind::Chunked);
    for _ in 0..10 {
        f.push(chunk.as_bytes()).unwrap();
    }
    assert!(f.push(b"0\r\n\r\n").unwrap().done);
}

#[test]
fn data_leaves_the_chunk_framing_out() {
    let mut f = BodyFramer::new(BodyKind::Chunked);
    let p = f
        .push(b"5;x=y\r\nhello\r\n3\r\nabc\r\n0\r\nT: v\r\n\r\nNEXT")
        .unwrap();
    assert_eq!((p.data, p.done), (8, true));
    let mut f = BodyFramer::new(BodyKind::Chunked);
    // A chunk split across pushes counts each part once.
    assert_eq!(f.push(b"a\r\n01234").unwrap().data, 5);
    assert_eq!(f.push(b"56789\r\n0\r\n\r\n").unwrap().data, 5);
}
