//! Clocks the kernel stamps things with: `CLOCK_MONOTONIC` (proc connector
//! events) and `CLOCK_BOOTTIME` (process start times on Linux), and their
//! relation to the wall clock.

use std::time::{SystemTime, UNIX_EPOCH};

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(unix)]
fn read_ns(clock: nix::time::ClockId) -> Option<u64> {
    let t = nix::time::clock_gettime(clock).ok()?;
    Some((t.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec() as u64))
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> Option<u64> {
    #[cfg(unix)]
    {
        read_ns(nix::time::ClockId::CLOCK_MONOTONIC)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// `CLOCK_BOOTTIME` now (Linux; time since boot, suspend included).
pub fn boottime_ns() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        read_ns(nix::time::ClockId::CLOCK_BOOTTIME)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The CPU time process `pid` has used so far, in nanoseconds, from its
/// CPU clock (`clock_getcpuclockid`: Linux and FreeBSD; `None` elsewhere,
/// or when the process is gone or not ours to read).
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
        read_ns(nix::time::clock_getcpuclockid(pid).ok()?)
    }
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    {
        let _ = pid;
        None
    }
}

/// How far `CLOCK_BOOTTIME` runs ahead of `CLOCK_MONOTONIC`: the time the
/// machine spent suspended (0 where there is no boot clock).
pub fn boottime_minus_monotonic_ns() -> u64 {
    match (monotonic_ns(), boottime_ns()) {
        (Some(mono), Some(boot)) => boot.saturating_sub(mono),
        _ => 0,
    }
}

/// Unix milliseconds of the `CLOCK_MONOTONIC` instant `at_ns` (now, where
/// the clock cannot be read).
pub fn unix_ms_at_monotonic(at_ns: u64) -> u64 {
    let now = now_unix_ms();
    match monotonic_ns() {
        Some(mono) => now.saturating_sub(mono.saturating_sub(at_ns) / 1_000_000),
        None => now,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn a_monotonic_instant_maps_onto_the_wall_clock() {
        let mono = super::monotonic_ns().expect("monotonic clock");
        let now = super::now_unix_ms();
        let then = super::unix_ms_at_monotonic(mono.saturating_sub(5_000_000_000));
        assert!((now - then).abs_diff(5_000) < 1_000, "5 s ago maps to {} ms ago", now - then);
        assert!(super::boottime_ns().expect("boot clock") >= mono - 1_000_000);
    }
}
