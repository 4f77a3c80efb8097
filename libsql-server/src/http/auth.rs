//! The user API's side of [`crate::auth`]: the namespace a request addresses and the access its
//! `authorization` header grants there, as an extractor every user route that touches a
//! namespace takes. Refusals are 401 with the reason (see `http::error`).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::StatusCode;

use super::user::UserState;
use super::ApiError;
use crate::auth::{Access, Auth, AuthError, Decision, NamespaceKey};
use crate::namespace::{NamespaceName, NamespaceStore};

/// A request's namespace, and what its credential lets it do there.
pub struct Authorized {
    pub ns: NamespaceName,
    pub access: Access,
}

impl Authorized {
    /// Refuses a request that would write with a read-only grant (a sync push, say).
    pub fn require_write(&self, auth: &Auth) -> Result<(), ApiError> {
        if self.access == Access::ReadWrite {
            return Ok(());
        }
        auth.refused(&AuthError::ReadOnly, &self.ns);
        Err(AuthError::ReadOnly.into())
    }
}

#[axum::async_trait]
impl FromRequestParts<UserState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &UserState) -> Result<Self, ApiError> {
        let ns = state.namespace(&parts.headers)?;
        let credential = parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        let access = authorize(&state.auth, state.hrana.store(), credential, &ns).await?;
        Ok(Authorized { ns, access })
    }
}

/// The access `credential` grants to `ns`, looking up the namespace's own key only when the
/// server's keys do not decide (a namespace with a `jwt_key`, or no server keys at all).
pub async fn authorize(auth: &Arc<Auth>, store: &NamespaceStore, credential: Option<&[u8]>, ns: &NamespaceName) -> Result<Access, ApiError> {
    let mut decision = auth.check(credential, ns, NamespaceKey::Unknown);
    if decision == Decision::NeedsNamespaceKey {
        let config = store.stored_config(ns).await?;
        decision = auth.check(credential, ns, NamespaceKey::Known(config.jwt_key.as_deref().filter(|k| !k.is_empty())));
    }
    match decision {
        Decision::Granted(access) => Ok(access),
        Decision::Refused(e) => Err(e.into()),
        Decision::NeedsNamespaceKey => {
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "authentication asked for the namespace key twice"))
        }
    }
}
