//! Namespace names: the only user input that becomes a path on disk, so it is checked here once.

use std::fmt;

/// Longest accepted name. A DNS label (the name often arrives as the first label of `Host`)
/// holds at most 63 characters; leave room for longer internal names but keep paths short.
pub const MAX_NAME_LEN: usize = 128;

/// A validated namespace name: ASCII letters, digits, `-` and `_`, 1 to [`MAX_NAME_LEN`]
/// characters. It can never address a path outside `dbs/` (no `/`, `\`, `.`, or NUL).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidName {
    #[error("namespace name is empty")]
    Empty,
    #[error("namespace name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("namespace name {0:?} may only hold ASCII letters, digits, '-' and '_'")]
    BadCharacter(String),
}

impl NamespaceName {
    pub const DEFAULT: &'static str = "default";

    pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
        let name = name.into();
        if name.is_empty() {
            return Err(InvalidName::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(InvalidName::TooLong);
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(InvalidName::BadCharacter(name));
        }
        Ok(Self(name))
    }

    pub fn default_namespace() -> Self {
        Self(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NamespaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NamespaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for name in ["default", "a", "tenant-42", "A_b-C", &"x".repeat(MAX_NAME_LEN)] {
            assert_eq!(NamespaceName::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn rejects_names_that_could_escape_or_confuse_the_data_directory() {
        assert_eq!(NamespaceName::new(""), Err(InvalidName::Empty));
        assert_eq!(NamespaceName::new("x".repeat(MAX_NAME_LEN + 1)), Err(InvalidName::TooLong));
        for bad in ["..", "../etc", "a/b", "a\\b", "a b", ".hidden", "a\0b", "é", "a.b"] {
            assert!(
                matches!(NamespaceName::new(bad), Err(InvalidName::BadCharacter(_))),
                "{bad:?} was accepted"
            );
        }
    }
}
