//! A crash-safe write-ahead log: segmented, checksummed, append-only, with a
//! single writer. procmond appends every event here *before* publishing it
//! and drops records only once the agent's store has acknowledged them, so
//! an event survives a SIGKILL or a power loss between collection and
//! storage. The crate knows nothing about processes: records are bytes.
//!
//! # Guarantees
//!
//! - A record is either wholly visible after a crash or absent. Records are
//!   framed with their length and a CRC32C salted per segment; recovery
//!   accepts nothing whose checksum fails.
//! - With [`Durability::Always`], [`Wal::append`] returns only after the
//!   record is fsynced; concurrent appends share one fsync (group commit).
//!   Under every policy a returned append has reached the kernel, so it
//!   survives a crash of the process.
//! - Sequence numbers start at 1, are contiguous, and are never handed out
//!   twice, not even after damage (a consumer deduplicating by sequence
//!   would otherwise drop new records as old ones).
//! - A length prefix is checked against the segment's maximum record size
//!   before it sizes any read or allocation.
//! - Nothing above the acknowledgement watermark is ever deleted.
//!   [`Wal::truncate_through`] persists the watermark before deleting
//!   anything.
//! - Recovery never panics and never skips silently: a torn tail of the
//!   active segment is cut and reported; damage anywhere else is reported
//!   with its file and offset, and the records after it are still recovered
//!   where the framing allows.
//! - One writer per directory, enforced with an exclusive lock on `LOCK`
//!   (std's `File::try_lock`); the lock dies with its process.
//! - The log is private to the user that writes it (Unix): the directory
//!   (and every parent [`Wal::open`] creates) is mode 0700 and every file
//!   0600 whatever the umask, files are created without following
//!   symbolic links, and a directory that belongs to another user or that
//!   others may write to is refused ([`Error::NotPrivate`]); one others
//!   may read, and files with looser modes, are tightened. Another user
//!   can neither read the records nor open `LOCK` to hold its lock.
//!
//! # On-disk format (version 1)
//!
//! A directory holds `LOCK` (the writer's pid), `WATERMARK` (the last
//! acknowledged sequence) and segment files named after their first
//! sequence number, `<first_seq:020>.seg`. All integers are little-endian.
//!
//! ```text
//! segment header, 32 bytes
//!   magic b"DEYEWALS" | version u32 = 1 | salt u32 | first_seq u64
//!   | max_record_size u32 | crc32c(previous 28 bytes) u32
//! record, 16 bytes + payload, back to back after the header
//!   len u32 | crc32c(salt ‖ len ‖ seq ‖ payload) u32 | seq u64 | payload
//! WATERMARK, 20 bytes
//!   magic b"DEYEWMRK" | acknowledged-through seq u64 | crc32c(previous 16) u32
//! ```
//!
//! Segments are created as `*.seg.tmp`, fsynced, renamed and the directory
//! fsynced, so a file under a segment name always has a whole header. A
//! segment is fsynced before the next one is created ("sealed"); damage in a
//! sealed segment is therefore corruption, never a torn write. The watermark
//! is replaced the same way (write, fsync, rename, directory fsync).
//!
//! # Use
//!
//! ```
//! use daemoneye_wal::{Wal, WalOptions};
//! # let dir = std::env::temp_dir().join(format!("wal-doc-{}", std::process::id()));
//! let (wal, report) = Wal::open(&dir, WalOptions::default())?;
//! assert!(report.is_healthy());
//! let seq = wal.append(b"event")?;
//! for record in wal.replay_from(0)? {
//!     let record = record?;
//!     assert_eq!((record.seq, &record.payload[..]), (seq, &b"event"[..]));
//! }
//! wal.truncate_through(seq)?; // the consumer acknowledged it
//! # wal.close()?; std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), daemoneye_wal::Error>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod error;
pub mod format;
mod private;
mod report;
mod scan;
mod writer;

pub use crate::error::{CorruptionKind, Error, Result};
pub use crate::report::{Corruption, RecoveryReport, TornTail, inspect};
pub use crate::writer::{Durability, Record, Replay, Wal, WalOptions, read_dir};
