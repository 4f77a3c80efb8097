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
//! the expiry and the namespace.

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

/// What is known of the addressed namespace's own key.
#[derive(Debug, Clone, Copy)]
pub enum NamespaceKey<'a> {
    /// Not looked up yet (looking it up may mean opening the namespace).
    Unknown,
    /// Its configured `jwt_key`, if it has one.
    Known(Option<&'a str>),
}

/// The outcome of a check.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Granted(Access),
    /// Ask again with the namespace's key ([`NamespaceKey::Known`]).
    NeedsNamespaceKey,
    Refused(AuthError),
}

/// How the server authenticates users: its keys and the legacy basic credential.
pub struct Auth {
    keys: Vec<DecodingKey>,
    /// The base64 of `user:password` that `authorization: Basic …` must carry.
    basic: Option<String>,
    verified: Mutex<HashMap<Box<str>, Verified>>,
    hits: Arc<LimitHits>,
}

#[derive(Clone)]
struct Verified {
    claims: Arc<Claims>,
    /// The namespace key text that verified it; `None`: one of the server's keys.
    by: Option<Box<str>>,
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
                STANDARD.decode(encoded).map_err(|_| ConfigError::BadHttpAuth)?;
                Some(encoded.to_owned())
            }
        };
        Ok(Auth { keys, basic, verified: Mutex::new(HashMap::new()), hits })
    }

    /// Whether the server itself requires a credential (namespace keys aside).
    pub fn required(&self) -> bool {
        !self.keys.is_empty() || self.basic.is_some()
    }

    /// Checks `credential` (an `authorization` value: `Bearer <jwt>`, `Basic <…>`, or a bare
    /// JWT as a WebSocket `hello` carries it) for namespace `ns`. Refusals are counted.
    pub fn check(&self, credential: Option<&[u8]>, ns: &NamespaceName, ns_key: NamespaceKey<'_>) -> Decision {
        let decision = self.decide(credential, ns, ns_key);
        if let Decision::Refused(e) = &decision {
            self.refused(e, ns);
        }
        decision
    }

    /// Counts (and logs, throttled) a refusal, including one made later (a write on a
    /// read-only grant).
    pub fn refused(&self, e: &AuthError, ns: &NamespaceName) {
        self.hits.refuse(e.refusal(), format_args!("namespace {ns}: {e}"));
    }

    fn decide(&self, credential: Option<&[u8]>, ns: &NamespaceName, ns_key: NamespaceKey<'_>) -> Decision {
        let ns_key = match ns_key {
            NamespaceKey::Known(key) => Some(key),
            NamespaceKey::Unknown => None,
        };
        if !self.required() {
            match ns_key {
                None => return Decision::NeedsNamespaceKey,
                Some(None) => return Decision::Granted(Access::ReadWrite),
                Some(Some(_)) => {}
            }
        }
        let token = match credential.map(parse_credential) {
            None | Some(Credential::Empty) => return Decision::Refused(AuthError::Missing),
            Some(Credential::Malformed(why)) => return Decision::Refused(AuthError::Malformed(why)),
            Some(Credential::Basic(value)) => {
                return match &self.basic {
                    Some(expected) if constant_time_eq(value.as_bytes(), expected.as_bytes()) => Decision::Granted(Access::ReadWrite),
                    _ => Decision::Refused(AuthError::BadPassword),
                };
            }
            Some(Credential::Bearer(token)) => token,
        };
        let claims = match self.verified(token, ns_key) {
            Ok(claims) => claims,
            Err(decision) => return decision,
        };
        if claims.expired(now()) {
            return Decision::Refused(AuthError::Expired);
        }
        match claims.access_to(ns.as_str()) {
            Some(access) => Decision::Granted(access),
            None => Decision::Refused(AuthError::WrongNamespace(ns.to_string())),
        }
    }

    /// The claims of `token` once its signature verified with the server's keys or the
    /// namespace's (`ns_key`, when looked up); remembered.
    fn verified(&self, token: &str, ns_key: Option<Option<&str>>) -> Result<Arc<Claims>, Decision> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Decision::Refused(AuthError::Malformed("the token is too long")));
        }
        if let Some(hit) = self.cached(token) {
            match (&hit.by, ns_key) {
                (None, _) => return Ok(hit.claims),
                (Some(by), Some(Some(key))) if **by == *key => return Ok(hit.claims),
                _ => {}
            }
        }
        let mut outcome = verify(token, &self.keys);
        let mut by = None;
        if matches!(outcome, Err(AuthError::BadSignature)) {
            match ns_key {
                None => return Err(Decision::NeedsNamespaceKey),
                Some(Some(key)) => {
                    // A namespace key that does not parse verifies nothing (it was checked when set).
                    let keys: Vec<DecodingKey> = keys::parse(key).map(|k| k.iter().map(decoding_key).collect()).unwrap_or_default();
                    outcome = verify(token, &keys);
                    by = Some(Box::from(key));
                }
                Some(None) => {}
            }
        }
        let claims = Arc::new(outcome.map_err(Decision::Refused)?);
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= CACHE_ENTRIES {
            verified.clear();
        }
        verified.insert(Box::from(token), Verified { claims: claims.clone(), by });
        Ok(claims)
    }

    fn cached(&self, token: &str) -> Option<Verified> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned()
    }
}

/// Checks a namespace's `jwt_key` when it is set (admin create/config): what would not verify
/// anything is refused then, not at the first request.
pub fn check_namespace_key(text: &str) -> Result<(), KeyError> {
    keys::parse(text).map(|_| ())
}

enum Credential<'a> {
    Empty,
    Bearer(&'a str),
    Basic(&'a str),
    Malformed(&'static str),
}

fn parse_credential(value: &[u8]) -> Credential<'_> {
    let Ok(text) = std::str::from_utf8(value) else {
        return Credential::Malformed("the authorization value is not UTF-8");
    };
    let text = text.trim();
    if text.is_empty() {
        return Credential::Empty;
    }
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() { Credential::Empty } else { Credential::Bearer(rest) }
    } else if scheme.eq_ignore_ascii_case("basic") {
        Credential::Basic(rest)
    } else if rest.is_empty() && text.matches('.').count() == 2 {
        // A bare token (a WebSocket `hello`'s `jwt`).
        Credential::Bearer(text)
    } else {
        Credential::Malformed("the authorization scheme is neither Bearer nor Basic")
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
                ErrorKind::Json(_) => return Err(AuthError::Malformed("the token's claims are not what this server reads")),
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
