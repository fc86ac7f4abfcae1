//! Who is calling: HS256 JWTs for users (issued by `admin token`, checked on the JWT route)
//! and node keys for machines (only their SHA-256 is stored).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

/// The claims `issue` signs.
#[derive(Debug, Serialize)]
struct Claims {
    sub: String,
    exp: u64,
    /// Ours always carry it; `verify` reads only `sub` and `exp` (all the contract asks
    /// for), so a token signed elsewhere with the server's secret need not.
    #[serde(skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// The claims `verify` reads. A NumericDate may have a fraction (RFC 7519 §2), which tokens
/// signed elsewhere with the server's secret may carry; ours are whole seconds.
#[derive(Debug, Deserialize)]
struct Checked {
    sub: String,
    exp: f64,
}

/// Signs and checks tokens with the server's secret. Debug never shows the secret.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot sign token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    #[error("system clock is before 1970")]
    Clock,
}

fn unix_now() -> Result<u64, TokenError> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| TokenError::Clock)
}

impl JwtKeys {
    pub fn new(secret: &str) -> Self {
        // HS256 only: `alg: none`, RS*/ES* and other HMACs are refused by the validation.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Our tokens name no audience; one that does is not refused for it.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        JwtKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// A token for `user` valid for `ttl_secs`.
    pub fn issue(&self, user: Uuid, ttl_secs: u64) -> Result<String, TokenError> {
        let now = unix_now()?;
        let claims = Claims {
            sub: user.to_string(),
            iat: Some(now),
            exp: now.saturating_add(ttl_secs),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    /// The user a valid token names; `None` for anything else (bad signature, expired,
    /// another algorithm, `sub` not a UUID). jsonwebtoken treats `exp == now` as valid, so
    /// the "no leeway" rule is completed here: a token is expired from its `exp` second on.
    pub fn verify(&self, token: &str) -> Option<Uuid> {
        let data = jsonwebtoken::decode::<Checked>(token, &self.decoding, &self.validation).ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        if data.claims.exp <= now {
            return None;
        }
        // The same strict form as every id in a request (ours are made that way).
        crate::api::fields::parse_uuid(&data.claims.sub)
    }
}

/// 64 random bytes as 128 lowercase hex characters.
pub fn new_node_key() -> String {
    let mut bytes = [0u8; 64];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut bytes[..]);
    hex::encode(bytes)
}

/// SHA-256 of the node key's hex text, as lowercase hex: what `machines.node_key_hash` holds.
pub fn node_key_hash(node_key: &str) -> String {
    hex::encode(Sha256::digest(node_key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roundtrip_and_reject_others() {
        let k = JwtKeys::new("secret");
        let u = Uuid::new_v4();
        let t = k.issue(u, 60).unwrap();
        assert_eq!(k.verify(&t), Some(u));
        assert_eq!(JwtKeys::new("other").verify(&t), None);
        assert_eq!(k.verify(&k.issue(u, 0).unwrap()), None);
        // alg: none with the same claims
        let parts: Vec<&str> = t.split('.').collect();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
        assert_eq!(k.verify(&none), None);
        // HS512 with the right secret is still refused
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims {
                sub: u.to_string(),
                exp: unix_now().unwrap() + 60,
                iat: None,
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(k.verify(&hs512), None);
        // A `sub` in another spelling of the UUID is not the user's id.
        for sub in [
            format!("{{{u}}}"),
            format!("urn:uuid:{u}"),
            u.simple().to_string(),
        ] {
            let t = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &Claims {
                    sub: sub.clone(),
                    exp: unix_now().unwrap() + 60,
                    iat: None,
                },
                &EncodingKey::from_secret(b"secret"),
            )
            .unwrap();
            assert_eq!(k.verify(&t), None, "{sub}");
        }
    }

    #[test]
    fn a_numeric_date_may_have_a_fraction() {
        let k = JwtKeys::new("secret");
        let u = Uuid::new_v4();
        let now = unix_now().unwrap() as f64;
        let token = |exp: f64| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": u.to_string(), "exp": exp, "iat": now + 0.25}),
                &EncodingKey::from_secret(b"secret"),
            )
            .unwrap()
        };
        assert_eq!(k.verify(&token(now + 60.5)), Some(u));
        assert_eq!(k.verify(&token(now - 0.5)), None);
        assert_eq!(k.verify(&token(f64::NAN)), None);
    }

    #[test]
    fn node_key_shape() {
        let k = new_node_key();
        assert_eq!(k.len(), 128);
        assert!(k
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(node_key_hash("abc").len(), 64);
    }
}
