//! Keeping credentials out of everything the builder sends and logs.
//!
//! A repo URL may carry a secret (`git+https://oauth2:TOKEN@host/…`,
//! `…?access_token=TOKEN`), and Nix and git repeat the URL in their
//! messages. [`redact`] replaces such secrets with [`MASK`] in any text: a
//! Nix message, a log line, a whole JSON payload. It is applied where text
//! leaves the process (the reply outbox, the log writer, MCP results), not
//! at every place a message is made; metric label values are masked as
//! they enter the registry ([`crate::metrics::Masked`]), so a scrape is
//! not scanned.
//!
//! What is hidden:
//! - the userinfo of a URL (`scheme://USERINFO@host`): all of it, user name
//!   included, since a token is often the user name (`https://TOKEN@host`)
//!   or the user name says which token it is (`oauth2:`, `x-access-token:`);
//!   only a bare user name of an SSH URL (`ssh://git@host`,
//!   `git+ssh://git@host`, a Nix builder's `ssh-ng://root@host`) is kept, as it names an account, not a secret;
//! - the value of a query parameter whose name ends in one of
//!   [`SECRET_PARAMETER_ENDINGS`] (case-insensitive), wherever `?name=` or
//!   `&name=` appears.
//!
//! The scan stops at quotes, backslashes, whitespace and control
//! characters, so redacting a serialized JSON document gives the same
//! result as redacting every string in it, and keeps it valid JSON.

use std::borrow::Cow;

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// Query parameter names (lower-cased) ending in one of these carry a
/// secret: `access_token`, `private_token`, `token`, `password`,
/// `client_secret`, `api_key`, `X-Amz-Signature`, `X-Amz-Credential`, ….
pub const SECRET_PARAMETER_ENDINGS: &[&str] = &[
    "token",
    "password",
    "passwd",
    "pwd",
    "secret",
    "key",
    "signature",
    "sig",
    "credential",
    "credentials",
    "auth",
    "session",
];

/// `text` with every secret replaced by [`MASK`]; borrowed when nothing
/// had to be hidden.
pub fn redact(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    // Bytes of `text` before this index are in `out` or were masked.
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let hidden = match bytes[i] {
            b':' if bytes[i..].starts_with(b"://") => {
                let start = i + 3;
                match userinfo_end(bytes, start) {
                    Some(at) if hides_userinfo(scheme_before(bytes, i), &bytes[start..at]) => {
                        Some((start, at))
                    }
                    // Continue after a kept userinfo, at its '@'.
                    Some(at) => {
                        i = at;
                        continue;
                    }
                    None => None,
                }
            }
            b'?' | b'&' => secret_value(bytes, i + 1),
            _ => None,
        };
        match hidden {
            Some((start, end)) => {
                // Every boundary is next to an ASCII byte, so on a char
                // boundary.
                out.push_str(&text[copied..start]);
                out.push_str(MASK);
                copied = end;
                i = end.max(i + 1);
            }
            None => i += 1,
        }
    }
    if copied == 0 && out.is_empty() {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// [`redact`] for an owned string: `text` itself when it holds no secret.
pub fn redact_owned(text: String) -> String {
    match redact(&text) {
        Cow::Borrowed(_) => text,
        Cow::Owned(masked) => masked,
    }
}

/// Characters of a URL's userinfo (RFC 3986: unreserved, pct-encoded,
/// sub-delims and ':').
fn is_userinfo_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:".contains(&byte)
}

/// The index of the '@' ending the userinfo that starts at `start`: the
/// last '@' before the authority ends, as URL parsers read it.
fn userinfo_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut at = None;
    for (offset, &byte) in bytes[start..].iter().enumerate() {
        if byte == b'@' {
            at = Some(start + offset);
        } else if !is_userinfo_byte(byte) {
            break;
        }
    }
    at.filter(|&at| at > start)
}

/// The scheme ending at `colon` (the characters a scheme may contain).
fn scheme_before(bytes: &[u8], colon: usize) -> &[u8] {
    let start = bytes[..colon]
        .iter()
        .rposition(|&b| !(b.is_ascii_alphanumeric() || b"+.-".contains(&b)))
        .map_or(0, |p| p + 1);
    &bytes[start..colon]
}

fn hides_userinfo(scheme: &[u8], userinfo: &[u8]) -> bool {
    if userinfo == MASK.as_bytes() {
        return false;
    }
    // Whatever precedes the scheme in running text (an escape sequence's
    // tail, say) may cling to it, hence "ends with".
    let scheme = scheme.to_ascii_lowercase();
    let ssh = scheme.ends_with(b"ssh") || scheme.ends_with(b"ssh-ng");
    let password = userinfo.contains(&b':');
    !ssh || password
}

/// For a parameter name starting at `start`: the range of its value when
/// the name says it is a secret.
fn secret_value(bytes: &[u8], start: usize) -> Option<(usize, usize)> {
    let name_len = bytes[start..]
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b"_.-".contains(&b)))
        .unwrap_or(bytes.len() - start);
    let equals = start + name_len;
    if name_len == 0 || bytes.get(equals) != Some(&b'=') {
        return None;
    }
    let name = bytes[start..equals].to_ascii_lowercase();
    if !SECRET_PARAMETER_ENDINGS
        .iter()
        .any(|ending| name.ends_with(ending.as_bytes()))
    {
        return None;
    }
    let value_start = equals + 1;
    let value_len = bytes[value_start..]
        .iter()
        .position(|&b| ends_value(b))
        .unwrap_or(bytes.len() - value_start);
    let value = &bytes[value_start..value_start + value_len];
    (value_len > 0 && value != MASK.as_bytes()).then_some((value_start, value_start + value_len))
}

fn ends_value(byte: u8) -> bool {
    byte.is_ascii_whitespace() || byte.is_ascii_control() || b"&#\"'\\<>`".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn userinfo_with_a_token_is_hidden() {
        let cases = [
            (
                "git+https://oauth2:glpat-abc123@git.example/lab/nix.git?ref=main",
                "git+https://***@git.example/lab/nix.git?ref=main",
            ),
            (
                "https://ghp_TOKEN@github.com/o/r",
                "https://***@github.com/o/r",
            ),
            (
                "https://x-access-token:T@github.com",
                "https://***@github.com",
            ),
            ("http://u:p@ss@host:80/", "http://***@host:80/"),
            ("nats://user:pw@nats.lan:4222", "nats://***@nats.lan:4222"),
            ("ssh://git:hunter2@host/r", "ssh://***@host/r"),
            ("http://u:p@[::1]:8080/x", "http://***@[::1]:8080/x"),
        ];
        for (text, want) in cases {
            assert_eq!(redact(text), want, "{text}");
        }
    }

    #[test]
    fn ssh_user_names_and_urls_without_userinfo_are_kept() {
        for text in [
            "git+ssh://git@git.example/lab/nix.git",
            "ssh://git@host:22/r",
            "ssh-ng://root@builder1.lab",
            "git@github.com:owner/repo.git",
            "https://git.example/lab/nix.git?ref=main&rev=abc",
            "git+file:///srv/flake",
            "mail admin@example.org about http://host/path@v2",
            "no url here: just text, a=b & c=d",
        ] {
            assert!(matches!(redact(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn token_like_query_parameters_are_hidden() {
        let cases = [
            (
                "https://h/r.git?ref=main&access_token=abc&dir=x",
                "https://h/r.git?ref=main&access_token=***&dir=x",
            ),
            (
                "https://h/r?private_token=a%2Fb#frag",
                "https://h/r?private_token=***#frag",
            ),
            ("?token=t", "?token=***"),
            ("x?Client_Secret=s y", "x?Client_Secret=*** y"),
            (
                "u?X-Amz-Signature=f00&X-Amz-Credential=c",
                "u?X-Amz-Signature=***&X-Amz-Credential=***",
            ),
            ("u?api_key=k'", "u?api_key=***'"),
        ];
        for (text, want) in cases {
            assert_eq!(redact(text), want, "{text}");
        }
        // Flake URL parameters are not secrets.
        let flake = "git+https://h/r?ref=main&rev=0123&dir=sub&narHash=sha256-x";
        assert_eq!(redact(flake), flake);
    }

    #[test]
    fn nix_messages_with_escape_sequences_are_redacted() {
        let message = "\u{1b}[31;1merror:\u{1b}[0m flake '\u{1b}[35;1mgit+http://oauth2:SECRET@127.0.0.1:1/r.git?ref=x\u{1b}[0m' does not provide attribute";
        let redacted = redact(message);
        assert!(!redacted.contains("SECRET"), "{redacted}");
        assert!(redacted.contains("git+http://***@127.0.0.1:1/r.git?ref=x\u{1b}[0m'"));
        let json = serde_json::to_string(message).unwrap();
        assert_eq!(
            redact(&json),
            serde_json::to_string(redacted.as_ref()).unwrap()
        );
    }

    /// Text around a secret: no upper-case letters or digits, so it cannot
    /// contain the token by chance.
    fn surroundings() -> impl Strategy<Value = String> {
        "[a-z :/'\"\n\t@?&=.#\\\\\u{1b}\\[;-]{0,40}"
    }

    fn token() -> impl Strategy<Value = String> {
        "T[A-Z0-9_~.%-]{7,30}"
    }

    proptest! {
        #[test]
        fn a_password_in_a_url_never_survives(
            before in surroundings(),
            after in surroundings(),
            scheme in "(git\\+)?(https?|ssh|git\\+ssh|nats)",
            user in "[a-z0-9]{0,8}",
            token in token(),
            host in "[a-z0-9.]{1,20}(:[0-9]{1,5})?",
            path in "(/[a-z0-9._]{0,10}){0,3}",
        ) {
            let text = format!("{before}{scheme}://{user}:{token}@{host}{path}{after}");
            let redacted = redact(&text);
            prop_assert!(!redacted.contains(&token), "{redacted}");
        }

        #[test]
        fn a_token_as_user_name_never_survives_outside_ssh(
            before in surroundings(),
            after in surroundings(),
            scheme in "(git\\+)?https?",
            token in token(),
            host in "[a-z0-9.]{1,20}",
        ) {
            let text = format!("{before}{scheme}://{token}@{host}/r{after}");
            prop_assert!(!redact(&text).contains(&token));
        }

        #[test]
        fn a_secret_query_parameter_never_survives(
            before in surroundings(),
            after in surroundings(),
            name in "(access_|private_|)token|password|client_secret|api_key|X-Amz-Signature",
            token in token(),
            earlier in "(ref=[a-z]{1,5}&)?",
        ) {
            let text = format!("{before}https://h/r?{earlier}{name}={token}{after}");
            prop_assert!(!redact(&text).contains(&token));
        }

        #[test]
        fn redacting_json_equals_redacting_its_strings(text in any::<String>(), token in token()) {
            let text = format!("{text} git+https://oauth2:{token}@h/r?token={token}{text}");
            let json = serde_json::to_string(&text).unwrap();
            let redacted = redact(&json);
            let parsed: String = serde_json::from_str(&redacted).unwrap();
            prop_assert_eq!(parsed, redact(&text).into_owned());
        }

        #[test]
        fn redacting_twice_changes_nothing_more(text in any::<String>()) {
            let once = redact(&text).into_owned();
            prop_assert_eq!(redact(&once), once.as_str());
        }

        #[test]
        fn text_without_at_or_equals_is_untouched(text in "[^@=]{0,200}") {
            prop_assert!(matches!(redact(&text), Cow::Borrowed(_)));
        }
    }
}
