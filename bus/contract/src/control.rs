//! Control-plane messages between collectors and the agent: registration,
//! heartbeats, RPC, lifecycle commands and store acknowledgements. procmond
//! and the agent both use this module, so the two sides cannot drift. Every
//! type here is a wire type (serde; [`crate::codec`] on the bus).
//!
//! Topics (design.md §4): each with its payload type and publisher role
//! in [`crate::topic`]; the helpers below name the concrete topics.
//!
//! Tasks: the agent publishes a [`TaskRequest`] as a request on
//! [`task_topic`] of a collector type; every collector of that type is a
//! member of the queue group [`TASK_GROUP`], so the broker hands each task
//! to exactly one of them. That one answers on the request's reply inbox
//! with a [`TaskResponse`]: who served it, a [`TaskStatus`], a reason for
//! anything but `Ok`, and the [`TaskResult`]. An undecodable task gets a
//! `Failed` reply ("malformed task: …"); the collector keeps serving.
//! A `Failed` answer with `retry` set (busy, not collecting yet, shutting
//! down) says another member may well succeed: the agent then fails over.
//! The agent picks the balancing strategy per request (the bus lets a
//! request override its group's). For an answer from every collector the
//! agent sends the same request on [`task_broadcast_topic`], to which each
//! collector subscribes on its own.

use std::path::{Path, PathBuf};

use daemoneye_platform::{Field, ProcessKey, ProcessRecord, ProcessState};
use serde::{Deserialize, Serialize};

use crate::codec::{self, Kind, Message, Version};

use crate::event::{HashOutcome, StreamPosition};

/// Lifecycle commands, broadcast by the agent.
pub const LIFECYCLE_TOPIC: &str = crate::topic::LIFECYCLE.pattern();
/// Registration and deregistration requests.
pub const REGISTRATION_TOPIC: &str = crate::topic::REGISTRATION.pattern();
/// Heartbeats of every collector (the agent's subscription).
pub const HEARTBEAT_PATTERN: &str = crate::topic::HEARTBEATS.pattern();

/// The RPC topic of one collector.
pub fn rpc_topic(collector_id: &str) -> String {
    crate::topic::COLLECTOR_RPC.at(collector_id)
}

/// The heartbeat topic of one collector.
pub fn heartbeat_topic(collector_id: &str) -> String {
    crate::topic::HEARTBEATS.at(collector_id)
}

/// The bus client id of the agent's store writer: the only sender whose
/// [`StoreAck`]s a collector takes (the broker vouches for `from`, and
/// welcomes this id only from the agent's own process).
pub use crate::ids::STORE_CLIENT_ID;

/// The topic on which the agent's store acknowledges one collector's events.
pub fn ack_topic(collector_id: &str) -> String {
    crate::topic::ACKS.at(collector_id)
}

/// The queue group every collector joins on its type's task topic.
pub const TASK_GROUP: &str = "collectors";

/// The task topic of one collector type (`process-monitor` for procmond).
pub fn task_topic(collector_type: &str) -> String {
    crate::topic::TASKS.at(collector_type)
}

/// The topic on which every collector of a type gets a task (and each
/// answers it).
pub fn task_broadcast_topic(collector_type: &str) -> String {
    crate::topic::TASKS_ALL.at(collector_type)
}

/// Encodes a control message in the current version ([`crate::codec`]).
pub fn encode<T: Message>(msg: &T) -> Vec<u8> {
    codec::encode(msg)
}

/// Decodes a control message of any version this build reads; a
/// malformed payload is an error, never a panic.
pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, codec::Error> {
    codec::decode(bytes)
}

macro_rules! messages {
    ($($t:ty => $k:ident),* $(,)?) => {
        $(impl Message for $t { const KIND: Kind = Kind::$k; })*
    };
}

messages! {
    LifecycleCommand => LifecycleCommand,
    RegistrationResponse => RegistrationResponse,
    RpcRequest => RpcRequest,
    RpcResponse => RpcResponse,
    StoreAck => StoreAck,
    TaskRequest => TaskRequest,
    TaskResponse => TaskResponse,
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
    /// Where that stream stands (version 3): its base and next sequence
    /// number. `None` from an older collector.
    pub position: Option<StreamPosition>,
}

/// The version 1 and 2 layout of [`RegistrationRequest`].
#[derive(Serialize, Deserialize)]
struct RegistrationRequestV2 {
    collector_id: String,
    collector_type: String,
    version: String,
    capabilities: Vec<String>,
    pid: u32,
    heartbeat_interval_ms: u64,
    stream_id: u64,
}

/// The version 1 and 2 layout of [`RegistrationMessage`].
#[derive(Serialize, Deserialize)]
enum RegistrationMessageV2 {
    Register(RegistrationRequestV2),
    Deregister { collector_id: String, reason: String },
}

impl From<RegistrationMessageV2> for RegistrationMessage {
    fn from(v2: RegistrationMessageV2) -> RegistrationMessage {
        match v2 {
            RegistrationMessageV2::Register(r) => RegistrationMessage::Register(RegistrationRequest {
                collector_id: r.collector_id,
                collector_type: r.collector_type,
                version: r.version,
                capabilities: r.capabilities,
                pid: r.pid,
                heartbeat_interval_ms: r.heartbeat_interval_ms,
                stream_id: r.stream_id,
                position: None,
            }),
            RegistrationMessageV2::Deregister { collector_id, reason } => {
                RegistrationMessage::Deregister { collector_id, reason }
            }
        }
    }
}

impl Message for RegistrationMessage {
    const KIND: Kind = Kind::RegistrationMessage;

    fn decode_v1(body: &[u8]) -> Result<RegistrationMessage, codec::Error> {
        codec::strict::<RegistrationMessageV2>(Kind::RegistrationMessage, codec::LEGACY_VERSION, body)
            .map(Into::into)
    }

    fn decode_v2(body: &[u8]) -> Result<RegistrationMessage, codec::Error> {
        codec::strict::<RegistrationMessageV2>(Kind::RegistrationMessage, codec::V2_VERSION, body)
            .map(Into::into)
    }

    fn encode_body(&self, version: Version, out: Vec<u8>) -> Vec<u8> {
        if version == Version::V3 {
            return codec::body(self, out);
        }
        let old = match self.clone() {
            RegistrationMessage::Register(r) => RegistrationMessageV2::Register(RegistrationRequestV2 {
                collector_id: r.collector_id,
                collector_type: r.collector_type,
                version: r.version,
                capabilities: r.capabilities,
                pid: r.pid,
                heartbeat_interval_ms: r.heartbeat_interval_ms,
                stream_id: r.stream_id,
            }),
            RegistrationMessage::Deregister { collector_id, reason } => {
                RegistrationMessageV2::Deregister { collector_id, reason }
            }
        };
        codec::body(&old, out)
    }
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
    /// How delivery of its stream stands (version 3; `None` from an older
    /// collector or in standalone mode).
    pub delivery: Option<DeliveryStatus>,
}

/// How a collector's delivery to the store stands: the lag the agent
/// watches (an acknowledgement stall is a failure) and the WAL's cap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryStatus {
    /// The stream.
    pub stream_id: u64,
    /// Its base and next sequence number.
    pub base: u64,
    /// The next sequence number the collector will assign.
    pub next: u64,
    /// Events appended and not yet acknowledged by the store.
    pub unacknowledged: u64,
    /// How long the oldest of them has waited (ms; 0 when none). Records
    /// found in the WAL at startup count from the collector's start.
    pub oldest_unacknowledged_ms: u64,
    /// Bytes of WAL segments on disk.
    pub wal_bytes: u64,
    /// The WAL's size cap in bytes.
    pub wal_cap_bytes: u64,
    /// The WAL is at its cap now: new events are refused (and counted).
    pub wal_full: bool,
    /// Times the WAL reached its cap since the collector started.
    pub wal_full_times: u64,
    /// Events refused at the cap since the collector started; each run of
    /// them is recorded as a gap (with the count) once space frees up.
    pub events_refused: u64,
}

/// The version 1 and 2 layout of [`Heartbeat`].
#[derive(Serialize, Deserialize)]
struct HeartbeatV2 {
    collector_id: String,
    sequence: u64,
    timestamp_unix_ms: u64,
    status: HealthStatus,
    metrics: HeartbeatMetrics,
}

impl From<HeartbeatV2> for Heartbeat {
    fn from(v2: HeartbeatV2) -> Heartbeat {
        Heartbeat {
            collector_id: v2.collector_id,
            sequence: v2.sequence,
            timestamp_unix_ms: v2.timestamp_unix_ms,
            status: v2.status,
            metrics: v2.metrics,
            delivery: None,
        }
    }
}

impl Message for Heartbeat {
    const KIND: Kind = Kind::Heartbeat;

    fn decode_v1(body: &[u8]) -> Result<Heartbeat, codec::Error> {
        codec::strict::<HeartbeatV2>(Kind::Heartbeat, codec::LEGACY_VERSION, body).map(Into::into)
    }

    fn decode_v2(body: &[u8]) -> Result<Heartbeat, codec::Error> {
        codec::strict::<HeartbeatV2>(Kind::Heartbeat, codec::V2_VERSION, body).map(Into::into)
    }

    fn encode_body(&self, version: Version, out: Vec<u8>) -> Vec<u8> {
        if version == Version::V3 {
            return codec::body(self, out);
        }
        let old = HeartbeatV2 {
            collector_id: self.collector_id.clone(),
            sequence: self.sequence,
            timestamp_unix_ms: self.timestamp_unix_ms,
            status: self.status,
            metrics: self.metrics.clone(),
        };
        codec::body(&old, out)
    }
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
    pub source: crate::event::EventSource,
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

/// An RPC request on `control.collector.<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcRequest {
    /// Report health.
    HealthCheck,
    /// Change configuration at the next cycle boundary.
    UpdateConfig(ConfigUpdate),
    /// Finish the current cycle, flush, deregister, exit 0.
    GracefulShutdown,
    /// Start collecting (for a collector that missed the broadcast).
    BeginMonitoring,
}

/// Outcome codes of an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcStatus {
    /// Done.
    Ok,
    /// The request could not be decoded or failed validation.
    InvalidRequest,
    /// The actor's inbox is full; try again.
    Busy,
    /// The actor did not answer in time.
    Timeout,
    /// The collector is shutting down and takes no more requests.
    ShuttingDown,
}

/// An RPC reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcResponse {
    /// The outcome.
    pub status: RpcStatus,
    /// A human explanation for anything but `Ok`.
    pub message: Option<String>,
    /// The health report, for `HealthCheck` (and `Ok`).
    pub health: Option<HealthData>,
}

impl RpcResponse {
    /// A reply with a status and a message.
    pub fn status(status: RpcStatus, message: impl Into<String>) -> RpcResponse {
        RpcResponse { status, message: Some(message.into()), health: None }
    }

    /// A plain `Ok`.
    pub fn ok() -> RpcResponse {
        RpcResponse { status: RpcStatus::Ok, message: None, health: None }
    }
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

/// The actor's states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CollectorState {
    /// Connected (or connecting), registered or registering, and waiting
    /// for `BeginMonitoring`: nothing is collected.
    WaitingForAgent,
    /// Collecting on every interval.
    Running,
    /// Finishing the current cycle and flushing.
    ShuttingDown,
    /// Done; the thread exits.
    Stopped,
}

/// Where registration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistrationState {
    /// Not yet tried (or standalone).
    Unregistered,
    /// Request sent, retrying with backoff.
    Registering,
    /// Accepted by the agent.
    Registered,
    /// Leaving during shutdown.
    Deregistering,
    /// Refused by the agent; not retrying.
    Failed,
}

/// The health report of a collector (RPC `HealthCheck`, actor
/// `HealthCheck`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthData {
    /// The collector id.
    pub collector_id: String,
    /// The actor's state.
    pub state: CollectorState,
    /// The interval in force (slowed under backpressure), in ms.
    pub interval_ms: u64,
    /// The configured interval, in ms.
    pub original_interval_ms: u64,
    /// The bus link.
    pub connection: ConnectionStatus,
    /// Registration with the agent.
    pub registration: RegistrationState,
    /// Fill of the in-memory send buffer, 0–100.
    pub buffer_level_percent: f64,
    /// Events appended to the WAL but not yet acknowledged by the store.
    pub unacknowledged_events: u64,
    /// When the last cycle ended (Unix ms), if any.
    pub last_collection_unix_ms: Option<u64>,
    /// How long the last cycle took, in microseconds.
    pub last_cycle_us: u64,
    /// Processes seen in the last cycle.
    pub processes: u64,
    /// Cycles completed.
    pub cycles: u64,
    /// Events produced.
    pub events: u64,
    /// Events handed to the bus (or store, standalone).
    pub events_published: u64,
    /// Errors (failed cycles, failed appends, failed publishes).
    pub errors: u64,
    /// Times the interval was slowed for backpressure.
    pub backpressure_activations: u64,
    /// Hashes computed (files read) since start.
    pub hashes_computed: u64,
    /// A configuration update waits for the next cycle boundary.
    pub pending_config: bool,
    /// Tasks answered since start, whatever their status.
    pub tasks_served: u64,
    /// Tasks answered `Failed` (malformed, busy, errors), or that could not
    /// be answered at all (no reply inbox).
    pub tasks_failed: u64,
    /// Mean time from a task's arrival to its reply, in microseconds.
    pub task_latency_avg_us: u64,
    /// The event source in use and its counters.
    pub event_source: EventSourceStatus,
}

impl HealthData {
    /// The collector's own verdict from its numbers.
    pub fn status(&self) -> HealthStatus {
        match self.state {
            CollectorState::ShuttingDown | CollectorState::Stopped => HealthStatus::Unhealthy,
            _ if self.interval_ms != self.original_interval_ms => HealthStatus::Degraded,
            _ if self.connection == ConnectionStatus::Disconnected => HealthStatus::Degraded,
            _ => HealthStatus::Healthy,
        }
    }
}

/// A task for one collector of a type (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskRequest {
    /// The process list of the collector's last cycle, filtered.
    Snapshot(SnapshotFilter),
    /// One process in full, with the hash of its executable when
    /// possible.
    Inspect {
        /// The process id (the newest identity with it, if the last
        /// cycle saw two).
        pid: u32,
    },
    /// SHA-256 of a file, through the collector's hash cache.
    Hash {
        /// An absolute path.
        path: String,
    },
}

/// Which processes a snapshot keeps: all conditions given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFilter {
    /// The real user, by name or by numeric uid (as `ps -U`).
    pub user: Option<String>,
    /// A glob (`*` any run of characters, `?` one character, nothing
    /// else special, case-sensitive) matched against the process name or
    /// the file name of its executable (the name is cut at 15 bytes on
    /// Linux; the executable's is not).
    pub name_pattern: Option<String>,
    /// Only these pids (empty: any).
    pub pids: Vec<u32>,
}

/// The longest name pattern accepted, in characters (matching costs up to
/// pattern × name per process).
pub const MAX_NAME_PATTERN: usize = 256;

impl SnapshotFilter {
    /// Checks the filter before any process is looked at.
    pub fn validate(&self) -> Result<(), String> {
        match &self.name_pattern {
            Some(p) if p.chars().count() > MAX_NAME_PATTERN => {
                Err(format!("name pattern longer than {MAX_NAME_PATTERN} characters"))
            }
            _ => Ok(()),
        }
    }

    /// Compiles the filter for matching many processes.
    pub fn matcher(&self) -> SnapshotMatcher<'_> {
        let mut pids = self.pids.clone();
        pids.sort_unstable();
        pids.dedup();
        SnapshotMatcher {
            user: self.user.as_deref().map(|u| (u, u.parse::<u32>().ok())),
            pattern: self.name_pattern.as_deref().map(|p| p.chars().collect()),
            pids,
        }
    }
}

/// A [`SnapshotFilter`] ready to test processes.
#[derive(Debug)]
pub struct SnapshotMatcher<'a> {
    user: Option<(&'a str, Option<u32>)>,
    pattern: Option<Vec<char>>,
    pids: Vec<u32>,
}

impl SnapshotMatcher<'_> {
    /// Whether the process passes every condition.
    pub fn matches(&self, p: &ProcessSummary) -> bool {
        if !self.pids.is_empty() && self.pids.binary_search(&p.pid).is_err() {
            return false;
        }
        if let Some((name, uid)) = self.user {
            let by_name = p.user.as_deref() == Ok(name);
            let by_uid = uid.is_some_and(|uid| p.uid == Ok(uid));
            if !(by_name || by_uid) {
                return false;
            }
        }
        if let Some(pattern) = &self.pattern {
            let exe_name = p.exe.as_deref().ok().and_then(|e| Path::new(e).file_name()?.to_str());
            if !(glob_chars(pattern, &p.name) || exe_name.is_some_and(|n| glob_chars(pattern, n))) {
                return false;
            }
        }
        true
    }
}

/// Whether a process with this name and executable path passes a name
/// pattern ([`SnapshotFilter::name_pattern`]): the glob matches its name
/// or its executable's file name. `ps --name` and `events --name` both
/// match this way.
pub fn name_matches(pattern: &str, name: &str, exe: Option<&Path>) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let exe_name = exe.and_then(|e| e.file_name()?.to_str());
    glob_chars(&pattern, name) || exe_name.is_some_and(|n| glob_chars(&pattern, n))
}

/// Whether `text` matches the glob `pattern`: `*` matches any run of
/// characters (none included), `?` exactly one, every other character
/// itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    glob_chars(&pattern.chars().collect::<Vec<_>>(), text)
}

/// The matcher: greedy, backing up to the last `*` on a mismatch. At most
/// pattern × text steps, no recursion.
fn glob_chars(pattern: &[char], text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it is tried up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == '*')
}

/// The longest command line in a [`ProcessSummary`], in characters: a
/// snapshot of thousands of processes must fit in one bus message.
pub const SUMMARY_COMMAND_LINE_MAX: usize = 256;

/// One process in a snapshot: identity, parentage, who runs what. Enough
/// for a table or a tree (`ps --tree`); [`TaskRequest::Inspect`] gives
/// everything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSummary {
    /// Process id.
    pub pid: u32,
    /// Start time in the backend's unit; with `pid`, the identity.
    pub start_time: u64,
    /// Parent process id (0 for the roots).
    pub ppid: u32,
    /// Start time in seconds since the epoch.
    pub started_unix: Field<u64>,
    /// Short process name.
    pub name: String,
    /// Scheduler state.
    pub state: ProcessState,
    /// Name of the real user.
    pub user: Field<String>,
    /// Real user id.
    pub uid: Field<u32>,
    /// Effective user id.
    pub euid: Field<u32>,
    /// Executable path (non-UTF-8 bytes replaced).
    pub exe: Field<String>,
    /// The sanitized command line, arguments joined by spaces, at most
    /// [`SUMMARY_COMMAND_LINE_MAX`] characters; ends in `…` when cut (here
    /// or by the reader). [`TaskRequest::Inspect`] has it whole.
    pub command_line: Field<String>,
    /// A kernel thread.
    pub kernel_thread: bool,
}

impl ProcessSummary {
    /// The summary of a (sanitized) record.
    pub fn of(r: &ProcessRecord) -> ProcessSummary {
        let d = &r.details;
        ProcessSummary {
            pid: r.pid,
            start_time: r.start_time,
            ppid: r.ppid,
            started_unix: r.started_unix,
            name: r.name.clone(),
            state: r.state,
            user: d.user.clone(),
            uid: d.credentials.map(|c| c.uid),
            euid: d.credentials.map(|c| c.euid),
            exe: d.exe.as_ref().map(|p| p.to_string_lossy().into_owned()).map_err(|e| *e),
            command_line: d
                .argv
                .as_ref()
                .map(|a| {
                    let mut line = a.args.join(" ");
                    let cut = line.char_indices().nth(SUMMARY_COMMAND_LINE_MAX).map(|(i, _)| i);
                    if let Some(i) = cut {
                        line.truncate(i);
                    }
                    if a.truncated || cut.is_some() {
                        line.push('…');
                    }
                    line
                })
                .map_err(|e| *e),
            kernel_thread: r.kernel_thread,
        }
    }

    /// The process's identity, for merging lists from several collectors.
    pub fn key(&self) -> ProcessKey {
        ProcessKey { pid: self.pid, start_time: self.start_time }
    }
}

/// How a task went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskStatus {
    /// Done; the result is there.
    Ok,
    /// No such process (in the last cycle's list) or file.
    NotFound,
    /// The collector may not read it.
    NotPermitted,
    /// Anything else; the message says why (malformed task, busy, not
    /// collecting yet, shutting down, too large, I/O error).
    Failed,
}

/// A collector's answer to a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResponse {
    /// The collector that served it.
    pub collector_id: String,
    /// The outcome.
    pub status: TaskStatus,
    /// Why, for anything but `Ok`.
    pub message: Option<String>,
    /// The result: with `Ok`, and with a `Failed` hash that has details
    /// (too large, deferred).
    pub result: Option<TaskResult>,
    /// `Failed` for a passing reason of this collector's (busy, not
    /// collecting yet, shutting down): another member may succeed.
    pub retry: bool,
}

impl TaskResponse {
    /// `Ok` with a result.
    pub fn ok(collector_id: &str, result: TaskResult) -> TaskResponse {
        TaskResponse {
            collector_id: collector_id.to_owned(),
            status: TaskStatus::Ok,
            message: None,
            result: Some(result),
            retry: false,
        }
    }

    /// A status with its reason and no result.
    pub fn status(collector_id: &str, status: TaskStatus, message: impl Into<String>) -> TaskResponse {
        TaskResponse {
            collector_id: collector_id.to_owned(),
            status,
            message: Some(message.into()),
            result: None,
            retry: false,
        }
    }

    /// `Failed` with its reason.
    pub fn failed(collector_id: &str, message: impl Into<String>) -> TaskResponse {
        TaskResponse::status(collector_id, TaskStatus::Failed, message)
    }

    /// `Failed` for a passing reason of this collector's: worth asking
    /// another member.
    pub fn unavailable(collector_id: &str, message: impl Into<String>) -> TaskResponse {
        TaskResponse { retry: true, ..TaskResponse::failed(collector_id, message) }
    }
}

/// What a task produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskResult {
    /// For [`TaskRequest::Snapshot`].
    Snapshot(ProcessList),
    /// For [`TaskRequest::Inspect`].
    Inspect(Box<ProcessDetail>),
    /// For [`TaskRequest::Hash`].
    Hash(FileHash),
}

/// A filtered process list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessList {
    /// When the cycle that saw these processes ended (Unix ms).
    pub observed_unix_ms: u64,
    /// The processes that passed the filter, by pid.
    pub processes: Vec<ProcessSummary>,
}

/// One process in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessDetail {
    /// When the cycle that saw it ended (Unix ms).
    pub observed_unix_ms: u64,
    /// The record as events carry it: command line sanitized; cwd,
    /// session, threads and CPU time only with enhanced metadata.
    #[serde(with = "crate::record::process_record")]
    pub process: ProcessRecord,
    /// The executable's hash, or why there is none (`Deferred`: the
    /// task's time budget ran out, ask again to resume).
    pub sha256: HashOutcome,
}

/// The hash of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHash {
    /// The path asked for.
    pub path: String,
    /// Its size when hashed, in bytes.
    pub size: u64,
    /// The digest (with `Ok`), or `TooLarge` / `Deferred` (with
    /// `Failed`).
    pub sha256: HashOutcome,
}

/// What the lifecycle tracker reports as a modification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// Publish the processes already running on the first cycle, marked as
    /// a snapshot.
    pub snapshot_on_start: bool,
    /// Report uid/euid/gid/egid changes.
    pub credentials: bool,
    /// Report a changed parent.
    pub reparent: bool,
    /// Report an executable replaced or deleted under a running process.
    pub exe_changes: bool,
    /// Report command-line rewrites (setproctitle). Noisy: off by default.
    pub command_line: bool,
    /// Ignore processes younger than this many milliseconds when they
    /// appear (0: report all). Their stop is then not reported either.
    pub min_age_ms: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            snapshot_on_start: true,
            credentials: true,
            reparent: true,
            exe_changes: true,
            command_line: false,
            min_age_ms: 0,
        }
    }
}

/// A runtime change (RPC `UpdateConfig`, actor `UpdateConfig`). Fields left
/// `None` keep their value. Restart-only fields may be present only with
/// their current value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigUpdate {
    /// New interval in seconds.
    pub interval_secs: Option<u64>,
    /// New interval in milliseconds (library users and tests; the daemon
    /// still enforces its 5 s floor).
    pub interval_ms: Option<u64>,
    /// New in-flight limit.
    pub max_events_in_flight: Option<usize>,
    /// New lifecycle settings.
    pub lifecycle: Option<LifecycleConfig>,
    /// Hashing on or off.
    pub compute_hashes: Option<bool>,
    /// Restart-only.
    pub collector_id: Option<String>,
    /// Restart-only.
    pub database: Option<PathBuf>,
    /// Restart-only.
    pub data_dir: Option<PathBuf>,
    /// Restart-only.
    pub excluded_pids: Option<Vec<u32>>,
}

#[cfg(test)]
mod tests;
