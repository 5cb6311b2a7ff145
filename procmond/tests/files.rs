//! What procmond keeps on disk is private: under `umask 000` every
//! directory it makes is 0700 and every file 0600 (data dir, pid file,
//! checkpoint, WAL and its `STREAM`, a standalone database); another user
//! can open none of them (so cannot hold a lock); a data dir of another
//! user or one others may write to is refused; modes an older release
//! left are tightened.
#![cfg(unix)]

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{FakeAgent, Procmond, broker, rand_u64, socket_path, wait_until};

const T: Duration = Duration::from_secs(20);

/// procmond under `umask 000`, standalone or in actor mode, polling every
/// 5 s.
fn start_umask_000(dir: &Path, data: &Path, socket: Option<&Path>, extra: &[&str]) -> Procmond {
    let stderr_path = dir.join(format!("procmond-{:016x}.log", rand_u64()));
    let stderr = fs::File::create(&stderr_path).unwrap();
    let stdout = fs::File::create(stderr_path.with_extension("out")).unwrap();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 000; exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_procmond")])
        .arg("--data-dir")
        .arg(data)
        .args(["--log-level", "debug", "--events", "poll", "--interval", "5"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .env_remove("DAEMONEYE_BROKER_SOCKET");
    if let Some(s) = socket {
        cmd.env("DAEMONEYE_BROKER_SOCKET", s);
    }
    Procmond { child: cmd.spawn().expect("procmond starts"), stderr_path }
}

/// Every file and directory under `root` (itself included), with its mode.
fn modes(root: &Path) -> Vec<(PathBuf, bool, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else { continue };
        if meta.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
        out.push((p, meta.is_dir(), meta.mode() & 0o7777));
    }
    out
}

fn assert_private(root: &Path, expected: &[&str]) {
    let all = modes(root);
    for name in expected {
        assert!(
            all.iter().any(|(p, _, _)| p.to_string_lossy().ends_with(name)),
            "{name} under {}: {all:?}",
            root.display()
        );
    }
    for (p, dir, mode) in &all {
        let want = if *dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} is {mode:04o}", p.display());
    }
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `sh -c script sh path` as uid and gid 65534.
fn as_nobody(script: &str, path: &Path) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script, "sh"])
        .arg(path)
        .output()
        .expect("setpriv runs")
}

/// Neither opened (read or write) nor locked by uid 65534, even with every
/// directory on the way passable by others.
fn assert_nobody_is_kept_out(dirs: &[&Path], files: &[PathBuf]) {
    for traversable in [false, true] {
        for d in dirs {
            chmod(d, if traversable { 0o711 } else { 0o700 });
        }
        for f in files {
            assert!(f.exists(), "{}", f.display());
            for script in ["exec 3<\"$1\"", "exec 3>>\"$1\"", "exec flock -n \"$1\" true"] {
                let out = as_nobody(script, f);
                assert!(
                    !out.status.success(),
                    "uid 65534 ran {script:?} on {} (directories passable: {traversable})",
                    f.display()
                );
            }
        }
    }
    for d in dirs {
        chmod(d, 0o700);
    }
}

#[test]
fn actor_mode_under_umask_000_keeps_everything_private_and_other_users_out() {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let _broker = broker(dir.path());
    let agent = FakeAgent::start(&socket_path(dir.path()), &dir.path().join("agent.db"));
    // Two levels to create: both 0700.
    let data = dir.path().join("state/data");
    let mut pm = start_umask_000(dir.path(), &data, Some(&socket_path(dir.path())), &[]);
    assert!(wait_until(T, || agent.registrations() == 1), "registered: {}", pm.log());
    agent.begin_monitoring();
    let wal = data.join("wal/procmond");
    let checkpoint = data.join("procmond-procmond.checkpoint");
    assert!(
        wait_until(T, || agent.stored.load(Ordering::SeqCst) > 0
            && checkpoint.exists()
            && wal.join("WATERMARK").exists()),
        "events stored, checkpoint and watermark written: {}",
        pm.log()
    );
    assert_private(
        &dir.path().join("state"),
        &["procmond-procmond.pid", "procmond-procmond.checkpoint", "LOCK", "STREAM", "WATERMARK", ".seg"],
    );
    if is_root() {
        let segment = fs::read_dir(&wal)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        assert_nobody_is_kept_out(
            &[&dir.path().join("state"), &data, &data.join("wal"), &wal],
            &[data.join("procmond-procmond.pid"), checkpoint, wal.join("LOCK"), wal.join("STREAM"), segment],
        );
    }
    assert!(pm.child.try_wait().unwrap().is_none(), "still running: {}", pm.log());
    pm.kill();
}

#[test]
fn standalone_under_umask_000_keeps_its_database_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut pm = start_umask_000(dir.path(), &data, None, &[]);
    let checkpoint = data.join("procmond-procmond.checkpoint");
    assert!(wait_until(T, || checkpoint.exists()), "a cycle ran: {}", pm.log());
    assert_private(&data, &["procmond-procmond.pid", "procmond-procmond.checkpoint", "procmond.db"]);
    if is_root() {
        chmod(dir.path(), 0o755);
        assert_nobody_is_kept_out(&[&data], &[data.join("procmond-procmond.pid"), data.join("procmond.db")]);
    }
    pm.kill();
}

/// procmond's exit and stderr when started on `data`, standalone.
fn refused(data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_procmond"))
        .arg("--data-dir")
        .arg(data)
        .env_remove("DAEMONEYE_BROKER_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_data_dir_others_may_write_to_or_of_another_user_is_refused_naming_path_owner_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    let me = nix::unistd::geteuid().as_raw();
    for loose in [0o777, 0o775, 0o1777] {
        chmod(&data, loose);
        let out = refused(&data);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "mode {loose:04o}: {stderr}");
        assert!(stderr.contains(&data.display().to_string()), "{stderr}");
        assert!(stderr.contains(&format!("owner uid {me}, mode {loose:04o}")), "{stderr}");
        assert!(stderr.contains("other users may write to it"), "{stderr}");
        assert_eq!(fs::metadata(&data).unwrap().mode() & 0o7777, loose, "left as it was");
        assert!(fs::read_dir(&data).unwrap().next().is_none(), "nothing made in it");
    }
    chmod(&data, 0o700);
    if is_root() {
        std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
        let out = refused(&data);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&data.display().to_string()), "{stderr}");
        assert!(stderr.contains("belongs to uid 65534"), "{stderr}");
        assert!(stderr.contains("owner uid 65534, mode 0700"), "{stderr}");
        assert!(fs::read_dir(&data).unwrap().next().is_none(), "nothing made in it");
    }
}

#[test]
fn modes_an_older_release_left_are_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    chmod(&data, 0o755);
    let pid = data.join("procmond-procmond.pid");
    let checkpoint = data.join("procmond-procmond.checkpoint");
    for f in [&pid, &checkpoint] {
        fs::write(f, b"").unwrap();
        chmod(f, 0o644);
    }
    let db = dir.path().join("events.db");
    let mut pm = Procmond::start(dir.path(), None, &["--database", db.to_str().unwrap(), "--interval", "5"]);
    assert!(
        wait_until(T, || fs::read_to_string(&pid).unwrap_or_default().trim() == pm.child.id().to_string()),
        "{}",
        pm.log()
    );
    assert!(wait_until(T, || fs::metadata(&checkpoint).unwrap().mode() & 0o777 == 0o600), "{}", pm.log());
    assert_private(&data, &["procmond-procmond.pid", "procmond-procmond.checkpoint"]);
    pm.kill();
}
