//! Test support, public so the collector's, the store's and the agent's
//! tests and the benchmarks build the same plausible data: [`record`] a
//! process record, [`envelope`] an event as a collector sends it.

use std::path::PathBuf;
use std::sync::Arc;

use daemoneye_platform::{Argv, Credentials, FileIdentity, ProcessDetails, ProcessRecord, ProcessState};

/// A non-snapshot event of `kind` about `process`, as collector
/// `collector` sends it on stream `stream_id` with sequence number `seq`,
/// observed at `observed_unix_ms`.
pub fn envelope(
    collector: &str,
    stream_id: u64,
    seq: u64,
    kind: crate::event::EventKind,
    process: ProcessRecord,
    observed_unix_ms: u64,
) -> crate::event::EventEnvelope {
    crate::event::EventEnvelope {
        collector_id: collector.to_owned(),
        stream_id,
        seq,
        event: crate::event::ProcessEvent {
            kind,
            snapshot: false,
            changes: Vec::new(),
            observed_unix_ms,
            process,
            sha256: None,
            source: crate::event::EventSource::Poll,
            late: None,
            exit: None,
        },
        position: None,
    }
}

/// A process record for pid `pid` started at `start_time`, running
/// `/usr/bin/<name>` as uid 1000.
pub fn record(pid: u32, start_time: u64, name: &str) -> ProcessRecord {
    ProcessRecord {
        pid,
        ppid: 1,
        start_time,
        started_unix: Ok(1_700_000_000 + start_time),
        name: name.to_owned(),
        state: ProcessState::Sleeping,
        session: Ok(pid),
        threads: Ok(1),
        rss_bytes: 4 << 20,
        virtual_bytes: 16 << 20,
        cpu_time_ms: Ok(10),
        kernel_thread: false,
        details: Arc::new(ProcessDetails {
            exe: Ok(PathBuf::from(format!("/usr/bin/{name}"))),
            exe_file: Ok(FileIdentity {
                dev: 1,
                inode: 1000 + u64::from(pid),
                size: 1 << 16,
                mtime: 1,
                ctime: 1,
            }),
            exe_deleted: Ok(false),
            argv: Ok(Argv { args: vec![name.to_owned()], truncated: false }),
            cwd: Ok(PathBuf::from("/")),
            credentials: Ok(Credentials { uid: 1000, euid: 1000, gid: 1000, egid: 1000 }),
            user: Ok("user".to_owned()),
        }),
    }
}
