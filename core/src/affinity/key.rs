//! Routing keys from request bodies: the OpenAI `user` field, or a cumulative prefix chain.

use std::io::Write as _;

use serde_json::{Map, Value};

use crate::hash::{hash_bytes, mix64};

/// Bytes per block: a message (or prompt) longer than this is split into blocks of this
/// size, each its own unit of the chain, so two long messages that share their first
/// blocks share that part of the chain.
///
/// 1 KiB is about 250 tokens of English text: coarse enough that a long document costs
/// few units, fine enough that a shared document prefix is found. For token-array prompts
/// (four bytes a token) a block is 256 tokens.
pub const BLOCK_BYTES: usize = 1024;

/// At most this many units per chain. Units past the cap are not hashed: two requests
/// that agree on their first `CHAIN_CAP` units are routed as one prefix.
///
/// 256 units cover 256 messages, or at least 256 KiB of text (about 64 k tokens, a
/// typical context window); it also bounds the table work of one request (at most this
/// many look-ups and insertions).
pub const CHAIN_CAP: usize = 256;

/// How much of a request body an adapter should buffer to compute its key. Bodies that do
/// not fit whole in this many bytes get [`RequestKey::None`] (least connections): the
/// adapter forwards the buffered part and streams the rest.
pub const MAX_BODY_PREFIX: usize = 4 << 20;

/// Domain tags, so that a user key never equals a chain unit, and a message never equals
/// a prompt block with the same bytes.
const TAG_SEED: u64 = 0x5345_4544_0000_0001;
const TAG_USER: u64 = 0x5553_4552_0000_0002;
const TAG_MESSAGE: u64 = 0x4d53_4745_0000_0003;
const TAG_TEXT: u64 = 0x5445_5854_0000_0004;
const TAG_TOKENS: u64 = 0x544f_4b53_0000_0005;
/// Or-ed into a block's tag when it is the last block of its message or prompt.
const TAG_LAST: u64 = 1 << 63;

/// The key a cache-aware balancer routes one request by.
///
/// Computed once per request by the adapter ([`RequestKey::from_body`]) and lent to the
/// core through [`RequestMeta::affinity`](crate::RequestMeta::affinity). Any value is
/// valid: the core only compares units for equality, so simulators and tests may build
/// [`RequestKey::Prefix`] chains of their own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum RequestKey {
    /// Nothing to route by (no body, not JSON, too large, no messages or prompt): the
    /// request goes by least connections.
    #[default]
    None,
    /// The hash of the OpenAI `user` field: all of a user's requests form one prefix.
    User(u64),
    /// A cumulative prefix chain: `chain[i]` identifies the request's first `i + 1`
    /// units (messages, or blocks of long ones), so equal values mean identical prefixes.
    /// At most [`CHAIN_CAP`] long.
    Prefix(Vec<u64>),
    /// A chat's chain (as [`RequestKey::Prefix`]), and its opening: how many of its units
    /// are the messages up to and including the first `user` message (at least 1).
    ///
    /// Every turn of one conversation resends its opening (the system prompt and the
    /// first question), so [`Policy::PrefixHash`](crate::Policy::PrefixHash) keys no
    /// deeper than it: its key is the same for every turn, however short the messages.
    /// Cache-aware matches the whole chain, as for a prefix.
    Chat {
        /// The cumulative chain, as in [`RequestKey::Prefix`].
        chain: Vec<u64>,
        /// Units in the opening: `chain[opening - 1]` identifies it.
        opening: usize,
    },
}

impl RequestKey {
    /// The key of an OpenAI-style request body (`/v1/chat/completions`,
    /// `/v1/completions`, or anything shaped like them).
    ///
    /// - A non-empty string `user` field wins: [`RequestKey::User`].
    /// - Else `messages` (an array): one unit per message, over its canonical form: the
    ///   `role`, `content`, `reasoning_content` (or `reasoning`), `tool_calls` and
    ///   `tool_call_id` fields, in that order, each framed (its length after it); strings as their bytes,
    ///   other values as JSON with sorted object keys. Null, absent, `""` and `[]` fields
    ///   are the same (left out), every other field is ignored (so an assistant turn
    ///   echoed back with extra fields such as `refusal: null` still matches), and a
    ///   message with only tool calls is a unit like any other. A message whose canonical
    ///   form is longer than [`BLOCK_BYTES`] is split into blocks, one unit each.
    /// - Else `prompt`: a string is split into blocks of [`BLOCK_BYTES`]; an array of
    ///   token ids into blocks of their little-endian `u32`s; a batch (an array of
    ///   prompts) is keyed by its first prompt.
    /// - The chain is seeded with the `model` and `tools` fields (they are part of what
    ///   the backend caches), and capped at [`CHAIN_CAP`] units.
    ///
    /// Anything else (not JSON, not an object, neither `messages` nor `prompt`, an empty
    /// prompt) is [`RequestKey::None`]. Pass the complete body: a body cut at
    /// [`MAX_BODY_PREFIX`] is not JSON, and the adapter should not even try.
    ///
    /// Hashes are fixed (no seed), so keys are stable across restarts and platforms.
    pub fn from_body(body: &[u8]) -> RequestKey {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(request)) => RequestKey::from_request(&request),
            _ => RequestKey::None,
        }
    }

    /// The key of a user name or id: what [`RequestKey::from_body`] returns for a body
    /// with that `user` field.
    pub fn from_user(user: &[u8]) -> RequestKey {
        RequestKey::User(mix64(hash_bytes(user) ^ TAG_USER))
    }

    /// The chain of a plain-text prompt with no `model` or `tools`: what
    /// [`RequestKey::from_body`] returns for `{"prompt": text}` (None for an empty text).
    pub fn from_text(text: &str) -> RequestKey {
        let mut chain = Chain::new(&Map::new());
        chain.blocks(text.as_bytes(), TAG_TEXT);
        chain.finish()
    }

    /// The units the table matches: the chain, a user key as a one-unit chain, or empty.
    pub fn units(&self) -> &[u64] {
        match self {
            RequestKey::None => &[],
            RequestKey::User(u) => std::slice::from_ref(u),
            RequestKey::Prefix(chain) | RequestKey::Chat { chain, .. } => chain,
        }
    }

    /// A chat's opening ([`RequestKey::Chat`]): how many units its messages up to the
    /// first `user` message make. None for any other key.
    pub fn opening(&self) -> Option<usize> {
        match self {
            RequestKey::Chat { opening, .. } => Some(*opening),
            _ => None,
        }
    }

    /// Whether there is nothing to route by.
    pub fn is_none(&self) -> bool {
        self.units().is_empty()
    }

    fn from_request(request: &Map<String, Value>) -> RequestKey {
        if let Some(user) = string_field(request, "user") {
            return RequestKey::from_user(user.as_bytes());
        }
        RequestKey::prompt_of(request)
    }

    /// The prompt chain alone (the `user` field ignored).
    fn prompt_of(request: &Map<String, Value>) -> RequestKey {
        let mut chain = Chain::new(request);
        let mut opening = None;
        if let Some(Value::Array(messages)) = request.get("messages") {
            for m in messages {
                if chain.full() {
                    break;
                }
                chain.message(m);
                if opening.is_none() && m.get("role").and_then(Value::as_str) == Some("user") {
                    opening = Some(chain.units.len());
                }
            }
        } else if let Some(prompt) = request.get("prompt") {
            chain.prompt(prompt);
        }
        match (chain.finish(), opening) {
            (RequestKey::Prefix(chain), Some(opening)) if opening > 0 => {
                RequestKey::Chat { chain, opening }
            }
            (key, _) => key,
        }
    }
}

/// A non-empty string field of a request.
fn string_field<'a>(request: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    request
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// What routing reads from one JSON request body, parsed once: its `model` (model
/// pools), its `user`, and with [`BodyFields::parse`]'s `chain`, its prompt chain
/// regardless of `user` (the `--routing prefix-hash` key, which falls back to `user`
/// only without a prompt).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodyFields {
    /// The `model` field, if a non-empty string.
    pub model: Option<String>,
    /// The `user` field, if a non-empty string.
    pub user: Option<String>,
    /// The prompt chain ([`RequestKey::Prefix`] or [`RequestKey::Chat`], or
    /// [`RequestKey::None`]); computed only
    /// when asked for.
    pub chain: RequestKey,
}

impl BodyFields {
    /// The fields of `body` (all empty when it is not a JSON object). `chain`: compute the
    /// prompt chain too.
    pub fn parse(body: &[u8], chain: bool) -> BodyFields {
        let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
            return BodyFields::default();
        };
        BodyFields {
            model: string_field(&request, "model").map(str::to_owned),
            user: string_field(&request, "user").map(str::to_owned),
            chain: if chain {
                RequestKey::prompt_of(&request)
            } else {
                RequestKey::None
            },
        }
    }

    /// The cache-aware key these fields make: what [`RequestKey::from_body`] returns for
    /// the same body (given a chain was computed).
    pub fn into_cache_key(self) -> RequestKey {
        match &self.user {
            Some(user) => RequestKey::from_user(user.as_bytes()),
            None => self.chain,
        }
    }
}

/// The OpenAI `user` field of a JSON request body, if it has a non-empty string one: the
/// key an adapter passes to [`RequestMeta::with_key`](crate::RequestMeta::with_key) for
/// `--routing consistent-hash --hash-key user`.
pub fn user_of(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut request)) => match request.remove("user") {
            Some(Value::String(user)) if !user.is_empty() => Some(user),
            _ => None,
        },
        _ => None,
    }
}

/// A chain under construction.
struct Chain {
    /// The last unit (the seed before the first).
    last: u64,
    units: Vec<u64>,
    /// Scratch space for one message's canonical form.
    buf: Vec<u8>,
}

impl Chain {
    fn new(request: &Map<String, Value>) -> Self {
        let mut buf = Vec::new();
        field(&mut buf, b'm', request.get("model"));
        field(&mut buf, b't', request.get("tools"));
        Chain {
            last: hash_block(&buf, TAG_SEED),
            units: Vec::new(),
            buf,
        }
    }

    fn full(&self) -> bool {
        self.units.len() >= CHAIN_CAP
    }

    fn push(&mut self, block: &[u8], tag: u64) {
        if self.full() {
            return;
        }
        self.last = mix64(self.last.rotate_left(23) ^ hash_block(block, tag));
        self.units.push(self.last);
    }

    /// One unit per block of `bytes` (one unit when `bytes` is empty).
    fn blocks(&mut self, bytes: &[u8], tag: u64) {
        let n = bytes.len().div_ceil(BLOCK_BYTES).max(1);
        for i in 0..n {
            let block =
                &bytes[(i * BLOCK_BYTES).min(bytes.len())..bytes.len().min((i + 1) * BLOCK_BYTES)];
            let last = if i + 1 == n { TAG_LAST } else { 0 };
            self.push(block, tag | last);
        }
    }

    fn message(&mut self, m: &Value) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        match m {
            Value::Object(o) => {
                let nonempty = |k: &str| o.get(k).filter(|v| !is_blank(v));
                field(&mut buf, b'r', o.get("role"));
                field(&mut buf, b'c', o.get("content"));
                field(
                    &mut buf,
                    b'R',
                    nonempty("reasoning_content").or_else(|| nonempty("reasoning")),
                );
                field(&mut buf, b'T', o.get("tool_calls"));
                field(&mut buf, b'i', o.get("tool_call_id"));
            }
            other => field(&mut buf, b'?', Some(other)),
        }
        self.blocks(&buf, TAG_MESSAGE);
        self.buf = buf;
    }

    fn prompt(&mut self, p: &Value) {
        match p {
            Value::String(s) if !s.is_empty() => self.blocks(s.as_bytes(), TAG_TEXT),
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
                let mut buf = std::mem::take(&mut self.buf);
                buf.clear();
                for t in items {
                    let id = t.as_u64().unwrap_or(u64::MAX) as u32;
                    buf.extend_from_slice(&id.to_le_bytes());
                }
                self.blocks(&buf, TAG_TOKENS);
                self.buf = buf;
            }
            Value::Array(items) => {
                if let Some(first) = items.first() {
                    self.prompt(first);
                }
            }
            _ => {}
        }
    }

    fn finish(self) -> RequestKey {
        if self.units.is_empty() {
            RequestKey::None
        } else {
            RequestKey::Prefix(self.units)
        }
    }
}

/// Null, `""` and `[]` say nothing.
fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Appends one framed field (`tag`, kind, value, then the length of kind and value as 8
/// little-endian bytes) unless it is blank. The length comes last so that a long value's
/// first blocks do not depend on its length (the framing still decodes, from the end).
fn field(buf: &mut Vec<u8>, tag: u8, v: Option<&Value>) {
    let Some(v) = v.filter(|v| !is_blank(v)) else {
        return;
    };
    buf.push(tag);
    let at = buf.len();
    match v {
        Value::String(s) => {
            buf.push(b's');
            buf.extend_from_slice(s.as_bytes());
        }
        other => {
            buf.push(b'j');
            canonical(buf, other);
        }
    }
    let len = (buf.len() - at) as u64;
    buf.extend_from_slice(&len.to_le_bytes());
}

/// Writes `v` as compact JSON with object keys sorted (whatever order the map keeps).
fn canonical(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => buf.extend_from_slice(b"null"),
        Value::Bool(b) => buf.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            let _ = write!(buf, "{n}");
        }
        Value::String(s) => string(buf, s),
        Value::Array(items) => {
            buf.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                canonical(buf, item);
            }
            buf.push(b']');
        }
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort_unstable();
            buf.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                string(buf, k);
                buf.push(b':');
                canonical(buf, &o[k.as_str()]);
            }
            buf.push(b'}');
        }
    }
}

fn string(buf: &mut Vec<u8>, s: &str) {
    // Writing a &str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// A fast, fixed hash of one block: eight bytes at a time through the splitmix64
/// finaliser, the length and `tag` mixed in first. Stable across runs and platforms.
fn hash_block(bytes: &[u8], tag: u64) -> u64 {
    let mut h = mix64(tag ^ (bytes.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = mix64(h ^ u64::from_le_bytes(a));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut a = [0u8; 8];
        a[..rest.len()].copy_from_slice(rest);
        h = mix64(h ^ u64::from_le_bytes(a) ^ 0xff);
    }
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn body_fields_match_the_key() {
        use super::*;
        for body in [
            &br#"{"model":"m","user":"alice","messages":[{"role":"user","content":"hi"}]}"#[..],
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            br#"{"prompt":"once upon a time","model":""}"#,
            br#"{"model":7}"#,
            b"not json",
            b"[1,2]",
        ] {
            let f = BodyFields::parse(body, true);
            assert_eq!(f.clone().into_cache_key(), RequestKey::from_body(body));
            let g = BodyFields::parse(body, false);
            assert_eq!(
                (g.model, g.user, g.chain),
                (f.model, f.user, RequestKey::None)
            );
        }
        let f = BodyFields::parse(br#"{"model":"m","user":"u","prompt":"p"}"#, true);
        assert_eq!(
            (f.model.as_deref(), f.user.as_deref()),
            (Some("m"), Some("u"))
        );
        assert!(
            matches!(f.chain, RequestKey::Prefix(_)),
            "the prompt, not the user"
        );
    }

    use super::*;

    fn chain(body: &str) -> Vec<u64> {
        match RequestKey::from_body(body.as_bytes()) {
            RequestKey::Prefix(c) | RequestKey::Chat { chain: c, .. } => c,
            other => panic!("expected a chain for {body}, got {other:?}"),
        }
    }

    #[test]
    fn one_unit_per_message_and_shared_prefixes() {
        let a = chain(
            r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"hi"}]}"#,
        );
        let b = chain(
            r#"{"messages":[{"content":"S","role":"system"},{"role":"user","content":"hi"},{"role":"assistant","content":"yo"},{"role":"user","content":"more"}],"model":"m","stream":true,"temperature":0.5}"#,
        );
        assert_eq!(a.len(), 2);
        assert_eq!(b.len(), 4);
        assert_eq!(
            a[..],
            b[..2],
            "same model and first two messages: same prefix"
        );
        let c = chain(r#"{"model":"other","messages":[{"role":"system","content":"S"}]}"#);
        assert_ne!(c[0], a[0], "the model seeds the chain");
    }

    #[test]
    fn blank_fields_and_extra_fields_do_not_matter() {
        let a = chain(
            r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]}]}"#,
        );
        let b = chain(
            r#"{"messages":[{"role":"assistant","content":"","refusal":null,"tool_calls":[{"function":{"arguments":"{}","name":"f"},"type":"function","id":"c1"}]}]}"#,
        );
        assert_eq!(a, b);
        let c = chain(r#"{"messages":[{"role":"assistant","content":""}]}"#);
        assert_ne!(a, c, "tool calls count");
        let r1 = chain(
            r#"{"messages":[{"role":"assistant","content":"x","reasoning_content":"think"}]}"#,
        );
        let r2 = chain(r#"{"messages":[{"role":"assistant","content":"x","reasoning":"think"}]}"#);
        let r3 = chain(r#"{"messages":[{"role":"assistant","content":"x"}]}"#);
        assert_eq!(r1, r2);
        assert_ne!(r1, r3);
        let t1 = chain(r#"{"messages":[{"role":"tool","content":"42","tool_call_id":"c1"}]}"#);
        let t2 = chain(r#"{"messages":[{"role":"tool","content":"42","tool_call_id":"c2"}]}"#);
        assert_ne!(t1, t2);
    }

    #[test]
    fn framing_is_unambiguous() {
        let a = chain(r#"{"messages":[{"role":"user","content":"ab"}]}"#);
        let b = chain(r#"{"messages":[{"role":"usera","content":"b"}]}"#);
        assert_ne!(a, b);
        let c = chain(r#"{"messages":[{"role":"user","content":["ab"]}]}"#);
        assert_ne!(a, c, "a string is not an array holding it");
    }

    #[test]
    fn long_messages_split_into_blocks() {
        let long = "x".repeat(BLOCK_BYTES * 3);
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{long}"}}]}}"#);
        let units = chain(&body);
        assert_eq!(units.len(), 4, "3 KiB of content plus framing: four blocks");
        let longer = format!(r#"{{"messages":[{{"role":"user","content":"{long}yyy"}}]}}"#);
        let other = chain(&longer);
        assert_eq!(units[..3], other[..3], "full blocks are shared");
        assert_ne!(units[3], other[3]);
    }

    #[test]
    fn prompts_users_and_the_cap() {
        let text = "p".repeat(BLOCK_BYTES * 2 + 10);
        let a = chain(&format!(r#"{{"prompt":"{text}"}}"#));
        assert_eq!(a.len(), 3);
        assert_eq!(RequestKey::from_text(&text), RequestKey::Prefix(a.clone()));
        assert_eq!(
            RequestKey::from_body(format!(r#"{{"prompt":["{text}","other"]}}"#).as_bytes()),
            RequestKey::Prefix(a)
        );
        let tokens = chain(r#"{"prompt":[1,2,3]}"#);
        assert_eq!(tokens.len(), 1);
        assert_eq!(
            RequestKey::from_body(br#"{"prompt":"x","user":"alice"}"#),
            RequestKey::from_user(b"alice")
        );
        assert_eq!(
            user_of(br#"{"prompt":"x","user":"alice"}"#).as_deref(),
            Some("alice")
        );
        assert_eq!(user_of(br#"{"user":""}"#), None);
        assert_eq!(user_of(b"nope"), None);
        let many: Vec<String> = (0..CHAIN_CAP + 50)
            .map(|i| format!(r#"{{"role":"user","content":"{i}"}}"#))
            .collect();
        let body = format!(r#"{{"messages":[{}]}}"#, many.join(","));
        assert_eq!(chain(&body).len(), CHAIN_CAP);
    }

    #[test]
    fn no_key_without_a_routable_body() {
        for body in [
            &b""[..],
            b"not json",
            b"[1,2]",
            br#"{"model":"m"}"#,
            br#"{"prompt":""}"#,
            br#"{"prompt":[]}"#,
            br#"{"messages":"x"}"#,
            br#"{"messages":[], "prompt": "ignored when messages is an array"}"#,
            br#"{"messages":[{"role":"user","content":"cut"#,
        ] {
            assert_eq!(
                RequestKey::from_body(body),
                RequestKey::None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(RequestKey::None.is_none());
        assert_eq!(RequestKey::User(7).units(), &[7]);
    }

    #[test]
    fn a_chat_knows_its_opening() {
        let opening = |body: &str| RequestKey::from_body(body.as_bytes()).opening();
        let system = "s".repeat(3000); // three blocks
        let turn1 = format!(
            r#"{{"messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"q1"}}]}}"#
        );
        let turn2 = format!(
            r#"{{"messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"q1"}},{{"role":"assistant","content":"a1"}},{{"role":"user","content":"q2"}}]}}"#
        );
        assert_eq!(opening(&turn1), Some(4));
        assert_eq!(opening(&turn2), Some(4));
        assert_eq!(chain(&turn1)[3], chain(&turn2)[3], "the same opening");
        assert_eq!(chain(&turn2).len(), 6);
        // No user message, a prompt, a user field: no opening.
        assert_eq!(
            opening(r#"{"messages":[{"role":"system","content":"x"}]}"#),
            None
        );
        assert_eq!(opening(r#"{"prompt":"hello"}"#), None);
        assert_eq!(
            opening(r#"{"user":"u","messages":[{"role":"user","content":"x"}]}"#),
            None
        );
        // The prefix-hash key of every turn is the opening's, below the units cap.
        let (k1, k2) = (
            RequestKey::from_body(turn1.as_bytes()),
            RequestKey::from_body(turn2.as_bytes()),
        );
        let m1 = crate::RequestMeta::default().with_affinity(&k1);
        let m2 = crate::RequestMeta::default().with_affinity(&k2);
        assert_eq!(m1.prefix_key(32), m2.prefix_key(32));
        assert_eq!(m2.prefix_key(32).1, 4);
        assert_eq!(m2.prefix_key(2), (Some(chain(&turn2)[1]), 2));
    }

    #[test]
    fn stable_values() {
        // Pinned: a change here moves every cached prefix to a new backend on upgrade.
        assert_eq!(hash_block(b"", 0), mix64(0));
        let a = chain(r#"{"messages":[{"role":"user","content":"hello"}]}"#);
        assert_eq!(a, [14567686058492996836]);
        assert_eq!(
            RequestKey::from_user(b"alice"),
            RequestKey::User(4338391409872538059)
        );
        assert_eq!(
            RequestKey::from_text("hello"),
            RequestKey::Prefix(vec![13725549735497270931])
        );
    }
}
