//! The agent as a whole: start order, the broker's permissions, and the
//! shutdown sequence.
//!
//! Start: data dir (0700) and the agent's lock file → the broker on its
//! socket, with per-client permissions → the agent's bus clients (one for
//! control, one for the store writer, whose stalls must not hold up
//! control, one for the task coordinator, whose tasks wait seconds for
//! collectors) → the store writer (subscribed before any collector starts)
//! → the supervisor (spawns or adopts the collectors) → the monitor
//! (loading state machine, heartbeats, status) → the task coordinator
//! (`daemoneye-cli ps/inspect/hash`) → the metrics file's thread, when
//! configured → the broker opens to everyone: until
//! then only the agent's three clients are welcomed, so nobody else can
//! take their ids.
//!
//! Shutdown (SIGTERM/SIGINT, or a failed startup): the task coordinator
//! stops → the monitor stops (state ShuttingDown) → every registered collector is asked to shut
//! down over RPC, in parallel → the supervisor waits for the exits up to
//! `shutdown_timeout_secs`, SIGTERMs collectors that were not asked over
//! RPC, SIGKILLs what remains and reaps everything → the store writer
//! commits and acknowledges what it received → the client and the broker
//! close. What a collector sent but the store did not acknowledge stays
//! in that collector's WAL and is replayed on its next start.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{Receiver, bounded, select, tick};
use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig, ClientPermissions, Identities, Permissions};
use daemoneye_contract::control::{self, RpcRequest, RpcStatus};
use daemoneye_contract::{PeerVersion, topic};
use daemoneye_platform::files::ensure_private_dir;
use daemoneye_platform::paths::{PidLock, PidLockError};
use daemoneye_platform::threads::{ended_unexpectedly, first_ended};
use parking_lot::Mutex;

use crate::api::{self, AGENT_CLIENT_ID, STORE_CLIENT_ID, TASKS_CLIENT_ID};
use crate::config::AgentConfig;
use crate::forward::{AlertFn, Outputs};
use crate::metrics::MetricsFile;
use crate::monitor::{Monitor, MonitorParts, Outcome};
use crate::own::OwnBinaries;
use crate::supervisor::Supervisor;
use crate::tasks::{TaskCoordinator, TaskStats};
use crate::writer::{StoreWriter, WriterConfig};

/// The broker's permissions: each configured collector may publish only
/// process events, its own heartbeat and registration requests, and
/// subscribe only to what is addressed to it (the tasks of its type
/// included); the agent's clients get only the topics they use: the
/// monitor's client takes registrations, heartbeats and status requests
/// and publishes the lifecycle broadcast and the collectors' RPCs, the
/// store writer takes events and publishes the collectors' acks and
/// alerts; the task coordinator may take task requests, ask for status
/// and send tasks to collectors; every other local client
/// (`daemoneye-cli`) may ask for the agent's status, tasks and the
/// broker's counters and follow events and alerts. Replies to a
/// requester's inbox are always allowed (bus rule). Who may connect at all
/// is decided by peer uid: the agent's own and root; who may hold an id,
/// by [`identities`].
pub fn permissions(cfg: &AgentConfig) -> (Vec<ClientPermissions>, Permissions) {
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    // A collector takes the tasks of its own type only.
    let collector = |collector_type: &str| Permissions {
        publish: strings(&[
            daemoneye_contract::event::EVENTS_PATTERN,
            "control.health.heartbeat.{client_id}",
            control::REGISTRATION_TOPIC,
        ]),
        subscribe: [
            control::LIFECYCLE_TOPIC,
            "control.collector.{client_id}",
            "control.ack.{client_id}",
            "control.collector.config.reload",
            &control::task_topic(collector_type),
            &control::task_broadcast_topic(collector_type),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
    };
    let each = |topic: fn(&str) -> String| cfg.collectors.iter().map(|c| topic(&c.id)).collect::<Vec<_>>();
    let mut monitor_publish = each(control::rpc_topic);
    monitor_publish.push(control::LIFECYCLE_TOPIC.to_owned());
    let mut store_publish = each(control::ack_topic);
    store_publish.push(api::ALERT_TOPIC.to_owned());
    let mut rules = vec![
        ClientPermissions {
            client: AGENT_CLIENT_ID.to_owned(),
            permissions: Permissions {
                publish: monitor_publish,
                subscribe: strings(&[
                    control::REGISTRATION_TOPIC,
                    control::HEARTBEAT_PATTERN,
                    api::STATUS_TOPIC,
                ]),
            },
        },
        ClientPermissions {
            client: STORE_CLIENT_ID.to_owned(),
            permissions: Permissions {
                publish: store_publish,
                subscribe: strings(&[daemoneye_contract::event::EVENTS_PATTERN]),
            },
        },
    ];
    rules.push(ClientPermissions {
        client: TASKS_CLIENT_ID.to_owned(),
        permissions: Permissions {
            publish: strings(&["control.collector.task.#", api::STATUS_TOPIC]),
            subscribe: strings(&[api::TASK_TOPIC]),
        },
    });
    rules.extend(
        cfg.collectors
            .iter()
            .map(|c| ClientPermissions { client: c.id.clone(), permissions: collector(&c.collector_type) }),
    );
    let others = Permissions {
        publish: strings(&[api::STATUS_TOPIC, api::TASK_TOPIC, daemoneye_bus::broker::STATS_TOPIC]),
        subscribe: strings(&["events.#"]),
    };
    (rules, others)
}

/// Who may hold which id on the bus: the agent's own ids
/// (`daemoneye-agent*`) only this process; a configured collector's id,
/// enabled or not, only the process the supervisor started (or adopted)
/// for it and vouched for; any other client gets an id the broker assigns.
pub fn identities(cfg: &AgentConfig) -> Identities {
    Identities {
        host_pid: std::process::id(),
        own: vec![format!("{AGENT_CLIENT_ID}*")],
        vouched: cfg.collectors.iter().map(|c| c.id.clone()).collect(),
    }
}

/// The broker's settings for `cfg`: permissions, identities, the store
/// writer as the only subscriber whose `Block` holds publishers back, and
/// the `bus:` limits.
pub fn broker_config(cfg: &AgentConfig) -> BrokerConfig {
    let mut bcfg = BrokerConfig::new(cfg.broker_socket());
    bcfg.max_frame = MAX_MESSAGE;
    let (rules, others) = permissions(cfg);
    bcfg.permissions = rules;
    bcfg.default_permissions = Some(others);
    bcfg.identities = Some(identities(cfg));
    bcfg.block_allowed = Some(vec![STORE_CLIENT_ID.to_owned()]);
    let bus = &cfg.bus;
    bcfg.max_connections = bus.max_connections;
    bcfg.max_connections_per_uid = bus.max_connections_per_uid;
    bcfg.max_connections_per_pid = bus.max_connections_per_pid;
    bcfg.idle_timeout = Some(Duration::from_secs(bus.idle_timeout_secs));
    bcfg.frame_timeout = Duration::from_secs(bus.frame_timeout_secs);
    bcfg.unproven_max_frame = bus.client_max_frame_kib.saturating_mul(1024).min(MAX_MESSAGE);
    bcfg.memory_limit_bytes = Some(bus.memory_limit_mib << 20);
    bcfg.queue_limit_bytes = bus.queue_limit_mib << 20;
    // Collectors (an adopted one reconnects at once) are welcomed only
    // once the store writer and the monitor have subscribed: what they
    // published before would reach nobody.
    // The task coordinator's client too: nobody else may take its id.
    bcfg.first_clients =
        Some([AGENT_CLIENT_ID, STORE_CLIENT_ID, TASKS_CLIENT_ID].iter().map(|s| (*s).to_owned()).collect());
    bcfg
}

/// How often the main thread checks that every long-lived thread lives.
const WATCHDOG: Duration = Duration::from_secs(1);

/// The broker's largest message: a merged snapshot of tens of thousands of
/// processes must fit in one answer (the bus's default is 1 MiB).
pub const MAX_MESSAGE: u32 = 16 << 20;

/// Who runs the collectors' processes.
pub enum Collectors {
    /// This process (the agent runs with one set of privileges).
    Spawn,
    /// The privileged part, over the privsep link: this process is the
    /// unprivileged worker of `run_as` (`privsep.rs`).
    Privileged(crate::privsep::WorkerLink),
}

/// Runs the agent until `shutdown` receives (or startup fails); returns
/// the process exit status: 0 after a clean shutdown, 1 after a failed
/// startup. `pids` follows the collectors' pids, for a last-resort kill.
pub fn run(
    cfg: AgentConfig,
    shutdown: Receiver<()>,
    pids: Arc<Mutex<Vec<u32>>>,
    collectors: Collectors,
) -> anyhow::Result<i32> {
    let data_dir = cfg.agent_dir();
    // 0700, ours, and writable by nobody else (else refused).
    ensure_private_dir(&data_dir).with_context(|| format!("data dir {}", data_dir.display()))?;
    // One agent per data dir (under privsep, the privileged part holds the
    // data dir's lock and the worker this one, in its own directory).
    let _lock = PidLock::acquire(&data_dir.join("daemoneye-agent.pid")).map_err(|e| match e {
        PidLockError::Held { .. } => {
            anyhow::anyhow!("another daemoneye-agent is running with data dir {}: {e}", data_dir.display())
        }
        e => anyhow::anyhow!("cannot take the agent's lock: {e}"),
    })?;
    let socket = cfg.broker_socket();
    log::info!(
        "daemoneye-agent {} starting: data dir {}, broker {}, {} collector(s)",
        env!("CARGO_PKG_VERSION"),
        data_dir.display(),
        socket.display(),
        cfg.collectors.iter().filter(|c| c.enabled).count()
    );

    let broker = Arc::new(Broker::start(broker_config(&cfg)).context("cannot start the broker")?);
    let client = Arc::new(Client::connect(ClientConfig::new(&socket, AGENT_CLIENT_ID))?);
    anyhow::ensure!(
        client.wait_connected(Duration::from_secs(10)),
        "the agent's bus client could not connect to its own broker at {}",
        socket.display()
    );
    let store_client = Arc::new(Client::connect(ClientConfig::new(&socket, STORE_CLIENT_ID))?);
    anyhow::ensure!(
        store_client.wait_connected(Duration::from_secs(10)),
        "the store writer's bus client could not connect to the broker at {}",
        socket.display()
    );
    let tasks_client = Arc::new(Client::connect(ClientConfig::new(&socket, TASKS_CLIENT_ID))?);
    anyhow::ensure!(
        tasks_client.wait_connected(Duration::from_secs(10)),
        "the task coordinator's bus client could not connect to its own broker at {}",
        socket.display()
    );
    let writer = Arc::new(
        StoreWriter::start(
            store_client.clone(),
            WriterConfig {
                database: cfg.database(),
                store: cfg.store.clone(),
                rules: cfg.active_rules(),
                own: own_binaries(&cfg),
            },
        )
        .context("cannot start the event store")?,
    );
    let outputs = {
        let w = Arc::downgrade(&writer);
        let alert: AlertFn = Arc::new(move |rule: &str, name: &str, description: &str| {
            if let Some(w) = w.upgrade() {
                w.agent_alert(rule, name, description);
            }
        });
        Outputs::start(&cfg.database(), &cfg.outputs, alert).context("cannot start the outputs")?
    };
    let (sup_tx, sup_rx) = bounded(256);
    let supervisor = Arc::new(match collectors {
        Collectors::Spawn => {
            let uid = daemoneye_platform::effective_uid();
            Supervisor::start(&cfg, sup_tx, pids, Box::new(broker.vouchers()), uid)?
        }
        Collectors::Privileged(link) => Supervisor::remote(link, sup_tx, broker.vouchers())?,
    });
    let (ended_tx, ended_rx) = bounded(1);
    let task_stats = Arc::new(TaskStats::default());
    let collector_version = PeerVersion::default();
    let monitor = Monitor::start(
        MonitorParts {
            config: cfg.clone(),
            client: client.clone(),
            broker: broker.clone(),
            writer: writer.clone(),
            supervisor: supervisor.clone(),
            supervisor_events: sup_rx,
            tasks: task_stats.clone(),
            collector_version: collector_version.clone(),
        },
        ended_tx,
    )?;
    let members = cfg.collectors.iter().map(|c| (c.id.clone(), c.collector_type.clone())).collect();
    let coordinator = TaskCoordinator::start(
        tasks_client.clone(),
        cfg.tasks.clone(),
        members,
        task_stats,
        collector_version.clone(),
    )
    .context("cannot start the task coordinator")?;
    let metrics = MetricsFile::start(&cfg, monitor.probe()).context("cannot start the metrics file")?;
    broker.open();

    // The watchdog: a long-lived thread that ends before the shutdown (a
    // panic: nothing else ends them) stops the agent with status 1, so the
    // service manager restarts it rather than leave it half alive.
    let watchdog = tick(WATCHDOG);
    let reason = loop {
        select! {
            // Disconnected: the signal thread ended, and its sender with it.
            recv(shutdown) -> r => match r {
                Ok(()) => break None,
                Err(_) => {
                    let why = ended_unexpectedly("agent-signals");
                    log::error!("{why}: stopping the agent");
                    break Some(why);
                }
            },
            recv(ended_rx) -> o => break match o {
                Ok(Outcome::StartupFailed(r)) => Some(r),
                Ok(_) => None,
                // The monitor is gone without a word: it panicked.
                Err(_) => Some("the monitor thread stopped unexpectedly".to_owned()),
            },
            recv(watchdog) -> _ => {
                let mut threads: Vec<(&str, bool)> = vec![
                    ("bus-broker", broker.thread_ended()),
                    ("the agent's bus client", client.thread_ended()),
                    ("the store writer's bus client", store_client.thread_ended()),
                    ("the task coordinator's bus client", tasks_client.thread_ended()),
                    ("agent-store", writer.thread_ended()),
                    ("agent-supervisor", supervisor.thread_ended()),
                    ("agent-monitor", monitor.thread_ended()),
                    ("agent-tasks", coordinator.thread_ended()),
                ];
                threads.extend(outputs.threads());
                threads.extend(metrics.as_ref().map(MetricsFile::thread));
                if let Some(why) = first_ended(&threads) {
                    log::error!("{why}: stopping the agent");
                    break Some(why);
                }
            }
        }
    };
    drop(coordinator);
    if let Some(m) = metrics {
        m.shutdown();
    }
    let registered = monitor.begin_shutdown();
    supervisor.begin_shutdown();
    log::info!("shutting down: {}", reason.as_deref().unwrap_or("signal"));

    // Ask every registered collector to stop over RPC, in parallel (the
    // others get SIGTERM from the supervisor).
    let grace = Duration::from_secs(cfg.shutdown_timeout_secs);
    let asked: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cfg
            .collectors
            .iter()
            .filter(|c| registered.contains(&c.id))
            .map(|c| {
                let (client, version) = (&client, collector_version.get());
                s.spawn(move || {
                    let rpc = topic::COLLECTOR_RPC;
                    let request = rpc.request.encode_as(version, &RpcRequest::GracefulShutdown);
                    let reply = client.request(&rpc.at(&c.id), &request, grace);
                    match reply.map(|m| rpc.decode_answer(&m).map(|(a, _)| a)) {
                        Ok(Ok(r)) if r.status == RpcStatus::Ok => {
                            log::info!("collector {}: shut down gracefully", c.id);
                            Some(c.id.clone())
                        }
                        Ok(Ok(r)) if r.status == RpcStatus::ShuttingDown => {
                            log::info!("collector {}: already shutting down", c.id);
                            Some(c.id.clone())
                        }
                        Ok(Ok(r)) => {
                            log::warn!("collector {}: GracefulShutdown answered {:?}", c.id, r.status);
                            None
                        }
                        Ok(Err(e)) => {
                            log::warn!("collector {}: undecodable GracefulShutdown reply: {e}", c.id);
                            None
                        }
                        Err(e) => {
                            log::warn!("collector {}: GracefulShutdown: {e}", c.id);
                            None
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok().flatten()).collect()
    });
    let kill_wait = Duration::from_secs(cfg.escalation.kill_timeout_secs);
    supervisor.shutdown(asked, grace, kill_wait);
    let outcome = monitor.stop();
    drop(supervisor);
    // Before the writer: they stop between two deliveries.
    outputs.shutdown();
    match Arc::try_unwrap(writer) {
        Ok(w) => w.shutdown(),
        Err(_) => log::error!("store writer still shared at shutdown"),
    }
    for c in [client, store_client, tasks_client] {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.close();
        }
    }
    if let Ok(b) = Arc::try_unwrap(broker) {
        b.shutdown();
    }
    Ok(match outcome {
        Outcome::Shutdown if reason.is_none() => {
            log::info!("stopped");
            0
        }
        Outcome::Crashed => {
            log::error!("stopped after the monitor thread panicked");
            1
        }
        _ => {
            log::error!("stopped: {}", reason.unwrap_or_default());
            1
        }
    })
}

/// DaemonEye's executables, which the built-in rules leave out: this one,
/// the tools installed beside it and every configured collector's binary.
/// They are hashed on a short thread of their own (`agent-own-hash`, ended
/// when done: a debug build is 80 MB); until then an event without a hash
/// of its own is matched by the file's identity (`daemoneye_store::own`).
fn own_binaries(cfg: &AgentConfig) -> Arc<OwnBinaries> {
    let me = std::env::current_exe().ok();
    let beside = me.as_deref().and_then(Path::parent).map(|dir| {
        ["daemoneye-agent", "daemoneye-cli", "daemoneye-wal", "procmond"].map(|name| dir.join(name))
    });
    let collectors = cfg.collectors.iter().map(|c| c.binary.clone());
    let own =
        Arc::new(OwnBinaries::new(me.into_iter().chain(beside.into_iter().flatten()).chain(collectors)));
    log::debug!("DaemonEye's own executables: {}", own.paths().join(", "));
    let hashing = own.clone();
    if let Err(e) =
        std::thread::Builder::new().name("agent-own-hash".into()).spawn(move || hashing.hash_all())
    {
        log::warn!("cannot start the thread that hashes DaemonEye's executables: {e}");
    }
    own
}
