//! Slow, stalled and numerous clients (both builds): a client cannot pin a connection
//! slot, a lease or buffers by trickling its body or by not reading its response;
//! shutdown does not wait for idle connections or half-sent heads; `--max-client-conns`
//! makes `lb` stop accepting; running out of file descriptors does not stop `lb`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use lb_tests::*;

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads until the peer closes (or 20 s pass); what it sent.
fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A body that stops after 10 of its 100 bytes: 408 once nothing came for
/// `--client-body-timeout`, not at `--timeout`; the slot comes back.
#[test]
fn a_stalled_request_body_gets_408() {
    let m = Mock::spawn::<&str>(&[]);
    let url = m.url();
    for extra in [
        &[][..],
        &["--routing", "cache-aware", "--max-conns", "4"][..],
    ] {
        let mut args = vec!["--backends", &url, "--client-body-timeout", "1s"];
        args.extend_from_slice(extra);
        let lb = Lb::spawn(&args);
        lb.wait_healthy(1);
        let mut s = connect(lb.port);
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .unwrap();
        let t = Instant::now();
        let reply = read_all(&mut s);
        assert!(reply.starts_with("HTTP/1.1 408"), "{extra:?}: {reply:?}");
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{extra:?}: {:?}",
            t.elapsed()
        );
        lb.wait_active(0, DEADLINE);
        // A body that keeps coming, however slowly, is not cut.
        let mut s = connect(lb.port);
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
            .unwrap();
        for b in b"abcdef" {
            std::thread::sleep(Duration::from_millis(400));
            s.write_all(&[*b]).unwrap();
        }
        let mut c = Conn::from_stream(s);
        let r = c.read_response("POST").unwrap();
        assert_eq!(r.status, 200, "{extra:?}: {}", r.text());
        assert_eq!(r.json()["bytes"], 6);
    }
}

/// A client that asks for a large download and never reads it is cut off after
/// `--client-write-timeout`: its request no longer counts as in flight.
#[test]
fn a_client_that_stops_reading_is_cut_off() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url(), "--client-write-timeout", "1s"]);
    lb.wait_healthy(1);
    let s = connect(lb.port);
    // Small receive buffer: the proxy's writes block soon.
    (&s).write_all(b"GET /download?bytes=500000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    lb.wait_active(1, DEADLINE);
    // Nothing is read; within a few seconds lb gives up on this client.
    let h = lb.wait_active(0, Duration::from_secs(20));
    assert_eq!(h["active_conns"], 0, "{h}");
    drop(s);
    assert_eq!(lb.completion().status, 200);
}

/// On SIGTERM, a connection that has sent part of a head (or nothing) is closed at once:
/// the stop does not wait for --shutdown-timeout.
#[test]
fn shutdown_does_not_wait_for_half_sent_heads() {
    let m = Mock::spawn::<&str>(&[]);
    let mut lb = Lb::spawn(&["--backends", &m.url(), "--shutdown-timeout", "30s"]);
    lb.wait_healthy(1);
    let mut partial = connect(lb.port);
    partial.write_all(b"GET /x HTTP/1.1\r\nHo").unwrap();
    let idle = connect(lb.port);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    lb.signal("TERM");
    let st = lb
        .wait_exit(Duration::from_secs(20))
        .expect("lb exits without waiting for --shutdown-timeout");
    assert!(st.success(), "{st}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    drop((partial, idle));
}

/// At `--max-client-conns`, lb stops accepting: a new client waits (in the kernel's
/// backlog) until a connection closes, then it is served.
#[test]
fn max_client_conns_stops_accepting_until_one_closes() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url(), "--max-client-conns", "2"]);
    lb.wait_healthy(1);
    // lb.wait_healthy used connections of its own; they have closed. Hold two.
    let mut a = Conn::open(lb.port).unwrap();
    assert_eq!(a.request("GET", "/a", &[], None).unwrap().status, 200);
    let mut b = Conn::open(lb.port).unwrap();
    assert_eq!(b.request("GET", "/b", &[], None).unwrap().status, 200);
    // A third client connects (the backlog takes it) but is not served.
    let mut c = Conn::open(lb.port).unwrap();
    c.set_timeout(Duration::from_secs(1)).unwrap();
    c.send_head("GET", "/c", &[], None).unwrap();
    assert!(
        c.read_response("GET").is_err(),
        "served beyond --max-client-conns"
    );
    // One closes: the third is accepted and served.
    a.close();
    c.set_timeout(Duration::from_secs(20)).unwrap();
    let r = c.read_response("GET").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(b.request("GET", "/b2", &[], None).unwrap().status, 200);
}

/// Out of file descriptors (EMFILE): the accept loop backs off instead of spinning, the
/// connections already open keep working, and once some close, new ones are served.
#[test]
fn out_of_file_descriptors_is_survived() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn_with(
        &["--backends", &m.url(), "--max-client-conns", "10000"],
        LbOptions {
            nofile_hard: Some(64),
            ..LbOptions::default()
        },
    );
    lb.wait_healthy(1);
    let mut first = Conn::open(lb.port).unwrap();
    assert_eq!(
        first.request("GET", "/first", &[], None).unwrap().status,
        200
    );
    // More clients than lb has descriptors for: the backlog holds what it cannot accept.
    let mut crowd = Vec::new();
    for _ in 0..100 {
        match TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], lb.port)),
            Duration::from_secs(2),
        ) {
            Ok(s) => crowd.push(s),
            Err(_) => break,
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    // The connection lb already has still works, and lb is not spinning (its CPU time
    // over a second stays low).
    assert_eq!(
        first.request("GET", "/again", &[], None).unwrap().status,
        200
    );
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = cpu(lb.pid());
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu(lb.pid()) - before;
    assert!(
        ticks < 50,
        "lb burned {ticks} ticks in a second out of descriptors"
    );
    // The crowd leaves: new clients are served again.
    drop(crowd);
    let r = poll(DEADLINE, || {
        Conn::open(lb.port)
            .ok()?
            .request("GET", "/after", &[], None)
            .ok()
    });
    assert_eq!(r.expect("served once descriptors are free").status, 200);
}
