//! What `daemoneye-cli` prints for people: left-aligned tables, ages,
//! UTC times, the `status` report, alert rows and the rules list. Events
//! are printed by `daemoneye_contract::render` (text) and
//! `daemoneye_contract::ecs` (JSON), shared with procmond; `ps`, `inspect`
//! and `hash` by `cli_tasks`.

use std::time::Duration;

use daemoneye_contract::event::EventSource;
use daemoneye_contract::render::printable;
use serde::Serialize;

use crate::api::{AgentState, AgentStatus, Alert, CollectorDelivery, CollectorStatus};
use crate::config::{AgentConfig, Severity};

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

/// One output's line in `status`: its row in the store and its lag.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutputStatus {
    /// The output's name.
    pub name: String,
    /// `ok`, `retrying` or `stopped`.
    pub state: String,
    /// Stored events it has not passed yet.
    pub lag_events: u64,
    /// How old the oldest of them is, seconds (0 when none).
    pub lag_secs: u64,
    /// Events and alerts its receiver accepted (all time).
    pub sent: u64,
    /// Failed attempts (all time).
    pub retried: u64,
    /// Documents sent again (a bound on the duplicates at the receiver).
    pub resent: u64,
    /// Events retention deleted before it sent them.
    pub lost: u64,
    /// The last failure since the last success.
    pub last_error: Option<String>,
    /// The highest event and alert row ids it is done with.
    pub events_through: i64,
    /// The highest alert row id it is done with.
    pub alerts_through: i64,
}

impl OutputStatus {
    /// From the store's row and lag ([`daemoneye_store::outputs`]).
    pub fn new(
        c: daemoneye_store::outputs::OutputCursor,
        lag: (u64, Option<u64>),
        now_ms: u64,
    ) -> OutputStatus {
        OutputStatus {
            state: c.state,
            lag_events: lag.0,
            lag_secs: lag.1.map_or(0, |t| now_ms.saturating_sub(t) / 1000),
            sent: c.sent,
            retried: c.retried,
            resent: c.resent,
            lost: c.lost,
            last_error: c.last_error,
            events_through: c.events_through,
            alerts_through: c.alerts_through,
            name: c.name,
        }
    }

    /// The status of each output `cfg` configures that has a row in the
    /// store (an output that never ran has none), in the store's order.
    pub fn read_all(
        conn: &rusqlite::Connection,
        cfg: &AgentConfig,
        now_ms: u64,
    ) -> rusqlite::Result<Vec<OutputStatus>> {
        let mut out = Vec::new();
        for c in daemoneye_store::outputs::read(conn, None)? {
            if cfg.outputs.iter().any(|o| o.name == c.name) {
                let lag = daemoneye_store::outputs::event_lag(conn, c.events_through)?;
                out.push(OutputStatus::new(c, lag, now_ms));
            }
        }
        Ok(out)
    }
}

/// The outputs' table in `status` (empty without outputs).
pub fn render_outputs(outputs: &[OutputStatus]) -> String {
    if outputs.is_empty() {
        return String::new();
    }
    let headers =
        ["OUTPUT", "STATE", "LAG (EVENTS)", "LAG (S)", "SENT", "RETRIED", "RESENT", "LOST", "LAST ERROR"];
    let rows: Vec<Vec<String>> = outputs
        .iter()
        .map(|o| {
            vec![
                o.name.clone(),
                o.state.clone(),
                o.lag_events.to_string(),
                o.lag_secs.to_string(),
                o.sent.to_string(),
                o.retried.to_string(),
                o.resent.to_string(),
                o.lost.to_string(),
                o.last_error.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    format!("\n{}", Table::render(&headers, &rows))
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
    use crate::cli::load_config;
    use daemoneye_contract::control::EventSourceStatus;

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
}
