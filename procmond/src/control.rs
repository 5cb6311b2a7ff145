//! Control-plane messages between collectors and the agent: registration,
//! heartbeats, RPC, lifecycle commands and store acknowledgements. procmond
//! and the agent both use this module, so the two sides cannot drift. Every
//! type here is a wire type (serde, postcard on the bus).
//!
//! Topics (design.md §4):
//!
//! | topic | from | to |
//! |---|---|---|
//! | `control.collector.lifecycle` | agent ([`LifecycleCommand`], broadcast) | every collector |
//! | `control.collector.registration` | collector ([`RegistrationMessage`], request/reply) | agent |
//! | `control.collector.<id>` | agent ([`RpcRequest`], request/reply) | that collector |
//! | `control.health.heartbeat.<id>` | that collector ([`Heartbeat`]) | agent |
//! | `control.ack.<id>` | agent store ([`StoreAck`]) | that collector |

use serde::{Deserialize, Serialize};

use crate::config::ConfigUpdate;

/// Lifecycle commands, broadcast by the agent.
pub const LIFECYCLE_TOPIC: &str = "control.collector.lifecycle";
/// Registration and deregistration requests.
pub const REGISTRATION_TOPIC: &str = "control.collector.registration";
/// Heartbeats of every collector (the agent's subscription).
pub const HEARTBEAT_PATTERN: &str = "control.health.heartbeat.+";

/// The RPC topic of one collector.
pub fn rpc_topic(collector_id: &str) -> String {
    format!("control.collector.{collector_id}")
}

/// The heartbeat topic of one collector.
pub fn heartbeat_topic(collector_id: &str) -> String {
    format!("control.health.heartbeat.{collector_id}")
}

/// The topic on which the agent's store acknowledges one collector's events.
pub fn ack_topic(collector_id: &str) -> String {
    format!("control.ack.{collector_id}")
}

/// Encodes a control message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail.
    postcard::to_stdvec(msg).unwrap_or_default()
}

/// Decodes a control message; a malformed payload is an error, never a
/// panic.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
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
