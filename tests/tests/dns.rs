//! DNS discovery, black-box against the build in `LB_BIN`: `lb --discover dns://NAME:PORT
//! --resolver` follows a real DNS server on loopback (Debian's dnsmasq, started here) while
//! its records change: an address added joins and takes traffic (sent `Host: NAME:PORT`),
//! one removed drains and leaves, the server stopped keeps the pool (said once); and
//! `lb --check --resolve`. Skips, saying so, where dnsmasq is not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lb_tests::*;
use serde_json::Value;

const NAME: &str = "vllm.test";

/// The dnsmasq binary, if installed.
fn dnsmasq_bin() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/sbin/dnsmasq");
    if fixed.is_file() {
        return Some(fixed);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("dnsmasq"))
        .find(|p| p.is_file())
}

fn skip_without_dnsmasq() -> Option<PathBuf> {
    let bin = dnsmasq_bin();
    if bin.is_none() {
        eprintln!(
            "SKIP: dnsmasq is not installed (apt-get install dnsmasq-base; tests/run.sh does): \
             the DNS discovery cases need a real DNS server"
        );
    }
    bin
}

/// A dnsmasq on 127.0.0.1 that answers from a hosts file with TTL 1, killed on drop.
struct Dns {
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    log: Option<LogBuffer>,
}

impl Dns {
    fn start(bin: PathBuf, hosts: &str) -> Dns {
        let dir =
            std::env::temp_dir().join(format!("lb-dns-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut dns = Dns {
            bin,
            child: None,
            port: 0,
            dir,
            log: None,
        };
        dns.set(hosts);
        dns.run(free_port());
        dns
    }

    fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    /// Starts dnsmasq on `port` and waits for it to have read the hosts file.
    fn run(&mut self, port: u16) {
        let mut child = Command::new(&self.bin)
            .args([
                "--keep-in-foreground",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
            ])
            .args([
                "--listen-address",
                "127.0.0.1",
                "--local-ttl",
                "1",
                "--user=root",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", self.hosts().display()))
            .arg("--conf-file=/dev/null")
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .arg("--log-facility=-")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let log = LogBuffer::capture(child.stderr.take().unwrap());
        self.child = Some(child);
        self.port = port;
        log.wait_for(Duration::from_secs(10), |l| {
            l.contains("read ") && l.contains("hosts")
        })
        .unwrap_or_else(|| panic!("dnsmasq did not start: {}", log.text()));
        self.log = Some(log);
    }

    /// Replaces the records (hosts-file lines) and has dnsmasq read them (SIGHUP).
    fn set(&mut self, hosts: &str) {
        let tmp = self.dir.join("hosts.new");
        std::fs::write(&tmp, hosts).unwrap();
        std::fs::rename(&tmp, self.hosts()).unwrap();
        if let Some(c) = &self.child {
            let before = self.log.as_ref().map_or(0, |l| l.lines().len());
            send_signal(c.id(), "HUP");
            let log = self.log.as_ref().unwrap();
            poll(Duration::from_secs(10), || {
                let lines = log.lines();
                lines[before.min(lines.len())..]
                    .iter()
                    .any(|l| l.contains("read "))
                    .then_some(())
            })
            .unwrap_or_else(|| panic!("dnsmasq did not reread its hosts: {}", log.text()));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Mock backends on 127.0.0.2, 127.0.0.3, ... all on one port (DNS gives addresses only).
fn mocks(n: u8) -> (u16, Vec<Mock>) {
    for _ in 0..10 {
        let port = free_port();
        let free = (0..n)
            .all(|i| std::net::TcpListener::bind((format!("127.0.0.{}", i + 2), port)).is_ok());
        if !free {
            continue;
        }
        let ms = (0..n)
            .map(|i| {
                let ip = format!("127.0.0.{}", i + 2);
                Mock::spawn(&["--bind", &ip, "--port", &port.to_string()])
            })
            .collect();
        return (port, ms);
    }
    panic!("no port free on 127.0.0.2..{}", n + 1);
}

fn listed(admin: u16) -> Vec<Value> {
    let r = request(admin, "GET", "/admin/backends", &[], None).expect("GET /admin/backends");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["backends"].as_array().cloned().unwrap_or_default()
}

/// Waits until the DNS-sourced backends not draining are exactly `urls`.
fn wait_dns_backends(admin: u16, urls: &[String]) -> Vec<Value> {
    let mut want: Vec<String> = urls.to_vec();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let all = listed(admin);
        let mut got: Vec<String> = all
            .iter()
            .filter(|b| b["source"] == "dns" && b["state"] != "draining" && b["state"] != "drained")
            .map(|b| b["url"].as_str().unwrap().to_string())
            .collect();
        got.sort();
        let gone_drained = all
            .iter()
            .all(|b| urls.contains(&b["url"].as_str().unwrap().to_string()));
        if got == want && gone_drained {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "waited for {want:?}; listed: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `dns+https://NAME:PORT`: each address is reached over TLS with NAME as the server
/// name (SNI) and in `Host`, and the certificate is checked for NAME, not the address.
#[test]
fn dns_https_reaches_each_address_by_the_name() {
    let Some(bin) = skip_without_dnsmasq() else {
        return;
    };
    if !lb_tests::tls::build_has_tls() {
        return;
    }
    let Some(b) = lb_tests::tls::TlsBackend::start(&[NAME]) else {
        return;
    };
    let dns = Dns::start(bin, &format!("127.0.0.1 {NAME}\n"));
    let discover = format!("dns+https://{NAME}:{}", b.port);
    let ca = b.ca();
    let lb = Lb::spawn(&[
        "--discover",
        &discover,
        "--resolver",
        &dns.addr(),
        "--backend-ca",
        ca.to_str().unwrap(),
    ]);
    let admin = lb.admin_port().expect("an admin listener");
    let all = wait_dns_backends(admin, &[b.url("127.0.0.1")]);
    assert_eq!(all[0]["host"], format!("{NAME}:{}", b.port), "{all:?}");
    lb.wait_probed(1);
    let r = lb.get("/v1/models");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["sni"], NAME, "{v}");
    assert_eq!(v["host"], format!("{NAME}:{}", b.port), "{v}");
    assert_eq!(v["path"], "/v1/models", "{v}");
}

#[test]
fn dns_records_are_followed_and_a_dead_server_keeps_the_pool() {
    let Some(bin) = skip_without_dnsmasq() else {
        return;
    };
    let (port, ms) = mocks(2);
    let url = |i: usize| format!("http://127.0.0.{}:{port}", i + 2);
    let mut dns = Dns::start(bin, &format!("127.0.0.2 {NAME}\n"));
    let discover = format!("dns://{NAME}:{port}");
    // No --backends: the name is the only source.
    let lb = Lb::spawn(&[
        "--discover",
        &discover,
        "--resolver",
        &dns.addr(),
        "--discover-interval",
        "1s",
        "--routing",
        "round-robin",
    ]);
    let admin = lb.admin_port().expect("an admin listener");
    let all = wait_dns_backends(admin, &[url(0)]);
    assert_eq!(all[0]["source"], "dns", "{all:?}");
    // Its address is its url; the name it was found by is its host.
    assert_eq!(all[0]["host"], format!("{NAME}:{port}"), "{all:?}");
    lb.wait_healthy(1);

    // The backend sees the name, not its address.
    let r = lb.get("/echo");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["headers"]["host"],
        format!("{NAME}:{port}"),
        "{}",
        r.text()
    );

    // A record added: the address joins (probed first) and takes traffic.
    dns.set(&format!("127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n"));
    wait_dns_backends(admin, &[url(0), url(1)]);
    lb.wait_healthy(2);
    let before = ms[1].requests();
    for _ in 0..4 {
        assert_eq!(lb.get("/echo").status, 200);
    }
    assert!(ms[1].requests() > before, "the new address got no request");

    // A record removed: that backend drains and leaves; traffic goes to the other.
    dns.set(&format!("127.0.0.3 {NAME}\n"));
    wait_dns_backends(admin, &[url(1)]);
    let before = ms[0].requests();
    for _ in 0..3 {
        assert_eq!(lb.get("/echo").status, 200);
    }
    assert_eq!(
        ms[0].requests(),
        before,
        "a removed address still got requests"
    );
    let m = lb.metrics();
    let changes = |change| {
        m.value(
            "lb_backend_changes_total",
            &[("source", "dns"), ("change", change)],
        )
    };
    assert_eq!((changes("added"), changes("removed")), (2.0, 1.0));
    assert!(
        lb.log
            .wait_for(Duration::from_secs(5), |l| l.contains(&url(1))
                && l.contains("added (dns)"))
            .is_some(),
        "{}",
        lb.log.text()
    );

    // The server stopped: the pool is kept, and that is said once.
    dns.stop();
    let said = |l: &str| l.contains("--discover") && l.contains("cannot resolve");
    lb.log
        .wait_for(Duration::from_secs(10), said)
        .unwrap_or_else(|| panic!("no line for the dead server: {}", lb.log.text()));
    // Three more rounds (one a second) fail the same way: still one line.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lb.log.matching(said).len(), 1, "{}", lb.log.text());
    wait_dns_backends(admin, &[url(1)]);
    assert_eq!(lb.get("/echo").status, 200);

    // Back on the same port: a change is followed again.
    let p = dns.port;
    dns.set(&format!("127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n"));
    dns.run(p);
    wait_dns_backends(admin, &[url(0), url(1)]);
}

#[test]
fn check_resolve_resolves_each_name_once() {
    let Some(bin) = skip_without_dnsmasq() else {
        return;
    };
    let dns = Dns::start(bin, &format!("127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n"));
    let t = Duration::from_secs(20);
    let good = format!("dns://{NAME}:8000");
    let out = run_lb(
        &[
            "--check",
            "--resolve",
            "--resolver",
            &dns.addr(),
            "--discover",
            &good,
        ],
        t,
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("2 addresses"), "{}", out.stdout);

    let bad = "dns://nope.test:8443";
    let out = run_lb(
        &[
            "--check",
            "--resolve",
            "--resolver",
            &dns.addr(),
            "--discover",
            &good,
            "--discover",
            bad,
        ],
        t,
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--discover") && out.stderr.contains("nope.test"),
        "{}",
        out.stderr
    );
    // Without --resolve, names are not looked up: only their syntax is checked.
    let out = run_lb(&["--check", "--discover", bad], t);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
}

#[test]
fn discover_flags_are_checked() {
    let t = Duration::from_secs(20);
    for (args, needle) in [
        (&["--check", "--discover", "http://x:1"][..], "--discover"),
        (&["--check", "--discover", "dns://x:0"][..], "--discover"),
        (
            &["--check", "--discover", "dns://10.0.0.1:80"][..],
            "--discover",
        ),
        (&["--check", "--discover", "dns://a b:80"][..], "--discover"),
        (
            &[
                "--check",
                "--discover",
                "dns://x:1",
                "--discover",
                "dns://X:1",
            ][..],
            "twice",
        ),
        (
            &[
                "--check",
                "--discover",
                "dns://x:1",
                "--discover-interval",
                "500ms",
            ][..],
            "--discover-interval",
        ),
        (
            &["--check", "--discover", "dns://x:1", "--resolver", "nope"][..],
            "--resolver",
        ),
        (&["--discover", "dns://x:1", "--resolve"][..], "--check"),
    ] {
        let out = run_lb(args, t);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
    // The system resolver (no --resolver) reads /etc/hosts.
    let out = run_lb(
        &["--check", "--resolve", "--discover", "dns://localhost:8000"],
        t,
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
}
