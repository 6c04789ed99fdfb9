//! The exact command lines the builder runs, built without running anything.
//!
//! Everything version-dependent lives here and is unit-tested per version.
//! Only checked values reach these functions: repo URLs from the config,
//! refs and revs that passed [`crate::protocol::validate_ref`] /
//! [`crate::protocol::validate_rev`], host names that Nix itself listed, and
//! store paths that Nix printed.

use std::fmt;

use super::NixVersion;

/// The attribute under each host that is built.
pub const TOPLEVEL_ATTR: &str = "config.system.build.toplevel";

/// Prefix of the trace lines the evaluation expression prints per host.
pub const EVAL_MARKER: &str = "@homelab-deploy-eval ";

/// One program invocation: no shell is involved, each arg is passed as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<String>,
}

impl fmt::Display for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for arg in &self.args {
            if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'') {
                write!(f, " {arg:?}")?;
            } else {
                write!(f, " {arg}")?;
            }
        }
        Ok(())
    }
}

/// Builds `nix` command lines for one detected Nix version.
#[derive(Debug, Clone)]
pub struct NixCli {
    program: String,
    version: NixVersion,
}

impl NixCli {
    /// A command-line builder for `program` (normally `nix`) at `version`.
    pub fn new(program: impl Into<String>, version: NixVersion) -> Self {
        Self {
            program: program.into(),
            version,
        }
    }

    /// The Nix version the command lines are written for.
    pub fn version(&self) -> NixVersion {
        self.version
    }

    fn invocation<I, S>(&self, args: I) -> Invocation
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        // The host's nix.conf need not enable flakes: enable them per call.
        let mut all = vec![
            "--extra-experimental-features".to_owned(),
            "nix-command flakes".to_owned(),
        ];
        all.extend(args.into_iter().map(Into::into));
        Invocation {
            program: self.program.clone(),
            args: all,
        }
    }

    /// Fetches the flake afresh (ignoring Nix's git cache, which would
    /// otherwise serve a branch head up to an hour old) and prints its locked
    /// URL and revision as JSON.
    pub fn flake_metadata(&self, flake_url: &str) -> Invocation {
        self.invocation([
            "flake",
            "metadata",
            "--json",
            "--refresh",
            "--log-format",
            "internal-json",
            flake_url,
        ])
    }

    /// Applies a Nix function to the flake's `nixosConfigurations` and
    /// prints the result as JSON.
    fn apply_to_configurations(&self, locked_url: &str, function: String) -> Invocation {
        self.invocation([
            "eval".to_owned(),
            "--json".to_owned(),
            "--log-format".to_owned(),
            "internal-json".to_owned(),
            format!("{locked_url}#nixosConfigurations"),
            "--apply".to_owned(),
            function,
        ])
    }

    /// Prints the names of `nixosConfigurations` as a JSON list.
    pub fn list_hosts(&self, locked_url: &str) -> Invocation {
        self.apply_to_configurations(locked_url, "builtins.attrNames".to_owned())
    }

    /// Evaluates several hosts in one process, so what they share is
    /// evaluated once. For each host, in order, it traces
    /// `{"start": host}` and then `{"done": host, "drv": ..., "out": ...}`,
    /// so results stream out while later hosts still evaluate. An error
    /// aborts the process; the last `start` says which host it belongs to.
    pub fn eval_hosts(&self, locked_url: &str, hosts: &[String]) -> Invocation {
        let list = hosts
            .iter()
            .map(|host| {
                // Host names are [A-Za-z0-9_-]+ (checked, and listed by Nix
                // itself): as JSON strings they are valid Nix strings.
                debug_assert!(crate::protocol::is_valid_name(host));
                serde_json::Value::String(host.clone()).to_string()
            })
            .collect::<Vec<_>>()
            .join(" ");
        let expression = format!(
            "configurations: let \
               report = host: let toplevel = configurations.${{host}}.{TOPLEVEL_ATTR}; in \
                 builtins.trace (\"{EVAL_MARKER}\" + builtins.toJSON {{ start = host; }}) \
                 (builtins.trace (\"{EVAL_MARKER}\" + builtins.toJSON {{ done = host; drv = toplevel.drvPath; out = toplevel.outPath; }}) null); \
             in builtins.foldl' (previous: host: builtins.seq previous (report host)) null [ {list} ]"
        );
        self.apply_to_configurations(locked_url, expression)
    }

    /// Prints Nix's settings as JSON (`builders` among them); `show-config`
    /// became `config show` in Nix 2.20.
    pub fn show_config(&self) -> Invocation {
        if self.version >= NixVersion::new(2, 20, 0) {
            self.invocation(["config", "show", "--json"])
        } else {
            self.invocation(["show-config", "--json"])
        }
    }

    /// Connects to the store at `uri` (a remote builder) and asks its
    /// version; `store ping` became `store info` in Nix 2.20.
    pub fn ping_store(&self, uri: &str) -> Invocation {
        let command = if self.version >= NixVersion::new(2, 20, 0) {
            "info"
        } else {
            "ping"
        };
        self.invocation(["store", command, "--store", uri])
    }

    /// Prints which of `paths` are not valid in the store (exit 0 either
    /// way). Unlike `nix path-info`, never substitutes anything.
    pub fn check_validity(&self, paths: &[&str]) -> Invocation {
        let mut args = vec!["--check-validity".to_owned(), "--print-invalid".to_owned()];
        args.extend(paths.iter().map(|p| (*p).to_owned()));
        Invocation {
            program: sibling_program(&self.program, "nix-store"),
            args,
        }
    }

    /// Prints every path of the closures of `store_paths` with its metadata
    /// (`narSize` and `references` among it) as JSON: a list of objects
    /// with `path` before Nix 2.19, an object keyed by path from then on
    /// (the argv is the same; [`super::closure::parse_path_info`] reads
    /// both). Never substitutes: a path that is not valid is an error, not
    /// a download.
    pub fn closure_info(&self, store_paths: &[&str]) -> Invocation {
        let mut args = [
            "path-info",
            "--json",
            "--recursive",
            "--option",
            "substitute",
            "false",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(store_paths.iter().map(|p| (*p).to_owned()));
        self.invocation(args)
    }

    /// Roots an existing store path (not a `.drv`) at `link` (building a
    /// valid path does nothing but create the link and register it as a GC
    /// root).
    pub fn add_root(&self, store_path: &str, link: &str) -> Invocation {
        self.invocation(["build", "--out-link", link, store_path])
    }

    /// Builds a derivation's outputs, printing them as JSON on stdout and the
    /// log as `internal-json` on stderr. With `out_link` the output is rooted
    /// there from the moment it exists; without, nothing is linked.
    pub fn build_drv(&self, drv_path: &str, out_link: Option<&str>) -> Invocation {
        let link = match out_link {
            Some(link) => vec!["--out-link".to_owned(), link.to_owned()],
            None => vec!["--no-link".to_owned()],
        };
        let mut args = vec![
            "build".to_owned(),
            "--json".to_owned(),
            "--log-format".to_owned(),
            "internal-json".to_owned(),
        ];
        args.extend(link);
        args.push(self.drv_outputs_installable(drv_path));
        self.invocation(args)
    }

    /// Roots the derivation file `drv_path` itself (not its outputs) at
    /// `link`, building nothing. From Nix 2.15 a bare `.drv` installable
    /// means the file; before, it means the outputs, and `nix-instantiate`
    /// of the imported derivation gives the same `.drv` and roots it.
    pub fn root_drv(&self, drv_path: &str, link: &str) -> Invocation {
        if self.version.drv_needs_output_selector() {
            self.invocation(["build", "--out-link", link, drv_path])
        } else {
            Invocation {
                program: sibling_program(&self.program, "nix-instantiate"),
                args: vec![
                    "--add-root".to_owned(),
                    link.to_owned(),
                    "--indirect".to_owned(),
                    "--expr".to_owned(),
                    format!("import {}", serde_json::Value::from(drv_path)),
                ],
            }
        }
    }

    /// The installable that means "all outputs of this derivation": a bare
    /// `.drv` path before Nix 2.15, `drv^*` from then on. Getting this wrong
    /// on a new Nix "builds" the `.drv` file itself and reports success.
    pub fn drv_outputs_installable(&self, drv_path: &str) -> String {
        if self.version.drv_needs_output_selector() {
            format!("{drv_path}^*")
        } else {
            drv_path.to_owned()
        }
    }
}

/// `nix-store` next to `nix` (same directory when `nix` is a path).
fn sibling_program(nix: &str, name: &str) -> String {
    match nix.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name.to_owned(),
    }
}

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

/// Whether Nix printed something that looks like a derivation store path.
pub fn is_drv_path(path: &str) -> bool {
    path.starts_with('/')
        && path.ends_with(".drv")
        && !path.contains("..")
        && !path.contains(|c: char| c.is_whitespace() || c.is_control() || c == '^' || c == '#')
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/nix/store/icxl17vk34xp34pp37bjwls2yrw13p3y-a2.drv";
    const LOCKED: &str =
        "git+file:///srv/demo?ref=master&rev=609da7ab2bec60c568928f7e8d760a36e14805b0";

    fn cli(major: u32, minor: u32) -> NixCli {
        NixCli::new("nix", NixVersion::new(major, minor, 0))
    }

    fn args(inv: &Invocation) -> Vec<&str> {
        inv.args.iter().map(String::as_str).collect()
    }

    #[test]
    fn every_call_enables_flakes_itself() {
        for inv in [
            cli(2, 8).flake_metadata("git+file:///x"),
            cli(2, 24).list_hosts(LOCKED),
            cli(2, 24).eval_hosts(LOCKED, &["ns1".into()]),
            cli(2, 8).build_drv(DRV, None),
        ] {
            assert_eq!(inv.program, "nix");
            assert_eq!(
                &args(&inv)[..2],
                ["--extra-experimental-features", "nix-command flakes"]
            );
        }
    }

    #[test]
    fn build_on_nix_2_8_uses_the_bare_drv_path() {
        assert_eq!(
            args(&cli(2, 8).build_drv(DRV, None))[2..],
            [
                "build",
                "--json",
                "--log-format",
                "internal-json",
                "--no-link",
                DRV
            ]
        );
    }

    #[test]
    fn build_on_nix_2_14_still_uses_the_bare_drv_path() {
        assert_eq!(cli(2, 14).drv_outputs_installable(DRV), DRV);
    }

    #[test]
    fn build_on_nix_2_15_and_later_selects_all_outputs() {
        let expected = format!("{DRV}^*");
        assert_eq!(cli(2, 15).drv_outputs_installable(DRV), expected);
        assert_eq!(
            args(&cli(2, 24).build_drv(DRV, None))[2..],
            [
                "build",
                "--json",
                "--log-format",
                "internal-json",
                "--no-link",
                expected.as_str()
            ]
        );
    }

    #[test]
    fn metadata_refreshes_the_fetch_cache() {
        let inv = cli(2, 8).flake_metadata("git+https://h/r.git?ref=master");
        assert_eq!(
            args(&inv)[2..],
            [
                "flake",
                "metadata",
                "--json",
                "--refresh",
                "--log-format",
                "internal-json",
                "git+https://h/r.git?ref=master"
            ]
        );
    }

    #[test]
    fn hosts_are_listed_from_nixos_configurations() {
        let inv = cli(2, 8).list_hosts(LOCKED);
        assert_eq!(
            args(&inv)[2..],
            [
                "eval",
                "--json",
                "--log-format",
                "internal-json",
                &format!("{LOCKED}#nixosConfigurations"),
                "--apply",
                "builtins.attrNames"
            ]
        );
    }

    #[test]
    fn build_output_is_read_as_json_on_every_version() {
        // `--print-out-paths` only exists from Nix 2.9; `--json` on both.
        for version in [(2, 8), (2, 9), (2, 24)] {
            let inv = cli(version.0, version.1).build_drv(DRV, None);
            assert!(inv.args.contains(&"--json".to_owned()));
            assert!(!inv.args.contains(&"--print-out-paths".to_owned()));
        }
    }

    #[test]
    fn host_batches_are_evaluated_in_one_process() {
        let inv = cli(2, 24).eval_hosts(LOCKED, &["ns1".into(), "ns2".into()]);
        let a = args(&inv);
        assert_eq!(
            a[2..7],
            [
                "eval",
                "--json",
                "--log-format",
                "internal-json",
                &format!("{LOCKED}#nixosConfigurations")
            ]
        );
        assert_eq!(a[7], "--apply");
        let expression = a[8];
        assert!(expression.contains(r#"[ "ns1" "ns2" ]"#), "{expression}");
        assert!(expression.contains("config.system.build.toplevel"));
        assert!(expression.contains(EVAL_MARKER));
        assert_eq!(a.len(), 9);
    }

    #[test]
    fn validity_checks_use_nix_store_beside_nix() {
        let inv = cli(2, 8).check_validity(&["/nix/store/a", "/nix/store/b"]);
        assert_eq!(inv.program, "nix-store");
        assert_eq!(
            args(&inv),
            [
                "--check-validity",
                "--print-invalid",
                "/nix/store/a",
                "/nix/store/b"
            ]
        );
        let inv = NixCli::new("/run/current-system/sw/bin/nix", NixVersion::new(2, 24, 0))
            .check_validity(&["/nix/store/a"]);
        assert_eq!(inv.program, "/run/current-system/sw/bin/nix-store");
    }

    #[test]
    fn closures_are_read_with_path_info_without_substituting() {
        // The same argv on 2.8 (JSON list) and 2.19+ (JSON object).
        for version in [(2, 8), (2, 18), (2, 19), (2, 26)] {
            let inv =
                cli(version.0, version.1).closure_info(&["/nix/store/x-a2", "/nix/store/y-a2"]);
            assert_eq!(inv.program, "nix");
            assert_eq!(
                args(&inv),
                [
                    "--extra-experimental-features",
                    "nix-command flakes",
                    "path-info",
                    "--json",
                    "--recursive",
                    "--option",
                    "substitute",
                    "false",
                    "/nix/store/x-a2",
                    "/nix/store/y-a2"
                ],
                "{version:?}"
            );
        }
    }

    #[test]
    fn roots_of_existing_paths_are_added_with_an_out_link() {
        let inv = cli(2, 24).add_root("/nix/store/x-a2", "/gc/repo/ns1");
        assert_eq!(
            args(&inv)[2..],
            ["build", "--out-link", "/gc/repo/ns1", "/nix/store/x-a2"]
        );
    }

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
    fn builds_into_a_root_when_asked() {
        let inv = cli(2, 24).build_drv(DRV, Some("/gc/.requests/b1/ns1"));
        assert_eq!(
            args(&inv)[2..],
            [
                "build",
                "--json",
                "--log-format",
                "internal-json",
                "--out-link",
                "/gc/.requests/b1/ns1",
                &format!("{DRV}^*")
            ]
        );
    }

    #[test]
    fn derivation_files_are_rooted_without_building_on_each_version() {
        // Nix 2.15+: a bare .drv installable is the file itself.
        let inv = cli(2, 24).root_drv(DRV, "/gc/r/ns1.drv");
        assert_eq!(inv.program, "nix");
        assert_eq!(
            args(&inv)[2..],
            ["build", "--out-link", "/gc/r/ns1.drv", DRV]
        );
        // Before: the same .drv, re-instantiated from the file, is rooted.
        let inv = NixCli::new("/bin/nix", NixVersion::new(2, 8, 0)).root_drv(DRV, "/gc/r/ns1.drv");
        assert_eq!(inv.program, "/bin/nix-instantiate");
        assert_eq!(
            args(&inv),
            [
                "--add-root",
                "/gc/r/ns1.drv",
                "--indirect",
                "--expr",
                &format!("import \"{DRV}\"")
            ]
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

    #[test]
    fn drv_paths_are_recognised() {
        assert!(is_drv_path(DRV));
        assert!(!is_drv_path("/nix/store/x-a2"));
        assert!(!is_drv_path("--option x.drv"));
        assert!(!is_drv_path("/nix/store/x.drv\n/other.drv"));
        assert!(!is_drv_path("/nix/store/x.drv^*.drv"));
    }

    #[test]
    fn invocations_display_readably() {
        let inv = cli(2, 8).build_drv(DRV, None);
        assert_eq!(
            inv.to_string(),
            format!(
                "nix --extra-experimental-features \"nix-command flakes\" build --json --log-format internal-json --no-link {DRV}"
            )
        );
    }
}
