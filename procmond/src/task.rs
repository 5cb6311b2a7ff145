//! Tasks from the agent: the service thread (`procmond-tasks`, in
//! `task/service.rs`, Unix only like the bus) and what the actor does with
//! each task.
//!
//! The service joins the queue group `TASK_GROUP` (`collectors`) on
//! `control.collector.task.<collector_type>`, so of all the collectors of
//! one type the broker hands each task to exactly one, and subscribes on
//! its own to `control.collector.task.<collector_type>.all`, where the
//! agent asks every collector at once. It decodes the
//! task, hands it to the actor (`ActorMessage::Task`, never blocking: a
//! full inbox is answered "busy" at once) and waits for the answer with a
//! timeout, then replies on the request's inbox with a [`TaskResponse`].
//! An undecodable task is answered `Failed` ("malformed task: …") and the
//! service goes on; a task without a reply inbox cannot be answered and is
//! only counted. One task at a time: the actor serves them one by one
//! anyway, between collection cycles.
//!
//! The actor answers from what it owns ([`execute`]):
//!
//! - `Snapshot`: the last cycle's process list (sanitized, as events carry
//!   it), filtered, by pid. Before the first cycle there is no list: the
//!   answer is `Failed`.
//! - `Inspect`: the last cycle's record of the pid (`NotFound` if it had
//!   none) and the hash of its executable through the hasher.
//! - `Hash`: the path is opened (`NotFound`, `NotPermitted`) only if it
//!   names a regular file: a final symbolic link is refused, not followed
//!   (the answer names its target), and a FIFO, a device or a directory
//!   is refused before it is opened
//!   (`daemoneye_platform::files::open_regular_file`); then the hasher by
//!   the opened file's identity: a file hashed before is answered from the
//!   cache without a read.
//!
//! Hashing for a task follows the hasher's rules (size cap, LRU cache,
//! identity checks), with a fresh time budget per task (the hashing budget
//! of a cycle, `hash.cycle_budget_ms`): a file that does not fit is
//! answered `Failed` with `Deferred` and resumes where it stopped when
//! asked again, so one task never holds the actor for long. Tasks hash
//! whether or not `compute_hashes` is on: they ask for it.
//!
//! Passing failures (busy, no list yet, shutting down) are answered with
//! `retry` set, so the agent asks another member.
//!
//! Leaving: on shutdown the service leaves the group first (so the broker
//! hands new tasks to the other members) and answers the tasks already
//! delivered to it `Failed` ("shutting down").

use std::io::ErrorKind;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use daemoneye_platform::Unavailable;
use daemoneye_platform::files::NotRegularFile;

use crate::hash::Hasher;
use crate::tracker::Tracker;
use daemoneye_contract::control::{
    FileHash, ProcessDetail, ProcessList, ProcessSummary, SnapshotFilter, TaskRequest, TaskResponse,
    TaskResult, TaskStatus,
};
use daemoneye_contract::event::HashOutcome;

// The service talks to the bus, whose transport is Unix only.
#[cfg(unix)]
mod service;
#[cfg(unix)]
pub use service::{TaskService, TaskServiceConfig};

/// How long the service waits for the actor (which answers between
/// cycles).
pub const TASK_ACTOR_TIMEOUT: Duration = Duration::from_secs(5);

/// Task counters, written by the service and read by health reports.
#[derive(Debug, Default)]
pub struct TaskCounters {
    served: AtomicU64,
    failed: AtomicU64,
    latency_us: AtomicU64,
}

impl TaskCounters {
    /// Records an answered task: its status and how long it took from
    /// arrival to reply.
    pub fn answered(&self, status: TaskStatus, latency: Duration) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.latency_us.fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        if status == TaskStatus::Failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a task that could not be answered.
    pub fn unanswerable(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Tasks answered.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Tasks answered `Failed` or not answered at all.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Mean latency of the answered tasks, in microseconds (0 before the
    /// first).
    pub fn avg_latency_us(&self) -> u64 {
        self.latency_us.load(Ordering::Relaxed).checked_div(self.served()).unwrap_or(0)
    }
}

/// What a task may use of the actor's state.
pub(crate) struct TaskContext<'a> {
    /// Named in the answer.
    pub collector_id: &'a str,
    /// The last cycle's processes.
    pub tracker: &'a Tracker,
    /// The hasher and its cache.
    pub hasher: &'a mut Hasher,
    /// When the last cycle ended; `None` before the first.
    pub observed_unix_ms: Option<u64>,
}

/// The answer to a task, from the actor's state (see the module docs).
pub(crate) fn execute(request: TaskRequest, cx: TaskContext<'_>) -> TaskResponse {
    match request {
        TaskRequest::Snapshot(filter) => snapshot(&filter, cx),
        TaskRequest::Inspect { pid } => inspect(pid, cx),
        TaskRequest::Hash { path } => hash(path, cx),
    }
}

const NO_LIST: &str =
    "no process list yet: no collection cycle has completed (collection starts with BeginMonitoring)";

fn snapshot(filter: &SnapshotFilter, cx: TaskContext<'_>) -> TaskResponse {
    if let Err(e) = filter.validate() {
        return TaskResponse::failed(cx.collector_id, format!("invalid filter: {e}"));
    }
    let Some(observed_unix_ms) = cx.observed_unix_ms else {
        return TaskResponse::unavailable(cx.collector_id, NO_LIST);
    };
    let matcher = filter.matcher();
    let mut processes: Vec<ProcessSummary> =
        cx.tracker.records().map(ProcessSummary::of).filter(|p| matcher.matches(p)).collect();
    processes.sort_unstable_by_key(|p| (p.pid, p.start_time));
    TaskResponse::ok(cx.collector_id, TaskResult::Snapshot(ProcessList { observed_unix_ms, processes }))
}

fn inspect(pid: u32, cx: TaskContext<'_>) -> TaskResponse {
    let Some(observed_unix_ms) = cx.observed_unix_ms else {
        return TaskResponse::unavailable(cx.collector_id, NO_LIST);
    };
    let Some(process) = cx.tracker.find(pid) else {
        return TaskResponse::status(
            cx.collector_id,
            TaskStatus::NotFound,
            format!("pid {pid} is not in the process list of the last cycle"),
        );
    };
    // Each task has its own time budget for hashing.
    cx.hasher.start_cycle();
    let d = &process.details;
    let sha256 = cx.hasher.hash(process.pid, &d.exe, &d.exe_file);
    let detail = ProcessDetail { observed_unix_ms, process, sha256 };
    TaskResponse::ok(cx.collector_id, TaskResult::Inspect(Box::new(detail)))
}

fn hash(path: String, cx: TaskContext<'_>) -> TaskResponse {
    let id = cx.collector_id;
    let p = Path::new(&path);
    if !p.is_absolute() {
        return TaskResponse::failed(id, format!("the path must be absolute: {path:?}"));
    }
    // Opened before anything is read about it, never through a final link
    // and only if it is a regular file: a FIFO or a device is refused
    // unopened (Linux), so nothing blocks and no driver runs. Its identity
    // is the opened descriptor's own.
    let file = match daemoneye_platform::files::open_regular_file(p) {
        Ok(file) => file,
        Err(e) => return refused(id, &path, &e),
    };
    let identity = match file.metadata().map(|m| daemoneye_platform::file_identity(&m)) {
        Ok(Ok(identity)) => identity,
        Ok(Err(why)) => return TaskResponse::failed(id, format!("{path}: no file identity ({why})")),
        Err(e) => return TaskResponse::failed(id, format!("{path}: {e}")),
    };
    cx.hasher.start_cycle();
    let outcome = cx.hasher.hash_open(file, &identity);
    let (status, message) = match &outcome {
        HashOutcome::Sha256(_) => (TaskStatus::Ok, None),
        HashOutcome::TooLarge { size, cap } => {
            (TaskStatus::Failed, Some(format!("{path} is {size} bytes, over the hashing cap of {cap} bytes")))
        }
        HashOutcome::Deferred => (
            TaskStatus::Failed,
            Some(format!(
                "hashing {path} did not finish within the time budget; ask again to resume where it stopped"
            )),
        ),
        HashOutcome::Unavailable(Unavailable::NotPermitted) => {
            return TaskResponse::status(id, TaskStatus::NotPermitted, format!("{path}: permission denied"));
        }
        HashOutcome::Unavailable(Unavailable::Vanished) => {
            return TaskResponse::failed(id, format!("{path} changed or vanished while being hashed"));
        }
        HashOutcome::Unavailable(why) => return TaskResponse::failed(id, format!("{path}: {why}")),
    };
    let result = TaskResult::Hash(FileHash { path, size: identity.size, sha256: outcome });
    TaskResponse { collector_id: id.to_owned(), status, message, result: Some(result), retry: false }
}

/// The answer when a hash task's path could not be opened.
fn refused(id: &str, path: &str, e: &std::io::Error) -> TaskResponse {
    let p = Path::new(path);
    let link = NotRegularFile::of(e).map(|n| n.what == "a symbolic link").unwrap_or_else(|| {
        // Where the OS refuses a final link itself (ELOOP; EMLINK on
        // FreeBSD).
        std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
    });
    if link {
        let target = std::fs::read_link(p).map_or_else(|_| "?".to_owned(), |t| t.display().to_string());
        return TaskResponse::failed(
            id,
            format!("{path} is a symbolic link (to {target}), not followed: ask for the file itself"),
        );
    }
    if let Some(n) = NotRegularFile::of(e) {
        // Reading a FIFO or a device could block or never end; opening one
        // runs its driver: refused before either.
        return TaskResponse::failed(id, format!("{path} is {}, not a regular file", n.what));
    }
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::NotADirectory => {
            TaskResponse::status(id, TaskStatus::NotFound, format!("no such file: {path}"))
        }
        ErrorKind::PermissionDenied => {
            TaskResponse::status(id, TaskStatus::NotPermitted, format!("{path}: permission denied"))
        }
        _ => TaskResponse::failed(id, format!("{path}: {e}")),
    }
}
