//! The `file` output: one JSON document per line (NDJSON), appended, for
//! any log shipper to tail. A batch is accepted once written whole and
//! synced (`fdatasync`). When a batch finds the file at `max_bytes` or
//! more, it is rotated first: `<path>.<keep-1>` becomes `<path>.<keep>`
//! (the oldest beyond is deleted) ... `<path>` becomes `<path>.1`, and a
//! new `<path>` is started (mode 0600). With `keep: 0` the file is
//! truncated instead. A write that fails part way leaves a partial line
//! the next attempt starts anew on its own line (the batch is written
//! again whole: at least once).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Item, Sink};
use crate::config::outputs::OutputSpec;

/// An NDJSON file, rotated by size.
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    /// The file's size as far as this sink wrote it.
    size: u64,
    /// The last write failed: start the next on a fresh line.
    broken: bool,
}

impl FileSink {
    /// A sink for `spec` (a file output); opens the file at the first
    /// batch.
    pub fn new(spec: &OutputSpec) -> FileSink {
        let (path, max_bytes, keep) = spec
            .file
            .as_ref()
            .map_or((PathBuf::new(), u64::MAX, 0), |f| (f.path.clone(), f.max_bytes, f.keep));
        FileSink { path, max_bytes, keep, file: None, size: 0, broken: false }
    }

    fn open(&mut self) -> Result<(), String> {
        if self.file.is_some() {
            return Ok(());
        }
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.size = file.metadata().map_err(|e| format!("{}: {e}", self.path.display()))?.len();
        self.file = Some(file);
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), String> {
        self.file = None;
        let err = |p: &Path, e: std::io::Error| format!("rotating {}: {e}", p.display());
        if self.keep == 0 {
            File::create(&self.path).map_err(|e| err(&self.path, e))?;
        } else {
            let nth = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
            match std::fs::remove_file(nth(self.keep)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(&nth(self.keep), e)),
                _ => {}
            }
            for n in (1..self.keep).rev() {
                match std::fs::rename(nth(n), nth(n + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(&nth(n), e)),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, nth(1)).map_err(|e| err(&self.path, e))?;
        }
        self.open()
    }
}

impl Sink for FileSink {
    fn deliver(&mut self, batch: &[Item]) -> Result<(), String> {
        self.open()?;
        if self.size >= self.max_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(batch.iter().map(|i| i.json.len() + 1).sum::<usize>() + 1);
        if self.broken && self.size > 0 {
            buf.push(b'\n');
        }
        for item in batch {
            buf.extend_from_slice(item.json.as_bytes());
            buf.push(b'\n');
        }
        let Some(file) = self.file.as_mut() else {
            return Err(format!("{}: not open", self.path.display()));
        };
        let result = file.write_all(&buf).and_then(|()| file.sync_data());
        match result {
            Ok(()) => {
                self.size += buf.len() as u64;
                self.broken = false;
                Ok(())
            }
            Err(e) => {
                // Reopened (and its size read again) at the next attempt.
                self.file = None;
                self.broken = true;
                Err(format!("{}: {e}", self.path.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u64) -> Item {
        Item { id: n.to_string(), kind: "alert", severity: 5, time_ms: 0, json: format!("{{\"n\":{n:>4}}}") }
    }

    #[test]
    fn the_file_rotates_by_size_and_keeps_its_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.ndjson");
        let text = format!(
            "outputs:\n  - {{name: f, type: file, file: {{path: {}, max_bytes: 4096, keep: 2}}}}\n",
            path.display()
        );
        let spec = crate::config::AgentConfig::parse(&text, "t", dir.path()).unwrap().outputs.remove(0);
        let mut sink = FileSink::new(&spec);
        // 11 bytes a line, 100 lines a batch: a rotation every 4 batches.
        for b in 0..20u64 {
            let batch: Vec<Item> = (0..100).map(|i| item(b * 100 + i)).collect();
            sink.deliver(&batch).unwrap();
        }
        let read = |p: &Path| -> Vec<u64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap())
                .collect()
        };
        let (cur, one, two) =
            (read(&path), read(&dir.path().join("out.ndjson.1")), read(&dir.path().join("out.ndjson.2")));
        assert!(!dir.path().join("out.ndjson.3").exists());
        // Newest in the file, older in .1, older still in .2: contiguous.
        let all: Vec<u64> = two.iter().chain(&one).chain(&cur).copied().collect();
        assert_eq!(all, (all[0]..2000).collect::<Vec<_>>());
        assert!(one.len() >= 300 && two.len() >= 300, "{} {}", one.len(), two.len());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
