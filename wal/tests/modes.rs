//! The log is private to its writer's user: modes under any umask, other
//! users kept out (root runs the parts that switch users), old modes
//! tightened, foreign or writable directories and planted links refused.
#![cfg(unix)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use daemoneye_wal::{Durability, Error, Wal, WalOptions};

/// Set in the child this test binary runs under `umask 000`.
const CHILD_ENV: &str = "DAEMONEYE_WAL_MODES_CHILD";

fn opts() -> WalOptions {
    WalOptions { segment_size: 4096, max_record_size: 4096, durability: Durability::Never }
}

/// Several segments, a watermark, a lock file.
fn fill(dir: &Path) {
    let (wal, _) = Wal::open(dir, opts()).expect("open");
    for i in 0..40u8 {
        wal.append(&[i; 100]).expect("append");
    }
    wal.truncate_through(5).expect("ack");
    wal.close().expect("close");
}

/// Every file and directory under `root` (itself included), with its mode.
fn modes(root: &Path) -> Vec<(PathBuf, bool, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = fs::symlink_metadata(&p).expect("lstat");
        if meta.is_dir() {
            for e in fs::read_dir(&p).expect("read dir") {
                todo.push(e.expect("entry").path());
            }
        }
        out.push((p, meta.is_dir(), meta.mode() & 0o7777));
    }
    out
}

fn assert_private(root: &Path) {
    let all = modes(root);
    assert!(all.iter().filter(|(_, dir, _)| !dir).count() >= 3, "LOCK, WATERMARK, segments: {all:?}");
    for (p, dir, mode) in all {
        let want = if dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:04o}", p.display());
    }
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn under_umask_000_every_directory_is_0700_and_every_file_0600() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        // The child: umask 000, so only the log's own modes protect it.
        fill(&PathBuf::from(dir));
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let wal_dir = tmp.path().join("a/b/wal");
    let status = Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" \"$@\""])
        .arg(std::env::current_exe().expect("own binary"))
        .args(["under_umask_000_every_directory_is_0700_and_every_file_0600", "--exact", "--test-threads=1"])
        .env(CHILD_ENV, &wal_dir)
        .status()
        .expect("child runs");
    assert!(status.success(), "child: {status}");
    assert_private(&tmp.path().join("a"));
}

#[test]
fn another_user_cannot_open_the_lock_or_a_segment() {
    if !is_root() {
        eprintln!("skipped: switching to uid 65534 needs root");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    chmod(tmp.path(), 0o755);
    let dir = tmp.path().join("wal");
    fill(&dir);
    // Held by its writer, as in a running collector.
    let (wal, _) = Wal::open(&dir, opts()).expect("open");
    let segment = fs::read_dir(&dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment");
    let as_nobody = |script: &str, path: &Path| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script, "sh"])
            .arg(path)
            .output()
            .expect("setpriv runs")
    };
    let open_read = "exec 3<\"$1\"";
    let hold_lock = "exec flock -n \"$1\" true";
    for traversable in [false, true] {
        // With the directory 0711 (others may pass through), the files'
        // own 0600 still keeps them out.
        chmod(&dir, if traversable { 0o711 } else { 0o700 });
        for (script, path) in
            [(open_read, &dir.join("LOCK")), (hold_lock, &dir.join("LOCK")), (open_read, &segment)]
        {
            let out = as_nobody(script, path);
            assert!(
                !out.status.success(),
                "uid 65534 ran {script:?} on {} (dir traversable: {traversable})",
                path.display()
            );
        }
        let listing = as_nobody("exec ls \"$1\"", &dir);
        assert!(!listing.status.success(), "uid 65534 listed the log");
    }
    chmod(&dir, 0o700);
    // The writer still holds its lock and appends.
    wal.append(b"more").expect("append");
    wal.close().expect("close");
}

#[test]
fn modes_an_older_release_left_are_tightened_on_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("wal");
    fill(&dir);
    chmod(&dir, 0o755);
    for e in fs::read_dir(&dir).expect("read dir") {
        chmod(&e.expect("entry").path(), 0o644);
    }
    fs::write(dir.join("STREAM"), "7\n").expect("write");
    chmod(&dir.join("STREAM"), 0o666);
    let (wal, _) = Wal::open(&dir, opts()).expect("reopen");
    wal.close().expect("close");
    assert_private(&dir);
}

#[test]
fn a_directory_others_may_write_to_or_of_another_user_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("wal");
    fill(&dir);
    for loose in [0o777, 0o770, 0o1733] {
        chmod(&dir, loose);
        match Wal::open(&dir, opts()) {
            Err(e @ Error::NotPrivate { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&dir.display().to_string()), "{text}");
                assert!(
                    text.contains(&format!("mode {loose:04o}")) && text.contains("other users may write"),
                    "{text}"
                );
            }
            other => panic!("mode {loose:04o}: {other:?}"),
        }
        assert_eq!(fs::metadata(&dir).expect("stat").mode() & 0o7777, loose, "left as it was");
    }
    chmod(&dir, 0o700);
    if is_root() {
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown");
        match Wal::open(&dir, opts()) {
            Err(e @ Error::NotPrivate { .. }) => {
                assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
                assert!(e.to_string().contains("owner uid 65534, mode 0700"), "{e}");
            }
            other => panic!("another user's directory: {other:?}"),
        }
        std::os::unix::fs::chown(&dir, Some(0), Some(0)).expect("chown back");
    }
    let (wal, _) = Wal::open(&dir, opts()).expect("private again: opens");
    wal.close().expect("close");
}

#[test]
fn links_planted_for_the_lock_or_a_temporary_file_are_never_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let victim = tmp.path().join("victim");
    fs::write(&victim, b"precious").expect("write");
    // LOCK: refused.
    let dir = tmp.path().join("wal");
    fs::create_dir(&dir).expect("mkdir");
    chmod(&dir, 0o700);
    std::os::unix::fs::symlink(&victim, dir.join("LOCK")).expect("symlink");
    assert!(Wal::open(&dir, opts()).is_err(), "a LOCK link is refused");
    assert_eq!(fs::read(&victim).expect("read"), b"precious");
    fs::remove_file(dir.join("LOCK")).expect("rm");
    // The watermark's and a segment's temporary names: removed, not
    // written through.
    let (wal, _) = Wal::open(&dir, opts()).expect("open");
    wal.append(b"x").expect("append");
    std::os::unix::fs::symlink(&victim, dir.join("WATERMARK.tmp")).expect("symlink");
    wal.truncate_through(1).expect("ack");
    wal.close().expect("close");
    assert_eq!(fs::read(&victim).expect("read"), b"precious");
    assert_eq!(fs::metadata(&victim).expect("stat").mode() & 0o7777, 0o644);
    assert_private(&dir);
}
