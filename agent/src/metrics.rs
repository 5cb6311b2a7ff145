//! The metrics file (`metrics:` in agent.yaml): the agent's counters in
//! Prometheus text format (version 0.0.4), rewritten every
//! `interval_secs` by the thread `agent-metrics`, for node_exporter's
//! textfile collector (`--collector.textfile.directory`) or any scraper
//! that reads a file.
//!
//! # What it holds
//!
//! All under `daemoneye_`: the agent's state and uptime; per collector
//! its phase, restarts, missed heartbeats, events stored and (from its
//! last heartbeat) unacknowledged events, their age and the WAL's size;
//! the store's counters (events, duplicates, alerts, pruned, errors); the
//! broker's (connections, published, delivered, dropped, refused); per
//! output its state, lag in events and seconds, sent, retried, resent and
//! lost.
//! `daemoneye_metrics_timestamp_seconds` says when the file was written:
//! alert on `time() - daemoneye_metrics_timestamp_seconds` to catch an
//! agent that stopped writing it. Counters count since the agent started
//! (`_total`), as Prometheus expects of counters; outputs' counters are
//! the store's, kept across restarts.
//!
//! # Guarantees
//!
//! - A reader sees a whole file, the previous or the new: it is written
//!   to a temporary file beside it (`.<name>.tmp`, a name the textfile
//!   collector skips), created new without following links, then renamed
//!   over it.
//! - Mode 0644 whatever the umask, the one file of the agent that is not
//!   private: node_exporter usually runs as its own user, and the file
//!   holds counters only (no process data).
//! - The monitor is asked for its status with a timeout and never waits
//!   on this thread; the store is read through a read-only connection. A
//!   failure to write is logged once (and again when it changes), then
//!   retried each interval; the agent goes on.
//! - Shutdown: a stop message ends the thread between two writes; the
//!   last file stays (its timestamp ages).

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, bounded, select, tick};
use daemoneye_contract::api::{AgentState, AgentStatus, CollectorPhase, CollectorStatus, now_unix_ms};
use daemoneye_contract::control::DeliveryStatus;
use daemoneye_store::EventStore;

use crate::cli_output::OutputStatus;
use crate::config::AgentConfig;
use crate::monitor::StatusProbe;

/// How long one write waits for the monitor's status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Handle to the `agent-metrics` thread.
pub struct MetricsFile {
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsFile {
    /// Starts the thread when agent.yaml has `metrics:` (else `None`). The
    /// first file is written at once.
    pub fn start(cfg: &AgentConfig, probe: StatusProbe) -> io::Result<Option<MetricsFile>> {
        let Some(spec) = cfg.metrics.clone() else { return Ok(None) };
        let (stop, stop_rx) = bounded(1);
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new().name("agent-metrics".into()).spawn(move || {
            let mut w = Writer { cfg, path: spec.file, probe, store: None, failing: None };
            log::info!("metrics: writing {} every {} s", w.path.display(), spec.interval_secs);
            let every = tick(Duration::from_secs(spec.interval_secs));
            w.write_once();
            loop {
                select! {
                    recv(stop_rx) -> _ => break,
                    recv(every) -> _ => w.write_once(),
                }
            }
        })?;
        Ok(Some(MetricsFile { stop, thread: Some(thread) }))
    }

    /// The thread's name and whether it has ended (for the watchdog).
    pub fn thread(&self) -> (&'static str, bool) {
        ("agent-metrics", self.thread.as_ref().is_none_or(JoinHandle::is_finished))
    }

    /// Stops the thread and waits for it.
    pub fn shutdown(mut self) {
        let _ = self.stop.try_send(());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("metrics: the thread panicked");
        }
    }
}

impl Drop for MetricsFile {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
    }
}

struct Writer {
    cfg: AgentConfig,
    path: PathBuf,
    probe: StatusProbe,
    /// Opened at the first write that has outputs to read.
    store: Option<EventStore>,
    /// The last failure, logged once.
    failing: Option<String>,
}

impl Writer {
    fn write_once(&mut self) {
        let result = match self.probe.status(STATUS_TIMEOUT) {
            None => Err("the monitor did not answer within 5 s".to_owned()),
            Some(status) => {
                let now = now_unix_ms();
                let outputs = self.outputs(now);
                replace_readable(&self.path, render(&status, &outputs, now).as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", self.path.display()))
            }
        };
        match result {
            Ok(()) => {
                if self.failing.take().is_some() {
                    log::info!("metrics: {} written again", self.path.display());
                }
            }
            Err(why) => {
                if self.failing.as_deref() != Some(why.as_str()) {
                    log::warn!("metrics: {why}; retrying every interval");
                    self.failing = Some(why);
                }
            }
        }
    }

    /// The outputs' status, or none when the store cannot be read (its
    /// metrics are then left out; logged at debug, the rest stands).
    fn outputs(&mut self, now: u64) -> Vec<OutputStatus> {
        if self.cfg.outputs.is_empty() {
            return Vec::new();
        }
        if self.store.is_none() {
            match EventStore::open_read_only(&self.cfg.database()) {
                Ok(s) => self.store = Some(s),
                Err(e) => {
                    log::debug!("metrics: cannot open the store: {e}");
                    return Vec::new();
                }
            }
        }
        let store = self.store.as_ref().expect("opened above");
        OutputStatus::read_all(store.connection(), &self.cfg, now).unwrap_or_else(|e| {
            log::debug!("metrics: cannot read the outputs' state: {e}");
            self.store = None;
            Vec::new()
        })
    }
}

/// Replaces `path` with `contents` through a temporary file beside it
/// (`.<name>.tmp`, a leftover one removed first) made with
/// `files::create_readable_file` and renamed over it.
fn replace_readable(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::other("no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let written = daemoneye_platform::files::create_readable_file(&tmp).and_then(|mut f| {
        f.write_all(contents)?;
        f.sync_data()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// The file's text: every family with its `# HELP` and `# TYPE`.
pub fn render(s: &AgentStatus, outputs: &[OutputStatus], now_ms: u64) -> String {
    let mut m = Text::default();
    m.family("metrics_timestamp_seconds", "gauge", "When the agent wrote this file (Unix time).");
    m.sample(&[], Value::Ms(now_ms));
    m.family("agent_info", "gauge", "The agent's version (always 1).");
    m.sample(&[("version", &s.version)], Value::N(1));
    m.family("agent_state", "gauge", "The agent's loading state machine: 1 for the current state.");
    let current = s.state.name();
    for state in [
        AgentState::Loading,
        AgentState::Ready,
        AgentState::SteadyState,
        AgentState::StartupFailed { reason: String::new() },
        AgentState::ShuttingDown,
    ] {
        m.sample(&[("state", state.name())], Value::N(u64::from(state.name() == current)));
    }
    m.family("agent_uptime_seconds", "gauge", "Seconds since the agent started.");
    m.sample(&[], Value::N(s.uptime_secs));

    m.family("collectors", "gauge", "Configured collectors by phase.");
    for phase in [
        CollectorPhase::Disabled,
        CollectorPhase::Starting,
        CollectorPhase::Registered,
        CollectorPhase::Running,
        CollectorPhase::Degraded,
        CollectorPhase::Failed,
        CollectorPhase::Restarting,
        CollectorPhase::Stopped,
    ] {
        let n = s.collectors.iter().filter(|c| c.phase == phase).count();
        m.sample(&[("phase", phase.name())], Value::N(n as u64));
    }
    let collector_families: [Family<CollectorStatus, u64>; 4] = [
        ("collector_up", "gauge", "1 when the collector is registered with the agent.", |c| {
            u64::from(c.registered)
        }),
        ("collector_restarts_total", "counter", "Restarts of the collector.", |c| u64::from(c.restarts)),
        ("collector_missed_heartbeats", "gauge", "Heartbeats missed in a row.", |c| {
            u64::from(c.missed_heartbeats)
        }),
        ("collector_events_stored_total", "counter", "Events from the collector in the store.", |c| {
            c.events_stored
        }),
    ];
    for (name, kind, help, value) in collector_families {
        m.family(name, kind, help);
        for c in &s.collectors {
            m.sample(&[("collector", &c.id)], Value::N(value(c)));
        }
    }
    let delivery_families: [Family<DeliveryStatus, Value>; 5] = [
        (
            "collector_unacknowledged_events",
            "gauge",
            "Events in the collector's WAL the store has not acknowledged.",
            |d| Value::N(d.unacknowledged),
        ),
        (
            "collector_oldest_unacknowledged_seconds",
            "gauge",
            "How long the oldest of them has waited.",
            |d| Value::Ms(d.oldest_unacknowledged_ms),
        ),
        ("collector_wal_bytes", "gauge", "Bytes of the collector's WAL on disk.", |d| Value::N(d.wal_bytes)),
        ("collector_wal_cap_bytes", "gauge", "The cap of the collector's WAL.", |d| {
            Value::N(d.wal_cap_bytes)
        }),
        (
            "collector_events_refused_total",
            "counter",
            "Events refused at the WAL's cap since the collector started.",
            |d| Value::N(d.events_refused),
        ),
    ];
    for (name, kind, help, value) in delivery_families {
        m.family(name, kind, help);
        for d in &s.delivery {
            m.sample(&[("collector", &d.collector_id)], value(&d.status));
        }
    }

    let st = &s.store;
    for (name, help, v) in [
        ("store_events_committed_total", "Events committed to the store.", st.events_committed),
        ("store_duplicates_total", "Events ignored because the store already had them.", st.duplicates),
        (
            "store_rejected_total",
            "Messages refused by the store (undecodable, or a foreign collector id).",
            st.rejected,
        ),
        ("alerts_total", "Alerts raised.", st.alerts_raised),
        ("store_pruned_total", "Events deleted by retention.", st.pruned),
        ("store_errors_total", "Store errors (failed commits are retried).", st.errors),
    ] {
        m.family(name, "counter", help);
        m.sample(&[], Value::N(v));
    }
    if let Some(at) = st.last_commit_unix_ms {
        m.family("store_last_commit_timestamp_seconds", "gauge", "The store's last commit (Unix time).");
        m.sample(&[], Value::Ms(at));
    }

    let b = &s.broker;
    m.family("bus_connections", "gauge", "Connections open to the broker.");
    m.sample(&[], Value::N(b.connections as u64));
    m.family("bus_subscriptions", "gauge", "Subscriptions at the broker.");
    m.sample(&[], Value::N(b.subscriptions as u64));
    for (name, help, v) in [
        ("bus_published_total", "Messages published.", b.published),
        ("bus_delivered_total", "Messages delivered.", b.delivered),
        ("bus_dropped_total", "Messages dropped by overflow strategies.", b.dropped),
        ("bus_forbidden_total", "Publishes or subscriptions refused by permissions.", b.forbidden),
        ("bus_refused_total", "Connections refused (uid, limits, id).", b.refused),
        ("bus_protocol_errors_total", "Connections closed for protocol errors.", b.protocol_errors),
    ] {
        m.family(name, "counter", help);
        m.sample(&[], Value::N(v));
    }

    let output_families: [Family<OutputStatus, u64>; 7] = [
        ("output_up", "gauge", "1 when the output's last delivery succeeded.", |o| {
            u64::from(o.state == "ok")
        }),
        ("output_lag_events", "gauge", "Stored events the output has not sent yet.", |o| o.lag_events),
        ("output_lag_seconds", "gauge", "How old the oldest of them is.", |o| o.lag_secs),
        ("output_sent_total", "counter", "Events and alerts the output's receiver accepted.", |o| o.sent),
        ("output_retried_total", "counter", "Failed delivery attempts.", |o| o.retried),
        ("output_resent_total", "counter", "Documents sent again (a bound on duplicates).", |o| o.resent),
        ("output_lost_total", "counter", "Events retention deleted before the output sent them.", |o| o.lost),
    ];
    if !outputs.is_empty() {
        for (name, kind, help, value) in output_families {
            m.family(name, kind, help);
            for o in outputs {
                m.sample(&[("output", &o.name)], Value::N(value(o)));
            }
        }
    }
    m.out
}

/// A family of one sample per item: its name, type, help and value.
type Family<T, V> = (&'static str, &'static str, &'static str, fn(&T) -> V);

/// A sample's value.
enum Value {
    N(u64),
    /// Milliseconds, written as seconds.
    Ms(u64),
}

/// The text being written, and the family its samples belong to.
#[derive(Default)]
struct Text {
    out: String,
    family: &'static str,
}

impl Text {
    fn family(&mut self, name: &'static str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP daemoneye_{name} {help}");
        let _ = writeln!(self.out, "# TYPE daemoneye_{name} {kind}");
        self.family = name;
    }

    /// A sample of the family last begun.
    fn sample(&mut self, labels: &[(&str, &str)], value: Value) {
        let _ = write!(self.out, "daemoneye_{}", self.family);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = match value {
            Value::N(n) => writeln!(self.out, " {n}"),
            Value::Ms(ms) => writeln!(self.out, " {}.{:03}", ms / 1000, ms % 1000),
        };
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines
/// escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
