//! procmond's kernel event path end to end, with real processes: a storm
//! of millisecond processes (as root, and as an unprivileged user given
//! CAP_NET_ADMIN), the fallback without that capability, exit statuses,
//! an exec in place, a uid change, a deleted executable, and a receive
//! buffer so small that the kernel drops events (an overrun the walk
//! recovers from).
//!
//! The machine is busy meanwhile (other tests, other procmonds): a process
//! is counted only when it carries a token unique to the run in its
//! command line, or has a pid this test spawned (a child of the test or
//! of its shell loop, started after the test began: read before its exec,
//! or gone before it could be read). Each procmond prints its events as
//! JSON lines (`--foreground --format json`) into its own temp dir; the
//! counters come from the HealthCheck RPC (actor mode, fake agent) or
//! the log. Linux only, as root (CI runs so): the proc connector needs
//! CAP_NET_ADMIN, and the tests switch users.
#![cfg(target_os = "linux")]

mod support;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use daemoneye_contract::control::{EventSourceStatus, RpcRequest};
use daemoneye_contract::event::{Change, EventEnvelope, EventKind, EventSource, ProcessEvent};

use daemoneye_platform::{ExitStatus, Unavailable};
use support::{FakeAgent, Procmond, broker, rand_u64, socket_path, wait_until};
use tempfile::TempDir;

const T: Duration = Duration::from_secs(20);
/// The unprivileged user (`nobody`).
const NOBODY: u32 = 65534;
/// The marker of a completed walk in procmond's debug log.
const CYCLE_LINE: &str = "procmond::actor::cycle] cycle ";

/// The storms run alone: every procmond of this file reads and records
/// every process of the machine, and a storm needs both cores. The other
/// tests run beside one another.
static STORMS: RwLock<()> = RwLock::new(());

fn storm_alone() -> RwLockWriteGuard<'static, ()> {
    STORMS.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn beside_others() -> RwLockReadGuard<'static, ()> {
    STORMS.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests subscribe to the kernel's process events and switch users: run them as root (CI does)"
    );
}

/// Who procmond runs as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum User {
    Root,
    /// uid and gid 65534, no groups; with CAP_NET_ADMIN and CAP_SYS_NICE
    /// as ambient capabilities (the deployment README.md describes) or
    /// without any.
    Nobody {
        net_admin: bool,
    },
}

/// Starts procmond printing JSON lines on stdout (`--foreground --format
/// json`, walks every 5 s), standalone or in actor mode (`socket`).
fn start(dir: &Path, user: User, socket: Option<&Path>, extra: &[&str]) -> Procmond {
    let data = dir.join("data");
    let bin = env!("CARGO_BIN_EXE_procmond");
    let mut cmd = match user {
        User::Root => Command::new(bin),
        User::Nobody { net_admin } => {
            // nobody must reach its data directory and own it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
            std::fs::create_dir_all(&data).unwrap();
            std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).unwrap();
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
            if net_admin {
                c.args(["--inh-caps", "+net_admin,+sys_nice", "--ambient-caps", "+net_admin,+sys_nice"]);
            }
            c.arg(bin);
            c
        }
    };
    let stderr_path = dir.join(format!("procmond-{:016x}.log", rand_u64()));
    let stderr = File::create(&stderr_path).unwrap();
    let stdout = File::create(stderr_path.with_extension("out")).unwrap();
    cmd.arg("--data-dir")
        .arg(&data)
        .args(["--log-level", "debug", "--foreground", "--format", "json", "--interval", "5"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .env_remove("DAEMONEYE_BROKER_SOCKET");
    if let Some(s) = socket {
        cmd.env("DAEMONEYE_BROKER_SOCKET", s);
    }
    Procmond { child: cmd.spawn().expect("procmond starts"), stderr_path }
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("procmond.yaml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The envelopes procmond printed on stdout, read as they come.
struct Events {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    all: Vec<EventEnvelope>,
}

impl Events {
    fn of(pm: &Procmond) -> Events {
        Events { path: pm.stderr_path.with_extension("out"), offset: 0, partial: Vec::new(), all: Vec::new() }
    }

    /// Parses the complete lines written since the last call.
    fn refresh(&mut self) -> &mut Events {
        if let Ok(mut f) = File::open(&self.path)
            && f.seek(SeekFrom::Start(self.offset)).is_ok()
        {
            let before = self.partial.len();
            let _ = f.read_to_end(&mut self.partial);
            self.offset += (self.partial.len() - before) as u64;
        }
        let mut used = 0;
        while let Some(nl) = self.partial[used..].iter().position(|&b| b == b'\n') {
            let line = &self.partial[used..used + nl];
            used += nl + 1;
            let env = serde_json::from_slice(line)
                .map_err(|e| e.to_string())
                .and_then(|v| daemoneye_contract::ecs::parse_event(&v))
                .unwrap_or_else(|e| {
                    panic!("a stdout line is not an event document ({e}): {}", String::from_utf8_lossy(line))
                });
            self.all.push(env);
        }
        self.partial.drain(..used);
        self
    }

    fn events(&self) -> impl Iterator<Item = &ProcessEvent> {
        self.all.iter().map(|e| &e.event)
    }

    /// The events about process `pid` (not the first walk's snapshot), in
    /// the order they were published.
    fn of_pid(&self, pid: u32) -> Vec<&ProcessEvent> {
        self.events().filter(|e| !e.snapshot && e.process.pid == pid).collect()
    }
}

/// Waits until procmond's first walk is out (its snapshot names this test
/// process): from then on, every process is reported.
fn wait_ready(pm: &Procmond, ev: &mut Events) {
    let me = std::process::id();
    assert!(
        wait_until(T, || ev.refresh().events().any(|e| e.snapshot && e.process.pid == me)),
        "procmond's first walk: {}",
        pm.log()
    );
}

/// A root procmond on the kernel's events, beside the other tests, with
/// its first walk out. Bound as `let (_beside, dir, pm, ev)`, it is
/// dropped in reverse: procmond stops before its directory goes.
fn kernel_procmond() -> (RwLockReadGuard<'static, ()>, TempDir, Procmond, Events) {
    require_root();
    let beside = beside_others();
    let dir = tempfile::tempdir().unwrap();
    let pm = start(dir.path(), User::Root, None, &["--events", "kernel"]);
    let mut ev = Events::of(&pm);
    wait_ready(&pm, &mut ev);
    (beside, dir, pm, ev)
}

/// When the walk a `cycle N: … processes in U us` log line ends began,
/// in Unix ms: the line's timestamp (UTC, ms) less the walk's duration,
/// less 2 ms for the truncations and the time the line took to log.
fn walk_began_unix_ms(line: &str) -> Option<u64> {
    // `[2026-12-04T17:56:37.040Z DEBUG procmond::actor::cycle] cycle 3: 150 processes in 812 us, …`
    let stamp = line.get(1..24)?;
    let num = |s: &str| s.parse::<i64>().ok();
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.split('-').map(num);
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, ms) = time.split_once('.')?;
    let mut t = hms.split(':').map(num);
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    // Days since 1970-01-01 of a proleptic Gregorian date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let logged = ((days * 86_400 + h * 3600 + min * 60 + sec) * 1000 + num(ms)?) as u64;
    let took_us: u64 = line.split(" processes in ").nth(1)?.split(' ').next()?.parse().ok()?;
    Some(logged.saturating_sub(took_us / 1000 + 2))
}

#[test]
fn the_walk_start_is_read_from_the_log_line() {
    let line = "[2026-12-04T17:56:37.040Z DEBUG procmond::actor::cycle] cycle 3: 150 processes in 12345 us, 150 tracked";
    assert_eq!(walk_began_unix_ms(line), Some(1_796_406_997_040 - 12 - 2));
    let leap =
        "[2024-02-29T00:00:00.000Z DEBUG procmond::actor::cycle] cycle 1: 1 processes in 0 us, 1 tracked";
    assert_eq!(walk_began_unix_ms(leap), Some(1_709_164_800_000 - 2));
    assert_eq!(walk_began_unix_ms("[garbage"), None);
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Waits until a walk that began after this call has ended (walks come
/// every 5 s): whatever was published before it, that walk saw too.
fn wait_for_a_later_walk(pm: &Procmond) {
    let now = unix_ms_now();
    let later = || {
        pm.log().lines().filter(|l| l.contains(CYCLE_LINE)).filter_map(walk_began_unix_ms).any(|b| b > now)
    };
    // Six intervals: on a host with 10,000 processes and a build beside
    // it a walk takes seconds and a cycle can slip.
    assert!(wait_until(Duration::from_secs(30), later), "a walk within 30 s: {}", pm.log());
}

fn args(e: &ProcessEvent) -> &[String] {
    match &e.process.details.argv {
        Ok(argv) => &argv.args,
        Err(_) => &[],
    }
}

fn has_arg(e: &ProcessEvent, token: &str) -> bool {
    args(e).iter().any(|a| a == token)
}

fn exe_name(e: &ProcessEvent) -> Option<String> {
    let exe = e.process.details.exe.as_ref().ok()?;
    Some(exe.file_name()?.to_string_lossy().into_owned())
}

fn count(events: &[&ProcessEvent], kind: EventKind) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}

fn token() -> String {
    format!("{}", 100_000 + rand_u64() % 900_000)
}

/// Clock ticks since boot now (the unit of a process's start time).
fn boottime_ticks() -> u64 {
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs: f64 = uptime.split_whitespace().next().unwrap().parse().unwrap();
    (secs * 100.0) as u64
}

/// This process's nice value (field 19 of `/proc/self/stat`, counted
/// after the command name's closing parenthesis).
fn own_nice() -> i32 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(16).unwrap().parse().unwrap()
}

/// Kills a child this test started (by its own pid) and reaps it.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Children killed and reaped on drop, whatever the test's outcome.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            kill(c);
        }
    }
}

/// Processes this test started, by token, with their pids.
struct Started {
    tokens: Vec<String>,
    pids: Vec<u32>,
    /// The processes that started them.
    parents: Vec<u32>,
    /// A start time (clock ticks) before any of them.
    since_ticks: u64,
}

impl Started {
    /// Each token's events, in publishing order: the ones naming its token
    /// in their command line, or its pid as a child of one of `parents`
    /// started since (read before its exec, or gone before it could be
    /// read).
    fn tally<'a>(&self, ev: &'a Events) -> Vec<Vec<&'a ProcessEvent>> {
        let by_token: HashMap<&str, usize> =
            self.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        let by_pid: HashMap<u32, usize> = self.pids.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let mut per = vec![Vec::new(); self.tokens.len()];
        for e in ev.events().filter(|e| !e.snapshot) {
            let p = &e.process;
            let by_arg = args(e).iter().find_map(|a| by_token.get(a.as_str()).copied());
            let ours = || self.parents.contains(&p.ppid) && p.start_time >= self.since_ticks;
            if let Some(i) = by_arg.or_else(|| by_pid.get(&p.pid).copied().filter(|_| ours())) {
                per[i].push(e);
            }
        }
        per
    }
}

/// Runs `count` processes `/bin/sleep 0.0010<run><i>` (about a
/// millisecond each, every command line unique) from `spawners` shell
/// loops, each waiting for one before it starts the next; as `user`
/// (root, or nobody). The loops print the pids.
fn storm(count: usize, spawners: usize, user: User) -> (Started, Duration) {
    const LOOP: &str = r#"i=$2; while [ $i -lt $3 ]; do /bin/sleep 0.0010$1$i & echo $!; wait $! || exit 1; i=$((i+1)); done"#;
    let run = token();
    let since_ticks = boottime_ticks().saturating_sub(100);
    let began = Instant::now();
    let per = count.div_ceil(spawners);
    // Numbered from 1000: every token has as many digits.
    let ranges: Vec<(usize, usize)> =
        (0..spawners).map(|s| (1000 + s * per, 1000 + ((s + 1) * per).min(count))).collect();
    let loops: Vec<Child> = ranges
        .iter()
        .map(|(first, end)| {
            // The storm runs at the lowest priority (nice 19): on a busy
            // host its processes then wait for the CPU as everything else
            // does, so they live longer when procmond is delayed too, and
            // the race of reading their command line before they exit is
            // decided by procmond's own speed, not by the host's load.
            let mut cmd = match user {
                User::Root => {
                    let mut c = Command::new("nice");
                    c.args(["-n", "19", "sh"]);
                    c
                }
                User::Nobody { .. } => {
                    let mut c = Command::new("setpriv");
                    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "nice", "-n", "19", "sh"]);
                    c
                }
            };
            cmd.args(["-c", LOOP, "storm", &run, &first.to_string(), &end.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("the storm's shell starts")
        })
        .collect();
    let parents: Vec<u32> = loops.iter().map(Child::id).collect();
    let mut started = Started { tokens: Vec::new(), pids: Vec::new(), parents, since_ticks };
    for (sh, (first, end)) in loops.into_iter().zip(ranges) {
        let out = sh.wait_with_output().expect("the storm's shell is reaped");
        assert!(out.status.success(), "a sleep of the storm failed: {}", out.status);
        let pids: Vec<u32> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().parse().expect("a pid")).collect();
        assert_eq!(pids.len(), end - first, "one pid per sleep");
        started.pids.extend(pids);
        started.tokens.extend((first..end).map(|i| format!("0.0010{run}{i}")));
    }
    (started, began.elapsed())
}

/// What a storm's check measured.
#[derive(Debug)]
struct StormFigures {
    started: usize,
    full_argv: usize,
    stopped: usize,
    by_poll: usize,
    /// The processes without their command line, for the record.
    missed: String,
}

/// Every token has exactly one Started and one Stopped (with `overruns`,
/// a token may be missing altogether, never half or doubled); sources are
/// kernel (poll only after an overrun); kernel stops carry exit code 0;
/// at least 99% of the processes carry the full command line and the exe
/// (and then `uid` as real and effective user) on their start, or on the
/// exec after a start read before it.
fn check_storm(ev: &Events, storm: &Started, overruns: u64, uid: u32) -> StormFigures {
    let per = storm.tally(ev);
    let mut f = StormFigures { started: 0, full_argv: 0, stopped: 0, by_poll: 0, missed: String::new() };
    let mut partial = Vec::new();
    // The starts without the command line or the exe (by token index),
    // and the first few of them, for the record.
    let mut missed_at = Vec::new();
    let mut short = Vec::new();
    for (i, evs) in per.iter().enumerate() {
        let tok = &storm.tokens[i];
        let (starts, stops) = (count(evs, EventKind::Started), count(evs, EventKind::Stopped));
        let whole = (starts, stops) == (1, 1) || (overruns > 0 && (starts, stops) == (0, 0));
        if !whole {
            partial.push(format!("{tok} (pid {}): {evs:#?}", storm.pids[i]));
            continue;
        }
        for e in evs {
            assert!(
                e.source == EventSource::Kernel || (overruns > 0 && e.source == EventSource::Poll),
                "{tok}: source {:?} without an overrun: {e:#?}",
                e.source
            );
            if e.source == EventSource::Poll {
                f.by_poll += 1;
            }
            match e.kind {
                EventKind::Started => {
                    f.started += 1;
                    // The exec's details: on the start, or on the exec
                    // that follows a start read before it (a child whose
                    // fork window closed first).
                    let exec = evs.iter().rev().find(|e| {
                        e.kind == EventKind::Started
                            || (e.kind == EventKind::Modified && e.changes.contains(&Change::Exec))
                    });
                    let full = |e: &ProcessEvent| {
                        args(e) == ["/bin/sleep", tok.as_str()]
                            && exe_name(e).as_deref() == Some("sleep")
                            && e.process.details.exe_file.is_ok()
                    };
                    if let Some(x) = evs.iter().find(|x| full(x)) {
                        let d = &x.process.details;
                        // A millisecond process may exit between the reads of
                        // its files (on a loaded host): gone, never wrong.
                        let creds = d.credentials.map(|c| (c.uid, c.euid));
                        assert!(
                            creds == Ok((uid, uid)) || creds == Err(Unavailable::Vanished),
                            "{tok}: {x:#?}"
                        );
                        f.full_argv += 1;
                    } else {
                        missed_at.push(i);
                        if short.len() < 5 {
                            let p = &exec.unwrap_or(e).process;
                            let d = &p.details;
                            short.push(format!(
                                "{tok} pid {} {:?} name {:?}: exe {:?}, argv {:?}",
                                p.pid, p.state, p.name, d.exe, d.argv
                            ));
                        }
                    }
                }
                EventKind::Stopped => {
                    f.stopped += 1;
                    if e.source == EventSource::Kernel {
                        assert_eq!(e.exit, Some(ExitStatus::Code(0)), "{tok}: {e:#?}");
                    }
                }
                // A child read before its exec (its window closed first).
                EventKind::Modified => {
                    assert_eq!(e.changes, vec![Change::Exec], "{tok}: {evs:#?}");
                }
            }
        }
    }
    assert!(
        partial.is_empty(),
        "{} of {} tokens without exactly one Started and one Stopped ({overruns} overruns); first: {}",
        partial.len(),
        storm.tokens.len(),
        partial.first().map_or("", |s| s.as_str())
    );
    f.missed = format!("tokens {missed_at:?}; first: {short:#?}");
    f
}

/// At least 99% of the storm's processes carry their command line and exe.
fn full_enough(f: &StormFigures) -> bool {
    f.full_argv * 100 >= f.started * 99
}

/// Runs `storm` until it is [`full_enough`], twice at most, then asserts
/// it. Reading a command line races the process's exit: a stall of the
/// whole host (the hypervisor, a burst of I/O) can lose a few
/// milliseconds' worth of them in one storm. Each storm is checked whole
/// (exactly once) all the same; only the share of full command lines gets
/// a second chance, and a regression fails both.
fn storms_until_full(mut storm: impl FnMut() -> StormFigures) -> StormFigures {
    let first = storm();
    if full_enough(&first) {
        return first;
    }
    eprintln!("under 99% full command lines, once more: {first:?}");
    let second = storm();
    assert!(
        full_enough(&second),
        "fewer than 99% of the starts carry the command line and the exe twice: {first:?}; {second:?}"
    );
    second
}

/// Whether every token has its Stopped (then every event of the storm was
/// applied: a process's exit comes after its exec).
fn storm_complete(ev: &Events, storm: &Started) -> bool {
    storm.tally(ev).iter().all(|evs| count(evs, EventKind::Stopped) >= 1)
}

fn health(agent: &FakeAgent) -> daemoneye_contract::control::HealthData {
    agent.rpc("procmond", &RpcRequest::HealthCheck, T).health.expect("health data")
}

fn event_source(agent: &FakeAgent) -> EventSourceStatus {
    health(agent).event_source
}

#[test]
fn a_storm_of_2000_millisecond_processes_is_seen_whole_as_root() {
    require_root();
    let _alone = storm_alone();
    let dir = tempfile::tempdir().unwrap();
    let _broker = broker(dir.path());
    let agent = FakeAgent::start(&socket_path(dir.path()), &dir.path().join("agent.db"));
    agent.begin_on_register.store(true, std::sync::atomic::Ordering::SeqCst);
    let pm = start(dir.path(), User::Root, Some(&socket_path(dir.path())), &["--events", "kernel"]);
    let mut ev = Events::of(&pm);
    wait_ready(&pm, &mut ev);
    assert_eq!(event_source(&agent).source, EventSource::Kernel);
    assert!(pm.log().contains("kernel event thread runs at nice"), "{}", pm.log());

    storms_until_full(|| {
        let (storm, took) = storm(2000, 1, User::Root);
        // Every exit reported, or an overrun counted (its losses are for
        // good: these processes are gone before any walk).
        if !wait_until(T, || storm_complete(ev.refresh(), &storm)) {
            let status = event_source(&agent);
            assert!(status.overruns > 0, "not every token stopped within {T:?}: {status:?}: {}", pm.log());
        }
        // A walk after all that: it must double nothing.
        wait_for_a_later_walk(&pm);
        let status = event_source(&agent);
        let figures = check_storm(ev.refresh(), &storm, status.overruns, 0);
        eprintln!("root storm of {} processes in {took:?}: {figures:?}; {status:?}", storm.tokens.len());
        figures
    });
}

#[test]
fn a_storm_is_seen_whole_by_an_unprivileged_procmond_with_cap_net_admin() {
    require_root();
    let _alone = storm_alone();
    let dir = tempfile::tempdir().unwrap();
    let pm = start(dir.path(), User::Nobody { net_admin: true }, None, &["--events", "kernel"]);
    let mut ev = Events::of(&pm);
    wait_ready(&pm, &mut ev);
    assert!(pm.log().contains("uid 65534"), "{}", pm.log());
    assert!(pm.log().contains("event source: kernel"), "{}", pm.log());
    // Ten levels above what it inherited from this test (0 unless the
    // suite itself runs under `nice`), as far as -20.
    let boosted = (own_nice() - 10).max(-20);
    assert!(pm.log().contains(&format!("kernel event thread runs at nice {boosted}")), "{}", pm.log());

    let overruns = |pm: &Procmond| pm.log().matches("kernel event overrun").count() as u64;
    storms_until_full(|| {
        let (storm, took) = storm(2000, 1, User::Nobody { net_admin: false });
        if !wait_until(T, || storm_complete(ev.refresh(), &storm)) {
            assert!(overruns(&pm) > 0, "not every token stopped within {T:?}: {}", pm.log());
        }
        wait_for_a_later_walk(&pm);
        // Each logged overrun is at least one.
        let seen = overruns(&pm);
        let figures = check_storm(ev.refresh(), &storm, seen, NOBODY);
        eprintln!(
            "uid 65534 storm of {} processes in {took:?}: {figures:?}; overruns logged: {seen}",
            storm.tokens.len()
        );
        figures
    });
}

#[test]
fn without_cap_net_admin_auto_falls_back_to_polling_and_kernel_refuses_to_start() {
    require_root();
    let _beside = beside_others();
    let dir = tempfile::tempdir().unwrap();
    let pm = start(dir.path(), User::Nobody { net_admin: false }, None, &["--events", "auto"]);
    let mut ev = Events::of(&pm);
    wait_ready(&pm, &mut ev);
    let log = pm.log();
    assert!(log.contains("uid 65534"), "{log}");
    let fallback = log.lines().find(|l| l.contains("event source: poll")).unwrap_or_else(|| panic!("{log}"));
    assert!(fallback.contains("kernel process events unavailable (needs CAP_NET_ADMIN"), "{fallback}");
    assert!(ev.events().all(|e| e.source == EventSource::Poll), "only the walk reports");
    drop(pm);

    let dir = tempfile::tempdir().unwrap();
    let mut pm = start(dir.path(), User::Nobody { net_admin: false }, None, &["--events", "kernel"]);
    let status = pm.wait_exit(T).expect("procmond --events kernel exits");
    assert_eq!(status.code(), Some(1), "{}", pm.log());
    assert!(
        pm.log().contains(
            "ERROR procmond] --events kernel: kernel process events are not available: needs CAP_NET_ADMIN"
        ),
        "{}",
        pm.log()
    );
    assert!(pm.stdout().is_empty(), "nothing collected: {}", pm.stdout());
}

#[test]
fn stops_carry_the_exit_code_or_the_signal() {
    let (_beside, _dir, pm, mut ev) = kernel_procmond();
    let tok = token();

    let exit3 = format!("exit-{tok}");
    let mut child = Command::new("sh").args(["-c", "exit 3", &exit3]).spawn().unwrap();
    let code_pid = child.id();
    assert_eq!(child.wait().unwrap().code(), Some(3));

    let arg = format!("0.{tok}");
    let mut killed = Command::new("sleep").args(["30", &arg]).spawn().unwrap();
    let signal_pid = killed.id();
    let started = |ev: &Events| ev.of_pid(signal_pid).iter().any(|e| has_arg(e, &arg));
    let seen = wait_until(T, || started(ev.refresh()));
    kill(&mut killed);
    assert!(seen, "the sleep started: {}", pm.log());

    let stopped = |ev: &Events, pid| ev.of_pid(pid).iter().any(|e| e.kind == EventKind::Stopped);
    assert!(
        wait_until(T, || stopped(ev.refresh(), code_pid) && stopped(ev.refresh(), signal_pid)),
        "both stopped: {}",
        pm.log()
    );
    wait_for_a_later_walk(&pm);
    ev.refresh();
    for (pid, exit) in
        [(code_pid, ExitStatus::Code(3)), (signal_pid, ExitStatus::Signal { signal: 9, core_dumped: false })]
    {
        let evs = ev.of_pid(pid);
        assert_eq!((count(&evs, EventKind::Started), count(&evs, EventKind::Stopped)), (1, 1), "{evs:#?}");
        let stop = evs.iter().find(|e| e.kind == EventKind::Stopped).unwrap();
        assert_eq!((stop.exit, stop.source), (Some(exit), EventSource::Kernel), "{stop:#?}");
        assert!(evs.iter().all(|e| e.source == EventSource::Kernel), "{evs:#?}");
    }
    let sh_stop = ev.of_pid(code_pid).into_iter().find(|e| e.kind == EventKind::Stopped).unwrap();
    if let Ok(argv) = &sh_stop.process.details.argv {
        assert!(argv.args.contains(&exit3), "{sh_stop:#?}");
    }
}

/// Starts `program args` with a piped stdin, waits until procmond has
/// reported it with its command line (`token` among its arguments), and
/// returns it with how many events about it were out by then.
fn start_gated(pm: &Procmond, ev: &mut Events, cmd: &mut Command, token: &str) -> (Child, usize) {
    let child = cmd.stdin(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let reported = |ev: &Events| ev.of_pid(pid).iter().any(|e| has_arg(e, token));
    assert!(wait_until(T, || reported(ev.refresh())), "pid {pid} reported: {}", pm.log());
    let evs = ev.of_pid(pid);
    assert_eq!(count(&evs, EventKind::Started), 1, "{evs:#?}");
    assert!(evs.iter().all(|e| e.source == EventSource::Kernel), "{evs:#?}");
    let named = evs.iter().position(|e| has_arg(e, token)).unwrap_or_else(|| unreachable!());
    (child, named + 1)
}

#[test]
fn a_child_reported_at_its_fork_and_gone_before_its_exec_is_read_stops_once_by_the_kernel() {
    let (_beside, _dir, pm, mut ev) = kernel_procmond();
    let tok = format!("forkread-{}", token());
    // A subshell that waits before its exec: procmond reports it from its
    // fork (a copy of the parent's command line) once the window closes.
    let (child, _) = start_gated(
        &pm,
        &mut ev,
        Command::new("sh").args(["-c", "(read l; exec /bin/true) ; read m", &tok]),
        &tok,
    );
    let mut child = Children(vec![(tok.clone(), child)]);
    let sh = child.0[0].1.id();
    let sub_of = |ev: &Events| {
        ev.events().find(|e| e.process.ppid == sh && e.kind == EventKind::Started).map(|e| e.process.pid)
    };
    assert!(wait_until(T, || sub_of(ev.refresh()).is_some()), "the subshell reported: {}", pm.log());
    let sub = sub_of(&ev).unwrap();

    // procmond stopped while the subshell execs, exits and is reaped: the
    // exec is read when nothing of the process is left.
    let pm_pid = nix::unistd::Pid::from_raw(pm.child.id() as i32);
    nix::sys::signal::kill(pm_pid, nix::sys::signal::Signal::SIGSTOP).expect("procmond stops");
    writeln!(child.0[0].1.stdin.as_mut().unwrap(), "go").unwrap();
    let gone = wait_until(T, || !Path::new(&format!("/proc/{sub}")).exists());
    nix::sys::signal::kill(pm_pid, nix::sys::signal::Signal::SIGCONT).expect("procmond resumes");
    assert!(gone, "the subshell exited");

    let stopped = |ev: &Events| ev.of_pid(sub).iter().any(|e| e.kind == EventKind::Stopped);
    assert!(wait_until(T, || stopped(ev.refresh())), "stopped: {}", pm.log());
    wait_for_a_later_walk(&pm);
    let evs = ev.refresh().of_pid(sub);
    assert_eq!((count(&evs, EventKind::Started), count(&evs, EventKind::Stopped)), (1, 1), "{evs:#?}");
    assert!(evs.iter().all(|e| e.source == EventSource::Kernel), "nothing left to the walk: {evs:#?}");
    let stop = evs.iter().find(|e| e.kind == EventKind::Stopped).unwrap();
    assert_eq!(stop.exit, Some(ExitStatus::Code(0)), "{stop:#?}");
}

#[test]
fn an_exec_in_place_is_one_modification_not_a_new_process() {
    let (_beside, _dir, pm, mut ev) = kernel_procmond();
    let tok = format!("exec-{}", token());
    let (child, before) =
        start_gated(&pm, &mut ev, Command::new("sh").args(["-c", "read l; exec sleep 30", &tok]), &tok);
    let mut child = Children(vec![(tok.clone(), child)]);
    let pid = child.0[0].1.id();
    let sh = ev.of_pid(pid)[before - 1];
    assert_eq!(
        (args(sh).first().map(String::as_str), sh.source),
        (Some("sh"), EventSource::Kernel),
        "{sh:#?}"
    );

    writeln!(child.0[0].1.stdin.as_mut().unwrap(), "go").unwrap();
    assert!(wait_until(T, || ev.refresh().of_pid(pid).len() > before), "the exec: {}", pm.log());
    wait_for_a_later_walk(&pm);
    let evs = ev.refresh().of_pid(pid);
    let after = &evs[before..];
    assert_eq!(after.len(), 1, "one event for the exec: {after:#?}");
    let exec = after[0];
    assert_eq!(
        (exec.kind, &exec.changes, exec.source),
        (EventKind::Modified, &vec![Change::Exec], EventSource::Kernel)
    );
    assert_eq!(exec.process.details.exe.as_deref().ok(), Some(Path::new("/usr/bin/sleep")), "{exec:#?}");
    assert_eq!(args(exec), ["sleep", "30"]);
    assert_eq!(count(&evs, EventKind::Started), 1);
}

#[test]
fn a_uid_change_is_one_credentials_modification() {
    let (_beside, _dir, pm, mut ev) = kernel_procmond();
    let tok = format!("setuid-{}", token());
    // One setuid(2) as root: real, effective and saved uid at once.
    let script = "<STDIN>; POSIX::setuid(65534) or die qq(setuid: $!); sleep 30";
    let (child, before) =
        start_gated(&pm, &mut ev, Command::new("/usr/bin/perl").args(["-MPOSIX", "-e", script, &tok]), &tok);
    let mut child = Children(vec![(tok.clone(), child)]);
    let pid = child.0[0].1.id();
    let root = ev.of_pid(pid)[before - 1].process.details.credentials;
    assert_eq!(root.map(|c| (c.uid, c.euid)), Ok((0, 0)));

    writeln!(child.0[0].1.stdin.as_mut().unwrap(), "go").unwrap();
    assert!(wait_until(T, || ev.refresh().of_pid(pid).len() > before), "the setuid: {}", pm.log());
    wait_for_a_later_walk(&pm);
    let evs = ev.refresh().of_pid(pid);
    let after = &evs[before..];
    assert_eq!(after.len(), 1, "one event for the uid change: {after:#?}");
    let change = after[0];
    assert_eq!(
        (change.kind, &change.changes, change.source),
        (EventKind::Modified, &vec![Change::Credentials], EventSource::Kernel),
        "{change:#?}"
    );
    let creds = change.process.details.credentials.unwrap();
    assert_eq!((creds.uid, creds.euid, creds.gid), (NOBODY, NOBODY, 0), "{change:#?}");
    assert!(has_arg(change, &tok));
    assert_eq!(count(&evs, EventKind::Started), 1);
}

#[test]
fn a_deleted_executable_is_reported_once() {
    let (_beside, dir, pm, mut ev) = kernel_procmond();
    let exe = dir.path().join(format!("doomed-{}", token()));
    std::fs::copy("/usr/bin/sleep", &exe).unwrap();
    // Open, delete, then run what is open: the new program's file is gone.
    let script = r#"exec 3<"$0"; rm "$0"; exec /proc/self/fd/3 30"#;
    let child = Command::new("sh").args(["-c", script]).arg(&exe).spawn().unwrap();
    let mut child = Children(vec![(String::new(), child)]);
    let pid = child.0[0].1.id();
    let deleted = |e: &ProcessEvent| e.process.details.exe_deleted == Ok(true);
    assert!(
        wait_until(T, || ev.refresh().of_pid(pid).into_iter().any(deleted)),
        "the deleted executable: {}",
        pm.log()
    );
    wait_for_a_later_walk(&pm);
    let evs = ev.refresh().of_pid(pid);
    let reports: Vec<&ProcessEvent> = evs.iter().copied().filter(|e| deleted(e)).collect();
    assert_eq!(reports.len(), 1, "reported once: {evs:#?}");
    let e = reports[0];
    assert!(
        e.kind == EventKind::Started || (e.kind == EventKind::Modified && e.changes.contains(&Change::Exec)),
        "{e:#?}"
    );
    assert_eq!(e.source, EventSource::Kernel);
    assert_eq!(e.process.details.exe.as_deref().ok(), Some(exe.as_path()), "{e:#?}");
    assert_eq!(args(e), ["/proc/self/fd/3", "30"]);
    assert!(std::ptr::eq(*evs.last().unwrap(), e), "nothing after it: {evs:#?}");
    assert_eq!(count(&evs, EventKind::Started), 1, "{evs:#?}");

    // Its stop says how it ended and keeps the last details.
    kill(&mut child.0[0].1);
    let stopped = |ev: &Events| ev.of_pid(pid).iter().any(|e| e.kind == EventKind::Stopped);
    assert!(wait_until(T, || stopped(ev.refresh())), "stopped: {}", pm.log());
    let stop = ev.of_pid(pid).into_iter().find(|e| e.kind == EventKind::Stopped).unwrap();
    assert_eq!(stop.exit, Some(ExitStatus::Signal { signal: 9, core_dumped: false }));
    assert_eq!(stop.process.details.exe_deleted, Ok(true));
}

#[test]
fn an_overrun_is_counted_and_the_walk_recovers_every_process_once() {
    require_root();
    let _beside = beside_others();
    let dir = tempfile::tempdir().unwrap();
    let _broker = broker(dir.path());
    let agent = FakeAgent::start(&socket_path(dir.path()), &dir.path().join("agent.db"));
    agent.begin_on_register.store(true, std::sync::atomic::Ordering::SeqCst);
    // The smallest receive buffer allowed: a few events fit.
    let config = write_config(dir.path(), "kernel_events:\n  receive_buffer_bytes: 1024\n");
    let pm = start(
        dir.path(),
        User::Root,
        Some(&socket_path(dir.path())),
        &["--config", &config, "--events", "kernel"],
    );
    let mut ev = Events::of(&pm);
    wait_ready(&pm, &mut ev);

    // Bursts of long-lived processes from parallel spawners while procmond
    // is stopped (a stalled collector on a loaded host): nothing reads its
    // socket, so the kernel drops the events of most of them, forks and
    // execs alike, and only the walk can find those. A collector fast
    // enough to keep up with a burst would otherwise lose only some
    // events, which its fork window may recover without the walk.
    let run = token();
    let since_ticks = boottime_ticks().saturating_sub(100);
    let mut children = Children(Vec::new());
    let (bursts, spawners, per_spawner) = (5, 4, 75);
    let pm_pid = nix::unistd::Pid::from_raw(pm.child.id() as i32);
    for burst in 0..bursts {
        nix::sys::signal::kill(pm_pid, nix::sys::signal::Signal::SIGSTOP).expect("procmond stops");
        let spawned: Vec<(String, Child)> = std::thread::scope(|s| {
            let run = &run;
            let handles: Vec<_> = (0..spawners)
                .map(|sp| {
                    s.spawn(move || {
                        (0..per_spawner)
                            .map(|j| {
                                let tok = format!("0.0000{run}{burst}{sp}{j:03}");
                                let child = Command::new("sleep")
                                    .args(["60", &tok])
                                    .stdin(Stdio::null())
                                    .stdout(Stdio::null())
                                    .spawn()
                                    .expect("sleep starts");
                                (tok, child)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("spawner")).collect()
        });
        children.0.extend(spawned);
        nix::sys::signal::kill(pm_pid, nix::sys::signal::Signal::SIGCONT).expect("procmond resumes");
        // The kernel thread meets the overflow at its next read.
        if wait_until(Duration::from_secs(2), || event_source(&agent).overruns > 0) {
            break;
        }
    }
    let status = event_source(&agent);
    assert!(
        status.overruns > 0,
        "no overrun after {} processes in bursts: {status:?}: {}",
        children.0.len(),
        pm.log()
    );
    let started = Started {
        tokens: children.0.iter().map(|(t, _)| t.clone()).collect(),
        pids: children.0.iter().map(|(_, c)| c.id()).collect(),
        parents: vec![std::process::id()],
        since_ticks,
    };

    // Every one reported once: by the kernel path, or by the early walk.
    let all_started = |ev: &Events| started.tally(ev).iter().all(|evs| count(evs, EventKind::Started) >= 1);
    assert!(wait_until(T, || all_started(ev.refresh())), "every process reported: {}", pm.log());
    wait_for_a_later_walk(&pm);
    let per = started.tally(ev.refresh());
    let mut by_poll = 0;
    for (i, evs) in per.iter().enumerate() {
        assert_eq!(count(evs, EventKind::Started), 1, "{}: {evs:#?}", started.tokens[i]);
        assert_eq!(count(evs, EventKind::Stopped), 0, "{}: {evs:#?}", started.tokens[i]);
        let start = evs.iter().find(|e| e.kind == EventKind::Started).unwrap();
        if start.source == EventSource::Poll {
            by_poll += 1;
            assert!(has_arg(start, &started.tokens[i]), "{start:#?}");
        }
    }
    assert!(by_poll > 0, "the walk reported none of {} processes", per.len());
    let after_starts = event_source(&agent);
    assert!(after_starts.resyncs > 0, "{after_starts:?}");
    assert!(after_starts.caught_by_poll >= by_poll, "the counter knows them: {after_starts:?}");

    // Killed all at once (more overruns likely): one stop each.
    let mut killed = 0;
    for (_, c) in &mut children.0 {
        let _ = c.kill();
    }
    for (_, c) in &mut children.0 {
        let _ = c.wait();
        killed += 1;
    }
    let all_stopped = |ev: &Events| started.tally(ev).iter().all(|evs| count(evs, EventKind::Stopped) >= 1);
    assert!(wait_until(T, || all_stopped(ev.refresh())), "every process stopped: {}", pm.log());
    wait_for_a_later_walk(&pm);
    let per = started.tally(ev.refresh());
    let mut stops_by_poll = 0;
    for (i, evs) in per.iter().enumerate() {
        let tok = &started.tokens[i];
        assert_eq!(
            (count(evs, EventKind::Started), count(evs, EventKind::Stopped)),
            (1, 1),
            "{tok}: {evs:#?}"
        );
        let stop = evs.iter().find(|e| e.kind == EventKind::Stopped).unwrap();
        match stop.source {
            EventSource::Kernel => {
                assert_eq!(stop.exit, Some(ExitStatus::Signal { signal: 9, core_dumped: false }), "{stop:#?}")
            }
            EventSource::Poll => {
                stops_by_poll += 1;
                assert_eq!(stop.exit, None, "{stop:#?}");
            }
        }
        for e in evs.iter().filter(|e| e.kind == EventKind::Modified) {
            assert_eq!(e.changes, vec![Change::Exec], "{tok}: {evs:#?}");
        }
    }
    let end = event_source(&agent);
    eprintln!(
        "overrun: {} processes ({killed} killed); starts by the walk: {by_poll}, stops by the walk: {stops_by_poll}; \
         after the starts: {after_starts:?}; at the end: {end:?}",
        per.len()
    );
}
