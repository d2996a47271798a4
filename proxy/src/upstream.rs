//! A backend as the proxy addresses it: its target, its pool idle limit, and what the
//! adapter keeps for it.

use std::sync::Arc;

use lb_core::BackendId;

use crate::runtime::Runtime;
use crate::settings::{IdleLimit, Target};

/// One backend in the pool, shared by every request to it while it is there.
pub struct Upstream<R: Runtime> {
    id: BackendId,
    /// Host, port, authority (the `Host` the backend sees), path prefix, TLS; its `url` is
    /// the name the log and the status lines use.
    pub target: Target,
    /// How long its connections may sit idle in a pool.
    pub idle: IdleLimit,
    /// The adapter's own per-backend data.
    pub ext: R::Backend,
    /// Its metrics.
    pub stats: Arc<crate::metrics::BackendStats>,
    /// Its id in the admin API (see [`crate::fleet`]).
    serial: u64,
    /// Where it came from.
    source: crate::fleet::Source,
    /// Its last probe and health transition, for the admin API.
    notes: std::sync::Mutex<crate::fleet::Notes>,
    /// Its engine load polls (see [`crate::load`]).
    load: std::sync::Mutex<crate::load::LoadPoll>,
    /// The models its `/v1/models` lists (`None`: no list, or an empty one).
    models: std::sync::Mutex<Option<Arc<[crate::models::Model]>>>,
}

impl<R: Runtime> Upstream<R> {
    pub(crate) fn new(
        id: BackendId,
        target: Target,
        idle: IdleLimit,
        ext: R::Backend,
        serial: u64,
        source: crate::fleet::Source,
    ) -> Self {
        Upstream {
            id,
            target,
            idle,
            ext,
            stats: Arc::default(),
            serial,
            source,
            notes: Default::default(),
            load: Default::default(),
            models: Default::default(),
        }
    }

    /// Its id in the admin API: stable for its life, never reused.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Where it came from.
    pub fn source(&self) -> crate::fleet::Source {
        self.source
    }

    /// Its last probe and health transition.
    pub fn notes(&self) -> crate::fleet::Notes {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Its engine load polls' state: the engine they found and the last result.
    pub fn load_polls(&self) -> crate::load::LoadPoll {
        self.load_poll(|p| p.clone())
    }

    pub(crate) fn load_poll<T>(&self, f: impl FnOnce(&mut crate::load::LoadPoll) -> T) -> T {
        f(&mut self.load.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn note(&self, f: impl FnOnce(&mut crate::fleet::Notes)) {
        f(&mut self.notes.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The models its `/v1/models` last listed (`None`: no list, or an empty one).
    pub fn models(&self) -> Option<Arc<[crate::models::Model]>> {
        self.models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets its models; whether they changed.
    pub(crate) fn set_models(&self, models: Option<Arc<[crate::models::Model]>>) -> bool {
        let mut cur = self.models.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == models {
            return false;
        }
        *cur = models;
        true
    }

    /// Its id in the core.
    pub fn id(&self) -> BackendId {
        self.id
    }

    /// Its URL, as the operator gave it (normalised).
    pub fn url(&self) -> &Arc<str> {
        &self.target.url
    }
}
