//! Unit tests of the broker's internals (the integration tests drive it
//! over real sockets).

use super::*;

#[test]
fn a_voucher_names_one_process_not_its_pid() {
    let v = Vouchers::default();
    let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn");
    let pid = child.id();
    v.vouch("col", pid);
    assert!(v.proves("col", pid));
    assert!(v.vouched_pid(pid));
    assert!(!v.proves("col", std::process::id()), "another process");
    assert!(!v.proves("other", pid), "another id");
    child.kill().expect("kill");
    child.wait().expect("reap");
    // Gone: whatever reuses the pid later has another start time (or
    // none can be read now).
    assert!(!v.proves("col", pid));
    // A stale start time never matches a live process.
    v.table.lock().insert("me".into(), Vouch { pid: std::process::id(), start_time: Some(u64::MAX) });
    assert!(!v.proves("me", std::process::id()));
    // Revoking takes only the vouched pid's entry.
    v.vouch("me", std::process::id());
    v.revoke("me", pid);
    assert!(v.proves("me", std::process::id()));
    v.revoke("me", std::process::id());
    assert!(!v.proves("me", std::process::id()));
}
