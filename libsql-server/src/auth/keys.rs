//! Ed25519 public keys that verify users' tokens, read the way the libSQL server reads them:
//! PEM blocks (`-----BEGIN PUBLIC KEY-----`, the SubjectPublicKeyInfo of an Ed25519 key) and
//! bare keys (the 32 bytes in URL-safe base64, one a line), any number of each in one text.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { OID 1.3.101.112 },
/// BIT STRING (33 bytes, no unused bits) }, followed by the 32 key bytes.
const SPKI_ED25519_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// One Ed25519 public key (its 32 bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", URL_SAFE_NO_PAD.encode(self.0))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a private key was given where the public key belongs; give the public key only (openssl pkey -in key.pem -pubout)")]
    PrivateKey,
    #[error("a PEM block of type `{0}` is not an Ed25519 public key")]
    WrongBlock(String),
    #[error("a PEM block is not closed by its END line")]
    Unterminated,
    #[error("a PEM `PUBLIC KEY` block does not hold an Ed25519 key")]
    NotEd25519,
    #[error("line {0} is neither a PEM block nor a 32-byte key in URL-safe base64")]
    BadLine(usize),
    #[error("no key was found")]
    Empty,
    #[error("a key of small order (the identity or a point of order 2, 4 or 8) verifies forged signatures")]
    Weak,
}

/// Encodings of the Ed25519 points of small order (canonical, with the sign bit set, and the
/// non-canonical y = p and y = p + 1): a signature check against one can be passed without
/// the private key, so they are refused as keys.
const WEAK: [&str; 14] = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000080",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
];

fn checked(key: [u8; 32]) -> Result<PublicKey, KeyError> {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    if WEAK.contains(&hex.as_str()) {
        return Err(KeyError::Weak);
    }
    Ok(PublicKey(key))
}

/// Every key in `text`; at least one.
pub fn parse(text: &str) -> Result<Vec<PublicKey>, KeyError> {
    let mut keys = Vec::new();
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    while let Some((number, line)) = lines.next() {
        if line.is_empty() {
            continue;
        }
        if let Some(kind) = line.strip_prefix("-----BEGIN ").and_then(|rest| rest.strip_suffix("-----")) {
            if kind.contains("PRIVATE KEY") {
                return Err(KeyError::PrivateKey);
            }
            if kind != "PUBLIC KEY" {
                return Err(KeyError::WrongBlock(kind.to_owned()));
            }
            let end = format!("-----END {kind}-----");
            let mut body = String::new();
            loop {
                match lines.next() {
                    Some((_, l)) if l == end => break,
                    Some((_, l)) => body.push_str(l),
                    None => return Err(KeyError::Unterminated),
                }
            }
            let der = STANDARD.decode(body.as_bytes()).map_err(|_| KeyError::NotEd25519)?;
            let key = der.strip_prefix(&SPKI_ED25519_PREFIX[..]).and_then(|k| <[u8; 32]>::try_from(k).ok()).ok_or(KeyError::NotEd25519)?;
            keys.push(checked(key)?);
        } else {
            let raw = URL_SAFE_NO_PAD.decode(line.trim_end_matches('=')).map_err(|_| KeyError::BadLine(number))?;
            keys.push(checked(<[u8; 32]>::try_from(raw.as_slice()).map_err(|_| KeyError::BadLine(number))?)?);
        }
    }
    if keys.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(keys)
}

/// `key` as a PEM `PUBLIC KEY` block (tests write key files with it).
pub fn to_pem(key: &PublicKey) -> String {
    let mut der = SPKI_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&key.0);
    format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [7; 32];
    const B: [u8; 32] = [9; 32];

    #[test]
    fn both_formats_and_several_keys_in_one_text() {
        let text = format!("{}\n{}\n\n{}", to_pem(&PublicKey(A)), URL_SAFE_NO_PAD.encode(B), to_pem(&PublicKey(B)));
        assert_eq!(parse(&text).unwrap(), vec![PublicKey(A), PublicKey(B), PublicKey(B)]);
        // A bare key with padding, as some tools write it.
        assert_eq!(parse(&format!("{}=\n", URL_SAFE_NO_PAD.encode(A))).unwrap(), vec![PublicKey(A)]);
    }

    #[test]
    fn private_keys_and_other_blocks_are_refused() {
        let private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        assert_eq!(parse(private), Err(KeyError::PrivateKey));
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(parse(cert), Err(KeyError::WrongBlock("CERTIFICATE".into())));
        assert_eq!(parse("-----BEGIN PUBLIC KEY-----\nAAAA\n"), Err(KeyError::Unterminated));
        // An X25519 key (another OID in the same shape) is not an Ed25519 key.
        let x25519 = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VuAyEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n-----END PUBLIC KEY-----";
        assert_eq!(parse(x25519), Err(KeyError::NotEd25519));
        assert_eq!(parse("c2hvcnQ"), Err(KeyError::BadLine(1)));
        assert_eq!(parse("\n  \n"), Err(KeyError::Empty));
        // The identity and an all-zero key (order 4) would verify forged signatures.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(parse(&URL_SAFE_NO_PAD.encode(identity)), Err(KeyError::Weak));
        assert_eq!(parse(&to_pem(&PublicKey([0; 32]))), Err(KeyError::Weak));
    }
}
