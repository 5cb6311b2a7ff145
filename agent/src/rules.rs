//! Detection rules: SQL over the event tables, run on each committed batch
//! over the new rows only.

use crate::config::{RuleSpec, Severity};

/// A rule shipped with the agent.
#[derive(Debug, Clone, Copy)]
pub struct BuiltinRule {
    /// Its name.
    pub name: &'static str,
    /// Its severity.
    pub severity: Severity,
    /// What a match means.
    pub description: &'static str,
    /// Its query.
    pub sql: &'static str,
}

/// The built-in rules (`default_rules: true` in agent.yaml).
pub const DEFAULT_RULES: &[BuiltinRule] = &[
    BuiltinRule {
        name: "exe-in-temp-dir",
        severity: Severity::High,
        description: "a process runs an executable from /tmp, /var/tmp or /dev/shm",
        sql: "SELECT id FROM new_events WHERE kind != 'stopped' \
              AND (exe LIKE '/tmp/%' OR exe LIKE '/var/tmp/%' OR exe LIKE '/dev/shm/%')",
    },
    BuiltinRule {
        name: "deleted-exe-running",
        severity: Severity::Medium,
        description: "a process runs an executable that was deleted from disk",
        sql: "SELECT id FROM new_events WHERE kind != 'stopped' AND exe_deleted = 1",
    },
    BuiltinRule {
        name: "web-server-spawned-shell",
        severity: Severity::High,
        description: "a shell started by a web server process",
        sql: "SELECT n.id FROM new_events n \
              JOIN process_events p ON p.id = (SELECT max(id) FROM process_events \
                   WHERE pid = n.ppid AND id < n.id) \
              WHERE n.kind = 'started' \
              AND n.name IN ('sh', 'bash', 'dash', 'zsh', 'ksh', 'csh', 'tcsh', 'fish', 'busybox') \
              AND p.kind != 'stopped' \
              AND p.name IN ('nginx', 'apache2', 'httpd', 'lighttpd', 'php-fpm', 'caddy', 'uwsgi', 'gunicorn')",
    },
    BuiltinRule {
        name: "root-from-user-writable-dir",
        severity: Severity::Critical,
        description: "a new process runs as root from a user-writable directory",
        sql: "SELECT id FROM new_events WHERE kind = 'started' AND snapshot = 0 AND euid = 0 \
              AND (exe LIKE '/tmp/%' OR exe LIKE '/var/tmp/%' OR exe LIKE '/dev/shm/%' \
                   OR exe LIKE '/home/%' OR exe LIKE '/run/user/%')",
    },
];

/// The built-in rules as specs.
pub fn default_rules() -> Vec<RuleSpec> {
    DEFAULT_RULES
        .iter()
        .map(|r| RuleSpec {
            name: r.name.to_owned(),
            severity: r.severity,
            description: r.description.to_owned(),
            sql: r.sql.to_owned(),
            enabled: true,
        })
        .collect()
}

/// The alert tables, created by the store writer next to procmond's
/// tables in `events.db`:
///
/// - `alerts`: one row per (rule, event); the unique pair keeps a batch
///   that is evaluated twice (after a crash between its commit and its
///   rules) from raising the same alert twice.
/// - `rule_cursor`: the highest `process_events.id` the rules have seen,
///   so rows committed before a crash are still evaluated after it.
pub const ALERTS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS alerts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    rule         TEXT    NOT NULL,
    severity     TEXT    NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    description  TEXT    NOT NULL,
    event_id     INTEGER NOT NULL,
    collector_id TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    name         TEXT    NOT NULL,
    exe          TEXT,
    command_line TEXT,
    observed_ms  INTEGER NOT NULL,
    raised_ms    INTEGER NOT NULL,
    UNIQUE (rule, event_id)
);
CREATE INDEX IF NOT EXISTS alerts_raised ON alerts (raised_ms);
CREATE TABLE IF NOT EXISTS rule_cursor (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    through INTEGER NOT NULL
);
";

/// Which alerts [`query_alerts`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertQuery {
    /// Raised at or after this time (Unix milliseconds).
    pub since_ms: Option<u64>,
    /// From this rule.
    pub rule: Option<String>,
    /// At least this severe.
    pub min_severity: Option<Severity>,
    /// With an id above this (a follow cursor).
    pub after_id: Option<i64>,
    /// At most this many, the newest last; 0: no limit.
    pub limit: usize,
}

/// Reads alerts, oldest first. A database without the alert tables (no
/// agent has written to it yet) has no alerts.
pub fn query_alerts(conn: &rusqlite::Connection, q: &AlertQuery) -> rusqlite::Result<Vec<crate::api::Alert>> {
    let exists: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'alerts'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let severities: Vec<&str> = [Severity::Low, Severity::Medium, Severity::High, Severity::Critical]
        .into_iter()
        .filter(|s| q.min_severity.is_none_or(|m| *s >= m))
        .map(Severity::as_str)
        .collect();
    // The newest `limit` rows, returned oldest first.
    let sql = "SELECT * FROM (
            SELECT id, rule, severity, description, event_id, collector_id, pid, name, exe,
                   command_line, observed_ms, raised_ms
            FROM alerts
            WHERE (?1 IS NULL OR raised_ms >= ?1) AND (?2 IS NULL OR rule = ?2) AND id > ?3
              AND severity IN (SELECT value FROM json_each(?4))
            ORDER BY id DESC LIMIT ?5)
        ORDER BY id";
    let mut stmt = conn.prepare(sql)?;
    let limit = if q.limit == 0 { -1 } else { i64::try_from(q.limit).unwrap_or(i64::MAX) };
    let sev_json = serde_json::to_string(&severities).unwrap_or_else(|_| "[]".into());
    let since = q.since_ms.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    let rows =
        stmt.query_map(rusqlite::params![since, q.rule, q.after_id.unwrap_or(0), sev_json, limit], |r| {
            let severity: String = r.get(2)?;
            Ok(crate::api::Alert {
                id: r.get(0)?,
                rule: r.get(1)?,
                severity: match severity.as_str() {
                    "critical" => Severity::Critical,
                    "high" => Severity::High,
                    "medium" => Severity::Medium,
                    _ => Severity::Low,
                },
                description: r.get(3)?,
                event_id: r.get(4)?,
                collector_id: r.get(5)?,
                pid: r.get(6)?,
                name: r.get(7)?,
                exe: r.get(8)?,
                command_line: r.get(9)?,
                observed_unix_ms: r.get::<_, i64>(10)?.max(0).cast_unsigned(),
                raised_unix_ms: r.get::<_, i64>(11)?.max(0).cast_unsigned(),
            })
        })?;
    rows.collect()
}
