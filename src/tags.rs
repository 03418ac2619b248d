//! Event meta tags: the product's rules (CONTRACT §3).
//!
//! * at most [`MAX_TAGS`] tags per event; a key is 1..=[`MAX_KEY_CHARS`] characters of ASCII
//!   letters, digits, `_` and `-`; a value is at most [`MAX_VALUE_CHARS`] characters; lengths
//!   count characters (Unicode scalar values, as Python's `len` does), not bytes;
//! * keys and values are trimmed; booleans and numbers become their JSON text; `null`, arrays
//!   and objects are invalid values;
//! * an invalid tag is skipped with a warning; the event is never rejected for its tags;
//! * merging: event tags > session tags > static tags; after merging, if more than 20 remain,
//!   the higher-precedence ones are kept (within one level, by key order).
//!
//! [`Tags`] is a `BTreeMap` so that "by key order" is the map's own order and the JSON output
//! is deterministic.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// Most tags on one event.
pub const MAX_TAGS: usize = 20;
/// Longest key, in characters.
pub const MAX_KEY_CHARS: usize = 64;
/// Longest value, in characters.
pub const MAX_VALUE_CHARS: usize = 256;

/// A normalized tag set, ordered by key.
pub type Tags = BTreeMap<String, String>;

/// Why a tag was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The key is empty after trimming.
    EmptyKey,
    /// The key is longer than 64 characters.
    KeyTooLong,
    /// The key has a character other than letters, digits, `_`, `-`.
    KeyCharset,
    /// The value is longer than 256 characters.
    ValueTooLong,
    /// The value is `null`, an array or an object.
    ValueType,
    /// More than 20 tags (after merging, the lowest-precedence ones).
    TooMany,
    /// The tag container itself is not a JSON object.
    NotAnObject,
}

impl SkipReason {
    /// A stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::EmptyKey => "empty_key",
            SkipReason::KeyTooLong => "key_too_long",
            SkipReason::KeyCharset => "key_charset",
            SkipReason::ValueTooLong => "value_too_long",
            SkipReason::ValueType => "value_type",
            SkipReason::TooMany => "too_many",
            SkipReason::NotAnObject => "not_an_object",
        }
    }
}

/// A tag that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The key as given (untrimmed).
    pub key: String,
    /// Why.
    pub reason: SkipReason,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.reason {
            SkipReason::EmptyKey => "the key is empty".to_string(),
            SkipReason::KeyTooLong => format!("the key is longer than {MAX_KEY_CHARS} characters"),
            SkipReason::KeyCharset => {
                "the key may only hold letters, digits, '_' and '-'".to_string()
            }
            SkipReason::ValueTooLong => {
                format!("the value is longer than {MAX_VALUE_CHARS} characters")
            }
            SkipReason::ValueType => "the value must be a string, number or boolean".to_string(),
            SkipReason::TooMany => format!("more than {MAX_TAGS} tags"),
            SkipReason::NotAnObject => "meta tags must be a JSON object".to_string(),
        };
        write!(f, "tag {:?} skipped: {why}", self.key)
    }
}

/// Checks one tag; returns the normalized pair or why it is skipped.
pub fn normalize_one(key: &str, value: &Value) -> Result<(String, String), SkipReason> {
    let k = key.trim();
    if k.is_empty() {
        return Err(SkipReason::EmptyKey);
    }
    if k.chars().count() > MAX_KEY_CHARS {
        return Err(SkipReason::KeyTooLong);
    }
    if !k
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(SkipReason::KeyCharset);
    }
    let v = match value {
        Value::String(s) => s.trim().to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null | Value::Array(_) | Value::Object(_) => return Err(SkipReason::ValueType),
    };
    if v.chars().count() > MAX_VALUE_CHARS {
        return Err(SkipReason::ValueTooLong);
    }
    Ok((k.to_string(), v))
}

/// Normalizes a JSON object of tags: invalid tags are skipped; then, if more than 20 remain,
/// the first 20 by key order are kept.
pub fn normalize_map(raw: &serde_json::Map<String, Value>) -> (Tags, Vec<Skipped>) {
    let mut tags = Tags::new();
    let mut skipped = Vec::new();
    for (key, value) in raw {
        match normalize_one(key, value) {
            Ok((k, v)) => {
                tags.insert(k, v);
            }
            Err(reason) => skipped.push(Skipped {
                key: key.clone(),
                reason,
            }),
        }
    }
    cap(&mut tags, &mut skipped);
    (tags, skipped)
}

/// Normalizes an optional JSON value that should be a tag object. `None` and `null` mean no
/// tags; any other non-object is skipped as a whole.
pub fn normalize_value(raw: Option<&Value>) -> (Tags, Vec<Skipped>) {
    match raw {
        None | Some(Value::Null) => (Tags::new(), Vec::new()),
        Some(Value::Object(m)) => normalize_map(m),
        Some(_) => (
            Tags::new(),
            vec![Skipped {
                key: "metaTags".into(),
                reason: SkipReason::NotAnObject,
            }],
        ),
    }
}

fn cap(tags: &mut Tags, skipped: &mut Vec<Skipped>) {
    while tags.len() > MAX_TAGS {
        if let Some((k, _)) = tags.pop_last() {
            skipped.push(Skipped {
                key: k,
                reason: SkipReason::TooMany,
            });
        }
    }
}

/// Merges the three levels (each already normalized): event > session > static, then keeps
/// at most 20, dropping the lowest-precedence ones first (within one level, the last by key).
pub fn merge(event: &Tags, session: &Tags, stat: &Tags) -> (Tags, Vec<Skipped>) {
    let mut out = Tags::new();
    let mut skipped = Vec::new();
    for level in [event, session, stat] {
        for (k, v) in level {
            if out.contains_key(k) {
                continue;
            }
            if out.len() < MAX_TAGS {
                out.insert(k.clone(), v.clone());
            } else {
                skipped.push(Skipped {
                    key: k.clone(),
                    reason: SkipReason::TooMany,
                });
            }
        }
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type Normalized = (Vec<(String, String)>, Vec<(String, SkipReason)>);

    fn norm(v: Value) -> Normalized {
        let (t, s) = normalize_value(Some(&v));
        (
            t.into_iter().collect(),
            s.into_iter().map(|s| (s.key, s.reason)).collect(),
        )
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn single_tag_rules() {
        let k64 = "k".repeat(64);
        let k65 = "k".repeat(65);
        let v256 = "v".repeat(256);
        let v257 = "v".repeat(257);
        let e256 = "é".repeat(256); // 512 bytes, 256 characters
        let e257 = "é".repeat(257);
        let emoji256 = "😀".repeat(256); // 1024 bytes
        type Row<'a> = (
            &'a str,
            &'a str,
            Value,
            Result<(&'a str, &'a str), SkipReason>,
        );
        let rows: Vec<Row> = vec![
            ("plain", "env", json!("staging"), Ok(("env", "staging"))),
            (
                "underscore and dash",
                "a_b-C9",
                json!("x"),
                Ok(("a_b-C9", "x")),
            ),
            ("key trimmed", "  env ", json!("x"), Ok(("env", "x"))),
            (
                "value trimmed",
                "env",
                json!("  staging \n"),
                Ok(("env", "staging")),
            ),
            ("empty key", "", json!("x"), Err(SkipReason::EmptyKey)),
            ("blank key", "   ", json!("x"), Err(SkipReason::EmptyKey)),
            ("key 64 chars", &k64, json!("x"), Ok((&k64, "x"))),
            (
                "key 65 chars",
                &k65,
                json!("x"),
                Err(SkipReason::KeyTooLong),
            ),
            (
                "key with space",
                "a b",
                json!("x"),
                Err(SkipReason::KeyCharset),
            ),
            (
                "key with dot",
                "a.b",
                json!("x"),
                Err(SkipReason::KeyCharset),
            ),
            (
                "key with colon",
                "a:b",
                json!("x"),
                Err(SkipReason::KeyCharset),
            ),
            (
                "key non-ascii letter",
                "régión",
                json!("x"),
                Err(SkipReason::KeyCharset),
            ),
            ("value 256 chars", "k", json!(v256), Ok(("k", &v256))),
            (
                "value 257 chars",
                "k",
                json!(v257),
                Err(SkipReason::ValueTooLong),
            ),
            (
                "value 256 two-byte chars",
                "k",
                json!(e256),
                Ok(("k", &e256)),
            ),
            (
                "value 257 two-byte chars",
                "k",
                json!(e257),
                Err(SkipReason::ValueTooLong),
            ),
            (
                "value 256 four-byte chars",
                "k",
                json!(emoji256),
                Ok(("k", &emoji256)),
            ),
            ("empty value ok", "k", json!(""), Ok(("k", ""))),
            ("integer", "k", json!(42), Ok(("k", "42"))),
            ("negative", "k", json!(-7), Ok(("k", "-7"))),
            ("float", "k", json!(1.5), Ok(("k", "1.5"))),
            ("true", "k", json!(true), Ok(("k", "true"))),
            ("false", "k", json!(false), Ok(("k", "false"))),
            ("null", "k", json!(null), Err(SkipReason::ValueType)),
            ("array", "k", json!(["a"]), Err(SkipReason::ValueType)),
            ("object", "k", json!({"a": 1}), Err(SkipReason::ValueType)),
        ];
        for (name, key, value, want) in rows {
            let got = normalize_one(key, &value);
            let want = want.map(|(k, v)| (k.to_string(), v.to_string()));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn value_length_counts_characters_after_trim() {
        let padded = format!("  {}  ", "v".repeat(256));
        assert!(normalize_one("k", &json!(padded)).is_ok());
    }

    #[test]
    fn twenty_tags_kept_twenty_one_skips_the_last_by_key() {
        let mut m = serde_json::Map::new();
        for i in 0..20 {
            m.insert(format!("k{i:02}"), json!("v"));
        }
        let (t, s) = norm(Value::Object(m.clone()));
        assert_eq!(t.len(), 20);
        assert!(s.is_empty());
        m.insert("k20".into(), json!("v"));
        let (t, s) = norm(Value::Object(m));
        assert_eq!(t.len(), 20);
        assert_eq!(s, vec![("k20".to_string(), SkipReason::TooMany)]);
    }

    #[test]
    fn invalid_tags_do_not_count_towards_the_cap() {
        let mut m = serde_json::Map::new();
        for i in 0..20 {
            m.insert(format!("k{i:02}"), json!("v"));
        }
        m.insert("bad key".into(), json!("v"));
        let (t, s) = norm(Value::Object(m));
        assert_eq!(t.len(), 20);
        assert_eq!(s, vec![("bad key".to_string(), SkipReason::KeyCharset)]);
    }

    #[test]
    fn skipping_one_keeps_the_rest() {
        let (t, s) = norm(json!({"env": "staging", "bad key": "x", "region": "eu", "n": null}));
        assert_eq!(t, pairs(&[("env", "staging"), ("region", "eu")]));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn not_an_object_is_skipped_whole() {
        let (t, s) = norm(json!("env=staging"));
        assert!(t.is_empty());
        assert_eq!(s, vec![("metaTags".to_string(), SkipReason::NotAnObject)]);
        let (t, s) = normalize_value(None);
        assert!(t.is_empty() && s.is_empty());
    }

    fn tags(p: &[(&str, &str)]) -> Tags {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn precedence_event_over_session_over_static() {
        let (t, s) = merge(
            &tags(&[("env", "event")]),
            &tags(&[("env", "session"), ("team", "support")]),
            &tags(&[("env", "static"), ("team", "static"), ("host", "h1")]),
        );
        assert_eq!(
            t,
            tags(&[("env", "event"), ("host", "h1"), ("team", "support")])
        );
        assert!(s.is_empty());
    }

    #[test]
    fn cap_after_merge_keeps_higher_precedence() {
        let ev: Tags = (0..15).map(|i| (format!("e{i:02}"), "v".into())).collect();
        let se: Tags = (0..4).map(|i| (format!("s{i:02}"), "v".into())).collect();
        let st: Tags = (0..3).map(|i| (format!("a{i:02}"), "v".into())).collect();
        let (t, s) = merge(&ev, &se, &st);
        assert_eq!(t.len(), 20);
        assert!(t.contains_key("e14") && t.contains_key("s03"));
        assert!(t.contains_key("a00"));
        assert!(!t.contains_key("a01") && !t.contains_key("a02"));
        let skipped: Vec<String> = s.into_iter().map(|s| s.key).collect();
        assert_eq!(skipped, vec!["a01".to_string(), "a02".to_string()]);
    }

    #[test]
    fn overridden_keys_do_not_count_twice() {
        let ev: Tags = (0..20).map(|i| (format!("k{i:02}"), "e".into())).collect();
        let se: Tags = (0..20).map(|i| (format!("k{i:02}"), "s".into())).collect();
        let (t, s) = merge(&ev, &se, &Tags::new());
        assert_eq!(t.len(), 20);
        assert!(t.values().all(|v| v == "e"));
        assert!(s.is_empty());
    }
}
