//! Continuity across restarts: the processes procmond has reported as
//! running, saved so that a restarted procmond neither forgets what ended
//! while it was down nor re-sends what it already reported.
//!
//! # Guarantees
//!
//! - A checkpoint file is whole or absent: it is written to a temporary
//!   file, fsynced, renamed over the old one, and the directory fsynced.
//!   A damaged file (wrong magic, length, checksum, or body) is reported
//!   and ignored: procmond then starts as on an empty data dir (a snapshot).
//! - It is private (the processes' command lines): mode 0600 whatever the
//!   umask, and its temporary file is created anew (`O_EXCL`, after
//!   removing a leftover), so a link planted in its place is never written
//!   through (`daemoneye_platform::files::replace_private_file`).
//! - A checkpoint names the last event of the stream it reflects
//!   (`through_seq`). The sink keeps every event after it (the WAL is
//!   truncated no further than the checkpoint), so the state at a restart
//!   is the checkpoint plus the events after it: exactly what was reported.
//! - It is valid only on the boot it was written in (`boot_id`) and for
//!   the stream it names; start times do not survive a reboot.
//!
//! # Format (version 1)
//!
//! ```text
//! magic "DEYECKPT" (8) | body length u64 LE | crc32c(body) u32 LE | body
//! body = postcard(CheckpointBody { version: 1, boot_id, backend, stream_id,
//!                                  through_seq, written_unix_ms, processes })
//! ```
//!
//! The body length is checked against [`MAX_BODY`] before anything is
//! allocated for it.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use daemoneye_platform::ProcessRecord;
use serde::{Deserialize, Serialize};

/// The file's first bytes.
const MAGIC: &[u8; 8] = b"DEYECKPT";
/// The format version this build writes and reads.
const VERSION: u32 = 1;
/// The largest body read (a million processes fit many times over).
const MAX_BODY: u64 = 1 << 30;
const HEADER: usize = 8 + 8 + 4;

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The boot it was written in.
    pub boot_id: String,
    /// The process source's backend (start times are in its unit).
    pub backend: String,
    /// The event stream it belongs to.
    pub stream_id: u64,
    /// The last event of that stream it reflects.
    pub through_seq: u64,
    /// When it was written (Unix ms).
    pub written_unix_ms: u64,
    /// The processes reported as running (sanitized records).
    pub processes: Vec<ProcessRecord>,
}

#[derive(Serialize, Deserialize)]
struct CheckpointBody {
    version: u32,
    boot_id: String,
    backend: String,
    stream_id: u64,
    through_seq: u64,
    written_unix_ms: u64,
    processes: Vec<ProcessRecord>,
}

/// Why a checkpoint could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a whole, valid checkpoint.
    #[error("{} is damaged: {reason}", path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The checkpoint file of collector `id` in `data_dir`.
pub fn path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join(format!("procmond-{id}.checkpoint"))
}

/// What a checkpoint holds besides its processes, for [`write_records`].
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    /// The boot it was written in.
    pub boot_id: &'a str,
    /// The process source's backend.
    pub backend: &'a str,
    /// The event stream it belongs to.
    pub stream_id: u64,
    /// The last event of that stream it reflects.
    pub through_seq: u64,
    /// When it was written (Unix ms).
    pub written_unix_ms: u64,
}

/// The body as written: the same postcard bytes as [`CheckpointBody`]
/// (a `&str` encodes as a `String`, a slice as a `Vec`), from borrowed
/// records, so a checkpoint of 10,000 processes copies none of them.
#[derive(Serialize)]
struct BodyRef<'a, P: Serialize> {
    version: u32,
    boot_id: &'a str,
    backend: &'a str,
    stream_id: u64,
    through_seq: u64,
    written_unix_ms: u64,
    processes: &'a [P],
}

/// Writes `cp` to `path` atomically (see the module docs).
pub fn write(path: &Path, cp: &Checkpoint) -> Result<(), CheckpointError> {
    write_records(path, Header::of(cp), &cp.processes)
}

impl<'a> Header<'a> {
    /// The header of `cp`.
    pub fn of(cp: &'a Checkpoint) -> Header<'a> {
        Header {
            boot_id: &cp.boot_id,
            backend: &cp.backend,
            stream_id: cp.stream_id,
            through_seq: cp.through_seq,
            written_unix_ms: cp.written_unix_ms,
        }
    }
}

/// Writes a checkpoint of borrowed records to `path` atomically (see the
/// module docs): what [`write`] writes, encoded straight into the file
/// (no copy of the records, no buffer of the whole body).
pub fn write_records<P: Serialize>(
    path: &Path,
    header: Header<'_>,
    processes: &[P],
) -> Result<(), CheckpointError> {
    let io = |op, source| CheckpointError::Io { op, path: path.to_owned(), source };
    let body = BodyRef {
        version: VERSION,
        boot_id: header.boot_id,
        backend: header.backend,
        stream_id: header.stream_id,
        through_seq: header.through_seq,
        written_unix_ms: header.written_unix_ms,
        processes,
    };
    // Streamed into the file through a small buffer, the body's length
    // and checksum counted on the way; the header's place is written
    // first and filled in last. No copy of the body is ever in memory.
    daemoneye_platform::files::replace_private_file_with(path, |file| {
        file.write_all(&[0u8; HEADER])?;
        let mut out = Counted { inner: BufWriter::with_capacity(64 * 1024, &mut *file), len: 0, crc: 0 };
        postcard::to_io(&body, &mut out).map_err(std::io::Error::other)?;
        out.inner.flush()?;
        let (len, crc) = (out.len, out.crc);
        drop(out);
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&len.to_le_bytes());
        header[16..].copy_from_slice(&crc.to_le_bytes());
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&header)
    })
    .map_err(|e| io("write", e))
}

/// A writer that counts the bytes through it and their CRC-32C.
struct Counted<W> {
    inner: W,
    len: u64,
    crc: u32,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.len += n as u64;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads the checkpoint at `path`: `None` when there is none.
pub fn read(path: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let damaged = |reason: String| CheckpointError::Damaged { path: path.to_owned(), reason };
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CheckpointError::Io { op: "open", path: path.to_owned(), source }),
    };
    let mut header = [0u8; HEADER];
    f.read_exact(&mut header).map_err(|e| damaged(format!("header: {e}")))?;
    if &header[..8] != MAGIC {
        return Err(damaged("not a checkpoint (magic)".into()));
    }
    let len = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(header[16..20].try_into().unwrap_or_default());
    if len > MAX_BODY {
        return Err(damaged(format!("body length {len} exceeds {MAX_BODY}")));
    }
    let mut body = Vec::new();
    f.take(len + 1).read_to_end(&mut body).map_err(|e| damaged(format!("body: {e}")))?;
    if body.len() as u64 != len {
        return Err(damaged(format!("body is {} bytes, the header says {len}", body.len())));
    }
    if crc32c::crc32c(&body) != crc {
        return Err(damaged("checksum mismatch".into()));
    }
    let b: CheckpointBody = postcard::from_bytes(&body).map_err(|e| damaged(format!("body: {e}")))?;
    if b.version != VERSION {
        return Err(damaged(format!("format version {} (this build reads {VERSION})", b.version)));
    }
    Ok(Some(Checkpoint {
        boot_id: b.boot_id,
        backend: b.backend,
        stream_id: b.stream_id,
        through_seq: b.through_seq,
        written_unix_ms: b.written_unix_ms,
        processes: b.processes,
    }))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::testing::record;

    fn sample() -> Checkpoint {
        Checkpoint {
            boot_id: "boot-1".into(),
            backend: "linux-procfs".into(),
            stream_id: 7,
            through_seq: 42,
            written_unix_ms: 1_700_000_000_000,
            processes: vec![record(1, 10, "init"), record(2, 20, "sshd")],
        }
    }

    #[test]
    fn a_checkpoint_round_trips_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "pm");
        assert!(read(&p).unwrap().is_none(), "absent is not an error");
        write(&p, &sample()).unwrap();
        let mut second = sample();
        second.through_seq = 43;
        second.processes.pop();
        write(&p, &second).unwrap();
        assert_eq!(read(&p).unwrap(), Some(second));
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600, "private");
        }
    }

    #[test]
    fn borrowed_records_write_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (owned, borrowed) = (path(dir.path(), "a"), path(dir.path(), "b"));
        let cp = sample();
        write(&owned, &cp).unwrap();
        let refs: Vec<&ProcessRecord> = cp.processes.iter().collect();
        write_records(&borrowed, Header::of(&cp), &refs).unwrap();
        assert_eq!(fs::read(&owned).unwrap(), fs::read(&borrowed).unwrap());
        assert_eq!(read(&borrowed).unwrap(), Some(cp));
    }

    #[test]
    fn every_damage_is_reported_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "pm");
        write(&p, &sample()).unwrap();
        let good = fs::read(&p).unwrap();
        // Every truncation.
        for cut in 0..good.len() {
            fs::write(&p, &good[..cut]).unwrap();
            assert!(matches!(read(&p), Err(CheckpointError::Damaged { .. })), "cut at {cut}");
        }
        // Every single-byte flip.
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            fs::write(&p, &bad).unwrap();
            assert!(matches!(read(&p), Err(CheckpointError::Damaged { .. })), "flip at {at}");
        }
        // A hostile length is refused before any allocation.
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&p, &huge).unwrap();
        let err = read(&p).unwrap_err().to_string();
        assert!(err.contains("exceeds"), "{err}");
    }
}
