//! An `https://` backend for the black-box tests: Python's `http.server` behind its `ssl`
//! module, with a leaf certificate (for `localhost`, `127.0.0.1` and the names asked)
//! signed by a CA made here with the `openssl` command. It answers every `GET` and `POST`
//! with JSON naming what it saw: the path, the `Host` header, the TLS server name (SNI)
//! and the request body's length. [`TlsBackend::start`] is `None`, saying why, where
//! `openssl` or `python3` is missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const SERVER: &str = r#"
import http.server, json, socketserver, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self, n):
        body = json.dumps({"path": self.path, "host": self.headers.get("Host"),
                           "sni": getattr(self.connection, "lb_sni", None), "body": n}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.answer(0)
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.answer(len(self.rfile.read(n)))
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
def sni(sock, name, c):
    sock.lb_sni = name
ctx.sni_callback = sni
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    def get_request(self):
        s, a = self.socket.accept()
        return ctx.wrap_socket(s, server_side=True, do_handshake_on_connect=False), a
    def handle_error(self, request, client_address):
        pass
srv = S(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// Whether the `lb` under test takes `https://` backends (the smol build without TLS
/// refuses them at start, naming TLS); says so when it does not.
pub fn build_has_tls() -> bool {
    let out = crate::run_lb(
        &["--check", "--backends", "https://localhost:1"],
        std::time::Duration::from_secs(10),
    );
    let refused = !out.status.success() && out.stderr.to_lowercase().contains("tls");
    if refused {
        eprintln!(
            "SKIP: this build has no TLS to backends: {}",
            out.stderr.trim()
        );
    }
    !refused
}

/// The HTTPS backend, killed (and its files removed) on drop.
pub struct TlsBackend {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TlsBackend {
    /// Starts one whose certificate also names `names` (DNS names).
    pub fn start(names: &[&str]) -> Option<TlsBackend> {
        for cmd in ["openssl", "python3"] {
            if !have(cmd) {
                eprintln!("SKIP: `{cmd}` is not installed: the https:// backend cases need it");
                return None;
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "lb-tls-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
        ca.extend(["-subj", "/CN=lb test CA"]);
        openssl(&dir, &ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=lb test",
        ]);
        openssl(&dir, &csr);
        let mut san = String::from("subjectAltName=DNS:localhost,IP:127.0.0.1");
        for n in names {
            san.push_str(&format!(",DNS:{n}"));
        }
        let ext = format!(
            "{san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        );
        std::fs::write(dir.join("leaf.ext"), ext).unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "leaf.pem",
                "-days",
                "2",
                "-extfile",
                "leaf.ext",
            ],
        );
        let mut child = Command::new("python3")
            .args(["-c", SERVER, "leaf.pem", "leaf.key"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the TLS backend's port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("TLS backend printed {line:?}, not its port"));
        Some(TlsBackend { child, port, dir })
    }

    /// The CA that signed its certificate (for `--backend-ca`).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `https://HOST:PORT`.
    pub fn url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.port)
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
