//! What a token grants: its claims as the libSQL server reads them.
//!
//! - `exp`: whole seconds since the epoch; absent, the token does not expire.
//! - `a` (`"ro"`, `"rw"`, `"roa"`) with an optional `id`: that access to the namespace `id`,
//!   or to every namespace without one (the legacy form).
//! - `id` alone: read-write on that namespace only.
//! - `p`: permission → `{"ns": [names]}`: that access to the listed namespaces. With `p`, a
//!   legacy `a` counts only together with an `id` (it never widens `p` to every namespace).
//!
//! A token with none of `a`, `id` and `p` grants everything. `rw` implies reading; a
//! permission this server does not know (`ddl`) grants nothing here.

use std::collections::HashMap;

use serde::Deserialize;

use crate::database::Access;

#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    a: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    p: Option<HashMap<String, Option<Scope>>>,
}

#[derive(Debug, Clone, Deserialize)]
struct Scope {
    #[serde(default)]
    ns: Vec<String>,
}

/// Seconds a token stays good past its `exp`, for clocks that disagree (the JWT library's
/// usual allowance).
const LEEWAY_SECS: f64 = 60.0;

impl Claims {
    /// Whether the token had expired at `now` (seconds since the epoch).
    pub fn expired(&self, now: f64) -> bool {
        self.exp.is_some_and(|exp| exp as f64 + LEEWAY_SECS < now)
    }

    /// The access the token grants to namespace `ns`, if any.
    pub fn access_to(&self, ns: &str) -> Option<Access> {
        let legacy = match (self.a.as_deref(), self.id.as_deref()) {
            (None, None) if self.p.is_none() => return Some(Access::ReadWrite),
            (None, None) => None,
            (None, Some(id)) => (id == ns).then_some(Access::ReadWrite),
            (Some(a), Some(id)) => (id == ns).then(|| legacy_level(a)).flatten(),
            // Every namespace, unless `p` says which.
            (Some(a), None) => self.p.is_none().then(|| legacy_level(a)).flatten(),
        };
        let listed = self
            .p
            .iter()
            .flatten()
            .filter(|(_, scope)| scope.as_ref().is_some_and(|s| s.ns.iter().any(|n| n == ns)))
            .filter_map(|(perm, _)| level(perm));
        legacy.into_iter().chain(listed).max()
    }
}

/// The legacy `a` claim's values.
fn legacy_level(a: &str) -> Option<Access> {
    match a {
        "rw" => Some(Access::ReadWrite),
        "ro" | "roa" => Some(Access::ReadOnly),
        _ => None,
    }
}

/// The permissions of `p`.
fn level(permission: &str) -> Option<Access> {
    match permission {
        "rw" | "rwa" => Some(Access::ReadWrite),
        "ro" | "roa" => Some(Access::ReadOnly),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: serde_json::Value) -> Claims {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn legacy_form() {
        assert_eq!(claims(json!({})).access_to("x"), Some(Access::ReadWrite));
        assert_eq!(claims(json!({"a": "ro"})).access_to("x"), Some(Access::ReadOnly));
        assert_eq!(claims(json!({"a": "rw", "id": "x"})).access_to("x"), Some(Access::ReadWrite));
        assert_eq!(claims(json!({"a": "rw", "id": "x"})).access_to("y"), None);
        assert_eq!(claims(json!({"a": "ddl"})).access_to("x"), None);
        assert_eq!(claims(json!({"a": "rwa"})).access_to("x"), None);
        // `id` alone: that namespace only.
        assert_eq!(claims(json!({"id": "x"})).access_to("x"), Some(Access::ReadWrite));
        assert_eq!(claims(json!({"id": "x"})).access_to("y"), None);
    }

    #[test]
    fn permission_lists() {
        let c = claims(json!({"p": {"ro": {"ns": ["a", "b"]}, "rw": {"ns": ["b"]}, "ddl": {"ns": ["c"]}}}));
        assert_eq!(c.access_to("a"), Some(Access::ReadOnly));
        assert_eq!(c.access_to("b"), Some(Access::ReadWrite));
        assert_eq!(c.access_to("c"), None);
        assert_eq!(c.access_to("d"), None);
        // With `p`, a legacy `a` counts only with its `id`: it never widens `p`.
        let both = claims(json!({"a": "rw", "p": {"ro": {"ns": ["a"]}}}));
        assert_eq!(both.access_to("a"), Some(Access::ReadOnly));
        assert_eq!(both.access_to("z"), None);
        let scoped = claims(json!({"a": "rw", "id": "z", "p": {"ro": {"ns": ["a"]}, "rw": null}}));
        assert_eq!(scoped.access_to("z"), Some(Access::ReadWrite));
        assert_eq!(scoped.access_to("a"), Some(Access::ReadOnly));
        assert_eq!(claims(json!({"p": {}})).access_to("a"), None);
    }

    #[test]
    fn claims_of_the_wrong_type_do_not_parse() {
        for bad in [json!({"exp": "1000"}), json!({"exp": 1.5}), json!({"exp": 1e300}), json!({"a": 1}), json!({"p": {"ro": {"ns": "a"}}})]
        {
            assert!(serde_json::from_value::<Claims>(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn expiry_allows_a_minute_of_clock_skew() {
        let c = claims(json!({"exp": 1000}));
        assert!(!c.expired(1000.0));
        assert!(!c.expired(1059.0));
        assert!(c.expired(1061.0));
        assert!(!claims(json!({})).expired(f64::MAX));
    }
}
