//! The agent under test with its one collector `pm`: its configuration,
//! its start (until the first snapshot is committed), procmond's event
//! source counters from `agent.status`, and its stop with a summary of its
//! log.

use std::path::Path;
use std::time::{Duration, Instant};

use daemoneye_agent::api::{self, AgentStatus, STATUS_TOPIC};
use daemoneye_benches::agent::{Agent, Bins};
use daemoneye_bus::{Client, ClientConfig};
use daemoneye_contract::control::EventSourceStatus;

use super::store::Store;
use super::{ID, PREFIX};

/// agent.yaml with the one collector `pm`, `args` passed to procmond.
pub(super) fn yaml(data: &Path, procmond: &Path, args: &[&str], heartbeat_secs: u64) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "data_dir: {:?}\nlog_level: info\ncollectors:\n  - id: {ID}\n    binary: {:?}\n    args: [{}]\n    \
         heartbeat_interval_secs: {heartbeat_secs}\n",
        data.display().to_string(),
        procmond.display().to_string(),
        args.join(", ")
    )
}

/// The agent with `pm` started with `args`, its store open, its first
/// snapshot committed (at least `snapshot_rows` rows, then 1 s without
/// another), the collector found.
pub(super) fn start_agent(
    bins: &Bins,
    args: &[&str],
    heartbeat_secs: u64,
    snapshot_rows: u64,
) -> Result<(Agent, Store), String> {
    // `DAEMONEYE_BENCH_PROCMOND_ARGS`: more arguments for procmond (split
    // at whitespace), for experiments, e.g. `--config <file>`.
    let extra = std::env::var("DAEMONEYE_BENCH_PROCMOND_ARGS").unwrap_or_default();
    let args: Vec<&str> = args.iter().copied().chain(extra.split_whitespace()).collect();
    let mut agent =
        Agent::start_with(PREFIX, bins, |data| yaml(data, &bins.procmond, &args, heartbeat_secs))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut store = loop {
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        if let Some(s) = Store::open(&agent.db) {
            break s;
        }
        if Instant::now() > deadline {
            return Err(format!("no store at {} within 120 s", agent.db.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (mut rows, mut last_new) = (0u64, Instant::now());
    loop {
        let n = store.new_events().iter().filter(|(_, e)| e.snapshot).count() as u64;
        if n > 0 {
            rows += n;
            last_new = Instant::now();
        }
        if rows >= snapshot_rows.max(1) && last_new.elapsed() >= Duration::from_secs(1) {
            break;
        }
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        if Instant::now() > deadline {
            return Err(format!("snapshot not committed within 120 s ({rows} rows)"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    agent.find_collectors_of(&[ID])?;
    Ok((agent, store))
}

pub(super) fn procmond_pid(agent: &Agent) -> u32 {
    agent.collectors.first().map_or(0, |c| c.pid)
}

/// A bus client of the agent's broker, for `agent.status`.
pub(super) fn status_client(agent: &Agent) -> Result<Client, String> {
    let mut cfg = ClientConfig::new(&agent.socket, format!("bench-kernel-{}", std::process::id()));
    cfg.timeout = Duration::from_secs(5);
    cfg.backoff_max = Duration::from_millis(100);
    let client = Client::connect(cfg).map_err(|e| e.to_string())?;
    if !client.wait_connected(Duration::from_secs(30)) {
        return Err(format!("not welcomed by the broker at {}", agent.socket.display()));
    }
    Ok(client)
}

/// `pm`'s event source counters as of its last heartbeat, and when that
/// heartbeat arrived (Unix ms).
pub(super) fn source_status(client: &Client) -> Result<(EventSourceStatus, u64), String> {
    let m = client
        .request(STATUS_TOPIC, b"", Duration::from_secs(5))
        .map_err(|e| format!("agent.status: {e}"))?;
    let s: AgentStatus = api::decode(&m.payload).map_err(|e| format!("bad status: {e}"))?;
    let hb = s
        .collectors
        .iter()
        .find(|c| c.id == ID)
        .and_then(|c| c.heartbeat.clone())
        .ok_or("no heartbeat from pm yet")?;
    Ok((hb.event_source, hb.received_unix_ms))
}

/// Waits for a heartbeat received after `after_ms` (Unix ms).
pub(super) fn fresh_status(client: &Client, after_ms: u64) -> Result<EventSourceStatus, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, at) = source_status(client)?;
        if at > after_ms || Instant::now() > deadline {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn stop_agent(agent: &mut Agent) -> Result<(), String> {
    let sd = agent.shut_down()?;
    let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
    let overrun_lines = text.lines().filter(|l| l.contains("kernel event overrun")).count();
    let dropped_lines = text.lines().filter(|l| l.contains("not taking kernel events")).count();
    println!(
        "SIGTERM → agent exited in {:.2} s ({}); collector still running after: {}; log: {} lines, \
         {} WARN/ERROR (not alerts), {overrun_lines} \"kernel event overrun\", {dropped_lines} \"not taking \
         kernel events\"",
        sd.took.as_secs_f64(),
        sd.status,
        sd.alive,
        sd.log.lines,
        sd.log.bad.len()
    );
    sd.log.print_bad();
    Ok(())
}
