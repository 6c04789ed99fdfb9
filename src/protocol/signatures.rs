//! Signed messages: the headers and the bytes a signature covers
//! (docs/protocol.md, "Signatures").

/// NATS header carrying the signer's NKey public key (`U…`).
pub const KEY_HEADER: &str = "Homelab-Deploy-Key";
/// NATS header carrying the Ed25519 signature of [`signed_message`],
/// base64url without padding.
pub const SIGNATURE_HEADER: &str = "Homelab-Deploy-Signature";

/// The bytes a signature covers: `<subject>\n<reply>\n<body>`, where
/// `reply` is the message's reply subject (empty for replies, which have
/// none). Binding the subjects means a signed message cannot be replayed
/// onto another subject.
pub fn signed_message(subject: &str, reply: &str, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(subject.len() + reply.len() + body.len() + 2);
    message.extend_from_slice(subject.as_bytes());
    message.push(b'\n');
    message.extend_from_slice(reply.as_bytes());
    message.push(b'\n');
    message.extend_from_slice(body);
    message
}

/// Which request a reply answers: lowercase hex SHA-256 of
/// `<subject>\n<reply>\n<body>` of the request (the bytes a signature
/// covers, [`signed_message`]). Carried in `accepted` and `rejected`.
pub fn request_digest(subject: &str, reply: &str, body: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(signed_message(subject, reply, body));
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        hex.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_bytes_bind_subject_reply_and_body() {
        assert_eq!(
            signed_message("build.x.y", "build.responses.a", b"{}"),
            b"build.x.y\nbuild.responses.a\n{}"
        );
        assert_eq!(signed_message("s", "", b""), b"s\n\n");
    }
}
