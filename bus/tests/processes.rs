//! The bus across real processes: this binary re-runs itself as client
//! processes (`DAEMONEYE_BUS_CHILD=<role>`), the harness hosts the broker
//! as the agent does. Covered: broadcast to three processes, a queue group
//! split evenly by RoundRobin, request/reply across processes, reconnect
//! and re-subscribe after the broker is stopped and started again, and a
//! peer of another uid refused (run under `setpriv --reuid=65534`; where
//! that cannot run, it says why). Owns `main` (`harness = false`).
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};
use daemoneye_bus::{
    Broker, BrokerConfig, Client, ClientConfig, ConnectionState, Frame, Strategy, decode, encode,
};

const ROLE: &str = "DAEMONEYE_BUS_CHILD";
const SOCKET: &str = "DAEMONEYE_BUS_SOCKET";
const ID: &str = "DAEMONEYE_BUS_ID";

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A collector-like client process: counts broadcast events and queued
/// tasks, answers requests, reports each (re)connection, and prints its
/// counts on `events.stop`.
fn subscriber(socket: &Path, id: &str) -> ExitCode {
    let mut cfg = ClientConfig::new(socket, id);
    cfg.backoff_max = Duration::from_millis(200);
    let Ok(client) = Client::connect(cfg) else { return ExitCode::FAILURE };
    let events = client.subscribe("events.#").expect("subscribe");
    let tasks = client.queue_subscribe("tasks.proc", "workers", Strategy::RoundRobin).expect("queue");
    let rpc = client.subscribe(&format!("rpc.{id}")).expect("rpc");
    let (mut n_events, mut n_tasks) = (0u32, 0u32);
    let mut reported = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let connections = client.connections();
        // Subscriptions are sent before this confirmation, in order.
        if connections > reported
            && client.state() == ConnectionState::Connected
            && client.publish_confirmed("sync.child", b"").is_ok()
        {
            say(&format!("connected {connections}"));
            reported = connections;
        }
        select! {
            recv(events.messages()) -> m => match m {
                Ok(m) if m.topic == "events.stop" => {
                    say(&format!("events={n_events} tasks={n_tasks}"));
                    return ExitCode::SUCCESS;
                }
                Ok(_) => n_events += 1,
                Err(_) => return ExitCode::FAILURE,
            },
            recv(tasks.messages()) -> m => if m.is_ok() { n_tasks += 1 },
            recv(rpc.messages()) -> m => if let Ok(m) = m {
                let _ = client.reply(&m, format!("{id} is healthy").as_bytes());
            },
            default(Duration::from_millis(20)) => {}
        }
    }
    ExitCode::FAILURE
}

/// Hosts a broker until killed (the harness SIGKILLs it).
fn broker_process(socket: &Path) -> ExitCode {
    match Broker::start(BrokerConfig::new(socket)) {
        Ok(_broker) => {
            say("listening");
            // Parked until the harness kills this process.
            let (_tx, rx) = crossbeam_channel::bounded::<()>(0);
            let _ = rx.recv();
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("broker failed: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Says Hello on a raw socket and prints how the broker answered.
fn raw_hello(socket: &Path) -> ExitCode {
    let mut s = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("connect-failed {e}"));
            return ExitCode::SUCCESS;
        }
    };
    let mut buf = Vec::new();
    let _ = encode(
        &Frame::Hello {
            protocol_version: daemoneye_bus::PROTOCOL_VERSION,
            client_id: "intruder",
            pid: std::process::id(),
        },
        &mut buf,
        4096,
    );
    let _ = s.write_all(&buf);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    match decode(&got, 1 << 20) {
        Ok(Some((Frame::WelcomeAs { .. }, _))) => say("welcomed"),
        Ok(Some((Frame::Error { code, .. }, _))) => say(&format!("refused {code:?}")),
        _ => say("closed"),
    }
    ExitCode::SUCCESS
}

/// A spawned client process, killed on drop by its own pid.
struct Proc {
    child: Child,
    lines: Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(mut cmd: Command) -> Result<Proc, String> {
        let mut child = cmd.stdout(Stdio::piped()).spawn().map_err(|e| format!("spawn: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Proc { child, lines })
    }

    fn expect(&self, what: &str) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok(l) if l.starts_with(what) => return Ok(l),
                Ok(_) => {}
                Err(_) => return Err(format!("pid {}: no line starting with {what:?}", self.child.id())),
            }
        }
    }
}

fn child_cmd(exe: &Path, role: &str, socket: &Path, id: &str) -> Command {
    let mut c = Command::new(exe);
    c.env(ROLE, role).env(SOCKET, socket).env(ID, id);
    c
}

fn cross_process(dir: &Path) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let socket = dir.join("bus.sock");
    // The broker runs in its own process, so it can be killed outright.
    let broker = Proc::spawn(child_cmd(&exe, "broker", &socket, "broker"))?;
    broker.expect("listening")?;
    let kids: Vec<Proc> = (0..3)
        .map(|i| Proc::spawn(child_cmd(&exe, "subscriber", &socket, &format!("sub-{i}"))))
        .collect::<Result<_, _>>()?;
    for k in &kids {
        k.expect("connected")?;
    }
    let agent = Client::connect(ClientConfig::new(&socket, "agent")).map_err(|e| e.to_string())?;
    if !agent.wait_connected(Duration::from_secs(10)) {
        return Err("agent never connected".into());
    }
    for i in 0..10u8 {
        agent.publish("events.process.started", &[i]).map_err(|e| e.to_string())?;
    }
    for i in 0..30u8 {
        agent.publish("tasks.proc", &[i]).map_err(|e| e.to_string())?;
    }
    for i in 0..3 {
        let reply = agent
            .request(&format!("rpc.sub-{i}"), b"health?", Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        if reply.payload != format!("sub-{i} is healthy").as_bytes() {
            return Err(format!("wrong reply from sub-{i}: {reply:?}"));
        }
    }

    // Kill the broker with SIGKILL (its socket file stays behind, stale)
    // and start another: every client reconnects and re-subscribes by
    // itself.
    drop(broker);
    let broker = Proc::spawn(child_cmd(&exe, "broker", &socket, "broker"))?;
    broker.expect("listening")?;
    for k in &kids {
        k.expect("connected 2")?;
    }
    // The agent's state alone could still be the old connection's.
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.connections() < 2 || !agent.wait_connected(Duration::from_millis(50)) {
        if Instant::now() > deadline {
            return Err("agent never reconnected".into());
        }
    }
    for i in 0..5u8 {
        agent.publish("events.process.stopped", &[i]).map_err(|e| e.to_string())?;
    }
    agent.publish("events.stop", b"").map_err(|e| e.to_string())?;
    let mut task_split = Vec::new();
    for k in &kids {
        let line = k.expect("events=")?;
        let mut parts =
            line.split_whitespace().map(|p| p.split('=').nth(1).and_then(|v| v.parse::<u32>().ok()));
        let (events, tasks) = (parts.next().flatten(), parts.next().flatten());
        if events != Some(15) {
            return Err(format!(
                "a subscriber saw {line}: expected 15 events (10 before, 5 after the restart)"
            ));
        }
        task_split.push(tasks.unwrap_or(0));
    }
    if task_split != [10, 10, 10] {
        return Err(format!("round robin split 30 tasks as {task_split:?}"));
    }
    drop(broker);
    Ok("3 client processes: 15/15/15 events across a SIGKILL and restart of the broker process, tasks 10/10/10, \
        3 requests answered"
        .into())
}

fn refused_uid(dir: &Path) -> Result<Option<String>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    if daemoneye_platform::effective_uid() != 0 {
        println!("processes: skipped the refused-uid case: not running as root, setpriv cannot switch users");
        return Ok(None);
    }
    if Command::new("setpriv").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        println!("processes: skipped the refused-uid case: setpriv (util-linux) is not installed");
        return Ok(None);
    }
    // Open the file-system path for the other user, so that the refusal
    // seen is the broker's uid check, not the directory's mode.
    let socket = dir.join("open").join("bus.sock");
    let broker = Broker::start(BrokerConfig::new(&socket)).map_err(|e| e.to_string())?;
    for p in [dir, &dir.join("open")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .env(ROLE, "raw-hello")
        .env(SOCKET, &socket);
    let p = Proc::spawn(cmd)?;
    let line = match p.expect("") {
        Ok(l) => l,
        Err(e) => {
            println!("processes: skipped the refused-uid case: the child did not run as uid 65534 ({e})");
            return Ok(None);
        }
    };
    if line != "refused Forbidden" {
        return Err(format!("a uid-65534 peer got {line:?}"));
    }
    // The counters reach `stats()` when the reactor next publishes them,
    // which may be after the refusal was written.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while broker.stats().refused < 1 {
        if std::time::Instant::now() > deadline {
            return Err("the refusal was not counted within 10 s".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(Some("a uid-65534 peer was refused with Forbidden".into()))
}

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(ROLE) {
        let socket = PathBuf::from(std::env::var_os(SOCKET).unwrap_or_default());
        return match role.as_str() {
            "subscriber" => subscriber(&socket, &std::env::var(ID).unwrap_or_default()),
            "raw-hello" => raw_hello(&socket),
            "broker" => broker_process(&socket),
            _ => ExitCode::FAILURE,
        };
    }
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => {
            println!("processes: cannot make a temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cross_process(&tmp.path().join("a")) {
        Ok(m) => {
            passed += 1;
            println!("test cross_process ... ok ({m})");
        }
        Err(e) => {
            failed += 1;
            println!("test cross_process ... FAILED: {e}");
        }
    }
    match refused_uid(&tmp.path().join("b")) {
        Ok(Some(m)) => {
            passed += 1;
            println!("test refused_uid ... ok ({m})");
        }
        Ok(None) => skipped += 1,
        Err(e) => {
            failed += 1;
            println!("test refused_uid ... FAILED: {e}");
        }
    }
    println!("processes: {passed} passed, {failed} failed, {skipped} skipped");
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
