//! Network namespaces for the fault-injection suite (`tests/tests/faults`): `lb` in one
//! namespace, each backend host in its own, one veth pair per backend link, and faults put
//! on a link with nftables inside the backend's namespace.
//!
//! ```text
//!   namespace lbf-<pid>-<n>-lb                      namespace lbf-<pid>-<n>-b<i>
//!   ┌──────────────────────────────┐                ┌──────────────────────────┐
//!   │ test client ─▶ 127.0.0.1:P   │                │                          │
//!   │                lb            │ to-b<i>  to-lb │ backends on 10.77.<i>.2  │
//!   │ 10.77.<i>.1/24 ──────────────┼────────────────┼── 10.77.<i>.2/24         │
//!   └──────────────────────────────┘   veth pair    │ nft table inet lbfault   │
//!                                                   └──────────────────────────┘
//! ```
//!
//! Every address used is one this module assigns inside namespaces it created: nothing
//! here is reachable from, or reaches, the machine's own network. Processes and sockets
//! join a namespace the way `ip netns exec` does, through `setns(2)`: [`Netns::enter`]
//! moves the calling thread (a test keeps its thread in `lb`'s namespace, so the
//! harness's client helpers, which talk to `127.0.0.1`, reach `lb` over that namespace's
//! loopback, and every process the thread starts, `lb` included, starts there);
//! [`Netns::run`] runs a closure on a fresh thread inside a namespace (a backend's
//! listening socket, its threads and the processes it starts stay there).
//!
//! Cleanup: dropping a [`Netns`] deletes it (`ip netns del`; its veth ends go with it),
//! also when a test panics; a namespace left behind by a test process that was killed
//! (its name carries the pid) is deleted by the next run's [`unavailable`].

use std::fs::File;
use std::io::{self, Write as _};
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread;

/// Every namespace made here is named `lbf-<pid>-<n>-<role>`.
const PREFIX: &str = "lbf-";

/// The nftables table that holds a link's faults, in the backend's namespace.
const TABLE: &str = "lbfault";

/// The name of a backend link's end in the backend's namespace.
const BACKEND_LINK: &str = "to-lb";

/// Why these tests cannot make namespaces here, or `None` when they can: they need root,
/// `ip` (iproute2) and a kernel that lets `ip netns add` work. Checked once per process;
/// the first call also deletes namespaces left behind by killed runs.
pub fn unavailable() -> Option<&'static str> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root: network namespaces need root".into());
        }
        if let Err(e) = ip(&["-V"]) {
            return Some(format!("`ip` (iproute2) does not run: {e}"));
        }
        sweep_stale();
        let probe = format!("{PREFIX}{}-probe", std::process::id());
        match Netns::add(probe) {
            Ok(ns) => match ns.run(|| std::net::TcpListener::bind("127.0.0.1:0")) {
                Ok(_) => None,
                Err(e) => Some(format!("cannot use a new namespace's loopback: {e}")),
            },
            Err(e) => Some(format!("`ip netns add` fails: {e}")),
        }
    })
    .as_deref()
}

/// Why faults cannot be put on a link here (`nft` missing or refused inside a
/// namespace), or `None` when they can. Checked once per process.
pub fn nft_unavailable() -> Option<&'static str> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        if let Some(why) = unavailable() {
            return Some(why.to_string());
        }
        let ns = match Netns::add(format!("{PREFIX}{}-nftprobe", std::process::id())) {
            Ok(ns) => ns,
            Err(e) => return Some(format!("`ip netns add` fails: {e}")),
        };
        if Command::new("nft").arg("--version").output().is_err() {
            return Some("`nft` not found: install nftables (apt-get install nftables)".into());
        }
        match ns.try_nft(&format!(
            "table inet {TABLE} {{\n chain input {{\n type filter hook input priority 0; \
             policy accept;\n numgen random mod 100 < 5 drop\n }}\n}}\n"
        )) {
            Ok(()) => None,
            Err(e) => Some(format!("nftables does not work in a namespace: {e}")),
        }
    })
    .as_deref()
}

/// Run `ip` with `args`; its stderr on failure.
fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Delete the namespaces named by this module for a process that no longer runs.
fn sweep_stale() {
    let Ok(out) = ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// `setns(2)` the calling thread into the network namespace behind `file`.
fn setns(file: &File) -> io::Result<()> {
    // SAFETY: setns only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A network namespace made for one test; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add name`, with its loopback up.
    fn add(name: String) -> Result<Netns, String> {
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn file(&self) -> io::Result<File> {
        File::open(format!("/var/run/netns/{}", self.name))
    }

    /// Move the calling thread into this namespace until the guard drops (then it goes
    /// back where it was). Sockets and processes it makes meanwhile belong here.
    pub fn enter(&self) -> Entered {
        let back = File::open("/proc/thread-self/ns/net").expect("open /proc/thread-self/ns/net");
        let to = self
            .file()
            .unwrap_or_else(|e| panic!("open namespace {}: {e}", self.name));
        setns(&to).unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
        Entered {
            back,
            _thread_bound: PhantomData,
        }
    }

    /// Run `f` on a new thread inside this namespace and return what it returns. What `f`
    /// binds, connects or starts (threads and processes included) stays in the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let to = self
            .file()
            .unwrap_or_else(|e| panic!("open namespace {}: {e}", self.name));
        thread::scope(|s| {
            s.spawn(move || {
                setns(&to).expect("setns");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// `ip netns exec <name> program args..`: its output (not checked).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {program}: {e}", self.name))
    }

    /// Load an nftables ruleset (`nft -f -`) inside this namespace.
    fn try_nft(&self, ruleset: &str) -> Result<(), String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("ip netns exec {} nft: {e}", self.name))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(ruleset.as_bytes())
            .map_err(|e| format!("write the ruleset to nft: {e}"))?;
        let out = child
            .wait_with_output()
            .map_err(|e| format!("wait for nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft -f - in {}: {}\nruleset:\n{ruleset}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The calling thread's stay in a namespace ([`Netns::enter`]); dropping it moves the
/// thread back. Bound to its thread (not `Send`).
pub struct Entered {
    back: File,
    _thread_bound: PhantomData<*const ()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.back) {
            // A thread left in the wrong namespace would send the next test's traffic
            // who knows where: better to stop here.
            if !thread::panicking() {
                panic!("setns back to the original namespace: {e}");
            }
        }
    }
}

/// One backend host: its namespace and the veth link between it and `lb`'s namespace.
#[derive(Debug)]
pub struct Host {
    /// The host's namespace.
    pub ns: Netns,
    /// Its address on the link (`10.77.<i>.2`): backends listen here.
    pub ip: Ipv4Addr,
    /// `lb`'s address on the same link (`10.77.<i>.1`).
    pub lb_ip: Ipv4Addr,
}

impl Host {
    /// Its address as an [`IpAddr`].
    pub fn addr(&self) -> IpAddr {
        IpAddr::V4(self.ip)
    }

    /// Replace the link's faults with these rules (nftables statements, applied to the
    /// packets the host receives from `lb` and sends to it).
    fn faults(&self, inbound: &str, outbound: &str) {
        let ruleset = format!(
            "table inet {TABLE}\n\
             delete table inet {TABLE}\n\
             table inet {TABLE} {{\n\
             \x20 chain input {{ type filter hook input priority 0; policy accept;\n\
             \x20   iifname \"{BACKEND_LINK}\" {inbound}\n\
             \x20 }}\n\
             \x20 chain output {{ type filter hook output priority 0; policy accept;\n\
             \x20   oifname \"{BACKEND_LINK}\" {outbound}\n\
             \x20 }}\n\
             }}\n"
        );
        self.ns.try_nft(&ruleset).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Drop every SYN that `lb` sends to `port`: connecting there times out.
    /// Connections already made are untouched.
    pub fn black_hole_syns(&self, port: u16) {
        self.faults(
            &format!("tcp dport {port} tcp flags & (syn | ack) == syn drop"),
            "counter",
        );
    }

    /// Drop `percent` % of the packets on the link, each way, at random.
    pub fn lose(&self, percent: u32) {
        let rule = format!("numgen random mod 100 < {percent} drop");
        self.faults(&rule, &rule);
    }

    /// Drop every packet on the link, both ways: the host is cut off without a word (no
    /// reset, no FIN reaches either side).
    pub fn partition(&self) {
        self.faults("drop", "drop");
    }

    /// Take every fault off the link.
    pub fn heal(&self) {
        self.faults("counter", "counter");
    }
}

/// `lb`'s namespace and one namespace per backend host, linked by veth pairs; see the
/// module docs. Declare it before everything that runs inside it, so that it is dropped
/// (deleted) last.
#[derive(Debug)]
pub struct Topology {
    /// Backend hosts, `hosts[i]` on `10.77.<i+1>.0/24`.
    pub hosts: Vec<Host>,
    /// `lb`'s namespace (dropped after the hosts: fields drop in order).
    pub lb: Netns,
}

impl Topology {
    /// `lb`'s namespace and `hosts` backend hosts. Panics if namespaces cannot be made
    /// (check [`unavailable`] first).
    pub fn new(hosts: usize) -> Topology {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        assert!((1..=250).contains(&hosts), "1 to 250 hosts");
        if let Some(why) = unavailable() {
            panic!("network namespaces are not available: {why}");
        }
        let base = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let lb = Netns::add(format!("{base}-lb")).unwrap_or_else(|e| panic!("{e}"));
        let mut topo = Topology {
            hosts: Vec::new(),
            lb,
        };
        for i in 1..=hosts {
            let ns = Netns::add(format!("{base}-b{i}")).unwrap_or_else(|e| panic!("{e}"));
            let lb_link = format!("to-b{i}");
            let net = u8::try_from(i).expect("at most 250 hosts");
            let host = Host {
                ns,
                ip: Ipv4Addr::new(10, 77, net, 2),
                lb_ip: Ipv4Addr::new(10, 77, net, 1),
            };
            let run = |args: &[&str]| ip(args).unwrap_or_else(|e| panic!("{e}"));
            run(&[
                "link",
                "add",
                &lb_link,
                "netns",
                topo.lb.name(),
                "type",
                "veth",
                "peer",
                "name",
                BACKEND_LINK,
                "netns",
                host.ns.name(),
            ]);
            let lb_cidr = format!("{}/24", host.lb_ip);
            let host_cidr = format!("{}/24", host.ip);
            run(&[
                "-n",
                topo.lb.name(),
                "addr",
                "add",
                &lb_cidr,
                "dev",
                &lb_link,
            ]);
            run(&[
                "-n",
                host.ns.name(),
                "addr",
                "add",
                &host_cidr,
                "dev",
                BACKEND_LINK,
            ]);
            run(&["-n", topo.lb.name(), "link", "set", &lb_link, "up"]);
            run(&["-n", host.ns.name(), "link", "set", BACKEND_LINK, "up"]);
            topo.hosts.push(host);
        }
        topo
    }
}
