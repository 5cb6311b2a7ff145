//! Crash test: a real writer process is killed with SIGKILL at random
//! moments, again and again, and after every kill the log must hold every
//! record whose `append` returned under `Durability::Always`, with
//! contiguous sequence numbers and no duplicates.
//!
//! Like sled's crash tests, this binary re-runs itself as the victim: with
//! `DAEMONEYE_WAL_CRASH_VICTIM=<dir>` set it appends forever from several
//! threads and prints `ack FIRST END` after each append returns (and
//! `wm SEQ` after each `truncate_through` returns); otherwise it is the
//! harness. It owns `main` (`harness = false`). Set
//! `DAEMONEYE_WAL_CRASH_SEED` to replay a failing run.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, unbounded};
use daemoneye_wal::{Durability, Wal, WalOptions};

const VICTIM_ENV: &str = "DAEMONEYE_WAL_CRASH_VICTIM";
const SEED_ENV: &str = "DAEMONEYE_WAL_CRASH_SEED";
const SEGMENT_ENV: &str = "DAEMONEYE_WAL_CRASH_SEGMENT";
const ITERATIONS: u32 = 120;

/// Segment sizes the harness alternates between: small ones so kills land
/// during rotation, large ones so segments outgrow the reader's chunk.
const SEGMENT_SIZES: [u64; 2] = [16 << 10, 1 << 20];

fn options(segment_size: u64) -> WalOptions {
    WalOptions { segment_size, max_record_size: 4096, durability: Durability::Always }
}

/// A small deterministic generator (xorshift64*), so a failing run can be
/// replayed from its printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A self-checking payload: 8 bytes of checksum, then the body.
fn make_payload(rng: &mut Rng) -> Vec<u8> {
    let len = 8 + rng.below(300) as usize;
    let mut p = vec![0u8; len];
    for b in &mut p[8..] {
        *b = rng.next() as u8;
    }
    let sum = checksum(&p[8..]);
    p[..8].copy_from_slice(&sum.to_le_bytes());
    p
}

fn payload_ok(p: &[u8]) -> bool {
    p.len() >= 8 && p[..8] == checksum(&p[8..]).to_le_bytes()
}

fn checksum(body: &[u8]) -> u64 {
    body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn victim(dir: &Path) -> ExitCode {
    let segment = std::env::var(SEGMENT_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(SEGMENT_SIZES[0]);
    let (wal, _) = match Wal::open(dir, options(segment)) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("victim: open failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let acked = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (wal, acked) = (&wal, &acked);
            s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(std::process::id()) << 8) ^ (t + 1));
                for n in 0u64.. {
                    let batch: Vec<Vec<u8>> = (0..1 + rng.below(8)).map(|_| make_payload(&mut rng)).collect();
                    let range = if batch.len() == 1 {
                        let seq = wal.append(&batch[0]).expect("append");
                        seq..seq + 1
                    } else {
                        wal.append_batch(&batch).expect("append_batch")
                    };
                    acked.fetch_max(range.end - 1, Ordering::SeqCst);
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {} {}", range.start, range.end).expect("stdout");
                    out.flush().expect("flush");
                    drop(out);
                    // Thread 0 acknowledges now and then, so truncation and
                    // segment deletion race with the kill too.
                    if t == 0 && n % 40 == 39 {
                        let upto = acked.load(Ordering::SeqCst).saturating_sub(20);
                        if upto > 0 {
                            wal.truncate_through(upto).expect("truncate_through");
                            let mut out = std::io::stdout().lock();
                            writeln!(out, "wm {upto}").expect("stdout");
                            out.flush().expect("flush");
                        }
                    }
                }
            });
        }
    });
    ExitCode::SUCCESS
}

fn harness() -> Result<String, String> {
    let seed = std::env::var(SEED_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    println!("crash test: seed {seed} (set {SEED_ENV}={seed} to replay)");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = tmp.path().join("wal");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let started = Instant::now();
    // Every acknowledged sequence number so far (only ones above the
    // watermark must still be present).
    let mut acked: BTreeMap<u64, ()> = BTreeMap::new();
    let mut max_wm = 0u64;
    let mut verified = 0u64;
    for iteration in 0..ITERATIONS {
        // Ten iterations at a time with each segment size.
        let segment = SEGMENT_SIZES[(iteration / 10) as usize % SEGMENT_SIZES.len()];
        let mut child = Command::new(&exe)
            .env(VICTIM_ENV, &dir)
            .env(SEGMENT_ENV, segment.to_string())
            .env("RUST_LOG", "off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn victim: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = unbounded::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Kill after a random number of acknowledgements; zero kills it
        // during open and recovery.
        let kill_after = match rng.below(10) {
            0 => 0,
            1..=6 => rng.below(40),
            _ => rng.below(400),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        while (lines.len() as u64) < kill_after {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => lines.push(l),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("iteration {iteration}: victim made no progress"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("iteration {iteration}: victim exited early: {:?}", child.wait()));
                }
            }
        }
        child.kill().map_err(|e| format!("kill: {e}"))?;
        let status = child.wait().map_err(|e| format!("wait: {e}"))?;
        if status.code().is_some() {
            return Err(format!(
                "iteration {iteration}: victim exited by itself ({status}) instead of being killed"
            ));
        }
        reader.join().map_err(|_| "reader thread panicked")?;
        lines.extend(rx.try_iter());
        for l in &lines {
            let mut parts = l.split_whitespace();
            match (parts.next(), parts.next().and_then(|a| a.parse::<u64>().ok()), parts.next()) {
                (Some("ack"), Some(a), Some(b)) => {
                    let b: u64 = b.parse().map_err(|_| format!("bad line {l:?}"))?;
                    for s in a..b {
                        if acked.insert(s, ()).is_some() {
                            return Err(format!("sequence {s} was acknowledged twice"));
                        }
                    }
                }
                (Some("wm"), Some(w), None) => max_wm = max_wm.max(w),
                _ => return Err(format!("unexpected victim output {l:?}")),
            }
        }

        // Recovery: the lock died with the victim, so this open succeeds.
        let (wal, report) = Wal::open(&dir, options(segment))
            .map_err(|e| format!("iteration {iteration}: reopen after kill: {e}"))?;
        if !report.is_healthy() {
            return Err(format!("iteration {iteration}: corruption after a kill: {report}"));
        }
        if report.watermark < max_wm {
            return Err(format!(
                "iteration {iteration}: watermark {} < acknowledged {max_wm}",
                report.watermark
            ));
        }
        let mut expect = report.watermark + 1;
        for item in wal.replay_from(0).map_err(|e| e.to_string())? {
            let rec = item.map_err(|e| format!("iteration {iteration}: replay: {e}"))?;
            if rec.seq != expect {
                return Err(format!(
                    "iteration {iteration}: replay gave seq {} where {expect} was due",
                    rec.seq
                ));
            }
            if !payload_ok(&rec.payload) {
                return Err(format!("iteration {iteration}: payload of seq {} is damaged", rec.seq));
            }
            expect += 1;
        }
        let last = expect - 1;
        if let Some((&missing, _)) = acked.range(report.watermark + 1..).find(|(s, _)| **s > last) {
            return Err(format!(
                "iteration {iteration}: acknowledged seq {missing} is lost (log ends at {last}): {report}"
            ));
        }
        if wal.next_seq() != last + 1 {
            return Err(format!("iteration {iteration}: next_seq {} after last {last}", wal.next_seq()));
        }
        verified += acked.range(report.watermark + 1..).count() as u64;
        // Forget what is acknowledged; keep the map small.
        acked = acked.split_off(&(report.watermark + 1));
        wal.close().map_err(|e| e.to_string())?;
    }
    Ok(format!(
        "crash test: {ITERATIONS} SIGKILLs, {verified} checks of acknowledged records, in {:.1} s",
        started.elapsed().as_secs_f64()
    ))
}

fn main() -> ExitCode {
    if let Some(dir) = std::env::var_os(VICTIM_ENV) {
        return victim(Path::new(&dir));
    }
    match harness() {
        Ok(summary) => {
            println!("{summary}");
            println!("crash: 1 passed, 0 failed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("crash test FAILED: {e}");
            println!("crash: 0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}
