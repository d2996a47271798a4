//! Runs the `fuzz/harness/http1_*.rs` fuzz functions on stable: a few
//! hand-written seeds plus generated head-like inputs. (The cargo-fuzz
//! targets and the corpus replay use the same files.)

#[path = "../../fuzz/harness/http1_chunked.rs"]
mod http1_chunked;
#[path = "../../fuzz/harness/http1_request.rs"]
mod http1_request;
#[path = "../../fuzz/harness/http1_response.rs"]
mod http1_response;

use proptest::collection::vec;
use proptest::prelude::*;

const SEEDS: &[&[u8]] = &[
    b"",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /x?y HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n",
    b"GET http://h:1/p HTTP/1.1\r\nHost: h:1\r\nConnection: Upgrade, X\r\nUpgrade: websocket\r\nX: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"\x00HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"\x01HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
    b"\x02HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nraw",
    b"\x00HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"\x03HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    b"\x80HTTP/1.0 200 OK\r\n\r\nuntil eof",
    b"\x00HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b"10000000000000000\r\n",
    b"0\r\n folded\r\n\r\n",
];

#[test]
fn harnesses_accept_seeds() {
    for seed in SEEDS {
        http1_chunked::run(seed);
        http1_request::run(seed);
        http1_response::run(seed);
    }
}

/// Inputs made of HTTP-ish fragments and random bytes.
fn http_like() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        Just(&b"GET / HTTP/1.1\r\n"[..]),
        Just(&b"HEAD /a HTTP/1.0\r\n"[..]),
        Just(&b"HTTP/1.1 200 OK\r\n"[..]),
        Just(&b"HTTP/1.1 101 Switching Protocols\r\n"[..]),
        Just(&b"HTTP/1.1 204 No Content\r\n"[..]),
        Just(&b"Host: a\r\n"[..]),
        Just(&b"Content-Length: 3\r\n"[..]),
        Just(&b"Transfer-Encoding: chunked\r\n"[..]),
        Just(&b"Connection: upgrade\r\n"[..]),
        Just(&b"Upgrade: websocket\r\n"[..]),
        Just(&b"X-Forwarded-For: 1.1.1.1\r\n"[..]),
        Just(&b"\r\n"[..]),
        Just(&b"5;a=b\r\nhello\r\n"[..]),
        Just(&b"0\r\n"[..]),
        Just(&b"T: v\r\n"[..]),
    ];
    let part = prop_oneof![
        3 => fragment.prop_map(<[u8]>::to_vec),
        1 => vec(any::<u8>(), 1..4),
    ];
    (any::<u8>(), vec(part, 0..12)).prop_map(|(first, parts)| {
        let mut out = vec![first];
        out.extend(parts.concat());
        out
    })
}

proptest! {
    #[test]
    fn harnesses_never_panic(data in http_like()) {
        http1_chunked::run(&data);
        http1_request::run(&data[1..]);
        http1_response::run(&data);
    }

    #[test]
    fn harnesses_never_panic_on_noise(data in vec(any::<u8>(), 0..128)) {
        http1_chunked::run(&data);
        http1_request::run(&data);
        http1_response::run(&data);
    }
}
