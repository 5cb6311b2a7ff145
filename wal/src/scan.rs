//! Reading a segment: a forward scanner that yields records and damaged
//! regions. Recovery, read-only inspection and replay all use it, so they
//! agree on what counts as a record.
//!
//! After a damaged record the scanner searches byte by byte for the next
//! frame whose length fits, whose sequence number moves forward and whose
//! salted checksum matches. A damaged region followed by a valid record is
//! corruption; one that runs to the end of the file is a bad tail (a torn
//! write when it is the active segment). A length prefix is checked against
//! the segment's maximum before any read sized by it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::CorruptionKind;
use crate::format::{RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader, record_crc};

/// Bytes read from disk at a time.
const CHUNK: usize = 256 * 1024;

/// A read buffer over a file region `[0, end)` that serves small forward
/// moving windows without a syscall per record.
struct Window {
    file: File,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
    /// Bytes of the file the scanner may look at.
    end: u64,
}

impl Window {
    /// Returns up to `n` bytes at `off` (fewer only at `end`).
    fn get(&mut self, off: u64, n: usize) -> io::Result<&[u8]> {
        let want = (n as u64).min(self.end.saturating_sub(off)) as usize;
        let have = off >= self.start && off + want as u64 <= self.start + self.buf.len() as u64;
        if !have {
            let len = (want.max(CHUNK) as u64).min(self.end.saturating_sub(off)) as usize;
            self.buf.clear();
            self.buf.resize(len, 0);
            self.file.seek(SeekFrom::Start(off))?;
            let mut filled = 0;
            while filled < len {
                match self.file.read(&mut self.buf[filled..]) {
                    Ok(0) => break,
                    Ok(k) => filled += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.buf.truncate(filled);
            if filled < len {
                // The file shrank under us: only what was read counts.
                self.end = off + filled as u64;
            }
            self.start = off;
        }
        let from = (off - self.start) as usize;
        let to = (from + want).min(self.buf.len());
        Ok(&self.buf[from..to])
    }
}

/// One thing found in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A valid record; its payload is [`SegmentScanner::payload`] until the
    /// next call.
    Record {
        /// Byte offset of the record frame.
        offset: u64,
        /// Its sequence number.
        seq: u64,
        /// Payload length.
        len: u32,
    },
    /// A damaged region followed by a valid record.
    Corrupt {
        /// Offset of the damaged region.
        offset: u64,
        /// Its length in bytes.
        bytes: u64,
        /// What the first bad frame looked like.
        kind: CorruptionKind,
    },
    /// Valid records whose sequence numbers skip ahead (nothing damaged on
    /// disk between them, but numbers are missing).
    Gap {
        /// Offset of the record after the gap.
        offset: u64,
        /// The first missing sequence number.
        first_missing: u64,
        /// The sequence number found.
        found: u64,
    },
    /// A damaged region that runs to the end of the scanned range.
    BadTail {
        /// Offset of the damaged region.
        offset: u64,
        /// Its length in bytes.
        bytes: u64,
        /// What the first bad frame looked like.
        kind: CorruptionKind,
    },
}

/// Scans one segment front to back.
pub struct SegmentScanner {
    win: Window,
    header: SegmentHeader,
    pos: u64,
    /// The sequence number the next record should carry.
    expected: u64,
    /// Payload of the last record yielded.
    payload: Vec<u8>,
    /// Set once the end is reached or a bad tail was yielded.
    done: bool,
    /// A record found by resynchronisation, yielded after its `Corrupt`.
    pending: Option<(u64, RecordHeader)>,
}

impl SegmentScanner {
    /// Opens `path`, reads and validates its header, and scans at most
    /// `limit` bytes (the whole file when `None`).
    pub fn open(path: &Path, limit: Option<u64>) -> io::Result<Result<Self, crate::format::HeaderError>> {
        let mut file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let end = limit.map_or(file_len, |l| l.min(file_len));
        let mut hdr = [0u8; SEGMENT_HEADER_LEN as usize];
        let mut got = 0;
        while got < hdr.len() {
            match file.read(&mut hdr[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let header = match SegmentHeader::decode(&hdr[..got]) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        Ok(Ok(SegmentScanner {
            win: Window { file, buf: Vec::new(), start: 0, end },
            header,
            pos: SEGMENT_HEADER_LEN,
            expected: header.first_seq,
            payload: Vec::new(),
            done: false,
            pending: None,
        }))
    }

    /// The segment's header.
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// Offset just past the last valid record yielded so far (the header
    /// length before any).
    pub fn valid_end(&self) -> u64 {
        self.pos
    }

    /// The payload of the record last yielded.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The sequence number the next record should carry.
    pub fn expected_seq(&self) -> u64 {
        self.expected
    }

    /// Yields the next record or damaged region. With `want_payload` the
    /// payload of a record is copied for [`SegmentScanner::payload`] (replay
    /// needs it; recovery does not).
    pub fn next_item(&mut self, want_payload: bool) -> io::Result<Option<Item>> {
        if let Some((offset, rh)) = self.pending.take() {
            return self.accept(offset, rh, want_payload).map(Some);
        }
        if self.done || self.pos >= self.win.end {
            self.done = true;
            return Ok(None);
        }
        let offset = self.pos;
        match self.check(offset, Some(self.expected))? {
            Ok(rh) => self.accept(offset, rh, want_payload).map(Some),
            Err(kind) => match self.resync(offset + 1)? {
                Some((next, rh)) => {
                    // The damaged region accounts for the numbers skipped.
                    self.expected = rh.seq;
                    self.pending = Some((next, rh));
                    self.pos = next;
                    Ok(Some(Item::Corrupt { offset, bytes: next - offset, kind }))
                }
                None => {
                    self.done = true;
                    Ok(Some(Item::BadTail { offset, bytes: self.win.end.saturating_sub(offset), kind }))
                }
            },
        }
    }

    fn accept(&mut self, offset: u64, rh: RecordHeader, want_payload: bool) -> io::Result<Item> {
        if rh.seq > self.expected {
            // Yield the gap now and the record on the next call.
            let first_missing = self.expected;
            self.expected = rh.seq;
            self.pending = Some((offset, rh));
            self.pos = offset;
            return Ok(Item::Gap { offset, first_missing, found: rh.seq });
        }
        if want_payload {
            let p = self.win.get(offset + RECORD_HEADER_LEN, rh.len as usize)?;
            self.payload.clear();
            self.payload.extend_from_slice(p);
        }
        self.pos = offset + RECORD_HEADER_LEN + u64::from(rh.len);
        self.expected = rh.seq.saturating_add(1);
        Ok(Item::Record { offset, seq: rh.seq, len: rh.len })
    }

    /// Validates the frame at `offset`. With `expected`, a sequence number
    /// below it is an error; any forward sequence is accepted (a gap is
    /// reported by `accept`).
    fn check(
        &mut self,
        offset: u64,
        expected: Option<u64>,
    ) -> io::Result<Result<RecordHeader, CorruptionKind>> {
        let max = self.header.max_record_size;
        let end = self.win.end;
        let salt = self.header.salt;
        let h = self.win.get(offset, RECORD_HEADER_LEN as usize)?;
        if h.len() < RECORD_HEADER_LEN as usize {
            return Ok(Err(CorruptionKind::Truncated));
        }
        let rh = RecordHeader::decode(h);
        // Invariant: the length prefix is bounded before it sizes any read.
        if rh.len > max {
            return Ok(Err(CorruptionKind::LengthOverMax { len: rh.len, max }));
        }
        if offset + RECORD_HEADER_LEN + u64::from(rh.len) > end {
            return Ok(Err(CorruptionKind::Truncated));
        }
        let frame = self.win.get(offset, (RECORD_HEADER_LEN + u64::from(rh.len)) as usize)?;
        if record_crc(salt, rh.len, rh.seq, &frame[RECORD_HEADER_LEN as usize..]) != rh.crc {
            return Ok(Err(CorruptionKind::Checksum));
        }
        // The writer never assigns u64::MAX (see `Wal::append_batch`).
        if let Some(exp) = expected
            && (rh.seq < exp || rh.seq == u64::MAX)
        {
            return Ok(Err(CorruptionKind::Sequence { expected: exp, found: rh.seq }));
        }
        Ok(Ok(rh))
    }

    /// Finds the first valid frame at or after `from` whose sequence number
    /// is not below the expected one.
    fn resync(&mut self, from: u64) -> io::Result<Option<(u64, RecordHeader)>> {
        let max = u64::from(self.header.max_record_size);
        let mut p = from;
        // `end` is re-read each step: a read may find the file shorter.
        while p + RECORD_HEADER_LEN <= self.win.end {
            let end = self.win.end;
            // Cheap filters first, so the checksum runs on few candidates.
            let h = self.win.get(p, RECORD_HEADER_LEN as usize)?;
            if h.len() < RECORD_HEADER_LEN as usize {
                break;
            }
            let rh = RecordHeader::decode(h);
            let len = u64::from(rh.len);
            let plausible_seq = rh.seq >= self.expected
                && rh.seq - self.expected <= end.saturating_sub(SEGMENT_HEADER_LEN) / RECORD_HEADER_LEN;
            if len <= max
                && p + RECORD_HEADER_LEN + len <= end
                && plausible_seq
                && let Ok(rh) = self.check(p, Some(self.expected))?
            {
                return Ok(Some((p, rh)));
            }
            p += 1;
        }
        Ok(None)
    }
}
