//! Which namespace a user request addresses: `x-namespace-bin`, then `x-namespace`, then the
//! first label of `Host` (`tenant.example.com` → `tenant`, `127.0.0.1:8080` → `127`).

use axum::http::HeaderMap;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;

use super::ApiError;
use crate::namespace::NamespaceName;

pub fn namespace_of(headers: &HeaderMap, namespaces_enabled: bool) -> Result<NamespaceName, ApiError> {
    if !namespaces_enabled {
        return Ok(NamespaceName::default_namespace());
    }
    if let Some(value) = headers.get("x-namespace-bin") {
        let text = value.to_str().map_err(|_| ApiError::bad_request("x-namespace-bin is not ASCII"))?;
        let text = text.trim_end_matches('=');
        let bytes = STANDARD_NO_PAD
            .decode(text)
            .or_else(|_| URL_SAFE_NO_PAD.decode(text))
            .map_err(|_| ApiError::bad_request("x-namespace-bin is not base64"))?;
        let name = String::from_utf8(bytes).map_err(|_| ApiError::bad_request("x-namespace-bin is not UTF-8"))?;
        return Ok(NamespaceName::new(name)?);
    }
    if let Some(value) = headers.get("x-namespace") {
        let name = value.to_str().map_err(|_| ApiError::bad_request("x-namespace is not ASCII"))?;
        return Ok(NamespaceName::new(name)?);
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| ApiError::bad_request("no namespace: send x-namespace or a Host header"))?;
    let label = host.split(['.', ':']).next().unwrap_or_default();
    Ok(NamespaceName::new(label)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    fn ns(pairs: &[(&'static str, &'static str)]) -> Result<String, u16> {
        namespace_of(&headers(pairs), true).map(|n| n.to_string()).map_err(|e| e.status.as_u16())
    }

    #[test]
    fn headers_take_precedence_in_order() {
        assert_eq!(ns(&[("x-namespace-bin", "dGVuYW50"), ("x-namespace", "other"), ("host", "h.x")]), Ok("tenant".into()));
        assert_eq!(ns(&[("x-namespace", "other"), ("host", "h.x")]), Ok("other".into()));
        assert_eq!(ns(&[("host", "tenant.example.com")]), Ok("tenant".into()));
        assert_eq!(ns(&[("host", "127.0.0.1:8080")]), Ok("127".into()));
        assert_eq!(ns(&[("x-namespace-bin", "MTI3")]), Ok("127".into()));
    }

    #[test]
    fn bad_names_are_client_errors() {
        assert_eq!(ns(&[("x-namespace", "../etc")]), Err(400));
        assert_eq!(ns(&[("x-namespace-bin", "!!!")]), Err(400));
        assert_eq!(ns(&[]), Err(400));
    }

    #[test]
    fn without_namespaces_everything_is_default() {
        let name = namespace_of(&headers(&[("x-namespace", "other")]), false).unwrap();
        assert_eq!(name.as_str(), "default");
    }
}
