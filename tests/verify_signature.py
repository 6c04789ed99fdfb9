"""Checks a homelab-deploy message signature with PyNaCl, independently of
the Rust code: argv is <NKey public key> <signature, base64url without
padding> <subject> <file holding the body>; the reply subject is empty.
Exits 0 when the signature is valid."""

import base64
import sys

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey


def nkey_public_bytes(key: str) -> bytes:
    # An NKey is base32 (RFC 4648, no padding) of: one prefix byte, the
    # 32-byte Ed25519 public key, a 2-byte CRC16.
    raw = base64.b32decode(key + "=" * (-len(key) % 8))
    if len(raw) != 35 or key[0] != "U":
        raise SystemExit(f"not an NKey user public key: {key}")
    return raw[1:33]


def main() -> int:
    key, signature, subject, body_file = sys.argv[1:5]
    signature_bytes = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    with open(body_file, "rb") as file:
        body = file.read()
    message = subject.encode() + b"\n" + b"" + b"\n" + body
    try:
        VerifyKey(nkey_public_bytes(key)).verify(message, signature_bytes)
    except BadSignatureError:
        print("signature does not verify", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
