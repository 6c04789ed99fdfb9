//! Everything that talks to Nix: which version it is, the exact argv for each
//! call ([`argv`]) and the flake URLs it takes ([`flake_url`]), running it as
//! a killable process group ([`process`]) and reading its `internal-json` log
//! ([`log`]), its JSON output ([`json`]) and store closures with their sizes
//! ([`closure`]).

pub mod argv;
pub mod closure;
pub mod flake_url;
pub mod json;
pub mod log;
pub mod machines;
pub mod process;
pub mod version;

pub use argv::NixCli;
pub use version::NixVersion;
