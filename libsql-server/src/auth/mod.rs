//! Who may use a namespace, and how: the one check every user-facing transport calls with the
//! credential it carried (`authorization` on HTTP, the `jwt` of a WebSocket `hello`, gRPC
//! metadata) and the namespace it addresses.
//!
//! Credentials are the libSQL server's: EdDSA JWTs verified by the server's keys
//! (`--auth-jwt-key-file`, `SQLD_AUTH_JWT_KEY`) or by the namespace's own `jwt_key`, and the
//! legacy basic scheme (`--http-auth basic:…`). Without any of them a namespace is open to
//! everyone, as it is upstream. Refusals say why (missing, malformed, bad signature, expired,
//! wrong namespace) and never carry the credential itself.
//!
//! A signature check costs tens of microseconds, several times a point read's own work, so a
//! verified token's claims are kept (bounded) and later requests only look them up and check
//! the expiry and the namespace. Namespaces' keys come from memory (`NamespaceStore::jwt_key`),
//! so no check opens a namespace or reads the disk.

mod claims;
pub mod keys;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

pub use claims::Claims;
pub use keys::{KeyError, PublicKey};

pub use crate::database::Access;
use crate::limit_hits::{LimitHits, Refusal};
use crate::namespace::NamespaceName;

/// Longest token accepted: real ones are a few hundred bytes; this bounds what the cache holds.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Verified tokens remembered; past it the cache starts over (a miss costs one verification).
const CACHE_ENTRIES: usize = 1024;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send `authorization: Bearer <token>`")]
    Missing,
    #[error("the credential is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token's signature does not verify with any key of this server or namespace")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token grants no access to namespace `{0}`")]
    WrongNamespace(String),
    #[error("the credentials are wrong")]
    BadPassword,
    #[error("the token grants read-only access: writes are refused")]
    ReadOnly,
}

impl AuthError {
    /// The refusal's code in answers, on every transport.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "AUTH_MISSING",
            AuthError::Malformed(_) => "AUTH_MALFORMED",
            AuthError::BadSignature => "AUTH_BAD_SIGNATURE",
            AuthError::Expired => "AUTH_EXPIRED",
            AuthError::WrongNamespace(_) => "AUTH_WRONG_NAMESPACE",
            AuthError::BadPassword => "AUTH_BAD_PASSWORD",
            AuthError::ReadOnly => "AUTH_READ_ONLY",
        }
    }

    pub fn refusal(&self) -> Refusal {
        match self {
            AuthError::Missing => Refusal::Missing,
            AuthError::Malformed(_) => Refusal::Malformed,
            AuthError::BadSignature => Refusal::BadSignature,
            AuthError::Expired => Refusal::Expired,
            AuthError::WrongNamespace(_) => Refusal::WrongNamespace,
            AuthError::BadPassword => Refusal::BadPassword,
            AuthError::ReadOnly => Refusal::ReadOnly,
        }
    }
}

/// A credential as a transport carried it.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// An `authorization` header's value (`Bearer <jwt>`, `Basic <...>`), if there was one.
    Header(Option<&'a [u8]>),
    /// A bare JWT (a WebSocket `hello`'s `jwt`), if there was one.
    Jwt(Option<&'a str>),
}

/// How the server authenticates users: its keys and the legacy basic credential.
pub struct Auth {
    keys: Vec<DecodingKey>,
    /// The base64 of `user:password` that `authorization: Basic …` must carry.
    basic: Option<String>,
    /// Claims of tokens the server's keys verified.
    verified: Mutex<HashMap<Box<str>, Arc<Claims>>>,
    /// Claims of tokens a namespace's key verified, with that key: apart, so tokens a tenant
    /// mints with its own key never push out the ones the server's keys verified.
    verified_by_namespace: Mutex<HashMap<Box<str>, (Arc<str>, Arc<Claims>)>>,
    hits: Arc<LimitHits>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the JWT keys: {0}")]
    Keys(#[from] KeyError),
    #[error("--http-auth must be `basic:<base64 of user:password>`")]
    BadHttpAuth,
    #[error("cannot read the JWT key file {}: {source}", path.display())]
    KeyFile { path: std::path::PathBuf, source: std::io::Error },
}

impl Auth {
    /// `keys`: the text of the key file (or `SQLD_AUTH_JWT_KEY`); `http_auth`: the
    /// `--http-auth` value. Neither: users need no credential (namespace keys still apply).
    pub fn new(keys: Option<&str>, http_auth: Option<&str>, hits: Arc<LimitHits>) -> Result<Self, ConfigError> {
        let keys = match keys {
            Some(text) => keys::parse(text)?.iter().map(decoding_key).collect(),
            None => Vec::new(),
        };
        let basic = match http_auth {
            None => None,
            Some(value) => {
                let encoded = value.strip_prefix("basic:").ok_or(ConfigError::BadHttpAuth)?;
                let decoded = STANDARD.decode(encoded).map_err(|_| ConfigError::BadHttpAuth)?;
                // `user:password`; an empty one would let an empty `Basic` credential in.
                if !decoded.contains(&b':') || decoded.len() < 2 {
                    return Err(ConfigError::BadHttpAuth);
                }
                Some(encoded.to_owned())
            }
        };
        Ok(Auth { keys, basic, verified: Mutex::default(), verified_by_namespace: Mutex::default(), hits })
    }

    /// Whether the server itself requires a credential (namespace keys aside).
    pub fn required(&self) -> bool {
        !self.keys.is_empty() || self.basic.is_some()
    }

    /// The access `credential` grants to namespace `ns`, whose own `jwt_key` is `ns_key` (see
    /// `NamespaceStore::jwt_key`). Refusals are counted.
    pub fn check(&self, credential: Credential<'_>, ns: &NamespaceName, ns_key: Option<&str>) -> Result<Access, AuthError> {
        let decision = self.decide(credential, ns, ns_key);
        if let Err(e) = &decision {
            self.refused(e, ns);
        }
        decision
    }

    /// Counts (and logs, throttled) a refusal, including one made later (a write on a
    /// read-only grant).
    pub fn refused(&self, e: &AuthError, ns: &NamespaceName) {
        self.hits.refuse(e.refusal(), format_args!("namespace {ns}: {e}"));
    }

    fn decide(&self, credential: Credential<'_>, ns: &NamespaceName, ns_key: Option<&str>) -> Result<Access, AuthError> {
        if !self.required() && ns_key.is_none() {
            return Ok(Access::ReadWrite);
        }
        let token = match credential {
            Credential::Header(None) | Credential::Jwt(None) => return Err(AuthError::Missing),
            Credential::Jwt(Some(token)) if token.trim().is_empty() => return Err(AuthError::Missing),
            Credential::Jwt(Some(token)) => token.trim(),
            Credential::Header(Some(value)) => match parse_header(value)? {
                Scheme::Bearer(token) => token,
                Scheme::Basic(value) => {
                    return match &self.basic {
                        Some(expected) if constant_time_eq(value.as_bytes(), expected.as_bytes()) => Ok(Access::ReadWrite),
                        _ => Err(AuthError::BadPassword),
                    };
                }
            },
        };
        let claims = self.verified(token, ns_key)?;
        if claims.expired(now()) {
            return Err(AuthError::Expired);
        }
        claims.access_to(ns.as_str()).ok_or_else(|| AuthError::WrongNamespace(ns.to_string()))
    }

    /// The claims of `token` once its signature verified with the server's keys or with the
    /// namespace's key; remembered.
    fn verified(&self, token: &str, ns_key: Option<&str>) -> Result<Arc<Claims>, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed("the token is too long"));
        }
        if let Some(claims) = lock(&self.verified).get(token) {
            return Ok(claims.clone());
        }
        if let Some(key) = ns_key {
            if let Some((by, claims)) = lock(&self.verified_by_namespace).get(token) {
                if **by == *key {
                    return Ok(claims.clone());
                }
            }
        }
        match verify(token, &self.keys) {
            Ok(claims) => return Ok(remember(&self.verified, token, Arc::new(claims))),
            Err(AuthError::BadSignature) => {}
            Err(e) => return Err(e),
        }
        let Some(key) = ns_key else {
            return Err(AuthError::BadSignature);
        };
        // A namespace key that does not parse verifies nothing (it was checked when set).
        let keys: Vec<DecodingKey> = keys::parse(key).map(|k| k.iter().map(decoding_key).collect()).unwrap_or_default();
        let claims = Arc::new(verify(token, &keys)?);
        Ok(remember(&self.verified_by_namespace, token, (Arc::from(key), claims)).1)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `value` for `token` in `cache`, which starts over when full (a miss costs one
/// signature check).
fn remember<V: Clone>(cache: &Mutex<HashMap<Box<str>, V>>, token: &str, value: V) -> V {
    let mut cache = lock(cache);
    if cache.len() >= CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(Box::from(token), value.clone());
    value
}

/// Checks a namespace's `jwt_key` when it is set (admin create/config): what would not verify
/// anything is refused then, not at the first request.
pub fn check_namespace_key(text: &str) -> Result<(), KeyError> {
    keys::parse(text).map(|_| ())
}

enum Scheme<'a> {
    Bearer(&'a str),
    Basic(&'a str),
}

fn parse_header(value: &[u8]) -> Result<Scheme<'_>, AuthError> {
    let text = std::str::from_utf8(value).map_err(|_| AuthError::Malformed("the authorization value is not UTF-8"))?.trim();
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            Err(AuthError::Missing)
        } else {
            Ok(Scheme::Bearer(rest))
        }
    } else if scheme.eq_ignore_ascii_case("basic") {
        Ok(Scheme::Basic(rest))
    } else if text.is_empty() {
        Err(AuthError::Missing)
    } else {
        Err(AuthError::Malformed("the authorization scheme is neither Bearer nor Basic"))
    }
}

fn decoding_key(key: &PublicKey) -> DecodingKey {
    DecodingKey::from_ed_der(&key.0)
}

/// The claims of `token` if any of `keys` verifies it (its expiry is checked by the caller,
/// also for remembered tokens).
fn verify(token: &str, keys: &[DecodingKey]) -> Result<Claims, AuthError> {
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    for key in keys {
        match jsonwebtoken::decode::<Claims>(token, key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidKeyFormat => continue,
                ErrorKind::InvalidAlgorithm => return Err(AuthError::Malformed("the token is not signed with EdDSA")),
                ErrorKind::Json(_) => return Err(AuthError::Malformed("the token's header or claims are not what this server reads")),
                _ => return Err(AuthError::Malformed("the token is not a JWT")),
            },
        }
    }
    Err(AuthError::BadSignature)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Compares secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
