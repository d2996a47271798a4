//! Model pools: what each backend's `/v1/models` lists, and `lb`'s own answer to
//! `GET /v1/models` (the union) when every healthy backend gave a list.
//!
//! The driver reads the list with each probe (the probe's body when `--health-path` is
//! `/v1/models`, else one more bounded GET per sweep), [`parse`]s it here and hands the
//! ids to the core ([`lb_core::Balancer::set_models`]), which routes each request that
//! names a model among the backends that serve it. What the lists mean:
//!
//! - a `2xx` answer whose body is an OpenAI list (`{"data":[{"id":..},..]}`) within
//!   [`MAX_MODELS_BODY`]: the backend serves those models (an empty list: every model);
//! - any other answer (another status, a body that is not such a list, or one cut at the
//!   cap): no list, the backend serves every model;
//! - no answer (a connection error or a timeout): the last list is kept (the probe decides
//!   health; a lost model fetch says nothing about the models).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::runtime::Fetched;

/// The path model lists are read from (and that `lb` may answer itself).
pub const MODELS_PATH: &str = "/v1/models";

/// The most bytes of a `/v1/models` body read: a larger list counts as none.
pub const MAX_MODELS_BODY: usize = 256 * 1024;

/// One model a backend lists: its id and its entry as the backend wrote it (compact
/// JSON), which `lb`'s merged list repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    /// The model's id, what requests name in `"model"`.
    pub id: String,
    /// The list entry (a JSON object), as compact JSON.
    pub entry: String,
}

/// The models of a `/v1/models` answer: `None` when it is not a complete OpenAI list
/// (see the module documentation). Entries without a non-empty string `id` are skipped.
pub fn parse(fetched: &Fetched) -> Option<Vec<Model>> {
    if !(200..300).contains(&fetched.status) || fetched.truncated {
        return None;
    }
    let Ok(Value::Object(mut list)) = serde_json::from_slice::<Value>(&fetched.body) else {
        return None;
    };
    let Some(Value::Array(data)) = list.remove("data") else {
        return None;
    };
    let models = data
        .into_iter()
        .filter_map(|e| {
            let id = e
                .get("id")?
                .as_str()
                .filter(|id| !id.is_empty())?
                .to_owned();
            e.is_object().then(|| Model {
                id,
                entry: e.to_string(),
            })
        })
        .collect();
    Some(models)
}

/// `lb`'s answer to `GET /v1/models`: the union of `lists` in OpenAI's list shape,
/// sorted by id, one entry per id (the first list's entry for it).
pub fn union<'a>(lists: impl IntoIterator<Item = &'a [Model]>) -> String {
    let mut by_id: BTreeMap<&str, &str> = BTreeMap::new();
    for list in lists {
        for m in list {
            by_id.entry(&m.id).or_insert(&m.entry);
        }
    }
    let mut body = String::from(r#"{"object":"list","data":["#);
    for (i, entry) in by_id.values().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(entry);
    }
    body.push_str("]}");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(status: u16, body: &str) -> Fetched {
        Fetched {
            status,
            body: body.as_bytes().to_vec(),
            truncated: false,
        }
    }

    #[test]
    fn lists_parse_and_merge() {
        let a = parse(&fetched(
            200,
            r#"{"object":"list","data":[{"id":"llama","object":"model","max_model_len":8192},{"id":"qwen"},{"id":""},{"x":1},"junk"]}"#,
        ))
        .unwrap();
        let ids: Vec<_> = a.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["llama", "qwen"]);
        assert_eq!(
            a[0].entry,
            r#"{"id":"llama","max_model_len":8192,"object":"model"}"#
        );
        let b = parse(&fetched(
            200,
            r#"{"data":[{"id":"qwen","owned_by":"b"},{"id":"aya"}]}"#,
        ))
        .unwrap();
        let merged = union([&a[..], &b[..]]);
        let v: Value = serde_json::from_str(&merged).unwrap();
        assert_eq!(v["object"], "list");
        let ids: Vec<_> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["aya", "llama", "qwen"]);
        // The first list's entry for a shared id.
        assert!(v["data"][2].get("owned_by").is_none());
        assert_eq!(union([]), r#"{"object":"list","data":[]}"#);
        assert_eq!(parse(&fetched(200, r#"{"data":[]}"#)), Some(Vec::new()));
    }

    #[test]
    fn anything_else_is_no_list() {
        for (status, body) in [
            (404, r#"{"data":[{"id":"a"}]}"#),
            (200, "not json"),
            (200, r#"{"data":{"id":"a"}}"#),
            (200, r#"[{"id":"a"}]"#),
            (200, ""),
        ] {
            assert_eq!(parse(&fetched(status, body)), None, "{status} {body}");
        }
        let cut = Fetched {
            truncated: true,
            ..fetched(200, r#"{"data":[]}"#)
        };
        assert_eq!(parse(&cut), None);
    }
}
