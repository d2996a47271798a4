//! Streaming: SSE events reach the client as they are produced, WebSocket
//! upgrades work, 100 MiB bodies pass through both ways without lb buffering
//! them, and a client that leaves mid-stream releases its connection.

use std::io::Read;
use std::time::{Duration, Instant};

use lb_tests::*;

/// Read an SSE body; returns the arrival time (since `t0`) of each `data:`
/// line, and its payload.
fn read_events(body: &mut Body<'_>, t0: Instant) -> Vec<(Duration, String)> {
    let mut events = Vec::new();
    while let Some(line) = body.read_line().expect("read SSE body") {
        if let Some(data) = line.strip_prefix("data:") {
            events.push((t0.elapsed(), data.trim().to_string()));
        }
    }
    events
}

fn assert_streamed(events: &[(Duration, String)], n: usize) {
    assert_eq!(
        events.len(),
        n + 1,
        "{n} events and [DONE] expected: {events:?}"
    );
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let first = events[0].0;
    let done = events.last().unwrap().0;
    // 10 events 300 ms apart: the stream lasts ~2.7 s.
    assert!(
        done >= Duration::from_secs(2),
        "the stream ended after {done:?}; the mock paces it over ~2.7 s"
    );
    assert!(
        first + Duration::from_millis(1500) < done,
        "first event at {first:?}, done at {done:?}: lb buffered the stream"
    );
    // And the middle of it arrives in the middle, too.
    let mid = events[n / 2].0;
    assert!(
        mid + Duration::from_millis(600) < done && mid > first + Duration::from_millis(600),
        "events arrived at {:?}",
        events.iter().map(|e| e.0).collect::<Vec<_>>()
    );
}

#[test]
fn sse_events_are_streamed_not_buffered() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let mut c = Conn::open(lb.port).unwrap();
    let t0 = Instant::now();
    c.send_head(
        "GET",
        "/sse?events=10&interval_ms=300",
        &[("Accept", "text/event-stream")],
        None,
    )
    .unwrap();
    let head = c.read_head("GET").unwrap();
    assert_eq!(head.status, 200);
    assert!(
        head.header("content-type")
            .unwrap_or_default()
            .starts_with("text/event-stream"),
        "{:?}",
        head.headers
    );
    let events = read_events(&mut c.body(&head), t0);
    assert_streamed(&events, 10);
    for (_, e) in &events[..10] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["backend_port"], m.port);
    }
}

#[test]
fn completion_stream_is_streamed_not_buffered() {
    let m = Mock::spawn(&["--tokens", "10", "--token-interval", "300ms"]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let body = serde_json::to_vec(&json!({
        "model": "m",
        "messages": [{"role": "user", "content": "count"}],
        "stream": true
    }))
    .unwrap();
    let mut c = Conn::open(lb.port).unwrap();
    let t0 = Instant::now();
    c.send_head(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        Some(body.len() as u64),
    )
    .unwrap();
    c.write_raw(&body).unwrap();
    let head = c.read_head("POST").unwrap();
    assert_eq!(head.status, 200);
    let events = read_events(&mut c.body(&head), t0);
    assert_streamed(&events, 10);
    let v: Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!(v["object"], "chat.completion.chunk", "{v}");
}

#[test]
fn websocket_echo_through_lb() {
    use tungstenite::Message;
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let stream = std::net::TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let url = format!("ws://127.0.0.1:{}/ws", lb.port);
    let (mut ws, resp) = tungstenite::client::client(url.as_str(), stream)
        .unwrap_or_else(|e| panic!("WebSocket handshake through lb failed: {e}"));
    assert_eq!(resp.status().as_u16(), 101);

    ws.send(Message::text("hello through lb")).unwrap();
    let msg = ws.read().unwrap();
    assert_eq!(msg.to_text().unwrap(), "hello through lb");

    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(big.clone())).unwrap();
    let msg = ws.read().unwrap();
    assert!(msg.is_binary());
    assert_eq!(msg.into_data().as_ref(), big.as_slice());

    for i in 0..20 {
        let s = format!("message {i}");
        ws.send(Message::text(s.clone())).unwrap();
        assert_eq!(ws.read().unwrap().to_text().unwrap(), s);
    }
    ws.close(None).unwrap();
    // Drain until the close handshake completes.
    loop {
        match ws.read() {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // The upgraded connection is released once both sides closed.
    drop(ws);
    lb.wait_active(0, DEADLINE);
}

const BIG: u64 = 100 * 1024 * 1024;
const RSS_LIMIT_KIB: u64 = 64 * 1024;

#[test]
fn upload_100_mib_intact_with_bounded_memory() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let mut c = Conn::open(lb.port).unwrap();
    c.send_head(
        "POST",
        "/upload",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Connection", "close"),
        ],
        Some(BIG),
    )
    .unwrap();
    // 1 MiB of pseudo-random bytes, sent 100 times with a different first
    // word each time (so reordered or repeated chunks change the hash).
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    let mut fnv = Fnv1a::default();
    let t = Instant::now();
    for i in 0..(BIG >> 20) {
        block[..8].copy_from_slice(&i.to_le_bytes());
        fnv.update(&block);
        c.write_raw(&block).unwrap();
    }
    let r = c.read_response("POST").unwrap();
    eprintln!("uploaded 100 MiB in {:?}", t.elapsed());
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["bytes"], BIG, "{v}");
    assert_eq!(
        v["fnv1a"].as_str().map(str::to_lowercase),
        Some(fnv.hex()),
        "{v}"
    );
    let hwm = lb.vm_hwm_kib();
    eprintln!("lb VmHWM after the upload: {hwm} KiB");
    assert!(
        hwm < RSS_LIMIT_KIB,
        "lb's peak RSS {hwm} KiB: it should stream, not buffer, a 100 MiB body"
    );
}

#[test]
fn download_100_mib_intact_with_bounded_memory() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let mut c = Conn::open(lb.port).unwrap();
    let t = Instant::now();
    c.send_head(
        "GET",
        &format!("/download?bytes={BIG}"),
        &[("Connection", "close")],
        None,
    )
    .unwrap();
    let head = c.read_head("GET").unwrap();
    assert_eq!(head.status, 200);
    if let Some(len) = head.header("content-length") {
        assert_eq!(len, BIG.to_string());
    }
    // byte i is i % 251: compare each read against a long enough pattern.
    let pattern: Vec<u8> = (0..251 * 300).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    let mut body = c.body(&head);
    loop {
        let n = body.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let off = (total % 251) as usize;
        assert!(
            buf[..n] == pattern[off..off + n],
            "corrupted download at byte offset {total}"
        );
        total += n as u64;
    }
    eprintln!("downloaded 100 MiB in {:?}", t.elapsed());
    assert_eq!(total, BIG, "download length");
    let hwm = lb.vm_hwm_kib();
    eprintln!("lb VmHWM after the download: {hwm} KiB");
    assert!(
        hwm < RSS_LIMIT_KIB,
        "lb's peak RSS {hwm} KiB: it should stream, not buffer, a 100 MiB body"
    );
}

#[test]
fn client_leaving_mid_stream_releases_the_connection() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let mut c = Conn::open(lb.port).unwrap();
    // 600 events 100 ms apart: a minute of stream unless lb notices.
    c.send_head("GET", "/sse?events=600&interval_ms=100", &[], None)
        .unwrap();
    let head = c.read_head("GET").unwrap();
    assert_eq!(head.status, 200);
    {
        let mut body = c.body(&head);
        let first = body.read_line().unwrap().expect("first line");
        assert!(first.starts_with("data:"), "{first:?}");
    }
    let h = lb.wait_active(1, DEADLINE);
    assert_eq!(h["active_conns"], 1);
    assert_eq!(m.in_flight(), 1);

    let t = Instant::now();
    c.close();
    lb.wait_active(0, Duration::from_secs(15));
    eprintln!("active_conns back to 0 after {:?}", t.elapsed());
    // lb also dropped the upstream request (the backend stops generating).
    wait_until(
        Duration::from_secs(15),
        "the backend's in_flight back to 0 (lb aborted the upstream stream)",
        || m.in_flight(),
        |n| *n == 0,
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(lb.completion().status, 200);
}

#[test]
fn client_leaving_before_the_response_releases_the_connection() {
    let m = Mock::spawn(&["--delay", "3s"]);
    let lb = Lb::spawn(&["--backends", &m.url(), "--health-path", "/stats"]);
    let mut c = Conn::open(lb.port).unwrap();
    let b = serde_json::to_vec(&json!({"prompt": "x"})).unwrap();
    c.send_head(
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        Some(b.len() as u64),
    )
    .unwrap();
    c.write_raw(&b).unwrap();
    lb.wait_active(1, DEADLINE);
    c.close();
    lb.wait_active(0, Duration::from_secs(15));
    assert_eq!(lb.completion().status, 200);
}
