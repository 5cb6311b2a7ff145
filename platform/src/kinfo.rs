//! FreeBSD: what sysinfo gets wrong, read from the kernel's own record of
//! one process (`struct kinfo_proc`, sysctl `kern.proc.pid.<pid>`).
//!
//! - The start time: sysinfo keeps `ki_start`'s seconds only, so a pid
//!   reused within one second kept its predecessor's identity; here it is
//!   in microseconds since the epoch.
//! - The effective gid: sysinfo reports the saved gid (`ki_svgid`) as the
//!   effective one; the kernel's effective gid is `ki_groups[0]`.
//!
//! The record is bytes: each field is read at its offset in `libc`'s
//! definition of the struct (`offset_of!`, safe code), and only when the
//! kernel's `ki_structsize` equals that definition's size, so a kernel
//! whose layout libc does not describe yields nothing rather than
//! misread fields. The sysctl itself goes through the `sysctl` crate
//! (the raw call needs code this crate forbids, so it stays in that one).
//!
//! Not here: kernel processes (`P_SYSTEM`, which sysinfo drops). Listing
//! them takes the whole table (`kern.proc.proc`), whose size the kernel
//! over-estimates by five records on purpose; the `sysctl` crate refuses
//! any read shorter than the estimate (`ShortRead`), so no safe call of
//! ours reads it yet.

/// Where a field sits in the record: byte offset and width.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    at: usize,
    width: usize,
}

/// The fields read, as one definition of `struct kinfo_proc` lays them out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    /// The whole struct's size (`ki_structsize` must say the same).
    size: usize,
    structsize: Span,
    start_sec: Span,
    start_usec: Span,
    rgid: Span,
    ngroups: Span,
    /// `ki_groups[0]`, the effective gid.
    groups0: Span,
}

/// What this module reads of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kinfo {
    /// `ki_start` in whole seconds since the epoch (as sysinfo has it).
    pub start_secs: u64,
    /// `ki_start` in microseconds since the epoch.
    pub start_us: u64,
    /// Real gid.
    pub rgid: u32,
    /// Effective gid; `None` when the record lists no groups.
    pub egid: Option<u32>,
}

/// Reads a native-endian integer of `span.width` bytes, sign-extended.
fn int(bytes: &[u8], span: Span) -> Option<i64> {
    let b = bytes.get(span.at..span.at.checked_add(span.width)?)?;
    Some(match span.width {
        2 => i64::from(i16::from_ne_bytes(b.try_into().ok()?)),
        4 => i64::from(i32::from_ne_bytes(b.try_into().ok()?)),
        8 => i64::from_ne_bytes(b.try_into().ok()?),
        _ => return None,
    })
}

/// An unsigned 32-bit id (`gid_t`) at `span`.
fn id(bytes: &[u8], span: Span) -> Option<u32> {
    if span.width != 4 {
        return None;
    }
    let b = bytes.get(span.at..span.at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(b.try_into().ok()?))
}

/// Parses one record; `None` when it is not one of `layout`'s size or a
/// field is out of range.
pub(crate) fn parse(bytes: &[u8], layout: &Layout) -> Option<Kinfo> {
    let size = usize::try_from(int(bytes, layout.structsize)?).ok()?;
    if size != layout.size || bytes.len() < size {
        return None;
    }
    let secs = u64::try_from(int(bytes, layout.start_sec)?).ok()?;
    let usecs = u64::try_from(int(bytes, layout.start_usec)?).ok().filter(|u| *u < 1_000_000)?;
    let ngroups = int(bytes, layout.ngroups)?;
    Some(Kinfo {
        start_secs: secs,
        start_us: secs.checked_mul(1_000_000)?.checked_add(usecs)?,
        rgid: id(bytes, layout.rgid)?,
        egid: if ngroups >= 1 { Some(id(bytes, layout.groups0)?) } else { None },
    })
}

/// `libc`'s `struct kinfo_proc` for this target.
#[cfg(target_os = "freebsd")]
const LAYOUT: Layout = {
    use std::mem::{offset_of, size_of};
    type K = libc::kinfo_proc;
    let start = offset_of!(K, ki_start);
    Layout {
        size: size_of::<K>(),
        structsize: Span { at: offset_of!(K, ki_structsize), width: size_of::<libc::c_int>() },
        start_sec: Span { at: start + offset_of!(libc::timeval, tv_sec), width: size_of::<libc::time_t>() },
        start_usec: Span {
            at: start + offset_of!(libc::timeval, tv_usec),
            width: size_of::<libc::suseconds_t>(),
        },
        rgid: Span { at: offset_of!(K, ki_rgid), width: size_of::<libc::gid_t>() },
        ngroups: Span { at: offset_of!(K, ki_ngroups), width: size_of::<libc::c_short>() },
        groups0: Span { at: offset_of!(K, ki_groups), width: size_of::<libc::gid_t>() },
    }
};

/// Why a record was not read.
#[cfg(target_os = "freebsd")]
#[derive(Debug)]
pub(crate) enum ReadError {
    /// No such process (it exited), or not one this process may see.
    Gone,
    /// The kernel's record is not what libc describes, or the call failed.
    Other(String),
}

/// The kernel's record of process `pid`.
#[cfg(target_os = "freebsd")]
pub(crate) fn read(pid: u32) -> Result<Kinfo, ReadError> {
    use sysctl::Sysctl;
    let pid = i32::try_from(pid).map_err(|_| ReadError::Gone)?;
    let ctl = sysctl::Ctl::Oid(vec![libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PID, pid]);
    let bytes = match ctl.value() {
        Ok(sysctl::CtlValue::Node(b) | sysctl::CtlValue::Struct(b)) => b,
        Ok(other) => return Err(ReadError::Other(format!("kern.proc.pid gave {other:?}"))),
        Err(sysctl::SysctlError::IoError(e)) if e.raw_os_error() == Some(libc::ESRCH) => {
            return Err(ReadError::Gone);
        }
        Err(e) => return Err(ReadError::Other(format!("kern.proc.pid.{pid}: {e}"))),
    };
    parse(&bytes, &LAYOUT).ok_or_else(|| {
        ReadError::Other(format!(
            "kern.proc.pid.{pid}: a record of {} bytes is not the kinfo_proc libc describes ({} bytes)",
            bytes.len(),
            LAYOUT.size
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up layout (the real one is FreeBSD's, checked there by
    /// `ki_structsize`): the parser's bounds, widths and units.
    const TEST: Layout = Layout {
        size: 64,
        structsize: Span { at: 0, width: 4 },
        start_sec: Span { at: 8, width: 8 },
        start_usec: Span { at: 16, width: 8 },
        rgid: Span { at: 24, width: 4 },
        ngroups: Span { at: 28, width: 2 },
        groups0: Span { at: 32, width: 4 },
    };

    fn record(size: i32, secs: i64, usecs: i64, rgid: u32, ngroups: i16, egid: u32) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[0..4].copy_from_slice(&size.to_ne_bytes());
        b[8..16].copy_from_slice(&secs.to_ne_bytes());
        b[16..24].copy_from_slice(&usecs.to_ne_bytes());
        b[24..28].copy_from_slice(&rgid.to_ne_bytes());
        b[28..30].copy_from_slice(&ngroups.to_ne_bytes());
        b[32..36].copy_from_slice(&egid.to_ne_bytes());
        b
    }

    #[test]
    fn start_time_in_microseconds_and_the_effective_gid_from_the_groups() {
        let k = parse(&record(64, 1_700_000_000, 123_456, 20, 3, 0), &TEST).expect("parsed");
        assert_eq!(
            k,
            Kinfo { start_secs: 1_700_000_000, start_us: 1_700_000_000_123_456, rgid: 20, egid: Some(0) }
        );
        // Two processes started in the same second differ.
        let other = parse(&record(64, 1_700_000_000, 123_457, 20, 3, 0), &TEST).expect("parsed");
        assert_ne!(k.start_us, other.start_us);
        // gid_t is unsigned: nogroup's 65533 and 4294967294 stay as they are.
        let k = parse(&record(64, 1, 0, u32::MAX - 1, 1, 65533), &TEST).expect("parsed");
        assert_eq!((k.rgid, k.egid), (u32::MAX - 1, Some(65533)));
    }

    #[test]
    fn no_groups_no_effective_gid() {
        let k = parse(&record(64, 5, 0, 7, 0, 99), &TEST).expect("parsed");
        assert_eq!(k.egid, None);
    }

    #[test]
    fn a_record_of_another_layout_or_out_of_range_is_refused() {
        // The kernel's struct is not the one described.
        assert_eq!(parse(&record(1088, 5, 0, 0, 1, 0), &TEST), None);
        // Shorter than it says.
        assert_eq!(parse(&record(64, 5, 0, 0, 1, 0)[..40], &TEST), None);
        assert_eq!(parse(&[], &TEST), None);
        // Microseconds past a second, or a time before the epoch.
        assert_eq!(parse(&record(64, 5, 1_000_000, 0, 1, 0), &TEST), None);
        assert_eq!(parse(&record(64, -1, 0, 0, 1, 0), &TEST), None);
    }
}
