//! Forwarding: each output of agent.yaml (`outputs:`) is one thread,
//! `agent-output-<name>`, that reads events and alerts from the store,
//! behind the store writer, and delivers them in batches to its receiver
//! (a syslog server, [`syslog`]; a file, [`file`]; an HTTP endpoint or
//! Elasticsearch, [`http`]).
//!
//! # Guarantees
//!
//! - At least once. An output's cursor (`daemoneye_store::outputs`) moves
//!   only after its receiver accepted a whole batch (the file written and
//!   synced; the TCP write completed on a connection the receiver had not
//!   closed; a 2xx answer, with every `_bulk` item created or already
//!   there); a crash or a failure resends from the cursor. Every
//!   document carries a stable id for receivers to drop repeats: an
//!   event's `event.id` is `<host>/<collector>/<stream>/<seq>`, an
//!   alert's `id` is its row id.
//! - Nothing waits on a receiver but its own output: the thread reads the
//!   store through its own connections (SQLite's WAL mode lets readers
//!   run beside the writer), so a receiver that is down, slow or never
//!   reads holds neither the store writer nor the collectors nor the other
//!   outputs. A failed delivery is retried, the same rows again, after a
//!   wait of exponential backoff with full jitter (a random time between 0
//!   and `retry_min_ms * 2^failures`, capped at `retry_max_ms`). What is
//!   sent again (the failed batch, which may have partly arrived; the
//!   syslog output's last batch after a reconnect) is counted in the
//!   output's `resent`: an upper bound on the duplicates a receiver holds
//!   (a crash of the agent aside: then at most one batch, uncounted).
//! - Retention never deletes unsent rows silently: the store counts the
//!   rows each chunk deleted above an output's cursor in its `lost`; the
//!   output logs an error and raises the alert [`OUTPUT_LOST_RULE`] when
//!   that count grows, and `daemoneye-cli status` shows it.
//! - A row that does not decode is skipped with an error in the log (it
//!   can never be sent), never a stall or a panic.
//! - Shutdown: a stop message ends the thread between two attempts (a
//!   delivery under way ends within its timeout); the handle joins it.

pub mod file;
pub mod http;
pub mod syslog;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded, select};
use daemoneye_contract::api::{Alert, Severity};
use daemoneye_contract::ecs;
use daemoneye_contract::event::{EventEnvelope, EventKind};
use daemoneye_store::outputs::{self, OutputCursor};
use daemoneye_store::{EventQuery, EventStore, StoreError, StoredEvent};

use crate::config::outputs::{OutputSpec, OutputType};

/// The rule of the alert raised when retention deleted events an output
/// had not sent (the alert's `name` is the output's name).
pub const OUTPUT_LOST_RULE: &str = "agent_output_lost_events";

/// Raises an agent alert: `(rule, name, description)`.
pub type AlertFn = Arc<dyn Fn(&str, &str, &str) + Send + Sync>;

/// One document to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Its stable id (`event.id`, or `alert-<id>`).
    pub id: String,
    /// A stable name of its kind: `process-started`, `process-stopped`,
    /// `process-modified` or `alert` (the syslog MSGID).
    pub kind: &'static str,
    /// Its syslog severity (RFC 5424: 2 critical .. 6 informational).
    pub severity: u8,
    /// When it happened (Unix milliseconds).
    pub time_ms: u64,
    /// The document, one line of JSON.
    pub json: String,
}

/// A receiver: takes a batch whole or fails.
pub trait Sink: std::marker::Send {
    /// Delivers `batch`; `Ok` only when the receiver accepted all of it.
    fn deliver(&mut self, batch: &[Item]) -> Result<(), String>;

    /// Documents it wrote again on its own since the last call (syslog:
    /// the last batch of a broken connection), which the receiver may
    /// hold twice.
    fn take_resent(&mut self) -> u64 {
        0
    }
}

/// Why forwarding did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The store could not be opened for an output.
    #[error("output {name}: event store {}: {reason}", path.display())]
    Store {
        /// The output.
        name: String,
        /// The database.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The thread could not be spawned.
    #[error("output {name}: cannot start its thread: {source}")]
    Thread {
        /// The output.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The output threads. Dropping it stops and joins them.
pub struct Outputs {
    handles: Vec<OutputHandle>,
}

/// One output thread.
struct OutputHandle {
    thread_name: String,
    // Field order: the stop sender is used before the thread is joined.
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Outputs {
    /// Starts one thread per output, each with its cursor in `database`.
    pub fn start(database: &Path, specs: &[OutputSpec], alert: AlertFn) -> Result<Outputs, ForwardError> {
        let mut handles = Vec::new();
        for spec in specs {
            let sink: Box<dyn Sink> = match spec.output_type {
                OutputType::Syslog => Box::new(syslog::SyslogSink::new(spec)),
                OutputType::File => Box::new(file::FileSink::new(spec)),
                OutputType::Http => Box::new(http::HttpSink::new(spec)),
            };
            handles.push(OutputHandle::start(database, spec.clone(), sink, alert.clone())?);
        }
        if !handles.is_empty() {
            log::info!(
                "forwarding to {} output(s): {}",
                specs.len(),
                specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(Outputs { handles })
    }

    /// `(thread name, ended)` of every output thread, for the watchdog
    /// (only a panic ends one before [`Outputs::shutdown`]).
    pub fn threads(&self) -> Vec<(&str, bool)> {
        self.handles
            .iter()
            .map(|h| (h.thread_name.as_str(), h.thread.as_ref().is_none_or(JoinHandle::is_finished)))
            .collect()
    }

    /// Stops every thread (all asked first, then joined).
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for h in &self.handles {
            let _ = h.stop.try_send(());
        }
        for h in &mut self.handles {
            if let Some(t) = h.thread.take()
                && t.join().is_err()
            {
                log::error!("thread {} panicked", h.thread_name);
            }
        }
    }
}

impl OutputHandle {
    fn start(
        database: &Path,
        spec: OutputSpec,
        sink: Box<dyn Sink>,
        alert: AlertFn,
    ) -> Result<OutputHandle, ForwardError> {
        let store_err = |reason: String| ForwardError::Store {
            name: spec.name.clone(),
            path: database.to_owned(),
            reason,
        };
        let reader = EventStore::open_read_only(database).map_err(|e| store_err(e.to_string()))?;
        let conn = rusqlite::Connection::open(database).map_err(|e| store_err(e.to_string()))?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(|e| store_err(e.to_string()))?;
        let cursor = outputs::open_cursor(&conn, &spec.name).map_err(|e| store_err(e.to_string()))?;
        log::info!(
            "output {}: {:?} from event {} and alert {} ({} lost to retention so far)",
            spec.name,
            spec.output_type,
            cursor.events_through,
            cursor.alerts_through,
            cursor.lost
        );
        let thread_name = format!("agent-output-{}", spec.name);
        let (stop, stop_rx) = bounded(1);
        let actor = OutputActor {
            cursor,
            spec,
            sink,
            reader,
            conn,
            alert,
            failures: 0,
            failed_batch: 0,
            stop: stop_rx,
        };
        let thread = std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || actor.run())
            .map_err(|source| ForwardError::Thread { name: thread_name.clone(), source })?;
        Ok(OutputHandle { thread_name, stop, thread: Some(thread) })
    }
}

/// What one step did.
enum Step {
    /// Nothing new in the store.
    Idle,
    /// A batch delivered (or skipped whole by the filters).
    Progress,
    /// The receiver failed.
    Failed,
}

/// The state of one output thread.
struct OutputActor {
    spec: OutputSpec,
    sink: Box<dyn Sink>,
    /// Reads events and alerts.
    reader: EventStore,
    /// Writes the cursor.
    conn: rusqlite::Connection,
    cursor: OutputCursor,
    alert: AlertFn,
    /// Consecutive failed attempts.
    failures: u32,
    /// Documents of the last failed batch: sent again by the next
    /// attempt, the receiver may have taken some (counted in `resent`
    /// when it succeeds).
    failed_batch: u64,
    stop: Receiver<()>,
}

impl OutputActor {
    fn run(mut self) {
        daemoneye_platform::threads::test_panic_point(&format!("agent-output-{}", self.spec.name));
        let poll = Duration::from_millis(self.spec.poll_ms);
        loop {
            let wait = match self.step() {
                Step::Progress => Duration::ZERO,
                Step::Idle => poll,
                Step::Failed => self.backoff(),
            };
            if self.stopped(wait) {
                break;
            }
        }
        self.cursor.state = "stopped".into();
        self.persist();
    }

    /// Waits up to `wait` for the stop message.
    fn stopped(&self, wait: Duration) -> bool {
        if wait.is_zero() {
            return !matches!(self.stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty));
        }
        select! {
            recv(self.stop) -> _ => true,
            default(wait) => false,
        }
    }

    /// Full jitter: a random wait between 0 and the capped exponential.
    fn backoff(&self) -> Duration {
        let exp = self.spec.retry_min_ms.saturating_mul(1u64 << self.failures.min(30));
        let cap = exp.min(self.spec.retry_max_ms).max(1);
        Duration::from_millis(fastrand::u64(0..=cap))
    }

    fn step(&mut self) -> Step {
        self.check_lost();
        let events = if self.spec.send.events() { self.read_events() } else { Vec::new() };
        let alerts = if self.spec.send.alerts() { self.read_alerts() } else { Vec::new() };
        let (events_through, alerts_through) = (
            events.iter().map(|e| e.id).max().unwrap_or(self.cursor.events_through),
            alerts.iter().map(|a| a.id).max().unwrap_or(self.cursor.alerts_through),
        );
        if events_through == self.cursor.events_through && alerts_through == self.cursor.alerts_through {
            return Step::Idle;
        }
        let items: Vec<Item> = events
            .iter()
            .filter(|e| self.wants_event(e))
            .map(event_item)
            .chain(alerts.iter().filter(|a| self.wants_alert(a)).map(alert_item))
            .collect();
        if !items.is_empty() {
            if let Err(e) = self.sink.deliver(&items) {
                self.failures = self.failures.saturating_add(1);
                self.cursor.retried += 1;
                self.failed_batch = items.len() as u64;
                self.cursor.resent += self.sink.take_resent();
                if self.failures == 1 {
                    log::warn!("output {}: delivery failed (retrying with backoff): {e}", self.spec.name);
                } else {
                    log::debug!("output {}: attempt {} failed: {e}", self.spec.name, self.failures);
                }
                self.cursor.state = "retrying".into();
                self.cursor.last_error = Some(e);
                self.persist();
                return Step::Failed;
            }
            if self.failures > 0 {
                log::info!(
                    "output {}: delivering again after {} failed attempts",
                    self.spec.name,
                    self.failures
                );
            }
        }
        self.failures = 0;
        self.cursor.resent += std::mem::take(&mut self.failed_batch) + self.sink.take_resent();
        self.cursor.sent += items.len() as u64;
        self.cursor.events_through = events_through;
        self.cursor.alerts_through = alerts_through;
        self.cursor.state = "ok".into();
        self.cursor.last_error = None;
        self.persist();
        Step::Progress
    }

    fn wants_event(&self, e: &StoredEvent) -> bool {
        let kind = e.event.kind.as_str();
        (self.spec.kinds.is_empty() || self.spec.kinds.iter().any(|k| k.as_str() == kind))
            && (self.spec.collectors.is_empty() || self.spec.collectors.contains(&e.collector_id))
    }

    fn wants_alert(&self, a: &Alert) -> bool {
        a.severity >= self.spec.min_severity
            && (self.spec.collectors.is_empty() || self.spec.collectors.contains(&a.collector_id))
    }

    /// The next batch of events; a row that does not decode is skipped
    /// (read one by one to find it) with an error in the log.
    fn read_events(&mut self) -> Vec<StoredEvent> {
        let q =
            |after: i64, limit: usize| EventQuery { after_id: Some(after), limit, ..EventQuery::default() };
        match self.reader.query(&q(self.cursor.events_through, self.spec.batch_max)) {
            Ok(events) => events,
            Err(StoreError::Corrupt { .. }) => {
                let mut events = Vec::new();
                let mut after = self.cursor.events_through;
                while events.len() < self.spec.batch_max {
                    match self.reader.query(&q(after, 1)) {
                        Ok(mut one) if !one.is_empty() => {
                            after = one[0].id;
                            events.append(&mut one);
                        }
                        Err(StoreError::Corrupt { id, reason }) => {
                            log::error!(
                                "output {}: event {id} skipped, it cannot be sent: {reason}",
                                self.spec.name
                            );
                            // Passed: the cursor moves beyond it with the batch.
                            self.cursor.events_through = self.cursor.events_through.max(id);
                            after = id;
                        }
                        Ok(_) => break,
                        Err(e) => {
                            log::warn!("output {}: reading events: {e}", self.spec.name);
                            break;
                        }
                    }
                }
                events
            }
            Err(e) => {
                log::warn!("output {}: reading events: {e}", self.spec.name);
                Vec::new()
            }
        }
    }

    fn read_alerts(&mut self) -> Vec<Alert> {
        daemoneye_store::rules::alerts_after(
            self.reader.connection(),
            self.cursor.alerts_through,
            self.spec.batch_max,
        )
        .unwrap_or_else(|e| {
            log::warn!("output {}: reading alerts: {e}", self.spec.name);
            Vec::new()
        })
    }

    /// Reports what retention deleted before this output sent it, once
    /// (`lost_alerted` keeps what was reported across restarts).
    fn check_lost(&mut self) {
        let Ok(Some(row)) = outputs::read(&self.conn, Some(&self.spec.name)).map(|mut r| r.pop()) else {
            return;
        };
        self.cursor.lost = row.lost;
        self.cursor.lost_alerted = self.cursor.lost_alerted.max(row.lost_alerted);
        if row.lost > self.cursor.lost_alerted {
            let description = format!(
                "output {}: retention deleted {} event(s) it had not sent ({} in all); the receiver was \
                 behind for longer than store.retention_days / store.max_events allow",
                self.spec.name,
                row.lost - self.cursor.lost_alerted,
                row.lost
            );
            log::error!("{description}");
            (self.alert)(OUTPUT_LOST_RULE, &self.spec.name, &description);
            self.cursor.lost_alerted = row.lost;
            self.persist();
        }
    }

    /// Writes the cursor and counters; a failure is logged and the cursor
    /// stays in memory (written with the next batch: at worst a crash
    /// before then resends).
    fn persist(&mut self) {
        self.cursor.updated_ms = daemoneye_contract::api::now_unix_ms();
        if let Err(e) = outputs::write(&self.conn, &self.cursor) {
            log::warn!("output {}: cannot write its cursor: {e}", self.spec.name);
        }
    }
}

/// An event's document and headers.
pub fn event_item(e: &StoredEvent) -> Item {
    let env = EventEnvelope {
        collector_id: e.collector_id.clone(),
        stream_id: e.stream_id,
        seq: e.seq,
        event: e.event.clone(),
        position: None,
    };
    let doc = ecs::event(&env, Some(e.id));
    let id =
        doc.get("event").and_then(|v| v.get("id")).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    Item {
        id,
        kind: match e.event.kind {
            EventKind::Started => "process-started",
            EventKind::Stopped => "process-stopped",
            EventKind::Modified => "process-modified",
        },
        severity: 6,
        time_ms: e.event.observed_unix_ms,
        json: doc.to_string(),
    }
}

/// An alert's document (as `daemoneye-cli alerts --json`) and headers.
pub fn alert_item(a: &Alert) -> Item {
    Item {
        id: format!("alert-{}", a.id),
        kind: "alert",
        severity: match a.severity {
            Severity::Critical => 2,
            Severity::High => 3,
            Severity::Medium => 4,
            Severity::Low => 5,
        },
        time_ms: a.raised_unix_ms,
        json: serde_json::to_string(a).unwrap_or_else(|_| "{}".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use crossbeam_channel::{Receiver, unbounded};
    use daemoneye_contract::testing::{envelope, record};
    use daemoneye_store::Retention;

    use super::*;

    /// Fails while `fail` says so, records what it accepted, and tells
    /// the test each attempt.
    struct TestSink {
        fail: Arc<Mutex<bool>>,
        accepted: Arc<Mutex<Vec<Item>>>,
        attempts: Sender<bool>,
    }

    impl Sink for TestSink {
        fn deliver(&mut self, batch: &[Item]) -> Result<(), String> {
            let fail = *self.fail.lock().unwrap();
            let _ = self.attempts.send(!fail);
            if fail {
                return Err("receiver down".into());
            }
            self.accepted.lock().unwrap().extend_from_slice(batch);
            Ok(())
        }
    }

    fn spec(text: &str) -> OutputSpec {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("outputs:\n  - {{name: t, type: file, file: {{path: /x}}, {text}}}\n");
        crate::config::AgentConfig::parse(&text, "t", dir.path()).unwrap().outputs.remove(0)
    }

    fn events(store: &mut EventStore, seqs: std::ops::RangeInclusive<u64>) {
        let kind = |s: u64| if s.is_multiple_of(2) { EventKind::Started } else { EventKind::Stopped };
        let batch: Vec<_> =
            seqs.map(|s| envelope("c1", 7, s, kind(s), record(100 + s as u32, 5, "sh"), 1_000 + s)).collect();
        store.insert_batch(&batch).unwrap();
    }

    /// Waits (bounded) for an accepted attempt.
    fn accepted(attempts: &Receiver<bool>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Ok(ok) = attempts.recv_deadline(deadline) {
            if ok {
                return;
            }
        }
        panic!("no accepted delivery within 30 s");
    }

    #[test]
    fn the_cursor_moves_only_after_the_receiver_accepted_and_losses_are_alerted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("events.db");
        let mut store = EventStore::open(&db).unwrap();
        events(&mut store, 1..=10);
        let fail = Arc::new(Mutex::new(true));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (attempts_tx, attempts) = unbounded();
        let (alerts_tx, alerts) = unbounded();
        let alert: AlertFn = Arc::new(move |rule: &str, name: &str, d: &str| {
            let _ = alerts_tx.send((rule.to_owned(), name.to_owned(), d.to_owned()));
        });
        let spec = spec(
            "send: events, kinds: [started], batch_max: 4, retry_min_ms: 1, retry_max_ms: 5, poll_ms: 5",
        );
        let sink = TestSink { fail: fail.clone(), accepted: got.clone(), attempts: attempts_tx.clone() };
        let handle = OutputHandle::start(&db, spec.clone(), Box::new(sink), alert.clone()).unwrap();
        let outputs = Outputs { handles: vec![handle] };
        // Failing: attempts, retries counted (each persisted before the
        // next attempt), no cursor movement.
        for _ in 0..4 {
            assert!(!attempts.recv_timeout(Duration::from_secs(30)).unwrap());
        }
        let row = |store: &EventStore| outputs::read(store.connection(), Some("t")).unwrap().remove(0);
        let r = row(&store);
        assert_eq!((r.events_through, r.sent), (0, 0));
        assert!(r.retried >= 3 && r.state == "retrying" && r.last_error.as_deref() == Some("receiver down"));

        // The receiver is back: everything, filtered, in order, with
        // stable ids; the cursor at the last row.
        *fail.lock().unwrap() = false;
        for _ in 0..3 {
            accepted(&attempts);
        }
        outputs.shutdown();
        let ids: Vec<String> = got.lock().unwrap().iter().map(|i| i.id.clone()).collect();
        let host = daemoneye_platform::hostname().unwrap_or("-");
        let want: Vec<String> =
            (1..=10u64).filter(|s| s.is_multiple_of(2)).map(|s| format!("{host}/c1/7/{s}")).collect();
        assert_eq!(ids, want);
        assert!(
            got.lock().unwrap().iter().all(|i| i.kind == "process-started" && i.json.contains("\"event\""))
        );
        let r = row(&store);
        assert_eq!((r.sent, r.state.as_str(), r.last_error), (5, "stopped", None));
        // The batch that failed (4 rows, 2 of them started) went again.
        assert_eq!(r.resent, 2);
        let max_id = store.query(&EventQuery::default()).unwrap().last().unwrap().id;
        assert_eq!(r.events_through, max_id);

        // Retention deletes rows the output has not sent: counted, an
        // alert, and the output goes on after them.
        events(&mut store, 11..=20);
        assert_eq!(store.prune(&Retention { max_age: None, max_events: Some(4) }).unwrap(), 16);
        let sink = TestSink { fail, accepted: got.clone(), attempts: attempts_tx };
        let outputs =
            Outputs { handles: vec![OutputHandle::start(&db, spec, Box::new(sink), alert).unwrap()] };
        let (rule, name, description) = alerts.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!((rule.as_str(), name.as_str()), (OUTPUT_LOST_RULE, "t"));
        assert!(description.contains("deleted 6 event(s)"), "{description}");
        accepted(&attempts);
        outputs.shutdown();
        let last: Vec<String> = got.lock().unwrap()[5..].iter().map(|i| i.id.clone()).collect();
        assert_eq!(last, [18, 20].map(|s| format!("{host}/c1/7/{s}")));
        assert_eq!(row(&store).lost, 6);
    }
}
