//! The user API's side of [`crate::auth`]: the namespace a request addresses and the access its
//! `authorization` header grants there, as an extractor every user route that touches a
//! namespace takes. Refusals are 401 with the reason (see `http::error`).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::user::UserState;
use super::ApiError;
use crate::auth::{Access, Auth, AuthError, Credential};
use crate::namespace::NamespaceName;

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
        state.hrana.store().learn_config(&ns).await?;
        let credential = Credential::Header(parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes()));
        let access = state.auth.check(credential, &ns, state.hrana.store().jwt_key(&ns).as_deref())?;
        Ok(Authorized { ns, access })
    }
}
