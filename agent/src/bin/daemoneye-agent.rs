//! `daemoneye-agent`: hosts the bus broker, supervises the collectors of
//! `agent.yaml`, stores their events and raises alerts. See the crate
//! docs and ARCHITECTURE.md.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use crossbeam_channel::bounded;
use daemoneye_agent::config::AgentConfig;
use daemoneye_agent::daemon::{self, Collectors};
use daemoneye_agent::privsep;
use daemoneye_platform::signals;
use parking_lot::Mutex;

/// DaemonEye's agent.
///
/// Starts the event bus on a Unix socket, spawns and watches the
/// collectors listed in agent.yaml (one procmond next to this executable
/// when no file is given), stores their events in SQLite and runs the
/// detection rules on them. Runs in the foreground and logs to stderr.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = AFTER_HELP)]
struct Cli {
    /// agent.yaml [default: the embedded default: one procmond next to this
    /// executable, data in /var/lib/daemoneye if writable, else
    /// ~/.local/share/daemoneye].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Overrides the file's data_dir.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides the file's log_level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Check the configuration (FILE, or --config's) and the rules, print
    /// the result and exit.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    check_config: Option<Option<PathBuf>>,
    /// Internal: run as the unprivileged worker of `run_as`, configured by
    /// the privileged part over stdin.
    #[arg(long = "privsep-worker", hide = true)]
    privsep_worker: bool,
}

const AFTER_HELP: &str = "\
Examples:
  daemoneye-agent                               one procmond, default paths, foreground
  daemoneye-agent --config /etc/daemoneye/agent.yaml
  daemoneye-agent --check-config agent.yaml        (or --config agent.yaml --check-config)
Then, in another terminal:
  daemoneye-cli status
  daemoneye-cli events --follow

Signals: SIGTERM or SIGINT stops the collectors gracefully, then the
agent; a second one exits at once (killing the collectors).
Exit status: 0 after a clean shutdown, 1 on errors (bad configuration, a
failed startup), 2 on bad usage, 128+N when a second signal N forces the exit.";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts: the signal mask is inherited.
    if let Err(e) = signals::block() {
        eprintln!("daemoneye-agent: error: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    if cli.privsep_worker {
        return worker();
    }
    // `--check-config FILE` names the file to check, as --config would.
    let mut cli = cli;
    if let Some(Some(file)) = cli.check_config.clone() {
        match &cli.config {
            Some(c) if *c != file => {
                eprintln!(
                    "daemoneye-agent: --config {} and --check-config {} name two files; give one",
                    c.display(),
                    file.display()
                );
                return ExitCode::from(2);
            }
            _ => cli.config = Some(file),
        }
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    // Read once: the privileged part hands this text to its worker.
    let file = cli.config.as_ref().map_or("embedded default".to_owned(), |p| p.display().to_string());
    let text = match cli.config.as_deref().map(std::fs::read_to_string).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("daemoneye-agent: invalid configuration: {file}: (file): {e}");
            return ExitCode::FAILURE;
        }
    };
    let loaded = match &text {
        Some(t) => AgentConfig::parse(t, &file, &exe_dir),
        None => AgentConfig::load(None, &exe_dir),
    };
    let mut cfg = match loaded {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("daemoneye-agent: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = cli.data_dir.clone() {
        cfg.data_dir = Some(dir);
        if let Err(e) = daemoneye_platform::paths::check_socket_path(&cfg.broker_socket()) {
            eprintln!("daemoneye-agent: --data-dir: {e}");
            return ExitCode::from(2);
        }
    }
    let level = cli.log_level.unwrap_or_else(|| cfg.log_level.clone());
    let Ok(filter) = level.parse::<log::LevelFilter>() else {
        eprintln!(
            "daemoneye-agent: --log-level {level:?} is not one of error, warn, info, debug, trace, off"
        );
        return ExitCode::from(2);
    };
    env_logger::Builder::new().filter_level(filter).format_timestamp_millis().init();
    if cfg.collectors.iter().all(|c| !c.enabled) {
        let file = cli.config.as_ref().map_or("the embedded default".to_owned(), |p| p.display().to_string());
        log::warn!(
            "{file} enables no collector (an empty file sets nothing): the agent will store and check nothing \
             until one is added under collectors:"
        );
    }
    let rules = cfg.active_rules();
    let checked = daemoneye_agent::rules::validate(&rules);
    let mut bad: Vec<String> = checked
        .iter()
        .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{file}: rules: rule {name}: {e}")))
        .collect();
    // Each collector checks its own command line (`--check-args`).
    for (i, c) in cfg.collectors.iter().enumerate().filter(|(_, c)| c.enabled) {
        let checked = daemoneye_agent::supervisor::check_args(c, &cfg.collector_data_dir(c));
        match (&checked, cli.check_config.is_some()) {
            (Ok(None), true) => println!("collector {}: ok", c.id),
            (Ok(Some(note)), true) => println!("collector {}: not checked: {note}", c.id),
            (Ok(Some(note)), false) => log::warn!("collector {}: {note}", c.id),
            (Err(e), true) => println!("collector {}: ERROR: {e}", c.id),
            _ => {}
        }
        if let Err(e) = checked {
            bad.push(format!("{file}: collectors[{i}].args: {e}"));
        }
    }
    if cli.check_config.is_some() {
        for (name, r) in &checked {
            match r {
                Ok(()) => println!("rule {name}: ok"),
                Err(e) => println!("rule {name}: ERROR: {e}"),
            }
        }
        println!(
            "{} collector(s), {} rule(s), data dir {}, broker {}: {}",
            cfg.collectors.len(),
            rules.len(),
            cfg.data_dir().display(),
            cfg.broker_socket().display(),
            if bad.is_empty() { "configuration ok" } else { "configuration INVALID" }
        );
        return if bad.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    if !bad.is_empty() {
        for b in &bad {
            eprintln!("daemoneye-agent: invalid configuration: {b}");
        }
        return ExitCode::FAILURE;
    }

    let pids = Arc::new(Mutex::new(Vec::<u32>::new()));
    let (stop_tx, stop_rx) = bounded::<()>(1);
    let _signals = match signal_thread(stop_tx, pids.clone()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = match &cfg.run_as {
        Some(name) if nix::unistd::geteuid().is_root() => privsep::account(name).and_then(|account| {
            let hello =
                privsep::Hello { config: text, file, exe_dir, data_dir: cli.data_dir, log_level: level };
            privsep::run_privileged(cfg, hello, account, stop_rx, pids)
        }),
        Some(name) => {
            log::info!("run_as {name:?} ignored: not running as root");
            daemon::run(cfg, stop_rx, pids, Collectors::Spawn)
        }
        None => daemon::run(cfg, stop_rx, pids, Collectors::Spawn),
    };
    exit(result)
}

/// The unprivileged worker of `run_as` (`privsep.rs`): configured by the
/// privileged part over stdin, it runs the broker, store and monitor and
/// asks the privileged part for everything done to a collector.
fn worker() -> ExitCode {
    let (stop_tx, stop_rx) = bounded::<()>(1);
    let (hello, link) = match privsep::worker_start(stop_tx.clone()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("daemoneye-agent: worker: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = match hello.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("daemoneye-agent: worker: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = hello.log_level.parse::<log::LevelFilter>().unwrap_or(log::LevelFilter::Info);
    env_logger::Builder::new().filter_level(filter).format_timestamp_millis().init();
    // Its own signals (it is in its own process group: someone sent them
    // to it alone); the collectors are not its to kill.
    let _signals = match signal_thread(stop_tx, Arc::new(Mutex::new(Vec::new()))) {
        Ok(s) => s,
        Err(code) => return code,
    };
    exit(daemon::run(cfg, stop_rx, Arc::new(Mutex::new(Vec::new())), Collectors::Privileged(link)))
}

fn exit(result: anyhow::Result<i32>) -> ExitCode {
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        // Once: the log is on stderr, unless it is off.
        Err(e) if log::log_enabled!(log::Level::Error) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("daemoneye-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM/SIGINT: a graceful stop through `stop`; a second one: SIGKILL
/// to `pids` (the collectors), then exit.
fn signal_thread(
    stop_tx: crossbeam_channel::Sender<()>,
    pids: Arc<Mutex<Vec<u32>>>,
) -> Result<signals::ShutdownSignals, ExitCode> {
    let doomed = pids;
    match signals::ShutdownSignals::start(
        "agent-signals",
        move |_| {
            let _ = stop_tx.try_send(());
        },
        move |_| {
            // Exiting at once: the collectors go first, by their own pids.
            for pid in doomed.lock().iter() {
                if let Ok(p) = i32::try_from(*pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        },
    ) {
        Ok(s) => Ok(s),
        Err(e) => {
            eprintln!("daemoneye-agent: error: cannot start the signal thread: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}
