//! The pieces of `daemoneye-cli` worth testing on their own: reaching the
//! agent (a socket probe that turns OS errors into advice, then the bus
//! client), reading the store (the newest N events, not the oldest),
//! matching followed messages against the same filters as the query, and
//! the text it prints (tables, ages, UTC times).
//!
//! Exit status is decided here too ([`CliError::exit_code`]): 2 when the
//! agent cannot be reached, 1 for every other failure.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemoneye_bus::{Client, ClientConfig, ClientError, ConnectionState};
use daemoneye_contract::event::{EventEnvelope, EventSource};
use daemoneye_contract::render::printable;
use daemoneye_contract::topic;
use daemoneye_store::{EventQuery, EventStore, StoreError, StoredEvent};
use serde::Serialize;

use crate::api::{self, AgentState, AgentStatus, Alert, CollectorDelivery, CollectorStatus, STATUS_TOPIC};
use crate::config::{AgentConfig, ConfigError, EMBEDDED_DEFAULT, Severity};
use crate::rules::AlertQuery;

/// How long the CLI waits for the broker's welcome and for the agent's
/// status reply.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a command failed, with the advice an operator needs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// Nothing at the socket path: no agent has started with this data dir.
    #[error("agent not running at {} (no socket there)", .0.display())]
    NoSocket(PathBuf),
    /// A socket file nobody listens on: an agent died without removing it.
    #[error("agent not running at {} (connection refused; a stale socket?)", .0.display())]
    ConnectionRefused(PathBuf),
    /// The socket (or its directory) is not accessible to this user.
    #[error("permission denied on {}: run as the agent's user or root", .0.display())]
    SocketPermission(PathBuf),
    /// Any other failure to connect to the socket.
    #[error("cannot connect to {}: {source}", path.display())]
    Socket {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The broker accepted the connection and then refused the client.
    #[error(
        "the broker at {} refused this client (uid not allowed): run as the agent's user or root",
        .0.display()
    )]
    ClientRefused(PathBuf),
    /// The broker accepted the connection but never welcomed the client.
    #[error(
        "the broker at {} did not welcome this client within {} s",
        .0.display(),
        AGENT_TIMEOUT.as_secs()
    )]
    NotWelcomed(PathBuf),
    /// The status request got no reply in time.
    #[error("the agent did not answer in {} s (is it wedged?)", AGENT_TIMEOUT.as_secs())]
    NoAnswer,
    /// Another bus failure (the client closed, a call refused).
    #[error("bus: {0}")]
    Bus(#[from] ClientError),
    /// The agent's reply is not one this build understands (or not the
    /// agent's).
    #[error("the agent's reply is not usable ({0}); is daemoneye-cli the agent's version?")]
    BadReply(String),
    /// No database at the store path.
    #[error(
        "no event store at {}: the agent has not stored anything yet, or --data-dir/--config point elsewhere",
        .0.display()
    )]
    NoStore(PathBuf),
    /// The database (or its directory) is not readable by this user.
    #[error("permission denied reading {}: run as the agent's user or root", .0.display())]
    StorePermission(PathBuf),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A task request got no answer in time.
    #[error("the agent did not answer the task within {} s (is it wedged?)", .0.as_secs())]
    NoTaskAnswer(Duration),
    /// The agent went away while serving a task request.
    #[error("the agent stopped while serving the task (shutting down?)")]
    AgentLeft,
    /// Nobody takes task requests: an agent without the task coordinator.
    #[error("the agent does not take tasks (agent.task): is it an older version, or shutting down?")]
    NoTaskService,
    /// The agent refused the request.
    #[error("the agent refused the task: {0}")]
    TaskRefused(String),
    /// No collector served the task.
    #[error("{0}")]
    NoCollector(String),
    /// The collector found no such process or file.
    #[error("not found: {0}")]
    TaskNotFound(String),
    /// The collector may not read it.
    #[error("not permitted: {0}")]
    TaskNotPermitted(String),
    /// The collector failed.
    #[error("failed: {0}")]
    TaskFailed(String),
    /// Reading the alert table failed.
    #[error("cannot read alerts from {}: {source}", path.display())]
    Alerts {
        /// The database.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
}

impl CliError {
    /// 2 when the agent could not be reached, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NoSocket(_)
            | CliError::ConnectionRefused(_)
            | CliError::SocketPermission(_)
            | CliError::Socket { .. }
            | CliError::ClientRefused(_)
            | CliError::NotWelcomed(_)
            | CliError::NoAnswer
            | CliError::NoTaskAnswer(_)
            | CliError::AgentLeft
            | CliError::NoTaskService
            | CliError::Bus(_) => 2,
            _ => 1,
        }
    }
}

/// Loads agent.yaml (or the embedded default) like the agent does, except
/// that collector binaries are not required to exist: they are resolved
/// against the agent's directory, which need not be the CLI's, and the CLI
/// never runs them. Every other check still applies.
pub fn load_config(path: Option<&Path>, exe_dir: &Path) -> Result<AgentConfig, ConfigError> {
    let first = match AgentConfig::load(path, exe_dir) {
        Ok(cfg) => return Ok(cfg),
        Err(e) if e.field.starts_with("collectors[") && e.field.ends_with(".binary") => e,
        Err(e) => return Err(e),
    };
    log::info!("{first} (not checked by daemoneye-cli)");
    let (text, file) = match path {
        None => (EMBEDDED_DEFAULT.to_owned(), "embedded default".to_owned()),
        Some(p) => (std::fs::read_to_string(p).map_err(|_| first.clone())?, p.display().to_string()),
    };
    // Parse again with every collector disabled (a disabled collector's
    // binary is not checked), then restore the flags.
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|_| first.clone())?;
    let mut enabled = Vec::new();
    if let Some(list) = doc.get_mut("collectors").and_then(|c| c.as_sequence_mut()) {
        for c in list.iter_mut() {
            enabled.push(c.get("enabled").and_then(serde_yaml_ng::Value::as_bool).unwrap_or(true));
            if let Some(map) = c.as_mapping_mut() {
                map.insert("enabled".into(), false.into());
            }
        }
    }
    let text = serde_yaml_ng::to_string(&doc).map_err(|_| first.clone())?;
    let mut cfg = AgentConfig::parse(&text, &file, exe_dir)?;
    for (c, on) in cfg.collectors.iter_mut().zip(enabled) {
        c.enabled = on;
    }
    Ok(cfg)
}

/// Checks that something listens on `socket`, turning the OS error into
/// advice. A bus client would only keep retrying.
pub fn probe_socket(socket: &Path) -> Result<(), CliError> {
    match std::os::unix::net::UnixStream::connect(socket) {
        // The broker sees a connection that closes before its Hello and
        // forgets it.
        Ok(_) => Ok(()),
        Err(e) => Err(match e.kind() {
            io::ErrorKind::NotFound => CliError::NoSocket(socket.to_owned()),
            io::ErrorKind::ConnectionRefused => CliError::ConnectionRefused(socket.to_owned()),
            io::ErrorKind::PermissionDenied => CliError::SocketPermission(socket.to_owned()),
            _ => CliError::Socket { path: socket.to_owned(), source: e },
        }),
    }
}

/// Probes the socket, then connects as `cli-<pid>` and waits up to
/// [`AGENT_TIMEOUT`] for the broker's welcome. `run_as` (the
/// configuration's) is a uid the broker may be served by besides the
/// usual ones (root, this user): the agent's unprivileged worker.
pub fn connect(socket: &Path, run_as: Option<&str>) -> Result<Client, CliError> {
    probe_socket(socket)?;
    let mut cfg = ClientConfig::new(socket, format!("cli-{}", std::process::id()));
    cfg.timeout = AGENT_TIMEOUT;
    if let Some(Ok(Some(user))) = run_as.map(nix::unistd::User::from_name) {
        cfg.server_uids.push(user.uid.as_raw());
    }
    let client = Client::connect(cfg)?;
    client.wait_state(AGENT_TIMEOUT, |s| s != ConnectionState::Disconnected);
    match client.state() {
        ConnectionState::Connected => Ok(client),
        ConnectionState::Refused => Err(CliError::ClientRefused(socket.to_owned())),
        ConnectionState::Disconnected => Err(CliError::NotWelcomed(socket.to_owned())),
        ConnectionState::Closed => Err(CliError::Bus(ClientError::Closed)),
    }
}

/// Asks the agent for its status.
pub fn fetch_status(client: &Client) -> Result<AgentStatus, CliError> {
    let reply = client
        .request(STATUS_TOPIC, &topic::STATUS.encode_request(&api::StatusRequest), AGENT_TIMEOUT)
        .map_err(|e| match e {
            ClientError::Timeout(_)
            | ClientError::NoResponders { .. }
            | ClientError::ResponderGone { .. } => CliError::NoAnswer,
            other => CliError::Bus(other),
        })?;
    if reply.from != api::AGENT_CLIENT_ID {
        return Err(CliError::BadReply(format!("answered by {:?}, not the agent", reply.from)));
    }
    api::decode(&reply.payload).map_err(|e| CliError::BadReply(e.to_string()))
}

/// Opens the event store read-only, with advice for the usual failures.
pub fn open_store(path: &Path) -> Result<EventStore, CliError> {
    // SQLite reports an unreadable file as "unable to open database file";
    // the OS says why.
    if let Err(e) = std::fs::File::open(path) {
        match e.kind() {
            io::ErrorKind::NotFound => return Err(CliError::NoStore(path.to_owned())),
            io::ErrorKind::PermissionDenied => return Err(CliError::StorePermission(path.to_owned())),
            _ => {}
        }
    }
    EventStore::open_read_only(path).map_err(|e| match e {
        StoreError::NotFound { path } => CliError::NoStore(path),
        other => CliError::Store(other),
    })
}

/// Parses `30s`, `10m`, `2h`, `1d` or `1w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration: use a number and a unit, e.g. 30s, 10m, 2h, 1d");
    let digits = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = s.split_at(digits);
    let n: u64 = number.parse().map_err(|_| err())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(err()),
    };
    n.checked_mul(unit_secs).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"))
}

/// `now` minus `ago`, in Unix milliseconds (0 at the epoch).
pub fn since_ms(now_ms: u64, ago: Duration) -> u64 {
    now_ms.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX))
}

/// A stored event as the envelope it arrived in.
pub fn envelope(stored: StoredEvent) -> EventEnvelope {
    EventEnvelope {
        collector_id: stored.collector_id,
        stream_id: stored.stream_id,
        seq: stored.seq,
        event: stored.event,
        position: None,
    }
}

/// Whether a followed event passes the filters of an [`EventQuery`] (its
/// `after_id` and `limit` do not apply to bus messages).
pub fn event_matches(q: &EventQuery, env: &EventEnvelope) -> bool {
    let e = &env.event;
    q.since_ms.is_none_or(|s| e.observed_unix_ms >= s)
        && q.until_ms.is_none_or(|u| e.observed_unix_ms < u)
        && q.pid.is_none_or(|p| e.process.pid == p)
        && q.name.as_ref().is_none_or(|n| e.process.name == *n)
        && q.kind.is_none_or(|k| e.kind == k)
        && q.collector_id.as_ref().is_none_or(|c| env.collector_id == *c)
}

/// Whether a followed alert passes the filters of an [`AlertQuery`].
pub fn alert_matches(q: &AlertQuery, a: &Alert) -> bool {
    q.since_ms.is_none_or(|s| a.raised_unix_ms >= s)
        && q.rule.as_ref().is_none_or(|r| a.rule == *r)
        && q.min_severity.is_none_or(|m| a.severity >= m)
        && q.after_id.is_none_or(|id| a.id > id)
}

/// The highest `seq` printed per stream, so `--follow` prints each event
/// once: an event the store query already showed, or one a collector
/// replays after a reconnect, is not printed again.
#[derive(Debug, Default)]
pub struct SeenStreams {
    through: HashMap<(String, u64), u64>,
}

impl SeenStreams {
    /// True (and remembered) when `env` is newer than everything printed
    /// from its stream.
    pub fn admit(&mut self, env: &EventEnvelope) -> bool {
        let last = self.through.entry((env.collector_id.clone(), env.stream_id)).or_insert(0);
        if env.seq <= *last {
            return false;
        }
        *last = env.seq;
        true
    }
}

/// Left-aligned columns two spaces apart. Widths grow to fit the rows
/// given to [`Table::fit`]; rows printed later (`--follow`) keep them.
#[derive(Debug, Clone)]
pub struct Table {
    widths: Vec<usize>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        Table { widths: headers.iter().map(|h| h.chars().count()).collect() }
    }

    /// Widens the columns to fit a row.
    pub fn fit<S: AsRef<str>>(&mut self, row: &[S]) {
        for (w, cell) in self.widths.iter_mut().zip(row) {
            *w = (*w).max(printable(cell.as_ref()).chars().count());
        }
    }

    /// One line (no newline, no trailing spaces).
    pub fn line<S: AsRef<str>>(&self, row: &[S]) -> String {
        let mut out = String::new();
        for (i, cell) in row.iter().enumerate() {
            let cell = printable(cell.as_ref());
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(&cell);
            if i + 1 < row.len() {
                let width = self.widths.get(i).copied().unwrap_or(0);
                out.extend(std::iter::repeat_n(' ', width.saturating_sub(cell.chars().count())));
            }
        }
        out.trim_end().to_owned()
    }

    /// A whole table: headers, then rows.
    pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
        let mut table = Table::new(headers);
        for row in rows {
            table.fit(row);
        }
        let mut out = table.line(headers);
        for row in rows {
            out.push('\n');
            out.push_str(&table.line(row));
        }
        out
    }
}

/// A duration for people: `45s`, `3m12s`, `2h05m`, `3d04h`.
pub fn format_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m{:02}s", s / 60, s % 60),
        3_600..86_400 => format!("{}h{:02}m", s / 3_600, s % 3_600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3_600),
    }
}

/// The age of a Unix-milliseconds time at `now_ms`.
fn age(now_ms: u64, at_ms: u64) -> String {
    format_age(Duration::from_millis(now_ms.saturating_sub(at_ms)))
}

/// Unix milliseconds as UTC, RFC 3339 to the second: `2024-05-01T12:34:56Z`.
pub fn format_utc(ms: u64) -> String {
    let secs = ms / 1_000;
    let (y, m, d) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2));
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The collector table's headers. EVENTS counts the events stored;
/// SOURCE is where they come from (`kernel` or `poll`, as the last
/// heartbeat says).
pub const COLLECTOR_HEADERS: [&str; 13] = [
    "COLLECTOR",
    "TYPE",
    "PHASE",
    "PID",
    "REGISTERED",
    "LAST HEARTBEAT",
    "MISSED",
    "RESTARTS",
    "LAST EXIT",
    "EVENTS",
    "SOURCE",
    "TASKS (FAILED, AVG)",
    "LAST ESCALATION",
];

/// One collector as a table row.
pub fn collector_row(c: &CollectorStatus, now_ms: u64) -> Vec<String> {
    let pid = match (c.pid, c.adopted) {
        (Some(pid), true) => format!("{pid} (adopted)"),
        (Some(pid), false) => pid.to_string(),
        (None, _) => "-".to_owned(),
    };
    let heartbeat = c
        .heartbeat
        .as_ref()
        .map_or("-".to_owned(), |h| format!("{} ago, {}", age(now_ms, h.received_unix_ms), h.status));
    let escalation = c
        .escalation
        .last()
        .map_or("-".to_owned(), |s| format!("{}: {} ({} ago)", s.step, s.outcome, age(now_ms, s.at_unix_ms)));
    vec![
        c.id.clone(),
        c.collector_type.clone(),
        c.phase.name().to_owned(),
        pid,
        if c.registered { "yes" } else { "no" }.to_owned(),
        heartbeat,
        c.missed_heartbeats.to_string(),
        c.restarts.to_string(),
        c.last_exit.clone().unwrap_or_else(|| "-".to_owned()),
        c.events_stored.to_string(),
        c.heartbeat.as_ref().map_or("-", |h| h.event_source.source.as_str()).to_owned(),
        task_cell(c),
        escalation,
    ]
}

/// The line below the collector table about a collector's event source:
/// the kernel path's counters, or why `--events auto` fell back to
/// polling. `None` before its first heartbeat and for a collector that
/// polls by choice (`--events poll`: the SOURCE column says it all). The
/// reason is the collector's text, made printable.
pub fn event_source_line(c: &CollectorStatus) -> Option<String> {
    let s = &c.heartbeat.as_ref()?.event_source;
    let id = printable(&c.id);
    match (s.source, &s.fallback_reason) {
        (EventSource::Kernel, _) => Some(format!(
            "{id} events: kernel, {} received, {} overruns, {} resyncs, {} caught by poll",
            s.kernel_events, s.overruns, s.resyncs, s.caught_by_poll
        )),
        (EventSource::Poll, Some(reason)) => {
            Some(format!("{id} events: poll (kernel unavailable: {})", printable(reason)))
        }
        (EventSource::Poll, None) => None,
    }
}

/// The line below the collector table about a collector's delivery lag
/// and WAL, as its last heartbeat stated them.
pub fn delivery_line(d: &CollectorDelivery) -> String {
    let s = &d.status;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut line = format!(
        "{} delivery: {} unacknowledged, oldest {} (stall after {}s){}; stream {} base {} next {}; \
         WAL {:.1} of {:.1} MiB",
        printable(&d.collector_id),
        s.unacknowledged,
        format_age(Duration::from_millis(s.oldest_unacknowledged_ms)),
        d.ack_stall_secs,
        if d.stalled { " STALLED" } else { "" },
        s.stream_id,
        s.base,
        s.next,
        mib(s.wal_bytes),
        mib(s.wal_cap_bytes),
    );
    if s.wal_full || s.wal_full_times > 0 {
        line.push_str(&format!(
            "{}, cap reached {} time(s), {} events refused",
            if s.wal_full { " FULL" } else { "" },
            s.wal_full_times,
            s.events_refused
        ));
    }
    line
}

/// Tasks a collector served: as the agent measured them (its own tasks,
/// round trip), else as the collector's heartbeat counts them.
fn task_cell(c: &CollectorStatus) -> String {
    let t = &c.tasks;
    let (served, failed, avg_us) = match &c.heartbeat {
        _ if t.served > 0 || t.failed > 0 => (t.served, t.failed, t.avg_latency_us),
        Some(h) if h.tasks_served > 0 || h.tasks_failed > 0 => {
            (h.tasks_served, h.tasks_failed, h.task_latency_avg_us)
        }
        _ => return "-".to_owned(),
    };
    format!("{served} ({failed}, {:.1} ms)", avg_us as f64 / 1000.0)
}

/// `daemoneye-cli status` for people.
pub fn render_status(s: &AgentStatus, now_ms: u64) -> String {
    let mut out = format!(
        "agent     {} for {} (pid {}, version {}), up {}\n",
        s.state.name(),
        age(now_ms, s.state_since_unix_ms),
        s.pid,
        s.version,
        format_age(Duration::from_secs(s.uptime_secs))
    );
    if let AgentState::StartupFailed { reason } = &s.state {
        out.push_str(&format!("reason    {reason}\n"));
    }
    out.push('\n');
    if s.collectors.is_empty() {
        out.push_str("(no collectors configured)\n");
    } else {
        let rows: Vec<Vec<String>> = s.collectors.iter().map(|c| collector_row(c, now_ms)).collect();
        out.push_str(&Table::render(&COLLECTOR_HEADERS, &rows));
        out.push('\n');
        for line in s.collectors.iter().filter_map(event_source_line) {
            out.push_str(&line);
            out.push('\n');
        }
        for d in &s.delivery {
            out.push_str(&delivery_line(d));
            out.push('\n');
        }
    }
    let b = &s.broker;
    out.push_str(&format!(
        "\nbroker    {}: {} connections, {} subscriptions; published {}, delivered {}, dropped {}, \
         forbidden {}, refused {}, protocol errors {}\n",
        b.socket,
        b.connections,
        b.subscriptions,
        b.published,
        b.delivered,
        b.dropped,
        b.forbidden,
        b.refused,
        b.protocol_errors
    ));
    let st = &s.store;
    let last = st.last_commit_unix_ms.map_or("never".to_owned(), |t| format!("{} ago", age(now_ms, t)));
    out.push_str(&format!(
        "store     {}: {} events committed, {} duplicates, {} rejected, {} batches, {} pruned, \
         {} errors; last commit {last}\n",
        st.path, st.events_committed, st.duplicates, st.rejected, st.batches, st.pruned, st.errors
    ));
    out.push_str(&format!("rules     {} loaded, {} alerts raised\n", st.rules, st.alerts_raised));
    let t = &s.tasks;
    out.push_str(&format!(
        "tasks     {} requests: {} answered, {} unanswered, {} failovers, {} timeouts; {} gathered, {} partial; \
         balance snapshot {:?}, inspect {:?}, hash {:?}\n",
        t.requests,
        t.answered,
        t.unanswered,
        t.failovers,
        t.timeouts,
        t.gathers,
        t.partial_gathers,
        t.balance.snapshot,
        t.balance.inspect,
        t.balance.hash
    ));
    out
}

/// The alert table's headers.
pub const ALERT_HEADERS: [&str; 7] = ["TIME (UTC)", "SEVERITY", "RULE", "PID", "NAME", "EXE", "COLLECTOR"];

/// One alert as a table row.
pub fn alert_row(a: &Alert) -> Vec<String> {
    vec![
        format_utc(a.raised_unix_ms),
        a.severity.as_str().to_owned(),
        a.rule.clone(),
        a.pid.to_string(),
        a.name.clone(),
        a.exe.clone().unwrap_or_else(|| "-".to_owned()),
        a.collector_id.clone(),
    ]
}

/// One rule, as `rules list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRow {
    /// Its name.
    pub name: String,
    /// Its severity.
    pub severity: Severity,
    /// Whether the agent runs it.
    pub enabled: bool,
    /// `builtin` or `config`.
    pub source: &'static str,
    /// What a match means.
    pub description: String,
    /// Its query.
    pub sql: String,
}

/// The rules list headers.
pub const RULE_HEADERS: [&str; 5] = ["NAME", "SEVERITY", "ENABLED", "SOURCE", "DESCRIPTION"];

/// Every rule the configuration knows: the built-ins (enabled when
/// `default_rules` is on), then agent.yaml's.
pub fn rule_rows(cfg: &AgentConfig) -> Vec<RuleRow> {
    let builtin = crate::rules::DEFAULT_RULES.iter().map(|r| RuleRow {
        name: r.name.to_owned(),
        severity: r.severity,
        enabled: cfg.default_rules,
        source: "builtin",
        description: r.description.to_owned(),
        sql: r.sql.to_owned(),
    });
    let configured = cfg.rules.iter().map(|r| RuleRow {
        name: r.name.clone(),
        severity: r.severity,
        enabled: r.enabled,
        source: "config",
        description: r.description.clone(),
        sql: r.sql.clone(),
    });
    builtin.chain(configured).collect()
}

impl RuleRow {
    /// The row's cells for [`RULE_HEADERS`].
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.severity.as_str().to_owned(),
            if self.enabled { "yes" } else { "no" }.to_owned(),
            self.source.to_owned(),
            self.description.clone(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        BrokerStatus, CollectorPhase, EscalationStep, HeartbeatInfo, StoreStatus, TaskCounts, TasksStatus,
    };
    use daemoneye_contract::control::EventSourceStatus;
    use daemoneye_contract::event::EventKind;

    fn env(collector: &str, seq: u64, kind: EventKind, pid: u32, name: &str) -> EventEnvelope {
        let process = daemoneye_contract::testing::record(pid, seq, name);
        daemoneye_contract::testing::envelope(collector, 1, seq, kind, process, 1_000 * seq)
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        for bad in ["xyz", "30", "s", "", "1.5h", "-1h", "10 m", "99999999999999999999d"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert!(parse_duration("18446744073709551615w").unwrap_err().contains("too long"));
        assert_eq!(since_ms(10_000, Duration::from_secs(3)), 7_000);
        assert_eq!(since_ms(10, Duration::from_secs(3)), 0);
    }

    #[test]
    fn ages_and_times_read_well() {
        assert_eq!(format_age(Duration::from_secs(45)), "45s");
        assert_eq!(format_age(Duration::from_secs(192)), "3m12s");
        assert_eq!(format_age(Duration::from_secs(7_500)), "2h05m");
        assert_eq!(format_age(Duration::from_secs(273_600)), "3d04h");
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_714_566_896_789), "2024-05-01T12:34:56Z");
    }

    #[test]
    fn tables_align_and_keep_widths_for_later_rows() {
        let rows = vec![vec!["a".to_owned(), "long cell".to_owned(), "x".to_owned()]];
        let text = Table::render(&["H1", "H2", "H3"], &rows);
        assert_eq!(text, "H1  H2         H3\na   long cell  x");
        let mut t = Table::new(&["H1", "H2"]);
        t.fit(&["abcd", "y"]);
        assert_eq!(t.line(&["a", "b"]), "a     b");
        assert_eq!(t.line(&["toolong", ""]), "toolong");
    }

    #[test]
    fn newest_n_are_the_highest_ids_of_the_matching_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EventStore::open(&dir.path().join("events.db")).unwrap();
        let batch: Vec<EventEnvelope> = (1..=10)
            .map(|seq| {
                let kind = if seq % 2 == 0 { EventKind::Stopped } else { EventKind::Started };
                env("c1", seq, kind, 100 + u32::try_from(seq % 3).unwrap(), "sh")
            })
            .collect();
        store.insert_batch(&batch).unwrap();
        let seqs = |q: &EventQuery, n| -> Vec<u64> {
            store.query_newest(q, n).unwrap().into_iter().map(|e| e.seq).collect()
        };
        let all = EventQuery::default();
        assert_eq!(seqs(&all, 3), vec![8, 9, 10]);
        assert_eq!(seqs(&all, 0), (1..=10).collect::<Vec<_>>());
        assert_eq!(seqs(&all, 50), (1..=10).collect::<Vec<_>>());
        let started = EventQuery { kind: Some(EventKind::Started), ..Default::default() };
        assert_eq!(seqs(&started, 2), vec![7, 9]);
        let pid = EventQuery { pid: Some(101), since_ms: Some(2_000), ..Default::default() };
        assert_eq!(seqs(&pid, 2), vec![7, 10]);
        let other = EventQuery { collector_id: Some("c2".to_owned()), ..Default::default() };
        assert_eq!(seqs(&other, 2), Vec::<u64>::new());
        // The SQL filter agrees with the one applied to followed events.
        for q in [&all, &started, &pid, &other] {
            let expected: Vec<u64> = batch.iter().filter(|e| event_matches(q, e)).map(|e| e.seq).collect();
            assert_eq!(seqs(q, 0), expected, "{q:?}");
        }
    }

    #[test]
    fn seen_streams_admit_each_event_once_per_stream() {
        let mut seen = SeenStreams::default();
        assert!(seen.admit(&env("c1", 5, EventKind::Started, 1, "a")));
        assert!(!seen.admit(&env("c1", 5, EventKind::Started, 1, "a")));
        assert!(!seen.admit(&env("c1", 4, EventKind::Started, 1, "a")));
        assert!(seen.admit(&env("c2", 1, EventKind::Started, 1, "a")));
        assert!(seen.admit(&env("c1", 6, EventKind::Started, 1, "a")));
    }

    #[test]
    fn alerts_match_rule_severity_and_time() {
        let alert = Alert {
            id: 3,
            rule: "r".to_owned(),
            severity: Severity::High,
            description: String::new(),
            event_id: 1,
            collector_id: "c".to_owned(),
            pid: 1,
            name: "n".to_owned(),
            exe: None,
            command_line: None,
            observed_unix_ms: 5,
            raised_unix_ms: 10,
        };
        let q = |q: AlertQuery| alert_matches(&q, &alert);
        assert!(q(AlertQuery::default()));
        assert!(q(AlertQuery { min_severity: Some(Severity::Medium), ..Default::default() }));
        assert!(!q(AlertQuery { min_severity: Some(Severity::Critical), ..Default::default() }));
        assert!(!q(AlertQuery { rule: Some("other".to_owned()), ..Default::default() }));
        assert!(!q(AlertQuery { since_ms: Some(11), ..Default::default() }));
        assert!(!q(AlertQuery { after_id: Some(3), ..Default::default() }));
        assert_eq!(alert_row(&alert)[5], "-");
    }

    #[test]
    fn status_shows_state_reason_collectors_and_counters() {
        let status = AgentStatus {
            pid: 42,
            version: "0.1.0".to_owned(),
            state: AgentState::StartupFailed { reason: "procmond never registered".to_owned() },
            state_since_unix_ms: 10_000,
            uptime_secs: 75,
            collectors: vec![CollectorStatus {
                id: "procmond".to_owned(),
                collector_type: "process-monitor".to_owned(),
                phase: CollectorPhase::Degraded,
                pid: Some(77),
                adopted: true,
                registered: true,
                heartbeat: Some(HeartbeatInfo {
                    sequence: 3,
                    status: "healthy".to_owned(),
                    received_unix_ms: 50_000,
                    processes_collected: 0,
                    events_published: 0,
                    buffer_level_percent: 0.0,
                    cycles: 0,
                    errors: 0,
                    tasks_served: 5,
                    tasks_failed: 0,
                    task_latency_avg_us: 900,
                    event_source: EventSourceStatus {
                        source: EventSource::Kernel,
                        fallback_reason: None,
                        kernel_events: 12_345,
                        overruns: 1,
                        resyncs: 2,
                        caught_by_poll: 3,
                    },
                }),
                missed_heartbeats: 1,
                restarts: 2,
                last_exit: Some("signal 9 (SIGKILL)".to_owned()),
                escalation: vec![EscalationStep {
                    step: "health_check".to_owned(),
                    outcome: "answered".to_owned(),
                    at_unix_ms: 55_000,
                }],
                events_stored: 1234,
                tasks: TaskCounts { served: 300, failed: 2, avg_latency_us: 1_250 },
            }],
            broker: BrokerStatus { socket: "/s".to_owned(), published: 9, ..Default::default() },
            store: StoreStatus { path: "/db".to_owned(), events_committed: 8, ..Default::default() },
            tasks: TasksStatus { requests: 310, failovers: 4, ..Default::default() },
            delivery: vec![CollectorDelivery {
                collector_id: "procmond".to_owned(),
                status: daemoneye_contract::control::DeliveryStatus {
                    stream_id: 5,
                    base: 10,
                    next: 20,
                    unacknowledged: 10,
                    oldest_unacknowledged_ms: 130_000,
                    wal_bytes: 3 << 20,
                    wal_cap_bytes: 4 << 20,
                    wal_full: true,
                    wal_full_times: 2,
                    events_refused: 17,
                },
                ack_stall_secs: 120,
                stalled: true,
            }],
        };
        let text = render_status(&status, 60_000);
        assert!(
            text.starts_with("agent     StartupFailed for 50s (pid 42, version 0.1.0), up 1m15s"),
            "{text}"
        );
        assert!(text.contains("reason    procmond never registered"), "{text}");
        for cell in ["procmond", "degraded", "77 (adopted)", "10s ago, healthy", "signal 9 (SIGKILL)", "1234"]
        {
            assert!(text.contains(cell), "{cell}: {text}");
        }
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("COLLECTOR")).expect("table header");
        assert!(lines[header].contains("  EVENTS  SOURCE  TASKS"), "{text}");
        assert!(lines[header + 1].contains("  1234    kernel  "), "{text}");
        assert_eq!(
            lines[header + 2],
            "procmond events: kernel, 12345 received, 1 overruns, 2 resyncs, 3 caught by poll"
        );
        assert_eq!(
            lines[header + 3],
            "procmond delivery: 10 unacknowledged, oldest 2m10s (stall after 120s) STALLED; stream 5 base 10 \
             next 20; WAL 3.0 of 4.0 MiB FULL, cap reached 2 time(s), 17 events refused"
        );
        assert_eq!(lines[header + 4], "", "{text}");
        assert!(text.contains("health_check: answered (5s ago)"), "{text}");
        assert!(text.contains("published 9") && text.contains("8 events committed"), "{text}");
        assert!(text.contains("last commit never"), "{text}");
        // The agent's own measure wins over the heartbeat's.
        assert!(text.contains("300 (2, 1.2 ms)"), "{text}");
        assert!(text.contains("tasks     310 requests") && text.contains("4 failovers"), "{text}");
    }

    fn collector(id: &str, event_source: Option<EventSourceStatus>) -> CollectorStatus {
        CollectorStatus {
            id: id.to_owned(),
            collector_type: "process-monitor".to_owned(),
            phase: CollectorPhase::Running,
            pid: Some(7),
            adopted: false,
            registered: true,
            heartbeat: event_source.map(|event_source| HeartbeatInfo {
                sequence: 1,
                status: "healthy".to_owned(),
                received_unix_ms: 1_000,
                processes_collected: 0,
                events_published: 0,
                buffer_level_percent: 0.0,
                cycles: 0,
                errors: 0,
                tasks_served: 0,
                tasks_failed: 0,
                task_latency_avg_us: 0,
                event_source,
            }),
            missed_heartbeats: 0,
            restarts: 0,
            last_exit: None,
            escalation: Vec::new(),
            events_stored: 0,
            tasks: TaskCounts::default(),
        }
    }

    #[test]
    fn each_collector_says_where_its_events_come_from() {
        let kernel = EventSourceStatus {
            source: EventSource::Kernel,
            kernel_events: 12_345,
            caught_by_poll: 3,
            ..Default::default()
        };
        let fallback = EventSourceStatus {
            source: EventSource::Poll,
            // A hostile or broken collector cannot forge a line.
            fallback_reason: Some("needs CAP_NET_ADMIN\npm-x events: kernel\u{1b}[2J".to_owned()),
            ..Default::default()
        };
        let collectors = vec![
            collector("pm-a", Some(kernel)),
            collector("pm-b", Some(fallback)),
            collector("pm-c", Some(EventSourceStatus::default())),
            collector("pm-d", None),
        ];
        let lines: Vec<Option<String>> = collectors.iter().map(event_source_line).collect();
        assert_eq!(
            lines,
            vec![
                Some("pm-a events: kernel, 12345 received, 0 overruns, 0 resyncs, 3 caught by poll".to_owned()),
                Some("pm-b events: poll (kernel unavailable: needs CAP_NET_ADMIN\\npm-x events: kernel\\u{1b}[2J)".to_owned()),
                None,
                None,
            ]
        );
        let sources: Vec<String> = collectors.iter().map(|c| collector_row(c, 2_000)[10].clone()).collect();
        assert_eq!(sources, ["kernel", "poll", "poll", "-"]);

        let status = AgentStatus {
            pid: 1,
            version: "0.1.0".to_owned(),
            state: AgentState::SteadyState,
            state_since_unix_ms: 0,
            uptime_secs: 1,
            collectors,
            broker: BrokerStatus::default(),
            store: StoreStatus::default(),
            tasks: TasksStatus::default(),
            delivery: Vec::new(),
        };
        let text = render_status(&status, 2_000);
        let below: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("pm-d")).skip(1).take(3).collect();
        assert_eq!(below, [lines[0].as_deref().unwrap(), lines[1].as_deref().unwrap(), ""], "{text}");
        assert_eq!(text.lines().filter(|l| l.contains("events:")).count(), 2, "{text}");
        // --json carries the whole struct.
        let json: serde_json::Value = serde_json::to_value(&status).unwrap();
        let es = &json["collectors"][0]["heartbeat"]["event_source"];
        assert_eq!((es["kernel_events"].as_u64(), es["caught_by_poll"].as_u64()), (Some(12_345), Some(3)));
        assert_eq!(es["source"], "Kernel");
        let reason = &json["collectors"][1]["heartbeat"]["event_source"]["fallback_reason"];
        assert!(reason.as_str().unwrap().starts_with("needs CAP_NET_ADMIN"), "{json}");
    }

    #[test]
    fn the_config_loads_without_collector_binaries_and_still_checks_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        // No procmond next to the "CLI".
        let cfg = load_config(None, dir.path()).unwrap();
        assert_eq!(cfg.collectors.len(), 1);
        assert!(cfg.collectors[0].enabled);
        let file = dir.path().join("agent.yaml");
        std::fs::write(
            &file,
            "collectors:\n  - {id: a, binary: /nonexistent/procmond}\n\
             \x20 - {id: b, binary: x, enabled: false}\n",
        )
        .unwrap();
        let cfg = load_config(Some(&file), dir.path()).unwrap();
        assert_eq!(cfg.collectors.iter().map(|c| c.enabled).collect::<Vec<_>>(), vec![true, false]);
        std::fs::write(&file, "collectors:\n  - {id: a, binary: missing, startup_timeout_secs: 0}\n")
            .unwrap();
        let e = load_config(Some(&file), dir.path()).unwrap_err();
        assert_eq!(e.field, "collectors[0].startup_timeout_secs");
    }

    #[test]
    fn rules_list_builtins_then_configured_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.yaml");
        std::fs::write(
            &file,
            "default_rules: false\n\
             rules:\n  - {name: mine, severity: low, sql: 'SELECT id FROM new_events'}\n",
        )
        .unwrap();
        let rows = rule_rows(&load_config(Some(&file), dir.path()).unwrap());
        let builtins = crate::rules::DEFAULT_RULES.len();
        assert_eq!(rows.len(), builtins + 1);
        assert!(rows[..builtins].iter().all(|r| r.source == "builtin" && !r.enabled));
        assert_eq!((rows[builtins].name.as_str(), rows[builtins].source), ("mine", "config"));
        assert_eq!(rows[builtins].cells()[2], "yes");
    }

    #[test]
    fn socket_errors_become_advice_and_exit_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        let e = probe_socket(&path).unwrap_err();
        assert!(matches!(e, CliError::NoSocket(_)), "{e:?}");
        assert_eq!(e.exit_code(), 2);
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = probe_socket(&path).unwrap_err();
        assert!(e.to_string().contains("connection refused"), "{e}");
        assert_eq!(e.exit_code(), 2);
        assert_eq!(CliError::NoStore(path).exit_code(), 1);
    }
}
