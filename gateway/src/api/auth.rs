//! Authentication: `Authorization: Bearer <key>`. Keys are configured as SHA-256 digests; a
//! presented key is hashed, looked up by digest, and confirmed with a constant-time
//! comparison. Merchants and the admin are distinct principals.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::error::ApiError;
use super::AppState;
use crate::config::{Config, Merchant};
use crate::secret::KeyDigest;

#[derive(Debug, Clone)]
enum Principal {
    Merchant(Arc<Merchant>),
    Admin,
}

/// Maps key digests to principals.
#[derive(Debug)]
pub struct Authenticator {
    keys: HashMap<KeyDigest, Principal>,
    merchants: HashMap<String, Arc<Merchant>>,
}

impl Authenticator {
    pub fn new(config: &Config) -> Self {
        let mut keys = HashMap::new();
        let mut merchants = HashMap::new();
        for merchant in &config.merchants {
            let merchant = Arc::new(merchant.clone());
            for digest in &merchant.key_digests {
                keys.insert(*digest, Principal::Merchant(merchant.clone()));
            }
            merchants.insert(merchant.id.as_str().to_owned(), merchant);
        }
        for digest in &config.admin_key_digests {
            keys.insert(*digest, Principal::Admin);
        }
        Self { keys, merchants }
    }

    fn principal(&self, parts: &Parts) -> Option<&Principal> {
        let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
        let key = value.strip_prefix("Bearer ")?.trim();
        if key.is_empty() {
            return None;
        }
        let digest = KeyDigest::of(key);
        let (stored, principal) = self.keys.get_key_value(&digest)?;
        stored.ct_eq(&digest).then_some(principal)
    }

    /// A configured merchant by id (admin routes name the merchant in the body).
    pub fn merchant(&self, id: &str) -> Option<Arc<Merchant>> {
        self.merchants.get(id).cloned()
    }
}

/// The authenticated merchant of a request.
pub struct AuthMerchant(pub Arc<Merchant>);

impl FromRequestParts<Arc<AppState>> for AuthMerchant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        match state.auth.principal(parts) {
            Some(Principal::Merchant(merchant)) => Ok(AuthMerchant(merchant.clone())),
            // The admin key is not a merchant key: merchant routes act for one merchant.
            Some(Principal::Admin) => Err(ApiError::Forbidden(
                "this route takes a merchant API key".into(),
            )),
            None => Err(ApiError::Unauthorized),
        }
    }
}

/// The request was made with the admin key.
pub struct AuthAdmin;

impl FromRequestParts<Arc<AppState>> for AuthAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        match state.auth.principal(parts) {
            Some(Principal::Admin) => Ok(AuthAdmin),
            Some(Principal::Merchant(_)) => {
                Err(ApiError::Forbidden("this route takes the admin key".into()))
            }
            None => Err(ApiError::Unauthorized),
        }
    }
}
