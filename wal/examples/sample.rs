//! Writes a small sample log, so a newcomer can try `daemoneye-wal verify`
//! and `dump` on something real: `cargo run -p daemoneye-wal --example
//! sample -- DIR`. It appends 1,000 event-like records in batches under
//! `Durability::Always`, acknowledges the first half as a consumer would,
//! and prints the recovery report of a reopen.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use daemoneye_wal::{Wal, WalOptions};

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: sample DIR");
        return ExitCode::from(2);
    };
    match run(dir.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sample: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(dir: &std::path::Path) -> daemoneye_wal::Result<()> {
    let opts = WalOptions { segment_size: 64 << 10, ..WalOptions::default() };
    let (wal, _) = Wal::open(dir, opts)?;
    let mut last = 0;
    for batch in 0..20 {
        let events: Vec<String> = (0..50)
            .map(|i| {
                format!(r#"{{"kind":"started","pid":{},"name":"sample-{batch}-{i}"}}"#, 1000 + batch * 50 + i)
            })
            .collect();
        last = wal.append_batch(&events)?.end - 1;
    }
    wal.truncate_through(last - 500)?;
    wal.close()?;
    let (_, report) = Wal::open(dir, opts)?;
    println!("{}: {report}", dir.display());
    Ok(())
}
