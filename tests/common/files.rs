//! Temporary files and gzip for the tests that read traces from disk.

use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A path in the temp dir unique to this process and call; the file is removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A fresh path ending in `name` (nothing written).
    pub fn new(name: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        TempFile(
            std::env::temp_dir().join(format!("tessera-test-{}-{n}-{name}", std::process::id())),
        )
    }

    /// A fresh file ending in `name`, holding `bytes`.
    pub fn with(name: &str, bytes: &[u8]) -> TempFile {
        let f = TempFile::new(name);
        std::fs::write(&f.0, bytes).unwrap();
        f
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `bytes`, gzipped.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}
