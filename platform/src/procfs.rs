//! The Linux backend: a direct walk over `/proc`.
//!
//! Each cycle lists `/proc` and, for a pid seen last cycle, reads
//! `/proc/<pid>/stat` and stats the `/proc/<pid>` directory (its owner is
//! the process's effective uid and gid, a cheap credential-change signal):
//! four system calls. `status`, `cmdline`, `exe` and `cwd` are read only
//! for an identity not seen before, or when the name (an exec) or the owner
//! (a credential change) moved. `/proc` lists thread group leaders only, so
//! threads are never processes. A process that exits mid-walk is skipped,
//! not an error.
//!
//! A new pid is read through its opened `/proc/<pid>` directory: `stat`
//! and every detail with `openat`/`readlinkat`/`fstatat` relative to it,
//! its owner with `fstat`. The directory descriptor pins the process, not
//! the pid number: once that process is reaped, lookups through it fail
//! (`ENOENT`, `ESRCH`) even if the pid is reused meanwhile, so every field
//! belongs to the identity whose `stat` was read, with no second `stat`
//! read to guard against pid reuse (the kernel accepts such a descriptor
//! as a pidfd for that reason, see `pidfd_send_signal(2)`). When the last
//! detail read (`cwd`) fails other than by a refusal, a last `stat` read
//! through the directory tells a process reaped meanwhile (skipped, as
//! before) from one that lives on. A first snapshot of many processes
//! (nothing known yet) is split across two threads.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::record::{
    Argv, Credentials, DetailsInterner, Field, ProcessDetails, ProcessRecord, ProcessState, Unavailable,
};
use crate::{CycleStats, Error, ProcessSource};

/// `PF_KTHREAD` in the `flags` field of `/proc/<pid>/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;
/// `PF_EXITING` there: set as the process begins to exit, before its
/// memory (command line included) is released, while it still shows
/// running (`R`) until it is a zombie.
const PF_EXITING: u64 = 0x0000_0004;
/// Default cap on command-line bytes read per process.
pub const DEFAULT_MAX_ARGV_BYTES: usize = 32 * 1024;
/// Bytes read of `stat` (a line of about 300).
const STAT_CAP: usize = 1024;
/// Bytes read of `status` (about 1.5 KiB).
const STATUS_CAP: usize = 16 * 1024;
/// A first snapshot of at least this many processes is split across two
/// threads (below it, starting a thread costs more than it saves).
const PARALLEL_MIN: usize = 256;
/// Pids a snapshot thread takes at a time.
const CHUNK: usize = 64;

/// What the backend remembers of a pid between cycles.
struct Known {
    /// The identity it was read as (with the pid, the key).
    start_time: u64,
    /// The raw name bytes (a name cut mid-character must still compare
    /// equal to itself).
    comm: Comm,
    /// `(startcode, startstack)` when the details were read.
    image: (u64, u64),
    owner: (u32, u32),
    details: Arc<ProcessDetails>,
    generation: u64,
}

/// A process's raw name as `stat` shows it, kept without an allocation: a
/// program's name is at most 15 bytes (`TASK_COMM_LEN` 16 with its NUL),
/// held whole. A longer name is a kernel thread's (never compared: their
/// names follow their work queue): its first 16 bytes and its length.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Comm {
    len: u16,
    bytes: [u8; 16],
}

impl Comm {
    fn new(raw: &[u8]) -> Comm {
        let mut bytes = [0; 16];
        let n = raw.len().min(16);
        bytes[..n].copy_from_slice(&raw[..n]);
        Comm { len: raw.len().min(u16::MAX as usize) as u16, bytes }
    }

    /// Whether `raw` is this name (up to 16 bytes: exactly).
    fn is(&self, raw: &[u8]) -> bool {
        *self == Comm::new(raw)
    }
}

/// The fields of `/proc/<pid>/stat` this backend uses.
#[derive(Debug, PartialEq, Eq)]
struct Stat<'a> {
    comm: &'a [u8],
    state: char,
    ppid: u32,
    session: u32,
    flags: u64,
    utime: u64,
    stime: u64,
    threads: u32,
    start_time: u64,
    vsize: u64,
    rss_pages: u64,
    /// Start of the code segment and of the stack: both move on every
    /// exec under ASLR, so they reveal an exec that keeps the name. Zero
    /// when the kernel hides them (another user's process, unprivileged).
    startcode: u64,
    startstack: u64,
}

/// Parses a `stat` line. The name sits in parentheses and may itself hold
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(buf: &[u8]) -> Option<Stat<'_>> {
    let open = buf.iter().position(|&b| b == b'(')?;
    let close = buf.iter().rposition(|&b| b == b')')?;
    let comm = buf.get(open + 1..close)?;
    // Fields from 3 (state) on; index i here is field i + 3 of proc(5).
    let mut fields: [&[u8]; 26] = [&[]; 26];
    for (slot, f) in fields.iter_mut().zip(buf.get(close + 2..)?.split(|&b| b == b' ')) {
        *slot = f;
    }
    // Only the fields used are parsed: some others are signed (tpgid is -1
    // without a terminal, nice may be negative).
    let num = |i: usize| -> Option<u64> { std::str::from_utf8(fields.get(i)?).ok()?.trim_end().parse().ok() };
    Some(Stat {
        comm,
        state: *fields.first()?.first()? as char,
        ppid: num(1)? as u32,
        session: num(3)? as u32,
        flags: num(6)?,
        utime: num(11)?,
        stime: num(12)?,
        threads: num(17)? as u32,
        start_time: num(19)?,
        vsize: num(20)?,
        rss_pages: num(21)?,
        // Absent on very old kernels: treat as hidden.
        startcode: num(23).unwrap_or(0),
        startstack: num(25).unwrap_or(0),
    })
}

/// Parses the `Uid:` and `Gid:` lines of `/proc/<pid>/status` (bytes: the
/// `Name:` line above them may hold anything).
fn parse_status_credentials(status: &[u8]) -> Option<Credentials> {
    let ids = |key: &[u8]| -> Option<(u32, u32)> {
        let line = status.split(|&b| b == b'\n').find(|l| l.starts_with(key))?;
        let rest = std::str::from_utf8(&line[key.len()..]).ok()?;
        let mut it = rest.split_whitespace().map(|v| v.parse::<u32>());
        Some((it.next()?.ok()?, it.next()?.ok()?))
    };
    let (uid, euid) = ids(b"Uid:")?;
    let (gid, egid) = ids(b"Gid:")?;
    Some(Credentials { uid, euid, gid, egid })
}

/// Splits a NUL-separated command line, capping it at `max` bytes.
fn parse_cmdline(raw: &[u8], max: usize) -> Argv {
    let truncated = raw.len() > max;
    let raw = &raw[..raw.len().min(max)];
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    let args = if raw.is_empty() {
        Vec::new()
    } else {
        raw.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
    };
    Argv { args, truncated }
}

/// One `read` of at most `cap` bytes into `buf` (grown and zeroed once,
/// then reused as is): a proc file generates its whole text, up to what
/// the buffer holds, on the first read, so the usual second read that
/// returns 0 is skipped. Returns the bytes read.
fn read_fd(fd: &OwnedFd, cap: usize, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    if buf.len() < cap {
        buf.resize(cap, 0);
    }
    loop {
        match nix::unistd::read(fd, &mut buf[..cap]) {
            Err(Errno::EINTR) => continue,
            other => return Ok(other?),
        }
    }
}

/// Reads a small proc file opened relative to a directory descriptor (see
/// [`read_fd`]).
fn read_at(dir: &OwnedFd, name: &str, cap: usize, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let fd = nix::fcntl::openat(dir, name, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    read_fd(&fd, cap, buf)
}

/// Reads a symbolic link relative to a directory descriptor.
fn readlink_at(dir: &OwnedFd, name: &str) -> std::io::Result<OsString> {
    Ok(nix::fcntl::readlinkat(dir, name)?)
}

/// Whether the last detail read (`cwd`, or `status` when `cwd` is not
/// collected) found the process alive: it answered, or refused (another
/// user's process, unprivileged), where a reaped process answers `ENOENT`
/// or `ESRCH`.
fn found_alive<T>(last: &Field<T>) -> bool {
    matches!(last, Ok(_) | Err(Unavailable::NotPermitted))
}

/// What the readers share: fixed for the source's life.
struct Config {
    root: PathBuf,
    /// `root` as text, for the paths built per process.
    root_text: String,
    clk_tck: u64,
    page_size: u64,
    boot_time: Option<u64>,
    max_argv_bytes: usize,
    /// Whether `cwd` is read (it is left out, `NotCollected`, otherwise).
    read_cwd: bool,
}

/// A reader's own state, one per thread: reused buffers (a steady cycle
/// allocates only the output records), the user-name cache and the
/// cycle's counts.
#[derive(Default)]
struct Scratch {
    /// The `stat` line being used.
    stat: Vec<u8>,
    /// Every other file.
    buf: Vec<u8>,
    path: String,
    users: HashMap<u32, String>,
    /// One copy of each distinct set of details this thread read.
    details: DetailsInterner,
    stats: CycleStats,
}

impl Scratch {
    /// Counts a process whose `stat` (or directory) could not be read.
    fn count_unreadable(&mut self, e: &std::io::Error) {
        match Unavailable::from_io(e) {
            Unavailable::Vanished => self.stats.vanished += 1,
            _ => self.stats.unreadable += 1,
        }
    }

    fn user_name(&mut self, uid: u32) -> Field<String> {
        if let Some(name) = self.users.get(&uid) {
            return Ok(name.clone());
        }
        // Only names are cached: a uid without an entry (a container's) or
        // a passing lookup failure is asked again next time.
        match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            Ok(Some(u)) => {
                self.users.insert(uid, u.name.clone());
                Ok(u.name)
            }
            Ok(None) => Err(Unavailable::NotApplicable),
            Err(_) => Err(Unavailable::Failed),
        }
    }

    fn read_credentials(&mut self, dir: &OwnedFd) -> Field<Credentials> {
        match read_at(dir, "status", STATUS_CAP, &mut self.buf) {
            Ok(n) => parse_status_credentials(&self.buf[..n]).ok_or(Unavailable::Failed),
            Err(e) => Err(Unavailable::from_io(&e)),
        }
    }

    /// The start time in the process's `stat`, read through `dir`: `None`
    /// once the process is reaped.
    fn start_time_at(&mut self, dir: &OwnedFd) -> Option<u64> {
        let n = read_at(dir, "stat", STAT_CAP, &mut self.buf).ok()?;
        parse_stat(&self.buf[..n]).map(|s| s.start_time)
    }

    /// Why a live process's command line read empty: it is exiting (or
    /// gone) by now, or it really has none.
    fn empty_because(&mut self, dir: &OwnedFd, zombie: bool) -> Unavailable {
        if zombie {
            return Unavailable::NotApplicable;
        }
        match read_at(dir, "stat", STAT_CAP, &mut self.buf) {
            Ok(n) => match parse_stat(&self.buf[..n]) {
                Some(st) if st.state != 'Z' && st.state != 'X' && st.flags & PF_EXITING == 0 => {
                    Unavailable::NotApplicable
                }
                _ => Unavailable::Vanished,
            },
            Err(_) => Unavailable::Vanished,
        }
    }
}

/// What a read through a directory leaves the backend to remember.
enum Remember {
    /// The known entry still holds: it was seen this cycle.
    Same,
    /// A new identity, or new details for the known one.
    New(Known),
}

impl Config {
    fn set_path(&self, s: &mut Scratch, pid: u32, file: &str) {
        s.path.clear();
        let _ = write!(s.path, "{}/{pid}/{file}", self.root_text);
    }

    /// Opens `/proc/<pid>` as a directory: files read through it belong to
    /// that process, or fail with `ENOENT`/`ESRCH` once it is gone, even if
    /// the pid is reused meanwhile.
    fn open_dir(&self, s: &mut Scratch, pid: u32) -> std::io::Result<OwnedFd> {
        self.set_path(s, pid, "");
        Ok(nix::fcntl::open(
            s.path.as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?)
    }

    /// Reads `/proc/<pid>/<file>` by path into `s.stat`.
    fn read_path(&self, s: &mut Scratch, pid: u32, file: &str) -> std::io::Result<usize> {
        self.set_path(s, pid, file);
        let fd = nix::fcntl::open(s.path.as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
        read_fd(&fd, STAT_CAP, &mut s.stat)
    }

    /// A steady cycle's read of a known pid: its `stat` by path and the
    /// owner of its directory. `Ok(record)` when it is still the identity
    /// known, with the same program and owner; `Err(true)` when it is gone
    /// or unreadable (counted); `Err(false)` when it changed (the caller
    /// reads it through its directory).
    fn read_known(
        &self,
        s: &mut Scratch,
        pid: u32,
        k: &mut Known,
        generation: u64,
    ) -> Result<ProcessRecord, bool> {
        let n = self.read_path(s, pid, "stat").map_err(|e| {
            s.count_unreadable(&e);
            true
        })?;
        let stat = std::mem::take(&mut s.stat);
        let out = self.known_from_stat(s, pid, &stat[..n], k, generation);
        s.stat = stat;
        out
    }

    fn known_from_stat(
        &self,
        s: &mut Scratch,
        pid: u32,
        buf: &[u8],
        k: &mut Known,
        generation: u64,
    ) -> Result<ProcessRecord, bool> {
        let Some(st) = parse_stat(buf) else {
            log::warn!("unparsable {}/{pid}/stat", self.root.display());
            s.stats.unreadable += 1;
            return Err(true);
        };
        self.set_path(s, pid, "");
        let owner = match nix::sys::stat::stat(s.path.as_str()) {
            Ok(m) => (m.st_uid, m.st_gid),
            Err(_) => {
                s.stats.vanished += 1;
                return Err(true);
            }
        };
        let kthread = st.flags & PF_KTHREAD != 0;
        // An exec shows as a new name or a new memory image. Kernel threads
        // never exec, but their names follow their current work queue.
        let same_program = kthread || (k.comm.is(st.comm) && k.image == (st.startcode, st.startstack));
        if k.start_time != st.start_time || !same_program || k.owner != owner {
            return Err(false);
        }
        k.generation = generation;
        Ok(self.record(pid, &st, k.details.clone()))
    }

    /// Reads a process through its opened directory: `stat`, the owner,
    /// and the details unless `known` (what the backend remembers of this
    /// pid) still holds. `None` when it is gone or unreadable (counted).
    fn read_via_dir(
        &self,
        s: &mut Scratch,
        pid: u32,
        dir: &OwnedFd,
        known: Option<&Known>,
        generation: u64,
    ) -> Option<(ProcessRecord, Remember)> {
        let n = match read_at(dir, "stat", STAT_CAP, &mut s.stat) {
            Ok(n) => n,
            Err(e) => {
                s.count_unreadable(&e);
                return None;
            }
        };
        // The details reads below use `s.buf`, never `s.stat`.
        let stat = std::mem::take(&mut s.stat);
        let out = self.after_stat(s, pid, dir, &stat[..n], known, generation);
        s.stat = stat;
        out
    }

    fn after_stat(
        &self,
        s: &mut Scratch,
        pid: u32,
        dir: &OwnedFd,
        buf: &[u8],
        known: Option<&Known>,
        generation: u64,
    ) -> Option<(ProcessRecord, Remember)> {
        let Some(st) = parse_stat(buf) else {
            log::warn!("unparsable {}/{pid}/stat", self.root.display());
            s.stats.unreadable += 1;
            return None;
        };
        let owner = match nix::sys::stat::fstat(dir.as_fd()) {
            Ok(m) => (m.st_uid, m.st_gid),
            Err(_) => {
                s.stats.vanished += 1;
                return None;
            }
        };
        let kthread = st.flags & PF_KTHREAD != 0;
        let zombie = st.state == 'Z';
        let image = (st.startcode, st.startstack);
        let same_program = |k: &Known| kthread || (k.comm.is(st.comm) && k.image == image);
        let known = known.filter(|k| k.start_time == st.start_time);
        if let Some(k) = known.filter(|k| same_program(k) && k.owner == owner) {
            return Some((self.record(pid, &st, k.details.clone()), Remember::Same));
        }
        let exec = known.is_none_or(|k| !same_program(k));
        let (details, alive) = match known {
            // Same program, new owner: only the credentials moved.
            Some(prev) if !exec => {
                let credentials = s.read_credentials(dir);
                let user = match credentials {
                    Ok(c) => s.user_name(c.uid),
                    Err(e) => Err(e),
                };
                let alive = found_alive(&credentials);
                (ProcessDetails { credentials, user, ..(*prev.details).clone() }, alive)
            }
            _ => {
                s.stats.detail_reads += 1;
                let details = self.read_details(s, dir, kthread, zombie);
                let alive =
                    if self.read_cwd { found_alive(&details.cwd) } else { found_alive(&details.credentials) };
                (details, alive)
            }
        };
        // Every read went through `dir`, so nothing of another process
        // came back; but when the last one failed, this one may have been
        // reaped meanwhile: then it is skipped, as a process gone.
        if !alive && s.start_time_at(dir) != Some(st.start_time) {
            s.stats.vanished += 1;
            return None;
        }
        // Identical details (the same program, arguments, directory and
        // user) are kept once, shared by every process that has them.
        let details = s.details.intern(details);
        let comm = Comm::new(st.comm);
        let record = self.record(pid, &st, details.clone());
        let k = Known { start_time: st.start_time, comm, image, owner, details, generation };
        Some((record, Remember::New(k)))
    }

    /// Reads everything that changes only on exec or a credential change,
    /// through the process's directory.
    fn read_details(&self, s: &mut Scratch, dir: &OwnedFd, kthread: bool, zombie: bool) -> ProcessDetails {
        // The command line and the executable go first: a process that
        // exits loses them at once (its memory is released before it is
        // reaped), and a short-lived one may be mid-exit already.
        let argv = if kthread {
            Err(Unavailable::NotApplicable)
        } else {
            let cap = self.max_argv_bytes;
            match read_at(dir, "cmdline", cap.saturating_add(1), &mut s.buf) {
                Ok(0) => Err(s.empty_because(dir, zombie)),
                Ok(n) => Ok(parse_cmdline(&s.buf[..n], cap)),
                Err(e) => Err(Unavailable::from_io(&e)),
            }
        };
        let none_for_kernel = |e: std::io::Error| {
            if kthread || zombie { Unavailable::NotApplicable } else { Unavailable::from_io(&e) }
        };
        let link = readlink_at(dir, "exe").map(PathBuf::from).map_err(none_for_kernel);
        // The file itself, through the link: its link count says whether it
        // was deleted or replaced (a name ending in " (deleted)" proves
        // nothing: a file may be called that).
        let meta = match &link {
            Ok(_) => stat_at(dir, "exe").map_err(|e| Unavailable::from_io(&e)),
            Err(why) => Err(*why),
        };
        let exe_deleted = match (&meta, &link) {
            (Ok(m), _) => Ok(m.nlink == 0),
            (Err(_), Ok(p)) => Ok(p.as_os_str().as_encoded_bytes().ends_with(b" (deleted)")),
            (Err(why), Err(_)) => Err(*why),
        };
        let exe = link.map(|p| match exe_deleted {
            Ok(true) => {
                use std::os::unix::ffi::OsStrExt;
                let raw = p.as_os_str().as_bytes();
                PathBuf::from(std::ffi::OsStr::from_bytes(raw.strip_suffix(b" (deleted)").unwrap_or(raw)))
            }
            _ => p,
        });
        let exe_file = meta.map(|m| m.identity);
        let credentials = s.read_credentials(dir);
        let user = match credentials {
            Ok(c) => s.user_name(c.uid),
            Err(e) => Err(e),
        };
        let cwd = if self.read_cwd {
            readlink_at(dir, "cwd").map(PathBuf::from).map_err(none_for_kernel)
        } else {
            Err(Unavailable::NotCollected)
        };
        ProcessDetails { exe, exe_file, exe_deleted, argv, cwd, credentials, user }
    }

    /// A record from a parsed `stat` and the details.
    fn record(&self, pid: u32, st: &Stat<'_>, details: Arc<ProcessDetails>) -> ProcessRecord {
        let ticks_ms = |t: u64| t.saturating_mul(1000) / self.clk_tck;
        ProcessRecord {
            pid,
            ppid: st.ppid,
            start_time: st.start_time,
            started_unix: self
                .boot_time
                .map(|b| b.saturating_add(st.start_time / self.clk_tck))
                .ok_or(Unavailable::Failed),
            name: String::from_utf8_lossy(st.comm).into_owned(),
            state: ProcessState::from_letter(st.state),
            session: Ok(st.session),
            threads: Ok(st.threads),
            rss_bytes: st.rss_pages.saturating_mul(self.page_size),
            virtual_bytes: st.vsize,
            cpu_time_ms: Ok(ticks_ms(st.utime.saturating_add(st.stime))),
            kernel_thread: st.flags & PF_KTHREAD != 0,
            details,
        }
    }

    /// Reads new pids (nothing known of them) in chunks of [`CHUNK`], the
    /// next chunk taken from `next`: one snapshot thread's share.
    fn read_new_chunks(
        &self,
        s: &mut Scratch,
        pids: &[u32],
        next: &AtomicUsize,
        generation: u64,
    ) -> Vec<(usize, Vec<(ProcessRecord, Known)>)> {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = pids.get(i * CHUNK..pids.len().min((i + 1) * CHUNK)).filter(|c| !c.is_empty())
            else {
                return done;
            };
            let mut out = Vec::with_capacity(chunk.len());
            for &pid in chunk {
                let dir = match self.open_dir(s, pid) {
                    Ok(dir) => dir,
                    Err(e) => {
                        s.count_unreadable(&e);
                        continue;
                    }
                };
                if let Some((rec, Remember::New(k))) = self.read_via_dir(s, pid, &dir, None, generation) {
                    out.push((rec, k));
                }
            }
            done.push((i, out));
        }
    }
}

/// The Linux `/proc` process source.
pub struct ProcFs {
    cfg: Config,
    /// Boxed: the table holds a pid and a pointer per bucket (up to twice
    /// the pids it holds), not a whole entry.
    known: HashMap<u32, Box<Known>>,
    generation: u64,
    scratch: Scratch,
    /// The pids listed this cycle (reused).
    pids: Vec<u32>,
    /// Whether a first snapshot may use a second thread.
    parallel: bool,
}

impl ProcFs {
    /// A source over `/proc`.
    pub fn new() -> Result<ProcFs, Error> {
        ProcFs::with_root("/proc")
    }

    /// A source over another procfs mount (for tests and containers).
    pub fn with_root(root: impl Into<PathBuf>) -> Result<ProcFs, Error> {
        let root = root.into();
        if !root.join("self").exists() {
            return Err(Error::NotSupported { what: format!("{} is not a mounted procfs", root.display()) });
        }
        let sysconf = |v| nix::unistd::sysconf(v).ok().flatten().filter(|&n| n > 0).map(|n| n as u64);
        let boot_time = fs::read_to_string(root.join("stat"))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok()));
        let parallel = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
        Ok(ProcFs {
            cfg: Config {
                root_text: root.display().to_string(),
                root,
                clk_tck: sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100),
                page_size: sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096),
                boot_time,
                max_argv_bytes: DEFAULT_MAX_ARGV_BYTES,
                read_cwd: true,
            },
            known: HashMap::new(),
            generation: 0,
            scratch: Scratch::default(),
            pids: Vec::new(),
            parallel,
        })
    }

    /// Caps the command-line bytes read per process (longer ones are marked
    /// truncated).
    pub fn set_max_argv_bytes(&mut self, max: usize) {
        self.cfg.max_argv_bytes = max;
    }

    /// Whether to read each process's working directory (on by default;
    /// `NotCollected` when off).
    pub fn set_read_cwd(&mut self, on: bool) {
        self.cfg.read_cwd = on;
    }

    /// Whether a first snapshot of many processes may be split across two
    /// threads (on by default where the machine has two cores or more).
    pub fn set_parallel_snapshot(&mut self, on: bool) {
        self.parallel = on && std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    }

    /// Reads one listed process; `None` when it vanished or cannot be seen.
    fn read_one(&mut self, pid: u32) -> Option<ProcessRecord> {
        let (cfg, s, generation) = (&self.cfg, &mut self.scratch, self.generation);
        if let Some(k) = self.known.get_mut(&pid) {
            match cfg.read_known(s, pid, k, generation) {
                Ok(rec) => return Some(rec),
                Err(true) => return None,
                Err(false) => {}
            }
        }
        let dir = match cfg.open_dir(s, pid) {
            Ok(dir) => dir,
            Err(e) => {
                s.count_unreadable(&e);
                return None;
            }
        };
        let (rec, remember) =
            cfg.read_via_dir(s, pid, &dir, self.known.get(&pid).map(|k| &**k), generation)?;
        match remember {
            Remember::Same => {
                if let Some(k) = self.known.get_mut(&pid) {
                    k.generation = generation;
                }
            }
            Remember::New(k) => {
                self.known.insert(pid, Box::new(k));
            }
        }
        Some(rec)
    }

    /// A first snapshot split across this thread and one more: each takes
    /// chunks of pids in turn; the records keep the listing's order.
    fn first_snapshot_parallel(&mut self, pids: &[u32]) -> Vec<ProcessRecord> {
        let (cfg, generation, next) = (&self.cfg, self.generation, AtomicUsize::new(0));
        let mut other = Scratch { users: self.scratch.users.clone(), ..Scratch::default() };
        let mut chunks = std::thread::scope(|scope| {
            let helper = std::thread::Builder::new()
                .name("procfs-snapshot".into())
                .spawn_scoped(scope, || cfg.read_new_chunks(&mut other, pids, &next, generation));
            let mut mine = cfg.read_new_chunks(&mut self.scratch, pids, &next, generation);
            match helper {
                Ok(h) => mine.extend(h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))),
                // No thread to be had: this one reads what is left.
                Err(_) => mine.extend(cfg.read_new_chunks(&mut self.scratch, pids, &next, generation)),
            }
            mine
        });
        let theirs = other.stats;
        let stats = &mut self.scratch.stats;
        stats.vanished += theirs.vanished;
        stats.unreadable += theirs.unreadable;
        stats.detail_reads += theirs.detail_reads;
        self.scratch.users.extend(other.users);
        chunks.sort_unstable_by_key(|(i, _)| *i);
        let mut out = Vec::with_capacity(pids.len());
        // The other thread's copies give way to this one's: each distinct
        // set of details is kept once (its own copies go with `other`).
        let interner = &mut self.scratch.details;
        for (_, chunk) in chunks {
            for (mut rec, mut k) in chunk {
                k.details = interner.intern_arc(k.details);
                rec.details = k.details.clone();
                self.known.insert(rec.pid, Box::new(k));
                out.push(rec);
            }
        }
        out
    }

    /// Reads process `pid` now, details included, through one opened
    /// `/proc/<pid>` directory, without the cache of [`ProcessSource::refresh`]:
    /// for the kernel event path, right after an exec. `Vanished` when the
    /// process is gone or the pid was reused between the reads.
    pub(crate) fn read_fresh(&mut self, pid: u32) -> Result<ProcessRecord, Unavailable> {
        let (cfg, s) = (&self.cfg, &mut self.scratch);
        let dir = cfg.open_dir(s, pid).map_err(|e| Unavailable::from_io(&e))?;
        let n = read_at(&dir, "stat", STAT_CAP, &mut s.stat).map_err(|e| Unavailable::from_io(&e))?;
        let buf = std::mem::take(&mut s.stat);
        let result = match parse_stat(&buf[..n]) {
            None => Err(Unavailable::Failed),
            // Every file is read through the directory the `stat` came
            // from: should the process exit and its pid be reused, they
            // answer ESRCH (a field `Vanished`), never the new process's.
            Some(st) => {
                let details = cfg.read_details(s, &dir, st.flags & PF_KTHREAD != 0, st.state == 'Z');
                Ok(cfg.record(pid, &st, Arc::new(details)))
            }
        };
        s.stat = buf;
        result
    }

    /// Reads only `stat` of `pid` (a zombie still has one); every detail
    /// is `Vanished`.
    pub(crate) fn read_brief(&mut self, pid: u32) -> Option<ProcessRecord> {
        let (cfg, s) = (&self.cfg, &mut self.scratch);
        let n = cfg.read_path(s, pid, "stat").ok()?;
        parse_stat(&s.stat[..n]).map(|st| cfg.record(pid, &st, Arc::new(ProcessDetails::vanished())))
    }

    /// The `start_time` (clock ticks since boot) of a process created at
    /// `CLOCK_MONOTONIC` instant `at_ns`. The kernel takes the start time
    /// from `CLOCK_BOOTTIME`, which runs ahead of the monotonic clock by the
    /// time spent suspended.
    pub(crate) fn start_time_at_monotonic(&self, at_ns: u64) -> u64 {
        let boot_ns = at_ns.saturating_add(crate::clock::boottime_minus_monotonic_ns());
        ((boot_ns as u128 * self.cfg.clk_tck as u128) / 1_000_000_000) as u64
    }
}

impl ProcessSource for ProcFs {
    fn backend(&self) -> &'static str {
        "linux-procfs"
    }

    /// Bytes this backend keeps between cycles, estimated for memory
    /// benchmarks: its table of known pids (hashbrown: buckets a power of
    /// two, one control byte each) and its set of distinct details (the
    /// details themselves are the records', shared).
    fn state_bytes(&self) -> Option<usize> {
        let buckets =
            if self.known.capacity() == 0 { 0 } else { (self.known.capacity() * 8 / 7).next_power_of_two() };
        let interned = self.scratch.details.len() * (size_of::<Arc<ProcessDetails>>() + 1) * 8 / 7;
        let entries = self.known.len() * (size_of::<Known>() + 8).div_ceil(16) * 16;
        Some(buckets * (size_of::<(u32, Box<Known>)>() + 1) + entries + interned)
    }

    fn refresh(&mut self) -> Result<Vec<ProcessRecord>, Error> {
        self.generation += 1;
        self.scratch.stats = CycleStats::default();
        let rd = fs::read_dir(&self.cfg.root).map_err(|source| Error::Io {
            op: "read directory",
            path: self.cfg.root.clone(),
            source,
        })?;
        let mut pids = std::mem::take(&mut self.pids);
        pids.clear();
        pids.extend(rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()));
        self.scratch.stats.listed = pids.len() as u32;
        // Room for every pid listed at once (a first snapshot does not
        // grow the table step by step).
        self.known.reserve(pids.len().saturating_sub(self.known.len()));
        let out = if self.parallel && self.known.is_empty() && pids.len() >= PARALLEL_MIN {
            self.first_snapshot_parallel(&pids)
        } else {
            let mut out = Vec::with_capacity(self.known.len() + 64);
            out.extend(pids.iter().filter_map(|&pid| self.read_one(pid)));
            out
        };
        self.pids = pids;
        let generation = self.generation;
        self.known.retain(|_, k| k.generation == generation);
        // Details of processes gone (held by none but the set) are let go;
        // those the caller still holds for this cycle, at the next one.
        self.scratch.details.prune();
        Ok(out)
    }

    fn last_cycle(&self) -> CycleStats {
        self.scratch.stats
    }

    fn start_time_now(&self) -> Option<u64> {
        let now = crate::clock::boottime_ns()?;
        Some(((now as u128 * self.cfg.clk_tck as u128) / 1_000_000_000) as u64)
    }

    fn set_read_cwd(&mut self, on: bool) {
        self.cfg.read_cwd = on;
    }
}

/// What `stat` says of a file: its identity and its link count.
struct StatAt {
    identity: crate::FileIdentity,
    nlink: u64,
}

/// `stat`s a path relative to a directory, following a symbolic link (for
/// `exe`, the executable itself, deleted or not): one system call where
/// opening it with `O_PATH` took three.
// The field types of `struct stat` differ between architectures (`nlink_t`
// is 32 bits on aarch64): the casts widen, and are no-ops on some.
#[allow(clippy::unnecessary_cast, clippy::cast_lossless)]
fn stat_at(dir: &OwnedFd, name: &str) -> std::io::Result<StatAt> {
    use nix::fcntl::AtFlags;
    let st = nix::sys::stat::fstatat(dir, name, AtFlags::empty())?;
    Ok(StatAt {
        identity: crate::FileIdentity {
            dev: st.st_dev as u64,
            inode: st.st_ino as u64,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: st.st_mtime as i64,
            ctime: st.st_ctime as i64,
        },
        nlink: st.st_nlink as u64,
    })
}

/// Reads the `hidepid` option of the procfs mounted at `/proc`, if any.
pub(crate) fn proc_hidepid(mounts: &Path) -> Option<String> {
    let text = fs::read_to_string(mounts).ok()?;
    // The last mount on /proc is the one in effect.
    let line = text.lines().rev().find(|l| l.split_whitespace().nth(1) == Some("/proc"))?;
    let opts = line.split_whitespace().nth(3)?;
    opts.split(',')
        .find_map(|o| o.strip_prefix("hidepid="))
        .filter(|v| *v != "0" && *v != "off")
        .map(str::to_owned)
}

#[cfg(test)]
mod tests;
