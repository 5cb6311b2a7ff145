//! `daemoneye-wal`, the operator's tool for a write-ahead log directory:
//! `verify` checks it, `dump` lists its records. Neither takes the writer's
//! lock nor changes a byte, so both are safe on a live log.
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Inspect a DaemonEye write-ahead log directory without modifying it.
///
/// Exit status: 0 when the log is healthy (a torn tail of the active
/// segment counts as healthy: the writer cuts it on its next open), 1 when
/// corruption was found, 2 on an error (missing directory, unreadable file,
/// bad arguments).
#[derive(Parser)]
#[command(name = "daemoneye-wal", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report segments, record count, sequence range, acknowledgement
    /// watermark, torn tail and corruption.
    Verify {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// Print one line per record: sequence, payload length, segment and
    /// offset. Damage is printed where it is met, on stderr.
    Dump {
        /// The WAL directory.
        dir: PathBuf,
        /// Start at this sequence number (acknowledged records included).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("daemoneye-wal: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (Command::Verify { dir } | Command::Dump { dir, .. }) = &cli.command;
    let dir = dir.clone();
    let result = match cli.command {
        Command::Verify { dir } => verify(dir),
        Command::Dump { dir, from } => dump(dir, from),
    };
    result.map_err(|e| match e.downcast_ref::<daemoneye_wal::Error>() {
        Some(daemoneye_wal::Error::NotAWal { .. }) => match logs_below(&dir) {
            found if found.is_empty() => e,
            found => {
                let list: Vec<String> = found.iter().map(|p| format!("  {}", p.display())).collect();
                e.context(format!("write-ahead logs below it:\n{}", list.join("\n")))
            }
        },
        _ => e,
    })
}

/// Directories below `dir` (four levels at most: a collector's log is at
/// `<data_dir>/wal/<id>`, under the agent at
/// `<data_dir>/collectors/<id>/wal/<id>`) that hold a log's `LOCK` file or
/// a segment.
fn logs_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut level = vec![dir.to_path_buf()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for d in level {
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                // Not followed: a link may lead anywhere.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let is_log = std::fs::read_dir(&path).is_ok_and(|mut it| {
                    it.any(|f| {
                        f.is_ok_and(|f| {
                            f.file_name() == "LOCK" || f.path().extension().is_some_and(|x| x == "seg")
                        })
                    })
                });
                if is_log {
                    found.push(path);
                } else {
                    next.push(path);
                }
            }
        }
        level = next;
    }
    found.sort();
    found
}

fn verify(dir: PathBuf) -> anyhow::Result<ExitCode> {
    let r = daemoneye_wal::inspect(&dir).with_context(|| format!("cannot verify {}", dir.display()))?;
    let mut out = io::stdout().lock();
    writeln!(out, "directory:   {}", dir.display())?;
    writeln!(out, "segments:    {}", r.segments)?;
    writeln!(out, "records:     {} ({} unacknowledged)", r.records, r.unacknowledged)?;
    match (r.first_seq, r.last_seq) {
        (Some(a), Some(b)) => writeln!(out, "sequence:    {a}..={b}")?,
        _ => writeln!(out, "sequence:    none")?,
    }
    writeln!(out, "watermark:   {}", r.watermark)?;
    match &r.torn_tail {
        Some(t) => writeln!(
            out,
            "torn tail:   {} bytes at offset {} of {} (cut on the writer's next open)",
            t.bytes,
            t.offset,
            t.segment.display()
        )?,
        None => writeln!(out, "torn tail:   none")?,
    }
    for n in &r.notes {
        writeln!(out, "note:        {n}")?;
    }
    for c in &r.corruptions {
        writeln!(
            out,
            "CORRUPT:     {} at offset {} ({} bytes): {}",
            c.segment.display(),
            c.offset,
            c.bytes,
            c.kind
        )?;
    }
    if r.is_healthy() {
        writeln!(out, "status:      ok")?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(out, "status:      CORRUPT ({} problems)", r.corruptions.len())?;
        Ok(ExitCode::from(1))
    }
}

fn dump(dir: PathBuf, from: u64) -> anyhow::Result<ExitCode> {
    let mut replay =
        daemoneye_wal::read_dir(&dir, from).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut damaged = false;
    while let Some(item) = replay.next() {
        match item {
            Ok(rec) => {
                let seg =
                    replay.segment().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
                writeln!(
                    out,
                    "seq={} len={} segment={} offset={}",
                    rec.seq,
                    rec.payload.len(),
                    seg.unwrap_or_default(),
                    rec.offset
                )?;
            }
            Err(e) => {
                out.flush()?;
                eprintln!("daemoneye-wal: {e}");
                damaged = true;
            }
        }
    }
    out.flush()?;
    if let Some(t) = replay.torn_tail() {
        eprintln!(
            "daemoneye-wal: torn tail: {} bytes at offset {} of {} (cut on the writer's next open)",
            t.bytes,
            t.offset,
            t.segment.display()
        );
    }
    Ok(if damaged { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
