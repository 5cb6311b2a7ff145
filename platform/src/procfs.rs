//! The Linux backend: a direct walk over `/proc`.
//!
//! Each cycle reads `/proc/<pid>/stat` for every process and stats the
//! `/proc/<pid>` directory (its owner is the process's effective uid and
//! gid, a cheap credential-change signal). `status`, `cmdline`, `exe` and
//! `cwd` are read only for an identity not seen before, or when the name
//! (an exec) or the owner (a credential change) moved. `/proc` lists thread
//! group leaders only, so threads are never processes. A process that exits
//! mid-walk is skipped, not an error.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::stat::Mode;

use crate::cnproc::{read_at, readlink_at};
use crate::record::{
    Argv, Credentials, Field, ProcessDetails, ProcessKey, ProcessRecord, ProcessState, Unavailable,
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

/// What the backend remembers of an identity between cycles.
struct Known {
    /// The raw name bytes (a name cut mid-character must still compare
    /// equal to itself).
    comm: Box<[u8]>,
    /// `(startcode, startstack)` when the details were read.
    image: (u64, u64),
    owner: (u32, u32),
    details: Arc<ProcessDetails>,
    generation: u64,
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

/// Parses the `Uid:` and `Gid:` lines of `/proc/<pid>/status`.
fn parse_status_credentials(status: &str) -> Option<Credentials> {
    let ids = |key: &str| -> Option<(u32, u32)> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let mut it = line[key.len()..].split_whitespace().map(|v| v.parse::<u32>());
        Some((it.next()?.ok()?, it.next()?.ok()?))
    };
    let (uid, euid) = ids("Uid:")?;
    let (gid, egid) = ids("Gid:")?;
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

/// The Linux `/proc` process source.
pub struct ProcFs {
    root: PathBuf,
    clk_tck: u64,
    page_size: u64,
    boot_time: Option<u64>,
    max_argv_bytes: usize,
    /// Whether `cwd` is read (it is left out, `NotCollected`, otherwise).
    read_cwd: bool,
    known: HashMap<ProcessKey, Known>,
    generation: u64,
    users: HashMap<u32, String>,
    stats: CycleStats,
    /// Reused read buffer and path buffer: a steady cycle allocates only the
    /// output records.
    buf: Vec<u8>,
    path: String,
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
        Ok(ProcFs {
            root,
            clk_tck: sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100),
            page_size: sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096),
            boot_time,
            max_argv_bytes: DEFAULT_MAX_ARGV_BYTES,
            read_cwd: true,
            known: HashMap::new(),
            generation: 0,
            users: HashMap::new(),
            stats: CycleStats::default(),
            buf: Vec::with_capacity(1024),
            path: String::with_capacity(64),
        })
    }

    /// Caps the command-line bytes read per process (longer ones are marked
    /// truncated).
    pub fn set_max_argv_bytes(&mut self, max: usize) {
        self.max_argv_bytes = max;
    }

    /// Whether to read each process's working directory (on by default;
    /// `NotCollected` when off).
    pub fn set_read_cwd(&mut self, on: bool) {
        self.read_cwd = on;
    }

    fn set_path(&mut self, pid: u32, file: &str) {
        self.path.clear();
        let _ = write!(self.path, "{}/{pid}/{file}", self.root.display());
    }

    /// Reads a small proc file into `self.buf`, up to `cap` bytes.
    fn read_file(&mut self, pid: u32, file: &str, cap: usize) -> std::io::Result<()> {
        self.set_path(pid, file);
        self.buf.clear();
        File::open(&self.path)?.take(cap as u64).read_to_end(&mut self.buf)?;
        Ok(())
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

    /// Opens `/proc/<pid>` as a directory: files read through it belong to
    /// that process, or fail with `ESRCH` once it is gone, even if the pid
    /// is reused meanwhile.
    fn open_dir(&mut self, pid: u32) -> std::io::Result<OwnedFd> {
        use nix::fcntl::{OFlag, open};
        self.set_path(pid, "");
        Ok(open(self.path.as_str(), OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?)
    }

    fn read_credentials(&mut self, dir: &OwnedFd) -> Field<Credentials> {
        match read_at(dir, "status", 16 * 1024, &mut self.buf) {
            Ok(()) => {
                parse_status_credentials(&String::from_utf8_lossy(&self.buf)).ok_or(Unavailable::Failed)
            }
            Err(e) => Err(Unavailable::from_io(&e)),
        }
    }

    /// The start time in the process's `stat`, read through `dir`.
    fn start_time_at(&mut self, dir: &OwnedFd) -> Option<u64> {
        read_at(dir, "stat", 1024, &mut self.buf).ok()?;
        parse_stat(&self.buf).map(|s| s.start_time)
    }

    /// Why a live process's command line read empty: it is exiting (or
    /// gone) by now, or it really has none.
    fn empty_because(&mut self, dir: &OwnedFd, zombie: bool) -> Unavailable {
        if zombie {
            return Unavailable::NotApplicable;
        }
        match read_at(dir, "stat", 1024, &mut self.buf) {
            Ok(()) => match parse_stat(&self.buf) {
                Some(st) if st.state != 'Z' && st.state != 'X' && st.flags & PF_EXITING == 0 => {
                    Unavailable::NotApplicable
                }
                _ => Unavailable::Vanished,
            },
            Err(_) => Unavailable::Vanished,
        }
    }

    /// Reads everything that changes only on exec or a credential change,
    /// through the process's directory.
    fn read_details(&mut self, dir: &OwnedFd, kthread: bool, zombie: bool) -> ProcessDetails {
        // The command line and the executable go first: a process that
        // exits loses them at once (its memory is released before it is
        // reaped), and a short-lived one may be mid-exit already.
        let argv = if kthread {
            Err(Unavailable::NotApplicable)
        } else {
            let cap = self.max_argv_bytes;
            match read_at(dir, "cmdline", cap.saturating_add(1), &mut self.buf) {
                Ok(()) if self.buf.is_empty() => Err(self.empty_because(dir, zombie)),
                Ok(()) => Ok(parse_cmdline(&self.buf, cap)),
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
        let credentials = self.read_credentials(dir);
        let user = match credentials {
            Ok(c) => self.user_name(c.uid),
            Err(e) => Err(e),
        };
        let cwd = if self.read_cwd {
            readlink_at(dir, "cwd").map(PathBuf::from).map_err(none_for_kernel)
        } else {
            Err(Unavailable::NotCollected)
        };
        ProcessDetails { exe, exe_file, exe_deleted, argv, cwd, credentials, user }
    }

    /// Reads one process; `None` when it vanished or cannot be seen.
    fn read_one(&mut self, pid: u32) -> Option<ProcessRecord> {
        if let Err(e) = self.read_file(pid, "stat", 1024) {
            match Unavailable::from_io(&e) {
                Unavailable::Vanished => self.stats.vanished += 1,
                _ => self.stats.unreadable += 1,
            }
            return None;
        }
        let buf = std::mem::take(&mut self.buf);
        let rec = self.record_from_stat(pid, &buf);
        self.buf = buf;
        rec
    }

    fn record_from_stat(&mut self, pid: u32, buf: &[u8]) -> Option<ProcessRecord> {
        let Some(st) = parse_stat(buf) else {
            log::warn!("unparsable {}/{pid}/stat", self.root.display());
            self.stats.unreadable += 1;
            return None;
        };
        let key = ProcessKey { pid, start_time: st.start_time };
        self.set_path(pid, "");
        let owner = match fs::metadata(&self.path) {
            Ok(m) => (m.uid(), m.gid()),
            Err(_) => {
                self.stats.vanished += 1;
                return None;
            }
        };
        let kthread = st.flags & PF_KTHREAD != 0;
        let zombie = st.state == 'Z';
        let generation = self.generation;
        let image = (st.startcode, st.startstack);
        // An exec shows as a new name or a new memory image. Kernel threads
        // never exec, but their names follow their current work queue.
        let same_program = |k: &Known| kthread || (*k.comm == *st.comm && k.image == image);
        let details = match self.known.get_mut(&key) {
            Some(k) if same_program(k) && k.owner == owner => {
                k.generation = generation;
                k.details.clone()
            }
            known => {
                let exec = known.as_ref().is_none_or(|k| !same_program(k));
                let previous = known.map(|k| k.details.clone());
                let Ok(dir) = self.open_dir(pid) else {
                    self.stats.vanished += 1;
                    return None;
                };
                let details = match previous {
                    // Same program, new owner: only the credentials moved.
                    Some(prev) if !exec => {
                        let credentials = self.read_credentials(&dir);
                        let user = match credentials {
                            Ok(c) => self.user_name(c.uid),
                            Err(e) => Err(e),
                        };
                        ProcessDetails { credentials, user, ..(*prev).clone() }
                    }
                    _ => {
                        self.stats.detail_reads += 1;
                        self.read_details(&dir, kthread, zombie)
                    }
                };
                // The pid may have been reused before the directory was
                // opened: keep the details only if the identity is the one
                // whose `stat` was read.
                if self.start_time_at(&dir) != Some(st.start_time) {
                    self.stats.vanished += 1;
                    return None;
                }
                let details = Arc::new(details);
                let comm: Box<[u8]> = st.comm.into();
                self.known.insert(key, Known { comm, image, owner, details: details.clone(), generation });
                details
            }
        };
        Some(self.record(pid, &st, details))
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

    /// Reads process `pid` now, details included, through one opened
    /// `/proc/<pid>` directory, without the cache of [`ProcessSource::refresh`]:
    /// for the kernel event path, right after an exec. `Vanished` when the
    /// process is gone or the pid was reused between the reads.
    pub(crate) fn read_fresh(&mut self, pid: u32) -> Result<ProcessRecord, Unavailable> {
        let dir = self.open_dir(pid).map_err(|e| Unavailable::from_io(&e))?;
        read_at(&dir, "stat", 1024, &mut self.buf).map_err(|e| Unavailable::from_io(&e))?;
        let buf = std::mem::take(&mut self.buf);
        let result = match parse_stat(&buf) {
            None => Err(Unavailable::Failed),
            // Every file is read through the directory the `stat` came
            // from: should the process exit and its pid be reused, they
            // answer ESRCH (a field `Vanished`), never the new process's.
            Some(st) => {
                let details = self.read_details(&dir, st.flags & PF_KTHREAD != 0, st.state == 'Z');
                Ok(self.record(pid, &st, Arc::new(details)))
            }
        };
        self.buf = buf;
        result
    }

    /// Reads only `stat` of `pid` (a zombie still has one); every detail
    /// is `Vanished`.
    pub(crate) fn read_brief(&mut self, pid: u32) -> Option<ProcessRecord> {
        self.read_file(pid, "stat", 1024).ok()?;
        let buf = std::mem::take(&mut self.buf);
        let rec = parse_stat(&buf).map(|st| self.record(pid, &st, Arc::new(ProcessDetails::vanished())));
        self.buf = buf;
        rec
    }

    /// The `start_time` (clock ticks since boot) of a process created at
    /// `CLOCK_MONOTONIC` instant `at_ns`. The kernel takes the start time
    /// from `CLOCK_BOOTTIME`, which runs ahead of the monotonic clock by the
    /// time spent suspended.
    pub(crate) fn start_time_at_monotonic(&self, at_ns: u64) -> u64 {
        let boot_ns = at_ns.saturating_add(crate::clock::boottime_minus_monotonic_ns());
        ((boot_ns as u128 * self.clk_tck as u128) / 1_000_000_000) as u64
    }
}

impl ProcessSource for ProcFs {
    fn backend(&self) -> &'static str {
        "linux-procfs"
    }

    fn refresh(&mut self) -> Result<Vec<ProcessRecord>, Error> {
        self.generation += 1;
        self.stats = CycleStats::default();
        let rd = fs::read_dir(&self.root).map_err(|source| Error::Io {
            op: "read directory",
            path: self.root.clone(),
            source,
        })?;
        let mut out = Vec::with_capacity(self.known.len() + 64);
        for entry in rd {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            self.stats.listed += 1;
            if let Some(rec) = self.read_one(pid) {
                out.push(rec);
            }
        }
        let generation = self.generation;
        self.known.retain(|_, k| k.generation == generation);
        Ok(out)
    }

    fn last_cycle(&self) -> CycleStats {
        self.stats
    }

    fn start_time_now(&self) -> Option<u64> {
        let now = crate::clock::boottime_ns()?;
        Some(((now as u128 * self.clk_tck as u128) / 1_000_000_000) as u64)
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
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let line = b"4242 (a (b) c) S 1 4242 4242 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 2 0 123456 1000000 250 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        let s = parse_stat(line).expect("parse");
        assert_eq!(s.comm, b"a (b) c");
        assert_eq!((s.state, s.ppid, s.session, s.utime, s.stime), ('S', 1, 4242, 7, 3));
        assert_eq!((s.threads, s.start_time, s.vsize, s.rss_pages), (2, 123456, 1_000_000, 250));
        assert!(parse_stat(b"12 (x) S 1").is_none(), "a short line is refused, not a panic");
        assert!(parse_stat(b"").is_none());
        assert!(parse_stat(b")(").is_none());
    }

    #[test]
    fn status_credentials_and_cmdline() {
        let st = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t100\t101\t101\t101\n";
        assert_eq!(
            parse_status_credentials(st),
            Some(Credentials { uid: 1000, euid: 0, gid: 100, egid: 101 })
        );
        assert_eq!(parse_status_credentials("Uid:\tx\n"), None);
        let a = parse_cmdline(b"ls\0-l\0/tmp\0", 100);
        assert_eq!((a.args, a.truncated), (vec!["ls".into(), "-l".into(), "/tmp".into()], false));
        let a = parse_cmdline(b"ls\0-l\0/tmp\0", 5);
        assert_eq!((a.args, a.truncated), (vec!["ls".into(), "-l".into()], true));
    }

    #[test]
    fn an_empty_command_line_is_vanished_once_the_process_exits() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir(root.path().join("self")).expect("self");
        fs::create_dir(root.path().join("42")).expect("pid dir");
        let mut procfs = ProcFs::with_root(root.path()).expect("a procfs tree");
        // Exiting (PF_EXITING, 0x4) while still running: its memory, the
        // command line with it, is released before it is a zombie.
        for (state, flags, why) in [
            ('S', 0x40_0100, Unavailable::NotApplicable),
            ('R', 0x40_0104, Unavailable::Vanished),
            ('Z', 0x40_0104, Unavailable::Vanished),
        ] {
            let stat = format!(
                "42 (sleep) {state} 1 42 42 0 -1 {flags} 10 0 0 0 7 3 0 0 20 0 1 0 123456 1000000 250 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"
            );
            fs::write(root.path().join("42/stat"), stat).expect("stat");
            let dir = procfs.open_dir(42).expect("open");
            assert_eq!(procfs.empty_because(&dir, false), why, "state {state}, flags {flags:#x}");
        }
    }

    #[test]
    fn hidepid_from_mounts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = dir.path().join("mounts");
        fs::write(&m, "proc /proc proc rw,nosuid,relatime,hidepid=invisible 0 0\n").expect("write");
        assert_eq!(proc_hidepid(&m).as_deref(), Some("invisible"));
        fs::write(&m, "proc /proc proc rw,relatime 0 0\n").expect("write");
        assert_eq!(proc_hidepid(&m), None);
    }
}
