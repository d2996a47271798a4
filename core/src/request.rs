//! What the adapter tells the core about one request, for the policy to route by.

use std::net::IpAddr;

use crate::affinity::RequestKey;
use crate::hash::hash_bytes;

/// What a policy may use to choose a backend for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestMeta<'a> {
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// An affinity key (a header's value, the OpenAI `user` field, ...). Hashing policies
    /// use it instead of the client's address when present.
    pub key: Option<&'a [u8]>,
    /// The request's cache-aware key, computed once by the adapter with
    /// [`RequestKey::from_body`]; used by [`Policy::CacheAware`](crate::Policy::CacheAware)
    /// only.
    pub affinity: Option<&'a RequestKey>,
    /// The model the request names (its JSON body's `model` field): only backends that
    /// serve it are eligible ([`Balancer::set_models`](crate::Balancer::set_models)).
    pub model: Option<&'a str>,
}

impl<'a> RequestMeta<'a> {
    /// Meta for a request from `client_ip`.
    pub fn from_ip(client_ip: IpAddr) -> Self {
        RequestMeta {
            client_ip: Some(client_ip),
            key: None,
            affinity: None,
            model: None,
        }
    }

    /// The same meta with a cache-aware key.
    pub fn with_affinity(self, key: &'a RequestKey) -> Self {
        RequestMeta {
            affinity: Some(key),
            ..self
        }
    }

    /// The same meta with the model the request names.
    pub fn with_model(self, model: &'a str) -> Self {
        RequestMeta {
            model: Some(model),
            ..self
        }
    }

    /// The same meta with an affinity key.
    pub fn with_key(self, key: &'a [u8]) -> Self {
        RequestMeta {
            key: Some(key),
            ..self
        }
    }

    /// The hash hashing policies route by: the key's, else the client address's. An
    /// IPv4-mapped IPv6 address hashes as its IPv4 address, so a dual-stack listener
    /// sends a client to the same backend whichever way it connects.
    pub(crate) fn affinity_hash(&self) -> Option<u64> {
        if let Some(k) = self.key {
            return Some(hash_bytes(k));
        }
        self.client_ip.map(|ip| match ip {
            IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => hash_bytes(&v4.octets()),
                None => hash_bytes(&v6.octets()),
            },
        })
    }

    /// The prefix-hash key and its depth: the chain value of the first `units` units of
    /// the prompt, and of a chat no more than its opening ([`RequestKey::opening`]), so
    /// every turn of a conversation has one key (depth: how many units that is); else
    /// the hashing key or the client address (depth 0).
    pub(crate) fn prefix_key(&self, units: usize) -> (Option<u64>, u32) {
        let chain = self.units();
        let opening = self
            .affinity
            .and_then(RequestKey::opening)
            .unwrap_or(usize::MAX);
        match chain.len().min(units).min(opening) {
            0 => (self.affinity_hash(), 0),
            n => (Some(chain[n - 1]), u32::try_from(n).unwrap_or(u32::MAX)),
        }
    }

    /// The cache-aware key's chain units (none without a key).
    pub(crate) fn units(&self) -> &'a [u64] {
        self.affinity.map_or(&[][..], RequestKey::units)
    }
}
