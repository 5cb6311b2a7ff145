//! The Linux proc connector: process events from the kernel over netlink
//! (`NETLINK_CONNECTOR`, multicast group `CN_IDX_PROC`).
//!
//! # Wire format (host byte order, as the kernel writes it)
//!
//! One datagram holds one or more netlink messages, each padded to 4 bytes:
//!
//! ```text
//! nlmsghdr   len u32 | type u16 | flags u16 | seq u32 | pid u32          16 bytes
//! cn_msg     idx u32 | val u32 | seq u32 | ack u32 | len u16 | flags u16  20 bytes
//! proc_event what u32 | cpu u32 | timestamp_ns u64 | event_data (union)    16 + ≤ 24 bytes
//! ```
//!
//! `event_data` by `what`: fork (parent pid, tgid, child pid, tgid), exec
//! (pid, tgid), uid/gid (pid, tgid, real, effective), sid (pid, tgid),
//! ptrace (pid, tgid, tracer pid, tgid), comm (pid, tgid, 16 name bytes),
//! coredump (pid, tgid, parent pid, tgid), exit (pid, tgid, exit code,
//! exit signal, parent pid, tgid). `timestamp_ns` is `CLOCK_MONOTONIC`.
//!
//! # Guarantees
//!
//! - The parser ([`parse_datagram`]) reads nothing it has not bounds-checked:
//!   a short, oversized, truncated or foreign datagram is an error value,
//!   never a panic, and never an allocation sized by the input.
//! - An overrun (the socket's receive buffer was full and the kernel
//!   dropped events: `ENOBUFS`) is counted and returned, never hidden.
//! - Only the kernel (netlink port 0) is believed: a datagram from any other
//!   sender is counted as foreign and dropped.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, NetlinkAddr, sockopt};

use crate::kernel::{KernelEvent, KernelEventKind, KernelEventsAvailability, ReadOutcome};
use crate::record::ExitStatus;

/// `NETLINK_CONNECTOR`, the netlink protocol of the kernel connector.
const NETLINK_CONNECTOR: i32 = 11;
/// The proc connector's index and value (`CN_IDX_PROC`, `CN_VAL_PROC`).
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `PROC_CN_MCAST_LISTEN`.
const MCAST_LISTEN: u32 = 1;

const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
/// `what`, `cpu` and `timestamp_ns` of a `proc_event`.
const PROC_EVENT_HEADER: usize = 16;
/// The largest `event_data` (exit: six u32).
const EVENT_DATA_MAX: usize = 24;
/// Netlink message types.
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

/// The largest datagram read: far more than one event (92 bytes), so a
/// datagram is never cut; what does not fit is refused as malformed.
const RECV_BUFFER: usize = 8 * 1024;

/// `proc_event.what` values.
mod what {
    pub const NONE: u32 = 0x0000_0000;
    pub const FORK: u32 = 0x0000_0001;
    pub const EXEC: u32 = 0x0000_0002;
    pub const UID: u32 = 0x0000_0004;
    pub const GID: u32 = 0x0000_0040;
    pub const SID: u32 = 0x0000_0080;
    pub const PTRACE: u32 = 0x0000_0100;
    pub const COMM: u32 = 0x0000_0200;
    pub const COREDUMP: u32 = 0x4000_0000;
    pub const EXIT: u32 = 0x8000_0000;
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the headers it claims or needs.
    #[error("short datagram: {needed} bytes needed at offset {offset}, {have} present")]
    Short {
        /// Offset of the part being read.
        offset: usize,
        /// Bytes that part needs.
        needed: usize,
        /// Bytes present from that offset.
        have: usize,
    },
    /// A netlink length outside the datagram or below its own header.
    #[error("netlink length {len} at offset {offset} does not fit the {datagram}-byte datagram")]
    BadLength {
        /// Offset of the message.
        offset: usize,
        /// Its claimed length.
        len: usize,
        /// The datagram's length.
        datagram: usize,
    },
    /// Not the proc connector (another connector index, or a message type
    /// that carries no connector payload).
    #[error("not a proc connector message (type {nl_type}, connector {idx}:{val})")]
    Foreign {
        /// Netlink message type.
        nl_type: u16,
        /// Connector index.
        idx: u32,
        /// Connector value.
        val: u32,
    },
    /// The kernel reported an error or an overrun inside the stream.
    #[error("netlink error message (type {nl_type}, errno {errno})")]
    NetlinkError {
        /// Netlink message type.
        nl_type: u16,
        /// The error number the message carries (0 if none).
        errno: i32,
    },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn short(b: &[u8], offset: usize, needed: usize) -> ParseError {
    ParseError::Short { offset, needed, have: b.len().saturating_sub(offset) }
}

/// Decodes every event in one datagram, appending them to `out`. On error
/// the events decoded before the bad message stay in `out`.
pub fn parse_datagram(datagram: &[u8], out: &mut Vec<KernelEvent>) -> Result<(), ParseError> {
    let mut offset = 0;
    if datagram.len() < NLMSG_HDRLEN {
        return Err(short(datagram, 0, NLMSG_HDRLEN));
    }
    while datagram.len().saturating_sub(offset) >= NLMSG_HDRLEN {
        let len = u32_at(datagram, offset).ok_or_else(|| short(datagram, offset, 4))? as usize;
        let nl_type = u16_at(datagram, offset + 4).ok_or_else(|| short(datagram, offset + 4, 2))?;
        if len < NLMSG_HDRLEN || len > datagram.len() - offset {
            return Err(ParseError::BadLength { offset, len, datagram: datagram.len() });
        }
        let msg = &datagram[offset..offset + len];
        match nl_type {
            NLMSG_NOOP => {}
            NLMSG_ERROR | NLMSG_OVERRUN => {
                let errno = u32_at(msg, NLMSG_HDRLEN).map_or(0, |e| e as i32);
                return Err(ParseError::NetlinkError { nl_type, errno });
            }
            NLMSG_DONE => parse_connector(msg, offset, out)?,
            other => return Err(ParseError::Foreign { nl_type: other, idx: 0, val: 0 }),
        }
        // Messages are padded to 4 bytes; the last one may be unpadded.
        offset += (len + 3) & !3;
    }
    Ok(())
}

/// One netlink message of type `NLMSG_DONE`: a `cn_msg` with a
/// `proc_event` in it.
fn parse_connector(msg: &[u8], base: usize, out: &mut Vec<KernelEvent>) -> Result<(), ParseError> {
    let cn = NLMSG_HDRLEN;
    if msg.len() < cn + CN_MSG_LEN {
        return Err(ParseError::Short {
            offset: base + cn,
            needed: CN_MSG_LEN,
            have: msg.len() - cn.min(msg.len()),
        });
    }
    let (idx, val) = (u32_at(msg, cn).unwrap_or(0), u32_at(msg, cn + 4).unwrap_or(0));
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC) {
        return Err(ParseError::Foreign { nl_type: NLMSG_DONE, idx, val });
    }
    let data_len = u16_at(msg, cn + 16).unwrap_or(0) as usize;
    let ev = cn + CN_MSG_LEN;
    let data = msg.get(ev..ev + data_len).ok_or(ParseError::Short {
        offset: base + ev,
        needed: data_len,
        have: msg.len().saturating_sub(ev),
    })?;
    if data.len() < PROC_EVENT_HEADER {
        return Err(ParseError::Short { offset: base + ev, needed: PROC_EVENT_HEADER, have: data.len() });
    }
    let what = u32_at(data, 0).unwrap_or(0);
    let at_ns = u64_at(data, 8).unwrap_or(0);
    let d = &data[PROC_EVENT_HEADER..];
    // Each event's fields must all be present; a union member shorter than
    // its type needs is a short datagram.
    let need = |n: usize| -> Result<(), ParseError> {
        if d.len() < n {
            Err(ParseError::Short { offset: base + ev + PROC_EVENT_HEADER, needed: n, have: d.len() })
        } else {
            Ok(())
        }
    };
    let w = |i: usize| u32_at(d, i * 4).unwrap_or(0);
    let kind = match what {
        what::NONE => {
            // The answer to a listen request: `ack.err`.
            need(4)?;
            KernelEventKind::Ack { err: w(0) }
        }
        what::FORK => {
            need(16)?;
            KernelEventKind::Fork { parent_pid: w(0), parent_tgid: w(1), child_pid: w(2), child_tgid: w(3) }
        }
        what::EXEC => {
            need(8)?;
            KernelEventKind::Exec { pid: w(0), tgid: w(1) }
        }
        what::UID => {
            need(16)?;
            KernelEventKind::Uid { pid: w(0), tgid: w(1), real: w(2), effective: w(3) }
        }
        what::GID => {
            need(16)?;
            KernelEventKind::Gid { pid: w(0), tgid: w(1), real: w(2), effective: w(3) }
        }
        what::SID => {
            need(8)?;
            KernelEventKind::Sid { pid: w(0), tgid: w(1) }
        }
        what::PTRACE => {
            need(16)?;
            KernelEventKind::Ptrace { pid: w(0), tgid: w(1), tracer_pid: w(2), tracer_tgid: w(3) }
        }
        what::COMM => {
            need(24)?;
            let raw = &d[8..24];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            KernelEventKind::Comm {
                pid: w(0),
                tgid: w(1),
                comm: String::from_utf8_lossy(&raw[..end]).into_owned(),
            }
        }
        what::COREDUMP => {
            need(16)?;
            KernelEventKind::Coredump { pid: w(0), tgid: w(1), parent_pid: w(2), parent_tgid: w(3) }
        }
        what::EXIT => {
            need(EVENT_DATA_MAX)?;
            KernelEventKind::Exit {
                pid: w(0),
                tgid: w(1),
                status: ExitStatus::from_wait_status(w(2)),
                parent_pid: w(4),
                parent_tgid: w(5),
            }
        }
        other => KernelEventKind::Unknown { what: other },
    };
    out.push(KernelEvent { at_ns, kind });
    Ok(())
}

/// The listen request: `nlmsghdr` + `cn_msg` + `PROC_CN_MCAST_LISTEN`.
fn listen_request(seq: u32) -> Vec<u8> {
    let payload = 4usize;
    let total = NLMSG_HDRLEN + CN_MSG_LEN + payload;
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(&(total as u32).to_ne_bytes());
    b.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&std::process::id().to_ne_bytes());
    b.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    b.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&(payload as u16).to_ne_bytes());
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&MCAST_LISTEN.to_ne_bytes());
    b
}

/// Whether this process sits in the initial PID and user namespaces, the
/// only place the kernel sends proc connector events to. `None` when it
/// cannot tell.
fn namespace_obstacle() -> Option<KernelEventsAvailability> {
    // `NSpid:` lists one pid per nested PID namespace.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    if nspid.split_whitespace().count() > 1 {
        return Some(KernelEventsAvailability::NotInitialPidNamespace);
    }
    // The initial user namespace maps every id onto itself.
    let map = std::fs::read_to_string("/proc/self/uid_map").ok()?;
    let full = map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
    if !full {
        return Some(KernelEventsAvailability::NotInitialPidNamespace);
    }
    None
}

/// An open, subscribed proc connector socket.
pub(crate) struct Connector {
    socket: socket2::Socket,
    buf: Vec<u8>,
    /// The receive buffer the kernel granted (its doubled figure).
    granted_rcvbuf: usize,
}

impl Connector {
    /// Opens the socket, asks for `rcvbuf` bytes of receive buffer (forced
    /// past `net.core.rmem_max` where CAP_NET_ADMIN allows), subscribes,
    /// and waits up to `ack_wait` for the kernel's acknowledgement. Events
    /// that arrive before the acknowledgement go to `early`.
    pub(crate) fn open(
        rcvbuf: usize,
        ack_wait: Duration,
        early: &mut Vec<KernelEvent>,
    ) -> Result<Connector, KernelEventsAvailability> {
        if let Some(obstacle) = namespace_obstacle() {
            return Err(obstacle);
        }
        let failed = |what: &str, e: std::io::Error| KernelEventsAvailability::Failed(format!("{what}: {e}"));
        let socket = socket2::Socket::new(
            socket2::Domain::from(nix::libc::AF_NETLINK),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::from(NETLINK_CONNECTOR)),
        )
        .map_err(|e| failed("netlink socket", e))?;
        // Reads drain until EAGAIN; waiting is `poll`'s job.
        socket.set_nonblocking(true).map_err(|e| failed("non-blocking", e))?;
        // Forced past rmem_max with CAP_NET_ADMIN; otherwise the kernel caps
        // the plain request at rmem_max.
        if nix::sys::socket::setsockopt(&socket, sockopt::RcvBufForce, &rcvbuf).is_err() {
            socket.set_recv_buffer_size(rcvbuf).map_err(|e| failed("SO_RCVBUF", e))?;
        }
        let granted_rcvbuf = socket.recv_buffer_size().unwrap_or(0);
        let addr = NetlinkAddr::new(0, CN_IDX_PROC);
        match nix::sys::socket::bind(socket.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(Errno::EPERM | Errno::EACCES) => return Err(KernelEventsAvailability::NeedsCapNetAdmin),
            Err(e) => return Err(failed("bind to CN_IDX_PROC", e.into())),
        }
        let kernel = NetlinkAddr::new(0, CN_IDX_PROC);
        let request = listen_request(1);
        match nix::sys::socket::sendto(socket.as_raw_fd(), &request, &kernel, MsgFlags::empty()) {
            Ok(_) => {}
            Err(Errno::EPERM | Errno::EACCES) => return Err(KernelEventsAvailability::NeedsCapNetAdmin),
            Err(e) => return Err(failed("listen request", e.into())),
        }
        let mut conn = Connector { socket, buf: vec![0; RECV_BUFFER], granted_rcvbuf };
        // The kernel answers the listen request with an acknowledgement
        // (PROC_EVENT_NONE); where it ignores the request (another
        // namespace) nothing comes, and nothing else ever will.
        let deadline = std::time::Instant::now() + ack_wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(KernelEventsAvailability::Failed(format!(
                    "the kernel did not acknowledge the subscription within {} ms",
                    ack_wait.as_millis()
                )));
            }
            if !conn.wait_readable(left).map_err(|e| failed("poll", e))? {
                continue;
            }
            let mut events = Vec::new();
            conn.read(&mut events, 64).map_err(|e| failed("recv", e))?;
            let mut acked = None;
            for e in events {
                match e.kind {
                    KernelEventKind::Ack { err } if acked.is_none() => acked = Some(err),
                    _ => early.push(e),
                }
            }
            match acked {
                Some(0) => return Ok(conn),
                Some(err) if err as i32 == nix::libc::EPERM => {
                    return Err(KernelEventsAvailability::NeedsCapNetAdmin);
                }
                Some(err) => {
                    return Err(KernelEventsAvailability::Failed(format!(
                        "the kernel refused the subscription: {}",
                        Errno::from_raw(err as i32)
                    )));
                }
                None => {}
            }
        }
    }

    /// The receive buffer the kernel granted, in bytes.
    pub(crate) fn receive_buffer_bytes(&self) -> usize {
        self.granted_rcvbuf
    }

    /// Waits until the socket is readable (true) or `timeout` passes
    /// (false).
    fn wait_readable(&self, timeout: Duration) -> std::io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(fds[0].revents().is_some_and(|r| !r.is_empty()))
    }

    /// Reads what is queued, without blocking, up to `max` datagrams.
    pub(crate) fn read(&mut self, out: &mut Vec<KernelEvent>, max: usize) -> std::io::Result<ReadOutcome> {
        let mut outcome = ReadOutcome::default();
        for _ in 0..max {
            match nix::sys::socket::recvfrom::<NetlinkAddr>(self.socket.as_raw_fd(), &mut self.buf) {
                Ok((n, from)) => {
                    outcome.datagrams += 1;
                    // Only the kernel (port 0) speaks for the kernel.
                    if from.is_some_and(|a| a.pid() != 0) {
                        outcome.foreign += 1;
                        continue;
                    }
                    if n >= self.buf.len() {
                        outcome.malformed += 1;
                        log::warn!("proc connector: a datagram of {n} bytes or more was refused");
                        continue;
                    }
                    if let Err(e) = parse_datagram(&self.buf[..n], out) {
                        outcome.malformed += 1;
                        log::warn!("proc connector: datagram refused: {e}");
                    }
                }
                Err(Errno::EAGAIN) => {
                    outcome.drained = true;
                    break;
                }
                Err(Errno::EINTR) => continue,
                // The receive queue overflowed: the kernel dropped events.
                Err(Errno::ENOBUFS) => outcome.overruns += 1,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(outcome)
    }
}

impl AsFd for Connector {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram as the kernel builds it for one event.
    fn datagram(what: u32, data: &[u32]) -> Vec<u8> {
        let mut ev = Vec::new();
        ev.extend_from_slice(&what.to_ne_bytes());
        ev.extend_from_slice(&1u32.to_ne_bytes());
        ev.extend_from_slice(&123_456_789u64.to_ne_bytes());
        for w in data {
            ev.extend_from_slice(&w.to_ne_bytes());
        }
        let total = NLMSG_HDRLEN + CN_MSG_LEN + ev.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(total as u32).to_ne_bytes());
        b.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        b.extend_from_slice(&[0; 10]);
        b.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        b.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&(ev.len() as u16).to_ne_bytes());
        b.extend_from_slice(&[0; 2]);
        b.extend_from_slice(&ev);
        b
    }

    fn parse(b: &[u8]) -> Result<Vec<KernelEvent>, ParseError> {
        let mut out = Vec::new();
        parse_datagram(b, &mut out).map(|()| out)
    }

    #[test]
    fn each_event_type_decodes() {
        let cases: Vec<(u32, Vec<u32>, KernelEventKind)> = vec![
            (
                what::FORK,
                vec![1, 1, 20, 20],
                KernelEventKind::Fork { parent_pid: 1, parent_tgid: 1, child_pid: 20, child_tgid: 20 },
            ),
            (what::EXEC, vec![20, 20], KernelEventKind::Exec { pid: 20, tgid: 20 }),
            (
                what::UID,
                vec![20, 20, 1000, 0],
                KernelEventKind::Uid { pid: 20, tgid: 20, real: 1000, effective: 0 },
            ),
            (
                what::GID,
                vec![20, 20, 5, 6],
                KernelEventKind::Gid { pid: 20, tgid: 20, real: 5, effective: 6 },
            ),
            (
                what::EXIT,
                vec![20, 20, 3 << 8, 17, 1, 1],
                KernelEventKind::Exit {
                    pid: 20,
                    tgid: 20,
                    status: ExitStatus::Code(3),
                    parent_pid: 1,
                    parent_tgid: 1,
                },
            ),
            (
                what::EXIT,
                vec![21, 21, 9, 17, 1, 1],
                KernelEventKind::Exit {
                    pid: 21,
                    tgid: 21,
                    status: ExitStatus::Signal { signal: 9, core_dumped: false },
                    parent_pid: 1,
                    parent_tgid: 1,
                },
            ),
            (what::NONE, vec![0, 0], KernelEventKind::Ack { err: 0 }),
            (0x1234, vec![], KernelEventKind::Unknown { what: 0x1234 }),
        ];
        for (w, data, want) in cases {
            let events = parse(&datagram(w, &data)).expect("decodes");
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].kind, want);
            assert_eq!(events[0].at_ns, 123_456_789);
        }
        // comm: 16 bytes, NUL-terminated.
        let mut data = vec![7, 7];
        let name = *b"renamed\0\0\0\0\0\0\0\0\0";
        data.extend(name.chunks(4).map(|c| u32::from_ne_bytes(c.try_into().unwrap())));
        let events = parse(&datagram(what::COMM, &data)).unwrap();
        assert_eq!(events[0].kind, KernelEventKind::Comm { pid: 7, tgid: 7, comm: "renamed".into() });
    }

    #[test]
    fn hostile_datagrams_are_errors_not_panics() {
        let good = datagram(what::EXIT, &[20, 20, 0, 17, 1, 1]);
        // Every truncation of a good datagram.
        for cut in 0..good.len() {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut} was accepted");
        }
        // A length prefix beyond the datagram, and below the header.
        let mut long = good.clone();
        long[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(parse(&long), Err(ParseError::BadLength { .. })));
        let mut tiny = good.clone();
        tiny[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(matches!(parse(&tiny), Err(ParseError::BadLength { .. })));
        // A connector payload length beyond the message.
        let mut over = good.clone();
        over[NLMSG_HDRLEN + 16..NLMSG_HDRLEN + 18].copy_from_slice(&u16::MAX.to_ne_bytes());
        assert!(matches!(parse(&over), Err(ParseError::Short { .. })));
        // Another connector, another message type, an error message.
        let mut other = good.clone();
        other[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].copy_from_slice(&2u32.to_ne_bytes());
        assert!(matches!(parse(&other), Err(ParseError::Foreign { idx: 2, .. })));
        let mut typed = good.clone();
        typed[4..6].copy_from_slice(&0x10u16.to_ne_bytes());
        assert!(matches!(parse(&typed), Err(ParseError::Foreign { nl_type: 0x10, .. })));
        let mut err = good.clone();
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(matches!(parse(&err), Err(ParseError::NetlinkError { .. })));
        // An exit event whose union is cut short, with a consistent length.
        let short_exit = datagram(what::EXIT, &[20, 20]);
        assert!(matches!(parse(&short_exit), Err(ParseError::Short { .. })));
        // Oversized: two messages in one datagram decode both; trailing
        // garbage shorter than a header is ignored.
        let mut two = datagram(what::EXEC, &[5, 5]);
        two.extend_from_slice(&datagram(what::EXEC, &[6, 6]));
        two.extend_from_slice(&[0xff; 7]);
        assert_eq!(parse(&two).unwrap().len(), 2);
        assert!(parse(&[0xff; 4096]).is_err());
    }

    /// Random bytes never panic the parser.
    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let good = datagram(what::FORK, &[1, 1, 2, 2]);
        for _ in 0..20_000 {
            let mut b = good.clone();
            let flips = (next() % 6) as usize;
            for _ in 0..flips {
                let at = (next() as usize) % b.len();
                b[at] = next() as u8;
            }
            let cut = (next() as usize) % (b.len() + 1);
            let _ = parse(&b[..cut]);
        }
    }

    #[test]
    fn the_listen_request_has_the_kernels_layout() {
        let r = listen_request(9);
        assert_eq!(r.len(), 40);
        assert_eq!(u32_at(&r, 0), Some(40));
        assert_eq!(u16_at(&r, 4), Some(NLMSG_DONE));
        assert_eq!((u32_at(&r, 16), u32_at(&r, 20)), (Some(CN_IDX_PROC), Some(CN_VAL_PROC)));
        assert_eq!(u16_at(&r, 32), Some(4));
        assert_eq!(u32_at(&r, 36), Some(MCAST_LISTEN));
    }
}
