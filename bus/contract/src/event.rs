//! The process event model: what procmond publishes, appends to its WAL and
//! writes to the event store.
//!
//! Wire format: an [`EventEnvelope`] in the contract's encoding
//! ([`crate::codec`]: a header with kind and version, then postcard). The
//! same bytes are the WAL record's payload and the bus message's payload,
//! so a replay re-publishes exactly what was first published. The envelope's `seq` is
//! the WAL sequence number of the record that carries it.

use std::fmt;

use daemoneye_platform::{ExitStatus, ProcessRecord, Unavailable};
use serde::{Deserialize, Serialize};

use crate::codec::{self, Kind, Message, Version};

/// Topic prefix of process events; the kind is the last segment.
pub const EVENTS_TOPIC_PREFIX: &str = "events.process";
/// The pattern that matches every process event (and gap markers).
pub const EVENTS_PATTERN: &str = crate::topic::EVENTS.pattern();
/// The topic of [`StreamGap`] markers.
pub const GAP_TOPIC: &str = crate::topic::GAPS.pattern();

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
    Unavailable(#[serde(with = "crate::record::unavailable")] Unavailable),
}

/// Which path of the collector saw an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum EventSource {
    /// The periodic enumeration: the first snapshot, and in kernel mode
    /// what reconciliation caught that the kernel path missed.
    #[default]
    Poll,
    /// The kernel's process events, as they happened.
    Kernel,
}

impl EventSource {
    /// The lowercase name used in stores and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Poll => "poll",
            EventSource::Kernel => "kernel",
        }
    }
}

/// When a change that happened while the collector was not running took
/// place: somewhere after `after_unix_ms` and before `before_unix_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateWindow {
    /// The last moment the collector knew the earlier state (Unix ms).
    pub after_unix_ms: u64,
    /// When the collector saw the new state after its restart (Unix ms).
    pub before_unix_ms: u64,
}

/// One lifecycle event of one process.
///
/// Encoding: postcard, fields in this order. Version 2 appended `source`,
/// `late` and `exit`; a version 1 record (without them) still decodes, as
/// `source: Poll`, not late, no exit status (see [`ProcessEvent::decode`]).
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
    #[serde(with = "crate::record::process_record")]
    pub process: ProcessRecord,
    /// SHA-256 of the executable; `None` when hashing is off (or, for
    /// `Stopped` and non-exec `Modified`, not recomputed).
    pub sha256: Option<HashOutcome>,
    /// The path that saw it.
    pub source: EventSource,
    /// Set when it happened while the collector was down (found at its
    /// restart), with the window it happened in.
    pub late: Option<LateWindow>,
    /// How the process ended (`Stopped` from the kernel path only; the
    /// poll cannot know).
    #[serde(with = "crate::record::exit_status")]
    pub exit: Option<ExitStatus>,
}

/// The version 1 layout of [`ProcessEvent`], read from older WALs and
/// stores.
#[derive(Deserialize)]
struct ProcessEventV1 {
    kind: EventKind,
    snapshot: bool,
    changes: Vec<Change>,
    observed_unix_ms: u64,
    #[serde(with = "crate::record::process_record")]
    process: ProcessRecord,
    sha256: Option<HashOutcome>,
}

impl From<ProcessEventV1> for ProcessEvent {
    fn from(v1: ProcessEventV1) -> ProcessEvent {
        ProcessEvent {
            kind: v1.kind,
            snapshot: v1.snapshot,
            changes: v1.changes,
            observed_unix_ms: v1.observed_unix_ms,
            process: v1.process,
            sha256: v1.sha256,
            source: EventSource::Poll,
            late: None,
            exit: None,
        }
    }
}

#[derive(Deserialize)]
struct EventEnvelopeV1 {
    collector_id: String,
    stream_id: u64,
    seq: u64,
    event: ProcessEventV1,
}

/// Decodes a headerless body as the headerless layout of the previous
/// release, else as the older one before it (which ends where the later
/// appended its fields, so one never decodes as the other). Both strict.
/// The error is the newer layout's.
fn decode_either<T: serde::de::DeserializeOwned, Old: serde::de::DeserializeOwned + Into<T>>(
    kind: Kind,
    bytes: &[u8],
) -> Result<T, codec::Error> {
    match codec::strict::<T>(kind, codec::LEGACY_VERSION, bytes) {
        Ok(v) => Ok(v),
        Err(e) => codec::strict::<Old>(kind, codec::LEGACY_VERSION, bytes).map(Into::into).map_err(|_| e),
    }
}

impl Message for ProcessEvent {
    const KIND: Kind = Kind::ProcessEvent;

    fn decode_v1(body: &[u8]) -> Result<ProcessEvent, codec::Error> {
        decode_either::<ProcessEvent, ProcessEventV1>(Kind::ProcessEvent, body)
    }
}

/// The version 1 and 2 layout of [`EventEnvelope`] (no position).
#[derive(Deserialize)]
struct EventEnvelopeV2 {
    collector_id: String,
    stream_id: u64,
    seq: u64,
    event: ProcessEvent,
}

impl From<EventEnvelopeV2> for EventEnvelope {
    fn from(v2: EventEnvelopeV2) -> EventEnvelope {
        EventEnvelope {
            collector_id: v2.collector_id,
            stream_id: v2.stream_id,
            seq: v2.seq,
            event: v2.event,
            position: None,
        }
    }
}

/// [`EventEnvelopeV2`] written from a borrowed envelope.
#[derive(Serialize)]
struct EventEnvelopeV2Ref<'a> {
    collector_id: &'a str,
    stream_id: u64,
    seq: u64,
    event: &'a ProcessEvent,
}

impl Message for EventEnvelope {
    const KIND: Kind = Kind::EventEnvelope;

    fn decode_v1(body: &[u8]) -> Result<EventEnvelope, codec::Error> {
        decode_either::<EventEnvelopeV2, EventEnvelopeV1>(Kind::EventEnvelope, body).map(Into::into)
    }

    fn decode_v2(body: &[u8]) -> Result<EventEnvelope, codec::Error> {
        codec::strict::<EventEnvelopeV2>(Kind::EventEnvelope, codec::V2_VERSION, body).map(Into::into)
    }

    fn encode_body(&self, version: Version, out: Vec<u8>) -> Vec<u8> {
        match version {
            Version::V1 | Version::V2 => codec::body(
                &EventEnvelopeV2Ref {
                    collector_id: &self.collector_id,
                    stream_id: self.stream_id,
                    seq: self.seq,
                    event: &self.event,
                },
                out,
            ),
            Version::V3 => codec::body(self, out),
        }
    }
}

impl From<EventEnvelopeV1> for EventEnvelopeV2 {
    fn from(v1: EventEnvelopeV1) -> EventEnvelopeV2 {
        EventEnvelopeV2 {
            collector_id: v1.collector_id,
            stream_id: v1.stream_id,
            seq: v1.seq,
            event: v1.event.into(),
        }
    }
}

/// The version 1 and 2 layout of [`StreamGap`] (no position).
#[derive(Serialize, Deserialize)]
struct StreamGapV2 {
    collector_id: String,
    stream_id: u64,
    from: u64,
    to: u64,
    reason: String,
}

impl From<StreamGapV2> for StreamGap {
    fn from(v2: StreamGapV2) -> StreamGap {
        StreamGap {
            collector_id: v2.collector_id,
            stream_id: v2.stream_id,
            from: v2.from,
            to: v2.to,
            reason: v2.reason,
            position: None,
        }
    }
}

impl Message for StreamGap {
    const KIND: Kind = Kind::StreamGap;

    fn decode_v1(body: &[u8]) -> Result<StreamGap, codec::Error> {
        codec::strict::<StreamGapV2>(Kind::StreamGap, codec::LEGACY_VERSION, body).map(Into::into)
    }

    fn decode_v2(body: &[u8]) -> Result<StreamGap, codec::Error> {
        codec::strict::<StreamGapV2>(Kind::StreamGap, codec::V2_VERSION, body).map(Into::into)
    }

    fn encode_body(&self, version: Version, out: Vec<u8>) -> Vec<u8> {
        match version {
            Version::V1 | Version::V2 => codec::body(
                &StreamGapV2 {
                    collector_id: self.collector_id.clone(),
                    stream_id: self.stream_id,
                    from: self.from,
                    to: self.to,
                    reason: self.reason.clone(),
                },
                out,
            ),
            Version::V3 => codec::body(self, out),
        }
    }
}

/// Where a collector's stream stands, as the collector states it (version
/// 3): the store takes its base from here and never guesses it.
///
/// Invariant: `base <= next`; a collector holds (or will publish, in
/// order) every sequence number in `base..next`, and none below `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamPosition {
    /// The lowest sequence number the collector still holds: its WAL's
    /// first unacknowledged record, or `next` when it holds none. Every
    /// number below it was acknowledged by a store or lost before any
    /// store saw it; the collector will never send it again.
    pub base: u64,
    /// The next sequence number the collector will assign: it has produced
    /// nothing at or above it, so nothing there can be settled yet.
    pub next: u64,
}

impl StreamPosition {
    /// Whether `from..=to` lies within what the collector can have
    /// produced and still holds (`base..next`).
    pub fn covers(&self, from: u64, to: u64) -> bool {
        self.base <= from && from <= to && to < self.next
    }
}

/// The `(collector_id, stream_id, seq)` at the head of an envelope whose
/// whole body does not decode (a newer collector's, or damaged), so the
/// store can settle its sequence number as a gap instead of leaving its
/// stream blocked. Every version's envelope begins with these three
/// fields; `None` if even they do not decode.
pub fn envelope_head(bytes: &[u8]) -> Option<(String, u64, u64)> {
    let body = if bytes.starts_with(&codec::MAGIC) {
        if bytes.get(4) != Some(&Kind::EventEnvelope.byte()) {
            return None;
        }
        bytes.get(codec::HEADER_LEN..)?
    } else {
        bytes
    };
    postcard::take_from_bytes::<(String, u64, u64)>(body).ok().map(|(head, _)| head)
}

impl ProcessEvent {
    /// Decodes an event of any version (the store's `record` column).
    pub fn decode(bytes: &[u8]) -> Result<ProcessEvent, codec::Error> {
        codec::decode(bytes)
    }

    /// Encodes in the current version (the store's `record` column).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }
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
    /// Where the collector's stream stood when this was published
    /// (version 3; set at each publish, so a re-sent record states the
    /// current base). `None` from an older collector, whose new streams
    /// the store then starts below the first seq it sees (the previous
    /// release's behaviour); and in the WAL, where it is not kept.
    pub position: Option<StreamPosition>,
}

impl EventEnvelope {
    /// Encodes to the wire and WAL format, in the current version.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decodes [`EventEnvelope::encode`]'s bytes, of any version this
    /// build reads (a WAL written before the upgrade, an older collector).
    pub fn decode(bytes: &[u8]) -> Result<EventEnvelope, codec::Error> {
        codec::decode(bytes)
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
    /// Where the collector's stream stood (version 3; see
    /// [`EventEnvelope::position`]). A store settles a gap only within
    /// it (`from >= base`, `to < next`); without it (an older collector)
    /// only up to what that collector has published.
    pub position: Option<StreamPosition>,
}

impl StreamGap {
    /// Encodes for the bus, in the current version.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decodes [`StreamGap::encode`]'s bytes, of any version.
    pub fn decode(bytes: &[u8]) -> Result<StreamGap, codec::Error> {
        codec::decode(bytes)
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

    #[test]
    fn version_1_records_still_decode() {
        let event = ProcessEvent {
            kind: EventKind::Stopped,
            snapshot: false,
            changes: vec![Change::Exec],
            observed_unix_ms: 5,
            process: crate::testing::record(7, 70, "old"),
            sha256: Some(HashOutcome::Deferred),
            source: EventSource::Kernel,
            late: Some(LateWindow { after_unix_ms: 1, before_unix_ms: 2 }),
            exit: Some(ExitStatus::Signal { signal: 9, core_dumped: false }),
        };
        let env = EventEnvelope {
            collector_id: "c".into(),
            stream_id: 3,
            seq: 4,
            event: event.clone(),
            position: None,
        };
        assert_eq!(EventEnvelope::decode(&env.encode()).unwrap(), env);
        // Version 1 bytes: the same fields without the three appended ones.
        #[derive(Serialize)]
        struct V1<'a>(
            &'a str,
            u64,
            u64,
            EventKind,
            bool,
            &'a [Change],
            u64,
            &'a ProcessRecord,
            &'a Option<HashOutcome>,
        );
        let v1 = postcard::to_stdvec(&V1(
            "c",
            3,
            4,
            event.kind,
            false,
            &event.changes,
            5,
            &event.process,
            &event.sha256,
        ))
        .unwrap();
        let old = EventEnvelope::decode(&v1).expect("a version 1 envelope decodes");
        assert_eq!(
            (old.seq, old.event.kind, old.event.source, old.event.late, old.event.exit),
            (4, EventKind::Stopped, EventSource::Poll, None, None)
        );
        assert_eq!(old.event.process, event.process);
        assert!(EventEnvelope::decode(&v1[..v1.len() - 3]).is_err(), "a cut record is still an error");
    }
}
