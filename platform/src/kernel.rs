//! Process events pushed by the kernel, as opposed to enumeration.
//!
//! A [`KernelEventSource`] delivers fork, exec, exit (with the exit code or
//! signal), credential and name changes as they happen, so a process that
//! lives a millisecond is still seen, and reads a process's details at
//! once ([`KernelEventSource::read_process`]) while it still exists.
//!
//! Backends:
//!
//! - Linux: the proc connector (netlink `NETLINK_CONNECTOR`, group
//!   `CN_IDX_PROC`); no eBPF, no auditd. The kernel sends its events to
//!   CAP_NET_ADMIN only (on 6.18 as on older kernels, an unprivileged
//!   subscription is refused with EPERM), and only to the
//!   initial PID and user namespaces.
//! - FreeBSD and macOS (not built yet): kqueue `EVFILT_PROC`. It fits the
//!   same interface: the kqueue descriptor is what [`KernelEventSource::wait`]
//!   polls; `NOTE_EXIT` (with the wait status in `data`) maps to
//!   [`KernelEventKind::Exit`], `NOTE_EXEC` to `Exec`, `NOTE_FORK` to
//!   `Fork`; FreeBSD's `NOTE_TRACK` attaches the filter to every child by
//!   itself (a `NOTE_CHILD` event names the parent), while macOS must
//!   register each new pid it learns from the periodic enumeration, which
//!   [`KernelEventSource::watch`] is for (a no-op on Linux). kqueue has no
//!   credential events: those stay with the poll.
//! - Elsewhere: [`KernelEventsAvailability::NotThisOs`].

#[cfg(target_os = "linux")]
use std::time::Duration;
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[cfg(target_os = "linux")]
use crate::record::Unavailable;
use crate::record::{ExitStatus, ProcessRecord};

/// One event from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEvent {
    /// When it happened: `CLOCK_MONOTONIC` nanoseconds (see
    /// [`KernelEventSource::unix_ms_at`]).
    pub at_ns: u64,
    /// What happened.
    pub kind: KernelEventKind,
}

/// What the kernel reported. `pid` is the thread id and `tgid` the process
/// id: events of threads other than a process's main thread (`pid != tgid`)
/// are about threads.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelEventKind {
    /// A task was created: a process when `child_pid == child_tgid`, else a
    /// thread of `child_tgid`.
    Fork {
        /// The forking thread.
        parent_pid: u32,
        /// Its process.
        parent_tgid: u32,
        /// The new task.
        child_pid: u32,
        /// The new task's process.
        child_tgid: u32,
    },
    /// A process executed a new program.
    Exec {
        /// The thread.
        pid: u32,
        /// Its process.
        tgid: u32,
    },
    /// Real and effective user ids changed.
    Uid {
        /// The thread.
        pid: u32,
        /// Its process.
        tgid: u32,
        /// The new real id.
        real: u32,
        /// The new effective id.
        effective: u32,
    },
    /// Real and effective group ids changed.
    Gid {
        /// The thread.
        pid: u32,
        /// Its process.
        tgid: u32,
        /// The new real id.
        real: u32,
        /// The new effective id.
        effective: u32,
    },
    /// A new session.
    Sid {
        /// The thread.
        pid: u32,
        /// Its process.
        tgid: u32,
    },
    /// Attached to or detached from a tracer.
    Ptrace {
        /// The thread.
        pid: u32,
        /// Its process.
        tgid: u32,
        /// The tracer (0 on detach).
        tracer_pid: u32,
        /// The tracer's process.
        tracer_tgid: u32,
    },
    /// The name changed (`prctl(PR_SET_NAME)`, a write to `comm`).
    Comm {
        /// The thread.
        pid: u32,
        /// Its process.
        tgid: u32,
        /// The new name.
        comm: String,
    },
    /// A core dump was written.
    Coredump {
        /// The thread.
        pid: u32,
        /// Its process.
        tgid: u32,
        /// Its parent thread.
        parent_pid: u32,
        /// Its parent process.
        parent_tgid: u32,
    },
    /// A task exited: the process when `pid == tgid`.
    Exit {
        /// The thread.
        pid: u32,
        /// Its process.
        tgid: u32,
        /// How it ended.
        status: ExitStatus,
        /// The parent thread.
        parent_pid: u32,
        /// The parent process.
        parent_tgid: u32,
    },
    /// The answer to the subscription (`err` 0: accepted).
    Ack {
        /// The error number, 0 for success.
        err: u32,
    },
    /// A type this build does not know (ignored).
    Unknown {
        /// The kernel's type code.
        what: u32,
    },
}

/// Whether kernel process events can be had here, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum KernelEventsAvailability {
    /// Subscribed and acknowledged by the kernel.
    Available,
    /// The kernel refused an unprivileged subscription: CAP_NET_ADMIN is
    /// needed (an ambient capability is enough).
    NeedsCapNetAdmin,
    /// Not in the initial PID and user namespaces (a container): the
    /// kernel sends them nowhere else.
    NotInitialPidNamespace,
    /// This OS has no backend yet.
    NotThisOs,
    /// Something else failed (the reason).
    Failed(String),
}

impl std::fmt::Display for KernelEventsAvailability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelEventsAvailability::Available => f.write_str("available"),
            KernelEventsAvailability::NeedsCapNetAdmin => {
                f.write_str("needs CAP_NET_ADMIN (the kernel refused an unprivileged subscription)")
            }
            KernelEventsAvailability::NotInitialPidNamespace => {
                f.write_str("not in the initial PID namespace (the kernel sends process events only there)")
            }
            KernelEventsAvailability::NotThisOs => f.write_str("no kernel process event backend on this OS"),
            KernelEventsAvailability::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// How a source is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSourceConfig {
    /// Receive buffer to ask for, in bytes. The kernel drops events (an
    /// overrun, counted) when it is full.
    pub receive_buffer_bytes: usize,
    /// Longest command line read per process.
    pub max_argv_bytes: usize,
    /// Read each process's working directory (else `NotCollected`).
    pub read_cwd: bool,
}

impl Default for KernelSourceConfig {
    fn default() -> Self {
        KernelSourceConfig { receive_buffer_bytes: 4 << 20, max_argv_bytes: 32 * 1024, read_cwd: true }
    }
}

/// What one [`KernelEventSource::read`] found besides events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// Datagrams received.
    pub datagrams: u64,
    /// Times the kernel reported a full receive buffer: events were lost.
    pub overruns: u64,
    /// Datagrams refused by the parser (logged).
    pub malformed: u64,
    /// Datagrams from a sender other than the kernel (dropped).
    pub foreign: u64,
    /// Nothing more was queued when the read ended.
    pub drained: bool,
}

/// What [`KernelEventSource::wait`] returned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// Events are queued.
    Readable,
    /// [`KernelWaker::wake`] was called.
    Woken,
    /// The timeout passed.
    Timeout,
}

/// Wakes a thread blocked in [`KernelEventSource::wait`] (to stop it).
#[derive(Clone)]
pub struct KernelWaker {
    #[cfg(target_os = "linux")]
    write: std::sync::Arc<std::os::fd::OwnedFd>,
}

impl KernelWaker {
    /// Wakes the waiting thread; harmless if it is not waiting.
    pub fn wake(&self) {
        #[cfg(target_os = "linux")]
        {
            // A full pipe already wakes it.
            let _ = nix::unistd::write(self.write.as_ref(), &[1]);
        }
    }
}

/// A subscription to the kernel's process events, plus a reader of
/// `/proc/<pid>` for the processes they name.
pub struct KernelEventSource {
    #[cfg(target_os = "linux")]
    conn: crate::cnproc::Connector,
    #[cfg(target_os = "linux")]
    reader: crate::procfs::ProcFs,
    #[cfg(target_os = "linux")]
    wake_read: std::os::fd::OwnedFd,
    #[cfg(target_os = "linux")]
    waker: KernelWaker,
    /// Wakes [`KernelEventSource::wait`] at its deadline.
    #[cfg(target_os = "linux")]
    timer: nix::sys::timerfd::TimerFd,
    /// When `timer` fires, if it is set.
    #[cfg(target_os = "linux")]
    armed: Option<Instant>,
    /// Events that came with the subscription's acknowledgement.
    early: Vec<KernelEvent>,
}

impl KernelEventSource {
    /// Subscribes. The error says why kernel events cannot be had here.
    pub fn open(cfg: KernelSourceConfig) -> Result<KernelEventSource, KernelEventsAvailability> {
        #[cfg(target_os = "linux")]
        {
            let mut early = Vec::new();
            let conn =
                crate::cnproc::Connector::open(cfg.receive_buffer_bytes, Duration::from_secs(2), &mut early)?;
            let failed = |what: &str, e: &dyn std::fmt::Display| {
                KernelEventsAvailability::Failed(format!("{what}: {e}"))
            };
            let mut reader = crate::procfs::ProcFs::new().map_err(|e| failed("/proc", &e))?;
            reader.set_max_argv_bytes(cfg.max_argv_bytes);
            reader.set_read_cwd(cfg.read_cwd);
            let (wake_read, write) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| failed("pipe", &e))?;
            let waker = KernelWaker { write: std::sync::Arc::new(write) };
            use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
            let timer =
                TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)
                    .map_err(|e| failed("timerfd", &e))?;
            Ok(KernelEventSource { conn, reader, wake_read, waker, timer, armed: None, early })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = cfg;
            Err(KernelEventsAvailability::NotThisOs)
        }
    }

    /// Name of the backend ("linux-cn_proc").
    pub fn backend(&self) -> &'static str {
        "linux-cn_proc"
    }

    /// The receive buffer the kernel granted, in bytes (0 if unknown).
    pub fn receive_buffer_bytes(&self) -> usize {
        #[cfg(target_os = "linux")]
        {
            self.conn.receive_buffer_bytes()
        }
        #[cfg(not(target_os = "linux"))]
        {
            0
        }
    }

    /// A handle that wakes [`KernelEventSource::wait`].
    pub fn waker(&self) -> KernelWaker {
        #[cfg(target_os = "linux")]
        {
            self.waker.clone()
        }
        #[cfg(not(target_os = "linux"))]
        {
            KernelWaker {}
        }
    }

    /// Blocks until events are queued, the waker is called, or `deadline`
    /// passes (`None`: no deadline).
    ///
    /// The deadline is kept by a timer descriptor that is set only when a
    /// deadline earlier than the one it holds comes, not by `poll`'s
    /// timeout: a timeout arms and cancels a kernel timer at every call,
    /// which on a virtual machine (where programming the timer leaves the
    /// guest) cost this thread 40% of its time in an exec storm of three
    /// wake-ups per process. A later deadline leaves the timer as it is: it
    /// fires early, and the caller simply waits again.
    pub fn wait(&mut self, deadline: Option<Instant>) -> std::io::Result<Wakeup> {
        if !self.early.is_empty() {
            return Ok(Wakeup::Readable);
        }
        #[cfg(target_os = "linux")]
        {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            use std::os::fd::AsFd;
            let now = Instant::now();
            let timeout = match deadline {
                // Due already: a zero timeout arms no timer.
                Some(d) if d <= now => PollTimeout::ZERO,
                Some(d) => {
                    self.arm(d, now)?;
                    PollTimeout::NONE
                }
                None => PollTimeout::NONE,
            };
            let mut fds = [
                PollFd::new(self.conn.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake_read.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.timer.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let [socket, woken, timer] = fds.map(|fd| fd.revents().is_some_and(|r| !r.is_empty()));
            if woken {
                // Emptied so the next wait blocks.
                let mut drained = [0u8; 64];
                let _ = nix::unistd::read(&self.wake_read, &mut drained);
            }
            if timer {
                // Non-blocking: consumes the expiry.
                let _ = self.timer.wait();
                self.armed = None;
            }
            // A wake-up first: the pipe is emptied now, and queued events
            // make the next wait return at once.
            Ok(if woken {
                Wakeup::Woken
            } else if socket {
                Wakeup::Readable
            } else {
                Wakeup::Timeout
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = deadline;
            Ok(Wakeup::Timeout)
        }
    }

    /// Sets the timer to fire at `deadline` unless it fires no later
    /// already.
    #[cfg(target_os = "linux")]
    fn arm(&mut self, deadline: Instant, now: Instant) -> std::io::Result<()> {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        if self.armed.is_some_and(|armed| armed <= deadline) {
            return Ok(());
        }
        let after =
            TimeSpec::from_duration(deadline.saturating_duration_since(now).max(Duration::from_nanos(1)));
        self.timer.set(Expiration::OneShot(after), TimerSetTimeFlags::empty())?;
        self.armed = Some(deadline);
        Ok(())
    }

    /// Appends what is queued to `out` without blocking, reading at most
    /// `max_datagrams` (so a caller can interleave other work in a storm).
    pub fn read(&mut self, out: &mut Vec<KernelEvent>, max_datagrams: usize) -> std::io::Result<ReadOutcome> {
        out.append(&mut self.early);
        #[cfg(target_os = "linux")]
        {
            self.conn.read(out, max_datagrams)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = max_datagrams;
            Ok(ReadOutcome { drained: true, ..ReadOutcome::default() })
        }
    }

    /// Asks for events about `pid`, where the backend must register each
    /// process (kqueue without `NOTE_TRACK`). The proc connector reports
    /// every process by itself, so on Linux this does nothing.
    pub fn watch(&mut self, pid: u32) {
        let _ = pid;
    }

    /// Reads process `pid` now, with its exec-time details, through one
    /// opened process directory: `Vanished` if it is gone, or if the pid
    /// now names another process than the one whose `stat` was read first.
    pub fn read_process(&mut self, pid: u32) -> Result<ProcessRecord, crate::record::Unavailable> {
        #[cfg(target_os = "linux")]
        {
            self.reader.read_fresh(pid)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = pid;
            Err(crate::record::Unavailable::NotSupported)
        }
    }

    /// Reads only the scheduler fields of `pid` (`stat`; a zombie still
    /// has them), with every detail `Vanished`.
    pub fn read_brief(&mut self, pid: u32) -> Result<ProcessRecord, crate::record::Unavailable> {
        #[cfg(target_os = "linux")]
        {
            self.reader.read_brief(pid).ok_or(Unavailable::Vanished)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = pid;
            Err(crate::record::Unavailable::NotSupported)
        }
    }

    /// The start time (in the enumeration's unit, see
    /// [`ProcessRecord::start_time`]) of a process created at `at_ns`
    /// (`CLOCK_MONOTONIC`): for a process gone before it could be read.
    pub fn start_time_at(&self, at_ns: u64) -> u64 {
        #[cfg(target_os = "linux")]
        {
            self.reader.start_time_at_monotonic(at_ns)
        }
        #[cfg(not(target_os = "linux"))]
        {
            at_ns / 1_000_000_000
        }
    }

    /// Unix milliseconds of the monotonic instant `at_ns`.
    pub fn unix_ms_at(&self, at_ns: u64) -> u64 {
        crate::clock::unix_ms_at_monotonic(at_ns)
    }
}

/// Raises the calling thread's scheduling priority by `by` nice levels
/// (as auditd's `priority_boost` does), so a thread that must read each
/// process before it exits is not kept waiting by busy ones. Needs
/// CAP_SYS_NICE (root has it); returns the new nice value, or why not.
pub fn raise_thread_priority(by: i32) -> Result<i32, String> {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        let now = rustix::process::getpriority_process(Some(tid)).map_err(|e| e.to_string())?;
        let want = (now - by).max(-20);
        rustix::process::setpriority_process(Some(tid), want).map_err(|e| e.to_string())?;
        Ok(want)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = by;
        Err("not supported on this OS".into())
    }
}

/// Whether kernel process events can be had by this process, by opening
/// and closing a subscription.
pub fn kernel_events_availability() -> KernelEventsAvailability {
    match KernelEventSource::open(KernelSourceConfig { receive_buffer_bytes: 64 << 10, ..Default::default() })
    {
        Ok(_) => KernelEventsAvailability::Available,
        Err(why) => why,
    }
}
