//! The serving future is runtime-agnostic: async-std's executor drives it (spawned on its
//! worker threads), and so does futures-lite's plain `block_on` (which does not drive
//! async-io's reactor; async-io's own thread does). In front of a tiny blocking backend,
//! a request, `/health` and the graceful stop all work.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use lb_core::{BackendSpec, Config};
use lb_proxy::{Notice, NoticeSink, Settings};

const BODY: &str = r#"{"ok":true}"#;

/// A backend on a std thread: answers every request with `BODY` and closes, and records
/// the request heads it saw.
fn backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let log = log.clone();
            thread::spawn(move || {
                let head = read_head(&mut s);
                log.lock().unwrap().push(head);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
                    BODY.len()
                );
                let _ = s.write_all(resp.as_bytes());
            });
        }
    });
    (addr, seen)
}

fn read_head(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// One request on a fresh connection; the whole answer (the proxy closes after it).
fn exchange(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn settings(backend: SocketAddr) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        backends: vec![BackendSpec::new(format!("http://{backend}"))],
        core: Config::default(),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        health_path: "/v1/models".into(),
        shutdown_timeout: Duration::from_secs(5),
        ..Settings::new("127.0.0.1:0".parse().unwrap(), Vec::new())
    }
}

type Served = Result<(), lb_smol::StartError>;
type Serve = std::pin::Pin<Box<dyn std::future::Future<Output = Served> + Send>>;

#[test]
fn serves_under_async_std() {
    check(|serve| async_std::task::block_on(async_std::task::spawn(serve)));
}

#[test]
fn serves_under_a_plain_block_on() {
    check(futures_lite::future::block_on);
}

/// Serves one request and `/health` through `lb_smol::serve` driven by `run`.
fn check(run: impl FnOnce(Serve) -> Served) {
    let (backend, seen) = backend();
    let (addr_tx, addr_rx) = mpsc::channel();
    let notices = Arc::new(Mutex::new(Vec::new()));
    let sink_notices = notices.clone();
    let addr_tx = Mutex::new(addr_tx);
    let log: NoticeSink = Arc::new(move |n: Notice| {
        if let Notice::Listening(a) = n {
            let _ = addr_tx.lock().unwrap().send(a);
        }
        sink_notices.lock().unwrap().push(format!("{n:?}"));
    });
    let (stop_tx, stop_rx) = async_std::channel::bounded::<()>(1);

    let client = thread::spawn(move || {
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let r = exchange(addr, "/v1/models");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with(BODY), "{r}");
        let h = exchange(addr, "/health");
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert!(h.contains(r#""status":"ok""#), "{h}");
        assert!(h.contains(r#""active_conns":0"#), "{h}");
        stop_tx.send_blocking(()).unwrap();
    });

    let serve = lb_smol::serve(settings(backend), log, async move {
        let _ = stop_rx.recv().await;
    });
    run(Box::pin(serve)).unwrap();
    client.join().unwrap();

    let heads = seen.lock().unwrap().clone();
    let proxied = heads
        .iter()
        .find(|h| h.contains("X-Forwarded-Host"))
        .unwrap_or_else(|| panic!("no proxied request among {heads:?}"));
    assert!(
        proxied.starts_with("GET /v1/models HTTP/1.1\r\n"),
        "{proxied}"
    );
    assert!(
        proxied.contains(&format!("Host: {backend}\r\n")),
        "{proxied}"
    );
    assert!(
        proxied.contains("X-Forwarded-Host: lb.test\r\n"),
        "{proxied}"
    );
    assert!(
        proxied.contains("X-Forwarded-For: 127.0.0.1\r\n"),
        "{proxied}"
    );

    let notices = notices.lock().unwrap();
    assert!(
        notices.iter().any(|n| n.starts_with("ShuttingDown")),
        "{notices:?}"
    );
    assert!(
        notices.iter().any(|n| n == "Stopped { abandoned: 0 }"),
        "{notices:?}"
    );
}
