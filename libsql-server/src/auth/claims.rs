//! What a token grants: its claims as the libSQL server reads them.
//!
//! - `exp`: seconds since the epoch; absent, the token does not expire.
//! - `a` (`"ro"`, `"rw"`, `"roa"`, `"rwa"`), with an optional `id`: that access to the
//!   namespace `id`, or to every namespace without one (the legacy form).
//! - `p`: permission → `{"ns": [names]}`: that access to the listed namespaces.
//!
//! A token with neither `a` nor `p` grants everything. `rw` implies reading; a permission this
//! server does not know (`ddl`) grants nothing here.

use std::collections::HashMap;

use serde::Deserialize;

use crate::database::Access;

#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    #[serde(default)]
    exp: Option<serde_json::Number>,
    #[serde(default)]
    a: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    p: Option<HashMap<String, Scope>>,
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
        self.exp.as_ref().and_then(|e| e.as_f64()).is_some_and(|exp| exp + LEEWAY_SECS < now)
    }

    /// The access the token grants to namespace `ns`, if any.
    pub fn access_to(&self, ns: &str) -> Option<Access> {
        if self.a.is_none() && self.p.is_none() {
            return Some(Access::ReadWrite);
        }
        let legacy = self.a.as_deref().filter(|_| self.id.as_deref().is_none_or(|id| id == ns)).and_then(level);
        let listed = self.p.iter().flatten().filter(|(_, scope)| scope.ns.iter().any(|n| n == ns)).filter_map(|(perm, _)| level(perm));
        legacy.into_iter().chain(listed).max()
    }
}

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
    }

    #[test]
    fn permission_lists() {
        let c = claims(json!({"p": {"ro": {"ns": ["a", "b"]}, "rw": {"ns": ["b"]}, "ddl": {"ns": ["c"]}}}));
        assert_eq!(c.access_to("a"), Some(Access::ReadOnly));
        assert_eq!(c.access_to("b"), Some(Access::ReadWrite));
        assert_eq!(c.access_to("c"), None);
        assert_eq!(c.access_to("d"), None);
        // Both forms: the larger grant wins.
        let both = claims(json!({"a": "ro", "p": {"rwa": {"ns": ["a"]}}}));
        assert_eq!(both.access_to("a"), Some(Access::ReadWrite));
        assert_eq!(both.access_to("z"), Some(Access::ReadOnly));
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
