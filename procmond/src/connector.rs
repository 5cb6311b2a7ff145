//! The EventBusConnector: every event goes into the write-ahead log before
//! it is published, and leaves the log only when the agent's store says it
//! committed it (design.md §5).
//!
//! - `submit` (on the actor's thread) gives each event the next sequence
//!   number of this collector's stream, appends the batch to the WAL
//!   (`Durability::Always`: on stable storage when it returns), and queues
//!   the encoded bytes in an in-memory buffer of `buffer_bytes` (10 MiB by
//!   default). When the buffer is full the records are not queued: they
//!   stay in the WAL ("spilled") and the flush thread re-reads them later.
//!   Memory is bounded; nothing is lost.
//! - The flush thread (`procmond-flush`) publishes in sequence order while
//!   the bus is connected and fewer than `max_in_flight` events await an
//!   acknowledgement; it takes records from the buffer, or from the WAL
//!   when they were spilled or must be sent again.
//! - Acknowledgements arrive on `control.ack.<collector_id>`
//!   ([`StoreAck`]) from the store's client (`control::STORE_CLIENT_ID`,
//!   as the broker names the sender; any other is ignored): the WAL is
//!   truncated through that watermark. A broker's PubAck never truncates
//!   anything.
//! - After every (re)connection, and when acknowledgements stop while
//!   events are in flight, publishing restarts at the first unacknowledged
//!   record: only those are re-sent, in order. The store drops duplicates
//!   by `(collector, stream, seq)`.
//! - Backpressure: at 70% buffer fill the thread asks the actor to slow
//!   down 1.5x (`AdjustInterval`); below 50% it asks it to restore. A
//!   spilled buffer counts as full until the backlog is published.
//! - Every event and gap marker states where the stream stands
//!   ([`StreamPosition`]: `base`, the first unacknowledged number, and
//!   `next`), set as it is published (a re-sent record states the current
//!   base), so the store never guesses a stream's base (see
//!   `daemoneye_store`'s Watermarks). The WAL keeps records without it.
//! - A fresh WAL (no number ever assigned) always gets a fresh stream id,
//!   even where a `STREAM` file survived: a WAL wiped under it must not
//!   restart at 1 in a stream the store already holds (its events would be
//!   duplicates there).
//! - The WAL has a size cap (`wal_max_bytes`, checked before each batch).
//!   At the cap new events are refused, never silently: counted
//!   ([`DeliveryStatus::events_refused`], `wal_full_times`, in every
//!   heartbeat, which the agent turns into an alert) and, once the store's
//!   acknowledgements free space, recorded in the WAL as one gap marker
//!   (its own sequence number) saying how many events were refused and
//!   when, which the store keeps in `stream_gaps`.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher as _};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, after, bounded, never, select};
use daemoneye_bus::{Client, ClientError, ConnectionState, Subscription};
use daemoneye_wal::{Durability, Wal, WalOptions};
use parking_lot::Mutex;

use crate::actor::{ActorSender, EventSink, IntervalAdjustment, SinkError, SinkStatus};
use daemoneye_contract::control::{self, ConnectionStatus, DeliveryStatus, StoreAck};
use daemoneye_contract::event::{
    EventEnvelope, EventKind, GAP_TOPIC, ProcessEvent, StreamGap, StreamPosition,
};
use daemoneye_contract::{PeerVersion, Version, codec};

/// Reads the delivery state of the connector's stream (for registration
/// and heartbeats).
#[derive(Clone)]
pub struct DeliveryProbe(Arc<dyn Fn() -> DeliveryStatus + Send + Sync>);

impl DeliveryProbe {
    /// A probe that calls `f`.
    pub fn new(f: impl Fn() -> DeliveryStatus + Send + Sync + 'static) -> DeliveryProbe {
        DeliveryProbe(Arc::new(f))
    }

    /// Where delivery stands now.
    pub fn read(&self) -> DeliveryStatus {
        (self.0)()
    }
}

impl std::fmt::Debug for DeliveryProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryProbe")
    }
}

/// Batches whose append time is kept for the age of the oldest
/// unacknowledged event; past it newer batches are not noted (the age
/// then reads high, never low).
const AGES_KEPT: usize = 4096;
/// Bytes a WAL record takes besides its payload (length, CRC, seq).
const RECORD_OVERHEAD: u64 = 16;

/// File in the WAL directory holding the stream id. It lives and dies
/// with the WAL's records, so a fresh WAL (sequence numbers from 1 again)
/// always gets a fresh stream.
const STREAM_FILE: &str = "STREAM";
/// Records re-read from the WAL at a time.
const REREAD_BATCH: usize = 1024;
/// Buffer fill that slows collection down.
const SLOW_AT: f64 = 0.70;
/// Buffer fill below which the interval is restored.
const RESTORE_BELOW: f64 = 0.50;

/// Connector settings.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// This collector's id (envelopes and the ack topic).
    pub collector_id: String,
    /// Bytes of unpublished events kept in memory.
    pub buffer_bytes: usize,
    /// Events published and not yet acknowledged before publishing pauses.
    pub max_in_flight: usize,
    /// With events in flight and no acknowledgement for this long, they
    /// are sent again.
    pub ack_timeout: Duration,
    /// `None`: the WAL is truncated through each acknowledgement. `Some(n)`:
    /// never past `n` until [`EventSink::checkpointed`] raises it, so the
    /// events after the collector's last checkpoint stay readable for a
    /// restart (see [`crate::checkpoint`]). The daemon passes `Some(0)`.
    pub truncate_floor: Option<u64>,
    /// The WAL's size cap in bytes (see the module docs).
    pub wal_max_bytes: u64,
}

/// Why the connector could not start or accept events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectorError {
    /// The WAL failed.
    #[error("write-ahead log: {0}")]
    Wal(#[from] daemoneye_wal::Error),
    /// The stream id file or the thread.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The bus refused a subscription.
    #[error("bus: {0}")]
    Bus(#[from] ClientError),
}

/// One message to publish: an event record, or a gap marker standing for
/// records the WAL lost (damage) or cannot decode.
struct Item {
    seq: u64,
    /// The last sequence number this item accounts for (`seq` for events).
    last: u64,
    topic: &'static str,
    bytes: Vec<u8>,
}

impl Item {
    fn event(seq: u64, kind: EventKind, bytes: Vec<u8>) -> Item {
        Item { seq, last: seq, topic: kind.topic(), bytes }
    }
}

/// Events appended but not yet handed to the flush thread.
struct Buffer {
    items: VecDeque<Item>,
    bytes: usize,
    /// Records after the buffered ones are only in the WAL.
    spilled: bool,
}

struct Shared {
    wal: Wal,
    stream_id: u64,
    collector_id: String,
    limit: usize,
    buffer: Mutex<Buffer>,
    published: AtomicU64,
    acked: AtomicU64,
    max_in_flight: AtomicU64,
    stop: AtomicBool,
    /// The WAL is never truncated past this (the last checkpoint).
    floor: AtomicU64,
    /// The contract version of the agent, as registration found it: the
    /// WAL holds current records, published as they are to a current
    /// agent and re-encoded in version 1 for an agent of the previous
    /// release.
    peer: PeerVersion,
    /// The WAL's size cap.
    cap: u64,
    /// The WAL's segment bytes on disk (measured at open and after each
    /// truncation, counted up by appends).
    wal_bytes: AtomicU64,
    /// At the cap now.
    full: AtomicBool,
    /// Times the cap was reached.
    full_times: AtomicU64,
    /// Events refused at the cap.
    refused: AtomicU64,
    /// Refused events not yet recorded as a gap: count, first and last
    /// time (Unix ms).
    lost: Mutex<Option<(u64, u64, u64)>>,
    /// `(first seq, append time)` of each batch not yet acknowledged.
    ages: Mutex<VecDeque<(u64, Instant)>>,
}

impl Shared {
    fn level(&self) -> f64 {
        let b = self.buffer.lock();
        if b.spilled { 1.0 } else { b.bytes as f64 / self.limit as f64 }
    }

    /// Where the stream stands: the first unacknowledged number and the
    /// next to be assigned.
    fn position(&self) -> StreamPosition {
        let next = self.wal.next_seq();
        let base = self.acked.load(Ordering::Acquire).saturating_add(1).min(next);
        StreamPosition { base, next }
    }

    fn delivery(&self) -> DeliveryStatus {
        let StreamPosition { base, next } = self.position();
        let unacknowledged = next - base;
        let oldest = {
            let mut ages = self.ages.lock();
            while ages.len() >= 2 && ages[1].0 <= base {
                ages.pop_front();
            }
            match ages.front() {
                Some(&(first, at)) if unacknowledged > 0 && first <= base => at.elapsed(),
                _ => Duration::ZERO,
            }
        };
        DeliveryStatus {
            stream_id: self.stream_id,
            base,
            next,
            unacknowledged,
            oldest_unacknowledged_ms: oldest.as_millis() as u64,
            wal_bytes: self.wal_bytes.load(Ordering::Acquire),
            wal_cap_bytes: self.cap,
            wal_full: self.full.load(Ordering::Acquire),
            wal_full_times: self.full_times.load(Ordering::Acquire),
            events_refused: self.refused.load(Ordering::Acquire),
        }
    }

    /// Measures the WAL's segments on disk again.
    fn measure(&self) {
        self.wal_bytes.store(segment_bytes(self.wal.dir()), Ordering::Release);
    }
}

/// The bytes of the WAL segments in `dir`.
fn segment_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

enum Cmd {
    Flush { deadline: Instant, reply: Sender<Result<(), String>> },
    Ack(StoreAck),
}

/// The connector's handle: the actor's [`EventSink`] in actor mode.
pub struct Connector {
    shared: Arc<Shared>,
    client: Arc<Client>,
    // Field order: the command sender goes before the thread is joined.
    cmds: Sender<Cmd>,
    notify: Sender<()>,
    thread: Option<JoinHandle<()>>,
    /// Set when the flush thread ends, however (see [`Connector::flush_watch`]).
    flush_ended: Arc<AtomicBool>,
}

/// Sets its flag when dropped: at the end of the thread that holds it,
/// a panic's unwinding included.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Whether the flush thread has ended, for the main thread's watchdog
/// once the connector itself belongs to the actor.
#[derive(Clone)]
pub struct FlushWatch(Arc<AtomicBool>);

impl FlushWatch {
    /// Whether the flush thread has ended.
    pub fn thread_ended(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl Connector {
    /// Opens (and recovers) the WAL in `wal_dir`, subscribes to the ack
    /// topic and starts the flush thread.
    pub fn start(
        cfg: ConnectorConfig,
        wal_dir: &Path,
        client: Arc<Client>,
        actor: ActorSender,
    ) -> Result<Connector, ConnectorError> {
        // Only whole sealed segments are deleted: segments of an eighth of
        // the cap let acknowledgements bring a full WAL back under it.
        let segment_size = (cfg.wal_max_bytes / 8).clamp(64 << 10, 16 << 20);
        // The WAL logs its own recovery report (once).
        let (wal, _report) = Wal::open(
            wal_dir,
            WalOptions { durability: Durability::Always, segment_size, ..Default::default() },
        )?;
        // Invariant: a WAL that never assigned a number is a new stream.
        let fresh = wal.next_seq() == 1 && wal.watermark() == 0;
        let stream_id = stream_id(wal_dir, fresh)?;
        let acked = wal.watermark();
        let pending = wal.next_seq().saturating_sub(acked + 1);
        if pending > 0 {
            log::info!(
                "WAL holds {pending} unacknowledged events (from seq {}); they are sent first",
                acked + 1
            );
        }
        let shared = Arc::new(Shared {
            wal,
            stream_id,
            collector_id: cfg.collector_id.clone(),
            limit: cfg.buffer_bytes.max(1),
            // Whatever the WAL holds beyond the watermark is re-read from it.
            buffer: Mutex::new(Buffer { items: VecDeque::new(), bytes: 0, spilled: pending > 0 }),
            published: AtomicU64::new(0),
            acked: AtomicU64::new(acked),
            max_in_flight: AtomicU64::new(cfg.max_in_flight.max(1) as u64),
            stop: AtomicBool::new(false),
            floor: AtomicU64::new(cfg.truncate_floor.unwrap_or(u64::MAX)),
            peer: PeerVersion::default(),
            cap: cfg.wal_max_bytes,
            wal_bytes: AtomicU64::new(segment_bytes(wal_dir)),
            full: AtomicBool::new(false),
            full_times: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            lost: Mutex::new(None),
            // What the WAL holds unacknowledged at startup is counted from now.
            ages: Mutex::new(if pending > 0 {
                VecDeque::from([(acked + 1, Instant::now())])
            } else {
                VecDeque::new()
            }),
        });
        let acks = client.subscribe(&control::ack_topic(&cfg.collector_id))?;
        let (cmds, cmd_rx) = bounded(16);
        let (notify, notify_rx) = bounded(1);
        let flusher = Flusher {
            shared: shared.clone(),
            client: client.clone(),
            actor,
            next: acked + 1,
            reread: VecDeque::new(),
            replay: None,
            seen_connections: client.connections(),
            max_sent: shared.wal.next_seq().saturating_sub(1),
            slowed: false,
            last_progress: Instant::now(),
            ack_timeout: cfg.ack_timeout,
            foreign_acks: 0,
        };
        let flush_ended = Arc::new(AtomicBool::new(false));
        let ended = SetOnDrop(flush_ended.clone());
        let thread = std::thread::Builder::new()
            .name("procmond-flush".into())
            .spawn(move || {
                let _ended = ended;
                daemoneye_platform::threads::test_panic_point("procmond-flush");
                flusher.run(cmd_rx, notify_rx, acks);
            })
            .map_err(|source| ConnectorError::Io { what: "spawn procmond-flush".into(), source })?;
        Ok(Connector { shared, client, cmds, notify, thread: Some(thread), flush_ended })
    }

    /// The agent's contract version, for registration to set and the
    /// heartbeats to follow (see [`crate::registration`]).
    pub fn peer_version(&self) -> PeerVersion {
        self.shared.peer.clone()
    }

    /// Tells whether the flush thread has ended.
    pub fn flush_watch(&self) -> FlushWatch {
        FlushWatch(self.flush_ended.clone())
    }

    /// The stream id of this collector's WAL.
    pub fn stream_id(&self) -> u64 {
        self.shared.stream_id
    }

    /// Reads where delivery stands, for registration and heartbeats.
    pub fn delivery_probe(&self) -> DeliveryProbe {
        let shared = self.shared.clone();
        DeliveryProbe::new(move || shared.delivery())
    }

    /// A hook for acknowledgements learnt elsewhere (a registration reply).
    pub fn ack_hook(&self) -> crate::registration::AckHook {
        let (cmds, notify, stream_id) = (self.cmds.clone(), self.notify.clone(), self.shared.stream_id);
        Box::new(move |through| {
            let _ = cmds.try_send(Cmd::Ack(StoreAck { stream_id, through }));
            let _ = notify.try_send(());
        })
    }

    /// Stops the flush thread and closes the WAL (everything appended is
    /// already durable).
    pub fn shutdown(mut self) -> Result<(), String> {
        self.stop_thread();
        let shared = self.shared.clone();
        // The flush thread is joined: dropping the handle leaves `shared`
        // as the only reference.
        drop(self);
        match Arc::try_unwrap(shared) {
            Ok(shared) => shared.wal.close().map_err(|e| e.to_string()),
            Err(_) => Err("WAL still shared at shutdown".into()),
        }
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.notify.try_send(());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("procmond-flush thread panicked");
        }
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

impl EventSink for Connector {
    fn submit(&mut self, events: Vec<ProcessEvent>) -> Result<Vec<EventEnvelope>, SinkError> {
        let s = &*self.shared;
        // The buffer lock is held across the append so the flush thread
        // never sees a record in the WAL that is neither buffered nor
        // marked spilled.
        let mut buf = s.buffer.lock();
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Invariant: at the cap nothing is appended, and nothing refused
        // goes unrecorded (counted now, a gap marker once there is room).
        if s.wal_bytes.load(Ordering::Acquire) >= s.cap {
            s.measure();
        }
        if s.wal_bytes.load(Ordering::Acquire) >= s.cap {
            let now = crate::actor::unix_ms();
            let n = events.len() as u64;
            s.refused.fetch_add(n, Ordering::AcqRel);
            let mut lost = s.lost.lock();
            let (count, first_ms, _) = lost.unwrap_or((0, now, now));
            *lost = Some((count + n, first_ms, now));
            if !s.full.swap(true, Ordering::AcqRel) {
                s.full_times.fetch_add(1, Ordering::AcqRel);
                log::error!(
                    "WAL at its cap ({} of {} bytes, the store has not acknowledged): new events are refused \
                     and counted until it acknowledges",
                    s.wal_bytes.load(Ordering::Acquire),
                    s.cap
                );
            }
            return Ok(Vec::new());
        }
        let mut first = s.wal.next_seq();
        let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(events.len() + 1);
        let mut gap_seq = None;
        let lost = *s.lost.lock();
        if let Some((count, first_ms, last_ms)) = lost {
            // The events refused at the cap, as one record of their own.
            let reason = format!(
                "{count} events refused: the WAL was at its cap ({} bytes) between Unix ms {first_ms} and \
                 {last_ms}",
                s.cap
            );
            let gap = StreamGap {
                collector_id: s.collector_id.clone(),
                stream_id: s.stream_id,
                from: first,
                to: first,
                reason,
                position: None,
            };
            payloads.push(gap.encode());
            gap_seq = Some(first);
            first += 1;
        }
        let envelopes: Vec<EventEnvelope> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| EventEnvelope {
                collector_id: s.collector_id.clone(),
                stream_id: s.stream_id,
                seq: first + i as u64,
                event,
                position: None,
            })
            .collect();
        payloads.extend(envelopes.iter().map(EventEnvelope::encode));
        let first = gap_seq.unwrap_or(first);
        let range = s.wal.append_batch(&payloads).map_err(|e| SinkError {
            fatal: matches!(e, daemoneye_wal::Error::Poisoned { .. }),
            message: format!("WAL append: {e}"),
        })?;
        if range.start != first {
            // Only this thread appends; anything else is a bug worth stopping for.
            return Err(SinkError {
                message: format!("WAL assigned {range:?}, expected {first}"),
                fatal: true,
            });
        }
        s.wal_bytes
            .fetch_add(payloads.iter().map(|p| p.len() as u64 + RECORD_OVERHEAD).sum(), Ordering::AcqRel);
        {
            let mut ages = s.ages.lock();
            if ages.len() < AGES_KEPT {
                ages.push_back((first, Instant::now()));
            }
        }
        let mut payloads = payloads.into_iter();
        if let Some(seq) = gap_seq {
            *s.lost.lock() = None;
            s.full.store(false, Ordering::Release);
            let bytes = payloads.next().unwrap_or_default();
            log::warn!("WAL below its cap again: the refused events are recorded as gap {seq}");
            if !buf.spilled && buf.bytes + bytes.len() <= s.limit {
                buf.bytes += bytes.len();
                buf.items.push_back(Item { seq, last: seq, topic: GAP_TOPIC, bytes });
            } else {
                buf.spilled = true;
            }
        } else if s.full.swap(false, Ordering::AcqRel) {
            log::warn!("WAL below its cap again");
        }
        for (env, bytes) in envelopes.iter().zip(payloads) {
            if !buf.spilled && buf.bytes + bytes.len() <= s.limit {
                buf.bytes += bytes.len();
                buf.items.push_back(Item::event(env.seq, env.event.kind, bytes));
            } else {
                if !buf.spilled {
                    log::warn!(
                        "send buffer full ({} bytes): events wait in the WAL from seq {}",
                        s.limit,
                        env.seq
                    );
                }
                buf.spilled = true;
            }
        }
        drop(buf);
        let _ = self.notify.try_send(());
        Ok(envelopes)
    }

    fn status(&self) -> SinkStatus {
        let s = &*self.shared;
        let appended = s.wal.next_seq().saturating_sub(1);
        SinkStatus {
            connection: if self.client.state() == ConnectionState::Connected {
                ConnectionStatus::Connected
            } else {
                ConnectionStatus::Disconnected
            },
            buffer_level_percent: s.level() * 100.0,
            unacknowledged: appended.saturating_sub(s.acked.load(Ordering::Acquire)),
            published: s.published.load(Ordering::Acquire),
        }
    }

    fn set_max_in_flight(&mut self, max: usize) {
        self.shared.max_in_flight.store(max.max(1) as u64, Ordering::Release);
        let _ = self.notify.try_send(());
    }

    fn flush(&mut self, timeout: Duration) -> Result<(), String> {
        let (tx, rx) = bounded(1);
        let deadline = Instant::now() + timeout;
        self.cmds
            .try_send(Cmd::Flush { deadline, reply: tx })
            .map_err(|_| "flush thread busy or gone".to_owned())?;
        let _ = self.notify.try_send(());
        let published = rx.recv_deadline(deadline + Duration::from_millis(500)).unwrap_or(Ok(()));
        // Under `Always` every append is durable already; this reports a
        // poisoned log.
        self.shared.wal.sync().map_err(|e| e.to_string())?;
        published
    }

    fn position(&self) -> (u64, u64) {
        (self.shared.stream_id, self.shared.wal.next_seq().saturating_sub(1))
    }

    fn events_after(&mut self, seq: u64) -> Result<Vec<ProcessEvent>, String> {
        let replay = self.shared.wal.replay_from(seq.saturating_add(1)).map_err(|e| e.to_string())?;
        let mut events = Vec::new();
        for rec in replay {
            match rec {
                Ok(rec) => match EventEnvelope::decode(&rec.payload) {
                    Ok(env) => events.push(env.event),
                    Err(e) => log::error!(
                        "WAL record {} does not decode ({e}); left out of the restart state",
                        rec.seq
                    ),
                },
                Err(e) => log::error!("WAL damage while reading the events after seq {seq}: {e}"),
            }
        }
        Ok(events)
    }

    fn checkpointed(&mut self, seq: u64) {
        let s = &*self.shared;
        let floor = s.floor.fetch_max(seq, Ordering::AcqRel).max(seq);
        // What the store acknowledged before this checkpoint can go now:
        // with a full WAL no new event (so no new acknowledgement) may come
        // to do it.
        let truncate = s.acked.load(Ordering::Acquire).min(floor);
        if truncate > s.wal.watermark() {
            match s.wal.truncate_through(truncate) {
                Ok(()) => s.measure(),
                Err(e) => log::error!("WAL truncation through {truncate} failed: {e}"),
            }
        }
    }
}

/// Reads the stream id of a WAL directory, creating it for a fresh WAL.
fn stream_id(dir: &Path, fresh: bool) -> Result<u64, ConnectorError> {
    let path = dir.join(STREAM_FILE);
    let io = |what: &str, source| ConnectorError::Io { what: format!("{what} {}", path.display()), source };
    let read = if fresh {
        // A WAL that never assigned a number: whatever stream the file
        // names is not this WAL's (its records are gone, or there were none).
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    } else {
        std::fs::read_to_string(&path)
    };
    match read {
        Ok(text) => text.trim().parse().map_err(|_| {
            io(
                "parse",
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a number: {text:?}")),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // std's RandomState is seeded from the OS's random source.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            );
            let id = h.finish() >> 1; // fits SQLite's signed INTEGER
            // Mode 0600, never through a planted link; tmp, fsync, rename,
            // directory fsync.
            daemoneye_platform::files::replace_private_file(&path, format!("{id}\n").as_bytes())
                .map_err(|e| io("write", e))?;
            log::info!("new event stream {id}");
            Ok(id)
        }
        Err(e) => Err(io("read", e)),
    }
}

/// A gap marker for events `from..=to` that the WAL cannot give back.
fn gap(s: &Shared, from: u64, to: u64, reason: String) -> Item {
    log::error!("events {from}..={to} of stream {} are lost: {reason}; publishing a gap marker", s.stream_id);
    let gap = StreamGap {
        collector_id: s.collector_id.clone(),
        stream_id: s.stream_id,
        from,
        to,
        reason,
        position: None,
    };
    Item { seq: from, last: to, topic: GAP_TOPIC, bytes: gap.encode() }
}

/// The flush thread's state.
struct Flusher {
    shared: Arc<Shared>,
    client: Arc<Client>,
    actor: ActorSender,
    /// The next sequence number to publish.
    next: u64,
    /// Records re-read from the WAL, from `next` on.
    reread: VecDeque<Item>,
    /// An open WAL replay and the sequence number it yields next, kept
    /// between batches so a long backlog is read once, not rescanned.
    replay: Option<(daemoneye_wal::Replay, u64)>,
    seen_connections: u64,
    /// The highest sequence number ever sent: by this run, or (every record
    /// the WAL held at startup) by an earlier one.
    max_sent: u64,
    slowed: bool,
    /// Last time an acknowledgement advanced (or nothing was in flight).
    last_progress: Instant,
    ack_timeout: Duration,
    /// Acknowledgements ignored because the store did not send them.
    foreign_acks: u64,
}

impl Flusher {
    fn run(mut self, cmds: Receiver<Cmd>, notify: Receiver<()>, acks: Subscription) {
        let mut ack_rx = acks.messages().clone();
        let mut flush: Option<(Instant, Sender<Result<(), String>>)> = None;
        while !self.shared.stop.load(Ordering::Acquire) {
            select! {
                recv(cmds) -> cmd => match cmd {
                    Ok(Cmd::Flush { deadline, reply }) => flush = Some((deadline, reply)),
                    Ok(Cmd::Ack(ack)) => self.on_ack(ack),
                    Err(_) => break,
                },
                recv(notify) -> _ => {}
                recv(ack_rx) -> msg => match msg {
                    // Only the store truncates the WAL: an acknowledgement
                    // from anyone else (the broker names the sender) is
                    // ignored, whatever it says.
                    Ok(msg) if msg.from != control::STORE_CLIENT_ID => {
                        self.foreign_acks += 1;
                        if self.foreign_acks.is_power_of_two() {
                            log::warn!(
                                "ignored a store acknowledgement on {} from {:?}, not the store ({} so far)",
                                msg.topic,
                                msg.from,
                                self.foreign_acks
                            );
                        }
                    }
                    Ok(msg) => match daemoneye_contract::topic::ACKS.decode(&msg) {
                        Ok(ack) => self.on_ack(ack),
                        Err(e) => log::warn!("malformed store acknowledgement on {}: {e}", msg.topic),
                    },
                    // The client is closed or refused: stop selecting on it.
                    Err(_) => ack_rx = never(),
                },
                // Each wake-up costs tens of microseconds: look again soon
                // only while something waits to go out.
                recv(after(self.poll_interval(flush.is_some()))) -> _ => {}
            }
            self.check_connection();
            self.pump();
            self.backpressure();
            if let Some((deadline, _)) = &flush {
                let done = self.next >= self.shared.wal.next_seq();
                // Disconnected, nothing more can go out now; the WAL keeps it.
                let offline = self.client.state() != ConnectionState::Connected;
                if done || offline || Instant::now() >= *deadline {
                    let left = self.shared.wal.next_seq().saturating_sub(self.next);
                    let result = if done {
                        Ok(())
                    } else {
                        log::warn!(
                            "flush: {left} events not published before the deadline; they stay in the WAL"
                        );
                        Ok(())
                    };
                    if let Some((_, reply)) = flush.take() {
                        let _ = reply.try_send(result);
                    }
                }
            }
        }
        log::debug!("procmond-flush stopped at seq {}", self.next);
    }

    fn on_ack(&mut self, ack: StoreAck) {
        let s = &*self.shared;
        if ack.stream_id != s.stream_id {
            log::debug!("acknowledgement for stream {} ignored (ours is {})", ack.stream_id, s.stream_id);
            return;
        }
        let through = ack.through;
        if through <= s.acked.load(Ordering::Acquire) {
            return;
        }
        // Invariant: only what was sent (now, or by an earlier run) can be
        // acknowledged. Anything above is a confused or hostile peer, and
        // honouring it would delete records never delivered.
        if through > self.max_sent {
            log::error!(
                "acknowledgement through {through} for stream {} refused: only {} were ever sent",
                s.stream_id,
                self.max_sent
            );
            return;
        }
        // Invariant: the WAL keeps every event after the last checkpoint.
        let truncate = through.min(s.floor.load(Ordering::Acquire));
        let truncated = if truncate > s.wal.watermark() { s.wal.truncate_through(truncate) } else { Ok(()) };
        match truncated {
            Ok(()) => {
                s.acked.store(through, Ordering::Release);
                s.measure();
                self.last_progress = Instant::now();
                if self.next <= through {
                    // The store has them already (sent before a restart).
                    self.next = through + 1;
                    self.reread.clear();
                }
                log::debug!("store acknowledged through {through}; WAL truncated");
            }
            Err(e) => log::error!("WAL truncation through {through} failed: {e}"),
        }
    }

    /// After a (re)connection, or when acknowledgements stall, publishing
    /// restarts at the first unacknowledged record.
    fn check_connection(&mut self) {
        let n = self.client.connections();
        let acked = self.shared.acked.load(Ordering::Acquire);
        if n != self.seen_connections {
            self.seen_connections = n;
            if self.next > acked + 1 {
                log::info!("bus reconnected: re-sending unacknowledged events from seq {}", acked + 1);
            }
            self.rewind(acked + 1);
        } else if self.next > acked + 1 && self.last_progress.elapsed() > self.ack_timeout {
            log::warn!(
                "no acknowledgement for {:?} with {} events in flight: re-sending from seq {}",
                self.ack_timeout,
                self.next - acked - 1,
                acked + 1
            );
            self.rewind(acked + 1);
        } else if self.next == acked + 1 {
            self.last_progress = Instant::now();
        }
    }

    /// How long the thread sleeps when nothing wakes it: 100 ms while
    /// events wait to be published (a publish that timed out is retried),
    /// 1 s otherwise (reconnections are noticed within it).
    fn poll_interval(&self, flushing: bool) -> Duration {
        let backlog = self.next < self.shared.wal.next_seq() || !self.reread.is_empty();
        if backlog || flushing { Duration::from_millis(100) } else { Duration::from_secs(1) }
    }

    fn rewind(&mut self, to: u64) {
        self.next = to;
        self.reread.clear();
        self.replay = None;
        self.last_progress = Instant::now();
    }

    /// The record at `self.next`, from the buffer or the WAL.
    fn take_next(&mut self) -> Option<Item> {
        if let Some(item) = self.reread.pop_front() {
            return Some(item);
        }
        let s = &*self.shared;
        let mut buf = s.buffer.lock();
        // Buffered records the WAL already served are dropped.
        while buf.items.front().is_some_and(|i| i.seq < self.next) {
            if let Some(i) = buf.items.pop_front() {
                buf.bytes -= i.bytes.len();
            }
        }
        if let Some(front) = buf.items.front()
            && front.seq == self.next
        {
            let item = buf.items.pop_front()?;
            buf.bytes -= item.bytes.len();
            return Some(item);
        }
        let end = s.wal.next_seq();
        if self.next >= end {
            if buf.items.is_empty() && buf.spilled {
                buf.spilled = false;
                log::info!("send buffer caught up with the WAL");
            }
            return None;
        }
        // Re-read a batch up to the first buffered record (or the end),
        // continuing the open replay when it stands where we are.
        let upto = buf.items.front().map_or(end, |i| i.seq);
        drop(buf);
        // A replay sees only the records appended before it was opened: a
        // continued one that yields nothing is retried fresh before any
        // record counts as missing.
        let reused = self.replay.as_ref().is_some_and(|(_, pos)| *pos == self.next);
        if !reused {
            self.open_replay();
        }
        self.read_batch(upto);
        if reused && self.reread.is_empty() {
            self.open_replay();
            self.read_batch(upto);
        }
        if self.reread.is_empty() && self.next < upto {
            // Nothing readable even from a fresh replay (an I/O error,
            // logged): never guess that records are gone; try again later.
            return None;
        }
        self.reread.pop_front()
    }

    fn open_replay(&mut self) {
        self.replay = match self.shared.wal.replay_from(self.next) {
            Ok(replay) => Some((replay, self.next)),
            Err(e) => {
                log::error!("WAL re-read from {} failed: {e}", self.next);
                None
            }
        };
    }

    /// Moves records from the open replay into `reread`, up to `upto` (the
    /// first buffered record) or a batch; drops the replay once exhausted.
    fn read_batch(&mut self, upto: u64) {
        let Some((replay, pos)) = &mut self.replay else { return };
        let shared = &*self.shared;
        let mut exhausted = true;
        for rec in replay.by_ref() {
            match rec {
                Ok(rec) => {
                    *pos = rec.seq + 1;
                    if rec.seq >= upto {
                        exhausted = false;
                        break;
                    }
                    let expected = self.reread.back().map_or(self.next, |i| i.last + 1);
                    if rec.seq > expected {
                        // The WAL reported damage (logged below): those
                        // records are gone. Say so, in order.
                        self.reread.push_back(gap(
                            shared,
                            expected,
                            rec.seq - 1,
                            "lost to WAL damage".into(),
                        ));
                    }
                    if rec.payload.get(4) == Some(&codec::Kind::StreamGap.byte())
                        && let Ok(gap) = StreamGap::decode(&rec.payload)
                        && (gap.from, gap.to) == (rec.seq, rec.seq)
                    {
                        // A gap record of the WAL's own (events refused at its cap).
                        self.reread.push_back(Item {
                            seq: rec.seq,
                            last: rec.seq,
                            topic: GAP_TOPIC,
                            bytes: rec.payload,
                        });
                        continue;
                    }
                    match EventEnvelope::decode(&rec.payload) {
                        Ok(env) => self.reread.push_back(Item::event(rec.seq, env.event.kind, rec.payload)),
                        Err(e) => self.reread.push_back(gap(
                            shared,
                            rec.seq,
                            rec.seq,
                            format!("record does not decode: {e}"),
                        )),
                    }
                    if self.reread.len() >= REREAD_BATCH {
                        exhausted = false;
                        break;
                    }
                }
                Err(e) => log::error!("WAL damage while re-reading: {e}"),
            }
        }
        if exhausted {
            self.replay = None;
        }
    }

    fn pump(&mut self) {
        let s = self.shared.clone();
        while self.client.state() == ConnectionState::Connected && !s.stop.load(Ordering::Acquire) {
            let in_flight = self.next.saturating_sub(s.acked.load(Ordering::Acquire) + 1);
            if in_flight >= s.max_in_flight.load(Ordering::Acquire) {
                break;
            }
            let Some(item) = self.take_next() else { break };
            let stated = restate(item.topic, &item.bytes, s.position(), s.peer.get());
            let bytes = stated.as_deref().unwrap_or(&item.bytes);
            match self.client.publish(item.topic, bytes) {
                Ok(()) => {
                    self.next = item.last + 1;
                    self.max_sent = self.max_sent.max(item.last);
                    s.published.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => {
                    // Kept for the next try, in order.
                    self.reread.push_front(item);
                    log::debug!("publish paused: {e}");
                    break;
                }
            }
        }
    }

    fn backpressure(&mut self) {
        let level = self.shared.level();
        let want = if level >= SLOW_AT {
            Some(true)
        } else if level < RESTORE_BELOW {
            Some(false)
        } else {
            None
        };
        if let Some(slow) = want
            && slow != self.slowed
        {
            let adj = if slow { IntervalAdjustment::SlowDown } else { IntervalAdjustment::Restore };
            if self.actor.adjust_interval(adj).is_ok() {
                self.slowed = slow;
                log::info!(
                    "send buffer at {:.0}%: asked the collector to {}",
                    level * 100.0,
                    if slow { "slow down 1.5x" } else { "restore its interval" }
                );
            }
        }
    }
}
/// A WAL record (or gap marker) as it goes out: with the stream's
/// position, in the agent's version (version 1 and 2 agents get their own
/// layout, without the position). `None` if it does not decode: it goes
/// out as it is, and the store settles its number as a gap.
fn restate(topic: &str, bytes: &[u8], position: StreamPosition, version: Version) -> Option<Vec<u8>> {
    if topic == GAP_TOPIC {
        let gap = StreamGap { position: Some(position), ..StreamGap::decode(bytes).ok()? };
        Some(codec::encode_as(version, &gap))
    } else {
        let env = EventEnvelope { position: Some(position), ..EventEnvelope::decode(bytes).ok()? };
        Some(codec::encode_as(version, &env))
    }
}
