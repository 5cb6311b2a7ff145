//! `agent.yaml`: the agent's configuration, its validation, and the
//! embedded default used when no file is given.
//!
//! Every refusal names the file, the field and the reason
//! (`agent.yaml: collectors[1].binary: /opt/x/procmond is not executable`),
//! so an operator can fix it without reading code. Unknown keys are
//! refused, so a typo never silently falls back to a default.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use daemoneye_contract::api::{Balance, BalanceSpec, Severity};
pub use daemoneye_store::rules::RuleSpec;

pub mod outputs;
pub use outputs::OutputSpec;

/// A refused configuration: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {field}: {reason}")]
pub struct ConfigError {
    /// The file (or "embedded default").
    pub file: String,
    /// The field, as a path (`collectors[0].startup_timeout_secs`).
    pub field: String,
    /// Why.
    pub reason: String,
}

/// One collector the agent supervises.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSpec {
    /// Unique id on the bus (a-z, 0-9, '-', '_').
    pub id: String,
    /// The collector type ("process-monitor").
    #[serde(rename = "type", default = "default_type")]
    pub collector_type: String,
    /// The executable; a relative path is resolved against the agent's own
    /// directory.
    pub binary: PathBuf,
    /// Extra arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Spawned at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Restarted after a crash, within the restart limits.
    #[serde(default = "yes")]
    pub auto_restart: bool,
    /// Seconds to wait for its registration at startup.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout_secs: u64,
    /// Its heartbeat period in seconds.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_secs: u64,
    /// At most this many restarts per `restart_window_secs`.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// The window of `max_restarts`, in seconds.
    #[serde(default = "default_restart_window")]
    pub restart_window_secs: u64,
    /// Its data dir (WAL, lock file), passed as `--data-dir` [default:
    /// `<data_dir>/collectors/<id>`]. The agent also passes
    /// `--collector-id`; neither may appear in `args`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
}

/// Event store settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// Events older than this many days are pruned (0 keeps them).
    #[serde(default = "default_retention_days")]
    pub retention_days: u64,
    /// At most this many events are kept, the oldest pruned first (0: no
    /// limit).
    #[serde(default = "default_max_events")]
    pub max_events: u64,
    /// Largest batch committed in one transaction.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// How long the writer gathers a batch, in milliseconds.
    #[serde(default = "default_batch_wait")]
    pub batch_wait_ms: u64,
    /// How long one rule may run over one batch, in milliseconds: over it,
    /// the rule is interrupted and skips that batch; over it in 3
    /// consecutive batches, it is disabled until the agent restarts
    /// (`daemoneye_store::rules`, "Time budget"). At least 1.
    #[serde(default = "default_rule_budget")]
    pub rule_budget_ms: u64,
}

impl StoreSpec {
    /// [`StoreSpec::rule_budget_ms`] as a duration.
    pub fn rule_budget(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.rule_budget_ms)
    }
}

impl Default for StoreSpec {
    fn default() -> Self {
        StoreSpec {
            retention_days: default_retention_days(),
            max_events: default_max_events(),
            batch_max: default_batch_max(),
            batch_wait_ms: default_batch_wait(),
            rule_budget_ms: default_rule_budget(),
        }
    }
}

fn default_retention_days() -> u64 {
    30
}
fn default_max_events() -> u64 {
    5_000_000
}
fn default_batch_max() -> usize {
    1024
}
fn default_batch_wait() -> u64 {
    20
}
fn default_rule_budget() -> u64 {
    u64::try_from(daemoneye_store::rules::DEFAULT_BUDGET.as_millis()).unwrap_or(1000)
}

/// Timeouts of the heartbeat escalation and of shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationSpec {
    /// Wait for a HealthCheck reply, seconds.
    #[serde(default = "default_health_timeout")]
    pub health_check_timeout_secs: u64,
    /// Wait for a GracefulShutdown reply and the exit after it, seconds.
    #[serde(default = "default_shutdown_timeout")]
    pub graceful_shutdown_timeout_secs: u64,
    /// Wait for the exit after SIGKILL, seconds.
    #[serde(default = "default_kill_timeout")]
    pub kill_timeout_secs: u64,
}

impl Default for EscalationSpec {
    fn default() -> Self {
        EscalationSpec {
            health_check_timeout_secs: default_health_timeout(),
            graceful_shutdown_timeout_secs: default_shutdown_timeout(),
            kill_timeout_secs: default_kill_timeout(),
        }
    }
}

fn default_health_timeout() -> u64 {
    5
}
fn default_shutdown_timeout() -> u64 {
    10
}
fn default_kill_timeout() -> u64 {
    5
}

/// Tasks the agent hands to collectors (`daemoneye-cli ps`, `inspect`,
/// `hash`): timeouts, failover and balancing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksSpec {
    /// How long one attempt waits for its collector's answer, ms.
    #[serde(default = "default_attempt_timeout")]
    pub attempt_timeout_ms: u64,
    /// Attempts per task, the first included; each retry goes to another
    /// member as the broker picks it.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// A task, retries included, ends within this many ms.
    #[serde(default = "default_task_deadline")]
    pub deadline_ms: u64,
    /// How long a request to every collector (`ps`) waits for them, ms.
    #[serde(default = "default_gather_timeout")]
    pub gather_timeout_ms: u64,
    /// Requests served at once; more wait their turn.
    #[serde(default = "default_task_workers")]
    pub workers: usize,
    /// The balancing strategy of each task type.
    #[serde(default)]
    pub balance: BalanceSpec,
}

impl Default for TasksSpec {
    fn default() -> Self {
        TasksSpec {
            attempt_timeout_ms: default_attempt_timeout(),
            max_attempts: default_max_attempts(),
            deadline_ms: default_task_deadline(),
            gather_timeout_ms: default_gather_timeout(),
            workers: default_task_workers(),
            balance: BalanceSpec::default(),
        }
    }
}

fn default_attempt_timeout() -> u64 {
    2_000
}
fn default_max_attempts() -> u32 {
    3
}
fn default_task_deadline() -> u64 {
    10_000
}
fn default_gather_timeout() -> u64 {
    3_000
}
fn default_task_workers() -> usize {
    4
}

/// The broker's limits (`bus:` in agent.yaml): connections and memory.
/// The agent's own clients and the collectors it started are outside the
/// connection caps (their processes are proven); every other client (the
/// CLI, anything else of an allowed uid) is inside them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusSpec {
    /// Connections of other clients at once (room is kept beyond it for
    /// the agent's clients and the collectors, and within it for a few
    /// processes that hold no connection yet: a CLI).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections of other clients one uid may hold.
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Connections of other clients one process may hold.
    #[serde(default = "default_max_connections_per_pid")]
    pub max_connections_per_pid: usize,
    /// A connection of another client that neither subscribes nor
    /// publishes for this long is closed, seconds.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// A frame begun and not finished for this long closes its
    /// connection, seconds.
    #[serde(default = "default_frame_timeout")]
    pub frame_timeout_secs: u64,
    /// The largest message another client may send, KiB (the agent's own
    /// clients and the collectors: 16 MiB, for task answers).
    #[serde(default = "default_client_max_frame")]
    pub client_max_frame_kib: u32,
    /// Bytes the broker buffers for all connections together, MiB.
    #[serde(default = "default_memory_limit")]
    pub memory_limit_mib: usize,
    /// Bytes queued for one connection, MiB.
    #[serde(default = "default_queue_limit")]
    pub queue_limit_mib: usize,
}

impl Default for BusSpec {
    fn default() -> Self {
        BusSpec {
            max_connections: default_max_connections(),
            max_connections_per_uid: default_max_connections_per_uid(),
            max_connections_per_pid: default_max_connections_per_pid(),
            idle_timeout_secs: default_idle_timeout(),
            frame_timeout_secs: default_frame_timeout(),
            client_max_frame_kib: default_client_max_frame(),
            memory_limit_mib: default_memory_limit(),
            queue_limit_mib: default_queue_limit(),
        }
    }
}

fn default_max_connections() -> usize {
    128
}
fn default_max_connections_per_uid() -> usize {
    64
}
fn default_max_connections_per_pid() -> usize {
    16
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_frame_timeout() -> u64 {
    10
}
fn default_client_max_frame() -> u32 {
    1024
}
fn default_memory_limit() -> usize {
    64
}
fn default_queue_limit() -> usize {
    8
}

fn default_type() -> String {
    "process-monitor".to_owned()
}
fn yes() -> bool {
    true
}
fn default_startup_timeout() -> u64 {
    30
}
fn default_heartbeat() -> u64 {
    30
}
fn default_max_restarts() -> u32 {
    5
}
fn default_restart_window() -> u64 {
    300
}

/// The whole `agent.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The broker's Unix socket [default: `<data_dir>/run/broker.sock`].
    #[serde(default)]
    pub broker_socket: Option<PathBuf>,
    /// Where the store and the collectors' data live [default: the
    /// platform's data dir].
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// The collectors to supervise.
    #[serde(default)]
    pub collectors: Vec<CollectorSpec>,
    /// The event store.
    #[serde(default)]
    pub store: StoreSpec,
    /// Detection rules, run besides the built-in ones.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Run the built-in rules (`rules::DEFAULT_RULES`).
    #[serde(default = "yes")]
    pub default_rules: bool,
    /// Heartbeat escalation timeouts.
    #[serde(default)]
    pub escalation: EscalationSpec,
    /// When started as root, run the broker, store, rules and monitor as
    /// this user (privilege separation, `privsep.rs`): a small part stays
    /// root to start, signal and reap the collectors, which keep root.
    /// The user's files are in `<data_dir>/agent/`.
    #[serde(default)]
    pub run_as: Option<String>,
    /// Seconds SIGTERM waits for the collectors' graceful shutdown.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
    /// Tasks handed to collectors.
    #[serde(default)]
    pub tasks: TasksSpec,
    /// The broker's connection and memory limits.
    #[serde(default)]
    pub bus: BusSpec,
    /// Delivery liveness.
    #[serde(default)]
    pub delivery: DeliverySpec,
    /// Where events and alerts are forwarded (`crate::forward`).
    #[serde(default)]
    pub outputs: Vec<OutputSpec>,
    /// A Prometheus text-format metrics file (`crate::metrics`) [default:
    /// none].
    #[serde(default)]
    pub metrics: Option<MetricsSpec>,
}

/// `metrics:` in agent.yaml: the agent's counters in Prometheus text
/// format, in a file that node_exporter's textfile collector reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    /// The file: an absolute path ending in `.prom`, in an existing
    /// directory (node_exporter's `--collector.textfile.directory`).
    pub file: PathBuf,
    /// How often it is rewritten, seconds.
    #[serde(default = "default_metrics_interval")]
    pub interval_secs: u64,
}

fn default_metrics_interval() -> u64 {
    15
}

/// Delivery liveness: when a collector's unacknowledged events count as a
/// failure.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySpec {
    /// A collector whose oldest unacknowledged event is older than this
    /// (no acknowledgement progress while events wait) has failed: an
    /// alert, and an escalation that ends when the collector answers its
    /// health check (the stall is then the store's or the bus's).
    #[serde(default = "default_ack_stall")]
    pub ack_stall_secs: u64,
}

impl Default for DeliverySpec {
    fn default() -> Self {
        DeliverySpec { ack_stall_secs: default_ack_stall() }
    }
}

fn default_ack_stall() -> u64 {
    120
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// The configuration used without a file: one procmond next to the agent.
pub const EMBEDDED_DEFAULT: &str = "\
collectors:
  - id: procmond
    type: process-monitor
    binary: procmond
";

impl AgentConfig {
    /// Parses and validates YAML text; `file` names it in errors and
    /// `exe_dir` resolves relative binary paths.
    pub fn parse(text: &str, file: &str, exe_dir: &Path) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig = daemoneye_contract::yaml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            field: e.line.map_or("(document)".to_owned(), |line| format!("line {line}")),
            reason: e.reason,
        })?;
        for c in &mut cfg.collectors {
            if c.binary.is_relative() {
                c.binary = exe_dir.join(&c.binary);
            }
        }
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Reads a file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>, exe_dir: &Path) -> Result<AgentConfig, ConfigError> {
        match path {
            None => AgentConfig::parse(EMBEDDED_DEFAULT, "embedded default", exe_dir),
            Some(p) => {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                    file: name.clone(),
                    field: "(file)".into(),
                    reason: e.to_string(),
                })?;
                AgentConfig::parse(&text, &name, exe_dir)
            }
        }
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |field: String, reason: String| ConfigError { file: file.to_owned(), field, reason };
        if !["error", "warn", "info", "debug", "trace", "off"].contains(&self.log_level.as_str()) {
            return Err(err(
                "log_level".into(),
                format!("{:?} is not one of error, warn, info, debug, trace, off", self.log_level),
            ));
        }
        let mut ids = HashSet::new();
        for (i, c) in self.collectors.iter().enumerate() {
            let at = |f: &str| format!("collectors[{i}].{f}");
            if let Err(e) = daemoneye_contract::ids::validate_collector_id(&c.id) {
                return Err(err(at("id"), e.to_string()));
            }
            if !ids.insert(c.id.as_str()) {
                return Err(err(at("id"), format!("duplicate id {:?}", c.id)));
            }
            // The one type the agent knows how to serve (tasks, status).
            if c.collector_type != daemoneye_contract::ids::COLLECTOR_TYPE {
                return Err(err(
                    at("type"),
                    format!(
                        "unknown collector type {:?}: the only type is {}",
                        c.collector_type,
                        daemoneye_contract::ids::COLLECTOR_TYPE
                    ),
                ));
            }
            for (field, v, max) in [
                ("startup_timeout_secs", c.startup_timeout_secs, DAY_SECS),
                ("heartbeat_interval_secs", c.heartbeat_interval_secs, 3600),
                ("restart_window_secs", c.restart_window_secs, 7 * DAY_SECS),
            ] {
                check_range(v, max).map_err(|reason| err(at(field), reason))?;
            }
            if RESERVED_IDS.iter().any(|r| r.strip_suffix('*').map_or(c.id == *r, |p| c.id.starts_with(p))) {
                return Err(err(
                    at("id"),
                    format!("{:?} is reserved on the bus ({})", c.id, RESERVED_IDS.join(", ")),
                ));
            }
            if let Some(a) =
                c.args.iter().find(|a| MANAGED_ARGS.iter().any(|m| a == m || a.starts_with(&format!("{m}="))))
            {
                return Err(err(
                    at("args"),
                    format!(
                        "{a} is set by the agent; use the collector's id, data_dir or heartbeat_interval_secs"
                    ),
                ));
            }
            if c.enabled {
                check_executable(&c.binary).map_err(|reason| err(at("binary"), reason))?;
            }
        }
        // Only what the file sets: the default data dir is short, and
        // finding it may create it (validation touches nothing).
        if let Some(socket) = &self.broker_socket {
            daemoneye_platform::paths::check_socket_path(socket)
                .map_err(|reason| err("broker_socket".into(), reason))?;
        } else if self.data_dir.is_some() {
            daemoneye_platform::paths::check_socket_path(&self.broker_socket())
                .map_err(|reason| err("data_dir".into(), reason))?;
        }
        let store = &self.store;
        if store.batch_max == 0 {
            return Err(err("store.batch_max".into(), "must be at least 1".into()));
        }
        let esc = &self.escalation;
        for (field, v) in [
            ("escalation.health_check_timeout_secs", esc.health_check_timeout_secs),
            ("escalation.graceful_shutdown_timeout_secs", esc.graceful_shutdown_timeout_secs),
            ("escalation.kill_timeout_secs", esc.kill_timeout_secs),
            ("shutdown_timeout_secs", self.shutdown_timeout_secs),
        ] {
            check_range(v, 3600).map_err(|reason| err(field.into(), reason))?;
        }
        check_range(store.batch_wait_ms, 60_000)
            .map_err(|reason| err("store.batch_wait_ms".into(), reason))?;
        check_range(store.rule_budget_ms, 60_000).map_err(|reason| {
            err("store.rule_budget_ms".into(), format!("{reason} (a rule's time budget per batch)"))
        })?;
        check_range(self.delivery.ack_stall_secs, 7 * DAY_SECS)
            .map_err(|reason| err("delivery.ack_stall_secs".into(), reason))?;
        let t = &self.tasks;
        for (field, v, max) in [
            ("tasks.attempt_timeout_ms", t.attempt_timeout_ms, 60_000),
            ("tasks.max_attempts", u64::from(t.max_attempts), 10),
            ("tasks.deadline_ms", t.deadline_ms, 300_000),
            ("tasks.gather_timeout_ms", t.gather_timeout_ms, 60_000),
            ("tasks.workers", t.workers as u64, 64),
        ] {
            check_range(v, max).map_err(|reason| err(field.into(), reason))?;
        }
        if t.deadline_ms < t.attempt_timeout_ms {
            return Err(err(
                "tasks.deadline_ms".into(),
                format!(
                    "{} is shorter than one attempt (tasks.attempt_timeout_ms: {})",
                    t.deadline_ms, t.attempt_timeout_ms
                ),
            ));
        }
        let bus = &self.bus;
        for (field, v, max) in [
            ("bus.max_connections", bus.max_connections as u64, 4096),
            ("bus.max_connections_per_uid", bus.max_connections_per_uid as u64, 4096),
            ("bus.max_connections_per_pid", bus.max_connections_per_pid as u64, 4096),
            ("bus.idle_timeout_secs", bus.idle_timeout_secs, DAY_SECS),
            ("bus.frame_timeout_secs", bus.frame_timeout_secs, 3600),
            ("bus.client_max_frame_kib", u64::from(bus.client_max_frame_kib), 16 * 1024),
            ("bus.memory_limit_mib", bus.memory_limit_mib as u64, 64 * 1024),
            ("bus.queue_limit_mib", bus.queue_limit_mib as u64, 4096),
        ] {
            check_range(v, max).map_err(|reason| err(field.into(), reason))?;
        }
        if bus.queue_limit_mib > bus.memory_limit_mib {
            return Err(err(
                "bus.queue_limit_mib".into(),
                format!(
                    "{} MiB for one connection is more than the broker's whole memory limit \
                     (bus.memory_limit_mib: {})",
                    bus.queue_limit_mib, bus.memory_limit_mib
                ),
            ));
        }
        if bus.max_connections_per_uid > bus.max_connections {
            return Err(err(
                "bus.max_connections_per_uid".into(),
                format!(
                    "{} is more than bus.max_connections ({})",
                    bus.max_connections_per_uid, bus.max_connections
                ),
            ));
        }
        if store.retention_days > 100 * 365 {
            return Err(err("store.retention_days".into(), "must be at most 36500 (0 keeps events)".into()));
        }
        let mut names = HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            if r.name.trim().is_empty() {
                return Err(err(format!("rules[{i}].name"), "must not be empty".into()));
            }
            if !names.insert(r.name.as_str())
                || (self.default_rules && crate::rules::DEFAULT_RULES.iter().any(|d| d.name == r.name))
            {
                return Err(err(format!("rules[{i}].name"), format!("duplicate rule name {:?}", r.name)));
            }
        }
        if let Some(user) = &self.run_as
            && user.trim().is_empty()
        {
            return Err(err("run_as".into(), "must name a user".into()));
        }
        let collectors: Vec<String> = self.collectors.iter().map(|c| c.id.clone()).collect();
        outputs::validate(&self.outputs, &collectors).map_err(|(field, reason)| err(field, reason))?;
        if let Some(m) = &self.metrics {
            check_range(m.interval_secs, 3600)
                .map_err(|reason| err("metrics.interval_secs".into(), reason))?;
            check_metrics_file(&m.file).map_err(|reason| err("metrics.file".into(), reason))?;
        }
        Ok(())
    }

    /// The data dir: configured, or the platform's default.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(daemoneye_platform::paths::default_data_dir)
    }

    /// Where the agent's own files are (the event store, the broker's run
    /// dir, its lock): the data dir, or with `run_as` its `agent/`
    /// subdirectory, owned by that user while the data dir stays root's.
    pub fn agent_dir(&self) -> PathBuf {
        let dir = self.data_dir();
        if self.run_as.is_some() { dir.join("agent") } else { dir }
    }

    /// The broker socket: configured, or `<agent_dir>/run/broker.sock`.
    pub fn broker_socket(&self) -> PathBuf {
        self.broker_socket.clone().unwrap_or_else(|| self.agent_dir().join("run").join("broker.sock"))
    }

    /// The event store: `<agent_dir>/events.db`.
    pub fn database(&self) -> PathBuf {
        self.agent_dir().join("events.db")
    }

    /// A collector's data dir.
    pub fn collector_data_dir(&self, c: &CollectorSpec) -> PathBuf {
        c.data_dir.clone().unwrap_or_else(|| self.data_dir().join("collectors").join(&c.id))
    }

    /// Every rule the agent runs: the built-ins (when enabled) and the
    /// configured ones, without the disabled ones.
    pub fn active_rules(&self) -> Vec<RuleSpec> {
        let builtin = if self.default_rules { crate::rules::default_rules() } else { Vec::new() };
        builtin.into_iter().chain(self.rules.iter().cloned()).filter(|r| r.enabled).collect()
    }
}

/// A day, in seconds.
const DAY_SECS: u64 = 86_400;

/// Collector ids that would collide with the agent's own bus clients or
/// with control topics (`control.collector.<id>` is a collector's RPC
/// topic); `*` ends a prefix.
/// `bus-*` is the broker's for the ids it assigns.
const RESERVED_IDS: [&str; 8] =
    ["daemoneye-agent*", "bus", "bus-*", "cli-*", "registration", "lifecycle", "config", "task"];

/// A duration setting: at least 1, at most `max`.
/// The metrics file's path: absolute, a `.prom` name (the only files the
/// textfile collector reads), in a directory that exists.
fn check_metrics_file(file: &Path) -> Result<(), String> {
    if !file.is_absolute() {
        return Err(format!("{} is not an absolute path", file.display()));
    }
    if file.extension().is_none_or(|e| e != "prom") || file.file_stem().is_none_or(|s| s.is_empty()) {
        return Err(format!(
            "{} does not end in .prom: node_exporter's textfile collector reads only *.prom files",
            file.display()
        ));
    }
    match file.parent().map(std::fs::metadata) {
        Some(Ok(m)) if m.is_dir() => Ok(()),
        Some(Ok(_)) => Err(format!("{}: its parent is not a directory", file.display())),
        Some(Err(e)) => Err(format!("{}: its directory: {e}", file.display())),
        None => Err(format!("{} has no directory", file.display())),
    }
}

fn check_range(v: u64, max: u64) -> Result<(), String> {
    match v {
        0 => Err("must be at least 1".into()),
        v if v > max => Err(format!("{v} is over the maximum of {max}")),
        _ => Ok(()),
    }
}

/// Arguments the agent sets itself for every collector.
const MANAGED_ARGS: [&str; 3] = ["--collector-id", "--data-dir", "--heartbeat-interval"];

/// A binary must exist, be a file, and be executable by someone; root
/// runs only one that root alone can change
/// ([`daemoneye_platform::files::trusted_executable`]).
fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(format!("{} is not executable", path.display()));
        }
    }
    daemoneye_platform::files::trusted_executable(path).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("procmond");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        (dir, bin)
    }

    #[test]
    fn the_embedded_default_runs_one_procmond_next_to_the_agent() {
        let (dir, bin) = setup();
        let cfg = AgentConfig::load(None, dir.path()).unwrap();
        assert_eq!(cfg.collectors.len(), 1);
        assert_eq!(cfg.collectors[0].binary, bin);
        assert!(cfg.collectors[0].enabled && cfg.collectors[0].auto_restart);
    }

    #[test]
    fn each_rule_refuses_with_the_field_named() {
        let (dir, _) = setup();
        let noexec = dir.path().join("plain");
        std::fs::write(&noexec, "x").unwrap();
        let long = format!("/{}", "d".repeat(120));
        let long_dir = format!("data_dir: {long}\n");
        let long_socket = format!("broker_socket: {long}/b.sock\n");
        let metrics_in = |file: &str| format!("metrics: {{file: {}/{file}}}\n", dir.path().display());
        let (no_prom, no_dir, plain_parent) =
            (metrics_in("daemoneye.txt"), metrics_in("missing/daemoneye.prom"), metrics_in("plain/x.prom"));
        let no_interval = format!("metrics: {{file: {}/d.prom, interval_secs: 0}}\n", dir.path().display());
        let cases: [(&str, &str, &str); 31] = [
            (
                "collectors:\n  - {id: a, binary: procmond}\n  - {id: a, binary: procmond}\n",
                "collectors[1].id",
                "duplicate",
            ),
            ("collectors:\n  - {id: a, binary: missing}\n", "collectors[0].binary", "No such file"),
            ("collectors:\n  - {id: a, binary: plain}\n", "collectors[0].binary", "not executable"),
            (
                "collectors:\n  - {id: a, binary: procmond, startup_timeout_secs: 0}\n",
                "collectors[0].startup_timeout_secs",
                "at least 1",
            ),
            (
                "collectors:\n  - {id: a, binary: procmond, heartbeat_interval_secs: 0}\n",
                "collectors[0].heartbeat_interval_secs",
                "at least 1",
            ),
            ("collectors:\n  - {id: a, binary: procmond, colour: red}\n", "line", "colour"),
            // A key indented too little: its own line is named.
            (
                "collectors:\n  - id: a\n  binary: procmond\n",
                "line 3",
                "`binary:` on line 3 is indented by 2",
            ),
            (
                "collectors:\n  - {id: a, type: network-monitor, binary: procmond}\n",
                "collectors[0].type",
                "unknown collector type \"network-monitor\"",
            ),
            ("collectors:\n  - {id: Bad, binary: procmond}\n", "collectors[0].id", "use 1-64 of a-z"),
            ("collectors:\n  - {id: registration, binary: procmond}\n", "collectors[0].id", "reserved"),
            ("collectors:\n  - {id: daemoneye-agent-x, binary: procmond}\n", "collectors[0].id", "reserved"),
            (
                "collectors:\n  - {id: a, binary: procmond, startup_timeout_secs: 18446744073709551615}\n",
                "collectors[0].startup_timeout_secs",
                "maximum",
            ),
            ("escalation: {kill_timeout_secs: 99999}\n", "escalation.kill_timeout_secs", "maximum"),
            ("tasks: {max_attempts: 0}\n", "tasks.max_attempts", "at least 1"),
            ("tasks: {workers: 65}\n", "tasks.workers", "maximum of 64"),
            (
                "tasks: {attempt_timeout_ms: 5000, deadline_ms: 4000}\n",
                "tasks.deadline_ms",
                "shorter than one attempt",
            ),
            ("tasks: {balance: {inspect: fastest}}\n", "line", "unknown variant `fastest`"),
            ("collectors:\n  - {id: bus-1-x, binary: procmond}\n", "collectors[0].id", "reserved"),
            ("bus: {max_connections: 0}\n", "bus.max_connections", "at least 1"),
            ("bus: {memory_limit_mib: 4, queue_limit_mib: 8}\n", "bus.queue_limit_mib", "memory limit"),
            ("bus: {max_connections: 10}\n", "bus.max_connections_per_uid", "more than bus.max_connections"),
            ("bus: {idle_secs: 3}\n", "line", "idle_secs"),
            ("store: {rule_budget_ms: 0}\n", "store.rule_budget_ms", "must be at least 1"),
            ("store: {rule_budget_ms: 60001}\n", "store.rule_budget_ms", "maximum of 60000"),
            (&long_dir, "data_dir", "this OS allows at most"),
            (&long_socket, "broker_socket", "this OS allows at most"),
            ("metrics: {file: daemoneye.prom}\n", "metrics.file", "not an absolute path"),
            (&no_prom, "metrics.file", "reads only *.prom files"),
            (&no_dir, "metrics.file", "its directory: No such file"),
            (&plain_parent, "metrics.file", "its parent is not a directory"),
            (&no_interval, "metrics.interval_secs", "at least 1"),
        ];
        for (text, field, reason) in cases {
            let e = AgentConfig::parse(text, "agent.yaml", dir.path()).unwrap_err();
            assert_eq!(e.file, "agent.yaml");
            assert!(e.field.starts_with(field), "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
        // A disabled collector's binary is not checked.
        assert!(
            AgentConfig::parse(
                "collectors:\n  - {id: a, binary: missing, enabled: false}\n",
                "f",
                dir.path()
            )
            .is_ok()
        );
    }

    #[test]
    fn the_event_source_is_the_collectors_own_flag() {
        let (dir, bin) = setup();
        for args in [r#"["--events", "kernel"]"#, r#"["--interval", "30", "--events=poll"]"#] {
            let text = format!("collectors:\n  - {{id: a, binary: {}, args: {args}}}\n", bin.display());
            let cfg = AgentConfig::parse(&text, "agent.yaml", dir.path()).unwrap();
            assert!(cfg.collectors[0].args.iter().any(|a| a.starts_with("--events")), "{args}");
        }
    }

    #[test]
    fn the_packaged_sample_config_parses() {
        let (dir, bin) = setup();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/agent.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        // The sample names procmond beside the agent: it parses as it is,
        // from a checkout as from an install.
        assert!(text.contains("binary: procmond\n"));
        let cfg = AgentConfig::parse(&text, "packaging/agent.yaml", dir.path()).unwrap();
        assert_eq!(cfg.collectors[0].binary, bin);

        // What the sample documents as defaults are the defaults: a minimal
        // file parses to the same values.
        let minimal = format!("collectors:\n  - {{id: procmond, binary: {}}}\n", bin.display());
        let defaults = AgentConfig::parse(&minimal, "minimal", dir.path()).unwrap();
        assert_eq!(cfg.broker_socket, None);
        assert_eq!(cfg.data_dir, None);
        assert_eq!(cfg.run_as, None);
        assert_eq!(cfg.log_level, defaults.log_level);
        assert_eq!(cfg.shutdown_timeout_secs, defaults.shutdown_timeout_secs);
        assert_eq!(cfg.store, StoreSpec::default());
        assert_eq!(cfg.escalation, EscalationSpec::default());
        assert_eq!(cfg.tasks, TasksSpec::default());
        assert_eq!(cfg.default_rules, defaults.default_rules);

        // One procmond: the documented args, everything else default.
        assert_eq!(cfg.collectors.len(), 1);
        let c = &cfg.collectors[0];
        assert_eq!(c.binary, bin);
        assert_eq!(c.args, ["--interval", "30", "--compute-hashes"]);
        assert_eq!(*c, CollectorSpec { args: c.args.clone(), ..defaults.collectors[0].clone() });

        // The custom rule, run besides the built-ins.
        assert_eq!(cfg.rules.len(), 1);
        let r = &cfg.rules[0];
        assert_eq!((r.name.as_str(), r.severity, r.enabled), ("netcat-started", Severity::Medium, true));
        assert!(!r.description.is_empty());
        assert!(r.sql.trim_start().starts_with("SELECT id FROM new_events"), "{}", r.sql);
        assert!(r.sql.contains("'ncat'"), "{}", r.sql);
        let active: Vec<String> = cfg.active_rules().into_iter().map(|r| r.name).collect();
        assert_eq!(active.len(), crate::rules::DEFAULT_RULES.len() + 1);
        assert_eq!(active.last().map(String::as_str), Some("netcat-started"));
    }
}
