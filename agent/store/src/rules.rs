//! Detection rules: SQL over the event tables, run on each committed batch
//! over the new rows only.
//!
//! # The rule contract
//!
//! A rule's `sql` is one read-only statement that starts with `SELECT`,
//! `WITH` or `VALUES` and takes no parameters. It runs against the event
//! store's connection (schema in `daemoneye_store`), so it may read every
//! table: `process_events` (the whole stored history), `stream_watermarks`,
//! `stream_gaps`, `alerts`. The rows of the batch being evaluated are in the
//! temporary view `new_events`, which has the columns of `process_events`.
//! The function `daemoneye_self(exe, sha256)` says whether an executable is
//! one of DaemonEye's own, by path and hash ([`crate::own`]).
//!
//! **The first column of its result is the matching event's row id**
//! (`new_events.id`, which is its `process_events.id`); the other columns
//! are ignored, whatever their names. A rule whose first column comes from
//! anywhere else (`SELECT pid …`, `SELECT name …`, an expression) is
//! refused: SQLite says where each result column comes from, through
//! views, subqueries and common table expressions. A first-column value that is not an
//! integer id inside the batch being evaluated is ignored (logged at
//! debug), so a rule that returns an older event's id (a parent's, say)
//! raises nothing: every alert is about a new event, and rows outside the
//! batch are never matched. Each returned id raises one alert, at most once
//! per (rule, event), carrying the rule's name, severity and description.
//!
//! [`RuleEngine::compile`] refuses a rule that does not prepare (syntax
//! error, unknown table or column: SQLite's message is in the error, with
//! the rule's name), that writes (`sqlite3_stmt_readonly`), that holds more
//! than one statement, that has parameters or returns no columns, and a
//! name used twice. A rule that fails while it runs is logged and skipped;
//! the other rules still run and the batch still counts as evaluated.
//!
//! # How a batch is evaluated
//!
//! [`RuleEngine::run`] runs in one transaction on the store's connection:
//! it sets the window `(after_id, through_id]` in the temporary table
//! `rule_window` (which `new_events` filters on), runs every rule, inserts
//! each new (rule, event) pair into `alerts` and moves `rule_cursor` to
//! `through_id`. A crash before that commit leaves the cursor behind, and
//! the store writer evaluates the window again when it restarts; the
//! unique (rule, event) pair keeps that from raising an alert twice.
//!
//! Rules run on the writer's thread, between commits: a slow rule delays
//! the next batch (and the collectors' acknowledgements), so a rule should
//! read `new_events` and reach older rows only through indexed columns
//! (`id`, `pid`, `name`, `kind`, `observed_ms`).
//!
//! # Time budget
//!
//! Each rule's query over a batch has a time budget
//! ([`RuleEngine::with_budget`], agent.yaml's `store.rule_budget_ms`,
//! [`DEFAULT_BUDGET`] unless set), enforced by SQLite's progress handler,
//! which looks at the clock every [`PROGRESS_STEPS`] virtual machine steps.
//! A rule over its budget is interrupted and logged at WARN with its name,
//! its budget and the window; that window is **skipped** for that rule
//! (the batch is stored and acknowledged, the other rules' alerts and the
//! cursor commit as usual, and the window is never evaluated by that rule
//! again, so an endless rule is not re-run forever on the same rows). A
//! rule over its budget in [`MAX_OVERRUNS`] consecutive batches is
//! disabled: logged at ERROR with its name, listed by
//! [`RuleEngine::disabled_rules`], and not run again until the engine is
//! compiled again (the agent restarts). A batch it finishes in time resets
//! its count. [`validate`] runs each rule once over an empty store within
//! [`DEFAULT_BUDGET`], so an endless rule (a recursive CTE without a
//! bound) is refused before it is ever loaded.

use std::collections::HashSet;
use std::ffi::c_int;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, params};

use daemoneye_contract::api::{Alert, Severity};
use serde::Deserialize;

/// A detection rule: an SQL query over the event tables (see `rules`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name (shown in alerts).
    pub name: String,
    /// How bad a match is.
    pub severity: Severity,
    /// What a match means, for the operator.
    #[serde(default)]
    pub description: String,
    /// A read-only `SELECT` over `new_events` (this batch's rows) and the
    /// other tables, returning the matching event's `id`.
    pub sql: String,
    /// Run at all.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

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

// The built-in rules look at events that start a program: a `started`
// event, or a `modified` one whose changes include `exec` (procmond may
// see a fork before its exec). Other `modified` events of the same process
// (credentials, reparent) would raise the same alert again for each change.
// Paths are matched with GLOB, which is case-sensitive like the file
// system (LIKE is not: '/TMP/x' is not in /tmp). The rules about where an
// executable lives leave out DaemonEye's own (`daemoneye_self`, by path
// and hash: crate::own), which a checkout under /tmp would run from there.

/// The built-in rules (`default_rules: true` in agent.yaml).
pub const DEFAULT_RULES: &[BuiltinRule] = &[
    BuiltinRule {
        name: "exe-in-temp-dir",
        severity: Severity::High,
        description: "a process runs an executable from /tmp, /var/tmp or /dev/shm",
        sql: "SELECT id FROM new_events \
              WHERE (kind = 'started' OR instr(',' || changes || ',', ',exec,') > 0) \
              AND (exe GLOB '/tmp/*' OR exe GLOB '/var/tmp/*' OR exe GLOB '/dev/shm/*') \
              AND NOT daemoneye_self(exe, sha256)",
    },
    BuiltinRule {
        name: "deleted-exe-running",
        severity: Severity::Medium,
        description: "a process runs an executable that was deleted from disk",
        // Started (or exec'd) from a deleted file, or its file deleted while
        // it runs: procmond reports the latter as an `exe_deleted` change,
        // also where the platform cannot set the `exe_deleted` column.
        sql: "SELECT id FROM new_events WHERE kind != 'stopped' AND ( \
              (exe_deleted = 1 AND (kind = 'started' OR instr(',' || changes || ',', ',exec,') > 0)) \
              OR instr(',' || changes || ',', ',exe_deleted,') > 0)",
    },
    BuiltinRule {
        name: "web-server-spawned-shell",
        severity: Severity::High,
        description: "a shell started by a web server process",
        // The parent is the latest event of `ppid` on the same collector
        // before the shell's own event (the pid index serves it).
        sql: "SELECT n.id FROM new_events n \
              JOIN process_events p ON p.id = (SELECT max(id) FROM process_events \
                   WHERE pid = n.ppid AND collector_id = n.collector_id AND id < n.id) \
              WHERE (n.kind = 'started' OR instr(',' || n.changes || ',', ',exec,') > 0) \
              AND n.name IN ('sh', 'bash', 'dash', 'zsh', 'ksh', 'csh', 'tcsh', 'fish', 'busybox') \
              AND p.kind != 'stopped' \
              AND (p.name IN ('nginx', 'apache2', 'httpd', 'lighttpd', 'caddy', 'uwsgi', 'gunicorn') \
                   OR p.name GLOB 'php-fpm*')",
    },
    BuiltinRule {
        name: "root-from-user-writable-dir",
        severity: Severity::Critical,
        description: "a new process runs as root from a user-writable directory",
        // New: started after the collector (not the snapshot), exec'd, or
        // just become root (credentials).
        sql: "SELECT id FROM new_events WHERE euid = 0 \
              AND ((kind = 'started' AND snapshot = 0) \
                   OR instr(',' || changes || ',', ',exec,') > 0 \
                   OR instr(',' || changes || ',', ',credentials,') > 0) \
              AND (exe GLOB '/tmp/*' OR exe GLOB '/var/tmp/*' OR exe GLOB '/dev/shm/*' \
                   OR exe GLOB '/home/*' OR exe GLOB '/run/user/*') \
              AND NOT daemoneye_self(exe, sha256)",
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
pub fn query_alerts(conn: &rusqlite::Connection, q: &AlertQuery) -> rusqlite::Result<Vec<Alert>> {
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
    let rows = stmt
        .query_map(rusqlite::params![since, q.rule, q.after_id.unwrap_or(0), sev_json, limit], alert_row)?;
    rows.collect()
}

/// The alerts with an id above `after_id`, the lowest first, at most
/// `limit` (an output's cursor: [`query_alerts`] keeps the newest). A
/// database without the alert tables has none.
pub fn alerts_after(
    conn: &rusqlite::Connection,
    after_id: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Alert>> {
    let exists: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'alerts'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT id, rule, severity, description, event_id, collector_id, pid, name, exe,
                command_line, observed_ms, raised_ms
         FROM alerts WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(rusqlite::params![after_id, limit], alert_row)?;
    rows.collect()
}

/// One row of the columns [`query_alerts`] selects.
fn alert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Alert> {
    let severity: String = r.get(2)?;
    Ok(Alert {
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
}

/// The temporary objects rules read, on the connection they run on:
/// `rule_window` holds the one window being evaluated (no row: an empty
/// window), `new_events` is its rows. The id range is written as two
/// scalar subqueries so SQLite scans `process_events` by its primary key.
const WINDOW_SCHEMA: &str = "
CREATE TEMP TABLE IF NOT EXISTS rule_window (lo INTEGER NOT NULL, hi INTEGER NOT NULL);
CREATE TEMP VIEW IF NOT EXISTS new_events AS
    SELECT * FROM process_events
    WHERE id > (SELECT lo FROM temp.rule_window) AND id <= (SELECT hi FROM temp.rule_window);
";

/// The event fields an alert carries.
const SELECT_EVENT: &str =
    "SELECT collector_id, pid, name, exe, argv, observed_ms FROM process_events WHERE id = ?1";

/// One alert; a (rule, event) pair already raised is left alone.
const INSERT_ALERT: &str = "
INSERT INTO alerts (rule, severity, description, event_id, collector_id, pid, name, exe,
                    command_line, observed_ms, raised_ms)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
ON CONFLICT (rule, event_id) DO NOTHING";

/// The cursor never moves back (a window evaluated again is a no-op).
const UPSERT_CURSOR: &str = "
INSERT INTO rule_cursor (id, through) VALUES (1, ?1)
ON CONFLICT (id) DO UPDATE SET through = max(through, excluded.through)";

/// A refused rule: its name and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {name}: {reason}")]
pub struct RuleError {
    /// The rule's name (`(alert tables)` when the tables the rules write
    /// could not be created).
    pub name: String,
    /// Why, with SQLite's message when it has one.
    pub reason: String,
}

/// How long one rule may run over one batch unless configured otherwise
/// (`store.rule_budget_ms`); also the limit of [`validate`]'s trial run.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(1000);

/// A rule over its time budget in this many consecutive batches is
/// disabled.
pub const MAX_OVERRUNS: u32 = 3;

/// SQLite virtual machine steps between two looks at the clock (a step is
/// well under a microsecond; reading the clock costs tens of nanoseconds).
pub const PROGRESS_STEPS: i32 = 1000;

/// A rule as the engine runs it.
#[derive(Debug)]
struct Rule {
    spec: RuleSpec,
    /// Runs that failed, for the log line.
    failures: u64,
    /// Consecutive batches it ran over its time budget.
    overruns: u32,
    /// Off for running over its budget [`MAX_OVERRUNS`] times in a row.
    disabled: bool,
}

/// The compiled detection rules. It keeps the SQL, not prepared
/// statements: each run takes them from the connection's statement cache,
/// so the engine borrows nothing between runs.
#[derive(Debug)]
pub struct RuleEngine {
    rules: Vec<Rule>,
    /// Each rule's time budget per batch.
    budget: Duration,
    clock: Clock,
}

/// The deadline of the query running on a connection, enforced by SQLite's
/// progress handler ([`Clock::install`]): while armed, the handler
/// interrupts the statement once the deadline has passed, and remembers it
/// did (so an interruption is told from another failure).
#[derive(Debug, Clone)]
struct Clock {
    base: Instant,
    /// Nanoseconds after `base`; 0: not armed.
    deadline: Arc<AtomicU64>,
    expired: Arc<AtomicBool>,
}

impl Clock {
    fn new() -> Clock {
        Clock { base: Instant::now(), deadline: Arc::default(), expired: Arc::default() }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Sets the progress handler of `conn` to this clock.
    fn install(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        let clock = self.clone();
        conn.progress_handler(c_int::from(PROGRESS_STEPS), Some(move || clock.over()))
    }

    /// Removes the progress handler of `conn`.
    fn uninstall(conn: &mut Connection) {
        if let Err(e) = conn.progress_handler(0, None::<fn() -> bool>) {
            log::warn!("cannot remove the rules' progress handler: {e}");
        }
    }

    /// The handler: past an armed deadline, interrupt.
    fn over(&self) -> bool {
        let deadline = self.deadline.load(Ordering::Relaxed);
        if deadline != 0 && self.now() >= deadline {
            self.expired.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Starts a budget of `budget` from now.
    fn arm(&self, budget: Duration) {
        self.expired.store(false, Ordering::Relaxed);
        let budget = u64::try_from(budget.as_nanos()).unwrap_or(u64::MAX);
        self.deadline.store(self.now().saturating_add(budget).max(1), Ordering::Relaxed);
    }

    fn disarm(&self) {
        self.deadline.store(0, Ordering::Relaxed);
    }

    /// The handler interrupted the query since the last [`Clock::arm`].
    fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }
}

/// The budget in milliseconds, for log lines and reasons.
fn millis(d: Duration) -> u128 {
    d.as_millis()
}

impl RuleEngine {
    /// Creates the alert tables ([`ALERTS_SCHEMA`]) if missing and the
    /// temporary `rule_window` table and `new_events` view, then checks
    /// every enabled rule (see the module docs for what is refused). A
    /// disabled rule is skipped, not checked. The first refusal is the
    /// error.
    pub fn compile(conn: &Connection, specs: &[RuleSpec]) -> Result<RuleEngine, RuleError> {
        install(conn).map_err(|e| RuleError { name: "(alert tables)".to_owned(), reason: e.to_string() })?;
        let mut names = HashSet::new();
        let mut rules = Vec::new();
        for spec in specs.iter().filter(|s| s.enabled) {
            if !names.insert(spec.name.as_str()) {
                return Err(RuleError { name: spec.name.clone(), reason: "duplicate rule name".to_owned() });
            }
            check(conn, spec, None).map_err(|reason| RuleError { name: spec.name.clone(), reason })?;
            rules.push(Rule { spec: spec.clone(), failures: 0, overruns: 0, disabled: false });
        }
        Ok(RuleEngine { rules, budget: DEFAULT_BUDGET, clock: Clock::new() })
    }

    /// Sets each rule's time budget per batch (see [Time
    /// budget](self#time-budget)); at least 1 ms.
    #[must_use]
    pub fn with_budget(mut self, budget: Duration) -> RuleEngine {
        self.budget = budget.max(Duration::from_millis(1));
        self
    }

    /// Each rule's time budget per batch.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// The rules disabled for running over their time budget
    /// [`MAX_OVERRUNS`] batches in a row, in order. They stay off until the
    /// rules are compiled again (the agent restarts).
    pub fn disabled_rules(&self) -> Vec<&str> {
        self.rules.iter().filter(|r| r.disabled).map(|r| r.spec.name.as_str()).collect()
    }

    /// The number of rules run.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// No rule is run.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The names of the rules run, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.spec.name.as_str())
    }

    /// Evaluates the events with ids in `(after_id, through_id]`: runs
    /// every rule (but the disabled ones), each within its time budget,
    /// stores each new alert, and moves `rule_cursor` to `through_id`
    /// (never back), all in one transaction. Returns the alerts raised now,
    /// with their row ids, in rule order; a (rule, event) pair raised
    /// before is not raised again. A rule that fails, or runs over its
    /// budget, is logged and skipped for this window (see [Time
    /// budget](self#time-budget)). An error (the transaction, the alert
    /// tables) leaves nothing of the run behind.
    ///
    /// `conn` is the store's connection (the one given to
    /// [`RuleEngine::compile`]; any other gets the temporary objects
    /// created first). It must not be inside a transaction. Its progress
    /// handler is set for the run and removed after it.
    pub fn run(
        &mut self,
        conn: &mut Connection,
        after_id: i64,
        through_id: i64,
        now_ms: u64,
    ) -> rusqlite::Result<Vec<Alert>> {
        if through_id <= after_id {
            return Ok(Vec::new());
        }
        self.clock.install(conn)?;
        let result = self.run_window(conn, after_id, through_id, now_ms);
        self.clock.disarm();
        Clock::uninstall(conn);
        result
    }

    /// [`RuleEngine::run`] with the progress handler in place.
    fn run_window(
        &mut self,
        conn: &Connection,
        after_id: i64,
        through_id: i64,
        now_ms: u64,
    ) -> rusqlite::Result<Vec<Alert>> {
        conn.execute_batch(WINDOW_SCHEMA)?;
        let tx = conn.unchecked_transaction()?;
        tx.execute("DELETE FROM temp.rule_window", [])?;
        tx.execute("INSERT INTO temp.rule_window (lo, hi) VALUES (?1, ?2)", params![after_id, through_id])?;
        let mut alerts = Vec::new();
        let (clock, budget) = (&self.clock, self.budget);
        for rule in self.rules.iter_mut().filter(|r| !r.disabled) {
            let started = Instant::now();
            clock.arm(budget);
            let found = matching_ids(&tx, &rule.spec, after_id, through_id);
            clock.disarm();
            let ids = match found {
                Ok(ids) => {
                    rule.overruns = 0;
                    ids
                }
                Err(e) if clock.expired() => {
                    rule.overruns += 1;
                    let took = started.elapsed();
                    if rule.overruns >= MAX_OVERRUNS {
                        rule.disabled = true;
                        log::error!(
                            "rule {}: disabled: it ran over its time budget of {} ms in {MAX_OVERRUNS} \
                             consecutive batches (the last over events ({after_id}, {through_id}], \
                             interrupted after {took:?}); it is not run again until the agent restarts",
                            rule.spec.name,
                            millis(budget)
                        );
                    } else {
                        log::warn!(
                            "rule {}: interrupted after {took:?}, over its time budget of {} ms; events \
                             ({after_id}, {through_id}] are skipped by this rule ({} of {MAX_OVERRUNS} \
                             consecutive overruns before it is disabled)",
                            rule.spec.name,
                            millis(budget),
                            rule.overruns
                        );
                    }
                    // An interrupted read leaves the transaction open; were
                    // it rolled back, the alerts below would each commit
                    // on their own.
                    if tx.is_autocommit() {
                        return Err(e);
                    }
                    continue;
                }
                Err(e) => {
                    rule.failures += 1;
                    log::warn!(
                        "rule {}: failed over events ({after_id}, {through_id}], skipped ({} failures so far): {e}",
                        rule.spec.name,
                        rule.failures
                    );
                    continue;
                }
            };
            for id in ids {
                if let Some(alert) = insert_alert(&tx, &rule.spec, id, now_ms)? {
                    alerts.push(alert);
                }
            }
        }
        tx.execute(UPSERT_CURSOR, [through_id])?;
        tx.commit()?;
        Ok(alerts)
    }

    /// The highest event id the rules have evaluated (`rule_cursor`), 0 if
    /// none (or if the database has no alert tables yet).
    pub fn cursor(conn: &Connection) -> rusqlite::Result<i64> {
        let exists: bool = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'rule_cursor'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !exists {
            return Ok(0);
        }
        let through: Option<i64> =
            conn.query_row("SELECT through FROM rule_cursor WHERE id = 1", [], |r| r.get(0)).optional()?;
        Ok(through.unwrap_or(0))
    }

    /// Checks each rule on its own, disabled ones too, against an empty
    /// event store of the real schema made for the purpose, in memory
    /// ([`crate::EventStore::open_in_memory`]: no file, no temporary
    /// directory): what [`RuleEngine::compile`]
    /// checks, plus one run over an empty window. Returns every rule's name
    /// with its verdict, in order (`daemoneye-cli rules`).
    pub fn validate(specs: &[RuleSpec]) -> Vec<(String, Result<(), String>)> {
        validate(specs)
    }
}

/// See [`RuleEngine::validate`].
pub fn validate(specs: &[RuleSpec]) -> Vec<(String, Result<(), String>)> {
    let refuse_all = |reason: String| {
        log::warn!("cannot check rules: {reason}");
        specs.iter().map(|s| (s.name.clone(), Err(reason.clone()))).collect()
    };
    // In memory: nothing on disk, so no temporary directory to need or to
    // be raced for (under systemd's ProtectSystem=strict /tmp is
    // read-only; any local user can pre-create names in it).
    let mut store = match crate::EventStore::open_in_memory() {
        Ok(store) => store,
        Err(e) => return refuse_all(format!("cannot create an in-memory event store to check against: {e}")),
    };
    let clock = Clock::new();
    if let Err(e) = clock.install(store.connection_mut()) {
        return refuse_all(format!("cannot set the time budget of the check: {e}"));
    }
    let conn = store.connection();
    if let Err(e) = install(conn) {
        return refuse_all(format!("cannot create the alert tables to check against: {e}"));
    }
    let mut names = HashSet::new();
    specs
        .iter()
        .map(|spec| {
            let verdict = if names.insert(spec.name.as_str()) {
                check(conn, spec, Some(&clock))
            } else {
                Err("duplicate rule name".to_owned())
            };
            (spec.name.clone(), verdict)
        })
        .collect()
}

/// Creates what rules read and write.
fn install(conn: &Connection) -> rusqlite::Result<()> {
    // Nothing is ours until the writer says what is (`own::register`).
    crate::own::register(conn, std::sync::Arc::default())?;
    conn.execute_batch(ALERTS_SCHEMA)?;
    conn.execute_batch(WINDOW_SCHEMA)
}

/// Why a rule cannot run, or `Ok`. With a `trial` clock (installed on
/// `conn`), it also runs once within [`DEFAULT_BUDGET`] (the window must be
/// empty, as in the in-memory store).
fn check(conn: &Connection, spec: &RuleSpec, trial: Option<&Clock>) -> Result<(), String> {
    if spec.name.trim().is_empty() {
        return Err("the name is empty".to_owned());
    }
    let keyword = first_keyword(&spec.sql);
    if !["select", "with", "values"].contains(&keyword.as_str()) {
        let found = if keyword.is_empty() { "nothing".to_owned() } else { keyword.to_uppercase() };
        return Err(format!("must be a SELECT statement, found {found}"));
    }
    let mut stmt = conn.prepare(&spec.sql).map_err(|e| match e {
        rusqlite::Error::MultipleStatement => "must be one statement, found more".to_owned(),
        e => format!("does not compile: {e}"),
    })?;
    if !stmt.readonly() {
        return Err("is not read-only: a rule may only read".to_owned());
    }
    if stmt.column_count() == 0 {
        return Err("returns no columns; the first must be the event id".to_owned());
    }
    // Where the first column comes from, through views, subqueries and
    // common table expressions: it must be an event's id.
    let hint =
        "the first column must be the event id (new_events.id), e.g. SELECT id FROM new_events WHERE …";
    match stmt.column_metadata(0) {
        Ok(Some((_, table, column, ..))) => {
            let (table, column) = (table.to_string_lossy(), column.to_string_lossy());
            if table != "process_events" || column != "id" {
                let shown = if table == "process_events" {
                    format!("new_events.{column}")
                } else {
                    format!("{table}.{column}")
                };
                return Err(format!("its first column is {shown}; {hint}"));
            }
        }
        _ => return Err(format!("its first column is computed, not a table's column; {hint}")),
    }
    if stmt.parameter_count() > 0 {
        return Err(format!("has {} parameters; a rule takes none", stmt.parameter_count()));
    }
    if let Some(clock) = trial {
        clock.arm(DEFAULT_BUDGET);
        let ran = (|| {
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            Ok::<_, rusqlite::Error>(())
        })();
        clock.disarm();
        ran.map_err(|e| {
            if clock.expired() {
                format!(
                    "does not finish within the time budget of {} ms even over an empty store \
                     (an unbounded recursive CTE?)",
                    millis(DEFAULT_BUDGET)
                )
            } else {
                format!("fails to run: {e}")
            }
        })?;
    }
    Ok(())
}

/// The first keyword of `sql` after blanks and comments, lowercased.
fn first_keyword(sql: &str) -> String {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.find('\n').map_or("", |i| &r[i + 1..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            break;
        }
    }
    rest.chars().take_while(char::is_ascii_alphabetic).collect::<String>().to_ascii_lowercase()
}

/// The ids a rule matches inside `(lo, hi]`, sorted, without repeats.
fn matching_ids(conn: &Connection, spec: &RuleSpec, lo: i64, hi: i64) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached(&spec.sql)?;
    let mut rows = stmt.query([])?;
    let mut ids = Vec::new();
    let mut ignored = 0u64;
    while let Some(row) = rows.next()? {
        match row.get_ref(0)? {
            ValueRef::Integer(id) if id > lo && id <= hi => ids.push(id),
            _ => ignored += 1,
        }
    }
    if ignored > 0 {
        log::debug!(
            "rule {}: ignored {ignored} results whose first column is not an event id in ({lo}, {hi}]",
            spec.name
        );
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// A column value of the wrong type or range: the row is skipped, not the
/// run (which would then fail on every retry).
fn is_conversion_error(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
    )
}

/// Stores the alert of `rule` for event `event_id`; `None` if it was
/// raised before or the event is not there.
fn insert_alert(
    conn: &Connection,
    spec: &RuleSpec,
    event_id: i64,
    now_ms: u64,
) -> rusqlite::Result<Option<Alert>> {
    type Row = (String, u32, String, Option<String>, Option<String>, i64);
    let row: Result<Option<Row>, _> = conn
        .prepare_cached(SELECT_EVENT)?
        .query_row([event_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .optional();
    let (collector_id, pid, name, exe, argv, observed_ms) = match row {
        Ok(Some(row)) => row,
        Ok(None) => return Ok(None),
        Err(e) if is_conversion_error(&e) => {
            log::warn!("rule {}: event {event_id} has an unreadable column, no alert: {e}", spec.name);
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let command_line = argv.and_then(|text| match serde_json::from_str::<Vec<String>>(&text) {
        Ok(args) => Some(args.join(" ")),
        Err(e) => {
            log::warn!("rule {}: event {event_id} has an argv that is not a JSON list: {e}", spec.name);
            None
        }
    });
    let raised_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let inserted = conn.prepare_cached(INSERT_ALERT)?.execute(params![
        spec.name,
        spec.severity.as_str(),
        spec.description,
        event_id,
        collector_id,
        pid,
        name,
        exe,
        command_line,
        observed_ms,
        raised_ms,
    ])?;
    if inserted == 0 {
        return Ok(None);
    }
    Ok(Some(Alert {
        id: conn.last_insert_rowid(),
        rule: spec.name.clone(),
        severity: spec.severity,
        description: spec.description.clone(),
        event_id,
        collector_id,
        pid,
        name,
        exe,
        command_line,
        observed_unix_ms: observed_ms.max(0).cast_unsigned(),
        raised_unix_ms: now_ms,
    }))
}

#[cfg(test)]
mod tests;
