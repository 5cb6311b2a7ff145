//! SHA-256 of process executables. The collector asks only for new or
//! exec'd processes; [`Hasher`] answers from an LRU cache keyed by the
//! file's identity (device, inode, size, mtime, ctime), so an unchanged
//! binary is read once however many processes run it, and a steady cycle
//! reads no file at all. Files over a size cap are never read
//! ([`HashOutcome::TooLarge`]), and reading stops when the cycle's time
//! budget runs out ([`HashOutcome::Deferred`]): a file cut mid-way keeps
//! its partial digest and resumes where it stopped in a later cycle.
//!
//! A file is hashed only if the file actually opened is the one the record
//! describes: the open file's identity (`fstat`) must equal the record's
//! before reading and again after, and exactly `size` bytes must be read.
//! Identity times are whole seconds (as the backends fill them): a rewrite
//! that keeps the inode, the size and both times to the second goes
//! unnoticed, a limit of the identity, not of this module.
//!
//! # Opening
//!
//! The opens run as root on paths other users control (an executable's
//! path can be swapped for a link to a device or a FIFO between the
//! record and the open), so nothing but a regular file is ever opened:
//!
//! - A process's executable: first `/proc/<pid>/exe` on Linux
//!   ([`daemoneye_platform::files::open_process_exe`]). That is a link the
//!   kernel makes, not a user's, and it must be followed (`O_NOFOLLOW`
//!   refuses it with `ELOOP`): it leads to the very file the process
//!   executed, which was a regular file then (`execve` takes nothing else)
//!   and still is (a file's type never changes), so following it cannot
//!   reach a device or a FIFO. When that is refused or gone, the recorded
//!   path is opened with [`daemoneye_platform::files::open_regular_file`]:
//!   a final symbolic link is not followed, and anything but a regular
//!   file is refused before it is opened (Linux: `O_PATH` + `fstat`, then
//!   the inode is reopened), never waited on. A refusal there means the
//!   path no longer holds the recorded file: `Unavailable(Vanished)`.
//! - A task's path ([`Hasher::hash_open`]): the task opens it with
//!   `open_regular_file` and hashes the descriptor it opened, whose
//!   identity comes from its own `fstat`; refusals are answered with their
//!   reason (a symbolic link, a FIFO, a device, a directory).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use daemoneye_platform::files::{self, NotRegularFile};
use daemoneye_platform::{Field, FileIdentity, Unavailable};
use sha2::{Digest, Sha256};

use crate::config::HashConfig;
use daemoneye_contract::event::HashOutcome;

/// Bytes read from the file per call (the only buffer, reused).
const CHUNK: usize = 64 * 1024;
/// Files cut mid-way by the budget whose partial digests are kept. At most
/// one new one appears per cycle, so the oldest is dropped only after this
/// many later cycles cut another file without resuming it.
const MAX_PARTIALS: usize = 4;

/// A SHA-256 digest.
type Sha256Bytes = [u8; 32];

/// Where the hasher reads the time (injectable for tests).
type Clock = Box<dyn Fn() -> Instant + Send>;

/// A digest in the cache, with its last use.
struct Slot {
    digest: Sha256Bytes,
    tick: u64,
}

/// Least-recently-used cache of digests by file identity: a map for the
/// lookups and an ordered map from last use to identity for the eviction,
/// O(log n) per operation.
struct Lru {
    map: HashMap<FileIdentity, Slot>,
    order: BTreeMap<u64, FileIdentity>,
    next_tick: u64,
    cap: usize,
}

impl Lru {
    fn new(cap: usize) -> Lru {
        Lru { map: HashMap::new(), order: BTreeMap::new(), next_tick: 0, cap }
    }

    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    /// The digest of `id`, now the most recently used.
    fn get(&mut self, id: &FileIdentity) -> Option<Sha256Bytes> {
        let tick = self.tick();
        let slot = self.map.get_mut(id)?;
        self.order.remove(&slot.tick);
        slot.tick = tick;
        self.order.insert(tick, *id);
        Some(slot.digest)
    }

    /// Stores a digest, evicting the least recently used beyond the cap.
    /// A cap of 0 stores nothing.
    fn insert(&mut self, id: FileIdentity, digest: Sha256Bytes) {
        if self.cap == 0 {
            return;
        }
        let tick = self.tick();
        if let Some(old) = self.map.insert(id, Slot { digest, tick }) {
            self.order.remove(&old.tick);
        }
        self.order.insert(tick, id);
        self.shrink();
    }

    fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
        self.shrink();
    }

    fn shrink(&mut self) {
        while self.map.len() > self.cap {
            let Some((_, id)) = self.order.pop_first() else { break };
            self.map.remove(&id);
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// A file whose hashing the budget cut: the digest state after `done`
/// bytes.
struct Partial {
    id: FileIdentity,
    sha: Sha256,
    done: u64,
}

/// Why a candidate file could not be used.
enum OpenError {
    /// Opening or `fstat` failed.
    Io(Unavailable),
    /// It opened, but it is not the file the record describes.
    Mismatch,
}

/// Hashes executables under a size cap and a per-cycle time budget, with an
/// LRU cache by file identity.
///
/// What is cached: only complete digests. [`HashOutcome::TooLarge`] is
/// decided from the record's size alone, without any I/O, so it is not
/// stored (a stored one would outlive a raised cap). `Deferred` is not a
/// result. Errors are not cached either: on Linux the executable is read
/// through `/proc/<pid>/exe`, which the kernel allows or refuses per
/// *process* (a ptrace-style check), not per file, and privileges may
/// change, so a refusal under one identity says nothing final about it.
/// Because the collector asks only for new or exec'd processes, an
/// unreadable binary costs one or two refused `open` calls per process
/// start, never a read and never a per-cycle cost: a table of 100 root
/// processes with unreadable binaries costs 200 failed opens once, at
/// startup. A refused `/proc/<pid>/exe` falls back to the recorded path
/// (checked by identity), so an unprivileged daemon still hashes the
/// world-readable binaries of other users' processes.
pub struct Hasher {
    max_file_bytes: u64,
    budget: Duration,
    cache: Lru,
    partials: Vec<Partial>,
    clock: Clock,
    cycle_start: Instant,
    files_read: u64,
    buf: Box<[u8]>,
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher")
            .field("max_file_bytes", &self.max_file_bytes)
            .field("budget", &self.budget)
            .field("cache_len", &self.cache.len())
            .field("cache_cap", &self.cache.cap)
            .field("partials", &self.partials.len())
            .field("files_read", &self.files_read)
            .finish_non_exhaustive()
    }
}

impl Hasher {
    /// A hasher with `cfg`'s limits and an empty cache. The first cycle's
    /// budget starts now.
    pub fn new(cfg: &HashConfig) -> Hasher {
        Hasher::with_clock(cfg, Box::new(Instant::now))
    }

    fn with_clock(cfg: &HashConfig, clock: Clock) -> Hasher {
        let cycle_start = clock();
        Hasher {
            max_file_bytes: cfg.max_file_bytes,
            budget: Duration::from_millis(cfg.cycle_budget_ms),
            cache: Lru::new(cfg.cache_entries),
            partials: Vec::new(),
            clock,
            cycle_start,
            files_read: 0,
            buf: vec![0; CHUNK].into_boxed_slice(),
        }
    }

    /// Applies new limits (hot reload). A smaller cache drops its least
    /// recently used digests; a cache of 0 entries caches nothing. Digests
    /// already known stay valid under a lower size cap (the cap bounds
    /// reading, and they need none); partial digests of files now over the
    /// cap are dropped.
    pub fn set_config(&mut self, cfg: &HashConfig) {
        self.max_file_bytes = cfg.max_file_bytes;
        self.budget = Duration::from_millis(cfg.cycle_budget_ms);
        self.cache.set_cap(cfg.cache_entries);
        let cap = self.max_file_bytes;
        self.partials.retain(|p| p.id.size <= cap);
    }

    /// Starts this cycle's time budget (`cycle_budget_ms` from now).
    pub fn start_cycle(&mut self) {
        self.cycle_start = (self.clock)();
    }

    /// Hash of the executable of process `pid` whose exe path and file
    /// identity the record carries.
    ///
    /// - A missing path or identity: `Unavailable` with the record's
    ///   reason; nothing is read.
    /// - A cached identity: the cached digest; nothing is read and no
    ///   budget is used.
    /// - `identity.size` over `max_file_bytes`: `TooLarge`; nothing is
    ///   read.
    /// - The cycle's budget spent: `Deferred`; nothing is read. Ask again
    ///   in a later cycle.
    /// - Otherwise the file is opened (see "Opening" in the module docs:
    ///   `/proc/<pid>/exe`; if that fails or holds another file, the
    ///   recorded path, never through a link and only if it is a regular
    ///   file) and must have the record's identity, or the answer is
    ///   `Unavailable(Vanished)`: the path now holds another file (or a
    ///   link, a FIFO, a device), or the pid was reused. It is read in 64 KiB
    ///   chunks; the budget is checked after each, and when it runs out the
    ///   partial digest is kept, the answer is `Deferred`, and the next
    ///   call for the same identity resumes where this one stopped (so a
    ///   cycle overruns its budget by at most one chunk, and a file larger
    ///   than one budget still completes over several cycles). A file that
    ///   changes while read is `Unavailable(Vanished)` too. I/O errors map
    ///   through [`Unavailable::from_io`]; none is cached.
    pub fn hash(&mut self, pid: u32, exe: &Field<PathBuf>, identity: &Field<FileIdentity>) -> HashOutcome {
        let path = match exe {
            Ok(p) => p,
            Err(why) => return HashOutcome::Unavailable(*why),
        };
        let id = match identity {
            Ok(id) => *id,
            Err(why) => return HashOutcome::Unavailable(*why),
        };
        self.hash_with(id, |id| open_file(pid, path, id))
    }

    /// Hash of a file the caller opened (a task naming a file rather than
    /// a process), with `identity` from that descriptor's `fstat`: open it
    /// with [`daemoneye_platform::files::open_regular_file`], so it is a
    /// regular file and no link was followed. The same rules as
    /// [`Hasher::hash`]: the cache by identity (a cached digest reads
    /// nothing), the size cap, the budget, and the identity checked again
    /// after reading.
    pub fn hash_open(&mut self, file: File, identity: &FileIdentity) -> HashOutcome {
        self.hash_with(*identity, |_| Ok(file))
    }

    /// The cache, the cap and the budget, then `open` and read.
    fn hash_with(
        &mut self,
        id: FileIdentity,
        open: impl FnOnce(&FileIdentity) -> Result<File, Unavailable>,
    ) -> HashOutcome {
        if let Some(digest) = self.cache.get(&id) {
            return HashOutcome::Sha256(hex(&digest));
        }
        if id.size > self.max_file_bytes {
            return HashOutcome::TooLarge { size: id.size, cap: self.max_file_bytes };
        }
        if self.budget_spent() {
            return HashOutcome::Deferred;
        }
        let result = open(&id).and_then(|file| self.read(file, id));
        match result {
            Ok(Some(digest)) => {
                self.cache.insert(id, digest);
                HashOutcome::Sha256(hex(&digest))
            }
            Ok(None) => HashOutcome::Deferred,
            Err(why) => HashOutcome::Unavailable(why),
        }
    }

    /// Files opened and read since creation (a file whose hashing spans
    /// several cycles counts once per cycle that read it).
    pub fn files_read(&self) -> u64 {
        self.files_read
    }

    /// Digests in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    fn budget_spent(&self) -> bool {
        (self.clock)().saturating_duration_since(self.cycle_start) >= self.budget
    }

    /// Hashes an open file (or more of it): `Some(digest)` when done,
    /// `None` when the budget cut it (the partial state is kept).
    fn read(&mut self, mut file: File, id: FileIdentity) -> Result<Option<Sha256Bytes>, Unavailable> {
        self.files_read += 1;
        let (mut sha, mut done) = match self.partials.iter().position(|p| p.id == id) {
            Some(i) => {
                let p = self.partials.remove(i);
                (p.sha, p.done)
            }
            None => (Sha256::new(), 0),
        };
        if done > 0 {
            file.seek(SeekFrom::Start(done)).map_err(|e| Unavailable::from_io(&e))?;
        }
        loop {
            let n = match file.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Unavailable::from_io(&e)),
            };
            if n == 0 {
                break;
            }
            done += n as u64;
            if done > id.size {
                // It grew while being read: not the recorded file.
                return Err(Unavailable::Vanished);
            }
            sha.update(&self.buf[..n]);
            if done < id.size && self.budget_spent() {
                if self.partials.len() >= MAX_PARTIALS {
                    self.partials.remove(0);
                }
                self.partials.push(Partial { id, sha, done });
                return Ok(None);
            }
        }
        // Exactly the recorded bytes, and still the recorded file after
        // reading them (a write in the meantime moves its times).
        if done != id.size || identity_of(&file).map_err(OpenError::into_unavailable)? != id {
            return Err(Unavailable::Vanished);
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&sha.finalize());
        Ok(Some(digest))
    }
}

impl OpenError {
    fn into_unavailable(self) -> Unavailable {
        match self {
            OpenError::Io(why) => why,
            OpenError::Mismatch => Unavailable::Vanished,
        }
    }
}

/// The identity of an open file (`fstat`).
fn identity_of(file: &File) -> Result<FileIdentity, OpenError> {
    let meta = file.metadata().map_err(|e| OpenError::Io(Unavailable::from_io(&e)))?;
    daemoneye_platform::file_identity(&meta).map_err(OpenError::Io)
}

/// Keeps an opened file only if it is the file `id` describes. A path
/// that named something other than a regular file (refused unopened) does
/// not hold the recorded file either.
fn checked(opened: std::io::Result<File>, id: &FileIdentity) -> Result<File, OpenError> {
    let file = opened.map_err(|e| {
        if NotRegularFile::of(&e).is_some() {
            OpenError::Mismatch
        } else {
            OpenError::Io(Unavailable::from_io(&e))
        }
    })?;
    if identity_of(&file)? == *id { Ok(file) } else { Err(OpenError::Mismatch) }
}

/// Opens the executable of `pid` with identity `id`: through the kernel's
/// link first (on Linux the very file the process runs), then, if that is
/// refused, gone, or another file, through the recorded path, never
/// following a link there (see the module docs). Any file with the
/// recorded identity is the same file, whoever runs it.
fn open_file(pid: u32, path: &Path, id: &FileIdentity) -> Result<File, Unavailable> {
    let first = match checked(files::open_process_exe(pid, path), id) {
        Ok(file) => return Ok(file),
        Err(e) => e,
    };
    if daemoneye_platform::exe_read_path(pid, path) == path {
        // Not Linux: that was the recorded path already.
        return Err(first.into_unavailable());
    }
    match (first, checked(files::open_regular_file(path), id)) {
        (_, Ok(file)) => Ok(file),
        (OpenError::Mismatch, _) | (_, Err(OpenError::Mismatch)) => Err(Unavailable::Vanished),
        (OpenError::Io(why), Err(OpenError::Io(_))) => Err(why),
    }
}

/// Lowercase hex of a digest.
fn hex(digest: &Sha256Bytes) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A pid no system has (Linux caps pids at 2^22): its `/proc` entry
    /// never exists, so temp files are read through their path.
    const NO_PID: u32 = u32::MAX;
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const ABCD: &str = "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589";

    fn cfg(max_file_bytes: u64, cycle_budget_ms: u64, cache_entries: usize) -> HashConfig {
        HashConfig { max_file_bytes, cycle_budget_ms, cache_entries }
    }

    fn big() -> HashConfig {
        cfg(u64::MAX, 60_000, 16)
    }

    /// A clock that moves only when told (in milliseconds), and by `step`
    /// on every reading.
    fn test_clock(step: u64) -> (Clock, Arc<AtomicU64>) {
        let base = Instant::now();
        let now = Arc::new(AtomicU64::new(0));
        let c = now.clone();
        let clock: Clock =
            Box::new(move || base + Duration::from_millis(c.fetch_add(step, Ordering::SeqCst) + step));
        (clock, now)
    }

    fn identity(path: &Path) -> Field<FileIdentity> {
        daemoneye_platform::file_identity(&std::fs::metadata(path).expect("metadata"))
    }

    fn write(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> (Field<PathBuf>, Field<FileIdentity>) {
        let path = dir.path().join(name);
        std::fs::write(&path, data).expect("write");
        let id = identity(&path);
        (Ok(path), id)
    }

    fn is_hex64(s: &str) -> bool {
        s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    #[test]
    fn known_digest_of_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, id) = write(&dir, "abc", b"abc");
        let mut h = Hasher::new(&big());
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Sha256(ABC.into()));
        let (exe, id) = write(&dir, "empty", b"");
        assert_eq!(
            h.hash(NO_PID, &exe, &id),
            HashOutcome::Sha256("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into())
        );
        assert_eq!(h.files_read(), 2);
    }

    #[test]
    fn missing_fields_read_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, id) = write(&dir, "abc", b"abc");
        let mut h = Hasher::new(&big());
        let no_exe = Err(Unavailable::NotApplicable);
        let no_id = Err(Unavailable::NotPermitted);
        assert_eq!(h.hash(1, &no_exe, &id), HashOutcome::Unavailable(Unavailable::NotApplicable));
        assert_eq!(h.hash(1, &exe, &no_id), HashOutcome::Unavailable(Unavailable::NotPermitted));
        assert_eq!((h.files_read(), h.cache_len()), (0, 0));
    }

    #[test]
    fn each_binary_is_read_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, id) = write(&dir, "abc", b"abc");
        let mut h = Hasher::new(&big());
        for pid in [NO_PID, NO_PID - 1, NO_PID] {
            h.start_cycle();
            assert_eq!(h.hash(pid, &exe, &id), HashOutcome::Sha256(ABC.into()));
        }
        assert_eq!((h.files_read(), h.cache_len()), (1, 1));
    }

    #[test]
    fn a_changed_file_is_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, id) = write(&dir, "prog", b"abc");
        let mut h = Hasher::new(&big());
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Sha256(ABC.into()));
        let (exe, id2) = write(&dir, "prog", b"abcd");
        assert_ne!(id, id2);
        assert_eq!(h.hash(NO_PID, &exe, &id2), HashOutcome::Sha256(ABCD.into()));
        assert_eq!(h.files_read(), 2);
        // The old identity's digest is still known (another process may
        // still run the old inode), and costs no read.
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Sha256(ABC.into()));
        assert_eq!((h.files_read(), h.cache_len()), (2, 2));
    }

    #[test]
    fn over_the_cap_is_too_large_without_a_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, id) = write(&dir, "abc", b"abc");
        let mut h = Hasher::new(&cfg(2, 60_000, 16));
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::TooLarge { size: 3, cap: 2 });
        assert_eq!((h.files_read(), h.cache_len()), (0, 0));
        // Raising the cap lets it through: TooLarge was not cached.
        h.set_config(&cfg(3, 60_000, 16));
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Sha256(ABC.into()));
        assert_eq!(h.files_read(), 1);
    }

    #[test]
    fn spent_budget_defers_without_a_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, id) = write(&dir, "abc", b"abc");
        let (clock, now) = test_clock(0);
        let mut h = Hasher::with_clock(&cfg(u64::MAX, 1, 16), clock);
        h.start_cycle();
        now.fetch_add(1, Ordering::SeqCst);
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Deferred);
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Deferred, "Deferred is not cached as a result");
        assert_eq!((h.files_read(), h.cache_len()), (0, 0));
        h.start_cycle();
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Sha256(ABC.into()));
        assert_eq!((h.files_read(), h.cache_len()), (1, 1));
        // A cached digest needs no budget.
        now.fetch_add(10, Ordering::SeqCst);
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Sha256(ABC.into()));
        assert_eq!(h.files_read(), 1);
    }

    #[test]
    fn a_file_cut_by_the_budget_resumes_next_cycle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..5 * CHUNK + 123).map(|i| (i * 7 % 251) as u8).collect();
        let (exe, id) = write(&dir, "big", &data);
        let mut expected = [0u8; 32];
        expected.copy_from_slice(&Sha256::digest(&data));
        // Every clock reading is 1 ms later; a 3 ms budget fits two chunks
        // per cycle.
        let (clock, _) = test_clock(1);
        let mut h = Hasher::with_clock(&cfg(u64::MAX, 3, 16), clock);
        let mut cycles = 0;
        let outcome = loop {
            cycles += 1;
            assert!(cycles < 10, "no progress");
            h.start_cycle();
            match h.hash(NO_PID, &exe, &id) {
                HashOutcome::Deferred => continue,
                other => break other,
            }
        };
        assert_eq!(outcome, HashOutcome::Sha256(hex(&expected)));
        assert_eq!(cycles, 3);
        assert_eq!(h.files_read(), 3);
        assert!(h.partials.is_empty());
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, ia) = write(&dir, "a", b"a");
        let (b, ib) = write(&dir, "b", b"b");
        let (c, ic) = write(&dir, "c", b"c");
        let mut h = Hasher::new(&cfg(u64::MAX, 60_000, 2));
        h.hash(NO_PID, &a, &ia);
        h.hash(NO_PID, &b, &ib);
        h.hash(NO_PID, &a, &ia); // a is now the most recent
        assert_eq!(h.files_read(), 2);
        h.hash(NO_PID, &c, &ic); // evicts b
        assert_eq!((h.files_read(), h.cache_len()), (3, 2));
        h.hash(NO_PID, &a, &ia);
        h.hash(NO_PID, &c, &ic);
        assert_eq!(h.files_read(), 3, "a and c still cached");
        h.hash(NO_PID, &b, &ib);
        assert_eq!(h.files_read(), 4, "b was evicted");
        // Shrinking keeps the most recent.
        h.set_config(&cfg(u64::MAX, 60_000, 1));
        assert_eq!(h.cache_len(), 1);
        h.hash(NO_PID, &b, &ib);
        assert_eq!(h.files_read(), 4, "b, the most recent, survived the shrink");
        h.set_config(&cfg(u64::MAX, 60_000, 0));
        h.hash(NO_PID, &b, &ib);
        h.hash(NO_PID, &b, &ib);
        assert_eq!((h.files_read(), h.cache_len()), (6, 0), "a cache of 0 caches nothing");
    }

    #[test]
    fn another_file_under_the_path_is_not_hashed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, id) = write(&dir, "prog", b"abc");
        std::fs::remove_file(dir.path().join("prog")).expect("remove");
        std::fs::write(dir.path().join("prog"), b"abcdef").expect("write");
        let mut h = Hasher::new(&big());
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Unavailable(Unavailable::Vanished));
        // A reused pid: this process runs something else entirely.
        assert_eq!(h.hash(std::process::id(), &exe, &id), HashOutcome::Unavailable(Unavailable::Vanished));
        assert_eq!((h.files_read(), h.cache_len()), (0, 0));
        // Gone altogether.
        std::fs::remove_file(dir.path().join("prog")).expect("remove");
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Unavailable(Unavailable::Vanished));
        assert_eq!(h.cache_len(), 0);
    }

    #[test]
    fn an_open_file_is_read_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, id) = write(&dir, "abc", b"abc");
        let (path, id) = (exe.expect("path"), id.expect("identity"));
        let mut h = Hasher::new(&big());
        for _ in 0..2 {
            let file = files::open_regular_file(&path).expect("open");
            assert_eq!(h.hash_open(file, &id), HashOutcome::Sha256(ABC.into()));
        }
        assert_eq!((h.files_read(), h.cache_len()), (1, 1));
    }

    /// The recorded path swapped for a link (even to the very file the
    /// record describes), a FIFO or a device: refused, never followed or
    /// waited on.
    #[cfg(unix)]
    #[test]
    fn a_link_fifo_or_device_in_an_executables_place_is_not_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, id) = write(&dir, "prog", b"abc");
        let path = exe.clone().expect("path");
        let kept = dir.path().join("kept");
        std::fs::rename(&path, &kept).expect("rename");
        std::os::unix::fs::symlink(&kept, &path).expect("symlink");
        let mut h = Hasher::new(&big());
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Unavailable(Unavailable::Vanished));
        std::fs::remove_file(&path).expect("rm");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        assert_eq!(h.hash(NO_PID, &exe, &id), HashOutcome::Unavailable(Unavailable::Vanished));
        let null = Ok(PathBuf::from("/dev/null"));
        let null_id = identity(Path::new("/dev/null"));
        assert_eq!(h.hash(NO_PID, &null, &null_id), HashOutcome::Unavailable(Unavailable::Vanished));
        assert_eq!((h.files_read(), h.cache_len()), (0, 0));
        // Through the link's target itself it is the recorded file.
        assert_eq!(h.hash(NO_PID, &Ok(kept), &id), HashOutcome::Sha256(ABC.into()));
    }

    #[test]
    fn the_running_test_binary() {
        let exe = std::env::current_exe().expect("current_exe");
        let id = identity(&exe);
        let mut h = Hasher::new(&big());
        let HashOutcome::Sha256(digest) = h.hash(std::process::id(), &Ok(exe.clone()), &id) else {
            panic!("not hashed")
        };
        assert!(is_hex64(&digest), "{digest}");
        assert_eq!(h.hash(std::process::id(), &Ok(exe), &id), HashOutcome::Sha256(digest));
        assert_eq!(h.files_read(), 1);
    }

    /// Where `/proc/<pid>/exe` exists, a process whose binary was deleted
    /// is still hashed, from the file it runs.
    #[test]
    fn a_deleted_running_binary_is_hashed() {
        let Some(sleep) = ["/bin/sleep", "/usr/bin/sleep"].into_iter().map(Path::new).find(|p| p.exists())
        else {
            return;
        };
        if !Path::new("/proc/self/exe").exists() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = dir.path().join("sleepy");
        // `cp` writes the copy in its own process: a write descriptor held
        // by this multi-threaded test process could leak into another
        // test's fork and make the exec fail with ETXTBSY.
        let copied = std::process::Command::new("cp").arg(sleep).arg(&copy).status().expect("run cp");
        assert!(copied.success(), "cp: {copied}");
        let data = std::fs::read(&copy).expect("read");
        let mut expected = [0u8; 32];
        expected.copy_from_slice(&Sha256::digest(&data));
        let mut child = std::process::Command::new(&copy).arg("30").spawn().expect("spawn");
        std::fs::remove_file(&copy).expect("remove");
        let pid = child.id();
        // The identity as the backend records it, through the link.
        let id = identity(&daemoneye_platform::exe_read_path(pid, &copy));
        let mut h = Hasher::new(&big());
        let outcome = h.hash(pid, &Ok(copy), &id);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(outcome, HashOutcome::Sha256(hex(&expected)));
    }
}
