//! The process event model: what procmond publishes, appends to its WAL and
//! writes to the event store.
//!
//! Wire format: an [`EventEnvelope`] encoded with postcard. The same bytes
//! are the WAL record's payload and the bus message's payload, so a replay
//! re-publishes exactly what was first published. The envelope's `seq` is
//! the WAL sequence number of the record that carries it.

use std::fmt;

use daemoneye_platform::{Field, ProcessRecord, Unavailable};
use serde::{Deserialize, Serialize};

/// Topic prefix of process events; the kind is the last segment.
pub const EVENTS_TOPIC_PREFIX: &str = "events.process";
/// The pattern that matches every process event (and gap markers).
pub const EVENTS_PATTERN: &str = "events.process.+";
/// The topic of [`StreamGap`] markers.
pub const GAP_TOPIC: &str = "events.process.gap";

/// What happened to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// A process appeared (or was running when collection began, with
    /// `snapshot` set).
    Started,
    /// A process exited.
    Stopped,
    /// A process changed under the same identity (see [`Change`]).
    Modified,
}

impl EventKind {
    /// The lowercase name, also the topic's last segment.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Stopped => "stopped",
            EventKind::Modified => "modified",
        }
    }

    /// Parses [`EventKind::as_str`].
    pub fn parse(s: &str) -> Option<EventKind> {
        match s {
            "started" => Some(EventKind::Started),
            "stopped" => Some(EventKind::Stopped),
            "modified" => Some(EventKind::Modified),
            _ => None,
        }
    }

    /// The bus topic of events of this kind.
    pub fn topic(self) -> &'static str {
        match self {
            EventKind::Started => "events.process.started",
            EventKind::Stopped => "events.process.stopped",
            EventKind::Modified => "events.process.modified",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a process counts as modified. One event may carry several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Change {
    /// It executed a new program (name, exe path or exe inode changed).
    Exec,
    /// Its real or effective uid or gid changed.
    Credentials,
    /// Its parent changed (the parent exited and it was re-parented).
    Reparent,
    /// The file at its executable's path was replaced (new inode or
    /// content) while it kept running the old one.
    ExeReplaced,
    /// Its executable was deleted while it runs.
    ExeDeleted,
    /// Its command line was rewritten (setproctitle); off by default.
    CommandLine,
}

impl Change {
    /// The lowercase name used in stores and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Exec => "exec",
            Change::Credentials => "credentials",
            Change::Reparent => "reparent",
            Change::ExeReplaced => "exe_replaced",
            Change::ExeDeleted => "exe_deleted",
            Change::CommandLine => "command_line",
        }
    }
}

/// The result of hashing a process's executable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashOutcome {
    /// The lowercase hex SHA-256 of the file.
    Sha256(String),
    /// The file is larger than the configured cap and was not read.
    TooLarge {
        /// The file's size in bytes.
        size: u64,
        /// The cap in bytes.
        cap: u64,
    },
    /// This cycle's hashing time budget ran out; a later cycle may hash it.
    Deferred,
    /// The file could not be read (or the process has no executable).
    Unavailable(Unavailable),
}

/// One lifecycle event of one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEvent {
    /// What happened.
    pub kind: EventKind,
    /// Part of the snapshot of processes already running when collection
    /// began (only on `Started`).
    pub snapshot: bool,
    /// Why a `Modified` event was raised; empty otherwise.
    pub changes: Vec<Change>,
    /// When the collector saw it (Unix milliseconds).
    pub observed_unix_ms: u64,
    /// The process as last seen, with its command line sanitized. For
    /// `Stopped`, the last record seen before it exited.
    pub process: ProcessRecord,
    /// SHA-256 of the executable; `None` when hashing is off (or, for
    /// `Stopped` and non-exec `Modified`, not recomputed).
    pub sha256: Option<HashOutcome>,
}

/// An event with its place in the collector's stream: the bus and WAL
/// payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// The collector that saw it.
    pub collector_id: String,
    /// The stream: fixed for the life of one WAL directory (standalone: 0).
    pub stream_id: u64,
    /// Position in the stream, from 1, never reused; the store keeps each
    /// `(collector_id, stream_id, seq)` once.
    pub seq: u64,
    /// The event.
    pub event: ProcessEvent,
}

impl EventEnvelope {
    /// Encodes to the wire and WAL format.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes [`EventEnvelope::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Result<EventEnvelope, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// Events of a stream that will never come: their WAL records were
/// damaged (CRC-checked, reported) or do not decode. Published on
/// [`GAP_TOPIC`] in sequence order, so the store can count the lost
/// sequence numbers as settled and its watermark (and the collector's WAL
/// truncation) can move past them, instead of waiting forever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamGap {
    /// The collector.
    pub collector_id: String,
    /// The stream.
    pub stream_id: u64,
    /// First lost sequence number.
    pub from: u64,
    /// Last lost sequence number (inclusive).
    pub to: u64,
    /// Why, for the record.
    pub reason: String,
}

impl StreamGap {
    /// Encodes for the bus.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes [`StreamGap::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Result<StreamGap, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// Formats a field as its value or `-(reason)`.
fn field<T: fmt::Display>(f: &Field<T>) -> String {
    match f {
        Ok(v) => v.to_string(),
        Err(why) => format!("-({why})"),
    }
}

impl ProcessEvent {
    /// One readable line for a terminal (`procmond --foreground`).
    pub fn human_line(&self) -> String {
        let p = &self.process;
        let d = &p.details;
        let mut what = self.kind.as_str().to_owned();
        if self.snapshot {
            what.push_str("(snapshot)");
        }
        if !self.changes.is_empty() {
            let names: Vec<&str> = self.changes.iter().map(|c| c.as_str()).collect();
            what.push_str(&format!("[{}]", names.join(",")));
        }
        let user = match (&d.user, &d.credentials) {
            (Ok(u), _) => crate::render::printable(u).into_owned(),
            (Err(_), Ok(c)) => c.euid.to_string(),
            (Err(why), Err(_)) => format!("-({why})"),
        };
        let exe = match &d.exe {
            Ok(path) => crate::render::printable(&path.to_string_lossy()).into_owned(),
            Err(why) => format!("-({why})"),
        };
        let deleted = if d.exe_deleted == Ok(true) { " (deleted)" } else { "" };
        let args = match &d.argv {
            Ok(argv) if argv.args.is_empty() => String::new(),
            Ok(argv) => format!(" args={:?}{}", argv.args.join(" "), if argv.truncated { "…" } else { "" }),
            Err(why) => format!(" args=-({why})"),
        };
        let hash = match &self.sha256 {
            Some(HashOutcome::Sha256(h)) => format!(" sha256={}", &h[..h.len().min(16)]),
            Some(HashOutcome::TooLarge { size, .. }) => format!(" sha256=-(too large: {size} B)"),
            Some(HashOutcome::Deferred) => " sha256=-(deferred)".to_owned(),
            Some(HashOutcome::Unavailable(why)) => format!(" sha256=-({why})"),
            None => String::new(),
        };
        format!(
            "{what:<10} pid={} ppid={} user={user} name={:?} exe={exe}{deleted}{args}{hash} started={}",
            p.pid,
            p.ppid,
            p.name,
            field(&p.started_unix)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names_and_topics() {
        for kind in [EventKind::Started, EventKind::Stopped, EventKind::Modified] {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            assert_eq!(kind.topic(), format!("{EVENTS_TOPIC_PREFIX}.{kind}"));
            assert!(daemoneye_bus::validate_topic(kind.topic()).is_ok());
        }
        assert_eq!(EventKind::parse("exploded"), None);
    }
}
