//! Shared harness for the black-box tests of `lb` (the files in `tests/tests/`).
//!
//! Everything here runs real processes on loopback ports:
//!
//! * [`Lb`]: the `lb` binary under test, found through the `LB_BIN` environment
//!   variable, else `<workspace>/target/release/lb` (see [`lb_bin`]). The same
//!   suite runs against every build of `lb` (tokio, smol) by changing `LB_BIN`,
//!   so nothing here assumes a runtime.
//! * [`Mock`]: the `mock-backend` binary of this crate (see [`mock_bin`]).
//! * A small blocking HTTP/1.1 client over `std::net::TcpStream` ([`Conn`],
//!   [`request`], [`get`], [`post_json`]) that gives the tests full control:
//!   raw bytes, keep-alive, incremental reads of streamed bodies.
//!
//! Every child process is killed when its guard is dropped, also when a test
//! panics; on a panic the guard prints the child's captured stderr, so a
//! failing test shows what `lb` logged.

#![allow(unsafe_code)] // `setrlimit` in `raise_fd_limit`; `setns` and `setsockopt` in modules

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use serde_json::{json, Value};

pub mod netns;
pub mod relay;
pub mod scripted;
pub mod tls;
pub use scripted::{After, Continue, Received, Script, ScriptedBackend, KEEPALIVE_PATH};

/// How long helpers wait for a condition before they give up (and panic).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Read/write timeout of the sockets opened by [`request`] and [`Conn::open`].
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// The `lb` binary under test: `$LB_BIN`, else `<workspace>/target/release/lb`
/// (or `$CARGO_TARGET_DIR/release/lb`).
pub fn lb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "LB_BIN={} does not exist: build lb (`cargo build --release -p lb-cli`) or fix LB_BIN",
            p.display()
        );
        return p;
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_dir().join(dir)
            }
        }
        None => workspace_dir().join("target"),
    };
    let p = target.join("release").join("lb");
    assert!(
        p.exists(),
        "the lb binary {} is missing: run `cargo build --release -p lb-cli` first, \
         or set LB_BIN to the lb binary to test",
        p.display()
    );
    p
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `mock-backend` binary of this crate: `$MOCK_BACKEND_BIN`, else the one
/// cargo built next to the running test executable (the file
/// `env!("CARGO_BIN_EXE_mock-backend")` names in an integration test; cargo
/// builds it before it runs them).
pub fn mock_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOCK_BACKEND_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<test>-<hash>  ->  <target>/<profile>/mock-backend
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("mock-backend");
    assert!(
        p.exists(),
        "mock-backend not found at {}: run the tests with `cargo test -p lb-tests`, \
         or set MOCK_BACKEND_BIN",
        p.display()
    );
    p
}

// ---------------------------------------------------------------------------
// Process-wide setup
// ---------------------------------------------------------------------------

/// Raise this process's soft limit on open files to its hard limit (children
/// inherit it). Called by every spawn helper; idempotent.
pub fn raise_fd_limit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
        unsafe {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max.min(1 << 20);
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    });
}

/// This process's soft limit on open files.
pub fn fd_limit() -> u64 {
    // SAFETY: getrlimit only writes the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur
        } else {
            0
        }
    }
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// A loopback port that is free right now, for `lb --port` (which refuses 0).
///
/// Ports come from below the kernel's ephemeral range, so the many outgoing
/// connections of a running test (and mocks started with `--port 0`) cannot
/// take the port between this call and the moment `lb` binds it; each call in
/// a process returns a different port. [`Lb::spawn`] retries with another port
/// if the bind fails all the same.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = port_window();
    let span = u32::from(hi - lo);
    static SEED: Once = Once::new();
    SEED.call_once(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seed = std::process::id()
            .wrapping_mul(7919)
            .wrapping_add(nanos / 1000);
        NEXT.store(seed % span, Ordering::SeqCst);
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = lo + n as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // Fall back on the kernel's choice.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// The window ports are picked from: below the ephemeral range when there is
/// room (usually 20000..32768), else the whole unprivileged range.
fn port_window() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let low = range
        .as_deref()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(32768);
    if low >= 12000 {
        (low.saturating_sub(12768).max(10000), low)
    } else {
        (10000, 60000)
    }
}

/// A port nothing listens on (picked like [`free_port`]).
pub fn dead_port() -> u16 {
    free_port()
}

// ---------------------------------------------------------------------------
// Captured output
// ---------------------------------------------------------------------------

/// Lines read from a child's pipe by a background thread.
#[derive(Clone, Default)]
pub struct LogBuffer {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    closed: bool,
}

impl LogBuffer {
    /// Start a thread that appends every line of `r` to a new buffer.
    pub fn capture<R: Read + Send + 'static>(r: R) -> LogBuffer {
        let buf = LogBuffer::default();
        let b = buf.clone();
        thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let s = String::from_utf8_lossy(&line);
                        let s = s.trim_end_matches(['\n', '\r']).to_string();
                        let (m, cv) = &*b.inner;
                        m.lock().unwrap().lines.push(s);
                        cv.notify_all();
                    }
                }
            }
            let (m, cv) = &*b.inner;
            m.lock().unwrap().closed = true;
            cv.notify_all();
        });
        buf
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    /// Every line so far, joined with newlines.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Whether the pipe reached EOF.
    pub fn closed(&self) -> bool {
        self.inner.0.lock().unwrap().closed
    }

    /// The lines so far that satisfy `pred`.
    pub fn matching(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.inner
            .0
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter(|l| pred(l))
            .cloned()
            .collect()
    }

    /// Wait until a line satisfying `pred` has been read (returns it), or the
    /// timeout passes or the pipe closes (returns `None`).
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        let mut seen = 0;
        loop {
            if let Some(l) = st.lines[seen..].iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            seen = st.lines.len();
            if st.closed {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Wait until the pipe closes (the child exited), up to `timeout`.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        while !st.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        true
    }
}

/// A `[HEALTH]` line saying the backend on `port` became unhealthy.
pub fn is_unhealthy_line(line: &str, port: u16) -> bool {
    line.contains("[HEALTH]")
        && line.contains(&format!(":{port}"))
        && line.contains("marked as unhealthy")
}

/// A `[HEALTH]` line saying the backend on `port` became healthy.
pub fn is_healthy_line(line: &str, port: u16) -> bool {
    line.contains("[HEALTH]")
        && line.contains(&format!(":{port}"))
        && line.contains("marked as healthy")
}

// ---------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------

/// Poll `f` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Like [`poll`], but panics with `what` (and the last value seen) on timeout.
pub fn wait_until<T: std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> T,
    mut done: impl FnMut(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let v = probe();
        if done(&v) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last value: {v:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Send a signal (e.g. `"TERM"`, `"INT"`) to a process.
pub fn send_signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg("-s")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .expect("run kill(1)");
    assert!(st.success(), "kill -s {sig} {pid} failed");
}

/// Wait for `child` to exit, up to `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// How many file descriptors a process has open (the entries of `/proc/<pid>/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

/// Peak resident set size (`VmHWM`) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------------
// lb
// ---------------------------------------------------------------------------

/// How to start `lb` beyond its arguments.
#[derive(Clone, Debug, Default)]
pub struct LbOptions {
    /// Start `lb` with this soft limit on open files (through `sh -c 'ulimit
    /// -S -n N; exec lb ..'`), to check that `lb` raises its own limit.
    pub nofile_soft: Option<u64>,
    /// Start `lb` with this hard (and soft) limit on open files, so that it cannot raise
    /// it: to drive it out of file descriptors.
    pub nofile_hard: Option<u64>,
    /// Do not wait for `lb` to answer `GET /health` before returning.
    pub no_wait: bool,
    /// Run this binary instead of [`lb_bin`] (a test that compares builds
    /// starts several in one process).
    pub bin: Option<PathBuf>,
    /// Leave `--admin-bind` at lb's default (127.0.0.1:9901) instead of a free port.
    pub default_admin: bool,
}

/// A running `lb`, killed on drop.
pub struct Lb {
    child: Option<Child>,
    /// The port `lb` listens on (127.0.0.1).
    pub port: u16,
    /// `lb`'s stderr, line by line.
    pub log: LogBuffer,
    /// `lb`'s stdout, line by line.
    pub stdout: LogBuffer,
    pid: u32,
}

fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

impl Lb {
    /// Start `lb` with `args`, adding `--bind 127.0.0.1` and `--port <free
    /// port>` unless `args` has them, and wait until it answers `GET /health`.
    pub fn spawn<S: AsRef<str>>(args: &[S]) -> Lb {
        Lb::spawn_with(args, LbOptions::default())
    }

    /// [`Lb::spawn`] with options.
    pub fn spawn_with<S: AsRef<str>>(args: &[S], opts: LbOptions) -> Lb {
        raise_fd_limit();
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
        let own_port = !has_flag(&args, "--port");
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let mut full = args.clone();
            let port = if own_port {
                let p = free_port();
                full.push("--port".into());
                full.push(p.to_string());
                p
            } else {
                let i = args.iter().position(|a| a.starts_with("--port")).unwrap();
                let v = match args[i].strip_prefix("--port=") {
                    Some(v) => v.to_string(),
                    None => args[i + 1].clone(),
                };
                v.parse().expect("--port value")
            };
            if !has_flag(&args, "--bind") {
                full.push("--bind".into());
                full.push("127.0.0.1".into());
            }
            if !has_flag(&args, "--admin-bind") && !opts.default_admin {
                // A port of its own: tests running in parallel never collide.
                full.push("--admin-bind".into());
                full.push("127.0.0.1:0".into());
            }
            let lb = Lb::start(&full, port, &opts);
            let mut lb = lb;
            if opts.no_wait {
                return lb;
            }
            match lb.wait_ready(DEADLINE) {
                Ok(()) => return lb,
                Err(exited) => {
                    last_log = lb.log.text();
                    let in_use = last_log.to_lowercase().contains("in use");
                    if exited && in_use && own_port {
                        continue; // somebody took the port: try another
                    }
                    panic!(
                        "lb {full:?} did not become ready ({}); stderr:\n{last_log}",
                        if exited { "it exited" } else { "timeout" }
                    );
                }
            }
        }
        panic!("lb could not bind a port after 5 attempts; stderr:\n{last_log}");
    }

    fn start(args: &[String], port: u16, opts: &LbOptions) -> Lb {
        let bin = opts.bin.clone().unwrap_or_else(lb_bin);
        let ulimit = match (opts.nofile_hard, opts.nofile_soft) {
            (Some(n), _) => Some(format!("ulimit -n {n}")),
            (None, Some(n)) => Some(format!("ulimit -S -n {n}")),
            (None, None) => None,
        };
        let mut cmd = match ulimit {
            Some(ulimit) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{ulimit} && exec \"$0\" \"$@\""))
                    .arg(&bin)
                    .args(args);
                c
            }
            None => {
                let mut c = Command::new(&bin);
                c.args(args);
                c
            }
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let log = LogBuffer::capture(child.stderr.take().unwrap());
        let stdout = LogBuffer::capture(child.stdout.take().unwrap());
        let pid = child.id();
        Lb {
            child: Some(child),
            port,
            log,
            stdout,
            pid,
        }
    }

    /// Wait until `lb` answers `GET /health` (any status). `Err(true)` if it
    /// exited first, `Err(false)` on timeout.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    // Let the stderr reader drain the pipe.
                    self.log.wait_closed(Duration::from_secs(2));
                    return Err(true);
                }
            }
            if let Ok(mut c) = Conn::open_timeout(self.port, Duration::from_millis(500)) {
                let _ = c.set_timeout(Duration::from_secs(2));
                if c.request("GET", "/health", &[("Connection", "close")], None)
                    .is_ok()
                {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(false);
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// `lb`'s process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The admin listener's port, from its `admin listening on` line (waited for up to
    /// 10 s); `None` if it has none.
    pub fn admin_port(&self) -> Option<u16> {
        let line = self.log.wait_for(Duration::from_secs(10), |l| {
            l.contains("admin listening on http://") || l.contains(r#""event":"admin_listening""#)
        })?;
        let addr = line
            .split("http://")
            .nth(1)
            .map(|a| a.split_whitespace().next().unwrap_or(""))
            .or_else(|| {
                line.split(r#""addr":""#)
                    .nth(1)
                    .and_then(|a| a.split('"').next())
            })?;
        addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
    }

    /// `GET path` on the admin listener (`/metrics`, `/health`, `/live`).
    pub fn admin_get(&self, path: &str) -> Resp {
        let port = self
            .admin_port()
            .unwrap_or_else(|| panic!("lb has no admin listener; stderr:\n{}", self.log.text()));
        get(port, path)
    }

    /// A `/metrics` scrape, parsed: every sample as (name, labels, value).
    pub fn metrics(&self) -> Metrics {
        let r = self.admin_get("/metrics");
        assert_eq!(r.status, 200, "/metrics: {}", r.text());
        Metrics::parse(&r.text())
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `GET /health`: (status, JSON body).
    pub fn health(&self) -> (u16, Value) {
        let r = get(self.port, "/health");
        let v = r.json();
        (r.status, v)
    }

    /// `GET /health`, or `None` when it fails at the transport level.
    pub fn try_health(&self) -> Option<(u16, Value)> {
        let r = request(self.port, "GET", "/health", &[], None).ok()?;
        let v = serde_json::from_slice(&r.body).ok()?;
        Some((r.status, v))
    }

    /// Poll `/health` until `healthy_backends == n` (panics after
    /// [`DEADLINE`]); returns the body.
    pub fn wait_healthy(&self, n: u64) -> Value {
        self.wait_healthy_within(n, DEADLINE)
    }

    /// Poll `/health` until `healthy_backends == n`, up to `timeout`.
    pub fn wait_healthy_within(&self, n: u64, timeout: Duration) -> Value {
        let what = format!("/health healthy_backends == {n}");
        let v = wait_until(
            timeout,
            &what,
            || self.try_health(),
            |h| matches!(h, Some((_, v)) if v["healthy_backends"].as_u64() == Some(n)),
        );
        v.unwrap().1
    }

    /// Polls the admin API until `n` backends are healthy and have passed a probe (a
    /// backend not yet probed takes no traffic while a probed one has room).
    pub fn wait_probed(&self, n: usize) {
        let port = self
            .admin_port()
            .unwrap_or_else(|| panic!("lb has no admin listener; stderr:\n{}", self.log.text()));
        wait_until(
            DEADLINE,
            &format!("{n} backends probed and healthy (/admin/backends)"),
            || get(port, "/admin/backends").json(),
            |v| {
                v["backends"].as_array().is_some_and(|list| {
                    list.iter()
                        .filter(|b| b["probed"] == true && b["state"] == "healthy")
                        .count()
                        >= n
                })
            },
        );
    }

    /// Poll `/health` until `active_conns == n`; returns the body.
    pub fn wait_active(&self, n: u64, timeout: Duration) -> Value {
        let what = format!("/health active_conns == {n}");
        let v = wait_until(
            timeout,
            &what,
            || self.try_health(),
            |h| matches!(h, Some((_, v)) if v["active_conns"].as_u64() == Some(n)),
        );
        v.unwrap().1
    }

    /// Send a signal (`"TERM"`, `"INT"`, ...) to `lb`.
    pub fn signal(&self, sig: &str) {
        send_signal(self.pid, sig);
    }

    /// Wait for `lb` to exit, up to `timeout`; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let st = wait_child(child, timeout)?;
        self.log.wait_closed(Duration::from_secs(2));
        Some(st)
    }

    /// Whether `lb` is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `lb`'s peak RSS (`VmHWM`) in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        vm_hwm_kib(self.pid)
    }

    /// `GET path` through `lb` (panics on transport errors).
    pub fn get(&self, path: &str) -> Resp {
        get(self.port, path)
    }

    /// `POST path` with a JSON body through `lb` (panics on transport errors).
    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        post_json(self.port, path, body)
    }

    /// A small completion request through `lb` (panics on transport errors).
    pub fn completion(&self) -> Resp {
        self.post_json(
            "/v1/completions",
            &json!({"model": "m", "prompt": "hello", "max_tokens": 4}),
        )
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
        if thread::panicking() {
            self.log.wait_closed(Duration::from_secs(1));
            eprintln!(
                "----- lb (port {}) stderr -----\n{}\n----- end of lb stderr -----",
                self.port,
                self.log.text()
            );
        }
    }
}

/// What a finished `lb` run produced.
#[derive(Debug)]
pub struct LbOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Run `lb` with exactly `args` (nothing added) and wait for it to exit.
/// Panics if it is still running after `timeout` (it is killed first).
pub fn run_lb<S: AsRef<str>>(args: &[S], timeout: Duration) -> LbOutput {
    let bin = lb_bin();
    let mut argv: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    if !has_flag(&argv, "--admin-bind") {
        // The default admin address may be taken by another test's lb: that would add
        // a warning line to the output under test.
        argv.push("--admin-bind".into());
        argv.push("off".into());
    }
    let mut child = Command::new(&bin)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let err = LogBuffer::capture(child.stderr.take().unwrap());
    let out = LogBuffer::capture(child.stdout.take().unwrap());
    let st = wait_child(&mut child, timeout);
    let Some(status) = st else {
        kill_child(&mut child);
        err.wait_closed(Duration::from_secs(2));
        let argv: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
        panic!(
            "lb {argv:?} still running after {timeout:?} (expected it to exit); stderr:\n{}",
            err.text()
        );
    };
    err.wait_closed(Duration::from_secs(5));
    out.wait_closed(Duration::from_secs(5));
    LbOutput {
        status,
        stdout: out.text(),
        stderr: err.text(),
    }
}

// ---------------------------------------------------------------------------
// mock-backend
// ---------------------------------------------------------------------------

/// A running `mock-backend`, killed on drop.
pub struct Mock {
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
    /// The address it listens on (`--bind`, 127.0.0.1 by default).
    pub ip: IpAddr,
    /// Its stderr, line by line.
    pub log: LogBuffer,
    args: Vec<String>,
}

impl Mock {
    /// Start a mock with `args` (e.g. `["--mode", "failing"]`) on a free port
    /// (`--port 0` unless `args` has `--port`), and wait for its `listening on`
    /// line.
    pub fn spawn<S: AsRef<str>>(args: &[S]) -> Mock {
        raise_fd_limit();
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
        let mut full = args.clone();
        if !has_flag(&args, "--port") {
            full.push("--port".into());
            full.push("0".into());
        }
        let (child, addr, log) = Mock::start(&full).unwrap_or_else(|e| panic!("{e}"));
        let args: Vec<String> = strip_port(&args);
        Mock {
            child: Some(child),
            port: addr.port(),
            ip: addr.ip(),
            log,
            args,
        }
    }

    fn start(args: &[String]) -> Result<(Child, SocketAddr, LogBuffer), String> {
        let bin = mock_bin();
        let mut child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let log = LogBuffer::capture(child.stderr.take().unwrap());
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let res = r.read_line(&mut line).map(|_| line);
            let _ = tx.send(res);
            // Keep draining so the mock never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
        let line = match rx.recv_timeout(DEADLINE) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                kill_child(&mut child);
                return Err(format!("mock-backend {args:?}: reading stdout: {e}"));
            }
            Err(_) => {
                kill_child(&mut child);
                return Err(format!(
                    "mock-backend {args:?} printed no `listening on` line in {DEADLINE:?}"
                ));
            }
        };
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse::<SocketAddr>().ok());
        match addr {
            Some(a) => Ok((child, a, log)),
            None => {
                kill_child(&mut child);
                log.wait_closed(Duration::from_secs(2));
                Err(format!(
                    "mock-backend {args:?}: unexpected first stdout line {line:?}; stderr:\n{}",
                    log.text()
                ))
            }
        }
    }

    /// `http://<ip>:<port>` (`http://127.0.0.1:<port>` unless started with `--bind`).
    pub fn url(&self) -> String {
        format!("http://{}", self.socket_addr())
    }

    /// `<ip>:<port>` (no scheme).
    pub fn addr(&self) -> String {
        self.socket_addr().to_string()
    }

    /// The address it listens on.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// Kill the mock (SIGKILL) and wait for it; its port is closed after this.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    /// Start the mock again, with the same arguments, on the same port
    /// (retrying while the port cannot be bound yet).
    pub fn restart(&mut self) {
        self.kill();
        let mut full = self.args.clone();
        full.push("--port".into());
        full.push(self.port.to_string());
        let deadline = Instant::now() + DEADLINE;
        loop {
            match Mock::start(&full) {
                Ok((child, addr, log)) => {
                    assert_eq!(addr.port(), self.port, "restarted mock on another port");
                    self.child = Some(child);
                    self.log = log;
                    return;
                }
                Err(e) if Instant::now() >= deadline => {
                    panic!("could not restart the mock on port {}: {e}", self.port)
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `GET /stats` straight from the mock.
    pub fn stats(&self) -> Value {
        let mut c = Conn::open_addr(self.socket_addr(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to the mock at {}: {e}", self.addr()));
        let r = c
            .request("GET", "/stats", &[("Connection", "close")], None)
            .unwrap_or_else(|e| panic!("GET {}/stats: {e}", self.url()));
        assert_eq!(r.status, 200, "mock /stats: {}", r.text());
        r.json()
    }

    /// The mock's `requests` counter (health checks and control endpoints excluded).
    pub fn requests(&self) -> u64 {
        self.stats()["requests"].as_u64().expect("requests")
    }

    /// The mock's `health_checks` counter.
    pub fn health_checks(&self) -> u64 {
        self.stats()["health_checks"]
            .as_u64()
            .expect("health_checks")
    }

    /// The mock's `in_flight` gauge.
    pub fn in_flight(&self) -> u64 {
        self.stats()["in_flight"].as_u64().expect("in_flight")
    }
}

fn strip_port(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--port" {
            i += 2;
            continue;
        }
        if args[i].starts_with("--port=") {
            i += 1;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let text = self.log.text();
            if !text.is_empty() {
                eprintln!(
                    "----- mock-backend (port {}) stderr -----\n{text}\n-----",
                    self.port
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Scripted raw backend
// ---------------------------------------------------------------------------

/// What a [`FakeBackend`] does with one request.
pub enum FakeReply {
    /// Write these bytes (a whole raw HTTP response), then close.
    Raw(Vec<u8>),
    /// Close the connection without a word.
    Close,
}

impl FakeReply {
    /// A complete response with a JSON body and `Connection: close`.
    pub fn json(status: u16, extra_headers: &[(&str, &str)], body: &str) -> FakeReply {
        let mut r = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in extra_headers {
            r.push_str(&format!("{k}: {v}\r\n"));
        }
        r.push_str("\r\n");
        r.push_str(body);
        FakeReply::Raw(r.into_bytes())
    }
}

/// A minimal in-process backend for cases the mock cannot produce (resets,
/// odd statuses): each connection's request head (and up to 64 KiB after
/// it) is handed to a handler, whose [`FakeReply`] is sent before the
/// connection is closed. Stops when dropped.
pub struct FakeBackend {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeBackend {
    /// Start it; `handler` gets the raw bytes read (at least the head).
    pub fn spawn(handler: impl Fn(&[u8]) -> FakeReply + Send + Sync + 'static) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let handler = Arc::new(handler);
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let handler = handler.clone();
                        thread::spawn(move || {
                            let _ = serve_fake(s, &*handler);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeBackend {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn serve_fake(mut s: TcpStream, handler: &dyn Fn(&[u8]) -> FakeReply) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    match handler(&buf) {
        FakeReply::Raw(bytes) => {
            s.write_all(&bytes)?;
            let _ = s.shutdown(Shutdown::Write);
            // Let the peer read it all before the socket goes away.
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            while s.read(&mut chunk).map(|n| n > 0).unwrap_or(false) {}
        }
        FakeReply::Close => {}
    }
    Ok(())
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------

/// A complete HTTP response.
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    /// Header names as sent (compare case-insensitively: see [`Resp::header`]).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response (status {}) is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// The port of the mock that answered: the `x-backend-port` header, else
    /// the body's `backend_port`.
    pub fn backend_port(&self) -> Option<u16> {
        if let Some(p) = self
            .header("x-backend-port")
            .and_then(|v| v.trim().parse().ok())
        {
            return Some(p);
        }
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v["backend_port"].as_u64().map(|p| p as u16)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Assert that `r` is an OpenAI-style error `{"error":{"message","type","code"}}`
/// with status `status`; returns the `error` object.
pub fn assert_error_json(r: &Resp, status: u16) -> Value {
    assert_eq!(r.status, status, "unexpected status; body: {}", r.text());
    let v = r.json();
    let e = v
        .get("error")
        .unwrap_or_else(|| panic!("no \"error\" object in {v}"))
        .clone();
    assert!(e["message"].is_string(), "error.message missing in {v}");
    assert!(e["type"].is_string(), "error.type missing in {v}");
    assert!(e.get("code").is_some(), "error.code missing in {v}");
    e
}

/// A response head.
#[derive(Clone, Debug)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    body: BodyKind,
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

#[derive(Clone, Copy, Debug)]
enum BodyKind {
    None,
    Length(u64),
    Chunked,
    Eof,
}

/// One client connection (keep-alive capable).
pub struct Conn {
    r: BufReader<TcpStream>,
    /// The `Host` sent unless a request gives its own: the address connected to.
    host: String,
}

impl Conn {
    /// A client connection over an already connected socket.
    pub fn from_stream(s: TcpStream) -> Conn {
        let host = s
            .peer_addr()
            .map_or_else(|_| "127.0.0.1".to_string(), |a| a.to_string());
        Conn {
            r: BufReader::with_capacity(64 * 1024, s),
            host,
        }
    }

    /// Connect to `127.0.0.1:port`.
    pub fn open(port: u16) -> io::Result<Conn> {
        Conn::open_timeout(port, Duration::from_secs(10))
    }

    /// Connect to `127.0.0.1:port` with a connect timeout.
    pub fn open_timeout(port: u16, timeout: Duration) -> io::Result<Conn> {
        Conn::open_addr(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), timeout)
    }

    /// Connect to `addr` with a connect timeout.
    pub fn open_addr(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn {
            r: BufReader::with_capacity(64 * 1024, s),
            host: addr.to_string(),
        })
    }

    /// Set the read and write timeouts of the socket.
    pub fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        self.r.get_ref().set_read_timeout(Some(t))?;
        self.r.get_ref().set_write_timeout(Some(t))
    }

    /// The socket.
    pub fn stream(&self) -> &TcpStream {
        self.r.get_ref()
    }

    /// Shut the socket down both ways (the peer sees EOF / a reset).
    pub fn close(self) {
        let _ = self.r.get_ref().shutdown(Shutdown::Both);
    }

    /// Write raw bytes.
    pub fn write_raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.r.get_mut().write_all(data)
    }

    /// Write a request head. `Host` is added unless given; `Content-Length`
    /// is added when `content_length` is `Some`.
    pub fn send_head(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        content_length: Option<u64>,
    ) -> io::Result<()> {
        let mut h = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            h.push_str(&format!("Host: {}\r\n", self.host));
        }
        for (k, v) in headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(n) = content_length {
            h.push_str(&format!("Content-Length: {n}\r\n"));
        }
        h.push_str("\r\n");
        self.write_raw(h.as_bytes())
    }

    /// Read a response head (skipping `100 Continue`-like interim responses,
    /// but not `101`).
    pub fn read_head(&mut self, method: &str) -> io::Result<Head> {
        loop {
            let status_line = read_line(&mut self.r)?;
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or("");
            if !version.starts_with("HTTP/1.") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                ));
            }
            let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                )
            })?;
            let mut headers = Vec::new();
            loop {
                let l = read_line(&mut self.r)?;
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("bad header {l:?}"))
                })?;
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let te_chunked = find_header(&headers, "transfer-encoding")
                .map(|v| v.to_ascii_lowercase().contains("chunked"))
                .unwrap_or(false);
            let body = if method.eq_ignore_ascii_case("HEAD")
                || (100..200).contains(&status)
                || status == 204
                || status == 304
            {
                BodyKind::None
            } else if te_chunked {
                BodyKind::Chunked
            } else if let Some(n) = find_header(&headers, "content-length") {
                BodyKind::Length(n.trim().parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad content-length")
                })?)
            } else {
                BodyKind::Eof
            };
            return Ok(Head {
                status,
                headers,
                body,
            });
        }
    }

    /// A reader of the body that follows `head`.
    pub fn body<'a>(&'a mut self, head: &Head) -> Body<'a> {
        Body {
            r: &mut self.r,
            kind: head.body,
            chunk_left: 0,
            need_crlf: false,
            done: false,
        }
    }

    /// Send a request (with `Content-Length` when `body` is `Some`) and read
    /// the whole response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<Resp> {
        self.send_head(method, path, headers, body.map(|b| b.len() as u64))?;
        if let Some(b) = body {
            self.write_raw(b)?;
        }
        self.read_response(method)
    }

    /// Read a whole response.
    pub fn read_response(&mut self, method: &str) -> io::Result<Resp> {
        let head = self.read_head(method)?;
        let mut body = Vec::new();
        self.body(&head).read_to_end(&mut body)?;
        Ok(Resp {
            status: head.status,
            headers: head.headers,
            body,
        })
    }
}

/// A response body reader (handles `Content-Length`, chunked and
/// read-until-EOF bodies).
pub struct Body<'a> {
    r: &'a mut BufReader<TcpStream>,
    kind: BodyKind,
    chunk_left: u64,
    need_crlf: bool,
    done: bool,
}

impl Body<'_> {
    /// Read the next line of the body (without its `\n`); `None` at the end.
    pub fn read_line(&mut self) -> io::Result<Option<String>> {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match self.read(&mut b)? {
                0 if line.is_empty() => return Ok(None),
                0 => break,
                _ => {
                    if b[0] == b'\n' {
                        break;
                    }
                    line.push(b[0]);
                }
            }
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(Some(String::from_utf8_lossy(&line).into_owned()))
    }
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.done {
            return Ok(0);
        }
        match &mut self.kind {
            BodyKind::None => Ok(0),
            BodyKind::Eof => self.r.read(buf),
            BodyKind::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let max = (*left).min(buf.len() as u64) as usize;
                let n = self.r.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("body ended with {left} bytes missing"),
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            BodyKind::Chunked => {
                if self.chunk_left == 0 {
                    if self.need_crlf {
                        let l = read_line(self.r)?;
                        if !l.is_empty() {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("no CRLF after chunk: {l:?}"),
                            ));
                        }
                        self.need_crlf = false;
                    }
                    let size_line = read_line(self.r)?;
                    let hex = size_line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(hex, 16).map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("bad chunk size line {size_line:?}"),
                        )
                    })?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        while !read_line(self.r)?.is_empty() {}
                        self.done = true;
                        return Ok(0);
                    }
                    self.chunk_left = size;
                }
                let max = self.chunk_left.min(buf.len() as u64) as usize;
                let n = self.r.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a chunk",
                    ));
                }
                self.chunk_left -= n as u64;
                if self.chunk_left == 0 {
                    self.need_crlf = true;
                }
                Ok(n)
            }
        }
    }
}

fn read_line(r: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line)?;
    if n == 0 || line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the end of a line",
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// One request on a fresh connection (`Connection: close` is added).
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<Resp> {
    let mut c = Conn::open(port)?;
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    if !h.iter().any(|(k, _)| k.eq_ignore_ascii_case("connection")) {
        h.push(("Connection", "close"));
    }
    c.request(method, path, &h, body)
}

/// `GET path` on a fresh connection; panics on transport errors.
pub fn get(port: u16, path: &str) -> Resp {
    request(port, "GET", path, &[], None)
        .unwrap_or_else(|e| panic!("GET 127.0.0.1:{port}{path}: {e}"))
}

/// `POST path` with a JSON body on a fresh connection; panics on transport errors.
pub fn post_json(port: u16, path: &str, body: &Value) -> Resp {
    let b = serde_json::to_vec(body).unwrap();
    request(
        port,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        Some(&b),
    )
    .unwrap_or_else(|e| panic!("POST 127.0.0.1:{port}{path}: {e}"))
}

/// `POST /v1/completions` with a small prompt on a fresh connection.
pub fn try_completion(port: u16) -> io::Result<Resp> {
    let b = serde_json::to_vec(&json!({"model": "m", "prompt": "hello", "max_tokens": 4})).unwrap();
    request(
        port,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        Some(&b),
    )
}

// ---------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------

/// FNV-1a 64, as the mock's `/upload` computes it.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(pub u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.0;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    /// 16 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Run `n` closures on their own threads, released together by a barrier;
/// returns their results in order.
pub fn run_concurrently<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let f = f.clone();
            let barrier = barrier.clone();
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    barrier.wait();
                    f(i)
                })
                .expect("spawn thread")
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("worker thread panicked"))
        .collect()
}

// ---------------------------------------------------------------------------
// Which build
// ---------------------------------------------------------------------------

/// The runtime the `lb` under test was built with, from `lb --version`
/// (`lb 0.1.0 (tokio)` -> `"tokio"`, `lb 0.1.0 (smol)` -> `"smol"`).
pub fn lb_build() -> &'static str {
    static BUILD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILD.get_or_init(|| {
        let out = run_lb(&["--version"], Duration::from_secs(10));
        let text = out.stdout.trim();
        text.rsplit_once('(')
            .and_then(|(_, rest)| rest.strip_suffix(')'))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("lb --version printed {text:?}, expected `... (build)`"))
    })
}

/// Whether the `lb` under test is the `build` build (`"tokio"` or `"smol"`).
pub fn build_is(build: &str) -> bool {
    lb_build() == build
}

// ---------------------------------------------------------------------------
// Prometheus text, parsed (for assertions; the real parser check is promtool's)

/// One sample of a scrape: name, labels (sorted), value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// The samples of a `/metrics` scrape.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Every sample.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses Prometheus text (0.0.4): comment lines skipped, one sample per line.
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match head.split_once('{') {
                None => (head.to_string(), Vec::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    let mut labels = Vec::new();
                    let mut rest = body;
                    while !rest.is_empty() {
                        let (k, v) = rest.split_once("=\"").expect("label=\"value\"");
                        let mut value = String::new();
                        let mut chars = v.char_indices();
                        let mut end = v.len();
                        while let Some((i, c)) = chars.next() {
                            match c {
                                '\\' => {
                                    if let Some((_, e)) = chars.next() {
                                        value.push(if e == 'n' { '\n' } else { e });
                                    }
                                }
                                '"' => {
                                    end = i + 1;
                                    break;
                                }
                                c => value.push(c),
                            }
                        }
                        labels.push((k.trim_start_matches(',').to_string(), value));
                        rest = v[end..].trim_start_matches(',');
                    }
                    labels.sort();
                    (name.to_string(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        Metrics { samples }
    }

    /// The value of the sample `name` whose labels include every one of `labels`
    /// (summed over the samples that match).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }
}

#[cfg(test)]
mod metrics_parse_tests {
    use super::Metrics;

    #[test]
    fn labels_and_values() {
        let m = Metrics::parse(
            "# HELP x y\nh_bucket{backend=\"http://a:1\",le=\"0.5\"} 1\nh_bucket{backend=\"http://a:1\",le=\"+Inf\"} 3\nc_total{k=\"a\\\"b\"} 2.5\n",
        );
        assert_eq!(
            m.value("h_bucket", &[("backend", "http://a:1"), ("le", "+Inf")]),
            3.0
        );
        assert_eq!(m.value("h_bucket", &[("le", "0.5")]), 1.0);
        assert_eq!(m.value("c_total", &[("k", "a\"b")]), 2.5);
    }
}
