//! Filter expressions: the dashboard's "Event meta tags" field (CONTRACT §5).
//!
//! Chips are separated by commas or newlines, trimmed, empty ones ignored; every chip must
//! match (AND). A chip is split on its first `:`:
//!
//! | chip          | matches tags where                              |
//! |---------------|-------------------------------------------------|
//! | `env`         | key `env` exists, or any value equals `env`     |
//! | `env:staging` | the exact pair env = staging                    |
//! | `env:`        | key `env` exists (any value)                    |
//! | `:us-east`    | any value equals `us-east`                      |
//!
//! Matching is exact and case-sensitive. A chip of a lone `:` says nothing and is ignored.

use crate::tags::Tags;

/// One chip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chip {
    /// `word`: key exists or any value equals it.
    KeyOrValue(String),
    /// `key:value`.
    Pair(String, String),
    /// `key:`.
    Key(String),
    /// `:value`.
    Value(String),
}

impl Chip {
    fn matches(&self, tags: &Tags) -> bool {
        match self {
            Chip::KeyOrValue(w) => tags.contains_key(w) || tags.values().any(|v| v == w),
            Chip::Pair(k, v) => tags.get(k) == Some(v),
            Chip::Key(k) => tags.contains_key(k),
            Chip::Value(v) => tags.values().any(|x| x == v),
        }
    }
}

/// A parsed filter: the AND of its chips. The empty filter matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    chips: Vec<Chip>,
}

impl Filter {
    /// Parses one expression. Parsing cannot fail: every chip has a meaning.
    pub fn parse(expr: &str) -> Filter {
        let mut f = Filter::default();
        f.extend(expr);
        f
    }

    /// Parses several expressions (several `--filter` options or `filter` parameters), ANDed.
    pub fn parse_all<'a>(exprs: impl IntoIterator<Item = &'a str>) -> Filter {
        let mut f = Filter::default();
        for e in exprs {
            f.extend(e);
        }
        f
    }

    fn extend(&mut self, expr: &str) {
        for raw in expr.split([',', '\n']) {
            let chip = raw.trim();
            if chip.is_empty() {
                continue;
            }
            let parsed = match chip.split_once(':') {
                None => Chip::KeyOrValue(chip.to_string()),
                Some((k, v)) => {
                    let (k, v) = (k.trim(), v.trim());
                    match (k.is_empty(), v.is_empty()) {
                        (true, true) => continue,
                        (false, true) => Chip::Key(k.to_string()),
                        (true, false) => Chip::Value(v.to_string()),
                        (false, false) => Chip::Pair(k.to_string(), v.to_string()),
                    }
                }
            };
            self.chips.push(parsed);
        }
    }

    /// Whether the tags satisfy every chip.
    pub fn matches(&self, tags: &Tags) -> bool {
        self.chips.iter().all(|c| c.matches(tags))
    }

    /// Whether the filter has no chips (matches everything).
    pub fn is_empty(&self) -> bool {
        self.chips.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(p: &[(&str, &str)]) -> Tags {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn seed_table() {
        let staging_us = tags(&[("env", "staging"), ("region", "us-east")]);
        let prod_eu = tags(&[("env", "prod"), ("region", "eu")]);
        let has_us_east_key = tags(&[("us-east", "1")]);
        let value_env = tags(&[("kind", "env")]);
        let none = Tags::new();
        let url = tags(&[("url", "http://x")]);
        // (name, filter, tags, expected)
        let rows: Vec<(&str, &str, &Tags, bool)> = vec![
            ("env: key exists", "env", &staging_us, true),
            ("env: any value equals env", "env", &value_env, true),
            ("env: neither", "env", &none, false),
            ("us-east: key exists", "us-east", &has_us_east_key, true),
            ("us-east: value equals", "us-east", &staging_us, true),
            ("us-east: neither", "us-east", &prod_eu, false),
            ("env:staging exact pair", "env:staging", &staging_us, true),
            ("env:staging other value", "env:staging", &prod_eu, false),
            (
                "env:staging is case-sensitive",
                "env:Staging",
                &staging_us,
                false,
            ),
            (
                "env:staging value under other key",
                "kind:staging",
                &staging_us,
                false,
            ),
            ("env: key exists any value", "env:", &prod_eu, true),
            ("env: key missing", "env:", &value_env, false),
            (":us-east any value", ":us-east", &staging_us, true),
            (":us-east not as key", ":us-east", &has_us_east_key, false),
            (":us-east absent", ":us-east", &prod_eu, false),
            (
                "AND of chips",
                "env:staging, region:us-east",
                &staging_us,
                true,
            ),
            (
                "AND fails on one",
                "env:staging, region:eu",
                &staging_us,
                false,
            ),
            ("newline separates", "env:prod\nregion:eu", &prod_eu, true),
            ("empty chips ignored", " , env:prod,, ", &prod_eu, true),
            ("empty filter matches all", "", &none, true),
            ("split on first colon", "url:http://x", &url, true),
            ("lone colon ignored", ":", &none, true),
        ];
        for (name, expr, t, want) in rows {
            assert_eq!(Filter::parse(expr).matches(t), want, "{name}");
        }
    }

    #[test]
    fn several_filters_are_anded() {
        let t = tags(&[("env", "staging"), ("region", "eu")]);
        assert!(Filter::parse_all(["env:staging", "region:eu"]).matches(&t));
        assert!(!Filter::parse_all(["env:staging", "region:us"]).matches(&t));
    }
}
