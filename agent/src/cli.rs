//! The pieces of `daemoneye-cli` worth testing on their own: reaching the
//! agent (a socket probe that turns OS errors into advice, then the bus
//! client), reading the store (the newest N events, not the oldest),
//! matching followed messages against the same filters as the query.
//! What it prints for people is in `cli_output` (and `cli_tasks`).
//!
//! Exit status is decided here too ([`CliError::exit_code`]): 2 when the
//! agent cannot be reached, 1 for every other failure.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemoneye_bus::{Client, ClientConfig, ClientError, ConnectionState};
use daemoneye_contract::control::name_matches;
use daemoneye_contract::event::EventEnvelope;
use daemoneye_contract::topic;
use daemoneye_store::{EventQuery, EventStore, StoreError, StoredEvent};

use crate::api::{self, AgentStatus, Alert, STATUS_TOPIC};
use crate::config::{AgentConfig, ConfigError, EMBEDDED_DEFAULT};
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
    let client = client(socket, run_as)?;
    client.wait_state(AGENT_TIMEOUT, |s| s != ConnectionState::Disconnected);
    match client.state() {
        ConnectionState::Connected => Ok(client),
        ConnectionState::Refused => Err(CliError::ClientRefused(socket.to_owned())),
        ConnectionState::Disconnected => Err(CliError::NotWelcomed(socket.to_owned())),
        ConnectionState::Closed => Err(CliError::Bus(ClientError::Closed)),
    }
}

/// A bus client for `socket` as `cli-<pid>`, returned at once: it connects,
/// and reconnects, by itself (`--follow` waits for an agent that is not up
/// yet this way). `run_as` as for [`connect`].
pub fn client(socket: &Path, run_as: Option<&str>) -> Result<Client, CliError> {
    let mut cfg = ClientConfig::new(socket, format!("cli-{}", std::process::id()));
    cfg.timeout = AGENT_TIMEOUT;
    if let Some(Ok(Some(user))) = run_as.map(nix::unistd::User::from_name) {
        cfg.server_uids.push(user.uid.as_raw());
    }
    Ok(Client::connect(cfg)?)
}

/// Whether `e` means the agent is not up (yet): no socket, nobody
/// listening, or no welcome. `--follow` waits for it then.
pub fn agent_not_up(e: &CliError) -> bool {
    matches!(e, CliError::NoSocket(_) | CliError::ConnectionRefused(_) | CliError::NotWelcomed(_))
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
        && q.name.as_ref().is_none_or(|n| {
            name_matches(n, &e.process.name, e.process.details.exe.as_ref().ok().map(|p| p.as_path()))
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli_output::alert_row;
    use crate::config::Severity;
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
    fn name_globs_match_the_name_or_the_executables_file_name_in_sql_and_on_the_bus() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EventStore::open(&dir.path().join("events.db")).unwrap();
        let mut batch: Vec<EventEnvelope> = ["sshd", "ssh-agent", "bash", "[x]", "x", "a*b"]
            .iter()
            .zip(1..)
            .map(|(name, seq)| env("c1", seq, EventKind::Started, 10, name))
            .collect();
        // A name cut at 15 bytes, its executable's file name whole; a
        // directory that matches is not a file name that matches.
        let mut cut = env("c1", 7, EventKind::Started, 10, "systemd-journal");
        let mut d = (*cut.event.process.details).clone();
        d.exe = Ok("/usr/lib/systemd/systemd-journald".into());
        cut.event.process.details = std::sync::Arc::new(d);
        batch.push(cut);
        let mut dir_only = env("c1", 8, EventKind::Started, 10, "python3");
        let mut d = (*dir_only.event.process.details).clone();
        d.exe = Ok("/opt/sshd/bin/python3".into());
        dir_only.event.process.details = std::sync::Arc::new(d);
        batch.push(dir_only);
        store.insert_batch(&batch).unwrap();
        for (pattern, expected) in [
            ("sshd", vec![1]),
            ("ssh*", vec![1, 2]),
            ("*sh*", vec![1, 2, 3]),
            ("?ash", vec![3]),
            ("[x]", vec![4]),
            ("x", vec![5]),
            ("a*b", vec![6]),
            ("*journald", vec![7]),
            ("SSHD", vec![]),
            ("*", (1..=8).collect()),
        ] {
            let q = EventQuery { name: Some(pattern.to_owned()), ..Default::default() };
            let sql: Vec<u64> = store.query(&q).unwrap().into_iter().map(|e| e.seq).collect();
            assert_eq!(sql, expected, "{pattern}");
            let bus: Vec<u64> = batch.iter().filter(|e| event_matches(&q, e)).map(|e| e.seq).collect();
            assert_eq!(bus, expected, "{pattern}");
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
