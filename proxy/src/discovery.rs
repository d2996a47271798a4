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

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_core::BackendSpec;

use crate::fleet::{FleetError, Origin, Source};
use crate::proxy::Proxy;
use crate::runtime::Runtime;
use crate::settings::{parse_backends_file, Notice};

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
                proxy.reconcile(&specs, file);
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

impl<R: Runtime> Proxy<R> {
    /// Brings the backends from `origin`'s source to `want`: adds the missing, drains and
    /// removes the vanished, sets changed weights. Backends from other sources are left
    /// alone (a URL already there from another source is not added twice).
    pub(crate) fn reconcile(&self, want: &[BackendSpec], origin: Origin) {
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
            match want.iter().find(|s| *s.url == **url) {
                None => {
                    let _ = self.drain_backend(*serial, true, origin);
                }
                Some(s) if s.weight != *weight => {
                    let _ = self.set_weight(*serial, s.weight, origin);
                }
                Some(_) => {}
            }
        }
        for spec in want {
            if have.iter().any(|(_, url, _)| **url == *spec.url) {
                continue;
            }
            match self.add_backend(spec.clone(), false, origin) {
                // Still draining from an earlier removal, or from another source: the
                // next poll tries again.
                Ok(_) | Err(FleetError::Duplicate(_)) => {}
                Err(e) => self.notify(Notice::DiscoveryError {
                    source: origin.source,
                    error: format!("{}: {e:?}", spec.url),
                }),
            }
        }
    }
}
