//! One event as the columns of `process_events` ([`EventRow`]).

use super::*;

/// The column values of one event, borrowed from its envelope where they
/// can be.
pub(super) struct EventRow<'a> {
    env: &'a EventEnvelope,
    seq: i64,
    changes: String,
    exe: Option<String>,
    argv: Option<String>,
    argv_truncated: bool,
    cwd: Option<String>,
    credentials: [Option<u32>; 4],
    state: String,
    sha256: Option<&'a str>,
    record: Vec<u8>,
}

impl<'a> EventRow<'a> {
    pub(super) fn new(env: &'a EventEnvelope) -> Result<EventRow<'a>, StoreError> {
        let unstorable = |reason: String| StoreError::Unstorable {
            collector_id: env.collector_id.clone(),
            stream_id: env.stream_id,
            seq: env.seq,
            reason,
        };
        let seq = i64::try_from(env.seq).map_err(|_| unstorable("seq is beyond i64::MAX".to_owned()))?;
        let record = env.event.encode();
        let event = &env.event;
        let d = &event.process.details;
        let changes: Vec<&str> = event.changes.iter().map(|c| c.as_str()).collect();
        let (argv, argv_truncated) = match &d.argv {
            // Serializing a list of strings cannot fail.
            Ok(argv) => (serde_json::to_string(&argv.args).ok(), argv.truncated),
            Err(_) => (None, false),
        };
        let credentials = match &d.credentials {
            Ok(c) => [Some(c.uid), Some(c.euid), Some(c.gid), Some(c.egid)],
            Err(_) => [None; 4],
        };
        let sha256 = match &event.sha256 {
            Some(HashOutcome::Sha256(hex)) => Some(hex.as_str()),
            _ => None,
        };
        Ok(EventRow {
            env,
            seq,
            changes: changes.join(","),
            exe: d.exe.as_ref().ok().map(|p| p.to_string_lossy().into_owned()),
            argv,
            argv_truncated,
            cwd: d.cwd.as_ref().ok().map(|p| p.to_string_lossy().into_owned()),
            credentials,
            state: state_name(event.process.state),
            sha256,
            record,
        })
    }

    /// Runs [`INSERT_EVENT`]; returns the rows inserted (0 for a
    /// duplicate).
    pub(super) fn insert(&self, stmt: &mut rusqlite::CachedStatement<'_>) -> rusqlite::Result<usize> {
        let env = self.env;
        let event = &env.event;
        let p = &event.process;
        let d = &p.details;
        let [uid, euid, gid, egid] = self.credentials;
        let (exit_code, exit_signal) = match event.exit {
            Some(ExitStatus::Code(code)) => (Some(code), None),
            Some(ExitStatus::Signal { signal, .. }) => (None, Some(signal)),
            None => (None, None),
        };
        stmt.execute(params![
            env.collector_id,
            stream_to_sql(env.stream_id),
            self.seq,
            event.kind.as_str(),
            event.snapshot,
            self.changes,
            clamp_i64(event.observed_unix_ms),
            p.pid,
            p.ppid,
            clamp_i64(p.start_time),
            p.started_unix.ok().map(clamp_i64),
            p.name,
            self.exe,
            d.exe_deleted.ok(),
            self.argv,
            self.argv_truncated,
            self.cwd,
            uid,
            euid,
            gid,
            egid,
            d.user.as_ref().ok(),
            self.state,
            clamp_i64(p.rss_bytes),
            self.sha256,
            self.record,
            event.source.as_str(),
            exit_code,
            exit_signal,
            event.late.is_some(),
            event.late.map(|w| clamp_i64(w.after_unix_ms)),
            event.late.map(|w| clamp_i64(w.before_unix_ms)),
        ])
    }
}

/// The `state` column's value.
pub(super) fn state_name(state: ProcessState) -> String {
    match state {
        ProcessState::Running => "running".to_owned(),
        ProcessState::Sleeping => "sleeping".to_owned(),
        ProcessState::DiskSleep => "disk_sleep".to_owned(),
        ProcessState::Stopped => "stopped".to_owned(),
        ProcessState::Traced => "traced".to_owned(),
        ProcessState::Zombie => "zombie".to_owned(),
        ProcessState::Dead => "dead".to_owned(),
        ProcessState::Idle => "idle".to_owned(),
        ProcessState::Other(letter) => format!("other:{letter}"),
        _ => "unknown".to_owned(),
    }
}
