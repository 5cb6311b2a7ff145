//! Unit tests of `procfs`.

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
        parse_status_credentials(st.as_bytes()),
        Some(Credentials { uid: 1000, euid: 0, gid: 100, egid: 101 })
    );
    assert_eq!(parse_status_credentials(b"Uid:\tx\n"), None);
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
        let dir = procfs.cfg.open_dir(&mut procfs.scratch, 42).expect("open");
        assert_eq!(procfs.scratch.empty_because(&dir, false), why, "state {state}, flags {flags:#x}");
    }
}

/// A fake `<root>/<pid>` process directory: `stat` with this name and
/// start time, `cmdline`, `status`, `exe` (a link to `exe`), and `cwd`
/// when given.
fn fake_process(root: &Path, pid: u32, name: &str, start: u64, exe: &Path, cwd: Option<&Path>) {
    let dir = root.join(pid.to_string());
    fs::create_dir(&dir).expect("pid dir");
    let stat = format!(
        "{pid} ({name}) S 1 {pid} {pid} 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 1 0 {start} 1000000 250 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"
    );
    fs::write(dir.join("stat"), stat).expect("stat");
    fs::write(dir.join("cmdline"), format!("{name}\0--flag\0")).expect("cmdline");
    fs::write(
        dir.join("status"),
        format!("Name:\t{name}\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n"),
    )
    .expect("status");
    std::os::unix::fs::symlink(exe, dir.join("exe")).expect("exe");
    if let Some(cwd) = cwd {
        std::os::unix::fs::symlink(cwd, dir.join("cwd")).expect("cwd");
    }
}

fn fake_root() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().expect("tempdir");
    fs::create_dir(root.path().join("self")).expect("self");
    let exe = root.path().join("program");
    fs::write(&exe, b"\x7fELF").expect("program");
    (root, exe)
}

#[test]
fn every_field_comes_from_the_directory_opened() {
    let (root, exe) = fake_root();
    fake_process(root.path(), 42, "old", 1000, &exe, None);
    let mut procfs = ProcFs::with_root(root.path()).expect("a procfs tree");
    let dir = procfs.cfg.open_dir(&mut procfs.scratch, 42).expect("open");
    // The process goes and its pid is reused by another one, between
    // the opening of its directory and the reads.
    fs::rename(root.path().join("42"), root.path().join("gone")).expect("rename");
    fake_process(root.path(), 42, "new", 2000, &exe, Some(root.path()));
    let (rec, remember) =
        procfs.cfg.read_via_dir(&mut procfs.scratch, 42, &dir, None, 1).expect("the directory still answers");
    assert!(matches!(remember, Remember::New(ref k) if k.start_time == 1000));
    assert_eq!((rec.name.as_str(), rec.start_time), ("old", 1000));
    assert_eq!(rec.details.argv.as_ref().map(|a| a.args.clone()), Ok(vec!["old".into(), "--flag".into()]));
    assert_eq!(rec.details.exe.as_deref(), Ok(exe.as_path()));
    // A detail missing while `stat` still reads: the process lives on,
    // the field says why it is missing.
    assert_eq!(rec.details.cwd, Err(Unavailable::Vanished));
    assert_eq!(procfs.scratch.stats, CycleStats { detail_reads: 1, ..CycleStats::default() });
    // A walk now finds the new process, with its own details.
    let recs = procfs.refresh().expect("refresh");
    assert_eq!(recs.len(), 1);
    assert_eq!((recs[0].name.as_str(), recs[0].start_time), ("new", 2000));
    assert_eq!(recs[0].details.cwd.as_deref(), Ok(root.path()));
}

/// A child `sleep`, reaped (never left a zombie) on drop.
struct Sleeper(std::process::Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_process_reaped_after_its_directory_opened_is_gone() {
    let mut procfs = ProcFs::new().expect("/proc");
    let mut child = Sleeper(std::process::Command::new("sleep").arg("100").spawn().expect("sleep"));
    let pid = child.0.id();
    let dir = procfs.cfg.open_dir(&mut procfs.scratch, pid).expect("open");
    child.0.kill().expect("kill");
    child.0.wait().expect("reap");
    assert!(procfs.cfg.read_via_dir(&mut procfs.scratch, pid, &dir, None, 1).is_none());
    assert_eq!(procfs.scratch.stats, CycleStats { vanished: 1, ..CycleStats::default() });
}

#[test]
fn a_process_reaped_while_its_details_are_read_is_gone() {
    let mut procfs = ProcFs::new().expect("/proc");
    let mut child = Sleeper(std::process::Command::new("sleep").arg("100").spawn().expect("sleep"));
    let pid = child.0.id();
    let dir = procfs.cfg.open_dir(&mut procfs.scratch, pid).expect("open");
    let mut stat = Vec::new();
    let n = read_at(&dir, "stat", STAT_CAP, &mut stat).expect("stat");
    // Its `stat` was read; it is reaped before its details are.
    child.0.kill().expect("kill");
    child.0.wait().expect("reap");
    let read = procfs.cfg.after_stat(&mut procfs.scratch, pid, &dir, &stat[..n], None, 1);
    assert!(read.is_none(), "reported as gone, not as a record of missing fields");
    assert_eq!(procfs.scratch.stats, CycleStats { vanished: 1, detail_reads: 1, ..CycleStats::default() });
}

#[test]
fn a_first_snapshot_on_two_threads_equals_one_on_one() {
    let (root, exe) = fake_root();
    let n = PARALLEL_MIN as u32 + 3 * CHUNK as u32 + 5;
    for pid in 1..=n {
        fake_process(root.path(), pid, &format!("p{pid}"), u64::from(pid) * 10, &exe, Some(root.path()));
    }
    // One unreadable: no `stat`.
    fs::create_dir(root.path().join(format!("{}", n + 1))).expect("dir");
    let mut one = ProcFs::with_root(root.path()).expect("tree");
    one.set_parallel_snapshot(false);
    let mut two = ProcFs::with_root(root.path()).expect("tree");
    two.set_parallel_snapshot(true);
    let a = one.refresh().expect("one");
    let b = two.refresh().expect("two");
    assert_eq!(a.len(), n as usize);
    assert_eq!(a, b, "same records in the same order");
    assert_eq!(one.last_cycle(), two.last_cycle());
    assert_eq!(two.last_cycle().detail_reads, n);
    assert_eq!(two.last_cycle().vanished, 1);
    // What the threads read is remembered: the next cycle reads no details.
    assert_eq!(two.refresh().expect("warm"), b);
    assert_eq!(two.last_cycle().detail_reads, 0);
}

#[test]
fn only_an_answer_or_a_refusal_proves_a_process_alive() {
    assert!(found_alive(&Ok(1)));
    assert!(found_alive::<u8>(&Err(Unavailable::NotPermitted)));
    for why in
        [Unavailable::Vanished, Unavailable::Failed, Unavailable::NotApplicable, Unavailable::NotCollected]
    {
        assert!(!found_alive::<u8>(&Err(why)), "{why:?}");
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

#[test]
fn identical_details_are_kept_once_across_both_snapshot_threads() {
    let (root, exe) = fake_root();
    // Enough for two threads; every process a "worker" with the same
    // command line, directory and user, bar one.
    let n = PARALLEL_MIN as u32 + 2 * CHUNK as u32;
    for pid in 1..=n {
        let name = if pid == 7 { "other" } else { "worker" };
        fake_process(root.path(), pid, name, u64::from(pid) * 10, &exe, Some(root.path()));
    }
    let mut procfs = ProcFs::with_root(root.path()).expect("tree");
    procfs.set_parallel_snapshot(true);
    let recs = procfs.refresh().expect("snapshot");
    assert_eq!(recs.len(), n as usize);
    let worker = recs.iter().find(|r| r.name == "worker").expect("a worker");
    for r in &recs {
        let shared = Arc::ptr_eq(&r.details, &worker.details);
        assert_eq!(shared, r.name == "worker", "pid {}: shared {shared}", r.pid);
        // What the backend remembers is that same copy.
        assert!(Arc::ptr_eq(&procfs.known[&r.pid].details, &r.details));
    }
    assert_eq!(procfs.scratch.details.len(), 2, "two distinct sets of details");
    // A warm cycle hands out the same copies.
    let warm = procfs.refresh().expect("warm");
    assert!(warm.iter().all(|r| r.name != "worker" || Arc::ptr_eq(&r.details, &worker.details)));
    // The odd one goes: its details are let go once no record holds them.
    drop((recs, warm));
    fs::remove_dir_all(root.path().join("7")).expect("remove");
    let after = procfs.refresh().expect("after");
    assert_eq!(after.len(), n as usize - 1);
    assert_eq!(procfs.scratch.details.len(), 1);
}

#[test]
fn a_name_is_kept_inline_and_compared_exactly_up_to_16_bytes() {
    let short = Comm::new(b"sleep");
    assert!(short.is(b"sleep"));
    assert!(!short.is(b"sleeps") && !short.is(b"sleep\0") && !short.is(b"sleeq") && !short.is(b""));
    let full = Comm::new(b"fifteen-bytes!!");
    assert!(full.is(b"fifteen-bytes!!") && !full.is(b"fifteen-bytes!?"));
    // Cut mid-character: raw bytes, not text.
    let cut = Comm::new(&[b'a', 0xc3]);
    assert!(cut.is(&[b'a', 0xc3]) && !cut.is(b"a"));
    // A kernel thread's longer name: its first 16 bytes and its length.
    let long = Comm::new(b"kworker/u8:0-events_unbound");
    assert!(long.is(b"kworker/u8:0-events_unbound"));
    assert!(!long.is(b"kworker/u8:0-events_unboun"));
}
