//! Read-only survey of a WAL directory and the report it produces. Opening
//! a log for writing runs the same survey, then repairs what it may (a torn
//! tail, leftovers of an interrupted rotation or truncation).

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{CorruptionKind, Error, Result, io_err};
use crate::format::{self, SegmentHeader};
use crate::scan::{Item, SegmentScanner};

/// Name of the lock file that keeps a second writer out.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// Name of the persisted acknowledgement watermark.
pub(crate) const WATERMARK_FILE: &str = "WATERMARK";

/// The torn end of the active segment, cut off by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file.
    pub segment: PathBuf,
    /// Offset where the incomplete data begins (and, after repair, where the
    /// file now ends).
    pub offset: u64,
    /// Number of bytes that were (or would be) cut off.
    pub bytes: u64,
}

/// A damaged region or a broken invariant found in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The file concerned.
    pub segment: PathBuf,
    /// Byte offset of the damage in that file.
    pub offset: u64,
    /// Length of the damaged region in bytes (0 for a gap between records).
    pub bytes: u64,
    /// What was wrong.
    pub kind: CorruptionKind,
}

/// What opening or inspecting a log found.
///
/// A torn tail is recovery, not failure: the log is healthy when
/// `corruptions` is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files found.
    pub segments: usize,
    /// Valid records found on disk, acknowledged ones included.
    pub records: u64,
    /// Valid records above the acknowledgement watermark: what a replay
    /// from the start yields.
    pub unacknowledged: u64,
    /// Lowest sequence number found on disk.
    pub first_seq: Option<u64>,
    /// Highest sequence number found on disk.
    pub last_seq: Option<u64>,
    /// Every record up to and including this sequence is acknowledged.
    pub watermark: u64,
    /// The sequence number the next append gets.
    pub next_seq: u64,
    /// The torn end of the active segment, if any.
    pub torn_tail: Option<TornTail>,
    /// Damage found anywhere else. Records after a damaged region are still
    /// recovered where the framing allows.
    pub corruptions: Vec<Corruption>,
    /// Housekeeping done or due: leftover temporary files, segments that were
    /// wholly acknowledged, quarantined files.
    pub notes: Vec<String>,
}

impl RecoveryReport {
    /// True when no corruption was found (a torn tail is allowed).
    pub fn is_healthy(&self) -> bool {
        self.corruptions.is_empty()
    }
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "recovered {} records in {} segments", self.records, self.segments)?;
        match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => write!(f, " (seq {a}..={b})")?,
            _ => write!(f, " (no records)")?,
        }
        write!(f, ", {} unacknowledged after watermark {}", self.unacknowledged, self.watermark)?;
        if let Some(t) = &self.torn_tail {
            write!(
                f,
                "; truncated {} bytes of torn tail at offset {} of {}",
                t.bytes,
                t.offset,
                t.segment.display()
            )?;
        }
        for c in &self.corruptions {
            write!(
                f,
                "; CORRUPT {} at offset {} ({} bytes): {}",
                c.segment.display(),
                c.offset,
                c.bytes,
                c.kind
            )?;
        }
        for n in &self.notes {
            write!(f, "; {n}")?;
        }
        Ok(())
    }
}

/// What the survey learnt about one segment file.
#[derive(Debug)]
pub(crate) struct SegmentSurvey {
    pub path: PathBuf,
    /// `None` when the header is unreadable.
    pub header: Option<SegmentHeader>,
    /// Offset just past the last valid record.
    pub valid_end: u64,
    /// The sequence number a record appended after this segment's last
    /// valid record would get.
    pub next_seq: u64,
    /// Damage inside the segment (not counting the tail).
    pub corrupt: bool,
    /// A damaged region running to the end of the file.
    pub bad_tail: Option<(u64, u64, CorruptionKind)>,
}

/// The read-only picture of a directory.
#[derive(Debug)]
pub(crate) struct Survey {
    pub segments: Vec<SegmentSurvey>,
    pub report: RecoveryReport,
    /// Temporary files left by an interrupted segment creation or
    /// watermark update.
    pub temp_files: Vec<PathBuf>,
}

/// Segment files as (first sequence from the file name, path).
pub(crate) type SegmentFiles = Vec<(u64, PathBuf)>;

/// Lists the segment files of `dir`, ordered by first sequence number, and
/// the temporary files left over.
pub(crate) fn list_dir(dir: &Path) -> Result<(SegmentFiles, Vec<PathBuf>)> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NotFound { dir: dir.to_path_buf() });
        }
        Err(e) => return Err(io_err("read directory", dir)(e)),
    };
    let mut segs = Vec::new();
    let mut temps = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = format::parse_segment_file_name(name) {
            segs.push((seq, entry.path()));
        } else if name.ends_with(".tmp") {
            temps.push(entry.path());
        }
    }
    segs.sort();
    temps.sort();
    Ok((segs, temps))
}

/// Reads the watermark file: `Ok(None)` when absent, `Err(())` when damaged.
fn read_watermark(dir: &Path) -> Result<Option<std::result::Result<u64, ()>>> {
    let path = dir.join(WATERMARK_FILE);
    match fs::read(&path) {
        Ok(b) => Ok(Some(format::decode_watermark(&b).ok_or(()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Scans every segment of `dir` without changing anything. The last segment
/// is the active one: damage at its end is a torn tail, not corruption.
pub(crate) fn survey(dir: &Path) -> Result<Survey> {
    let (files, temp_files) = list_dir(dir)?;
    let mut report = RecoveryReport { segments: files.len(), ..Default::default() };
    // A watermark in the upper half of the sequence space cannot have been
    // written by this crate (it would take centuries of appends): treat it
    // as damage rather than let `+ 1` arithmetic saturate.
    let watermark =
        match read_watermark(dir)?.map(|w| w.and_then(|w| if w < u64::MAX / 2 { Ok(w) } else { Err(()) })) {
            None => 0,
            Some(Ok(w)) => w,
            Some(Err(())) => {
                report.corruptions.push(Corruption {
                    segment: dir.join(WATERMARK_FILE),
                    offset: 0,
                    bytes: format::WATERMARK_LEN as u64,
                    kind: CorruptionKind::Checksum,
                });
                // Without a trustworthy watermark, replay everything still on
                // disk: duplicates are harmless downstream, loss is not.
                files.first().map_or(0, |(s, _)| s.saturating_sub(1))
            }
        };
    report.watermark = watermark;

    let mut segments = Vec::with_capacity(files.len());
    // The sequence number the next segment should start at.
    let mut expected = watermark.saturating_add(1);
    let next_names: Vec<Option<u64>> = files.iter().skip(1).map(|f| Some(f.0)).chain([None]).collect();
    for ((name_seq, path), next_name) in files.into_iter().zip(next_names) {
        // `None`: deleted since it was listed (a concurrent truncation).
        let Some(seg) = survey_segment(&path, name_seq, next_name, expected, watermark, &mut report)? else {
            report.segments -= 1;
            continue;
        };
        expected = expected.max(seg.next_seq);
        segments.push(seg);
    }
    report.next_seq = expected.max(watermark.saturating_add(1));
    Ok(Survey { segments, report, temp_files })
}

/// Surveys one segment; `next_name` is the next segment's first sequence
/// (by its file name), `None` for the active segment.
fn survey_segment(
    path: &Path,
    name_seq: u64,
    next_name: Option<u64>,
    expected: u64,
    watermark: u64,
    report: &mut RecoveryReport,
) -> Result<Option<SegmentSurvey>> {
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let file_len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    let corruption = |offset, bytes, kind| Corruption { segment: path.to_path_buf(), offset, bytes, kind };
    let opened = match SegmentScanner::open(path, None) {
        Ok(o) => o,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut scanner = match opened {
        Ok(s) => s,
        Err(e) => {
            report.corruptions.push(corruption(0, file_len, CorruptionKind::Header(e)));
            // Nothing in it can be trusted. A sealed segment ends where the
            // next one begins. For the active one, no sequence number it may
            // have used must ever be handed out again: every record takes at
            // least a frame header, which bounds how many it held.
            let bound =
                next_name.unwrap_or(name_seq.saturating_add(file_len / format::RECORD_HEADER_LEN + 1));
            return Ok(Some(SegmentSurvey {
                path: path.to_path_buf(),
                header: None,
                valid_end: 0,
                next_seq: bound.max(expected),
                corrupt: true,
                bad_tail: None,
            }));
        }
    };
    let header = *scanner.header();
    let mut corrupt = false;
    if header.first_seq != name_seq {
        corrupt = true;
        report.corruptions.push(corruption(
            0,
            0,
            CorruptionKind::Sequence { expected: name_seq, found: header.first_seq },
        ));
    } else if header.first_seq > expected && header.first_seq.saturating_sub(1) > watermark {
        // Unacknowledged records between the previous segment and this one
        // are missing (a segment was deleted or lost).
        corrupt = true;
        report.corruptions.push(corruption(
            0,
            0,
            CorruptionKind::Gap { first_missing: expected, found: header.first_seq },
        ));
    } else if header.first_seq < expected && header.first_seq > watermark {
        corrupt = true;
        report.corruptions.push(corruption(
            0,
            0,
            CorruptionKind::Sequence { expected, found: header.first_seq },
        ));
    }
    let is_last = next_name.is_none();
    let mut bad_tail = None;
    while let Some(item) = scanner.next_item(false).map_err(io_err("read", path))? {
        match item {
            Item::Record { seq, .. } => {
                report.records += 1;
                if seq > watermark {
                    report.unacknowledged += 1;
                }
                report.first_seq = Some(report.first_seq.map_or(seq, |f| f.min(seq)));
                report.last_seq = Some(report.last_seq.map_or(seq, |l| l.max(seq)));
            }
            Item::Corrupt { offset, bytes, kind } => {
                corrupt = true;
                report.corruptions.push(corruption(offset, bytes, kind));
            }
            // A gap wholly at or below the watermark is acknowledged
            // records, not loss (a power cut under `Never` after the ack).
            Item::Gap { offset, first_missing, found } if found.saturating_sub(1) > watermark => {
                corrupt = true;
                report.corruptions.push(corruption(offset, 0, CorruptionKind::Gap { first_missing, found }));
            }
            Item::Gap { .. } => {}
            Item::BadTail { offset, bytes, kind } => {
                if is_last {
                    report.torn_tail = Some(TornTail { segment: path.to_path_buf(), offset, bytes });
                } else {
                    // Sealed segments were fsynced before the next one was
                    // created, so damage at their end is corruption.
                    corrupt = true;
                    report.corruptions.push(corruption(offset, bytes, kind));
                }
                bad_tail = Some((offset, bytes, kind));
            }
        }
    }
    Ok(Some(SegmentSurvey {
        path: path.to_path_buf(),
        header: Some(header),
        valid_end: scanner.valid_end(),
        next_seq: scanner.expected_seq(),
        corrupt,
        bad_tail,
    }))
}

/// Inspects a WAL directory without modifying it or taking its lock, as
/// `daemoneye-wal verify` does. A torn tail is reported as it would be cut.
pub fn inspect(dir: &Path) -> Result<RecoveryReport> {
    require_wal(dir)?;
    let s = survey(dir)?;
    let mut report = s.report;
    for t in &s.temp_files {
        report.notes.push(format!("leftover temporary file {}", t.display()));
    }
    Ok(report)
}

/// Refuses a directory that holds none of a log's files: a log that was
/// ever opened has its `LOCK` file and a segment.
pub(crate) fn require_wal(dir: &Path) -> Result<()> {
    let (segments, temps) = list_dir(dir)?;
    let marker = |name: &str| fs::symlink_metadata(dir.join(name)).is_ok();
    if segments.is_empty() && temps.is_empty() && !marker(LOCK_FILE) && !marker(WATERMARK_FILE) {
        return Err(Error::NotAWal { dir: dir.to_path_buf() });
    }
    Ok(())
}
