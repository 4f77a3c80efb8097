//! The one way this server writes a file that must survive `kill -9` or a power cut.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `contents` so that after a crash the file holds either the old bytes
/// or the new ones, never a mix: write a temporary file beside it, fsync it, rename it over the
/// real name, then fsync the directory so the rename itself is on disk.
pub fn write_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("partial");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Makes the creation, removal or rename of `path` durable by syncing its directory.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes an existing file's contents durable, and its name (the directory entry). A missing
/// file has nothing to sync.
pub fn sync_file(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(file) => file.sync_all().and_then(|()| sync_parent(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_file_replaces_contents_and_leaves_no_partial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".version");
        write_file(&path, b"one").unwrap();
        write_file(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!path.with_extension("partial").exists());
    }
}
