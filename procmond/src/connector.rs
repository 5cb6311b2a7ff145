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
//!
//! This module holds the handle ([`Connector`]), its settings and the
//! state its two sides share; the actor's side (`submit` and the other
//! [`EventSink`] calls) is in `sink`, the flush thread in `flusher`.

mod flusher;
mod sink;

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

use self::flusher::Flusher;

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
