//! Ed25519 key pairs and the JWTs they sign, as an operator's token issuer makes them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libsql_server::auth::keys::{to_pem, PublicKey};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::Value;

pub struct Signer {
    key: EncodingKey,
    public: PublicKey,
}

impl Signer {
    pub fn generate() -> Signer {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = PublicKey(pair.public_key().as_ref().try_into().unwrap());
        Signer { key: EncodingKey::from_ed_der(pkcs8.as_ref()), public }
    }

    /// A JWT with `claims`, signed with EdDSA.
    pub fn token(&self, claims: Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key).unwrap()
    }

    /// The public key as a PEM `PUBLIC KEY` block.
    pub fn pem(&self) -> String {
        to_pem(&self.public)
    }

    /// The public key's 32 bytes in URL-safe base64.
    pub fn raw(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.public.0)
    }
}

/// Seconds since the epoch, `offset` from now.
pub fn epoch_secs(offset: i64) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    now + offset
}
