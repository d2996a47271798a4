//! Unit tests: rewriting heads for the other side.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));

fn fwd(prefix: &str) -> Forwarding<'_> {
    Forwarding {
        client_ip: CLIENT,
        client_proto: "https",
        backend_authority: "backend:8080",
        backend_path_prefix: prefix,
    }
}

fn parse_req(s: &str) -> RequestHead {
    match parse_request(s.as_bytes(), &Limits::default()) {
        Ok(Status::Complete(h, _)) => h,
        other => panic!("{s:?}: {other:?}"),
    }
}

fn parse_res(s: &str) -> ResponseHead {
    match parse_response(s.as_bytes(), &Limits::default()) {
        Ok(Status::Complete(h, _)) => h,
        other => panic!("{s:?}: {other:?}"),
    }
}

/// Rewrites `s` for the backend; returns the emitted text and body kind.
fn rw_req(s: &str, prefix: &str) -> (String, BodyKind) {
    let mut out = Vec::new();
    let body = rewrite_request(&parse_req(s), &fwd(prefix), &mut out).unwrap();
    // Whatever we emit must parse back.
    let back = parse_req(std::str::from_utf8(&out).unwrap());
    assert_eq!(back.body_kind(), Ok(body));
    (String::from_utf8(out).unwrap(), body)
}

fn rw_res(r: &str, q: &str, close: bool) -> (String, ResponsePlan) {
    let mut out = Vec::new();
    let plan = rewrite_response(&parse_res(r), &parse_req(q), close, None, &mut out).unwrap();
    (String::from_utf8(out).unwrap(), plan)
}

const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";

#[test]
fn request_rewrite_full_example() {
    let s = "POST /v1/models?x=1 HTTP/1.1\r\n\
             Host: public.example:443\r\n\
             Connection: keep-alive, X-Secret\r\n\
             Keep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\n\
             TE: trailers\r\n\
             Trailer: X-Sum\r\n\
             Upgrade: h2c\r\n\
             X-Secret: drop me\r\n\
             X-Forwarded-For: 1.2.3.4, 5.6.7.8\r\n\
             X-Forwarded-Proto: gopher\r\n\
             X-Forwarded-Host: spoofed\r\n\
             Accept: */*\r\n\
             Content-Length: 5\r\n\r\n";
    let (out, body) = rw_req(s, "/base");
    assert_eq!(body, BodyKind::Length(5));
    assert_eq!(
        out,
        "POST /base/v1/models?x=1 HTTP/1.1\r\n\
         Host: backend:8080\r\n\
         Trailer: X-Sum\r\n\
         Accept: */*\r\n\
         X-Forwarded-For: 1.2.3.4, 5.6.7.8, 10.0.0.7\r\n\
         X-Forwarded-Proto: https\r\n\
         X-Forwarded-Host: public.example:443\r\n\
         Content-Length: 5\r\n\r\n"
    );
}

#[test]
fn path_prefix_joins_with_one_slash() {
    let target = |t: &str, prefix: &str| {
        let (out, _) = rw_req(&format!("GET {t} HTTP/1.1\r\nHost: a\r\n\r\n"), prefix);
        out.split(' ').nth(1).unwrap().to_owned()
    };
    assert_eq!(target("/v1/models?x=1", "/base"), "/base/v1/models?x=1");
    assert_eq!(target("/v1", "/base/"), "/base/v1");
    assert_eq!(target("/v1", "base"), "/base/v1");
    assert_eq!(target("/v1", ""), "/v1");
    assert_eq!(target("/v1", "/"), "/v1");
    assert_eq!(target("/", "/base"), "/base/");
    assert_eq!(target("/?q", "/base"), "/base/?q");
    assert_eq!(target("http://h:1/x?y", "/base"), "/base/x?y");
    assert_eq!(target("http://h:1", ""), "/");
    assert_eq!(target("http://h:1?q", "/p"), "/p/?q");
    let (out, _) = rw_req("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", "/base");
    assert!(out.starts_with("OPTIONS * HTTP/1.1\r\n"));
}

#[test]
fn absolute_form_authority_becomes_forwarded_host() {
    let (out, _) = rw_req("GET http://orig:81/x HTTP/1.1\r\nHost: other\r\n\r\n", "");
    assert!(out.contains("\r\nX-Forwarded-Host: orig:81\r\n"), "{out}");
    assert!(!out.contains("other"));
}

#[test]
fn http10_request_without_host() {
    let (out, body) = rw_req("GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", "");
    assert_eq!(body, BodyKind::None);
    assert_eq!(
        out,
        "GET /x HTTP/1.0\r\nHost: backend:8080\r\nX-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: https\r\n\r\n"
    );
}

#[test]
fn forwarded_for_ipv6_and_connection_named_xff() {
    let mut out = Vec::new();
    let f = Forwarding {
        client_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
        ..fwd("")
    };
    let req = parse_req("GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Forwarded-For, Host\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n");
    rewrite_request(&req, &f, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("\r\nX-Forwarded-For: ::1\r\n"), "{out}");
    // The proxy's own headers survive a Connection token naming them.
    assert!(out.contains("\r\nHost: backend:8080\r\n"));
    assert!(out.contains("\r\nX-Forwarded-Host: a\r\n"));
}

#[test]
fn chunked_request_keeps_chunked_framing() {
    let (out, body) = rw_req(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        "",
    );
    assert_eq!(body, BodyKind::Chunked);
    assert_eq!(out.matches("Transfer-Encoding: chunked\r\n").count(), 1);
    assert!(!out.contains("Content-Length"));
}

#[test]
fn connection_named_content_length_does_not_break_framing() {
    let s = "POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\n";
    let (out, body) = rw_req(s, "");
    assert_eq!(body, BodyKind::Length(3));
    assert!(out.contains("\r\nContent-Length: 3\r\n"));
}

#[test]
fn upgrade_request_keeps_upgrade() {
    let s = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, X-Hop\r\nUpgrade: websocket\r\nX-Hop: 1\r\nSec-WebSocket-Key: k\r\n\r\n";
    let (out, body) = rw_req(s, "");
    assert_eq!(body, BodyKind::None);
    assert!(out.contains("\r\nUpgrade: websocket\r\n"), "{out}");
    assert!(out.contains("\r\nConnection: upgrade\r\n"));
    assert!(out.contains("\r\nSec-WebSocket-Key: k\r\n"));
    assert!(!out.contains("X-Hop"));
    // The rewritten request is still an upgrade request.
    assert!(parse_req(&out).is_upgrade());
}

#[test]
fn response_rewrite_drops_hop_by_hop_and_keeps_framing() {
    let r = "HTTP/1.1 200 OK\r\nConnection: close, X-Internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: chunked\r\nTrailer: X-Sum\r\nContent-Type: text/plain\r\n\r\n";
    let (out, plan) = rw_res(r, GET, false);
    assert_eq!(
        plan,
        ResponsePlan {
            body: BodyKind::Chunked,
            keep_alive: true,
            rechunk: false,
            dechunk: false,
        }
    );
    assert_eq!(
        out,
        // `Trailer` is end-to-end (RFC 9110 §6.6.2): it announces the trailers that follow.
        "HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
}

#[test]
fn close_delimited_response_goes_chunked_to_an_http11_client() {
    let (out, plan) = rw_res("HTTP/1.0 200 OK\r\nServer: s\r\n\r\n", GET, false);
    assert_eq!(
        plan,
        ResponsePlan {
            body: BodyKind::CloseDelimited,
            keep_alive: true,
            rechunk: true,
            dechunk: false,
        }
    );
    assert_eq!(
        out,
        "HTTP/1.1 200 OK\r\nServer: s\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    // An HTTP/1.0 client cannot read chunks: the body ends with the connection.
    let http10 = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let (out, plan) = rw_res("HTTP/1.0 200 OK\r\nServer: s\r\n\r\n", http10, false);
    assert!(!plan.keep_alive && !plan.rechunk);
    assert_eq!(
        out,
        "HTTP/1.1 200 OK\r\nServer: s\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn a_chunked_response_goes_to_an_http10_client_without_its_chunks() {
    let r = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\nServer: s\r\n\r\n";
    let http10 = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let (out, plan) = rw_res(r, http10, false);
    assert_eq!(
        plan,
        ResponsePlan {
            body: BodyKind::Chunked,
            keep_alive: false,
            rechunk: false,
            dechunk: true,
        }
    );
    assert_eq!(
        out,
        "HTTP/1.1 200 OK\r\nTrailer: X-T\r\nServer: s\r\nConnection: close\r\n\r\n"
    );
    // Without `keep-alive`, closing is the HTTP/1.0 client's default: no word.
    let (out, plan) = rw_res(r, "GET / HTTP/1.0\r\n\r\n", false);
    assert!(plan.dechunk && !plan.keep_alive);
    assert_eq!(out, "HTTP/1.1 200 OK\r\nTrailer: X-T\r\nServer: s\r\n\r\n");
}

#[test]
fn a_date_is_added_when_the_backend_sent_none() {
    let date = crate::http_date(784_111_777);
    let mut out = Vec::new();
    let r = parse_res("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    rewrite_response(&r, &parse_req(GET), false, Some(&date), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"),
        "{out}"
    );
    let mut out = Vec::new();
    let r = parse_res("HTTP/1.1 200 OK\r\nDate: Mon, 07 Nov 1994 00:00:00 GMT\r\n\r\n");
    rewrite_response(&r, &parse_req(GET), false, Some(&date), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(out.matches("Date:").count(), 1, "{out}");
    assert!(out.contains("Mon, 07 Nov 1994"), "{out}");
}

#[test]
fn client_close_and_forced_close() {
    let r = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
    let (out, plan) = rw_res(
        r,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        false,
    );
    assert!(!plan.keep_alive);
    assert!(out.ends_with("Content-Length: 2\r\nConnection: close\r\n\r\n"));
    let (_, plan) = rw_res(r, GET, true);
    assert!(!plan.keep_alive);
    let (out, plan) = rw_res(r, "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", false);
    assert!(plan.keep_alive);
    assert!(out.ends_with("Content-Length: 2\r\nConnection: keep-alive\r\n\r\n"));
    // An HTTP/1.0 client that did not ask to keep the connection needs no word.
    let (out, plan) = rw_res(r, "GET / HTTP/1.0\r\n\r\n", false);
    assert!(!plan.keep_alive);
    assert!(out.ends_with("Content-Length: 2\r\n\r\n"));
}

#[test]
fn bodiless_responses_keep_or_drop_content_length() {
    let head = "HEAD / HTTP/1.1\r\nHost: a\r\n\r\n";
    let (out, plan) = rw_res("HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n", head, false);
    assert_eq!(plan.body, BodyKind::None);
    assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n");
    // 304 drops it, as 204 does (and as hyper does).
    let (out, _) = rw_res(
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n",
        GET,
        false,
    );
    assert!(!out.contains("Content-Length"), "{out}");
    let (out, plan) = rw_res(
        "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        GET,
        false,
    );
    assert_eq!(
        plan,
        ResponsePlan {
            body: BodyKind::None,
            keep_alive: true,
            rechunk: false,
            dechunk: false,
        }
    );
    assert_eq!(out, "HTTP/1.1 204 No Content\r\n\r\n");
}

#[test]
fn switching_protocols_is_a_tunnel() {
    let ws = "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    let r = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n";
    let (out, plan) = rw_res(r, ws, false);
    assert!(plan.is_upgrade());
    assert_eq!(plan.body, BodyKind::Tunnel);
    assert_eq!(
        out,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\nConnection: upgrade\r\n\r\n"
    );
    let mut out = Vec::new();
    let err = rewrite_response(&parse_res(r), &parse_req(GET), false, None, &mut out);
    assert_eq!(err, Err(Error::UnexpectedUpgrade));
}

#[test]
fn interim_responses() {
    let post = "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n";
    let r = "HTTP/1.1 100 Continue\r\n\r\n";
    assert!(parse_res(r).is_interim());
    let (out, plan) = rw_res(r, post, false);
    assert_eq!(out, "HTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(plan.body, BodyKind::None);
    // Never sent to an HTTP/1.0 client.
    let (out, _) = rw_res(
        "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        "GET / HTTP/1.0\r\n\r\n",
        false,
    );
    assert_eq!(out, "");
}
