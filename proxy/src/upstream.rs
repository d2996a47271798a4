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
}

impl<R: Runtime> Upstream<R> {
    pub(crate) fn new(id: BackendId, target: Target, idle: IdleLimit, ext: R::Backend) -> Self {
        Upstream {
            id,
            target,
            idle,
            ext,
        }
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
