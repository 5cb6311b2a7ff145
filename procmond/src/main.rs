//! The procmond daemon: parses the command line and configuration, takes
//! the per-collector lock, and runs the collector in actor mode (with a
//! broker: `DAEMONEYE_BROKER_SOCKET` set) or standalone (events straight
//! into SQLite). SIGTERM and SIGINT start a graceful shutdown; a second
//! signal exits at once.
//!
//! Startup: main connects the client (it retries by itself), opens the WAL,
//! subscribes to kernel events (before anything is enumerated) and starts
//! the actor in `WaitingForAgent`; the registration thread subscribes to
//! `control.collector.lifecycle`, then registers (retrying with backoff and
//! jitter), and `BeginMonitoring` (broadcast, RPC, or `begin_monitoring` in
//! the registration reply for a late collector) moves the actor to
//! `Running`. Nothing is enumerated before. The task service joins its group
//! at start (`Hash` needs no process list).
//!
//! Shutdown (SIGTERM, SIGINT or the RPC): RPCs are refused, the task
//! service leaves its group (tasks already delivered are answered "shutting
//! down"), the actor flushes (publishes what it can within 10 s; the rest
//! stays in the WAL), deregistration, the RPC reply, exit 0. A second
//! signal exits at once with 128+N. Standalone mode (no
//! `DAEMONEYE_BROKER_SOCKET`) runs the same actor straight to `Running`
//! with the store as its sink.
//!
//! The watchdog: every second main asks each long-lived thread whether it
//! ended (`thread_ended`); one that did before a shutdown (a panic) exits
//! procmond with status 1 and a log line naming it, for the agent to
//! restart it.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use crossbeam_channel::{bounded, select, tick};
use daemoneye_platform::files::{self, ensure_private_dir};
use daemoneye_platform::paths::{PidLock, PidLockError};
use daemoneye_platform::signals;
use daemoneye_platform::{KernelEventSource, KernelSourceConfig};
use procmond::actor::{ActorHandle, ActorOptions, EventObserver};
use procmond::config::{CollectorConfig, ConfigFile, EventsMode, INTERVAL_RANGE_SECS};
use procmond::kernel::{KernelConfig, KernelHandle};
use procmond::shutdown::ShutdownRequest;
use procmond::standalone::StoreSink;

/// The environment variable that selects actor mode.
const BROKER_ENV: &str = "DAEMONEYE_BROKER_SOCKET";

/// DaemonEye's process collector.
///
/// Enumerates every process on each interval and reports what started,
/// stopped or changed (exec, credentials, parent, executable replaced or
/// deleted), with secrets removed from command lines.
///
/// With DAEMONEYE_BROKER_SOCKET set (the agent sets it), procmond runs in
/// actor mode: it registers with the agent on that bus socket, waits for
/// BeginMonitoring, writes every event to its write-ahead log and publishes
/// it. Without it, procmond runs standalone and writes events into the
/// SQLite database given by --database.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = AFTER_HELP)]
struct Cli {
    /// SQLite event store for standalone mode [default: <data dir>/procmond.db].
    #[arg(long, value_name = "PATH")]
    database: Option<PathBuf>,
    /// Where the WAL, the lock file and the database live [default:
    /// /var/lib/daemoneye if writable, else ~/.local/share/daemoneye].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_parser = parse_level)]
    log_level: log::LevelFilter,
    /// Seconds between collection cycles (5-3600) [default: 30]. When
    /// polling, a process that lives less than this may never be seen
    /// (with 5 s, half of those living 1-4 s were missed); the kernel
    /// source (--events) sees them all, and the cycle reconciles.
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    interval: Option<u64>,
    /// Compare at most this many processes per cycle (0 = unlimited); new
    /// processes first, stops from the whole list; a cut cycle counts as
    /// an error and is logged.
    #[arg(long, value_name = "N")]
    max_processes: Option<usize>,
    /// Also collect cwd, session, threads and CPU time.
    #[arg(long)]
    enhanced_metadata: bool,
    /// SHA-256 the executables of new and exec'd processes.
    #[arg(long)]
    compute_hashes: bool,
    /// A YAML configuration file (every key is shown, commented, in
    /// procmond.example.yaml); command-line flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This collector's id on the bus (a-z, 0-9, '-', '_').
    #[arg(long, value_name = "ID")]
    collector_id: Option<String>,
    /// Seconds between heartbeats to the agent (1-3600) [default: 30].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_interval: Option<u64>,
    /// Where events come from: auto (the kernel's process events where
    /// available, else polling), kernel (or refuse to start), poll (every
    /// --interval only: short-lived processes are missed) [default: auto].
    #[arg(long, value_enum, value_name = "SOURCE")]
    events: Option<EventsMode>,
    /// The WAL's size cap in bytes (at least 1 MiB) [default: 268435456]:
    /// at the cap new events are refused, counted in the heartbeat (the
    /// agent raises an alert) and recorded as a gap once space frees up.
    #[arg(long, value_name = "BYTES")]
    wal_max_bytes: Option<u64>,
    /// Stay in the terminal: log to stderr and print each event on stdout.
    #[arg(long)]
    foreground: bool,
    /// Check the command line and the config file, print the settings and
    /// exit (0 valid, 1 invalid, 2 bad usage) without creating, locking or
    /// starting anything. The agent runs it for every configured collector
    /// before it starts one (and for --check-config).
    #[arg(long)]
    check_args: bool,
    /// How --foreground prints events.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

const AFTER_HELP: &str = "\
Examples:
  procmond --foreground                 watch processes in this terminal (standalone)
  procmond --foreground --format json   the same, as JSON lines (ECS field names)
  procmond --interval 10 --compute-hashes --database /var/lib/daemoneye/events.db

Exit status: 0 after a graceful shutdown (SIGTERM, SIGINT or the GracefulShutdown
RPC), 1 on errors, 2 on bad usage, 128+N when a second signal N forces the exit.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One readable line per event (local time, then the event; the
    /// format of `daemoneye-cli events`).
    Human,
    /// One JSON object per line, in Elastic Common Schema names (README.md,
    /// "JSON"; the format of `daemoneye-cli events --json`).
    Json,
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse().map_err(|_| format!("{s:?} is not one of error, warn, info, debug, trace, off"))
}

fn parse_interval(s: &str) -> Result<u64, String> {
    let v: u64 = s.parse().map_err(|_| format!("{s:?} is not a whole number of seconds"))?;
    if INTERVAL_RANGE_SECS.contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is out of range {}..={} seconds",
            INTERVAL_RANGE_SECS.start(),
            INTERVAL_RANGE_SECS.end()
        ))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check_args {
        return match configure(&cli) {
            Ok(cfg) => {
                println!(
                    "procmond: arguments ok: collector id {:?}, data dir {}, interval {:?}, events {:?}, \
                     max processes {}, hashes {}",
                    cfg.collector_id,
                    cfg.data_dir.display(),
                    cfg.interval,
                    cfg.events,
                    cfg.max_processes,
                    cfg.compute_hashes
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("procmond: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // Once: the log is on stderr, unless it is off.
        Err(e) if log::log_enabled!(log::Level::Error) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("procmond: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the configuration: defaults, then the file, then the flags.
fn configure(cli: &Cli) -> anyhow::Result<CollectorConfig> {
    let file = match &cli.config {
        Some(path) => Some(ConfigFile::load(path)?),
        None => None,
    };
    let data_dir = cli
        .data_dir
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.data_dir.clone()))
        .unwrap_or_else(daemoneye_platform::paths::default_data_dir);
    let mut cfg = CollectorConfig::with_data_dir(&data_dir);
    if let Some(file) = &file {
        file.apply(&mut cfg);
    }
    // Flags override the file: the same application, one layer up.
    let flags = ConfigFile {
        database: cli.database.clone(),
        interval_secs: cli.interval,
        max_processes: cli.max_processes,
        collector_id: cli.collector_id.clone(),
        heartbeat_interval_ms: cli.heartbeat_interval.map(|s| s * 1000),
        enhanced_metadata: cli.enhanced_metadata.then_some(true),
        compute_hashes: cli.compute_hashes.then_some(true),
        events: cli.events,
        wal_max_bytes: cli.wal_max_bytes,
        ..ConfigFile::default()
    };
    flags.apply(&mut cfg);
    let floor = Duration::from_secs(*INTERVAL_RANGE_SECS.start());
    cfg.validate(floor).with_context(|| match &cli.config {
        Some(path) => format!("invalid configuration (from {} and flags)", path.display()),
        None => "invalid configuration".to_owned(),
    })?;
    Ok(cfg)
}

/// The per-collector lock (`<data dir>/procmond-<id>.pid`): one procmond
/// per collector id and data dir. The agent reads it to find a collector
/// left running by an agent that died.
///
/// The data dir is made private first (`files::ensure_private_dir`): created
/// mode 0700 whatever the umask; an existing one that belongs to another
/// user or that others may write to is refused, naming its path, owner and
/// mode; one others may read (an older release made it 0755) is tightened.
/// The lock file is mode 0600 (`PidLock`), so no other user can open it to
/// hold its lock.
fn take_lock(cfg: &CollectorConfig) -> anyhow::Result<PidLock> {
    ensure_private_dir(&cfg.data_dir)
        .with_context(|| format!("cannot use data directory {}", cfg.data_dir.display()))?;
    let path = cfg.data_dir.join(format!("procmond-{}.pid", cfg.collector_id));
    PidLock::acquire(&path).map_err(|e| match e {
        PidLockError::Held { .. } => {
            anyhow::anyhow!("another procmond with collector id {:?} is running: {e}", cfg.collector_id)
        }
        e => anyhow::anyhow!("cannot take the lock: {e}"),
    })
}

/// Prints every durable event on stdout (`--foreground`).
fn printer(format: Format) -> EventObserver {
    let tz = daemoneye_contract::render::local_zone();
    Box::new(move |env| {
        let line = match format {
            Format::Human => daemoneye_contract::render::human_line(env, None, &tz),
            Format::Json => daemoneye_contract::render::json_line(env, None),
        };
        // A closed stdout (`procmond --foreground | head`) must not stop
        // collection.
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    signals::block().context("cannot block signals")?;
    let cfg = configure(&cli)?;
    let _lock = take_lock(&cfg)?;
    let report = daemoneye_platform::platform_report();
    log::info!(
        "procmond {} as {:?}: {} backend, {}",
        env!("CARGO_PKG_VERSION"),
        cfg.collector_id,
        report.backend,
        report.privileges.summary
    );
    let mut source = daemoneye_platform::default_source().context("cannot open the process table")?;
    // Events carry the working directory only with enhanced metadata
    // (fixed for the daemon's life): without it, it is neither read nor
    // kept per process.
    source.set_read_cwd(cfg.enhanced_metadata);
    // Subscribed before anything is enumerated, so nothing falls between
    // the first walk and the first kernel event.
    let (kernel, kernel_link, kernel_fallback) = open_kernel_events(&cfg)?;
    let (shutdown_tx, shutdown_rx) = bounded::<ShutdownRequest>(4);
    let signal_tx = shutdown_tx.clone();
    let signals = signals::ShutdownSignals::start(
        "procmond-signals",
        move |sig| {
            let _ = signal_tx.try_send(ShutdownRequest { reason: format!("{sig}"), rpc: None });
        },
        |_| {},
    )?;
    let checkpoint = procmond::checkpoint::path(&cfg.data_dir, &cfg.collector_id);
    // One an older release left readable by others (0644).
    files::tighten_private_file(&checkpoint)
        .with_context(|| format!("cannot make the checkpoint {} private", checkpoint.display()))?;
    let mut opts = ActorOptions {
        kernel: kernel_link,
        kernel_fallback,
        checkpoint: Some(checkpoint),
        ..ActorOptions::default()
    };
    if cli.foreground {
        opts.observer = Some(printer(cli.format));
    }
    let inbox = ActorHandle::channel();
    let actor_tx = inbox.0.clone();

    let broker = std::env::var_os(BROKER_ENV).filter(|s| !s.is_empty());
    let Some(socket) = broker else {
        log::info!("standalone mode ({BROKER_ENV} unset): events go to {}", cfg.database.display());
        // A new database is private (SQLite makes its -wal and -shm files
        // with the database file's mode); an existing one keeps its mode.
        if let Some(parent) = cfg.database.parent().filter(|p| !p.as_os_str().is_empty()) {
            daemoneye_platform::paths::create_private_dir(parent)
                .with_context(|| format!("cannot create the directory of {}", cfg.database.display()))?;
        }
        match files::create_private_file(&cfg.database) {
            Ok(_) => log::info!("created the event store {} (mode 0600)", cfg.database.display()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create the event store {}", cfg.database.display()));
            }
        }
        let sink = StoreSink::open(&cfg.database, &cfg.collector_id)
            .with_context(|| format!("cannot open the event store {}", cfg.database.display()))?;
        opts.start_running = true;
        let actor = ActorHandle::spawn(cfg, source, Box::new(sink), inbox, opts)?;
        let threads = |t: &mut Vec<(&str, bool)>| {
            t.extend([
                ("procmond-actor", actor.is_finished()),
                ("procmond-signals", signals.thread_ended()),
                ("procmond-kernel", kernel.as_ref().is_some_and(KernelHandle::thread_ended)),
            ]);
        };
        let request = wait_for_shutdown(&shutdown_rx, threads, || false)?;
        log::info!("shutting down: {}", request.reason);
        stop_actor(&actor_tx, actor)?;
        log::info!("stopped");
        return Ok(());
    };

    run_on_bus(
        &PathBuf::from(socket),
        Mode { cfg, source, inbox, opts, report: &report, shutdown_tx, shutdown_rx, signals, kernel },
    )
}

/// What `run` hands to actor mode.
#[cfg_attr(not(unix), expect(dead_code, reason = "no actor mode without the bus"))]
struct Mode<'a> {
    cfg: CollectorConfig,
    source: Box<dyn daemoneye_platform::ProcessSource>,
    inbox: (procmond::actor::ActorSender, crossbeam_channel::Receiver<procmond::actor::ActorMessage>),
    opts: ActorOptions,
    report: &'a daemoneye_platform::PlatformReport,
    shutdown_tx: crossbeam_channel::Sender<ShutdownRequest>,
    shutdown_rx: crossbeam_channel::Receiver<ShutdownRequest>,
    signals: signals::ShutdownSignals,
    kernel: Option<KernelHandle>,
}

/// Without the bus (its transport is Unix sockets), actor mode cannot run.
#[cfg(not(unix))]
fn run_on_bus(socket: &std::path::Path, _: Mode<'_>) -> anyhow::Result<()> {
    bail!(
        "{BROKER_ENV} is set ({}), but the bus is not available on this OS yet: unset it to run standalone",
        socket.display()
    )
}

/// Actor mode: the WAL, the connector, registration, the RPC and task
/// services, on the broker at `socket`.
#[cfg(unix)]
fn run_on_bus(socket: &std::path::Path, mode: Mode<'_>) -> anyhow::Result<()> {
    use std::sync::Arc;

    use daemoneye_bus::{Client, ClientConfig};
    use daemoneye_contract::control::{self, RpcResponse};
    use procmond::actor::RegistrationCell;
    use procmond::connector::{Connector, ConnectorConfig};
    use procmond::registration::{Registration, RegistrationConfig};
    use procmond::rpc::RpcService;
    use procmond::task::{TaskCounters, TaskService, TaskServiceConfig};

    let Mode { cfg, source, inbox, mut opts, report, shutdown_tx, shutdown_rx, signals, kernel } = mode;
    let actor_tx = inbox.0.clone();
    log::info!("actor mode: broker at {}", socket.display());
    let mut client_cfg = ClientConfig::new(socket, &cfg.collector_id);
    // Publishing waits at most this long on a backed-up socket, so the
    // flush thread stays responsive; what is not sent stays in the WAL.
    client_cfg.timeout = Duration::from_millis(250);
    client_cfg.backoff_max = Duration::from_secs(10);
    let client = Arc::new(Client::connect(client_cfg).context("cannot start the bus client")?);
    // The WAL's parent (`<data dir>/wal`), which an older release made
    // 0755; the WAL makes its own directory private.
    if let Some(parent) = cfg.wal_dir().parent() {
        ensure_private_dir(parent)
            .with_context(|| format!("cannot use the WAL directory {}", parent.display()))?;
    }
    let connector = Connector::start(
        ConnectorConfig {
            collector_id: cfg.collector_id.clone(),
            buffer_bytes: cfg.buffer_bytes,
            max_in_flight: cfg.max_events_in_flight,
            ack_timeout: Duration::from_secs(30),
            truncate_floor: Some(0),
            wal_max_bytes: cfg.wal_max_bytes,
        },
        &cfg.wal_dir(),
        client.clone(),
        actor_tx.clone(),
    )
    .with_context(|| format!("cannot open the WAL in {}", cfg.wal_dir().display()))?;
    let on_ack = connector.ack_hook();
    let cell = Arc::new(RegistrationCell::default());
    opts.registration = Some(cell.clone());
    let task_counters = Arc::new(TaskCounters::default());
    opts.tasks = Some(task_counters.clone());
    let mut capabilities = vec![format!("backend:{}", report.backend)];
    capabilities.extend(report.supported_fields.iter().map(|f| format!("field:{f}")));
    if report.privileges.missing_for_other_users.is_empty() {
        capabilities.push("privileged".into());
    }
    if cfg.compute_hashes {
        capabilities.push("hashing".into());
    }
    let reg_cfg = RegistrationConfig {
        collector_id: cfg.collector_id.clone(),
        heartbeat_interval: cfg.heartbeat_interval,
        request_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(30),
        capabilities,
        stream_id: connector.stream_id(),
        peer_version: connector.peer_version(),
        delivery: Some(connector.delivery_probe()),
    };
    let collector_id = cfg.collector_id.clone();
    let flush = connector.flush_watch();
    let actor = ActorHandle::spawn(cfg, source, Box::new(connector), inbox, opts)?;
    let rpc = RpcService::start(client.clone(), &collector_id, actor_tx.clone(), shutdown_tx.clone())?;
    let tasks = TaskService::start(
        client.clone(),
        TaskServiceConfig::new(&collector_id),
        actor_tx.clone(),
        task_counters,
    )?;
    let registration = Registration::start(reg_cfg, client.clone(), actor_tx.clone(), cell, on_ack)?;

    let threads = |t: &mut Vec<(&str, bool)>| {
        t.extend([
            ("procmond-actor", actor.is_finished()),
            ("procmond-signals", signals.thread_ended()),
            ("procmond-kernel", kernel.as_ref().is_some_and(KernelHandle::thread_ended)),
            ("procmond-flush", flush.thread_ended()),
            ("procmond-rpc", rpc.thread_ended()),
            ("procmond-tasks", tasks.thread_ended()),
            ("procmond-registration", registration.thread_ended()),
            ("the bus client", client.thread_ended()),
        ]);
    };
    let request = wait_for_shutdown(&shutdown_rx, threads, || {
        client.state() == daemoneye_bus::ConnectionState::Refused
    })?;
    log::info!("shutting down: {}", request.reason);
    rpc.refuse_new_requests();
    // Leave the task group first, so the agent's tasks go to the other
    // collectors; tasks already delivered are answered "shutting down".
    drop(tasks);
    // Finish the cycle, flush the buffer and the WAL...
    let flushed = stop_actor(&actor_tx, actor);
    // ...deregister...
    registration.deregister(&request.reason, Duration::from_secs(3));
    // ...reply...
    if let Some(msg) = &request.rpc {
        let response = match &flushed {
            Ok(()) => RpcResponse::ok(),
            Err(e) => RpcResponse::status(daemoneye_contract::control::RpcStatus::Timeout, format!("{e:#}")),
        };
        // Confirmed, so the reply has left before the client closes.
        let sent = match &msg.reply_to {
            Some(to) => client.publish_confirmed(to, &control::encode(&response)),
            None => Ok(()),
        };
        if let Err(e) = sent {
            log::warn!("could not answer the GracefulShutdown request: {e}");
        }
    }
    drop(registration);
    drop(rpc);
    // ...and exit once the client has written what it holds.
    match Arc::try_unwrap(client) {
        Ok(client) => client.close(),
        Err(_) => log::warn!("bus client still shared at exit"),
    }
    flushed?;
    log::info!("stopped");
    Ok(())
}

/// Opens the kernel event source as `--events` asks: with `auto`, falls
/// back to polling (logged once, with the reason); with `kernel`, an
/// unavailable source is an error.
fn open_kernel_events(
    cfg: &CollectorConfig,
) -> anyhow::Result<(Option<KernelHandle>, Option<procmond::kernel::KernelLink>, Option<String>)> {
    if cfg.events == EventsMode::Poll {
        log::info!(
            "event source: poll every {:?} (--events poll): processes that live less than that may be missed",
            cfg.interval
        );
        return Ok((None, None, None));
    }
    let source_cfg = KernelSourceConfig {
        receive_buffer_bytes: cfg.kernel_events.receive_buffer_bytes,
        // Events carry the working directory only with enhanced metadata.
        read_cwd: cfg.enhanced_metadata,
        ..KernelSourceConfig::default()
    };
    match KernelEventSource::open(source_cfg) {
        Ok(source) => {
            log::info!(
                "event source: kernel ({}, receive buffer {} bytes), reconciled by a walk every {:?}",
                source.backend(),
                source.receive_buffer_bytes(),
                cfg.interval
            );
            let kcfg = KernelConfig {
                fork_window: Duration::from_millis(cfg.kernel_events.fork_window_ms),
                priority_boost: cfg.kernel_events.priority_boost,
                ..KernelConfig::default()
            };
            let (handle, link) =
                KernelHandle::start(source, kcfg).context("cannot start the kernel event thread")?;
            Ok((Some(handle), Some(link), None))
        }
        Err(why) if cfg.events == EventsMode::Kernel => {
            bail!("--events kernel: kernel process events are not available: {why}")
        }
        Err(why) => {
            log::warn!(
                "event source: poll every {:?}, kernel process events unavailable ({why}): processes that live less than that may be missed",
                cfg.interval
            );
            Ok((None, None, Some(why.to_string())))
        }
    }
}

/// Asks the actor to finish and flush, and waits for its thread. A full
/// inbox (the actor stalled in a long cycle) is retried until a deadline,
/// and the join is bounded too: a wedged actor makes the exit non-zero
/// rather than hang.
fn stop_actor(actor_tx: &procmond::actor::ActorSender, actor: ActorHandle) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let retry = tick(Duration::from_millis(100));
    let result = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match actor_tx.graceful_shutdown(left) {
            Err(procmond::actor::ActorError::Busy) if !left.is_zero() => {
                let _ = retry.recv();
            }
            other => break other,
        }
    };
    if let Err(e) = result {
        bail!("graceful shutdown: {e}");
    }
    let check = tick(Duration::from_millis(20));
    while !actor.is_finished() {
        if std::time::Instant::now() >= deadline {
            bail!("the collector actor did not stop within 30 s");
        }
        let _ = check.recv();
    }
    actor.join();
    Ok(())
}

/// Waits for a signal or an RPC asking for shutdown. The watchdog: once a
/// second, `threads` lists each long-lived thread and whether it ended;
/// one that ended (a panic: nothing else ends them before a shutdown) is
/// an error, so procmond exits non-zero and the agent or the service
/// manager restarts it rather than leave it half alive. `refused` says
/// whether the broker refused this collector (actor mode), also an error.
fn wait_for_shutdown(
    requests: &crossbeam_channel::Receiver<ShutdownRequest>,
    threads: impl Fn(&mut Vec<(&str, bool)>),
    refused: impl Fn() -> bool,
) -> anyhow::Result<ShutdownRequest> {
    let check = tick(Duration::from_secs(1));
    let mut listed = Vec::new();
    loop {
        select! {
            recv(requests) -> req => return req.context("shutdown channel closed"),
            recv(check) -> _ => {
                listed.clear();
                threads(&mut listed);
                if let Some(why) = daemoneye_platform::threads::first_ended(&listed) {
                    bail!("{why}; exiting so a restart can recover");
                }
                if refused() {
                    bail!("the broker refused this collector (uid, protocol version or id); see the log above");
                }
            }
        }
    }
}
