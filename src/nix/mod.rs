//! Everything that talks to Nix: which version it is, the exact argv for each
//! call ([`argv`]), running it as a killable process group ([`process`]) and
//! reading its `internal-json` log ([`log`]) and its JSON output ([`json`]).

pub mod argv;
pub mod json;
pub mod log;
pub mod machines;
pub mod process;
pub mod version;

pub use argv::NixCli;
pub use version::NixVersion;
