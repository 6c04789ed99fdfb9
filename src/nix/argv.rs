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

    /// Roots an existing store path at `link` (building a valid path does
    /// nothing but create the link and register it as a GC root).
    pub fn add_root(&self, store_path: &str, link: &str) -> Invocation {
        self.invocation(["build", "--out-link", link, store_path])
    }

    /// Builds a derivation's outputs, printing them as JSON on stdout and the
    /// log as `internal-json` on stderr. Nothing is linked: GC roots are
    /// added afterwards with [`Self::add_root`].
    pub fn build_drv(&self, drv_path: &str) -> Invocation {
        self.invocation([
            "build".to_owned(),
            "--json".to_owned(),
            "--log-format".to_owned(),
            "internal-json".to_owned(),
            "--no-link".to_owned(),
            self.drv_outputs_installable(drv_path),
        ])
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

/// Appends `ref` and `rev` to a flake URL from the config.
pub fn flake_url_with_ref(url: &str, git_ref: Option<&str>, rev: Option<&str>) -> String {
    let mut result = url.to_owned();
    let mut separator = if url.contains('?') { '&' } else { '?' };
    for (key, value) in [("ref", git_ref), ("rev", rev)] {
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
            cli(2, 8).build_drv(DRV),
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
            args(&cli(2, 8).build_drv(DRV))[2..],
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
            args(&cli(2, 24).build_drv(DRV))[2..],
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
            let inv = cli(version.0, version.1).build_drv(DRV);
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
    fn drv_paths_are_recognised() {
        assert!(is_drv_path(DRV));
        assert!(!is_drv_path("/nix/store/x-a2"));
        assert!(!is_drv_path("--option x.drv"));
        assert!(!is_drv_path("/nix/store/x.drv\n/other.drv"));
        assert!(!is_drv_path("/nix/store/x.drv^*.drv"));
    }

    #[test]
    fn invocations_display_readably() {
        let inv = cli(2, 8).build_drv(DRV);
        assert_eq!(
            inv.to_string(),
            format!(
                "nix --extra-experimental-features \"nix-command flakes\" build --json --log-format internal-json --no-link {DRV}"
            )
        );
    }
}
