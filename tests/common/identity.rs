//! NKey identities (a seed file and its public key) and the shipped
//! server configs filled in with them.

use std::path::{Path, PathBuf};

/// One NKey user: the seed file a client or builder is given, and the
/// public key the server config and `admins` name.
#[derive(Debug, Clone)]
pub struct Identity {
    pub seed_file: PathBuf,
    pub public_key: String,
}

impl Identity {
    /// The seed file as a command-line argument (`--nkey-file`).
    pub fn seed_arg(&self) -> &str {
        self.seed_file.to_str().unwrap()
    }
}

/// NKey identities of the plan's permission table, and an outsider who
/// may not build.
pub struct Identities {
    _dir: tempfile::TempDir,
    pub builder: Identity,
    pub test_deployer: Identity,
    pub admin: Identity,
    pub outsider: Identity,
}

impl Identities {
    /// Fresh keys for every role.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            builder: nkey_user(dir.path(), "builder"),
            test_deployer: nkey_user(dir.path(), "test-deployer"),
            admin: nkey_user(dir.path(), "admin"),
            outsider: nkey_user(dir.path(), "outsider"),
            _dir: dir,
        }
    }

    /// The shipped server config `docs/<file>` with these keys, plus a
    /// user that may only publish deploy.test.> (no build rights).
    pub fn server_config(&self, file: &str) -> String {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut text = std::fs::read_to_string(format!("{root}/docs/{file}")).unwrap();
        for (variable, key) in [
            ("BUILDER_NKEY", &self.builder.public_key),
            ("TEST_DEPLOYER_NKEY", &self.test_deployer.public_key),
            ("ADMIN_DEPLOYER_NKEY", &self.admin.public_key),
        ] {
            let start = text.find(&format!("{variable}: \"")).unwrap() + variable.len() + 3;
            let end = start + text[start..].find('"').unwrap();
            text.replace_range(start..end, key);
        }
        let outsider = format!(
            "      {{\n        nkey: \"{}\"\n        permissions {{\n          publish {{ allow: [\"deploy.test.>\"] }}\n          subscribe {{ allow: [\"build.responses.>\"] }}\n        }}\n      }}\n    ]",
            self.outsider.public_key
        );
        let end = text.rfind("    ]").unwrap();
        text.replace_range(end..end + 5, &outsider);
        text
    }
}

/// Writes a fresh NKey user seed (mode 0600) into `dir`.
pub fn nkey_user(dir: &Path, name: &str) -> Identity {
    use std::os::unix::fs::PermissionsExt;
    let pair = nkeys::KeyPair::new_user();
    let path = dir.join(format!("{name}.nk"));
    std::fs::write(&path, pair.seed().unwrap()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    Identity {
        seed_file: path,
        public_key: pair.public_key(),
    }
}
