//! `--backends-file`: backends listed in a file, one per line in `--backends` syntax
//! (`#` comments), read at start and polled every second afterwards (a change applies
//! within a second; a `SIGHUP` needs nothing more). Each poll brings the pool's
//! file-sourced backends to what the file lists: new ones are added (probed before they
//! take traffic while a probed backend has room), vanished ones drained and removed,
//! changed weights set. An unreadable or invalid file, or one listing no backend, keeps
//! the current set; the error is logged once, with its line.
//!
//! The file is small and read with a blocking read on the control task: a local file
//! read is microseconds.
//!
//! `--discover dns://NAME:PORT`: each address NAME resolves to (A and AAAA) is a backend
//! `http://ADDR:PORT` (`https://` for `dns+https://`) sent `Host: NAME[:PORT]`, and over
//! TLS checked as NAME ([`Target::discovered`]). One thread of its own follows every name
//! (lookups block: [`crate::dns`]), the same in both builds: each name is looked up at
//! start, then every `--discover-interval`, or when its records' TTL runs out if that is
//! sooner (never more than once a second). After each round the pool's DNS-sourced
//! backends are brought to the union of every name's addresses, as for the file: new
//! ones probed before they take traffic, vanished ones drained and removed. A lookup that
//! fails or finds nothing keeps that name's last good addresses; it is logged once, and
//! again only after the name has resolved in between.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_listener::Listener;
use lb_core::BackendSpec;

use crate::dns::Found;
use crate::fleet::{FleetError, Origin, Source};
use crate::proxy::Proxy;
use crate::runtime::Runtime;
use crate::settings::{parse_backends_file, Discover, Notice, Target, MIN_DISCOVER_INTERVAL};

/// How often the file is read.
pub const POLL: Duration = Duration::from_secs(1);

/// Reads and parses the file: the error names the path (and the line).
pub fn read_backends_file(path: &Path, max_conns: u32) -> Result<Vec<BackendSpec>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_backends_file(&text, max_conns).map_err(|e| format!("{}: {e}", path.display()))
}

/// Polls `--backends-file` until shutdown. Spawned by [`crate::drive`].
pub(crate) async fn watch_file<R: Runtime>(proxy: Arc<Proxy<R>>) {
    let Some(path) = proxy.settings().backends_file.clone() else {
        return;
    };
    let file = Origin {
        source: Source::File,
        client: None,
    };
    let mut told: Option<String> = None;
    loop {
        let tick = proxy.runtime().sleep_until(Instant::now() + POLL);
        crate::driver::either(tick, proxy.shutdown_begun()).await;
        if proxy.is_shutting_down() {
            return;
        }
        match read_backends_file(&path, proxy.settings().max_conns) {
            Ok(specs) => {
                told = None;
                let want = specs
                    .into_iter()
                    .filter_map(|s| Some((Target::parse(&s.url).ok()?, s)))
                    .map(|(t, s)| (s, t))
                    .collect::<Vec<_>>();
                proxy.reconcile(&want, file);
            }
            Err(error) => {
                if told.as_ref() != Some(&error) {
                    told = Some(error.clone());
                    proxy.notify(Notice::DiscoveryError {
                        source: Source::File,
                        error,
                    });
                }
            }
        }
    }
}

/// Starts following the `--discover` names, if any, on a thread of its own (until
/// shutdown). Called by [`crate::drive`].
pub(crate) fn start_dns<R: Runtime>(proxy: &Arc<Proxy<R>>) {
    if proxy.settings().discover.is_empty() {
        return;
    }
    let p = proxy.clone();
    let spawned = std::thread::Builder::new()
        .name("lb-discover".into())
        .stack_size(256 * 1024)
        .spawn(move || watch_dns(p));
    if let Err(e) = spawned {
        proxy.notify(Notice::DiscoveryError {
            source: Source::Dns,
            error: format!("cannot start the discovery thread: {e}"),
        });
    }
}

/// The discovery thread: rounds of lookups until shutdown.
fn watch_dns<R: Runtime>(proxy: Arc<Proxy<R>>) {
    let settings = proxy.settings();
    let server = settings.resolver;
    let mut names = Names::new(
        &settings.discover,
        settings.discover_interval,
        Instant::now(),
    );
    loop {
        let next = names.round(&proxy, Instant::now(), |name| {
            crate::dns::lookup(name, server)
        });
        let stop = proxy.stopping.listen();
        if proxy.is_shutting_down() {
            return;
        }
        stop.wait_deadline(next);
        if proxy.is_shutting_down() {
            return;
        }
    }
}

/// The `--discover` names and what is known of each.
pub(crate) struct Names {
    names: Vec<Name>,
    interval: Duration,
}

struct Name {
    discover: Discover,
    /// The addresses of the last lookup that found some.
    good: Option<Vec<IpAddr>>,
    /// When to look it up next.
    due: Instant,
    /// Whether its failure has been logged (until it resolves again).
    told: bool,
}

impl Names {
    pub(crate) fn new(discover: &[Discover], interval: Duration, now: Instant) -> Names {
        Names {
            names: discover
                .iter()
                .map(|d| Name {
                    discover: d.clone(),
                    good: None,
                    due: now,
                    told: false,
                })
                .collect(),
            interval,
        }
    }

    /// Looks up every name due at `now` (with `lookup`), then brings the pool's DNS
    /// backends to what every name resolves to (the last good answer of each). Returns
    /// when the next name is due.
    pub(crate) fn round<R: Runtime>(
        &mut self,
        proxy: &Proxy<R>,
        now: Instant,
        mut lookup: impl FnMut(&str) -> Result<Found, String>,
    ) -> Instant {
        let mut looked = false;
        for n in self.names.iter_mut().filter(|n| n.due <= now) {
            looked = true;
            let wait = match lookup(&n.discover.name) {
                Ok(found) => {
                    n.good = Some(found.addrs);
                    n.told = false;
                    found.ttl.map_or(self.interval, |t| t.min(self.interval))
                }
                Err(error) => {
                    if !n.told {
                        n.told = true;
                        let kept = n.good.as_ref().map_or(0, Vec::len);
                        proxy.notify(Notice::DiscoveryError {
                            source: Source::Dns,
                            error: format!(
                                "{}: cannot resolve {}: {error} ({kept} addresses kept; said once until it resolves again)",
                                n.discover, n.discover.name
                            ),
                        });
                    }
                    self.interval
                }
            };
            n.due = now + wait.max(MIN_DISCOVER_INTERVAL);
        }
        if looked {
            let max_conns = proxy.settings().max_conns;
            let mut want: Vec<(BackendSpec, Target)> = Vec::new();
            for n in &self.names {
                for ip in n.good.iter().flatten() {
                    let target = n.discover.target(*ip);
                    if want.iter().any(|(_, t)| t.url == target.url) {
                        continue;
                    }
                    let spec = BackendSpec {
                        url: target.url.to_string(),
                        weight: 1,
                        max_conns,
                    };
                    want.push((spec, target));
                }
            }
            // Before any name has resolved there is nothing to bring the pool to.
            if self.names.iter().any(|n| n.good.is_some()) {
                proxy.reconcile(
                    &want,
                    Origin {
                        source: Source::Dns,
                        client: None,
                    },
                );
            }
        }
        self.names
            .iter()
            .map(|n| n.due)
            .min()
            .unwrap_or(now + self.interval)
    }
}

impl<R: Runtime> Proxy<R> {
    /// Brings the backends from `origin`'s source to `want`: adds the missing, drains and
    /// removes the vanished, sets changed weights. Backends from other sources are left
    /// alone (a URL already there from another source is not added twice).
    pub(crate) fn reconcile(&self, want: &[(BackendSpec, Target)], origin: Origin) {
        let have: Vec<(u64, Arc<str>, u32)> = {
            let core = self.lock();
            core.upstreams()
                .filter(|u| u.source() == origin.source)
                .filter_map(|u| {
                    let v = core.balancer.backend(u.id())?;
                    (!v.draining).then(|| (u.serial(), u.url().clone(), v.weight))
                })
                .collect()
        };
        for (serial, url, weight) in &have {
            match want.iter().find(|(_, t)| t.url == *url) {
                None => {
                    let _ = self.drain_backend(*serial, true, origin);
                }
                Some((s, _)) if s.weight != *weight => {
                    let _ = self.set_weight(*serial, s.weight, origin);
                }
                Some(_) => {}
            }
        }
        for (spec, target) in want {
            if have.iter().any(|(_, url, _)| *url == target.url) {
                continue;
            }
            match self.add_target(spec.clone(), target.clone(), false, origin) {
                // Still draining from an earlier removal, or from another source: the
                // next poll tries again.
                Ok(_) | Err(FleetError::Duplicate(_)) => {}
                Err(e) => self.notify(Notice::DiscoveryError {
                    source: origin.source,
                    error: format!("{}: {e:?}", target.url),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Change;
    use crate::settings::Settings;
    use std::sync::Mutex;

    use crate::runtime::Still;

    type Log = Arc<Mutex<Vec<Notice>>>;

    fn proxy(discover: &[&str]) -> (Arc<Proxy<Still>>, Log) {
        let settings = Settings {
            discover: discover
                .iter()
                .map(|d| Discover::parse(d).unwrap())
                .collect(),
            ..Settings::new("127.0.0.1:0".parse().unwrap(), Vec::new())
        };
        let log: Log = Arc::default();
        let sink = log.clone();
        let p = Proxy::new(
            settings,
            Arc::new(move |n| sink.lock().unwrap().push(n)),
            Still,
            Instant::now(),
        )
        .unwrap();
        (p, log)
    }

    /// The DNS backends not leaving: (URL, Host, TLS name).
    fn pool(p: &Proxy<Still>) -> Vec<(String, String, String)> {
        let core = p.lock();
        let mut v: Vec<_> = core
            .upstreams()
            .filter(|u| u.source() == Source::Dns)
            .filter(|u| core.balancer.backend(u.id()).is_some_and(|b| !b.draining))
            .map(|u| {
                let t = &u.target;
                (t.url.to_string(), t.authority.clone(), t.tls_name.clone())
            })
            .collect();
        v.sort();
        v
    }

    fn found(ips: &[&str], ttl: Option<u64>) -> Result<Found, String> {
        Ok(Found {
            addrs: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ttl: ttl.map(Duration::from_secs),
        })
    }

    fn errors(log: &Log) -> usize {
        let log = log.lock().unwrap();
        log.iter()
            .filter(|n| {
                matches!(
                    n,
                    Notice::DiscoveryError {
                        source: Source::Dns,
                        ..
                    }
                )
            })
            .count()
    }

    #[test]
    fn rounds_follow_each_name_and_keep_the_last_good_answer() {
        let (p, log) = proxy(&["dns://vllm.test:8000", "dns+https://api.test"]);
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let mut names = Names::new(&p.settings().discover, s(5), t0);
        let next = names.round(&p, t0, |name| match name {
            "vllm.test" => found(&["10.0.0.1", "fd00::2"], Some(30)),
            _ => found(&["10.0.0.9"], Some(0)),
        });
        // The default interval, or the TTL when shorter, but never under a second.
        assert_eq!(next, t0 + s(1));
        let want = |list: &[(&str, &str, &str)]| {
            list.iter()
                .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            pool(&p),
            want(&[
                ("http://10.0.0.1:8000", "vllm.test:8000", "vllm.test"),
                ("http://[fd00::2]:8000", "vllm.test:8000", "vllm.test"),
                ("https://10.0.0.9", "api.test", "api.test"),
            ])
        );

        // Only a name that is due is looked up.
        let t1 = t0 + s(1);
        let next = names.round(&p, t1, |name| {
            assert_eq!(name, "api.test");
            Err("timed out".into())
        });
        assert_eq!(next, t0 + s(5));
        assert_eq!(errors(&log), 1);
        // Failing again says nothing more, and keeps the set.
        names.round(&p, t0 + s(5), |name| match name {
            "vllm.test" => found(&["10.0.0.1"], None),
            _ => Err("still down".into()),
        });
        assert_eq!(errors(&log), 1);
        assert_eq!(
            pool(&p),
            want(&[
                ("http://10.0.0.1:8000", "vllm.test:8000", "vllm.test"),
                ("https://10.0.0.9", "api.test", "api.test"),
            ])
        );
        // It resolves (to another address), then fails once more: said again (and for
        // the other name, failing for the first time).
        names.round(&p, t0 + s(10), |name| match name {
            "vllm.test" => found(&["10.0.0.1"], None),
            _ => found(&["10.0.0.8"], None),
        });
        names.round(&p, t0 + s(15), |_| Err("down".into()));
        assert_eq!(errors(&log), 3);
        assert_eq!(
            pool(&p),
            want(&[
                ("http://10.0.0.1:8000", "vllm.test:8000", "vllm.test"),
                ("https://10.0.0.8", "api.test", "api.test"),
            ])
        );

        // Every change was logged with its source.
        let log = log.lock().unwrap();
        let changes: Vec<(Change, Source)> = log
            .iter()
            .filter_map(|n| match n {
                Notice::BackendChange { change, source, .. } => Some((*change, *source)),
                _ => None,
            })
            .collect();
        assert_eq!(
            changes
                .iter()
                .filter(|c| **c == (Change::Added, Source::Dns))
                .count(),
            4
        );
        assert_eq!(
            changes
                .iter()
                .filter(|c| **c == (Change::Removed, Source::Dns))
                .count(),
            2
        );
    }

    #[test]
    fn other_sources_are_left_alone_and_nothing_is_added_twice() {
        let (p, _log) = proxy(&["dns://a.test:80", "dns://b.test:80"]);
        let api = Origin {
            source: Source::Api,
            client: None,
        };
        let spec = |url: &str| BackendSpec {
            url: url.into(),
            weight: 1,
            max_conns: 0,
        };
        p.add_backend(spec("http://10.0.0.7"), true, api).unwrap();
        let t0 = Instant::now();
        let mut names = Names::new(&p.settings().discover, Duration::from_secs(5), t0);
        // Two names, one address: one backend. The address the API added stays the API's.
        names.round(&p, t0, |_| found(&["10.0.0.1", "10.0.0.7"], None));
        let urls: Vec<String> = pool(&p).into_iter().map(|b| b.0).collect();
        assert_eq!(urls, ["http://10.0.0.1"]);
        // Nothing resolves any more: nothing leaves.
        names.round(&p, t0 + Duration::from_secs(5), |_| Err("gone".into()));
        assert_eq!(pool(&p).len(), 1);
        assert!(p.backend_serial("http://10.0.0.7").is_some());
    }
}
