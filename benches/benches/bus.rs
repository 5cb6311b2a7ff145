//! Bus benchmark, all in one run: request/reply round trips through the
//! `daemoneye-bus` broker across three processes (requester, broker,
//! responder), with the blocking `Client` (what users get) and with a raw
//! blocking client speaking the wire protocol (the broker's own cost), at
//! 64 B and 256 B, unpinned and pinned to one core (`taskset -c 0`); a raw
//! Unix-socket ping-pong between two processes (the limit); one-way
//! throughput 1 publisher -> 1 subscriber at 256 B, and fan-out 1 -> 8
//! subscribers under a flood with every drop counted (broker and client
//! side, against what was sent); and the same round trip and 1 -> 1
//! throughput through Mosquitto (MQTT 3.1.1, QoS 0, over a Unix socket)
//! and nats-server (TCP 127.0.0.1) with tiny hand-written blocking protocol
//! clients. The peers are started and killed (by their own pid) by the
//! harness, in temp dirs; when one is not installed the harness says so and
//! measures the rest. The harness re-runs its own binary as every process
//! (`DAEMONEYE_BENCH_BUS_ROLE=<role>`).
//!
//! Run: `cargo bench -p daemoneye-benches --bench bus` (about a minute).
//! `DAEMONEYE_BENCH_RT=20000` sets the round trips per case,
//! `DAEMONEYE_BENCH_FLOOD_SECS=2` the flood length; a word after `--`
//! runs only the cases whose name contains it.
#![forbid(unsafe_code)]

// The root of a bench target finds `mod x;` at `benches/x.rs`, where the
// other targets live: this one's modules are in `bus/`.
#[path = "bus/common.rs"]
mod common;
#[path = "bus/harness.rs"]
mod harness;
#[path = "bus/mqtt.rs"]
mod mqtt;
#[path = "bus/nats.rs"]
mod nats;
#[path = "bus/raw.rs"]
mod raw;
#[path = "bus/roles.rs"]
mod roles;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use self::common::{Lat, env_num, get};
use self::harness::{Harness, find_program};
use self::roles::role_main;

const ROLE: &str = "DAEMONEYE_BENCH_BUS_ROLE";
/// Socket path (bus, ping-pong, Mosquitto) or `host:port` (NATS).
const ADDR: &str = "DAEMONEYE_BENCH_ADDR";
const PAYLOAD: &str = "DAEMONEYE_BENCH_PAYLOAD";
const COUNT: &str = "DAEMONEYE_BENCH_COUNT";
const SECS: &str = "DAEMONEYE_BENCH_SECS";
const ID: &str = "DAEMONEYE_BENCH_ID";
const OVERFLOW: &str = "DAEMONEYE_BENCH_OVERFLOW";
const QUEUE_MSGS: &str = "DAEMONEYE_BENCH_QUEUE_MSGS";

const WARMUP: usize = 2_000;
const RPC_TOPIC: &str = "bench.rpc";
const FLOOD_TOPIC: &str = "bench.flood";
const FLOOD_PAYLOAD: usize = 256;
const FANOUT: usize = 8;
/// A subscriber that sees nothing for this long stops counting.
const IDLE: Duration = Duration::from_secs(5);

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(ROLE) {
        return role_main(&role);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find my own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = match tempfile::Builder::new().prefix("daemoneye-bench-bus").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
    let taskset = Command::new("taskset")
        .args(["-c", "0", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut h = Harness {
        exe,
        dir,
        rt: env_num("DAEMONEYE_BENCH_RT", 20_000) as usize,
        flood_ms: (env_num("DAEMONEYE_BENCH_FLOOD_SECS", 2) * 1000).max(100),
        taskset,
        mosquitto: find_program("mosquitto"),
        nats: find_program("nats-server"),
        filter: std::env::args().skip(1).find(|a| !a.starts_with('-')),
        seq: 0,
    };
    let started = Instant::now();
    println!(
        "bus benchmark: {} round trips per case (+{WARMUP} warm-up), floods of {:.1} s, {} CPUs",
        h.rt,
        h.flood_ms as f64 / 1000.0,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (name, bin) in [("mosquitto", &h.mosquitto), ("nats-server", &h.nats)] {
        match bin {
            Some(p) => println!("peer {name}: {}", p.display()),
            None => println!(
                "peer {name}: NOT INSTALLED, not measured (apt-get install -y mosquitto nats-server)"
            ),
        }
    }
    if !h.taskset {
        println!("taskset (util-linux) not usable: pinned cases are skipped");
    }

    // 1, 2, 4: round trips.
    println!("\n## Request/reply round trip (requester -> server -> responder -> server -> requester)\n");
    println!(
        "| {:<24} | {:>5} | {:<8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>9} |",
        "path", "bytes", "cpus", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "mean µs", "RT/s"
    );
    println!(
        "|{:-<26}|{:->7}|{:-<10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->11}|",
        "", "", "", "", "", "", "", "", ""
    );
    let kinds = ["bus client", "bus raw", "raw uds ping-pong", "mosquitto", "nats-server"];
    let mut lats: Vec<(String, usize, bool, Lat)> = Vec::new();
    for pinned in [false, true] {
        if pinned && !h.taskset {
            continue;
        }
        for payload in [64usize, 256] {
            for kind in kinds {
                let name = format!("rt {kind} {payload} {}", if pinned { "pinned" } else { "unpinned" });
                if !h.wanted(&name) {
                    continue;
                }
                let cpus = if pinned { "pinned 0" } else { "2 cores" };
                match h.round_trip(kind, payload, pinned) {
                    Ok(l) => {
                        println!(
                            "| {:<24} | {:>5} | {:<8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>9.0} |",
                            kind,
                            payload,
                            cpus,
                            us(l.p50),
                            us(l.p99),
                            us(l.p999),
                            us(l.max),
                            us(l.mean),
                            l.rate
                        );
                        lats.push((kind.to_owned(), payload, pinned, l));
                    }
                    Err(e) => println!("| {kind:<24} | {payload:>5} | {cpus:<8} | FAILED: {e}"),
                }
            }
        }
    }

    // 3, 4: one-way floods.
    println!(
        "\n## One-way throughput, {FLOOD_PAYLOAD} B, flood of {:.1} s (2 cores)\n",
        h.flood_ms as f64 / 1000.0
    );
    println!(
        "| {:<30} | {:>4} | {:>10} | {:>10} | {:>12} | {:>12} | {:>9} | {:>9} | {:>12} |",
        "path", "subs", "sent", "pub msg/s", "received", "sub msg/s", "broker dr", "client dr", "unaccounted"
    );
    println!(
        "|{:-<32}|{:->6}|{:->12}|{:->12}|{:->14}|{:->14}|{:->11}|{:->11}|{:->14}|",
        "", "", "", "", "", "", "", "", ""
    );
    let cases: [(&str, usize, bool); 7] = [
        ("bus client", 1, false),
        ("bus raw", 1, false),
        ("mosquitto", 1, false),
        ("nats-server", 1, false),
        ("bus client", FANOUT, false),
        ("bus raw", FANOUT, false),
        ("bus client", FANOUT, true),
    ];
    let mut rates: Vec<(String, usize, bool, f64)> = Vec::new();
    let mut drop_checks: Vec<String> = Vec::new();
    for (kind, subs, drop_newest) in cases {
        let label = format!("{kind}{}", if drop_newest { " DropNewest q=1024" } else { "" });
        let name = format!("flood {label} 1->{subs}");
        if !h.wanted(&name) {
            continue;
        }
        match h.flood(kind, subs, drop_newest) {
            Ok(f) => {
                let sent = get(&f.publisher, "sent");
                let pub_rate = sent / get(&f.publisher, "secs").max(1e-9);
                let received: f64 = f.subscribers.iter().map(|s| get(s, "received")).sum();
                // Aggregate delivery rate: messages received by all subscribers
                // per second of the slowest subscriber's window.
                let window = f.subscribers.iter().map(|s| get(s, "secs")).fold(0.0, f64::max);
                let sub_rate = received / window.max(1e-9);
                let client_dropped: f64 = f.subscribers.iter().map(|s| get(s, "client_dropped")).sum();
                let broker_dropped = f.stats.as_ref().map_or(0, |s| s.dropped) as f64;
                let ended_n: f64 = f.subscribers.iter().map(|s| get(s, "ended")).sum();
                let ended = ended_n == subs as f64;
                // Each subscriber is also owed the end marker (a drop too).
                let lost = sent * subs as f64 - received + (subs as f64 - ended_n);
                let unaccounted = lost - broker_dropped - client_dropped;
                let bdr = if f.stats.is_some() { format!("{broker_dropped:.0}") } else { "n/a".into() };
                let cdr = if kind == "bus client" { format!("{client_dropped:.0}") } else { "n/a".into() };
                println!(
                    "| {:<30} | {:>4} | {:>10.0} | {:>10.0} | {:>12.0} | {:>12.0} | {:>9} | {:>9} | {:>12.0} |",
                    label, subs, sent, pub_rate, received, sub_rate, bdr, cdr, unaccounted
                );
                if !ended {
                    drop_checks.push(format!("{label} 1->{subs}: a subscriber never saw the end marker"));
                }
                if kind.starts_with("bus") {
                    let strategy = if drop_newest { "DropNewest" } else { "Block" };
                    drop_checks.push(format!(
                        "{label} 1->{subs} ({strategy}): sent {sent:.0} x {subs}, received {received:.0}, lost {lost:.0}; \
                         counted: broker {broker_dropped:.0}, client {client_dropped:.0}; unaccounted {unaccounted:.0}{}",
                        match (drop_newest, lost == 0.0, unaccounted == 0.0) {
                            (false, true, _) => " -> zero drops: OK",
                            (false, false, _) => " -> DROPS UNDER Block",
                            (true, _, true) => " -> every drop counted: OK",
                            (true, _, false) => " -> UNCOUNTED DROPS",
                        }
                    ));
                }
                if !drop_newest {
                    rates.push((kind.to_owned(), subs, drop_newest, sub_rate));
                }
            }
            Err(e) => println!("| {label:<30} | {subs:>4} | FAILED: {e}"),
        }
    }
    println!("\nDrop accounting:");
    for c in &drop_checks {
        println!("- {c}");
    }

    // Goals.
    println!("\n## Goals\n");
    let find = |kind: &str, payload: usize, pinned: bool| {
        lats.iter().find(|l| l.0 == kind && l.1 == payload && l.2 == pinned).map(|l| l.3)
    };
    for pinned in [true, false] {
        for payload in [64usize, 256] {
            let Some(ours) = find("bus client", payload, pinned) else { continue };
            let pin = if pinned { "pinned" } else { "unpinned" };
            let raw = find("bus raw", payload, pinned);
            println!(
                "- {payload} B {pin}: bus client p99 {} µs{}{}{}{}",
                us(ours.p99),
                if pinned {
                    format!(" (goal < 40 µs: {})", if ours.p99 < 40_000 { "met" } else { "MISSED" })
                } else {
                    String::new()
                },
                raw.map_or(String::new(), |r| format!("; bus raw p99 {} µs", us(r.p99))),
                find("mosquitto", payload, pinned).map_or(String::new(), |m| format!(
                    "; vs Mosquitto p99 {} µs: {:.2}x ({})",
                    us(m.p99),
                    ours.p99 as f64 / m.p99 as f64,
                    if ours.p99 < m.p99 { "below, met" } else { "NOT below" }
                )),
                find("raw uds ping-pong", payload, pinned).map_or(String::new(), |u| format!(
                    "; vs raw UDS p99 {} µs: {:.2}x ({})",
                    us(u.p99),
                    ours.p99 as f64 / u.p99 as f64,
                    if ours.p99 <= 4 * u.p99 { "within 4x, met" } else { "MISSED 4x" }
                )),
            );
        }
    }
    let rate = |kind: &str, subs: usize| rates.iter().find(|r| r.0 == kind && r.1 == subs).map(|r| r.3);
    if let Some(ours) = rate("bus client", 1) {
        println!(
            "- 1->1 bus client {ours:.0} msg/s (goal >= 2,000,000: {}){}{}{}",
            if ours >= 2e6 { "met" } else { "MISSED" },
            rate("bus raw", 1).map_or(String::new(), |r| format!("; bus raw {r:.0} msg/s")),
            rate("nats-server", 1).map_or(String::new(), |n| format!(
                "; vs nats-server {n:.0}: {:.2}x ({})",
                ours / n,
                if ours > n { "ahead, met" } else { "NOT ahead" }
            )),
            rate("mosquitto", 1).map_or(String::new(), |m| format!(
                "; vs Mosquitto {m:.0}: {:.2}x ({})",
                ours / m,
                if ours >= 10.0 * m { ">= 10x, met" } else { "MISSED 10x" }
            )),
        );
    }
    println!("\ntotal {:.0} s", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}
