//! `https://` backends, black-box against the build in `LB_BIN`, with a real TLS server
//! (`lb_tests::tls`: Python's `ssl` and a CA made with `openssl`): with `--backend-ca`
//! naming the CA of the backend's certificate, probes and requests go over TLS, with the
//! backend's host as SNI and `Host`, on pooled connections; with only the system's roots
//! the certificate is refused and the client gets a `502`/`503` from `lb` itself. The
//! smol build has TLS only when built with `lb-smol/tls`: for a build that refuses
//! `https://` backends, and where `openssl` or `python3` is missing, these cases skip,
//! saying so. `dns+https://` is in `dns.rs`.

use lb_tests::tls::{build_has_tls, TlsBackend};
use lb_tests::*;

fn backend() -> Option<TlsBackend> {
    if !build_has_tls() {
        return None;
    }
    TlsBackend::start(&[])
}

/// `lb` in front of `b` reached at `host`, trusting its CA, once its first probe (over
/// TLS) has passed.
fn lb_trusting(b: &TlsBackend, host: &str) -> Lb {
    let ca = b.ca();
    let lb = Lb::spawn(&[
        "--backends",
        &b.url(host),
        "--backend-ca",
        ca.to_str().unwrap(),
    ]);
    lb.wait_probed(1);
    lb
}

#[test]
fn an_https_backend_is_reached_over_tls_by_its_name() {
    let Some(b) = backend() else { return };
    let lb = lb_trusting(&b, "localhost");
    let r = lb.get("/v1/anything?x=1");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["path"], "/v1/anything?x=1", "{v}");
    assert_eq!(v["host"], format!("localhost:{}", b.port), "{v}");
    assert_eq!(v["sni"], "localhost", "{v}");
    // A body goes through whole, and the pooled TLS connection serves the next ones.
    for i in 0..5 {
        let body = json!({"model": "m", "prompt": "x".repeat(1000 * i)});
        let r = lb.post_json("/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["body"],
            serde_json::to_vec(&body).unwrap().len(),
            "request {i}"
        );
    }
}

#[test]
fn an_https_backend_by_address_is_checked_against_its_ip() {
    let Some(b) = backend() else { return };
    let lb = lb_trusting(&b, "127.0.0.1");
    let r = lb.get("/x");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    // No server name for an address (RFC 6066 §3); the certificate names the IP.
    assert_eq!(v["sni"], Value::Null, "{v}");
    assert_eq!(v["host"], format!("127.0.0.1:{}", b.port), "{v}");
}

#[test]
fn an_untrusted_certificate_is_refused() {
    let Some(b) = backend() else { return };
    // Only the system's roots: the test CA is not among them.
    let lb = Lb::spawn(&["--backends", &b.url("localhost")]);
    let r = lb.get("/x");
    assert!(
        r.status == 502 || r.status == 503,
        "status {}: {}",
        r.status,
        r.text()
    );
    // Not the backend's answer: lb's own error body.
    assert!(r.json().get("sni").is_none(), "{}", r.text());
    // The probe fails too, naming the certificate.
    lb.wait_healthy(0);
    let admin = lb.admin_port().expect("an admin listener");
    let list = request(admin, "GET", "/admin/backends", &[], None).unwrap();
    let v: Value = serde_json::from_slice(&list.body).unwrap();
    let probe = v["backends"][0]["last_probe"]["result"]
        .to_string()
        .to_lowercase();
    assert!(probe.contains("certificate"), "{v}");
}
