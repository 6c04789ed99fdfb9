//! Replacing a file whole: after a crash it holds the old contents or the
//! new ones, never a mix. The journal and the state file both go through
//! here.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file `path`'s new contents are written to before they replace it:
/// its whole name with `.tmp` added (`state.json.tmp`), so files that
/// differ only in their extension never share one.
pub(crate) fn temporary_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".tmp");
    PathBuf::from(name)
}

/// The directory holding `path`: `.` for a bare file name (whose parent is
/// the empty path).
pub(crate) fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Replaces the file at `path` with `bytes`: writes them to
/// [`temporary_path`], fsyncs it, renames it over `path` and fsyncs the
/// directory (where the file system allows). Creates the directory if it
/// is missing.
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = directory_of(path);
    std::fs::create_dir_all(dir)?;
    let tmp = temporary_path(path);
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(err) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err);
    }
    sync_directory(dir)
}

/// Makes a rename in `dir` durable. Some file systems cannot sync a
/// directory (EINVAL); the rename stands there all the same.
fn sync_directory(dir: &Path) -> std::io::Result<()> {
    match File::open(dir).and_then(|dir| dir.sync_all()) {
        Err(err) if err.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_keep_the_whole_name() {
        assert_eq!(
            temporary_path(Path::new("/var/lib/b/state.json")),
            Path::new("/var/lib/b/state.json.tmp")
        );
        assert_eq!(
            temporary_path(Path::new("journal.jsonl")),
            Path::new("journal.jsonl.tmp")
        );
        // Same stem, different extensions: different temporary files.
        assert_ne!(
            temporary_path(Path::new("state.json")),
            temporary_path(Path::new("state.jsonl"))
        );
    }

    #[test]
    fn a_bare_file_name_lives_in_the_working_directory() {
        assert_eq!(directory_of(Path::new("journal.jsonl")), Path::new("."));
        assert_eq!(directory_of(Path::new("./journal")), Path::new("."));
        assert_eq!(directory_of(Path::new("state/s.json")), Path::new("state"));
        assert_eq!(directory_of(Path::new("/s.json")), Path::new("/"));
    }

    #[test]
    fn files_are_replaced_whole_without_a_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/dir/state.json");
        replace(&path, b"first").unwrap();
        replace(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(!temporary_path(&path).exists());
        // A file beside it with the same stem keeps its own contents.
        let other = path.with_extension("jsonl");
        replace(&other, b"other").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
    }

    #[test]
    fn a_failed_replacement_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"old").unwrap();
        // A directory where the temporary file goes: the write fails.
        std::fs::create_dir(temporary_path(&path)).unwrap();
        assert!(replace(&path, b"new").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
