//! The writer: opening with recovery, appends with group commit, the
//! interval syncer thread, truncation after acknowledgement and replay.
//!
//! Locks, always taken in this order: `truncate` → `writer` → `sync`. The
//! poison cell is lock-free. No lock is held across an fsync except the
//! rotation fsync of a segment being sealed (rare, and it must finish before
//! the next segment exists).

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use parking_lot::{Condvar, Mutex};

use crate::error::{CorruptionKind, Error, Result, io_err};
use crate::format::{self, MAX_RECORD_LIMIT, SEGMENT_HEADER_LEN, SegmentHeader};
use crate::private;
use crate::report::{self, LOCK_FILE, RecoveryReport, WATERMARK_FILE};
use crate::scan::{Item, SegmentScanner};

/// When appended records are made durable with fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `append` returns only after its records are fsynced. Appends that
    /// arrive while an fsync runs share the next one (group commit).
    Always,
    /// A background thread fsyncs at this interval when there is something
    /// new; a power loss may lose up to one interval of records.
    Interval(Duration),
    /// No fsync except when a segment is sealed and on close. Records
    /// survive a crash of the process, not of the machine.
    Never,
}

/// Settings for [`Wal::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    /// A segment is sealed and a new one started when the next write would
    /// take it past this size (a single batch may exceed it). 4 KiB to
    /// 1 GiB; default 16 MiB.
    pub segment_size: u64,
    /// Largest payload accepted, in bytes. 1 to 64 MiB; default 1 MiB.
    pub max_record_size: u32,
    /// The fsync policy; default [`Durability::Always`].
    pub durability: Durability,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_size: 16 << 20, max_record_size: 1 << 20, durability: Durability::Always }
    }
}

impl WalOptions {
    fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidOptions { reason });
        if !(4096..=1 << 30).contains(&self.segment_size) {
            return bad(format!("segment_size {} is outside 4096..=1073741824 bytes", self.segment_size));
        }
        if !(1..=MAX_RECORD_LIMIT).contains(&self.max_record_size) {
            return bad(format!(
                "max_record_size {} is outside 1..={MAX_RECORD_LIMIT} bytes",
                self.max_record_size
            ));
        }
        if let Durability::Interval(d) = self.durability
            && d.is_zero()
        {
            return bad("Durability::Interval needs a non-zero interval".into());
        }
        Ok(())
    }
}

/// One record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number.
    pub seq: u64,
    /// Byte offset of its frame in its segment.
    pub offset: u64,
    /// The payload as appended.
    pub payload: Vec<u8>,
}

/// The segment being appended to.
struct Active {
    file: File,
    path: PathBuf,
}

struct Writer {
    active: Arc<Active>,
    /// First sequence number of the active segment.
    active_first: u64,
    salt: u32,
    max_record_size: u32,
    /// Bytes in the active segment.
    len: u64,
    /// The sequence number the next record gets.
    next_seq: u64,
    /// Sealed segments, oldest first: (first sequence, path).
    sealed: VecDeque<(u64, PathBuf)>,
    /// Scratch buffer for encoding a batch, reused.
    buf: Vec<u8>,
}

struct SyncState {
    /// Every record with a sequence below this is durable.
    durable_next: u64,
    /// A thread is running an fsync for the group.
    leader: bool,
}

pub(crate) struct Inner {
    dir: PathBuf,
    opts: WalOptions,
    truncate: Mutex<()>,
    writer: Mutex<Writer>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    poison: OnceLock<String>,
    /// Every record up to and including this sequence is acknowledged.
    /// Shared with live replays, which need it after the log is closed.
    watermark: Arc<AtomicU64>,
    /// Held for the life of the log; dropping it releases the lock.
    _lock: File,
}

/// The interval syncer thread.
struct Syncer {
    // Field order matters: the stop sender is dropped before the thread is
    // joined, which is what tells the thread to stop.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A segmented, checksummed, crash-safe append-only log with a single
/// writer. Share it between threads by reference or `Arc`; every method
/// takes `&self`.
pub struct Wal {
    inner: Arc<Inner>,
    syncer: Option<Syncer>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("dir", &self.inner.dir).field("opts", &self.inner.opts).finish()
    }
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`, takes its writer lock,
    /// recovers and repairs it, and reports what it found.
    ///
    /// Repairs: a torn tail of the active segment is cut off; a segment with
    /// an unreadable header is renamed to `*.corrupt` (its sequence numbers
    /// are never reused); segments wholly below the watermark and temporary
    /// files from an interrupted update are deleted; a segment with damage in
    /// the middle is sealed, and appends go to a fresh segment.
    pub fn open(dir: impl AsRef<Path>, opts: WalOptions) -> Result<(Wal, RecoveryReport)> {
        opts.validate()?;
        let dir = dir.as_ref().to_path_buf();
        if private::create_dirs(&dir)? {
            // The new directory's own entry must survive a power loss too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        private::check_dir(&dir)?;
        let lock = take_lock(&dir)?;
        // Files an older release made readable by others (0644).
        for entry in fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
            let entry = entry.map_err(io_err("read directory", &dir))?;
            private::tighten(&entry.path())?;
        }
        let survey = report::survey(&dir)?;
        let mut report = survey.report;
        let mut dir_changed = false;

        for t in &survey.temp_files {
            fs::remove_file(t).map_err(io_err("remove", t))?;
            report.notes.push(format!("removed leftover temporary file {}", t.display()));
            dir_changed = true;
        }

        let watermark = report.watermark;
        let mut sealed = VecDeque::new();
        let mut active = None;
        let count = survey.segments.len();
        for (i, seg) in survey.segments.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let Some(header) = seg.header else {
                let to = seg.path.with_extension("seg.corrupt");
                fs::rename(&seg.path, &to).map_err(io_err("rename", &seg.path))?;
                report.notes.push(format!("quarantined unreadable segment as {}", to.display()));
                dir_changed = true;
                continue;
            };
            // A sealed segment is wholly acknowledged when the next one
            // starts at or below watermark + 1.
            if !is_last && seg.next_seq <= watermark.saturating_add(1) && !seg.corrupt {
                fs::remove_file(&seg.path).map_err(io_err("remove", &seg.path))?;
                report.notes.push(format!("removed acknowledged segment {}", seg.path.display()));
                dir_changed = true;
                continue;
            }
            if is_last {
                let f = private::open_existing(&seg.path, false).map_err(io_err("open", &seg.path))?;
                if let Some((offset, bytes, _)) = seg.bad_tail {
                    f.set_len(offset).map_err(io_err("truncate", &seg.path))?;
                    log::warn!(
                        "WAL {}: truncated {bytes} bytes of torn tail at offset {offset}",
                        seg.path.display()
                    );
                }
                // What the previous writer left in the page cache becomes
                // durable now, so `durable_through` tells the truth.
                f.sync_all().map_err(io_err("fsync", &seg.path))?;
                // Keep appending to it only if it is sound, was written with
                // today's maximum record size (its header bounds what a
                // reader accepts), and ends where the sequence goes on (a
                // watermark past its end means records were lost under
                // `Never` after they were acknowledged).
                let continues = seg.next_seq == report.next_seq;
                if !seg.corrupt && header.max_record_size == opts.max_record_size && continues {
                    active = Some((header, seg.path, seg.valid_end));
                    continue;
                }
            }
            sealed.push_back((header.first_seq, seg.path));
        }
        report.segments = sealed.len() + usize::from(active.is_some());

        let next_seq = report.next_seq;
        let (active, salt, active_first, len) = match active {
            Some((header, path, valid_end)) => {
                let file = private::open_existing(&path, true).map_err(io_err("open", &path))?;
                (Active { file, path }, header.salt, header.first_seq, valid_end)
            }
            None => {
                let (active, header) = create_segment(&dir, next_seq, opts.max_record_size)?;
                report.segments += 1;
                dir_changed = false; // create_segment fsyncs the directory
                (active, header.salt, next_seq, SEGMENT_HEADER_LEN)
            }
        };
        if dir_changed {
            sync_dir(&dir)?;
        }
        for c in &report.corruptions {
            log::error!(
                "WAL {}: corruption at offset {} ({} bytes): {}",
                c.segment.display(),
                c.offset,
                c.bytes,
                c.kind
            );
        }
        log::info!("WAL {}: {report}", dir.display());

        let inner = Arc::new(Inner {
            dir,
            truncate: Mutex::new(()),
            writer: Mutex::new(Writer {
                active: Arc::new(active),
                active_first,
                salt,
                max_record_size: opts.max_record_size,
                len,
                next_seq,
                sealed,
                buf: Vec::new(),
            }),
            // Everything recovered from disk is treated as durable: it was
            // read back from the files, and the torn tail was fsynced away.
            sync: Mutex::new(SyncState { durable_next: next_seq, leader: false }),
            synced: Condvar::new(),
            poison: OnceLock::new(),
            watermark: Arc::new(AtomicU64::new(watermark)),
            opts,
            _lock: lock,
        });
        let syncer = match opts.durability {
            Durability::Interval(every) => Some(Syncer::start(inner.clone(), every)?),
            _ => None,
        };
        Ok((Wal { inner, syncer }, report))
    }

    /// Appends one record and returns its sequence number. Under
    /// [`Durability::Always`] the record is on stable storage when this
    /// returns; under every policy it has reached the kernel, so it survives
    /// a crash of this process.
    pub fn append(&self, payload: &[u8]) -> Result<u64> {
        self.append_batch(&[payload]).map(|r| r.start)
    }

    /// Appends records with consecutive sequence numbers in one write and
    /// returns the range assigned (empty for an empty batch). Either all of
    /// them are written or, on error, none is acknowledged.
    pub fn append_batch<P: AsRef<[u8]>>(&self, payloads: &[P]) -> Result<Range<u64>> {
        let range = self.inner.write(payloads)?;
        if self.inner.opts.durability == Durability::Always && !range.is_empty() {
            self.inner.sync_through(range.end)?;
        }
        Ok(range)
    }

    /// Makes every record appended so far durable.
    pub fn sync(&self) -> Result<()> {
        let next = self.inner.writer.lock().next_seq;
        self.inner.sync_through(next)
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.inner.writer.lock().next_seq
    }

    /// The highest sequence number known to be on stable storage (0 when
    /// none). A publisher running with `Interval` or `Never` can publish up
    /// to here without ever exposing a record a power loss could take back.
    pub fn durable_through(&self) -> u64 {
        self.inner.sync.lock().durable_next.saturating_sub(1)
    }

    /// Every record up to and including this sequence is acknowledged.
    pub fn watermark(&self) -> u64 {
        self.inner.watermark.load(Ordering::Acquire)
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Records that `seq` and everything before it were acknowledged by the
    /// consumer. The watermark is persisted (write, fsync, rename, directory
    /// fsync) before any file is deleted; sealed segments wholly at or below
    /// it are then deleted. Acknowledged records still in the active segment
    /// stay on disk until it is sealed, and replay skips them.
    ///
    /// A watermark at or below the current one is a no-op; one above the
    /// last assigned sequence is refused.
    pub fn truncate_through(&self, seq: u64) -> Result<()> {
        let inner = &*self.inner;
        let _serial = inner.truncate.lock();
        if seq <= inner.watermark.load(Ordering::Acquire) {
            return Ok(());
        }
        let last = inner.writer.lock().next_seq.saturating_sub(1);
        if seq > last {
            return Err(Error::WatermarkAhead { requested: seq, last });
        }
        write_watermark(&inner.dir, seq)?;
        let doomed: Vec<PathBuf> = {
            let mut w = inner.writer.lock();
            inner.watermark.store(seq, Ordering::Release);
            let mut doomed = Vec::new();
            while let Some((_, _)) = w.sealed.front() {
                let next_first = w.sealed.get(1).map_or(w.active_first, |s| s.0);
                if next_first.saturating_sub(1) > seq {
                    break;
                }
                if let Some((_, p)) = w.sealed.pop_front() {
                    doomed.push(p);
                }
            }
            doomed
        };
        for p in &doomed {
            // A segment that cannot be removed now is acknowledged anyway;
            // the next open removes it.
            if let Err(e) = fs::remove_file(p) {
                log::warn!("WAL: cannot remove acknowledged segment {}: {e}", p.display());
            }
        }
        if !doomed.is_empty() {
            sync_dir(&inner.dir)?;
        }
        Ok(())
    }

    /// Iterates, in order, over the records with a sequence number at or
    /// above `from` that are not acknowledged. The iterator sees the records
    /// appended before this call; damage met on the way comes as an `Err`
    /// item, after which iteration goes on with the next valid record.
    pub fn replay_from(&self, from: u64) -> Result<Replay> {
        let w = self.inner.writer.lock();
        let start = from.max(self.watermark().saturating_add(1));
        let mut segs: Vec<SegmentRef> = Vec::with_capacity(w.sealed.len() + 1);
        for (i, (first, path)) in w.sealed.iter().enumerate() {
            let end = w.sealed.get(i + 1).map_or(w.active_first, |s| s.0);
            segs.push(SegmentRef { first: *first, end_seq: Some(end), path: path.clone(), limit: None });
        }
        segs.push(SegmentRef {
            first: w.active_first,
            end_seq: Some(w.next_seq),
            path: w.active.path.clone(),
            limit: Some(w.len),
        });
        drop(w);
        Ok(Replay::new(segs, start, Some(self.inner.watermark.clone())))
    }

    /// Makes everything durable, stops the syncer thread and releases the
    /// lock, reporting an fsync failure.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(mut s) = self.syncer.take() {
            s.stop();
        }
        self.inner.check_poison()?;
        let next = self.inner.writer.lock().next_seq;
        self.inner.sync_through(next)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("WAL {}: final fsync failed: {e}", self.inner.dir.display());
        }
    }
}

impl Inner {
    fn check_poison(&self) -> Result<()> {
        match self.poison.get() {
            Some(reason) => Err(Error::Poisoned { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    fn poison(&self, reason: String) {
        log::error!("WAL {}: {reason}; refusing further writes", self.dir.display());
        let _ = self.poison.set(reason);
    }

    /// Encodes and writes a batch; returns the sequence range assigned.
    fn write<P: AsRef<[u8]>>(&self, payloads: &[P]) -> Result<Range<u64>> {
        let mut guard = self.writer.lock();
        // Checked under the lock, so no write slips in after a failure.
        self.check_poison()?;
        let w = &mut *guard;
        let max = w.max_record_size;
        let mut bytes = 0u64;
        for p in payloads {
            let len = p.as_ref().len();
            if len > max as usize {
                return Err(Error::RecordTooLarge { len, max });
            }
            bytes += format::RECORD_HEADER_LEN + len as u64;
        }
        let first = w.next_seq;
        if payloads.is_empty() {
            return Ok(first..first);
        }
        let Some(end) = first.checked_add(payloads.len() as u64).filter(|&e| e < u64::MAX) else {
            return Err(Error::Poisoned { reason: "sequence numbers exhausted".into() });
        };
        if w.len > SEGMENT_HEADER_LEN && w.len + bytes > self.opts.segment_size {
            self.rotate(w)?;
        }
        w.buf.clear();
        w.buf.reserve(bytes as usize);
        for (i, p) in payloads.iter().enumerate() {
            format::encode_record(&mut w.buf, w.salt, first + i as u64, p.as_ref());
        }
        if let Err(e) = (&w.active.file).write_all(&w.buf) {
            // Cut a partial write back so the file stays well framed; if even
            // that fails, the next open will treat it as a torn tail.
            if let Err(e2) = w.active.file.set_len(w.len) {
                self.poison(format!(
                    "write to {} failed ({e}) and could not be undone ({e2})",
                    w.active.path.display()
                ));
            }
            return Err(io_err("write", &w.active.path)(e));
        }
        w.len += bytes;
        w.next_seq = end;
        // Keep the scratch buffer from pinning the memory of a huge batch.
        if w.buf.capacity() > 4 << 20 {
            w.buf = Vec::new();
        }
        Ok(first..w.next_seq)
    }

    /// Seals the active segment (fsync) and starts a new one.
    fn rotate(&self, w: &mut Writer) -> Result<()> {
        if let Err(e) = w.active.file.sync_data() {
            self.poison(format!("fsync of {} failed while sealing it: {e}", w.active.path.display()));
            return Err(io_err("fsync", &w.active.path)(e));
        }
        {
            let mut s = self.sync.lock();
            s.durable_next = s.durable_next.max(w.next_seq);
        }
        self.synced.notify_all();
        let (active, header) = create_segment(&self.dir, w.next_seq, w.max_record_size).inspect_err(|e| {
            // A half-made segment may be on disk: appending on would put
            // records where the next open does not expect them.
            self.poison(format!("cannot start a new segment: {e}"));
        })?;
        let old = std::mem::replace(&mut w.active, Arc::new(active));
        w.sealed.push_back((w.active_first, old.path.clone()));
        w.active_first = header.first_seq;
        w.salt = header.salt;
        w.len = SEGMENT_HEADER_LEN;
        Ok(())
    }

    /// Returns once every record below `target` is durable. One caller at a
    /// time runs the fsync (the leader); callers arriving meanwhile wait and
    /// are covered by the next fsync, which takes in everything written up
    /// to its start (group commit).
    fn sync_through(&self, target: u64) -> Result<()> {
        let mut s = self.sync.lock();
        loop {
            if s.durable_next >= target {
                return Ok(());
            }
            self.check_poison()?;
            if s.leader {
                self.synced.wait(&mut s);
                continue;
            }
            s.leader = true;
            drop(s);
            let (active, upto) = {
                let w = self.writer.lock();
                (w.active.clone(), w.next_seq)
            };
            let res = active.file.sync_data();
            s = self.sync.lock();
            s.leader = false;
            match res {
                Ok(()) => s.durable_next = s.durable_next.max(upto),
                Err(e) => self.poison(format!("fsync of {} failed: {e}", active.path.display())),
            }
            self.synced.notify_all();
        }
    }
}

impl Syncer {
    fn start(inner: Arc<Inner>, every: Duration) -> Result<Syncer> {
        let (stop, stopped) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || syncer_loop(&inner, every, &stopped))
            .map_err(io_err("spawn wal-sync thread", PathBuf::new()))?;
        Ok(Syncer { stop: Some(stop), thread: Some(thread) })
    }

    fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("wal-sync thread panicked");
        }
    }
}

fn syncer_loop(inner: &Inner, every: Duration, stopped: &Receiver<()>) {
    loop {
        match stopped.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            // The final sync on close is done by the closer.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        if inner.poison.get().is_some() {
            return;
        }
        let next = inner.writer.lock().next_seq;
        if let Err(e) = inner.sync_through(next) {
            log::error!("WAL {}: interval fsync failed: {e}", inner.dir.display());
            return;
        }
    }
}

/// A segment as replay sees it.
struct SegmentRef {
    first: u64,
    /// The sequence after its last record, when known (a live log).
    end_seq: Option<u64>,
    path: PathBuf,
    /// Bytes to read (the active segment's length when replay started).
    limit: Option<u64>,
}

/// An iterator over records in sequence order, from [`Wal::replay_from`] or
/// [`read_dir`]. Damage comes as `Err` items; iteration then continues.
pub struct Replay {
    segs: VecDeque<SegmentRef>,
    current: Option<(SegmentScanner, PathBuf)>,
    start: u64,
    /// The next sequence expected across segment boundaries.
    expected: Option<u64>,
    /// The live log's watermark: a segment deleted by a concurrent
    /// `truncate_through` is skipped only if the watermark covers it.
    /// `None` for read-only reading, where a vanished segment is skipped.
    live: Option<Arc<AtomicU64>>,
    /// Read-only mode: the torn end of the last segment, met at the end.
    torn_tail: Option<crate::TornTail>,
}

impl Replay {
    fn new(segs: Vec<SegmentRef>, start: u64, live: Option<Arc<AtomicU64>>) -> Replay {
        let mut segs: VecDeque<SegmentRef> = segs.into();
        // Skip segments that end before `start`.
        while segs.len() > 1 && segs[1].first <= start {
            segs.pop_front();
        }
        Replay { segs, current: None, start, expected: None, live, torn_tail: None }
    }

    /// For [`read_dir`]: the torn end of the last segment, once iteration
    /// has reached it. The writer cuts such a tail on its next open; it is
    /// not corruption, so it ends iteration instead of coming as an `Err`.
    pub fn torn_tail(&self) -> Option<&crate::TornTail> {
        self.torn_tail.as_ref()
    }

    /// The segment the last item came from.
    pub fn segment(&self) -> Option<&Path> {
        self.current.as_ref().map(|(_, p)| p.as_path())
    }

    fn corrupt(path: &Path, offset: u64, bytes: u64, kind: CorruptionKind) -> Error {
        Error::Corrupt { segment: path.to_path_buf(), offset, bytes, kind }
    }

    /// Opens the next segment; `Ok(false)` at the end.
    fn advance(&mut self) -> Result<bool> {
        loop {
            let Some(seg) = self.segs.pop_front() else { return Ok(false) };
            let end = seg.end_seq.or_else(|| self.segs.front().map(|s| s.first));
            let opened = match SegmentScanner::open(&seg.path, seg.limit) {
                Ok(o) => o,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Deleted by a truncation since the snapshot: fine if
                    // acknowledged (always so when reading read-only).
                    let acked = match (&self.live, end) {
                        (Some(wm), Some(end)) => wm.load(Ordering::Acquire) >= end.saturating_sub(1),
                        (Some(_), None) => false,
                        (None, _) => true,
                    };
                    if acked {
                        self.expected = None;
                        continue;
                    }
                    return Err(io_err("open", &seg.path)(e));
                }
                Err(e) => return Err(io_err("open", &seg.path)(e)),
            };
            match opened {
                Ok(scanner) => {
                    let first = scanner.header().first_seq;
                    if let Some(exp) = self.expected.take()
                        && first > exp
                        && first > self.start
                    {
                        self.current = Some((scanner, seg.path.clone()));
                        return Err(Self::corrupt(
                            &seg.path,
                            0,
                            0,
                            CorruptionKind::Gap { first_missing: exp, found: first },
                        ));
                    }
                    self.current = Some((scanner, seg.path));
                    return Ok(true);
                }
                Err(h) => {
                    let len = fs::metadata(&seg.path).map(|m| m.len()).unwrap_or(0);
                    return Err(Self::corrupt(&seg.path, 0, len, CorruptionKind::Header(h)));
                }
            }
        }
    }
}

impl Iterator for Replay {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            let Some((scanner, path)) = self.current.as_mut() else {
                match self.advance() {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                }
            };
            let item = match scanner.next_item(true) {
                Ok(item) => item,
                Err(e) => {
                    let err = io_err("read", path.clone())(e);
                    self.current = None;
                    return Some(Err(err));
                }
            };
            match item {
                None => {
                    self.expected = Some(scanner.expected_seq());
                    self.current = None;
                }
                Some(Item::Record { offset, seq, .. }) => {
                    if seq >= self.start {
                        return Some(Ok(Record { seq, offset, payload: scanner.payload().to_vec() }));
                    }
                }
                Some(Item::Gap { offset, first_missing, found }) => {
                    if found > self.start {
                        let kind = CorruptionKind::Gap { first_missing, found };
                        return Some(Err(Self::corrupt(path, offset, 0, kind)));
                    }
                }
                Some(Item::BadTail { offset, bytes, .. }) if self.live.is_none() && self.segs.is_empty() => {
                    self.torn_tail = Some(crate::TornTail { segment: path.clone(), offset, bytes });
                }
                Some(Item::Corrupt { offset, bytes, kind }) | Some(Item::BadTail { offset, bytes, kind }) => {
                    return Some(Err(Self::corrupt(path, offset, bytes, kind)));
                }
            }
        }
    }
}

/// Reads the records of a WAL directory from sequence `from` without taking
/// its lock or changing anything, acknowledged records included (as
/// `daemoneye-wal dump` does). A torn tail ends the iteration and is then
/// available from [`Replay::torn_tail`]; a segment deleted meanwhile by the
/// writer's truncation is skipped.
pub fn read_dir(dir: &Path, from: u64) -> Result<Replay> {
    report::require_wal(dir)?;
    let (segs, _) = report::list_dir(dir)?;
    let segs = segs
        .into_iter()
        .map(|(first, path)| SegmentRef { first, end_seq: None, path, limit: None })
        .collect();
    Ok(Replay::new(segs, from, None))
}

fn take_lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut f = private::open_lock(&path)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut s = String::new();
            let holder_pid = f.read_to_string(&mut s).ok().and_then(|_| s.trim().parse().ok());
            return Err(Error::Locked { dir: dir.to_path_buf(), holder_pid });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
    }
    // Record who holds the lock, for the error the next opener sees.
    f.set_len(0).map_err(io_err("write", &path))?;
    (&f).write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io_err("write", &path))?;
    Ok(f)
}

/// A random salt: std's randomly keyed hasher, fed the time and the pid.
fn random_salt() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// Creates a segment atomically: the header is written to a temporary file,
/// fsynced, renamed into place and the directory fsynced, so a segment file
/// under its final name always has a whole header.
fn create_segment(dir: &Path, first_seq: u64, max_record_size: u32) -> Result<(Active, SegmentHeader)> {
    let header = SegmentHeader { salt: random_salt(), first_seq, max_record_size };
    let path = dir.join(format::segment_file_name(first_seq));
    let tmp = path.with_extension("seg.tmp");
    if path.exists() {
        // Never replace a segment: it may hold unacknowledged records.
        return Err(io_err("create", &path)(io::Error::from(io::ErrorKind::AlreadyExists)));
    }
    private::remove_leftover(&tmp)?;
    let file = private::create_new(&tmp, true)?;
    (&file).write_all(&header.encode()).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir)?;
    Ok((Active { file, path }, header))
}

fn write_watermark(dir: &Path, seq: u64) -> Result<()> {
    let path = dir.join(WATERMARK_FILE);
    let tmp = dir.join("WATERMARK.tmp");
    private::remove_leftover(&tmp)?;
    let mut f = private::create_new(&tmp, false)?;
    f.write_all(&format::encode_watermark(seq)).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir)
}

/// Fsyncs a directory so that created, renamed and deleted entries persist.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", dir))
}
