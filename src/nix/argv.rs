//! The exact command lines the builder runs, built without running anything.
//!
//! Everything version-dependent lives here and is unit-tested per version.
//! Only checked values reach these functions: repo URLs from the config,
//! refs and revs that passed [`crate::protocol::validate_ref`] /
//! [`crate::protocol::validate_rev`], host names that Nix itself listed, and
//! store paths that Nix printed.

use std::fmt;

use super::NixVersion;

/// Prefix of the trace lines the evaluation expression prints per host.
pub const EVAL_MARKER: &str = "@homelab-deploy-eval ";

/// The function [`NixCli::eval_hosts`] applies to `nixosConfigurations`,
/// after its marker and host list: see the file for what it traces.
const EVAL_HOSTS_EXPRESSION: &str = include_str!("eval-hosts.nix");

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
        let hosts: Vec<String> = hosts.iter().map(|host| nix_string(host)).collect();
        let expression = format!(
            "({}) {} [ {} ]",
            one_line(EVAL_HOSTS_EXPRESSION),
            nix_string(EVAL_MARKER),
            hosts.join(" ")
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

/// `text` as a Nix string literal. Every `\`, `"` and `$` is escaped, so
/// nothing in it can end the string or start an interpolation (`${`).
fn nix_string(text: &str) -> String {
    let mut literal = String::with_capacity(text.len() + 2);
    literal.push('"');
    for c in text.chars() {
        if matches!(c, '\\' | '"' | '$') {
            literal.push('\\');
        }
        literal.push(c);
    }
    literal.push('"');
    literal
}

/// A Nix expression file on one line: comment lines dropped, the others
/// joined by spaces (Nix reads a newline as a space), so that the argv it
/// goes into stays one line wherever it is logged. The files it is used on
/// hold no string or comment that spans or ends a line.
fn one_line(expression: &str) -> String {
    expression
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ")
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
    fn values_reach_the_expression_as_nix_strings() {
        assert_eq!(nix_string(r#"a"b${c}\d$"#), r#""a\"b\${c}\\d\$""#);
        // The hosts are data: whatever a name holds stays inside its string.
        let hostile = r#"x" + (import /etc/passwd) + "${y}"#;
        let inv = cli(2, 24).eval_hosts(LOCKED, &[hostile.into(), "ns1".into()]);
        let expression = &inv.args[8];
        let arguments = expression
            .strip_prefix(&format!("({}) ", one_line(EVAL_HOSTS_EXPRESSION)))
            .unwrap();
        assert_eq!(
            arguments,
            r#""@homelab-deploy-eval " [ "x\" + (import /etc/passwd) + \"\${y}" "ns1" ]"#
        );
    }

    #[test]
    fn the_evaluation_expression_fits_on_one_line() {
        let expression = one_line(EVAL_HOSTS_EXPRESSION);
        assert!(!expression.contains('\n'));
        // Nothing was left that needs its line: a comment, an indented string.
        assert!(!expression.contains('#') && !expression.contains("''"));
        assert!(expression.starts_with("marker: hosts: configurations: let "));
        assert!(expression.ends_with(" null hosts"), "{expression}");
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
