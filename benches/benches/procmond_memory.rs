//! Where procmond's memory goes, per process: the real collection path in
//! this process (the procfs backend with procmond's defaults, no working
//! directory; procmond's `Tracker` with its sanitizer and default
//! lifecycle settings), with N sleeping children on the host (N = 1,000
//! and 10,000; `DAEMONEYE_BENCH_PROCS=1000,10000` to choose).
//!
//! For each N: `VmRSS` and `RssAnon` of this process before anything,
//! after the first (snapshot) refresh, after the tracker took it (its
//! events still held, as the actor holds them until they are submitted),
//! after those events are dropped, and after `DAEMONEYE_BENCH_CYCLES` (6)
//! steady cycles (refresh and update back to back). Then an estimate of
//! the bytes each part keeps per process, from `size_of` and the heap
//! lengths of the fields (no counting allocator: implementing
//! `GlobalAlloc` is code this project forbids), glibc's per-chunk
//! overhead and rounding included (16-byte steps, 8 bytes of header, 32
//! bytes at least).
//!
//! Run: `cargo bench -p daemoneye-benches --bench procmond_memory`. The
//! whole daemon's RSS is measured by the `procmond` bench.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;

use daemoneye_benches::{mib, now_ms, procs_and_cycles, sleepers_or_skip, status_kib};
use daemoneye_platform::{ProcessDetails, ProcessRecord};
use procmond::config::{LifecycleConfig, SanitizeConfig};
use procmond::sanitize::Sanitizer;
use procmond::tracker::Tracker;

/// `VmRSS` and `RssAnon` of this process, in KiB.
fn rss() -> (u64, u64) {
    (status_kib("self", "VmRSS"), status_kib("self", "RssAnon"))
}

/// What glibc's malloc takes for a request of `n` bytes (0: nothing).
fn chunk(n: usize) -> usize {
    if n == 0 { 0 } else { (n + 8).div_ceil(16).max(2) * 16 }
}

/// Heap bytes of one record's details, counted once per distinct `Arc`.
fn details_heap(d: &ProcessDetails) -> usize {
    let path = |p: &Result<std::path::PathBuf, _>| p.as_ref().map_or(0, |p| chunk(p.capacity()));
    let argv = d.argv.as_ref().map_or(0, |a| {
        chunk(a.args.capacity() * size_of::<String>())
            + a.args.iter().map(|s| chunk(s.capacity())).sum::<usize>()
    });
    let user = d.user.as_ref().map_or(0, |u| chunk(u.capacity()));
    path(&d.exe) + path(&d.cwd) + argv + user
}

fn line(what: &str, before: (u64, u64), after: (u64, u64), n: usize) {
    let d = |a: u64, b: u64| a as i64 - b as i64;
    println!(
        "| {what} | {} | {} | {:+} KiB | {:+} KiB | {:.0} B |",
        mib(after.0),
        mib(after.1),
        d(after.0, before.0),
        d(after.1, before.1),
        d(after.1, before.1) as f64 * 1024.0 / n as f64
    );
}

fn bench_n(n: usize, steady: usize) -> Result<(), String> {
    let Some((kids, took)) = sleepers_or_skip(&format!("N={n}"), n, 200) else { return Ok(()) };
    let r0 = rss();
    // procfs on Linux (what the figures below are about), sysinfo elsewhere.
    let mut source = daemoneye_platform::default_source().map_err(|e| e.to_string())?;
    // procmond's default: no working directory without enhanced metadata.
    source.set_read_cwd(false);
    let mut tracker =
        Tracker::new(LifecycleConfig::default(), Sanitizer::new(&SanitizeConfig::default()), false);
    let records = source.refresh().map_err(|e| e.to_string())?;
    let procs = records.len();
    println!(
        "\n## N = {n} sleeping children ({procs} processes listed; spawned in {:.1} s)\n",
        took.as_secs_f64()
    );
    println!("| after | VmRSS | RssAnon | VmRSS added | RssAnon added | RssAnon added per process |");
    println!("|---|---:|---:|---:|---:|---:|");
    line("start", r0, r0, procs);
    let r1 = rss();
    line("first refresh (backend state + its records)", r0, r1, procs);
    let events = tracker.update(records, now_ms());
    let r2 = rss();
    line("tracker took the snapshot (its events held)", r1, r2, procs);
    let n_events = events.len();
    drop(events);
    let r3 = rss();
    line("events dropped", r2, r3, procs);
    let mut last = Vec::new();
    for _ in 0..steady {
        let records = source.refresh().map_err(|e| e.to_string())?;
        last = records.clone();
        let _ = tracker.update(records, now_ms());
    }
    let r4 = rss();
    line(&format!("{steady} steady cycles"), r3, r4, procs);
    line("all (from start)", r0, r4, procs);

    // The estimate, from the last steady cycle's records.
    let mut distinct = HashSet::new();
    let mut heap = 0;
    let mut names = 0;
    for r in &last {
        names += chunk(r.name.capacity());
        if distinct.insert(Arc::as_ptr(&r.details)) {
            heap += details_heap(&r.details);
        }
    }
    let per = |b: usize| b as f64 / procs.max(1) as f64;
    let details = distinct.len() * chunk(size_of::<ProcessDetails>() + 16) + heap;
    println!("\nsnapshot events: {n_events}; distinct details: {}\n", distinct.len());
    println!("| kept per process (estimate) | bytes |");
    println!("|---|---:|");
    println!("| `ProcessRecord` (inline) | {} |", size_of::<ProcessRecord>());
    println!(
        "| (an event in flight, inline: `ProcessEvent` {} B, `EventEnvelope` {} B) | |",
        size_of::<daemoneye_contract::event::ProcessEvent>(),
        size_of::<daemoneye_contract::event::EventEnvelope>()
    );
    println!("| `ProcessDetails` (inline, in its `Arc`) | {} |", chunk(size_of::<ProcessDetails>() + 16));
    println!("| details' heap (exe, cwd, argv, user) | {:.0} |", per(heap));
    println!("| name (`String` heap) | {:.0} |", per(names));
    println!("| tracker: its table (key + `Tracked` per bucket) | {:.0} |", per(tracker.table_bytes()));
    println!(
        "| backend: table entry (pid + `Known`) + name bytes | {:.0} |",
        per(source.state_bytes().unwrap_or(0))
    );
    println!(
        "| total, details counted once | {:.0} |",
        per(details + names + tracker.table_bytes() + source.state_bytes().unwrap_or(0))
    );
    drop(kids);
    Ok(())
}

fn main() -> ExitCode {
    // `cargo test --benches` runs it without `--bench`: a smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let (ns, steady): (Vec<usize>, usize) = if smoke { (vec![20], 1) } else { procs_and_cycles() };
    println!("# procmond memory (in process: procfs backend + tracker, procmond's defaults)");
    for n in ns {
        if let Err(e) = bench_n(n, steady) {
            eprintln!("N={n}: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
