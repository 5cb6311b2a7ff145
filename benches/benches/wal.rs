//! Throughput of the write-ahead log (`daemoneye-wal`): appends of 256-byte
//! records under each durability policy (`Always` with group commit,
//! `Interval(10 ms)`, `Never`), from 1 and from 4 threads, one record per
//! `append` call or 64 per `append_batch` call; the speed of the recovery
//! scan (`Wal::open` and `daemoneye_wal::inspect`) over a log of 500,000
//! records; and, as the floor under `Always`, the raw cost of a 272-byte
//! write plus `fdatasync` on the same file system. Every log lives in a
//! fresh directory under `std::env::temp_dir()` (set `TMPDIR` to measure
//! another disk) with 64 MiB segments.
//!
//! Run it with `cargo bench -p daemoneye-benches --bench wal`; add a filter
//! after `--` to run a subset, e.g. `-- wal_recovery`. The results and the
//! machine they were measured on are recorded in `BENCHMARKS.md`.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use daemoneye_wal::{Durability, Wal, WalOptions};
use tempfile::TempDir;

/// Payload size of every appended record, in bytes.
const RECORD_SIZE: usize = 256;
/// Records per `append_batch` call in the batched benchmarks.
const BATCH: usize = 64;
/// Segment size of every log.
const SEGMENT_SIZE: u64 = 64 << 20;
/// Appending thread counts measured.
const THREADS: [usize; 2] = [1, 4];
/// Records in the log whose recovery is measured.
const RECOVERY_RECORDS: u64 = 500_000;
/// Records per `append_batch` call while building that log.
const BUILD_BATCH: usize = 1024;

/// How one appending thread calls the log.
#[derive(Clone, Copy)]
enum Mode {
    /// `append`, one record per call.
    Single,
    /// `append_batch`, [`BATCH`] records per call.
    Batch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::Batch => "batch64",
        }
    }

    fn records_per_call(self) -> usize {
        match self {
            Mode::Single => 1,
            Mode::Batch => BATCH,
        }
    }
}

fn options(durability: Durability) -> WalOptions {
    WalOptions { segment_size: SEGMENT_SIZE, durability, ..WalOptions::default() }
}

fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("daemoneye-wal-bench-{tag}-"))
        .tempdir_in(std::env::temp_dir())
        .expect("create a temporary directory for the benchmark")
}

/// A fixed, non-uniform 256-byte payload.
fn payload() -> [u8; RECORD_SIZE] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(31).wrapping_add(7))
}

/// Runs `iters` calls on each of `threads` threads, all released at once,
/// and returns the wall time until the last one finished.
fn run_appends(wal: &Wal, threads: usize, iters: u64, mode: Mode, batch: &[[u8; RECORD_SIZE]]) -> Duration {
    let start_line = Barrier::new(threads + 1);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    start_line.wait();
                    for _ in 0..iters {
                        let seq = match mode {
                            Mode::Single => wal.append(&batch[0]),
                            Mode::Batch => wal.append_batch(batch).map(|r| r.start),
                        };
                        black_box(seq.expect("append to the benchmark log"));
                    }
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        for w in workers {
            w.join().expect("an appending thread panicked");
        }
        start.elapsed()
    })
}

/// Append throughput: one group per policy; an iteration is one call on
/// each thread, so the element count is threads × records per call.
fn appends(c: &mut Criterion) {
    let policies = [
        ("always", Durability::Always),
        ("interval_10ms", Durability::Interval(Duration::from_millis(10))),
        ("never", Durability::Never),
    ];
    let batch = vec![payload(); BATCH];
    for (policy, durability) in policies {
        let mut group = c.benchmark_group(format!("wal_append_{policy}"));
        configure(&mut group, Duration::from_secs(4));
        for threads in THREADS {
            for mode in [Mode::Single, Mode::Batch] {
                // A fresh log per benchmark, so one's size and page cache
                // state do not carry into the next.
                let dir = temp_dir(policy);
                let (wal, report) =
                    Wal::open(dir.path(), options(durability)).expect("open the benchmark log");
                assert!(report.is_healthy(), "fresh log reported damage: {report}");
                group.throughput(Throughput::Elements((threads * mode.records_per_call()) as u64));
                group.bench_function(format!("{}/{threads}t", mode.name()), |b| {
                    b.iter_custom(|iters| run_appends(&wal, threads, iters, mode, &batch))
                });
                wal.close().expect("close the benchmark log");
            }
        }
        group.finish();
    }
}

/// Recovery scan speed over a log of [`RECOVERY_RECORDS`] records (warm
/// page cache: the log was just written).
fn recovery(c: &mut Criterion) {
    let dir = temp_dir("recovery");
    build_log(dir.path());
    let mut group = c.benchmark_group("wal_recovery");
    configure(&mut group, Duration::from_secs(5));
    // One iteration takes a sizeable fraction of a second: sample flat.
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(RECOVERY_RECORDS));
    group.bench_function("open", |b| {
        b.iter(|| {
            let (wal, report) =
                Wal::open(dir.path(), options(Durability::Always)).expect("reopen the recovery log");
            assert_eq!(report.records, RECOVERY_RECORDS, "recovery lost records: {report}");
            // Release the directory lock for the next iteration; nothing was
            // appended, so this does not fsync.
            drop(wal);
            report
        })
    });
    group.bench_function("inspect", |b| {
        b.iter(|| {
            let report = daemoneye_wal::inspect(dir.path()).expect("inspect the recovery log");
            assert_eq!(report.records, RECOVERY_RECORDS, "inspect lost records: {report}");
            report
        })
    });
    group.finish();
}

/// Writes [`RECOVERY_RECORDS`] records quickly (`Never`, large batches) and
/// closes the log, which fsyncs it.
fn build_log(dir: &Path) {
    let (wal, _) = Wal::open(dir, options(Durability::Never)).expect("create the recovery log");
    let batch = vec![payload(); BUILD_BATCH];
    let mut left = RECOVERY_RECORDS;
    while left > 0 {
        let n = left.min(BUILD_BATCH as u64);
        wal.append_batch(&batch[..n as usize]).expect("append to the recovery log");
        left -= n;
    }
    wal.close().expect("close the recovery log");
}

/// The floor under `Durability::Always`: append one 272-byte frame (a
/// 256-byte record with its 16-byte header) to a file and `fdatasync` it,
/// as an un-grouped commit would.
fn fsync_baseline(c: &mut Criterion) {
    let dir = temp_dir("fsync");
    let path = dir.path().join("baseline");
    let mut file =
        OpenOptions::new().append(true).create(true).open(&path).expect("create the fdatasync baseline file");
    let frame = [0x5a_u8; RECORD_SIZE + 16];
    let mut group = c.benchmark_group("fs_baseline");
    configure(&mut group, Duration::from_secs(4));
    group.throughput(Throughput::Elements(1));
    group.bench_function("write272_fdatasync", |b| {
        b.iter(|| {
            file.write_all(&frame).expect("write the baseline file");
            file.sync_data().expect("fdatasync the baseline file");
        })
    });
    group.finish();
}

/// Short runs: the whole file must finish in a few minutes on two cores.
fn configure(group: &mut BenchmarkGroup<'_, WallTime>, measurement: Duration) {
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(measurement);
}

criterion_group!(benches, fsync_baseline, appends, recovery);
criterion_main!(benches);
