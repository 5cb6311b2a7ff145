//! A frozen copy of the version 1 contract: the payload and record types as
//! they were before `daemoneye-contract` (when they lived in procmond and
//! platform), copied verbatim (doc comments kept, methods dropped). Version
//! 1 is plain postcard of these structs with no header. The skew tests
//! write with these and read with the current code; nothing here may ever
//! change.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A value, or the reason it is missing.
pub type Field<T> = Result<T, Unavailable>;

/// Encodes a version 1 payload or record: plain postcard, no header.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("plain data encodes")
}

/// Decodes a version 1 payload or record, as a version 1 peer did
/// (postcard, trailing bytes ignored).
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// Why a field has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Unavailable {
    /// The OS refused (another user's process without the capability).
    NotPermitted,
    /// This OS or backend does not provide the field.
    NotSupported,
    /// The process exited while it was being read.
    Vanished,
    /// The field does not exist for this process (a kernel thread has no
    /// executable; a zombie has no command line).
    NotApplicable,
    /// An unexpected read error (logged where it happened).
    Failed,
    /// Readable, but left out by configuration (procmond without
    /// `--enhanced-metadata`).
    NotCollected,
}

/// Identity of an executable file: enough to know whether it is the same
/// file, unchanged, without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Device id.
    pub dev: u64,
    /// Inode number.
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Status change time, seconds since the epoch.
    pub ctime: i64,
}

/// A command line as the process set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argv {
    /// The arguments, program first; non-UTF-8 bytes replaced.
    pub args: Vec<String>,
    /// True when the command line was longer than the reader's cap and was
    /// cut.
    pub truncated: bool,
}

/// The scheduler state of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ProcessState {
    /// Running or runnable.
    Running,
    /// Interruptible sleep.
    Sleeping,
    /// Uninterruptible (disk) sleep.
    DiskSleep,
    /// Stopped by a signal.
    Stopped,
    /// Stopped by a tracer.
    Traced,
    /// Exited, not yet reaped.
    Zombie,
    /// Being torn down.
    Dead,
    /// An idle kernel thread.
    Idle,
    /// A state this crate does not name (the OS letter).
    Other(char),
}

/// The credentials of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Real user id.
    pub uid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Real group id.
    pub gid: u32,
    /// Effective group id.
    pub egid: u32,
}

/// The parts of a process that change only on exec or a credential change.
/// Backends read them once per identity and share them between cycles, so
/// a steady cycle neither re-reads nor re-allocates them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessDetails {
    /// Path of the executable (without the " (deleted)" marker).
    pub exe: Field<PathBuf>,
    /// Identity of the executable file.
    pub exe_file: Field<FileIdentity>,
    /// The executable was deleted or replaced on disk while running.
    pub exe_deleted: Field<bool>,
    /// The command line.
    pub argv: Field<Argv>,
    /// Working directory when the details were read (it is not followed
    /// through later `chdir` calls).
    pub cwd: Field<PathBuf>,
    /// Real and effective user and group ids, as of exec or the last
    /// change of the effective ids (Linux backend: a change of only the
    /// real ids is seen at the next exec or effective-id change).
    pub credentials: Field<Credentials>,
    /// Name of the real user.
    pub user: Field<String>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code (0–255).
    Code(i32),
    /// A signal ended it.
    Signal {
        /// The signal number.
        signal: u32,
        /// A core dump was written.
        core_dumped: bool,
    },
}

/// One process, as one enumeration cycle saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Process id.
    pub pid: u32,
    /// Parent process id (0 for the roots).
    pub ppid: u32,
    /// Start time, the identity half that survives pid reuse. Linux `/proc`
    /// backend: clock ticks since boot. sysinfo backend: seconds since the
    /// epoch. Compare start times only within one backend.
    pub start_time: u64,
    /// Start time in seconds since the epoch, for people.
    pub started_unix: Field<u64>,
    /// Short process name (Linux: `comm`, cut to 15 bytes for programs,
    /// possibly mid-character; kernel threads' names can be longer and
    /// follow their current work queue).
    pub name: String,
    /// Scheduler state.
    pub state: ProcessState,
    /// Session id.
    pub session: Field<u32>,
    /// Number of threads.
    pub threads: Field<u32>,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// Virtual size in bytes.
    pub virtual_bytes: u64,
    /// User plus system CPU time in milliseconds.
    pub cpu_time_ms: Field<u64>,
    /// A kernel thread (no executable, no command line).
    pub kernel_thread: bool,
    /// Exec-time details, shared between cycles.
    pub details: Arc<ProcessDetails>,
}

/// What happened to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// A process appeared (or was running when collection began, with
    /// `snapshot` set).
    Started,
    /// A process exited.
    Stopped,
    /// A process changed under the same identity (see [`Change`]).
    Modified,
}

/// Why a process counts as modified. One event may carry several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Change {
    /// It executed a new program (name, exe path or exe inode changed).
    Exec,
    /// Its real or effective uid or gid changed.
    Credentials,
    /// Its parent changed (the parent exited and it was re-parented).
    Reparent,
    /// The file at its executable's path was replaced (new inode or
    /// content) while it kept running the old one.
    ExeReplaced,
    /// Its executable was deleted while it runs.
    ExeDeleted,
    /// Its command line was rewritten (setproctitle); off by default.
    CommandLine,
}

/// The result of hashing a process's executable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashOutcome {
    /// The lowercase hex SHA-256 of the file.
    Sha256(String),
    /// The file is larger than the configured cap and was not read.
    TooLarge {
        /// The file's size in bytes.
        size: u64,
        /// The cap in bytes.
        cap: u64,
    },
    /// This cycle's hashing time budget ran out; a later cycle may hash it.
    Deferred,
    /// The file could not be read (or the process has no executable).
    Unavailable(Unavailable),
}

/// Which path of the collector saw an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum EventSource {
    /// The periodic enumeration: the first snapshot, and in kernel mode
    /// what reconciliation caught that the kernel path missed.
    #[default]
    Poll,
    /// The kernel's process events, as they happened.
    Kernel,
}

/// When a change that happened while the collector was not running took
/// place: somewhere after `after_unix_ms` and before `before_unix_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateWindow {
    /// The last moment the collector knew the earlier state (Unix ms).
    pub after_unix_ms: u64,
    /// When the collector saw the new state after its restart (Unix ms).
    pub before_unix_ms: u64,
}

/// One lifecycle event of one process.
///
/// Encoding: postcard, fields in this order. Version 2 appended `source`,
/// `late` and `exit`; a version 1 record (without them) still decodes, as
/// `source: Poll`, not late, no exit status (see [`ProcessEvent::decode`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEvent {
    /// What happened.
    pub kind: EventKind,
    /// Part of the snapshot of processes already running when collection
    /// began (only on `Started`).
    pub snapshot: bool,
    /// Why a `Modified` event was raised; empty otherwise.
    pub changes: Vec<Change>,
    /// When the collector saw it (Unix milliseconds).
    pub observed_unix_ms: u64,
    /// The process as last seen, with its command line sanitized. For
    /// `Stopped`, the last record seen before it exited.
    pub process: ProcessRecord,
    /// SHA-256 of the executable; `None` when hashing is off (or, for
    /// `Stopped` and non-exec `Modified`, not recomputed).
    pub sha256: Option<HashOutcome>,
    /// The path that saw it.
    pub source: EventSource,
    /// Set when it happened while the collector was down (found at its
    /// restart), with the window it happened in.
    pub late: Option<LateWindow>,
    /// How the process ended (`Stopped` from the kernel path only; the
    /// poll cannot know).
    pub exit: Option<ExitStatus>,
}

/// An event with its place in the collector's stream: the bus and WAL
/// payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// The collector that saw it.
    pub collector_id: String,
    /// The stream: fixed for the life of one WAL directory (standalone: 0).
    pub stream_id: u64,
    /// Position in the stream, from 1, never reused; the store keeps each
    /// `(collector_id, stream_id, seq)` once.
    pub seq: u64,
    /// The event.
    pub event: ProcessEvent,
}

/// Events of a stream that will never come: their WAL records were
/// damaged (CRC-checked, reported) or do not decode. Published on
/// [`GAP_TOPIC`] in sequence order, so the store can count the lost
/// sequence numbers as settled and its watermark (and the collector's WAL
/// truncation) can move past them, instead of waiting forever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamGap {
    /// The collector.
    pub collector_id: String,
    /// The stream.
    pub stream_id: u64,
    /// First lost sequence number.
    pub from: u64,
    /// Last lost sequence number (inclusive).
    pub to: u64,
    /// Why, for the record.
    pub reason: String,
}

/// A broadcast (or direct) command from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LifecycleCommand {
    /// The agent is ready (every collector registered, privileges dropped):
    /// start collecting.
    BeginMonitoring,
}

/// A collector's registration or deregistration, published as a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistrationMessage {
    /// "I am here": sent at startup and after every reconnection.
    Register(RegistrationRequest),
    /// "I am leaving": sent during a graceful shutdown.
    Deregister {
        /// Who leaves.
        collector_id: String,
        /// Why, for the agent's log.
        reason: String,
    },
}

/// What a collector tells the agent about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationRequest {
    /// Unique id on the bus ("procmond" by default).
    pub collector_id: String,
    /// The kind of collector ("process-monitor").
    pub collector_type: String,
    /// The collector's version.
    pub version: String,
    /// What it can do on this host: `backend:<name>`, `field:<name>` for
    /// each supported record field, `privileged` when it can read every
    /// process, `hashing` when hashing is on.
    pub capabilities: Vec<String>,
    /// Its process id.
    pub pid: u32,
    /// How often it will send heartbeats, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// The event stream its WAL carries (so the store can report its
    /// watermark).
    pub stream_id: u64,
}

/// The agent's answer to a registration message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationResponse {
    /// Accepted or rejected.
    pub status: RegistrationStatus,
    /// Why, when rejected.
    pub message: Option<String>,
    /// The agent is past its loading phase: start collecting now (a
    /// late or restarted collector gets no broadcast).
    pub begin_monitoring: bool,
    /// What the store already committed for this collector's stream, so
    /// the collector can truncate its WAL at once.
    pub acknowledged_through: Option<u64>,
}

/// Whether a registration was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistrationStatus {
    /// Welcome.
    Accepted,
    /// Refused (unknown id, duplicate, bad version).
    Rejected,
}

/// A periodic sign of life with real metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Who sends it.
    pub collector_id: String,
    /// Rises by one per heartbeat from 1 for the life of the process.
    pub sequence: u64,
    /// When it was sent (Unix milliseconds).
    pub timestamp_unix_ms: u64,
    /// The collector's own verdict.
    pub status: HealthStatus,
    /// Counters.
    pub metrics: HeartbeatMetrics,
}

/// A collector's verdict on its own health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Collecting and delivering.
    Healthy,
    /// Working, but behind or slowed (backpressure, errors in the last
    /// cycle, deferred hashes).
    Degraded,
    /// Not collecting (WAL failure, stopped).
    Unhealthy,
}

/// The numbers behind a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatMetrics {
    /// Processes seen in the last cycle.
    pub processes_collected: u64,
    /// Events handed to the bus since start.
    pub events_published: u64,
    /// Fill of the in-memory send buffer, 0–100.
    pub buffer_level_percent: f64,
    /// Whether the bus connection is up.
    pub connection_status: ConnectionStatus,
    /// Collection cycles completed since start.
    pub cycles: u64,
    /// Errors since start.
    pub errors: u64,
    /// Tasks answered since start (see [`HealthData::tasks_served`]).
    pub tasks_served: u64,
    /// Tasks failed since start (see [`HealthData::tasks_failed`]).
    pub tasks_failed: u64,
    /// Mean task latency in microseconds.
    pub task_latency_avg_us: u64,
    /// The event source in use and its counters.
    pub event_source: EventSourceStatus,
}

/// Where a collector's events come from, and how well that goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSourceStatus {
    /// `Kernel`: the kernel's process events, reconciled by the periodic
    /// walk; `Poll`: the periodic walk alone.
    pub source: EventSource,
    /// Why the kernel source is not in use when it was wanted (`--events
    /// auto` fell back to polling), e.g. "needs CAP_NET_ADMIN".
    pub fallback_reason: Option<String>,
    /// Kernel events received since start.
    pub kernel_events: u64,
    /// Times the kernel reported its queue for us full (events lost).
    pub overruns: u64,
    /// Early reconciliations run to recover from lost events (overruns,
    /// batches the actor could not take).
    pub resyncs: u64,
    /// Processes the kernel path missed and the walk reported (started,
    /// stopped or modified, with source `poll`).
    pub caught_by_poll: u64,
}

/// The collector's link to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionStatus {
    /// Welcomed by the broker.
    Connected,
    /// Retrying with backoff.
    Disconnected,
    /// Standalone mode: no broker by design.
    Standalone,
}

/// The store's acknowledgement: every event of `stream_id` up to and
/// including `through` is committed; the collector may drop them from its
/// WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreAck {
    /// The stream acknowledged.
    pub stream_id: u64,
    /// The highest sequence number committed with no gap below it.
    pub through: u64,
}
