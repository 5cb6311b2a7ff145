//! A collector of the previous release, as far as the agent can tell: it
//! speaks only the frozen version 1 payloads of `frozen_v1` (headerless
//! postcard) over the real bus. The agent supervises it like procmond
//! (`--collector-id`, `--data-dir`, `--heartbeat-interval`, the broker
//! socket in `DAEMONEYE_BROKER_SOCKET`); `--events N` is its own.
//!
//! It registers, heartbeats, waits for `BeginMonitoring`, publishes N
//! events (seq 1..=N, process names `legacy-<seq>`) and waits for the
//! store's acknowledgement of all of them. Each step that needed a version
//! 1 answer from the agent is written as a line to `<data-dir>/legacy.log`
//! (`registered`, `begin`, `acked <n>`), so the test sees what this
//! collector could read. It answers `GracefulShutdown` and exits.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, tick};
use daemoneye_bus::{Client, ClientConfig};
use daemoneye_tests::frozen_v1 as v1;

struct Args {
    id: String,
    data_dir: PathBuf,
    heartbeat: Duration,
    events: u64,
}

fn args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut id, mut data_dir, mut heartbeat, mut events) = (None, None, 1, 10);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--collector-id" => id = Some(value()?),
            "--data-dir" => data_dir = Some(PathBuf::from(value()?)),
            "--heartbeat-interval" => heartbeat = value()?.parse().map_err(|e| format!("{e}"))?,
            "--events" => events = value()?.parse().map_err(|e| format!("{e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        id: id.ok_or("--collector-id")?,
        data_dir: data_dir.ok_or("--data-dir")?,
        heartbeat: Duration::from_secs(heartbeat),
        events,
    })
}

fn note(args: &Args, line: &str) {
    let _ = std::fs::create_dir_all(&args.data_dir);
    if let Ok(mut f) =
        std::fs::OpenOptions::new().create(true).append(true).open(args.data_dir.join("legacy.log"))
    {
        let _ = writeln!(f, "{line}");
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn record(pid: u32, name: &str) -> v1::ProcessRecord {
    v1::ProcessRecord {
        pid,
        ppid: 1,
        start_time: u64::from(pid),
        started_unix: Ok(1_700_000_000),
        name: name.to_owned(),
        state: v1::ProcessState::Sleeping,
        session: Ok(pid),
        threads: Ok(1),
        rss_bytes: 1 << 20,
        virtual_bytes: 4 << 20,
        cpu_time_ms: Err(v1::Unavailable::NotCollected),
        kernel_thread: false,
        details: Arc::new(v1::ProcessDetails {
            exe: Ok(PathBuf::from(format!("/usr/bin/{name}"))),
            exe_file: Err(v1::Unavailable::NotPermitted),
            exe_deleted: Ok(false),
            argv: Ok(v1::Argv { args: vec![name.to_owned(), "--old".into()], truncated: false }),
            cwd: Err(v1::Unavailable::NotCollected),
            credentials: Ok(v1::Credentials { uid: 1000, euid: 1000, gid: 1000, egid: 1000 }),
            user: Ok("legacy".into()),
        }),
    }
}

fn heartbeat(id: &str, sequence: u64) -> v1::Heartbeat {
    v1::Heartbeat {
        collector_id: id.to_owned(),
        sequence,
        timestamp_unix_ms: now_ms(),
        status: v1::HealthStatus::Healthy,
        metrics: v1::HeartbeatMetrics {
            processes_collected: 0,
            events_published: 0,
            buffer_level_percent: 0.0,
            connection_status: v1::ConnectionStatus::Connected,
            cycles: 0,
            errors: 0,
            tasks_served: 0,
            tasks_failed: 0,
            task_latency_avg_us: 0,
            event_source: v1::EventSourceStatus::default(),
        },
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("legacy-collector: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args = args()?;
    let socket = std::env::var_os("DAEMONEYE_BROKER_SOCKET").ok_or("DAEMONEYE_BROKER_SOCKET is not set")?;
    let client = Client::connect(ClientConfig::new(PathBuf::from(socket), args.id.clone()))
        .map_err(|e| e.to_string())?;
    if !client.wait_connected(Duration::from_secs(10)) {
        return Err("not connected".into());
    }
    let lifecycle = client.subscribe("control.collector.lifecycle").map_err(|e| e.to_string())?;
    let acks = client.subscribe(&format!("control.ack.{}", args.id)).map_err(|e| e.to_string())?;
    let rpc = client.subscribe(&format!("control.collector.{}", args.id)).map_err(|e| e.to_string())?;
    let stream_id = 4242;

    // Register until accepted; the answer must decode as version 1.
    let request = v1::RegistrationMessage::Register(v1::RegistrationRequest {
        collector_id: args.id.clone(),
        collector_type: "process-monitor".into(),
        version: "0.0.1-v1".into(),
        capabilities: vec!["backend:legacy".into()],
        pid: std::process::id(),
        heartbeat_interval_ms: args.heartbeat.as_millis() as u64,
        stream_id,
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut begin = loop {
        if Instant::now() > deadline {
            return Err("not registered within 20 s".into());
        }
        let Ok(reply) =
            client.request("control.collector.registration", &v1::encode(&request), Duration::from_secs(2))
        else {
            continue;
        };
        let resp: v1::RegistrationResponse =
            v1::decode(&reply.payload).map_err(|e| format!("registration reply is not version 1: {e}"))?;
        if resp.status == v1::RegistrationStatus::Accepted {
            note(&args, "registered");
            break resp.begin_monitoring;
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    let beat = tick(args.heartbeat);
    let mut sequence = 0;
    let mut published = false;
    loop {
        if begin && !published {
            note(&args, "begin");
            for seq in 1..=args.events {
                let env = v1::EventEnvelope {
                    collector_id: args.id.clone(),
                    stream_id,
                    seq,
                    event: v1::ProcessEvent {
                        kind: v1::EventKind::Started,
                        snapshot: false,
                        changes: Vec::new(),
                        observed_unix_ms: now_ms(),
                        process: record(10_000 + seq as u32, &format!("legacy-{seq}")),
                        sha256: Some(v1::HashOutcome::Sha256("ab".repeat(32))),
                        source: v1::EventSource::Kernel,
                        late: None,
                        exit: None,
                    },
                };
                client.publish("events.process.started", &v1::encode(&env)).map_err(|e| e.to_string())?;
            }
            published = true;
        }
        select! {
            recv(beat) -> _ => {
                sequence += 1;
                let hb = heartbeat(&args.id, sequence);
                let _ = client.publish(&format!("control.health.heartbeat.{}", args.id), &v1::encode(&hb));
            }
            recv(lifecycle.messages()) -> m => {
                let m = m.map_err(|_| "bus gone")?;
                match v1::decode::<v1::LifecycleCommand>(&m.payload) {
                    Ok(v1::LifecycleCommand::BeginMonitoring) => begin = true,
                    Err(e) => note(&args, &format!("lifecycle not version 1: {e}")),
                }
            }
            recv(acks.messages()) -> m => {
                let m = m.map_err(|_| "bus gone")?;
                match v1::decode::<v1::StoreAck>(&m.payload) {
                    Ok(ack) if ack.stream_id == stream_id => note(&args, &format!("acked {}", ack.through)),
                    Ok(ack) => note(&args, &format!("ack of stream {}", ack.stream_id)),
                    Err(e) => note(&args, &format!("ack not version 1: {e}")),
                }
            }
            recv(rpc.messages()) -> m => {
                let m = m.map_err(|_| "bus gone")?;
                // Version 1 `RpcRequest` is a postcard enum: its first byte
                // is the variant (0 HealthCheck, 2 GracefulShutdown); the
                // answer `RpcResponse { status: Ok, message: None,
                // health: None }` is three zero bytes.
                let _ = client.reply(&m, &[0, 0, 0]);
                if m.payload.first() == Some(&2) {
                    note(&args, "shutdown");
                    return Ok(());
                }
            }
        }
    }
}
