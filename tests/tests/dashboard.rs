//! The Grafana dashboard `deploy/grafana/lb.json`, checked against the build in `LB_BIN`:
//! it is valid JSON with panels whose ids are unique, its data source is the
//! `DS_PROMETHEUS` variable, and every series its PromQL names (panel targets and template
//! variable queries) is a sample name in a real `/metrics` scrape, so a renamed or dropped
//! series fails here instead of leaving an empty panel.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use lb_tests::*;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/lb.json");

/// The dashboard, parsed.
fn dashboard() -> Value {
    let text =
        std::fs::read_to_string(DASHBOARD).unwrap_or_else(|e| panic!("read {DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Every panel, rows' nested panels included (a collapsed row holds its panels).
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// What is wrong with the dashboard's structure (empty: nothing).
fn structure_problems(dash: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if !dash.is_object() {
        return vec!["the dashboard is not a JSON object".into()];
    }
    match dash["panels"].as_array() {
        Some(list) if !list.is_empty() => {}
        _ => problems.push("no non-empty `panels` array".into()),
    }
    if dash["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
        problems.push(format!(
            "schemaVersion {} (want >= 36)",
            dash["schemaVersion"]
        ));
    }
    let mut ids = HashSet::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("?");
        match p["id"].as_u64() {
            None => problems.push(format!("panel {title:?} has no integer id")),
            Some(id) if !ids.insert(id) => problems.push(format!("panel {title:?}: id {id} again")),
            Some(_) => {}
        }
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().map_or(&[][..], Vec::as_slice);
        if targets.is_empty() {
            problems.push(format!("panel {title:?} has no targets"));
        }
        for t in targets {
            if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                problems.push(format!(
                    "panel {title:?}: target {} has no expr",
                    t["refId"]
                ));
            }
            let ds = if t["datasource"].is_null() {
                &p["datasource"]
            } else {
                &t["datasource"]
            };
            if ds["uid"] != "${DS_PROMETHEUS}" {
                problems.push(format!(
                    "panel {title:?}: data source {ds} (want ${{DS_PROMETHEUS}})"
                ));
            }
        }
    }
    let vars = dash["templating"]["list"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    match var("DS_PROMETHEUS") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        v => problems.push(format!(
            "no prometheus data source variable DS_PROMETHEUS: {v:?}"
        )),
    }
    match var("backend") {
        Some(v)
            if v["type"] == "query"
                && v["multi"] == true
                && query_of(v).is_some_and(|q| {
                    q.replace(' ', "") == "label_values(lb_backend_up,backend)"
                }) => {}
        v => problems.push(format!(
            "no multi-value `backend` variable over lb_backend_up: {v:?}"
        )),
    }
    problems
}

/// A query variable's PromQL: `query` is a string (older dashboards) or an object whose
/// `query` is.
fn query_of(var: &Value) -> Option<&str> {
    var["query"]
        .as_str()
        .or_else(|| var["query"]["query"].as_str())
}

/// Every PromQL expression: (where it is, the expression).
fn exprs(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                let title = p["title"].as_str().unwrap_or("?");
                let at = format!(
                    "panel {} {title:?} target {}",
                    p["id"],
                    t["refId"].as_str().unwrap_or("?")
                );
                out.push((at, e.to_string()));
            }
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            if let Some(q) = query_of(v) {
                let name = v["name"].as_str().unwrap_or("?");
                out.push((format!("variable {name}"), q.to_string()));
            }
        }
    }
    out
}

/// The clauses whose parenthesised list holds label names, not series.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The index just past the group that opens at `b[open]` and ends at `close`, skipping
/// quoted strings inside it.
fn skip_group(b: &[u8], open: usize, close: u8) -> usize {
    let mut i = open + 1;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => i = skip_string(b, i, q),
            c if c == close => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// The index just past the string that opens at `b[open]` with quote `q`.
fn skip_string(b: &[u8], open: usize, q: u8) -> usize {
    let mut i = open + 1;
    while i < b.len() {
        if b[i] == b'\\' && q != b'`' {
            i += 2;
        } else if b[i] == q {
            return i + 1;
        } else {
            i += 1;
        }
    }
    b.len()
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// The series names in a PromQL expression: identifiers starting with `lb_` or `process_`,
/// outside strings, label matchers `{...}`, ranges `[...]`, `by (...)`-style label lists
/// and `$variables`. Function names and keywords never carry those prefixes.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = skip_string(b, i, c);
        } else if c == b'{' {
            i = skip_group(b, i, b'}');
        } else if c == b'[' {
            i = skip_group(b, i, b']');
        } else if c == b'#' {
            i = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |n| i + n);
        } else if c == b'$' || c.is_ascii_digit() || c == b'.' {
            // A variable, a number or a duration: one token, never a series.
            i += 1;
            while i < b.len() && (ident_char(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if ident_start(c) {
            let start = i;
            while i < b.len() && ident_char(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if LABEL_LISTS.contains(&word.to_ascii_lowercase().as_str()) {
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                if j < b.len() && b[j] == b'(' {
                    i = skip_group(b, j, b')');
                }
            } else if word.starts_with("lb_") || word.starts_with("process_") {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every series name the dashboard uses, with where each is used.
fn used_names(dash: &Value) -> BTreeMap<String, Vec<String>> {
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (at, e) in exprs(dash) {
        for n in metric_names(&e) {
            used.entry(n).or_default().push(at.clone());
        }
    }
    used
}

/// The names in `used` that are no sample's name in `scrape`, with where they are used.
fn missing(used: &BTreeMap<String, Vec<String>>, scrape: &Metrics) -> Vec<String> {
    used.iter()
        .filter(|(n, _)| !scrape.has(n))
        .map(|(n, at)| format!("{n} (used by {})", at.join("; ")))
        .collect()
}

#[test]
fn dashboard_is_well_formed() {
    let dash = dashboard();
    let problems = structure_problems(&dash);
    assert!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));
    assert!(exprs(&dash).len() >= 20, "{:?}", exprs(&dash));
}

/// The structure checks fail on a broken dashboard: each defect is reported.
#[test]
fn structure_check_catches_defects() {
    let good = dashboard();
    assert!(structure_problems(&good).is_empty());

    let mut dup = good.clone();
    let first = dup["panels"][0]["id"].clone();
    dup["panels"][1]["id"] = first;
    let p = structure_problems(&dup);
    assert!(p.iter().any(|p| p.contains("again")), "{p:?}");

    let mut no_id = good.clone();
    no_id["panels"][2].as_object_mut().unwrap().remove("id");
    let p = structure_problems(&no_id);
    assert!(p.iter().any(|p| p.contains("no integer id")), "{p:?}");

    let mut empty = good.clone();
    empty["panels"] = json!([]);
    let p = structure_problems(&empty);
    assert!(p.iter().any(|p| p.contains("panels")), "{p:?}");

    let mut no_ds = good.clone();
    no_ds["templating"]["list"] = json!([]);
    let p = structure_problems(&no_ds);
    assert!(p.iter().any(|p| p.contains("DS_PROMETHEUS")), "{p:?}");
    assert!(p.iter().any(|p| p.contains("`backend`")), "{p:?}");

    let mut other_ds = good;
    let i = panels(&other_ds)
        .iter()
        .position(|p| p["type"] != "row")
        .unwrap();
    other_ds["panels"][i]["datasource"] = json!({"type": "prometheus", "uid": "abc"});
    if let Some(ts) = other_ds["panels"][i]["targets"].as_array_mut() {
        for t in ts {
            t["datasource"] = Value::Null;
        }
    }
    let p = structure_problems(&other_ds);
    assert!(p.iter().any(|p| p.contains("data source")), "{p:?}");

    assert!(!structure_problems(&json!([1, 2])).is_empty());
}

#[test]
fn metric_names_skips_functions_labels_and_groupings() {
    let e = r#"sum by (lb_label, le) (rate(lb_fake_metric_total{lb_l="lb_v}", code=~"5.."}[$__rate_interval] offset 5m))
        / on (lb_x) group_left (lb_y) process_fake_bytes > 1e3 # lb_in_a_comment"#;
    let got: Vec<_> = metric_names(e).into_iter().collect();
    assert_eq!(got, ["lb_fake_metric_total", "process_fake_bytes"]);
    let got: Vec<_> = metric_names("label_values(lb_backend_up, backend)")
        .into_iter()
        .collect();
    assert_eq!(got, ["lb_backend_up"]);
    assert!(metric_names("histogram_quantile(0.99, sum without (le) (up))").is_empty());
    let got: Vec<_> = metric_names("max(lb_a:rate5m)/ignoring(lb_b)lb_c")
        .into_iter()
        .collect();
    assert_eq!(got, ["lb_a:rate5m", "lb_c"]);
}

/// The black-box check: every series the dashboard names is in a real scrape of an lb
/// with affinity routing and an admission queue (so those series exist), after traffic.
#[test]
fn every_series_the_dashboard_uses_is_exported() {
    let dash = dashboard();
    let used = used_names(&dash);
    assert!(!used.is_empty(), "no series found in {DASHBOARD}");
    eprintln!("dashboard series: {:?}", used.keys().collect::<Vec<_>>());

    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--backends",
        &m.url(),
        "--routing",
        "cache-aware",
        "--max-conns",
        "4",
        "--queue-timeout",
        "1s",
    ]);
    lb.wait_healthy(1);
    for _ in 0..2 {
        let r = try_completion(lb.port).expect("a completion through lb");
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // Counters land when a response ends: poll briefly, then report what is missing.
    let mut last = (Metrics::default(), Vec::new());
    let ok = poll(Duration::from_secs(3), || {
        let scrape = lb.metrics();
        let gone = missing(&used, &scrape);
        let done = gone.is_empty();
        last = (scrape, gone);
        done.then_some(())
    });
    let (scrape, gone) = last;
    assert!(
        ok.is_some(),
        "series the dashboard queries but lb does not export:\n{}\nexported: {:?}",
        gone.join("\n"),
        scrape.samples.iter().map(|s| &s.0).collect::<BTreeSet<_>>()
    );

    // The check can fail: a name lb does not export is reported.
    let mut fake = used.clone();
    for n in metric_names("rate(lb_fake_metric_total[5m]) + lb_requests") {
        fake.insert(n, vec!["this test".into()]);
    }
    let gone = missing(&fake, &scrape);
    assert_eq!(gone.len(), 2, "{gone:?}");
    assert!(
        gone[0].starts_with("lb_fake_metric_total") && gone[1].starts_with("lb_requests "),
        "{gone:?}"
    );
}
