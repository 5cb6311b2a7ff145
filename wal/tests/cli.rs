//! The `daemoneye-wal` operator tool, run as a process against healthy,
//! torn, corrupt and missing directories.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use daemoneye_wal::{Durability, Wal, WalOptions};

fn tool(args: &[&str]) -> Output {
    let out =
        Command::new(env!("CARGO_BIN_EXE_daemoneye-wal")).args(args).output().expect("run daemoneye-wal");
    eprintln!(
        "$ daemoneye-wal {}\nstatus: {}\nstdout:\n{}stderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A log of 40 records of 100 bytes in 4 KiB segments, so some are sealed.
fn fixture(dir: &Path) -> Vec<PathBuf> {
    let o = WalOptions { segment_size: 4096, max_record_size: 4096, durability: Durability::Never };
    let (wal, _) = Wal::open(dir, o).expect("open");
    for i in 0..40u8 {
        wal.append(&[i; 100]).expect("append");
    }
    wal.truncate_through(5).expect("ack");
    wal.close().expect("close");
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs
}

#[test]
fn verify_healthy_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let segs = fixture(tmp.path());
    let out = tool(&["verify", tmp.path().to_str().expect("utf8")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains(&format!("segments:    {}", segs.len())), "{stdout}");
    assert!(stdout.contains("records:     40 (35 unacknowledged)"), "{stdout}");
    assert!(stdout.contains("sequence:    1..=40"), "{stdout}");
    assert!(stdout.contains("watermark:   5"), "{stdout}");
    assert!(stdout.contains("torn tail:   none"), "{stdout}");
    assert!(stdout.contains("status:      ok"), "{stdout}");
}

#[test]
fn verify_torn_tail_is_healthy_and_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let segs = fixture(tmp.path());
    let last = segs.last().expect("segment");
    let len = fs::metadata(last).expect("stat").len();
    OpenOptions::new().write(true).open(last).expect("open").set_len(len - 30).expect("cut");
    let out = tool(&["verify", tmp.path().to_str().expect("utf8")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "a torn tail is not corruption");
    let name = last.file_name().expect("name").to_string_lossy();
    assert!(stdout.contains(&format!("torn tail:   86 bytes at offset {}", len - 116)), "{stdout}");
    assert!(stdout.contains(&*name), "{stdout}");
    assert!(stdout.contains("records:     39"), "{stdout}");
    // The tool changed nothing.
    assert_eq!(fs::metadata(last).expect("stat").len(), len - 30);

    let dump = tool(&["dump", tmp.path().to_str().expect("utf8")]);
    assert_eq!(dump.status.code(), Some(0));
    assert_eq!(text(&dump.stdout).lines().count(), 39);
    assert!(text(&dump.stderr).contains("torn tail: 86 bytes"), "{}", text(&dump.stderr));
}

#[test]
fn verify_corrupt_sealed_segment_fails_naming_file_and_offset() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let segs = fixture(tmp.path());
    let sealed = &segs[0];
    let mut bytes = fs::read(sealed).expect("read");
    // Second record: header 32 + one 116-byte frame; flip a payload byte.
    bytes[32 + 116 + 50] ^= 0x01;
    fs::write(sealed, &bytes).expect("write");
    let name = sealed.file_name().expect("name").to_string_lossy().into_owned();

    let out = tool(&["verify", tmp.path().to_str().expect("utf8")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("CORRUPT:"), "{stdout}");
    assert!(stdout.contains(&format!("{name} at offset 148 (116 bytes): checksum mismatch")), "{stdout}");
    assert!(stdout.contains("records:     39"), "later records are still counted: {stdout}");

    let dump = tool(&["dump", tmp.path().to_str().expect("utf8")]);
    assert_eq!(dump.status.code(), Some(1));
    assert!(text(&dump.stderr).contains(&format!("{name} at offset 148")), "{}", text(&dump.stderr));
    assert_eq!(text(&dump.stdout).lines().count(), 39);
}

#[test]
fn dump_prints_one_line_per_record_from_a_sequence() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let segs = fixture(tmp.path());
    let out = tool(&["dump", tmp.path().to_str().expect("utf8"), "--from", "38"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let seg = segs.last().expect("segment").file_name().expect("name").to_string_lossy().into_owned();
    assert!(lines[0].starts_with("seq=38 len=100 segment="), "{}", lines[0]);
    assert!(lines[2].starts_with(&format!("seq=40 len=100 segment={seg} offset=")), "{}", lines[2]);
    let all = tool(&["dump", tmp.path().to_str().expect("utf8")]);
    assert_eq!(text(&all.stdout).lines().count(), 40, "dump shows acknowledged records too");
}

#[test]
fn missing_directory_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("nope");
    for cmd in ["verify", "dump"] {
        let out = tool(&[cmd, missing.to_str().expect("utf8")]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = text(&out.stderr);
        assert!(stderr.contains(&format!("WAL directory {} does not exist", missing.display())), "{stderr}");
    }
    assert!(!missing.exists(), "inspection must not create the directory");
}

#[test]
fn a_directory_that_is_not_a_log_is_an_error_naming_the_logs_below_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A collector's data dir under the agent: the log is two levels down.
    let data = tmp.path().join("collectors").join("pm");
    let wal = data.join("wal").join("pm");
    fixture(&wal);
    fs::write(data.join("procmond.pid"), "1").expect("write");
    for cmd in ["verify", "dump"] {
        let out = tool(&[cmd, data.to_str().expect("utf8")]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        assert!(stderr.contains("is not a write-ahead log directory"), "{stderr}");
        assert!(stderr.contains(&wal.display().to_string()), "{cmd} names the log below: {stderr}");
        assert!(!text(&out.stdout).contains("status:      ok"), "{cmd}");
    }
    // Nothing like a log anywhere below: the error alone.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).expect("mkdir");
    let out = tool(&["verify", empty.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is not a write-ahead log directory"));
    // The log itself is fine.
    assert_eq!(tool(&["verify", wal.to_str().expect("utf8")]).status.code(), Some(0));
}
