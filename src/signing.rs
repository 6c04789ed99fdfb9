//! Signed messages: the builder signs every reply, clients sign their
//! requests, each with the NKey it already authenticates to NATS with.
//! What is signed and where the signature travels is protocol
//! ([`crate::protocol::signed_message`], [`crate::protocol::KEY_HEADER`],
//! [`crate::protocol::SIGNATURE_HEADER`]); this module does the Ed25519.

use async_nats::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::{KeyPair, KeyPairType};
use thiserror::Error;

use crate::protocol::{KEY_HEADER, SIGNATURE_HEADER, signed_message};

/// Why a key given on the command line or in the config is not usable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{key:?} is not an NKey user public key (56 characters starting with \"U\")")]
pub struct BadPublicKey {
    key: String,
}

/// Checks that `key` is an NKey user public key (`U…`).
pub fn parse_user_key(key: &str) -> Result<String, BadPublicKey> {
    let key = key.trim();
    match KeyPair::from_public_key(key) {
        Ok(pair) if pair.key_pair_type() == KeyPairType::User => Ok(key.to_owned()),
        _ => Err(BadPublicKey {
            key: crate::protocol::quote_for_error(key),
        }),
    }
}

/// Signs messages with one NKey.
pub struct Signer {
    pair: KeyPair,
    public_key: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the seed.
        f.debug_struct("Signer")
            .field("public_key", &self.public_key)
            .finish()
    }
}

impl Signer {
    /// A signer for a user seed (`SU…`), already checked by the caller.
    pub fn from_seed(seed: &str) -> Result<Self, nkeys::error::Error> {
        let pair = KeyPair::from_seed(seed)?;
        Ok(Self {
            public_key: pair.public_key(),
            pair,
        })
    }

    /// The public key signatures are checked against.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The headers that sign `body` sent on `subject` with reply subject
    /// `reply` (empty when there is none).
    pub fn headers(&self, subject: &str, reply: &str, body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        // Signing with a seed's own key pair cannot fail; a message without
        // a signature is then simply unsigned.
        if let Ok(signature) = self.pair.sign(&signed_message(subject, reply, body)) {
            headers.insert(KEY_HEADER, self.public_key.as_str());
            headers.insert(SIGNATURE_HEADER, URL_SAFE_NO_PAD.encode(signature).as_str());
        }
        headers
    }
}

/// What a message's signature says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// No signature headers.
    Unsigned,
    /// Validly signed by this user key.
    Valid(String),
    /// Signature headers that do not check out.
    Invalid(&'static str),
}

/// Checks the signature headers of a message received on `subject` with
/// reply subject `reply` (empty for none).
pub fn verify(headers: Option<&HeaderMap>, subject: &str, reply: &str, body: &[u8]) -> Signature {
    let header = |name| {
        headers
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str())
    };
    let (key, signature) = match (header(KEY_HEADER), header(SIGNATURE_HEADER)) {
        (None, None) => return Signature::Unsigned,
        (Some(key), Some(signature)) => (key, signature),
        _ => return Signature::Invalid("only one of the two signature headers is present"),
    };
    let Ok(key) = parse_user_key(key) else {
        return Signature::Invalid("the key header is not an NKey user public key");
    };
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return Signature::Invalid("the signature is not base64url without padding");
    };
    let verified = KeyPair::from_public_key(&key)
        .and_then(|pair| pair.verify(&signed_message(subject, reply, body), &signature));
    match verified {
        Ok(()) => Signature::Valid(key),
        Err(_) => Signature::Invalid("the signature does not match the message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::from_seed(&KeyPair::new_user().seed().unwrap()).unwrap()
    }

    #[test]
    fn a_signed_message_verifies_only_unchanged() {
        let signer = signer();
        let headers = signer.headers("build.responses.a.1", "", b"{\"x\":1}");
        assert_eq!(
            verify(Some(&headers), "build.responses.a.1", "", b"{\"x\":1}"),
            Signature::Valid(signer.public_key().to_owned())
        );
        // Another body, subject or reply subject: the signature fails.
        for (subject, reply, body) in [
            ("build.responses.a.1", "", &b"{\"x\":2}"[..]),
            ("build.responses.b.1", "", &b"{\"x\":1}"[..]),
            (
                "build.responses.a.1",
                "build.responses.a",
                &b"{\"x\":1}"[..],
            ),
        ] {
            assert!(matches!(
                verify(Some(&headers), subject, reply, body),
                Signature::Invalid(_)
            ));
        }
    }

    #[test]
    fn missing_partial_and_foreign_headers_are_told_apart() {
        assert_eq!(verify(None, "s", "", b""), Signature::Unsigned);
        assert_eq!(
            verify(Some(&HeaderMap::new()), "s", "", b""),
            Signature::Unsigned
        );
        let mut only_key = HeaderMap::new();
        only_key.insert(KEY_HEADER, signer().public_key());
        assert!(matches!(
            verify(Some(&only_key), "s", "", b""),
            Signature::Invalid(_)
        ));
        // A valid signature whose key header names someone else.
        let mut forged = signer().headers("s", "", b"");
        forged.insert(KEY_HEADER, signer().public_key());
        assert!(matches!(
            verify(Some(&forged), "s", "", b""),
            Signature::Invalid(_)
        ));
    }

    #[test]
    fn only_user_public_keys_are_accepted() {
        let user = KeyPair::new_user().public_key();
        assert_eq!(parse_user_key(&format!(" {user}\n")), Ok(user));
        assert!(parse_user_key(&KeyPair::new_account().public_key()).is_err());
        assert!(parse_user_key("Uxyz").is_err());
        assert!(parse_user_key(&KeyPair::new_user().seed().unwrap()).is_err());
    }
}
