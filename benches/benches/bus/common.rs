//! Small helpers shared by every role: output, the environment, errors,
//! and the measurements (round-trip latencies, floods, counting until the
//! end marker) with their result lines.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::WARMUP;

pub(super) fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub(super) fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

pub(super) fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub(super) fn other(e: impl ToString) -> io::Error {
    io::Error::other(e.to_string())
}

/// Latency summary of one case, in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Lat {
    pub(super) p50: u64,
    pub(super) p99: u64,
    pub(super) p999: u64,
    pub(super) max: u64,
    pub(super) mean: u64,
    /// Round trips per second over the measured loop.
    pub(super) rate: f64,
}

impl Lat {
    pub(super) fn line(&self) -> String {
        format!(
            "result p50={} p99={} p999={} max={} mean={} rate={:.0}",
            self.p50, self.p99, self.p999, self.max, self.mean, self.rate
        )
    }

    pub(super) fn parse(line: &str) -> Lat {
        let kv = kv(line);
        let g = |k: &str| kv.iter().find(|(a, _)| a == k).map_or(0.0, |(_, v)| *v);
        Lat {
            p50: g("p50") as u64,
            p99: g("p99") as u64,
            p999: g("p999") as u64,
            max: g("max") as u64,
            mean: g("mean") as u64,
            rate: g("rate"),
        }
    }
}

/// `key=value` pairs (numbers) of a result line.
pub(super) fn kv(line: &str) -> Vec<(String, f64)> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

pub(super) fn get(kv: &[(String, f64)], k: &str) -> f64 {
    kv.iter().find(|(a, _)| a == k).map_or(0.0, |(_, v)| *v)
}

/// Runs `WARMUP` then `n` timed round trips and summarizes them.
pub(super) fn measure(n: usize, mut rt: impl FnMut() -> io::Result<()>) -> io::Result<Lat> {
    for _ in 0..WARMUP {
        rt()?;
    }
    let mut ns = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        rt()?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    let total = start.elapsed();
    ns.sort_unstable();
    let pct = |p: f64| ns[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Ok(Lat {
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        max: ns[n - 1],
        mean: ns.iter().sum::<u64>() / n as u64,
        rate: n as f64 / total.as_secs_f64(),
    })
}

/// Publishes with `send` for `secs` seconds, then `end` (the end marker),
/// and prints how many were sent.
pub(super) fn flood(
    secs: f64,
    mut send: impl FnMut() -> io::Result<()>,
    end: impl FnOnce() -> io::Result<()>,
) -> ExitCode {
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut sent: u64 = 0;
    loop {
        for _ in 0..256 {
            if let Err(e) = send() {
                say(&format!("error publish: {e}"));
                return ExitCode::FAILURE;
            }
        }
        sent += 256;
        if start.elapsed() >= limit {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Err(e) = end() {
        say(&format!("error end marker: {e}"));
        return ExitCode::FAILURE;
    }
    say(&format!("result sent={sent} secs={secs:.6}"));
    ExitCode::SUCCESS
}

/// Counts messages until the end marker (`next` returns `Some(true)`) or
/// `IDLE` without any (`None`); prints the count and the rate between the
/// first and the last message.
pub(super) fn count(mut next: impl FnMut() -> Option<bool>, extra: impl FnOnce() -> String) -> ExitCode {
    let mut received: u64 = 0;
    let mut first = None;
    let mut last = Instant::now();
    let mut ended = false;
    while let Some(end) = next() {
        if end {
            ended = true;
            break;
        }
        last = Instant::now();
        first.get_or_insert(last);
        received += 1;
    }
    let secs = first.map_or(0.0, |f: Instant| (last - f).as_secs_f64());
    say(&format!("result received={received} secs={secs:.6} ended={} {}", u8::from(ended), extra()));
    ExitCode::SUCCESS
}
