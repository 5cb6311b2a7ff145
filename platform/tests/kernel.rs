//! The kernel event source against real processes: a child's fork, exec
//! and exit (with its code) arrive, and its details are read while it runs.
#![cfg(target_os = "linux")]

use std::process::Command;
use std::time::{Duration, Instant};

use daemoneye_platform::{
    ExitStatus, KernelEvent, KernelEventKind, KernelEventSource, KernelEventsAvailability,
    KernelSourceConfig, Wakeup,
};

/// In a container the kernel sends nothing, and the source must say so.
fn open() -> Option<KernelEventSource> {
    match KernelEventSource::open(KernelSourceConfig::default()) {
        Ok(s) => Some(s),
        Err(KernelEventsAvailability::NotInitialPidNamespace) => {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap().to_owned();
            let map = std::fs::read_to_string("/proc/self/uid_map").unwrap();
            assert!(
                nspid.split_whitespace().count() > 2
                    || map.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"],
                "reported a namespace obstacle in the initial namespaces: {nspid}, {map}"
            );
            None
        }
        Err(other) => panic!("kernel events unavailable: {other}"),
    }
}

/// Collects events until `done` holds or 10 s pass.
fn collect(src: &mut KernelEventSource, mut done: impl FnMut(&[KernelEvent]) -> bool) -> Vec<KernelEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    while Instant::now() < deadline && !done(&all) {
        if src.wait(Some(Instant::now() + Duration::from_millis(100))).unwrap() == Wakeup::Readable {
            let outcome = src.read(&mut all, 256).unwrap();
            assert_eq!(outcome.malformed, 0, "the kernel's own datagrams parse");
        }
    }
    all
}

#[test]
fn a_childs_fork_exec_and_exit_code_arrive() {
    let Some(mut src) = open() else { return };
    assert!(src.receive_buffer_bytes() > 0);
    let child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
    let pid = child.id();
    let mut child = child;
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3));
    let events = collect(&mut src, |all| {
        all.iter()
            .any(|e| matches!(e.kind, KernelEventKind::Exit { pid: p, tgid, .. } if p == pid && tgid == pid))
    });
    let mine: Vec<&KernelEventKind> = events
        .iter()
        .map(|e| &e.kind)
        .filter(|k| match k {
            KernelEventKind::Fork { child_pid, .. } => *child_pid == pid,
            KernelEventKind::Exec { tgid, .. } | KernelEventKind::Exit { tgid, .. } => *tgid == pid,
            _ => false,
        })
        .collect();
    assert!(
        mine.iter().any(|k| matches!(k, KernelEventKind::Fork { child_tgid, .. } if *child_tgid == pid)),
        "{mine:?}"
    );
    assert!(mine.iter().any(|k| matches!(k, KernelEventKind::Exec { .. })), "{mine:?}");
    assert!(
        mine.iter().any(|k| matches!(k, KernelEventKind::Exit { status: ExitStatus::Code(3), .. })),
        "{mine:?}"
    );
    // Monotonic stamps map to about now.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let at = src.unix_ms_at(events.last().unwrap().at_ns);
    assert!(now.abs_diff(at) < 15_000, "event at {at}, now {now}");
}

#[test]
fn a_killed_child_reports_its_signal_and_a_live_one_its_details() {
    let Some(mut src) = open() else { return };
    let mut child = Command::new("sleep").args(["30", "0.0000424242"]).spawn().unwrap();
    let pid = child.id();
    collect(&mut src, |all| {
        all.iter().any(|e| matches!(e.kind, KernelEventKind::Exec { tgid, .. } if tgid == pid))
    });
    let rec = src.read_process(pid).expect("a live child reads");
    assert_eq!(rec.pid, pid);
    assert_eq!(rec.name, "sleep");
    let argv = rec.details.argv.clone().expect("argv");
    assert_eq!(argv.args, ["sleep", "30", "0.0000424242"]);
    assert!(rec.details.exe.as_ref().expect("exe").ends_with("sleep"));
    let brief = src.read_brief(pid).expect("stat");
    assert_eq!(brief.start_time, rec.start_time);
    child.kill().unwrap();
    child.wait().unwrap();
    let events = collect(&mut src, |all| {
        all.iter().any(|e| matches!(e.kind, KernelEventKind::Exit { tgid, .. } if tgid == pid))
    });
    let exit = events.iter().find_map(|e| match &e.kind {
        KernelEventKind::Exit { tgid, status, .. } if *tgid == pid => Some(*status),
        _ => None,
    });
    assert_eq!(exit, Some(ExitStatus::Signal { signal: 9, core_dumped: false }));
    assert_eq!(src.read_process(pid).map(|_| ()), Err(daemoneye_platform::Unavailable::Vanished));
}

#[test]
fn the_waker_ends_a_wait() {
    let Some(mut src) = open() else { return };
    let waker = src.waker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        waker.wake();
    });
    let start = Instant::now();
    // Other processes may exec meanwhile: wait until the wake-up is seen.
    let mut woke = false;
    while start.elapsed() < Duration::from_secs(10) && !woke {
        match src.wait(Some(Instant::now() + Duration::from_secs(10))).unwrap() {
            Wakeup::Woken => woke = true,
            _ => {
                let mut sink = Vec::new();
                src.read(&mut sink, 1024).unwrap();
            }
        }
    }
    t.join().unwrap();
    assert!(woke, "the waker ended the wait");
}

/// Waits until `wait` returns `Timeout` (events of other processes may
/// come first: they are read and the wait goes on), with each wait's
/// deadline from `deadline`; how long that took.
fn until_timeout(src: &mut KernelEventSource, mut deadline: impl FnMut() -> Instant) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        match src.wait(Some(deadline())).unwrap() {
            Wakeup::Timeout => return start.elapsed(),
            _ => {
                let mut sink = Vec::new();
                src.read(&mut sink, 1024).unwrap();
            }
        }
    }
    panic!("no timeout within 20 s");
}

#[test]
fn a_deadline_ends_a_wait_and_an_earlier_one_replaces_a_later() {
    let Some(mut src) = open() else { return };
    // A deadline 200 ms out: not before it.
    let due = Instant::now() + Duration::from_millis(200);
    let took = until_timeout(&mut src, || due);
    assert!(took >= Duration::from_millis(190), "woke after {took:?}, before its deadline");
    // A wait far out, ended by the waker, leaves the timer set for later;
    // a nearer deadline after it must still be kept.
    let waker = src.waker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        waker.wake();
    });
    let far = Instant::now() + Duration::from_secs(60);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        match src.wait(Some(far)).unwrap() {
            Wakeup::Woken => break,
            _ => {
                let mut sink = Vec::new();
                src.read(&mut sink, 1024).unwrap();
            }
        }
    }
    t.join().unwrap();
    let near = Instant::now() + Duration::from_millis(100);
    let took = until_timeout(&mut src, || near);
    assert!(took < Duration::from_secs(5), "the nearer deadline was not kept: {took:?}");
    // A deadline already past returns at once.
    let took = until_timeout(&mut src, Instant::now);
    assert!(took < Duration::from_secs(5), "a past deadline waited {took:?}");
}
