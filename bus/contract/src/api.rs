//! What the agent says on the bus besides procmond's control plane: its
//! status (asked by `daemoneye-cli status`) and its alerts. Payloads are
//! postcard, like every other bus payload; they also derive `Serialize`
//! for the CLI's `--json`.
//!
//! | topic | who publishes | who subscribes |
//! |---|---|---|
//! | `agent.status` | any local client (request/reply) | the agent |
//! | `agent.task` | any local client ([`AgentTaskRequest`], request/reply) | the agent's task coordinator |
//! | `events.alert` | the agent's store writer | `daemoneye-cli`, anyone allowed |

use crate::control::{
    EventSourceStatus, ProcessSummary, SnapshotFilter, TaskRequest, TaskResponse, TaskStatus,
};
use serde::{Deserialize, Serialize};

use crate::codec::{self, Kind, Message, Version};

pub use crate::ids::{AGENT_CLIENT_ID, STORE_CLIENT_ID, TASKS_CLIENT_ID};

/// Request/reply: publish an empty payload with a `reply_to`; the answer
/// is an [`AgentStatus`].
pub const STATUS_TOPIC: &str = crate::topic::STATUS.pattern();

/// Alerts, one [`Alert`] per message.
pub const ALERT_TOPIC: &str = crate::topic::ALERTS.pattern();

/// Request/reply: an [`AgentTaskRequest`]; the answer is an
/// [`AgentTaskResponse`].
pub const TASK_TOPIC: &str = crate::topic::AGENT_TASKS.pattern();

/// The loading state machine (design.md §8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentState {
    /// Collectors spawned; waiting for every enabled one to register.
    Loading,
    /// Every collector registered; privileges dropped where configured.
    Ready,
    /// BeginMonitoring sent; collecting.
    SteadyState,
    /// Not every collector registered in time, or privileges could not be
    /// dropped. The agent keeps running (serving status) but sends no
    /// BeginMonitoring.
    StartupFailed {
        /// Why.
        reason: String,
    },
    /// SIGTERM received: collectors are being stopped.
    ShuttingDown,
}

impl AgentState {
    /// A short name for logs and tables.
    pub fn name(&self) -> &'static str {
        match self {
            AgentState::Loading => "Loading",
            AgentState::Ready => "Ready",
            AgentState::SteadyState => "SteadyState",
            AgentState::StartupFailed { .. } => "StartupFailed",
            AgentState::ShuttingDown => "ShuttingDown",
        }
    }
}

/// Where one collector stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectorPhase {
    /// `enabled: false` in agent.yaml.
    Disabled,
    /// Spawned (or adopted); not registered yet.
    Starting,
    /// Registered; waiting for BeginMonitoring.
    Registered,
    /// Registered and monitoring; heartbeats on time.
    Running,
    /// One or two heartbeats missed.
    Degraded,
    /// Three heartbeats missed: being escalated.
    Failed,
    /// Exited; a restart is scheduled.
    Restarting,
    /// Exited and not restarted (auto_restart off, the restart limit
    /// reached, or shutting down).
    Stopped,
}

impl CollectorPhase {
    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            CollectorPhase::Disabled => "disabled",
            CollectorPhase::Starting => "starting",
            CollectorPhase::Registered => "registered",
            CollectorPhase::Running => "running",
            CollectorPhase::Degraded => "degraded",
            CollectorPhase::Failed => "failed",
            CollectorPhase::Restarting => "restarting",
            CollectorPhase::Stopped => "stopped",
        }
    }
}

/// The last heartbeat of a collector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatInfo {
    /// Its sequence number.
    pub sequence: u64,
    /// healthy, degraded or unhealthy, as the collector reports itself.
    pub status: String,
    /// When the agent received it (Unix milliseconds).
    pub received_unix_ms: u64,
    /// Processes seen in the collector's last cycle.
    pub processes_collected: u64,
    /// Events the collector handed to the bus since it started.
    pub events_published: u64,
    /// The collector's send buffer, 0–100.
    pub buffer_level_percent: f64,
    /// Collection cycles since it started.
    pub cycles: u64,
    /// Errors since it started.
    pub errors: u64,
    /// Tasks it answered (from anyone), as it counts them.
    pub tasks_served: u64,
    /// Tasks it answered `Failed` or could not answer.
    pub tasks_failed: u64,
    /// Its mean time from a task's arrival to the answer, µs.
    pub task_latency_avg_us: u64,
    /// Where its events come from (the kernel's process events or the
    /// periodic walk alone), why not the kernel when it fell back, and the
    /// kernel path's counters. Its text comes from the collector: print it
    /// through `crate::render::printable`.
    pub event_source: EventSourceStatus,
}

/// One step of a heartbeat escalation, as shown in status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscalationStep {
    /// health_check, graceful_shutdown, kill or restart.
    pub step: String,
    /// What happened.
    pub outcome: String,
    /// When (Unix milliseconds).
    pub at_unix_ms: u64,
}

/// One collector in [`AgentStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectorStatus {
    /// Its id.
    pub id: String,
    /// Its type.
    pub collector_type: String,
    /// Where it stands.
    pub phase: CollectorPhase,
    /// Its process id, when running.
    pub pid: Option<u32>,
    /// Found running at agent start (left by an agent that died) and taken
    /// over rather than spawned.
    pub adopted: bool,
    /// Registered with this agent.
    pub registered: bool,
    /// Its last heartbeat.
    pub heartbeat: Option<HeartbeatInfo>,
    /// Heartbeats missed in a row.
    pub missed_heartbeats: u32,
    /// Restarts so far.
    pub restarts: u32,
    /// How its last process ended ("exit status 1", "signal 9 (SIGKILL)").
    pub last_exit: Option<String>,
    /// The last escalation's steps, oldest first.
    pub escalation: Vec<EscalationStep>,
    /// Events from it in the store.
    pub events_stored: u64,
    /// The agent's tasks it served, as the agent saw them.
    pub tasks: TaskCounts,
}

/// Tasks one collector served for the agent, measured by the agent (round
/// trip, bus included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Answers received from it, whatever their status.
    pub served: u64,
    /// Of those, `Failed`; plus tasks it took and left without answering.
    pub failed: u64,
    /// Mean round trip of its answers, µs.
    pub avg_latency_us: u64,
}

/// The task coordinator's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TasksStatus {
    /// Requests taken (one collector, or all).
    pub requests: u64,
    /// One-collector tasks answered by some collector.
    pub answered: u64,
    /// One-collector tasks no collector answered within the attempts and
    /// the deadline.
    pub unanswered: u64,
    /// Retries on another member (after a timeout, a departure or a
    /// passing failure).
    pub failovers: u64,
    /// Attempts that timed out.
    pub timeouts: u64,
    /// Requests to every collector.
    pub gathers: u64,
    /// Of those, with a collector missing.
    pub partial_gathers: u64,
    /// The balancing strategy of each task type.
    pub balance: BalanceSpec,
}

/// The store writer's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// The database file.
    pub path: String,
    /// Events committed since the agent started.
    pub events_committed: u64,
    /// Events ignored because the store already had them.
    pub duplicates: u64,
    /// Messages refused (undecodable, or a collector id other than the
    /// publisher's).
    pub rejected: u64,
    /// Batches committed.
    pub batches: u64,
    /// Alerts raised since the agent started.
    pub alerts_raised: u64,
    /// Rules loaded.
    pub rules: usize,
    /// Events pruned by retention.
    pub pruned: u64,
    /// Store errors (a failed commit is retried; nothing is acknowledged
    /// until it succeeds).
    pub errors: u64,
    /// The last commit (Unix milliseconds).
    pub last_commit_unix_ms: Option<u64>,
}

/// The broker's counters, as the agent hosts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerStatus {
    /// Its socket.
    pub socket: String,
    /// Connections open.
    pub connections: usize,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Messages published.
    pub published: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages dropped by overflow strategies.
    pub dropped: u64,
    /// Publishes or subscriptions refused by permissions.
    pub forbidden: u64,
    /// Connections refused (uid, limit, id).
    pub refused: u64,
    /// Connections closed for protocol errors.
    pub protocol_errors: u64,
}

/// The answer on [`STATUS_TOPIC`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's process id.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// The loading state machine.
    pub state: AgentState,
    /// Since when (Unix milliseconds).
    pub state_since_unix_ms: u64,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// Every configured collector, in agent.yaml's order.
    pub collectors: Vec<CollectorStatus>,
    /// The broker.
    pub broker: BrokerStatus,
    /// The store.
    pub store: StoreStatus,
    /// Tasks.
    pub tasks: TasksStatus,
    /// Each collector's delivery lag and WAL, from its last heartbeat
    /// (version 3; empty from an older agent), in agent.yaml's order.
    pub delivery: Vec<CollectorDelivery>,
}

/// One collector's delivery as its last heartbeat stated it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectorDelivery {
    /// The collector.
    pub collector_id: String,
    /// What it stated.
    pub status: crate::control::DeliveryStatus,
    /// The acknowledgement stall threshold (agent.yaml
    /// `delivery.ack_stall_secs`): an oldest unacknowledged event older
    /// than this is a failure.
    pub ack_stall_secs: u64,
    /// The collector is stalled now (see `ack_stall_secs`).
    pub stalled: bool,
}

/// The version 1 and 2 layout of [`AgentStatus`], written from a borrowed
/// status.
#[derive(Serialize)]
struct AgentStatusV2Ref<'a> {
    pid: u32,
    version: &'a str,
    state: &'a AgentState,
    state_since_unix_ms: u64,
    uptime_secs: u64,
    collectors: &'a [CollectorStatus],
    broker: &'a BrokerStatus,
    store: &'a StoreStatus,
    tasks: &'a TasksStatus,
}

/// The version 1 and 2 layout of [`AgentStatus`], read.
#[derive(Deserialize)]
struct AgentStatusV2 {
    pid: u32,
    version: String,
    state: AgentState,
    state_since_unix_ms: u64,
    uptime_secs: u64,
    collectors: Vec<CollectorStatus>,
    broker: BrokerStatus,
    store: StoreStatus,
    tasks: TasksStatus,
}

impl From<AgentStatusV2> for AgentStatus {
    fn from(v2: AgentStatusV2) -> AgentStatus {
        AgentStatus {
            pid: v2.pid,
            version: v2.version,
            state: v2.state,
            state_since_unix_ms: v2.state_since_unix_ms,
            uptime_secs: v2.uptime_secs,
            collectors: v2.collectors,
            broker: v2.broker,
            store: v2.store,
            tasks: v2.tasks,
            delivery: Vec::new(),
        }
    }
}

/// A task for the agent to hand to collectors, on [`TASK_TOPIC`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentTaskRequest {
    /// One collector of the type serves it: picked by the broker with the
    /// task type's strategy, retried on another member after a timeout, a
    /// departure or a passing failure, within the attempts and deadline of
    /// agent.yaml's `tasks`.
    One {
        /// The collector type ("process-monitor").
        collector_type: String,
        /// The task.
        task: TaskRequest,
    },
    /// Every registered collector of the type answers a snapshot; the
    /// lists are merged by process identity and the collectors that did
    /// not answer are named.
    All {
        /// The collector type.
        collector_type: String,
        /// Which processes.
        filter: SnapshotFilter,
    },
}

/// One try of a one-collector task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The collector that answered or left; `None` when nobody did.
    pub collector: Option<String>,
    /// What happened.
    pub outcome: String,
    /// How long it took, ms.
    pub elapsed_ms: u64,
}

/// The answer to [`AgentTaskRequest::One`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutcome {
    /// The collector's final answer, if one came.
    pub response: Option<TaskResponse>,
    /// Who served it.
    pub served_by: Option<String>,
    /// Every try, in order (the last is the one that counted).
    pub attempts: Vec<Attempt>,
    /// From receipt to answer, ms.
    pub elapsed_ms: u64,
    /// Why there is no answer.
    pub error: Option<String>,
}

/// One process of a merged snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedProcess {
    /// What the first collector to list it said.
    pub process: ProcessSummary,
    /// The collectors that listed it (indexes into
    /// [`GatherOutcome::answered`]).
    pub seen_by: Vec<u16>,
}

/// One collector's answer to a gathered snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectorAnswer {
    /// Its id.
    pub collector_id: String,
    /// Its status.
    pub status: TaskStatus,
    /// Why, for anything but `Ok`.
    pub message: Option<String>,
    /// Processes it listed.
    pub processes: u64,
    /// When its list was taken (Unix ms).
    pub observed_unix_ms: Option<u64>,
    /// From the request to its answer, ms.
    pub latency_ms: u64,
}

/// A collector missing from a gathered snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingCollector {
    /// Its id.
    pub collector_id: String,
    /// Why.
    pub reason: String,
}

/// The answer to [`AgentTaskRequest::All`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatherOutcome {
    /// The merged list, by pid.
    pub processes: Vec<MergedProcess>,
    /// Every answer, in arrival order.
    pub answered: Vec<CollectorAnswer>,
    /// Configured collectors of the type that gave no list (not
    /// registered, no answer in time, gone, or a failed answer).
    pub missing: Vec<MissingCollector>,
    /// From receipt to answer, ms.
    pub elapsed_ms: u64,
}

/// The answer on [`TASK_TOPIC`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentTaskResponse {
    /// To [`AgentTaskRequest::One`].
    One(TaskOutcome),
    /// To [`AgentTaskRequest::All`].
    All(GatherOutcome),
    /// Not done: why (malformed request, bad collector type, too large).
    Refused(String),
}

/// A detection rule's match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Its row id in the `alerts` table.
    pub id: i64,
    /// The rule's name.
    pub rule: String,
    /// The rule's severity.
    pub severity: Severity,
    /// The rule's description.
    pub description: String,
    /// The matching event's row id in `process_events`.
    pub event_id: i64,
    /// The collector that saw the event.
    pub collector_id: String,
    /// The process.
    pub pid: u32,
    /// Its name.
    pub name: String,
    /// Its executable, when known.
    pub exe: Option<String>,
    /// Its command line (sanitized by the collector), joined by spaces.
    pub command_line: Option<String>,
    /// When the event was observed (Unix milliseconds).
    pub observed_unix_ms: u64,
    /// When the alert was raised (Unix milliseconds).
    pub raised_unix_ms: u64,
}

/// Severity of a detection rule's alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Suspicious.
    Medium,
    /// Likely malicious.
    High,
    /// Act now.
    Critical,
}

impl Severity {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// How the broker picks one collector of a type for a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Members in turn.
    RoundRobin,
    /// The member with the fewest unanswered requests and queued messages.
    LeastLoaded,
    /// A member at random.
    Random,
}

impl Balance {
    /// The bus's strategy.
    pub fn strategy(self) -> daemoneye_bus::Strategy {
        match self {
            Balance::RoundRobin => daemoneye_bus::Strategy::RoundRobin,
            Balance::LeastLoaded => daemoneye_bus::Strategy::LeastLoaded,
            Balance::Random => daemoneye_bus::Strategy::Random,
        }
    }
}

/// The balancing strategy of each task type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceSpec {
    /// `snapshot` tasks sent to one collector (a gathered `ps` asks all).
    #[serde(default = "default_balance")]
    pub snapshot: Balance,
    /// `inspect` tasks.
    #[serde(default = "default_balance")]
    pub inspect: Balance,
    /// `hash` tasks.
    #[serde(default = "default_balance")]
    pub hash: Balance,
}

impl Default for BalanceSpec {
    fn default() -> Self {
        BalanceSpec { snapshot: default_balance(), inspect: default_balance(), hash: default_balance() }
    }
}

fn default_balance() -> Balance {
    Balance::LeastLoaded
}

/// The request of `agent.status`: no fields (version 1 sent an empty
/// payload, which is what this encodes to without a header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest;

impl Message for StatusRequest {
    const KIND: Kind = Kind::StatusRequest;
}
impl Message for AgentStatus {
    const KIND: Kind = Kind::AgentStatus;

    fn decode_v1(body: &[u8]) -> Result<AgentStatus, codec::Error> {
        codec::strict::<AgentStatusV2>(Kind::AgentStatus, codec::LEGACY_VERSION, body).map(Into::into)
    }

    fn decode_v2(body: &[u8]) -> Result<AgentStatus, codec::Error> {
        codec::strict::<AgentStatusV2>(Kind::AgentStatus, codec::V2_VERSION, body).map(Into::into)
    }

    fn encode_body(&self, version: Version, out: Vec<u8>) -> Vec<u8> {
        if version == Version::V3 {
            return codec::body(self, out);
        }
        codec::body(
            &AgentStatusV2Ref {
                pid: self.pid,
                version: &self.version,
                state: &self.state,
                state_since_unix_ms: self.state_since_unix_ms,
                uptime_secs: self.uptime_secs,
                collectors: &self.collectors,
                broker: &self.broker,
                store: &self.store,
                tasks: &self.tasks,
            },
            out,
        )
    }
}
impl Message for AgentTaskRequest {
    const KIND: Kind = Kind::AgentTaskRequest;
}
impl Message for AgentTaskResponse {
    const KIND: Kind = Kind::AgentTaskResponse;
}
impl Message for Alert {
    const KIND: Kind = Kind::Alert;
}

/// Encodes a payload in the current version ([`crate::codec`]).
pub fn encode<T: Message>(value: &T) -> Vec<u8> {
    codec::encode(value)
}

/// Decodes a payload of any version this build reads.
pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, codec::Error> {
    codec::decode(bytes)
}

/// Now, in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
