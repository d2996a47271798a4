//! Faults in what a backend sends: raw bytes from a [`ScriptedBackend`] on its own host,
//! next to a healthy mock on another. Each case is its own test, with its own topology
//! and `lb` (weights 1000:1, so the first request goes to the scripted backend), and ends
//! with the common checks; before the last of them (a normal request through `lb`) the
//! scripted backend is switched to a plain `200`, so that request succeeds whichever
//! backend takes it, and a connection the fault left unusable must not be reused.

use std::time::Duration;

use lb_tests::*;

use crate::{completion_got, namespaces_or_skip, report, topology, weighted, Got, Health, Rig};

/// `--timeout` of these cases.
const TIMEOUT: Duration = Duration::from_secs(3);

/// What the client must get.
#[derive(Debug)]
enum Want {
    /// A whole response with this status (any body).
    Status(u16),
    /// A whole response with this status and body.
    Exactly(u16, &'static [u8]),
    /// The head (with this status), then the body cut: no clean end.
    Cut(u16),
    /// A whole `200` with this body, or `502` (`lb` may refuse what it cannot bound).
    OkOr502(&'static [u8]),
}

/// The health state the case leaves.
#[derive(Clone, Copy, Debug)]
enum Ejects {
    /// The scripted backend is ejected (the failure is its own).
    Yes,
    /// It is not (nothing wrong with it, or nothing that counts against it).
    No,
    /// Not if the client got `200`; a `502` may count against it.
    UnlessRefused,
}

/// One scripted fault: the backend answers the case's request with `response`, then does
/// `after`.
struct Fault {
    name: &'static str,
    response: Vec<u8>,
    after: After,
    want: Want,
    ejects: Ejects,
}

/// Run one scripted fault through `lb` and check everything (see the module docs).
fn run(fault: Fault) {
    let case = fault.name;
    if !namespaces_or_skip(case) {
        return;
    }
    let topo = topology(2);
    let _inside = topo.lb.enter();
    let (h0, h1) = (&topo.hosts[0], &topo.hosts[1]);
    let sb = h0.ns.run(|| ScriptedBackend::spawn_at(h0.addr()));
    let mock = h1.ns.run(|| Mock::spawn(&["--bind", &h1.ip.to_string()]));
    let timeout = format!("{}s", TIMEOUT.as_secs());
    let rig = Rig::start(
        &["--routing", "weighted-round-robin", "--timeout", &timeout],
        &[weighted(&sb.url(), 1000), weighted(&mock.url(), 1)],
        || sb.probes() >= 1 && mock.health_checks() >= 1,
    );
    let rss_before = rig.lb.vm_hwm_kib();
    let mut script = Script::new(fault.response);
    script.after = fault.after;
    sb.set_script(script);

    let (got, took) = completion_got(rig.lb.port, TIMEOUT + Duration::from_secs(10));
    let rss_after = rig.lb.vm_hwm_kib();
    let received = sb.take_received();
    assert_eq!(
        received.len(),
        1,
        "{case}: the scripted backend should get the request once: {received:?}"
    );
    report!(
        "faults: {case}: client got {} in {took:.2?}; lb peak RSS {} -> {} KiB",
        describe(&got),
        rss_before,
        rss_after
    );
    assert!(
        took <= TIMEOUT + Duration::from_secs(2),
        "{case}: took {took:.1?}; --timeout is {TIMEOUT:?}"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "{case}: lb's peak RSS grew from {rss_before} to {rss_after} KiB"
    );
    let refused = match (&fault.want, &got) {
        (Want::Status(s), Got::Whole { status, .. }) if status == s => false,
        (Want::Exactly(s, b), Got::Whole { status, body }) if status == s && body == b => false,
        (Want::Cut(s), Got::Cut { status, .. }) if status == s => false,
        (Want::OkOr502(b), Got::Whole { status: 200, body }) if body == b => false,
        (Want::OkOr502(_), Got::Whole { status: 502, .. }) => true,
        (want, got) => panic!("{case}: want {want:?}, got {got:?}"),
    };
    if let Got::Whole { status, body } = &got {
        if *status >= 500 {
            let resp = Resp {
                status: *status,
                headers: Vec::new(),
                body: body.clone(),
            };
            assert_error_json(&resp, *status);
        }
    }
    let health = match fault.ejects {
        Ejects::Yes => Health::Ejected(sb.port),
        Ejects::No => Health::Kept,
        Ejects::UnlessRefused if !refused => Health::Kept,
        Ejects::UnlessRefused => {
            let ejected = rig
                .lb
                .log
                .wait_for(Duration::from_secs(1), |l| is_unhealthy_line(l, sb.port));
            report!(
                "faults: {case}: refused with 502; the backend {}",
                if ejected.is_some() {
                    "was ejected"
                } else {
                    "was not ejected"
                }
            );
            if ejected.is_some() {
                Health::Ejected(sb.port)
            } else {
                Health::Kept
            }
        }
    };
    sb.set_script(Script::default());
    rig.after_case(case, health, Duration::from_secs(3));
}

fn describe(got: &Got) -> String {
    match got {
        Got::Whole { status, body } => format!("{status} with {} body bytes", body.len()),
        Got::Cut {
            status,
            body,
            error,
        } => format!("{status}, cut after {} body bytes ({error})", body.len()),
        Got::Nothing { error } => format!("no response ({error})"),
    }
}

/// A response head and `body`, concatenated.
fn raw(head: &str, body: &[u8]) -> Vec<u8> {
    let mut v = head.as_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn reset_inside_the_response_head() {
    run(Fault {
        name: "reset inside the head",
        response: b"HTTP/1.1 200 OK\r\nContent-Type: text/pl".to_vec(),
        after: After::Reset,
        want: Want::Status(502),
        ejects: Ejects::Yes,
    });
}

#[test]
fn reset_inside_the_response_body() {
    run(Fault {
        name: "reset inside the body",
        response: raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
            &[b'a'; 300],
        ),
        after: After::Reset,
        want: Want::Cut(200),
        ejects: Ejects::Yes,
    });
}

#[test]
fn close_in_the_middle_of_a_chunk() {
    run(Fault {
        name: "close mid-chunk",
        response: raw(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n",
            &[b'a'; 50],
        ),
        after: After::Close,
        want: Want::Cut(200),
        ejects: Ejects::Yes,
    });
}

#[test]
fn content_length_longer_than_the_body() {
    run(Fault {
        name: "Content-Length longer than the body",
        response: raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
            &[b'a'; 40],
        ),
        after: After::Close,
        want: Want::Cut(200),
        ejects: Ejects::Yes,
    });
}

/// The bytes past `Content-Length` stay on the backend connection: `lb` must not read
/// them as the next response (the normal request at the end goes to this backend).
#[test]
fn content_length_shorter_than_the_body() {
    run(Fault {
        name: "Content-Length shorter than the body",
        response: raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            b"helloHTTP/1.1 418 Stale\r\nContent-Length: 5\r\n\r\nstale",
        ),
        after: After::KeepOpen,
        want: Want::Exactly(200, b"hello"),
        ejects: Ejects::No,
    });
}

#[test]
fn chunked_without_its_last_chunk() {
    run(Fault {
        name: "chunked without the last chunk",
        response: raw(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"",
        ),
        after: After::Close,
        want: Want::Cut(200),
        ejects: Ejects::Yes,
    });
}

/// A head that goes on past 64 KiB (256 lines of 1 KiB, never ended): `502`, and not
/// counted against the backend (README: a head over 64 KiB is refused and never counts).
#[test]
fn endless_response_head_over_64_kib() {
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for i in 0..256 {
        head.push_str(&format!("X-Filler-{i:03}: {}\r\n", "a".repeat(1000)));
    }
    run(Fault {
        name: "endless head",
        response: head.into_bytes(),
        after: After::KeepOpen,
        want: Want::Status(502),
        ejects: Ejects::No,
    });
}

/// A head that stops coming (well under 64 KiB): `504` at `--timeout`, and the backend
/// is ejected (no response head before the deadline).
#[test]
fn response_head_that_stalls() {
    run(Fault {
        name: "stalled head",
        response: b"HTTP/1.1 200 OK\r\nX-Slow: 1\r\n".to_vec(),
        after: After::KeepOpen,
        want: Want::Status(504),
        ejects: Ejects::Yes,
    });
}

/// 10,000 `100 Continue` before the response: `lb` must get through them (or refuse
/// them) in bounded time and memory.
#[test]
fn flood_of_100_continue() {
    let mut response = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(10_000);
    response.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    run(Fault {
        name: "10,000 x 100 Continue",
        response,
        after: After::KeepOpen,
        want: Want::OkOr502(b"ok"),
        ejects: Ejects::UnlessRefused,
    });
}

/// 10,000 `103 Early Hints` (which the smol build forwards) before the response.
#[test]
fn flood_of_103_early_hints() {
    let mut response =
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n".repeat(10_000);
    response.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    run(Fault {
        name: "10,000 x 103 Early Hints",
        response,
        after: After::KeepOpen,
        want: Want::OkOr502(b"ok"),
        ejects: Ejects::UnlessRefused,
    });
}

#[test]
fn garbage_status_code() {
    run(Fault {
        name: "garbage status code",
        response: b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        after: After::KeepOpen,
        want: Want::Status(502),
        ejects: Ejects::Yes,
    });
}

#[test]
fn not_http_at_all() {
    run(Fault {
        name: "not HTTP",
        response: b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
        after: After::KeepOpen,
        want: Want::Status(502),
        ejects: Ejects::Yes,
    });
}

/// A lone backend resets a response before its head: the client gets `502`. With
/// `--max-passive-ejection-percent` (default 50) a lone backend is never ejected by passive
/// errors alone, so it stays in and the next request is served.
#[test]
fn lone_backend_and_passive_ejection() {
    let case = "lone backend";
    if !namespaces_or_skip(case) {
        return;
    }
    let topo = topology(1);
    let _inside = topo.lb.enter();
    let h0 = &topo.hosts[0];
    let sb = h0.ns.run(|| ScriptedBackend::spawn_at(h0.addr()));
    let rig = Rig::start(&["--timeout", "3s"], &[sb.url()], || sb.probes() >= 1);
    sb.set_script(Script::new(&b"HTTP/1.1 200 OK\r\nContent-Type: text/pl"[..]).resetting());
    let (got, _) = completion_got(rig.lb.port, Duration::from_secs(10));
    assert_eq!(got.status(), Some(502), "{case}: {got:?}");
    sb.set_script(Script::default());
    rig.after_case(case, Health::Kept, Duration::from_secs(3));
}
