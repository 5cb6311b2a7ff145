//! Process enumeration against real processes this test spawns (and kills
//! by their own pid), and against a fake procfs tree for the cases a live
//! system cannot stage on demand (pid reuse, a process vanishing between
//! listing and reading). Unix only: it spawns `sleep` and checks uids.
#![cfg(unix)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use daemoneye_platform::{ProcessKey, ProcessRecord, ProcessSource, SysinfoSource};

/// Kills and reaps the child on drop, by its own pid.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_sleep() -> Guard {
    Guard(Command::new("sleep").arg("300").stdin(Stdio::null()).spawn().expect("spawn sleep"))
}

fn which(prog: &str) -> PathBuf {
    let out = Command::new("sh").args(["-c", &format!("command -v {prog}")]).output().expect("sh");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::canonicalize(&p).expect("canonicalize")
}

fn find(src: &mut dyn ProcessSource, pid: u32) -> Option<ProcessRecord> {
    src.refresh().expect("refresh").into_iter().find(|r| r.pid == pid)
}

/// Refreshes until `pred` holds for `pid`'s record, or panics at the
/// deadline (the state change is asynchronous: an exec in another process).
fn wait_for(
    src: &mut dyn ProcessSource,
    pid: u32,
    what: &str,
    pred: impl Fn(&ProcessRecord) -> bool,
) -> ProcessRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = find(src, pid)
            && pred(&r)
        {
            return r;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what} of pid {pid}");
        std::thread::yield_now();
    }
}

fn sources() -> Vec<Box<dyn ProcessSource>> {
    let mut v: Vec<Box<dyn ProcessSource>> = vec![Box::new(SysinfoSource::new().expect("sysinfo"))];
    // The OS's own backend too, where it is not sysinfo (`/proc` on Linux).
    let native = daemoneye_platform::default_source().expect("default backend");
    if native.backend() != v[0].backend() {
        v.push(native);
    }
    v
}

#[test]
fn spawned_child_is_found_with_its_fields_and_gone_after_reaping() {
    let sleep_exe = which("sleep");
    for mut src in sources() {
        let backend = src.backend();
        let mut child = spawn_sleep();
        let pid = child.0.id();
        let r = wait_for(&mut *src, pid, "the child", |r| r.details.argv.is_ok());
        assert_eq!(r.ppid, std::process::id(), "{backend}");
        assert_eq!(r.name, "sleep", "{backend}");
        let creds = r.details.credentials.as_ref().expect("credentials");
        assert_eq!(creds.uid, nix::unistd::getuid().as_raw(), "{backend}");
        assert_eq!(creds.euid, nix::unistd::geteuid().as_raw(), "{backend}");
        assert_eq!(r.details.argv.as_ref().expect("argv").args, vec!["sleep", "300"], "{backend}");
        assert_eq!(r.details.exe.as_ref().expect("exe"), &sleep_exe, "{backend}");
        assert_eq!(r.details.exe_deleted, Ok(false), "{backend}");
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
        let started = r.started_unix.expect("started_unix");
        assert!(started <= now + 1 && started + 60 >= now, "{backend}: started {started}, now {now}");
        let file = r.details.exe_file.as_ref().expect("exe identity");
        let meta = std::fs::metadata(&sleep_exe).expect("stat sleep");
        assert_eq!(file.size, meta.len(), "{backend}");
        assert!(!r.kernel_thread);
        // The identity is stable across cycles.
        let again = find(&mut *src, pid).expect("still there");
        assert_eq!(again.key(), r.key(), "{backend}");

        child.0.kill().expect("kill");
        child.0.wait().expect("reap");
        let gone = src.refresh().expect("refresh");
        assert!(gone.iter().all(|p| p.key() != r.key()), "{backend}: reaped child still listed");
    }
}

#[test]
fn steady_cycles_reuse_details_and_read_nothing_new() {
    for mut src in sources() {
        let _child = spawn_sleep();
        src.refresh().expect("first");
        // Warm: a second and third cycle read details only for processes
        // born in between (this test's own helpers), never for all.
        let first_total = src.last_cycle().detail_reads;
        let second = src.refresh().expect("second");
        let third = src.refresh().expect("third");
        let reads = src.last_cycle().detail_reads;
        assert!(first_total as usize >= second.len() / 2, "{}: cold cycle read details", src.backend());
        // Other tests spawn processes meanwhile, so count only processes present
        // in both cycles: all but the odd one that exec'd in between keep the
        // very same details.
        let before: HashMap<ProcessKey, &ProcessRecord> = second.iter().map(|r| (r.key(), r)).collect();
        let common: Vec<_> = third.iter().filter_map(|r| before.get(&r.key()).map(|b| (b, r))).collect();
        let kept = common.iter().filter(|(b, r)| std::sync::Arc::ptr_eq(&b.details, &r.details)).count();
        assert!(
            kept * 20 >= common.len() * 19,
            "{}: only {kept} of {} kept their details ({reads} reads)",
            src.backend(),
            common.len()
        );
        // The child's details are the same allocation from cycle to cycle.
        let pid = _child.0.id();
        let a = second.iter().find(|r| r.pid == pid).expect("child in cycle 2");
        let b = third.iter().find(|r| r.pid == pid).expect("child in cycle 3");
        assert!(std::sync::Arc::ptr_eq(&a.details, &b.details), "{}: details re-read", src.backend());
    }
}

#[test]
fn exec_in_place_changes_name_and_exe_under_the_same_identity() {
    let sleep_exe = which("sleep");
    for mut src in sources() {
        let backend = src.backend();
        let mut child = Guard(
            Command::new("sh")
                .args(["-c", "read line; exec sleep 300"])
                .stdin(Stdio::piped())
                .spawn()
                .expect("spawn sh"),
        );
        let pid = child.0.id();
        let before = wait_for(&mut *src, pid, "sh", |r| r.name == "sh");
        assert_ne!(before.details.exe.as_ref().ok(), Some(&sleep_exe));
        child.0.stdin.as_mut().expect("stdin").write_all(b"go\n").expect("write");
        let after = wait_for(&mut *src, pid, "the exec", |r| r.name == "sleep");
        assert_eq!(after.key(), before.key(), "{backend}: exec must not change the identity");
        assert_eq!(after.details.exe.as_ref().expect("exe"), &sleep_exe, "{backend}");
        assert_eq!(after.details.argv.as_ref().expect("argv").args, vec!["sleep", "300"], "{backend}");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn exec_that_keeps_the_name_is_still_seen() {
    let aslr = std::fs::read_to_string("/proc/sys/kernel/randomize_va_space").unwrap_or_default();
    if aslr.trim() == "0" {
        println!("skipped: ASLR is off, so an exec of the same program leaves no trace in stat");
        return;
    }
    let mut src = daemoneye_platform::ProcFs::new().expect("procfs");
    let mut child = Guard(
        Command::new("sh")
            .args(["-c", "read line; exec sh -c 'read again' second-sh"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh"),
    );
    let pid = child.0.id();
    let before = wait_for(&mut src, pid, "sh", |r| r.name == "sh");
    child.0.stdin.as_mut().expect("stdin").write_all(b"go\n").expect("write");
    let after = wait_for(&mut src, pid, "the exec of sh by sh", |r| {
        r.details.argv.as_ref().is_ok_and(|a| a.args.iter().any(|x| x == "second-sh"))
    });
    assert_eq!((after.key(), after.name.as_str()), (before.key(), "sh"));
}

#[cfg(target_os = "linux")]
#[test]
fn a_deleted_executable_is_marked_and_its_path_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("sleepy");
    // `cp` writes the copy in its own process: a write descriptor held by
    // this multi-threaded test process could leak into another test's
    // fork and make the exec fail with ETXTBSY.
    let copied = Command::new("cp").arg(which("sleep")).arg(&copy).status().expect("run cp");
    assert!(copied.success(), "cp sleep: {copied}");
    let mut child = Guard(Command::new(&copy).arg("300").spawn().expect("spawn copy"));
    let pid = child.0.id();
    let mut src = daemoneye_platform::ProcFs::new().expect("procfs");
    let live = wait_for(&mut src, pid, "the copy", |r| r.details.exe.is_ok());
    assert_eq!(live.details.exe_deleted, Ok(false));
    std::fs::remove_file(&copy).expect("delete the binary");
    // A fresh source reads the details anew.
    let mut fresh = daemoneye_platform::ProcFs::new().expect("procfs");
    let r = find(&mut fresh, pid).expect("still running");
    assert_eq!(r.details.exe_deleted, Ok(true));
    assert_eq!(r.details.exe.as_ref().expect("exe"), &copy, "the path, without the kernel's marker");
    assert!(r.details.exe_file.is_ok(), "the deleted file is still identified through the link");
    let _ = child.0.kill();
}

#[test]
fn pid_reuse_makes_a_new_identity() {
    let a = ProcessKey { pid: 4242, start_time: 100 };
    let b = ProcessKey { pid: 4242, start_time: 200 };
    assert_ne!(a, b);
    let mut m = HashMap::new();
    m.insert(a, "first");
    m.insert(b, "second");
    assert_eq!(m.len(), 2);
}

#[test]
fn enumeration_survives_processes_vanishing_mid_walk() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Short-lived processes, born and reaped during the walks.
            while !stop.load(Ordering::Relaxed) {
                let mut kids: Vec<Child> =
                    (0..8).filter_map(|_| Command::new("true").stdin(Stdio::null()).spawn().ok()).collect();
                for k in &mut kids {
                    let _ = k.wait();
                }
            }
        });
        for mut src in sources() {
            for _ in 0..30 {
                let recs = src.refresh().unwrap_or_else(|e| panic!("{}: refresh failed: {e}", src.backend()));
                assert!(
                    recs.iter().any(|r| r.pid == std::process::id()),
                    "{}: lost ourselves",
                    src.backend()
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
}

#[test]
fn threads_are_never_processes() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let parked = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    for mut src in sources() {
        let recs = src.refresh().expect("refresh");
        let me = recs.iter().filter(|r| r.pid == std::process::id()).count();
        assert_eq!(me, 1, "{}", src.backend());
        // No record is one of our threads: their ids are listed under
        // /proc/self/task and are not the process id.
        #[cfg(target_os = "linux")]
        for t in std::fs::read_dir("/proc/self/task").expect("tasks") {
            let tid: u32 = t.expect("task").file_name().to_string_lossy().parse().expect("tid");
            if tid != std::process::id() {
                assert!(recs.iter().all(|r| r.pid != tid), "{}: thread {tid} listed", src.backend());
            }
        }
    }
    drop(tx);
    parked.join().expect("join");
}

#[cfg(target_os = "linux")]
#[test]
fn both_backends_agree_on_a_quiet_moment() {
    let _a = spawn_sleep();
    let _b = spawn_sleep();
    let mut procfs = daemoneye_platform::ProcFs::new().expect("procfs");
    let mut sys = SysinfoSource::new().expect("sysinfo");
    let p = procfs.refresh().expect("procfs");
    let s = sys.refresh().expect("sysinfo");
    let by_pid: HashMap<u32, &ProcessRecord> = s.iter().map(|r| (r.pid, r)).collect();
    let mut compared = 0;
    for r in &p {
        let Some(o) = by_pid.get(&r.pid) else { continue };
        // A process that exec'd or was reused between the two reads is
        // not the same one; compare only stable pairs.
        if r.name != o.name && !o.name.starts_with(&r.name) {
            continue;
        }
        compared += 1;
        assert_eq!(r.ppid, o.ppid, "ppid of {}", r.pid);
        let uid = |x: &ProcessRecord| x.details.credentials.as_ref().map(|c| c.uid).ok();
        assert_eq!(uid(r), uid(o), "uid of {}", r.pid);
        // One that exited since (a zombie has no exe link): not comparable.
        let ended = std::fs::read_link(format!("/proc/{}/exe", r.pid)).is_err();
        if !r.kernel_thread && !ended {
            assert_eq!(
                r.details.exe.as_ref().ok(),
                o.details.exe.as_ref().ok(),
                "exe of {} ({})",
                r.pid,
                r.name
            );
        }
    }
    assert!(compared * 10 >= p.len() * 9, "compared only {compared} of {}", p.len());
}

#[cfg(target_os = "linux")]
mod fake_procfs {
    //! A fake `/proc` tree: the only way to stage pid reuse and a process
    //! that vanishes between listing and reading, deterministically.
    use super::*;
    use daemoneye_platform::{ProcFs, Unavailable};
    use std::path::Path;

    fn stat_line(pid: u32, comm: &str, start: u64) -> String {
        format!("{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 0 0 0 0 5 5 0 0 20 0 1 0 {start} 1000 10 0 0\n")
    }

    fn write_proc(root: &Path, pid: u32, comm: &str, start: u64, argv: &[&str]) {
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("stat"), stat_line(pid, comm, start)).expect("stat");
        std::fs::write(d.join("status"), "Name:\tx\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n").expect("status");
        let cmd: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
        std::fs::write(d.join("cmdline"), cmd).expect("cmdline");
        let _ = std::fs::remove_file(d.join("exe"));
        std::os::unix::fs::symlink(format!("/usr/bin/{comm}"), d.join("exe")).expect("exe link");
    }

    fn fake_root() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(t.path().join("self")).expect("self");
        std::fs::write(t.path().join("stat"), "cpu 0\nbtime 1700000000\n").expect("stat");
        t
    }

    #[test]
    fn pid_reuse_is_a_new_identity_with_fresh_details() {
        let root = fake_root();
        write_proc(root.path(), 100, "alpha", 5000, &["alpha", "--one"]);
        let mut src = ProcFs::with_root(root.path()).expect("fake procfs");
        let first = src.refresh().expect("refresh");
        assert_eq!(first.len(), 1);
        assert_eq!(src.last_cycle().detail_reads, 1);
        src.refresh().expect("steady");
        assert_eq!(src.last_cycle().detail_reads, 0, "a known identity is not re-read");

        // Same pid, new start time, new program: the pid was reused.
        write_proc(root.path(), 100, "beta", 9000, &["beta", "--two"]);
        let second = src.refresh().expect("refresh");
        assert_eq!(src.last_cycle().detail_reads, 1);
        assert_ne!(second[0].key(), first[0].key());
        assert_eq!(second[0].details.argv.as_ref().expect("argv").args, vec!["beta", "--two"]);
        assert_eq!(second[0].started_unix, Ok(1_700_000_000 + 90));
    }

    #[test]
    fn listed_but_vanished_process_is_skipped_and_counted() {
        let root = fake_root();
        write_proc(root.path(), 100, "alpha", 5000, &["alpha"]);
        std::fs::create_dir(root.path().join("200")).expect("empty pid dir: the process is gone");
        let mut src = ProcFs::with_root(root.path()).expect("fake procfs");
        let recs = src.refresh().expect("a vanished process is not an error");
        assert_eq!(recs.len(), 1);
        assert_eq!(src.last_cycle().vanished, 1);
        assert_eq!(src.last_cycle().listed, 2);
    }

    #[test]
    fn odd_names_and_renamed_kernel_threads_stay_steady() {
        let root = fake_root();
        // A name cut by the kernel in the middle of a UTF-8 character.
        let d = root.path().join("300");
        std::fs::create_dir_all(&d).expect("mkdir");
        let mut stat = b"300 (\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3) S 1 300 300 0 -1 0 0 0 0 0 5 5 0 0 20 0 1 0 700 1000 10 0 0 0 0\n".to_vec();
        std::fs::write(d.join("stat"), &stat).expect("stat");
        std::fs::write(d.join("status"), "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n").expect("status");
        std::fs::write(d.join("cmdline"), b"odd\0").expect("cmdline");
        // A kernel thread (PF_KTHREAD) whose name follows its work queue.
        let k = root.path().join("400");
        std::fs::create_dir_all(&k).expect("mkdir");
        let kstat = |name: &str| {
            format!("400 ({name}) I 2 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 50 0 0 0 0 0 0\n")
        };
        std::fs::write(k.join("stat"), kstat("kworker/0:1-events")).expect("stat");
        std::fs::write(k.join("status"), "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n").expect("status");
        let mut src = ProcFs::with_root(root.path()).expect("fake procfs");
        assert_eq!(src.refresh().expect("first").len(), 2);
        assert_eq!(src.last_cycle().detail_reads, 2);
        std::fs::write(k.join("stat"), kstat("kworker/0:1-mm_percpu_wq")).expect("rename");
        let recs = src.refresh().expect("second");
        assert_eq!(
            src.last_cycle().detail_reads,
            0,
            "neither the odd name nor the kworker rename is an exec"
        );
        let kw = recs.iter().find(|r| r.pid == 400).expect("kworker");
        assert!(kw.kernel_thread && kw.name == "kworker/0:1-mm_percpu_wq");
        assert_eq!(kw.details.exe, Err(Unavailable::NotApplicable), "a kernel thread has no executable");
        // An exec that keeps the name but moves the memory image is seen.
        stat = String::from_utf8_lossy(&stat).replace("0 0 0 0\n", "0 4096 0 8192\n").into_bytes();
        std::fs::write(d.join("stat"), &stat).expect("exec");
        src.refresh().expect("third");
        assert_eq!(src.last_cycle().detail_reads, 1);
    }

    #[test]
    fn missing_fields_say_why() {
        let root = fake_root();
        write_proc(root.path(), 100, "alpha", 5000, &["alpha"]);
        std::fs::remove_file(root.path().join("100/cmdline")).expect("rm");
        let mut src = ProcFs::with_root(root.path()).expect("fake procfs");
        let r = src.refresh().expect("refresh").remove(0);
        assert_eq!(r.details.argv, Err(Unavailable::Vanished), "a missing file means the process went away");
        assert_eq!(r.details.cwd, Err(Unavailable::Vanished));
        assert_eq!(r.details.exe.as_ref().ok(), Some(&PathBuf::from("/usr/bin/alpha")));
    }
}
