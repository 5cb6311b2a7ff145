//! The crate's one error type. Every variant carries the context an operator
//! needs: the path, the segment and the offset.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What was wrong with a damaged region of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CorruptionKind {
    /// The region ends before a whole record header or payload.
    Truncated,
    /// A length prefix above the segment's maximum record size.
    LengthOverMax {
        /// The length prefix found.
        len: u32,
        /// The segment's maximum record size.
        max: u32,
    },
    /// The record's checksum does not match its contents.
    Checksum,
    /// A checksummed record whose sequence number goes backwards.
    Sequence {
        /// The sequence number the reader expected.
        expected: u64,
        /// The sequence number found.
        found: u64,
    },
    /// Records are missing: the next valid record (or segment) starts past
    /// the expected sequence number.
    Gap {
        /// The first missing sequence number.
        first_missing: u64,
        /// The sequence number found instead.
        found: u64,
    },
    /// The segment header is unreadable, so none of its records can be
    /// trusted.
    Header(crate::format::HeaderError),
}

impl fmt::Display for CorruptionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorruptionKind::Truncated => write!(f, "incomplete record"),
            CorruptionKind::LengthOverMax { len, max } => {
                write!(f, "length prefix {len} exceeds the maximum record size {max}")
            }
            CorruptionKind::Checksum => write!(f, "checksum mismatch"),
            CorruptionKind::Sequence { expected, found } => {
                write!(f, "sequence {found} where {expected} was expected")
            }
            CorruptionKind::Gap { first_missing, found } => {
                write!(f, "records {first_missing}..{found} are missing")
            }
            CorruptionKind::Header(e) => write!(f, "{e}"),
        }
    }
}

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call on a WAL file or directory failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "fsync", "write", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The WAL directory does not exist (read-only inspection does not
    /// create it).
    #[error("WAL directory {} does not exist", dir.display())]
    NotFound {
        /// The directory that was asked for.
        dir: PathBuf,
    },
    /// The directory holds none of a write-ahead log's files (no segment,
    /// no `LOCK`, no `WATERMARK`): read-only inspection refuses it rather
    /// than report an empty, healthy log.
    #[error("{} is not a write-ahead log directory (no segment, LOCK or WATERMARK file)", dir.display())]
    NotAWal {
        /// The directory that was asked for.
        dir: PathBuf,
    },
    /// The directory or one of its files is not private to this
    /// process's user: another user's, or writable by group or others
    /// (see the crate docs). Nothing was changed.
    #[error("refusing WAL path {}: {reason}", path.display())]
    NotPrivate {
        /// The directory or file.
        path: PathBuf,
        /// Whose it is and its mode.
        reason: String,
    },
    /// Another writer holds the directory's lock file.
    #[error("WAL directory {} is locked by another writer{}", dir.display(),
        holder_pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The directory whose lock is held.
        dir: PathBuf,
        /// The process id the holder wrote into the lock file, if readable.
        holder_pid: Option<u32>,
    },
    /// The options given to [`crate::Wal::open`] are unusable.
    #[error("invalid WAL options: {reason}")]
    InvalidOptions {
        /// What is wrong and which range is allowed.
        reason: String,
    },
    /// A payload is larger than the configured maximum record size.
    #[error("record of {len} bytes exceeds the maximum record size of {max} bytes")]
    RecordTooLarge {
        /// The payload length.
        len: usize,
        /// The configured maximum.
        max: u32,
    },
    /// `truncate_through` was asked to acknowledge a sequence number that
    /// was never assigned.
    #[error("cannot acknowledge through sequence {requested}: the last assigned sequence is {last}")]
    WatermarkAhead {
        /// The requested watermark.
        requested: u64,
        /// The last sequence number assigned so far (0 when none).
        last: u64,
    },
    /// A damaged region found while reading records.
    #[error("corrupt WAL segment {} at offset {offset} ({bytes} bytes): {kind}", segment.display())]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte offset of the damaged region in the segment.
        offset: u64,
        /// Length of the damaged region in bytes.
        bytes: u64,
        /// What was wrong.
        kind: CorruptionKind,
    },
    /// An earlier write or fsync failed. After a failed fsync the kernel may
    /// have dropped the dirty pages, so retrying could report success for
    /// data that is gone; the log refuses further writes until reopened,
    /// which recovers from what is really on disk.
    #[error("WAL is unusable after an earlier failure ({reason}); reopen it to recover")]
    Poisoned {
        /// The failure that poisoned the log.
        reason: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the operation and path.
pub(crate) fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
