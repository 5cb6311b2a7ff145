//! Version skew: peers and files of the previous release (contract version
//! 1, written with the frozen copy in `daemoneye_tests::frozen_v1`)
//! against the current code, over real processes and real sockets.
//!
//! - A collector of the previous release (`legacy-collector`) against the
//!   current agent: registered, heartbeats counted, its events stored, and
//!   every answer it needed (registration, BeginMonitoring, StoreAck)
//!   readable as version 1.
//! - The current procmond against an agent of the previous release (a
//!   fake agent here that reads and writes only version 1): procmond falls
//!   back to version 1 and its events and heartbeats are read.
//! - A WAL written with version 1 records: read and delivered by the
//!   current procmond after the upgrade, stored by the current agent.
//! - A store whose rows hold version 1 blobs (schema 2): migrated and read.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use daemoneye_agent::api::CollectorPhase;
use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig};
use daemoneye_contract::event::{EventEnvelope, EventKind};
use daemoneye_contract::{Version, codec};
use daemoneye_store::{EventQuery, EventStore};
use daemoneye_tests::frozen_v1 as v1;
use daemoneye_tests::{CollectorDef, System, bin, store_summary, wait_until, watermarks};

const WAIT: Duration = Duration::from_secs(40);

fn legacy_log(sys: &System, id: &str) -> String {
    std::fs::read_to_string(sys.data_dir().join("collectors").join(id).join("legacy.log")).unwrap_or_default()
}

#[test]
fn a_collector_of_the_previous_release_is_registered_and_its_events_are_stored() {
    let legacy = PathBuf::from(env!("CARGO_BIN_EXE_legacy-collector"));
    let mut sys = System::start(&[CollectorDef::with_binary("legacy", legacy).args(&["--events", "25"])], "");
    // Its events, all of them once, acknowledged in a StoreAck it could
    // read as version 1.
    let db = sys.database();
    let done = wait_until(WAIT, || {
        store_summary(&db).iter().any(|(c, n, exact)| c == "legacy" && *n == 25 && *exact)
            && legacy_log(&sys, "legacy").lines().any(|l| l == "acked 25")
    });
    assert!(
        done,
        "store {:?}, watermarks {:?}, legacy log {:?}\n{}",
        store_summary(&db),
        watermarks(&db),
        legacy_log(&sys, "legacy"),
        sys.tail()
    );
    let log = legacy_log(&sys, "legacy");
    assert!(log.lines().any(|l| l == "registered") && log.lines().any(|l| l == "begin"), "{log}");
    assert!(!log.contains("not version 1"), "every answer it got was version 1: {log}");

    // Its heartbeats are read: the agent counts them and keeps it running.
    let status = sys.wait_status(WAIT, "legacy heartbeats", |s| {
        s.collectors.iter().any(|c| {
            c.id == "legacy"
                && c.phase == CollectorPhase::Running
                && c.heartbeat.as_ref().is_some_and(|h| h.sequence >= 2)
        })
    });
    assert!(status.collectors.iter().all(|c| c.restarts == 0), "{status:#?}");

    // Stored as the current version (the rows' blobs have the header) and
    // read back whole, the fields version 1 carried intact.
    let store = EventStore::open_read_only(&db).expect("store");
    let events =
        store.query(&EventQuery { collector_id: Some("legacy".into()), ..Default::default() }).unwrap();
    assert_eq!(events.len(), 25);
    let e = &events[4].event;
    assert_eq!((events[4].seq, e.kind, e.process.name.as_str()), (5, EventKind::Started, "legacy-5"));
    assert_eq!(e.process.details.argv.as_ref().unwrap().args, ["legacy-5", "--old"]);
    let blob: Vec<u8> = store
        .connection()
        .query_row("SELECT record FROM process_events WHERE collector_id = 'legacy' LIMIT 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(Version::of(&blob), Version::CURRENT);
}

/// An agent of the previous release, as procmond sees it: it reads only
/// version 1 (a current payload does not decode, and its answer to that
/// is a version 1 rejection), answers in version 1 and acknowledges in
/// version 1.
struct OldAgent {
    registrations: Vec<&'static str>,
    events: Vec<v1::EventEnvelope>,
    undecodable_events: usize,
    heartbeats: usize,
    undecodable_heartbeats: usize,
}

#[test]
fn the_current_collector_falls_back_to_version_1_for_an_agent_of_the_previous_release() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let _broker = Broker::start(BrokerConfig::new(&socket)).expect("broker");
    let agent = Arc::new(Client::connect(ClientConfig::new(&socket, "daemoneye-agent")).unwrap());
    let store = Client::connect(ClientConfig::new(&socket, "daemoneye-agent-store")).unwrap();
    assert!(agent.wait_connected(Duration::from_secs(10)) && store.wait_connected(Duration::from_secs(10)));
    let regs = agent.subscribe("control.collector.registration").unwrap();
    let events = store.subscribe("events.process.+").unwrap();
    let hbs = agent.subscribe("control.health.heartbeat.+").unwrap();

    let data = dir.path().join("pm");
    let mut child = ProcmondGuard(
        Command::new(bin("procmond"))
            .args([
                "--collector-id",
                "pm",
                "--heartbeat-interval",
                "1",
                "--interval",
                "5",
                "--log-level",
                "debug",
            ])
            .arg("--data-dir")
            .arg(&data)
            .env("DAEMONEYE_BROKER_SOCKET", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("procmond.log")).unwrap())
            .spawn()
            .expect("procmond starts"),
    );
    let mut old = OldAgent {
        registrations: Vec::new(),
        events: Vec::new(),
        undecodable_events: 0,
        heartbeats: 0,
        undecodable_heartbeats: 0,
    };
    let done = wait_until(WAIT, || {
        while let Ok(m) = regs.messages().try_recv() {
            // The previous release's decoder: postcard, version 1 layout.
            let reply = match v1::decode::<v1::RegistrationMessage>(&m.payload) {
                Ok(v1::RegistrationMessage::Register(_)) => {
                    old.registrations.push("v1");
                    v1::RegistrationResponse {
                        status: v1::RegistrationStatus::Accepted,
                        message: None,
                        begin_monitoring: true,
                        acknowledged_through: None,
                    }
                }
                Ok(v1::RegistrationMessage::Deregister { .. }) => continue,
                Err(e) => {
                    old.registrations.push("undecodable");
                    v1::RegistrationResponse {
                        status: v1::RegistrationStatus::Rejected,
                        message: Some(format!("undecodable registration: {e}")),
                        begin_monitoring: false,
                        acknowledged_through: None,
                    }
                }
            };
            agent.reply(&m, &v1::encode(&reply)).unwrap();
        }
        while let Ok(m) = hbs.messages().try_recv() {
            match v1::decode::<v1::Heartbeat>(&m.payload) {
                Ok(hb) if hb.collector_id == "pm" => old.heartbeats += 1,
                _ => old.undecodable_heartbeats += 1,
            }
        }
        let mut through = None;
        while let Ok(m) = events.messages().try_recv() {
            match v1::decode::<v1::EventEnvelope>(&m.payload) {
                Ok(env) => {
                    through = Some((env.stream_id, env.seq));
                    old.events.push(env);
                }
                Err(_) => old.undecodable_events += 1,
            }
        }
        if let Some((stream_id, seq)) = through {
            let ack = v1::StoreAck { stream_id, through: seq };
            let _ = store.publish("control.ack.pm", &v1::encode(&ack));
        }
        old.heartbeats >= 2 && old.events.len() >= 5
    });
    let log = std::fs::read_to_string(dir.path().join("procmond.log")).unwrap_or_default();
    assert!(
        done,
        "registrations {:?}, {} events ({} undecodable), {} heartbeats ({} undecodable)\n{log}",
        old.registrations,
        old.events.len(),
        old.undecodable_events,
        old.heartbeats,
        old.undecodable_heartbeats
    );
    // It tried the current version first, then spoke version 1 only.
    assert_eq!(old.registrations[..2], ["undecodable", "v1"], "{log}");
    assert_eq!((old.undecodable_events, old.undecodable_heartbeats), (0, 0), "{log}");
    let seqs: Vec<u64> = old.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "in order, none lost");
    assert!(old.events.iter().all(|e| e.collector_id == "pm"));
    // Acknowledged in version 1: procmond truncates its WAL (its WAL keeps
    // current records whatever the agent speaks).
    child.stop();
}

struct ProcmondGuard(Child);

impl ProcmondGuard {
    fn stop(&mut self) {
        daemoneye_tests::signal(self.0.id(), nix::sys::signal::Signal::SIGTERM);
        if !wait_until(Duration::from_secs(10), || self.0.try_wait().ok().flatten().is_some()) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Drop for ProcmondGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A version 1 envelope of collector `id`, stream `stream`, seq `seq`.
fn old_envelope(id: &str, stream: u64, seq: u64) -> v1::EventEnvelope {
    let name = format!("from-v1-wal-{seq}");
    v1::EventEnvelope {
        collector_id: id.to_owned(),
        stream_id: stream,
        seq,
        event: v1::ProcessEvent {
            kind: v1::EventKind::Stopped,
            snapshot: false,
            changes: Vec::new(),
            observed_unix_ms: 1_700_000_000_000 + seq,
            process: v1::ProcessRecord {
                pid: 50_000 + seq as u32,
                ppid: 1,
                start_time: seq,
                started_unix: Ok(1_700_000_000),
                name: name.clone(),
                state: v1::ProcessState::Zombie,
                session: Err(v1::Unavailable::Vanished),
                threads: Ok(1),
                rss_bytes: 0,
                virtual_bytes: 0,
                cpu_time_ms: Ok(3),
                kernel_thread: false,
                details: Arc::new(v1::ProcessDetails {
                    exe: Ok(PathBuf::from("/usr/bin/old")),
                    exe_file: Err(v1::Unavailable::NotPermitted),
                    exe_deleted: Ok(true),
                    argv: Ok(v1::Argv { args: vec![name, "x".into()], truncated: true }),
                    cwd: Err(v1::Unavailable::NotCollected),
                    credentials: Ok(v1::Credentials { uid: 0, euid: 0, gid: 0, egid: 0 }),
                    user: Ok("root".into()),
                }),
            },
            sha256: None,
            source: v1::EventSource::Kernel,
            late: None,
            exit: Some(v1::ExitStatus::Signal { signal: 9, core_dumped: false }),
        },
    }
}

#[test]
fn a_wal_written_with_version_1_records_is_delivered_after_the_upgrade() {
    let sys = System::create(&[CollectorDef::procmond("pm-w")], "");
    // The previous release's procmond left 12 unacknowledged records.
    let wal_dir = sys.data_dir().join("collectors").join("pm-w").join("wal").join("pm-w");
    std::fs::create_dir_all(&wal_dir).unwrap();
    let stream = 31_337;
    std::fs::write(wal_dir.join("STREAM"), format!("{stream}\n")).unwrap();
    {
        let (wal, _) = daemoneye_wal::Wal::open(&wal_dir, daemoneye_wal::WalOptions::default()).unwrap();
        for seq in 1..=12 {
            let bytes = v1::encode(&old_envelope("pm-w", stream, seq));
            assert_eq!(Version::of(&bytes), Version::V1);
            assert_eq!(wal.append(&bytes).unwrap(), seq);
        }
        wal.close().unwrap();
    }
    let mut sys = sys;
    sys.start_agent();
    let db = sys.database();
    let stored = || -> Vec<String> {
        let Ok(store) = EventStore::open_read_only(&db) else { return Vec::new() };
        let q = EventQuery { collector_id: Some("pm-w".into()), ..Default::default() };
        store
            .query(&q)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.stream_id == stream && e.seq <= 12)
            .map(|e| e.event.process.name)
            .collect()
    };
    let ok = wait_until(WAIT, || stored().len() == 12);
    assert!(ok, "stored {:?}\n{}", stored(), sys.tail());
    assert_eq!(stored(), (1..=12).map(|s| format!("from-v1-wal-{s}")).collect::<Vec<_>>());
    // Whole: the old record's fields came through.
    let store = EventStore::open_read_only(&db).unwrap();
    let q = EventQuery {
        collector_id: Some("pm-w".into()),
        name: Some("from-v1-wal-3".into()),
        ..Default::default()
    };
    let e = store.query(&q).unwrap().remove(0);
    assert_eq!((e.seq, e.event.kind), (3, EventKind::Stopped));
    assert_eq!(e.event.exit, Some(daemoneye_platform::ExitStatus::Signal { signal: 9, core_dumped: false }));
    assert_eq!(e.event.process.details.exe_deleted, Ok(true));
    // New events continue the same stream after the old ones, and the
    // store acknowledges through them: nothing stuck, nothing lost.
    let ok = wait_until(WAIT, || {
        watermarks(&db).iter().any(|(c, t)| c == "pm-w" && *t > 12)
            && store_summary(&db).iter().any(|(c, n, exact)| c == "pm-w" && *n > 12 && *exact)
    });
    assert!(ok, "store {:?}, watermarks {:?}\n{}", store_summary(&db), watermarks(&db), sys.tail());
    assert!(!sys.log().contains("does not decode"), "{}", sys.tail());
}

#[test]
fn a_store_with_version_1_blobs_is_migrated_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    write_previous_release_store(&db, 8);
    let store = EventStore::open(&db).expect("an older store opens");
    let version: u32 = store.connection().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, daemoneye_store::SCHEMA_VERSION);
    let events = store.query(&EventQuery::default()).expect("old rows decode");
    assert_eq!(events.len(), 8);
    for (i, e) in events.iter().enumerate() {
        let seq = i as u64 + 1;
        let old = old_envelope("old", 9, seq);
        assert_eq!((e.collector_id.as_str(), e.stream_id, e.seq), ("old", 9, seq));
        assert_eq!(e.event.process.name, old.event.process.name);
        assert_eq!(e.event.observed_unix_ms, old.event.observed_unix_ms);
        assert_eq!(
            e.event.process.details.argv.as_ref().unwrap().args,
            old.event.process.details.argv.as_ref().unwrap().args
        );
    }
    // New rows are written in the current version beside the old ones.
    let mut store = store;
    let new = daemoneye_contract::testing::envelope(
        "old",
        9,
        9,
        EventKind::Started,
        daemoneye_contract::testing::record(7, 7, "new"),
        1,
    );
    store.insert_batch(std::slice::from_ref(&new)).unwrap();
    let blobs: Vec<Vec<u8>> = {
        let mut stmt = store.connection().prepare("SELECT record FROM process_events ORDER BY seq").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(blobs.iter().map(|b| Version::of(b)).filter(|v| *v == Version::V1).count(), 8);
    assert_eq!(Version::of(&blobs[8]), Version::CURRENT);
    let all = store.query(&EventQuery::default()).unwrap();
    assert_eq!(all.last().map(|e| e.event.clone()), Some(new.event));
    // And the strict reader refuses a damaged old blob instead of reading
    // part of it.
    let mut cut = blobs[0].clone();
    cut.push(0);
    assert!(matches!(
        codec::decode::<daemoneye_contract::event::ProcessEvent>(&cut),
        Err(codec::Error::TrailingBytes { .. })
    ));
    let _ =
        EventEnvelope::decode(&v1::encode(&old_envelope("x", 1, 1))).expect("a version 1 envelope decodes");
}

/// A store as the previous release left it: schema 2 (today's columns),
/// each `record` the version 1 postcard of the event, no header.
fn write_previous_release_store(db: &Path, n: u64) {
    // The current code lays out the tables (schema 2 and 3 have the same
    // columns); the rows' blobs and the version are then the old ones.
    {
        let mut store = EventStore::open(db).unwrap();
        let events: Vec<EventEnvelope> = (1..=n)
            .map(|seq| EventEnvelope::decode(&v1::encode(&old_envelope("old", 9, seq))).unwrap())
            .collect();
        store.insert_batch(&events).unwrap();
    }
    let conn = rusqlite::Connection::open(db).unwrap();
    for seq in 1..=n {
        let blob = v1::encode(&old_envelope("old", 9, seq).event);
        conn.execute(
            "UPDATE process_events SET record = ?1 WHERE seq = ?2",
            rusqlite::params![blob, seq as i64],
        )
        .unwrap();
    }
    conn.pragma_update(None, "user_version", 2).unwrap();
}
