//! Flake URLs: a repo's URL from the config with a request's ref and rev,
//! the URLs a ref is fetched from, and the URL that evaluates exactly what
//! `nix flake metadata` locked.
//!
//! Only checked values reach these functions: repo URLs from the config,
//! refs and revs that passed [`crate::protocol::validate_ref`] /
//! [`crate::protocol::validate_rev`], and what Nix itself printed.

/// Flake URL schemes served by a forge's API (a tarball per commit): they
/// take `ref` or `rev`, not both.
const FORGE_SCHEMES: [&str; 3] = ["github:", "gitlab:", "sourcehut:"];

/// Appends `ref` and `rev` to a flake URL from the config. For a forge
/// (`github:`, `gitlab:`, `sourcehut:`), which Nix refuses both for, a `rev`
/// alone is given: the commit decides, whatever the branch.
pub fn flake_url_with_ref(url: &str, git_ref: Option<&str>, rev: Option<&str>) -> String {
    let forge = FORGE_SCHEMES.iter().any(|scheme| url.starts_with(scheme));
    let git_ref = if forge && rev.is_some() {
        None
    } else {
        git_ref
    };
    with_params(url, &[("ref", git_ref), ("rev", rev)])
}

/// The URLs to fetch a flake at `git_ref`/`rev` from, in order: for a git
/// repository fetched by `git fetch` (anything `git+` but a local work
/// tree, which resolves any ref itself), Nix looks a bare ref up as a branch
/// (`refs/heads/<ref>`) only, so a tag is tried as `refs/tags/<ref>` after it.
pub fn flake_fetch_urls(url: &str, git_ref: Option<&str>, rev: Option<&str>) -> Vec<String> {
    let mut urls = vec![flake_url_with_ref(url, git_ref, rev)];
    if let Some(git_ref) = git_ref {
        if url.starts_with("git+") && !git_ref.starts_with("refs/") && git_ref != "HEAD" {
            let tag = format!("refs/tags/{git_ref}");
            urls.push(flake_url_with_ref(url, Some(&tag), rev));
        }
    }
    urls
}

/// Appends query parameters (those with a value) to `url`.
fn with_params(url: &str, params: &[(&str, Option<&str>)]) -> String {
    let mut result = url.to_owned();
    let mut separator = if url.contains('?') { '&' } else { '?' };
    for (key, value) in params {
        if let Some(value) = value {
            result.push(separator);
            result.push_str(key);
            result.push('=');
            result.push_str(value);
            separator = '&';
        }
    }
    result
}

/// Percent-encodes what may not stand as is in a URL query value.
fn query_value(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '-' | '_' | '.' | '~' => encoded.push(c),
            other => {
                let mut buf = [0; 4];
                for byte in other.encode_utf8(&mut buf).bytes() {
                    encoded.push_str(&format!("%{byte:02X}"));
                }
            }
        }
    }
    encoded
}

/// What `nix flake metadata` locked, as a URL that evaluates exactly that.
#[derive(Debug, Clone, Copy)]
pub struct Locked<'a> {
    /// Its `url`: the locked URL (which drops some attributes).
    pub url: &'a str,
    pub rev: Option<&'a str>,
    pub nar_hash: Option<&'a str>,
    /// The fetched source in the store.
    pub path: Option<&'a str>,
    pub dir: Option<&'a str>,
    pub submodules: bool,
}

/// The URL every evaluation of a request uses: the locked URL with what
/// Nix's URL leaves out (`submodules=1`) put back; a source without a
/// revision (a dirty work tree), whose URL would be fetched afresh with
/// whatever it holds by then, is evaluated from the fetched store path
/// itself, checked against its `narHash`.
pub fn evaluation_url(locked: &Locked<'_>) -> String {
    if locked.rev.is_none() {
        if let (Some(path), Some(nar_hash)) = (locked.path, locked.nar_hash) {
            let hash = query_value(nar_hash);
            return with_params(
                &format!("path:{path}"),
                &[("dir", locked.dir), ("narHash", Some(&hash))],
            );
        }
    }
    let has_submodules = locked
        .url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|p| p.starts_with("submodules=")));
    if locked.submodules && !has_submodules {
        with_params(locked.url, &[("submodules", Some("1"))])
    } else {
        locked.url.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_and_revs_are_appended_to_the_url() {
        assert_eq!(
            flake_url_with_ref("git+file:///x", None, None),
            "git+file:///x"
        );
        assert_eq!(
            flake_url_with_ref("git+file:///x", Some("main"), None),
            "git+file:///x?ref=main"
        );
        assert_eq!(
            flake_url_with_ref("git+file:///x?dir=sub", Some("main"), Some("abc")),
            "git+file:///x?dir=sub&ref=main&rev=abc"
        );
        assert_eq!(
            flake_url_with_ref("git+file:///x", None, Some("abc")),
            "git+file:///x?rev=abc"
        );
    }

    #[test]
    fn forges_get_a_rev_without_its_ref() {
        for forge in [
            "github:torjus/nixos-servers",
            "gitlab:torjus/nixos-servers",
            "sourcehut:~torjus/nixos-servers",
        ] {
            assert_eq!(
                flake_url_with_ref(forge, Some("master"), Some("abc")),
                format!("{forge}?rev=abc")
            );
            assert_eq!(
                flake_url_with_ref(forge, Some("v1.0"), None),
                format!("{forge}?ref=v1.0")
            );
            // A forge resolves tags itself: one URL only.
            assert_eq!(flake_fetch_urls(forge, Some("v1.0"), None).len(), 1);
        }
        assert_eq!(
            flake_url_with_ref("github:o/r?dir=sub", Some("main"), Some("abc")),
            "github:o/r?dir=sub&rev=abc"
        );
        // git keeps both: the rev must be on the ref.
        assert_eq!(
            flake_url_with_ref("git+https://h/r.git", Some("main"), Some("abc")),
            "git+https://h/r.git?ref=main&rev=abc"
        );
    }

    #[test]
    fn git_refs_are_tried_as_a_branch_then_as_a_tag() {
        for url in [
            "git+https://h/r.git",
            "git+http://127.0.0.1:8080/r.git",
            "git+ssh://git@h/r.git",
            "git+file:///srv/r.git",
        ] {
            assert_eq!(
                flake_fetch_urls(url, Some("v1.0"), None),
                [
                    format!("{url}?ref=v1.0"),
                    format!("{url}?ref=refs/tags/v1.0")
                ]
            );
            assert_eq!(
                flake_fetch_urls(url, Some("v1.0"), Some("abc")),
                [
                    format!("{url}?ref=v1.0&rev=abc"),
                    format!("{url}?ref=refs/tags/v1.0&rev=abc")
                ]
            );
            // A full ref name and no ref at all are taken as they are.
            assert_eq!(flake_fetch_urls(url, Some("refs/tags/v1"), None).len(), 1);
            assert_eq!(flake_fetch_urls(url, None, None), [url.to_owned()]);
        }
    }

    #[test]
    fn evaluation_uses_exactly_what_was_locked() {
        let locked = Locked {
            url: "git+file:///srv/r?ref=master&rev=abc",
            rev: Some("abc"),
            nar_hash: Some("sha256-a+b/c="),
            path: Some("/nix/store/x-source"),
            dir: None,
            submodules: true,
        };
        assert_eq!(
            evaluation_url(&locked),
            "git+file:///srv/r?ref=master&rev=abc&submodules=1"
        );
        let newer = Locked {
            url: "git+file:///srv/r?ref=master&rev=abc&submodules=1",
            ..locked
        };
        assert_eq!(evaluation_url(&newer), newer.url);
        let plain = Locked {
            submodules: false,
            ..locked
        };
        assert_eq!(evaluation_url(&plain), plain.url);
        // No rev: the fetched tree itself, checked by its hash.
        let dirty = Locked {
            url: "git+file:///srv/r?dir=sub",
            rev: None,
            dir: Some("sub"),
            ..locked
        };
        assert_eq!(
            evaluation_url(&dirty),
            "path:/nix/store/x-source?dir=sub&narHash=sha256-a%2Bb%2Fc%3D"
        );
        let unhashed = Locked {
            nar_hash: None,
            ..dirty
        };
        assert_eq!(
            evaluation_url(&unhashed),
            "git+file:///srv/r?dir=sub&submodules=1"
        );
    }
}
