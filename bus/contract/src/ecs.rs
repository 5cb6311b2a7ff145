//! The JSON shape of everything DaemonEye prints or forwards for a
//! program: `daemoneye-cli events`, `ps` and `inspect --json`, and
//! `procmond --format json`. One mapping, here, so every output names a
//! value the same way.
//!
//! Guarantees, first:
//!
//! - Field names follow the Elastic Common Schema (ECS 8.x) where ECS has
//!   one (`process.pid`, `process.parent.pid`, `process.executable`,
//!   `user.name`, `host.hostname`, `event.action`, `@timestamp`, ...);
//!   DaemonEye's own fields are under `daemoneye.*`.
//! - Documents are **nested objects** (`{"process": {"pid": 1}}`), not
//!   flat dotted keys (`{"process.pid": 1}`): nested is what Elasticsearch
//!   and OpenSearch ingest by default, what Beats and Elastic Defend emit,
//!   and what `jq .process.pid` reads. The only dotted keys are the keys of
//!   `daemoneye.missing`, which name fields.
//! - Values are plain: numbers, strings, booleans, arrays; times are RFC
//!   3339 in UTC with milliseconds (`2024-05-01T12:34:56.789Z`); a hash is
//!   the whole lowercase hex SHA-256. No Rust enum shapes.
//! - Every field a document type lists is always there. A field without a
//!   value is `null`, and when DaemonEye knows why,
//!   `daemoneye.missing["<field>"]` says so with one of [`REASONS`]
//!   (`"process.executable": null` with `"daemoneye": {"missing":
//!   {"process.executable": "not_permitted"}}`). `daemoneye.missing` is
//!   always present (`{}` when nothing is missing).
//! - Ids are strings (`user.id`, `process.user.id`), as ECS types them
//!   (`keyword`).
//! - Text from a process (names, paths, arguments) is carried as it was
//!   collected (sanitized by the collector), JSON-escaped.
//!
//! README.md ("Output", "JSON") lists every field of each document type with
//! its type and when it is `null`; the tests below hold this module to it.

use serde_json::{Map, Value};

use daemoneye_platform::{ExitStatus, Field, ProcessRecord, Unavailable};

use crate::control::{ProcessDetail, ProcessSummary};
use crate::event::{EventEnvelope, EventKind, HashOutcome};
use crate::record::ProcessState;

/// The ECS version the documents follow (`ecs.version`).
pub const ECS_VERSION: &str = "8.11.0";

/// Every value `daemoneye.missing` can give, and what it means.
pub const REASONS: [(&str, &str); 9] = [
    ("not_permitted", "the OS refused the collector (another user's process without the privilege)"),
    ("not_supported", "this OS or backend does not provide it"),
    ("vanished", "the process exited while it was read"),
    ("not_applicable", "it does not exist for this process (a kernel thread's executable or arguments)"),
    ("failed", "an unexpected read error (the collector logged it)"),
    ("not_collected", "left out by configuration (procmond without --enhanced-metadata)"),
    ("not_hashed", "hashing is off, or this event does not recompute the hash (stopped, non-exec modified)"),
    ("too_large", "the executable is larger than the hashing cap"),
    ("deferred", "the hashing time budget ran out; a later cycle or request hashes it"),
];

/// The `daemoneye.missing` name of a platform reason.
pub fn reason(u: Unavailable) -> &'static str {
    match crate::record::Unavailable::from(u) {
        crate::record::Unavailable::NotPermitted => "not_permitted",
        crate::record::Unavailable::NotSupported => "not_supported",
        crate::record::Unavailable::Vanished => "vanished",
        crate::record::Unavailable::NotApplicable => "not_applicable",
        crate::record::Unavailable::Failed => "failed",
        crate::record::Unavailable::NotCollected => "not_collected",
    }
}

/// Unix milliseconds as RFC 3339 in UTC with milliseconds:
/// `2024-05-01T12:34:56.789Z`. Times past the year 9999 are clamped to
/// jiff's last instant (no collector reports them).
pub fn timestamp(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    let t = jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::MAX);
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The scheduler state's lowercase name (`sleeping`, `zombie`; another
/// state: its OS letter).
pub fn state_name(s: daemoneye_platform::ProcessState) -> String {
    match ProcessState::from(s) {
        ProcessState::Running => "running".to_owned(),
        ProcessState::Sleeping => "sleeping".to_owned(),
        ProcessState::DiskSleep => "disk_sleep".to_owned(),
        ProcessState::Stopped => "stopped".to_owned(),
        ProcessState::Traced => "traced".to_owned(),
        ProcessState::Zombie => "zombie".to_owned(),
        ProcessState::Dead => "dead".to_owned(),
        ProcessState::Idle => "idle".to_owned(),
        ProcessState::Other(c) => c.to_string(),
    }
}

/// A document being built: fields set by their dotted names, nested on
/// the way in, and the reasons of the missing ones.
struct Doc {
    root: Map<String, Value>,
    missing: Map<String, Value>,
}

impl Doc {
    fn new() -> Doc {
        let mut doc = Doc { root: Map::new(), missing: Map::new() };
        doc.set("ecs.version", ECS_VERSION);
        doc
    }

    /// Sets `path` (dotted) to `value`, creating the objects above it.
    fn set(&mut self, path: &str, value: impl Into<Value>) {
        let mut parts = path.split('.').peekable();
        let mut map = &mut self.root;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                map.insert(part.to_owned(), value.into());
                return;
            }
            let next = map.entry(part.to_owned()).or_insert_with(|| Value::Object(Map::new()));
            if !next.is_object() {
                *next = Value::Object(Map::new());
            }
            let Value::Object(m) = next else { return };
            map = m;
        }
    }

    /// Sets `path` to the value, or to `null` with its reason.
    fn field<T, V: Into<Value>>(&mut self, path: &str, f: &Field<T>, value: impl FnOnce(&T) -> V) {
        match f {
            Ok(v) => self.set(path, value(v)),
            Err(why) => self.null(path, reason(*why)),
        }
    }

    /// Sets `path` to `null` because of `why`.
    fn null(&mut self, path: &str, why: &str) {
        self.set(path, Value::Null);
        self.missing.insert(path.to_owned(), why.into());
    }

    fn finish(mut self) -> Value {
        let missing = std::mem::take(&mut self.missing);
        self.set("daemoneye.missing", Value::Object(missing));
        Value::Object(self.root)
    }
}

/// Host and ECS event classification every document carries.
fn head(doc: &mut Doc, kind: &str, observed_ms: u64) {
    doc.set("@timestamp", timestamp(observed_ms));
    doc.set("event.created", timestamp(observed_ms));
    doc.set("event.kind", kind);
    doc.set("event.category", vec!["process"]);
    match daemoneye_platform::hostname() {
        Some(h) => doc.set("host.hostname", h),
        None => doc.null("host.hostname", "not_supported"),
    }
}

/// The fields of a whole process record: `process.*`, `user.*`,
/// `daemoneye.process.*`.
fn process_record(doc: &mut Doc, p: &ProcessRecord) {
    let d = &*p.details;
    doc.set("process.pid", p.pid);
    doc.set("process.parent.pid", p.ppid);
    doc.set("process.name", p.name.as_str());
    doc.field("process.executable", &d.exe, |e| e.to_string_lossy().into_owned());
    match &d.argv {
        // A kernel thread (and a zombie) has no command line.
        Ok(a) if a.args.is_empty() => {
            for f in ["process.args", "process.args_count", "process.command_line"] {
                doc.null(f, "not_applicable");
            }
        }
        Ok(a) => {
            doc.set("process.args", a.args.clone());
            doc.set("process.args_count", a.args.len());
            doc.set("process.command_line", a.args.join(" "));
        }
        Err(why) => {
            for f in ["process.args", "process.args_count", "process.command_line"] {
                doc.null(f, reason(*why));
            }
        }
    }
    doc.field("daemoneye.process.args_truncated", &d.argv, |a| a.truncated);
    doc.field("process.start", &p.started_unix, |s| timestamp(s.saturating_mul(1000)));
    doc.field("process.working_directory", &d.cwd, |c| c.to_string_lossy().into_owned());
    doc.field("process.session_leader.pid", &p.session, |s| *s);
    doc.field("process.user.id", &d.credentials, |c| c.euid.to_string());
    doc.field("process.real_user.id", &d.credentials, |c| c.uid.to_string());
    doc.field("process.group.id", &d.credentials, |c| c.egid.to_string());
    doc.field("process.real_group.id", &d.credentials, |c| c.gid.to_string());
    doc.field("user.id", &d.credentials, |c| c.uid.to_string());
    doc.field("user.name", &d.user, |u| u.clone());
    doc.set("daemoneye.process.start_time", p.start_time);
    doc.set("daemoneye.process.state", state_name(p.state));
    doc.field("daemoneye.process.threads", &p.threads, |t| *t);
    doc.set("daemoneye.process.rss_bytes", p.rss_bytes);
    doc.set("daemoneye.process.virtual_bytes", p.virtual_bytes);
    doc.field("daemoneye.process.cpu_time_ms", &p.cpu_time_ms, |t| *t);
    doc.set("daemoneye.process.kernel_thread", p.kernel_thread);
    doc.field("daemoneye.process.exe_deleted", &d.exe_deleted, |x| *x);
    doc.field("daemoneye.process.exe_file", &d.exe_file, |f| {
        serde_json::json!({"device": f.dev, "inode": f.inode, "size": f.size, "mtime": f.mtime, "ctime": f.ctime})
    });
}

/// `process.hash.sha256`, or `null` and why.
fn hash(doc: &mut Doc, h: Option<&HashOutcome>) {
    const PATH: &str = "process.hash.sha256";
    match h {
        Some(HashOutcome::Sha256(hex)) => doc.set(PATH, hex.as_str()),
        Some(HashOutcome::TooLarge { .. }) => doc.null(PATH, "too_large"),
        Some(HashOutcome::Deferred) => doc.null(PATH, "deferred"),
        Some(HashOutcome::Unavailable(why)) => doc.null(PATH, reason(*why)),
        None => doc.null(PATH, "not_hashed"),
    }
}

/// A process event (`events`, `procmond --format json`): `event.kind`
/// `event`. `store_id` is the event's row id in the agent's store, when it
/// was read from there.
pub fn event(env: &EventEnvelope, store_id: Option<i64>) -> Value {
    let e = &env.event;
    let mut doc = Doc::new();
    head(&mut doc, "event", e.observed_unix_ms);
    let ty = match e.kind {
        EventKind::Started => "start",
        EventKind::Stopped => "end",
        EventKind::Modified => "change",
    };
    doc.set("event.type", vec![ty]);
    doc.set("event.action", e.kind.as_str());
    doc.set("event.sequence", env.seq);
    let host = daemoneye_platform::hostname().unwrap_or("-");
    doc.set("event.id", format!("{host}/{}/{}/{}", env.collector_id, env.stream_id, env.seq));
    process_record(&mut doc, &e.process);
    hash(&mut doc, e.sha256.as_ref());
    let (code, signal, core) = match e.exit {
        Some(ExitStatus::Code(c)) => (Value::from(c), Value::Null, Value::Null),
        Some(ExitStatus::Signal { signal, core_dumped }) => {
            (Value::Null, Value::from(signal), Value::from(core_dumped))
        }
        None => (Value::Null, Value::Null, Value::Null),
    };
    doc.set("process.exit_code", code);
    doc.set("daemoneye.exit.signal", signal);
    doc.set("daemoneye.exit.core_dumped", core);
    doc.set("daemoneye.collector_id", env.collector_id.as_str());
    doc.set("daemoneye.stream_id", env.stream_id);
    doc.set("daemoneye.seq", env.seq);
    doc.set("daemoneye.store_id", store_id.map_or(Value::Null, Value::from));
    doc.set("daemoneye.snapshot", e.snapshot);
    doc.set("daemoneye.changes", e.changes.iter().map(|c| c.as_str()).collect::<Vec<_>>());
    doc.set("daemoneye.source", e.source.as_str());
    let late = |t: Option<u64>| t.map_or(Value::Null, |t| Value::from(timestamp(t)));
    doc.set("daemoneye.late.after", late(e.late.map(|w| w.after_unix_ms)));
    doc.set("daemoneye.late.before", late(e.late.map(|w| w.before_unix_ms)));
    doc.finish()
}

/// `inspect PID`: one process in full, `event.kind` `state`, with who
/// served it.
pub fn inspect(d: &ProcessDetail, served_by: Option<&str>) -> Value {
    let mut doc = Doc::new();
    head(&mut doc, "state", d.observed_unix_ms);
    doc.set("event.type", vec!["info"]);
    process_record(&mut doc, &d.process);
    hash(&mut doc, Some(&d.sha256));
    doc.set("daemoneye.collector_id", served_by.map_or(Value::Null, Value::from));
    doc.finish()
}

/// One line of `ps`: a process of a collector's list, `event.kind`
/// `state`. `observed_ms` is when the list was taken; `seen_by` the
/// collectors that listed it.
pub fn ps(p: &ProcessSummary, observed_ms: u64, seen_by: &[&str]) -> Value {
    let mut doc = Doc::new();
    head(&mut doc, "state", observed_ms);
    doc.set("event.type", vec!["info"]);
    doc.set("process.pid", p.pid);
    doc.set("process.parent.pid", p.ppid);
    doc.set("process.name", p.name.as_str());
    doc.field("process.executable", &p.exe, |e| e.clone());
    match &p.command_line {
        Ok(c) if c.is_empty() => doc.null("process.command_line", "not_applicable"),
        other => doc.field("process.command_line", other, |c| c.clone()),
    }
    doc.field("process.start", &p.started_unix, |s| timestamp(s.saturating_mul(1000)));
    doc.field("process.user.id", &p.euid, |u| u.to_string());
    doc.field("process.real_user.id", &p.uid, |u| u.to_string());
    doc.field("user.id", &p.uid, |u| u.to_string());
    doc.field("user.name", &p.user, |u| u.clone());
    doc.set("daemoneye.process.start_time", p.start_time);
    doc.set("daemoneye.process.state", state_name(p.state));
    doc.set("daemoneye.process.kernel_thread", p.kernel_thread);
    doc.set("daemoneye.seen_by", seen_by.to_vec());
    doc.finish()
}

/// `hash PATH`: a file's hash, ECS `file.*`.
pub fn file_hash(path: &str, size: Option<u64>, h: &HashOutcome) -> Value {
    let mut doc = Doc::new();
    doc.set("file.path", path);
    doc.set("file.size", size.map_or(Value::Null, Value::from));
    const PATH: &str = "file.hash.sha256";
    match h {
        HashOutcome::Sha256(hex) => doc.set(PATH, hex.as_str()),
        HashOutcome::TooLarge { .. } => doc.null(PATH, "too_large"),
        HashOutcome::Deferred => doc.null(PATH, "deferred"),
        HashOutcome::Unavailable(why) => doc.null(PATH, reason(*why)),
    }
    doc.finish()
}

/// Reads an event document back ([`event`]'s output, e.g. a line of
/// `procmond --format json`) into the envelope it was made from. Every
/// field of the event is in the document, so this is exact but for a
/// `too_large` hash (read with the executable's size and a cap of 0) and
/// the stream position (not printed: `None`). An error names the field
/// that is missing or of the wrong type.
pub fn parse_event(v: &Value) -> Result<EventEnvelope, String> {
    use std::sync::Arc;

    use daemoneye_platform::{Argv, Credentials, FileIdentity, ProcessDetails};

    use crate::event::{Change, EventSource, LateWindow, ProcessEvent};

    let r = Reader { v };
    let kind = EventKind::parse(r.str("event.action")?).ok_or("event.action: not an event kind")?;
    let changes = r
        .get("daemoneye.changes")?
        .as_array()
        .ok_or("daemoneye.changes: not an array")?
        .iter()
        .map(|c| {
            let all = [
                Change::Exec,
                Change::Credentials,
                Change::Reparent,
                Change::ExeReplaced,
                Change::ExeDeleted,
                Change::CommandLine,
            ];
            all.into_iter().find(|k| Some(k.as_str()) == c.as_str()).ok_or(format!("unknown change {c}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let argv = match r.field("process.args", |a| a.as_array().cloned())? {
        Ok(args) => Ok(Argv {
            args: args
                .iter()
                .map(|a| a.as_str().map(str::to_owned).ok_or("process.args: not text"))
                .collect::<Result<_, _>>()?,
            truncated: r.get("daemoneye.process.args_truncated")?.as_bool().unwrap_or(false),
        }),
        // An empty argv (a kernel thread's) is printed as not applicable.
        Err(Unavailable::NotApplicable) => Ok(Argv { args: Vec::new(), truncated: false }),
        Err(why) => Err(why),
    };
    let id = |path: &str| -> Result<Field<u32>, String> { r.field(path, |x| x.as_str()?.parse().ok()) };
    let credentials = match (
        id("process.real_user.id")?,
        id("process.user.id")?,
        id("process.real_group.id")?,
        id("process.group.id")?,
    ) {
        (Ok(uid), Ok(euid), Ok(gid), Ok(egid)) => Ok(Credentials { uid, euid, gid, egid }),
        (Err(why), ..) => Err(why),
        _ => Err(Unavailable::Failed),
    };
    let exe_file = r.field("daemoneye.process.exe_file", |f| {
        Some(FileIdentity {
            dev: f["device"].as_u64()?,
            inode: f["inode"].as_u64()?,
            size: f["size"].as_u64()?,
            mtime: f["mtime"].as_i64()?,
            ctime: f["ctime"].as_i64()?,
        })
    })?;
    let details = ProcessDetails {
        exe: r.field("process.executable", |x| x.as_str().map(Into::into))?,
        exe_file,
        exe_deleted: r.field("daemoneye.process.exe_deleted", Value::as_bool)?,
        argv,
        cwd: r.field("process.working_directory", |x| x.as_str().map(Into::into))?,
        credentials,
        user: r.field("user.name", |x| x.as_str().map(str::to_owned))?,
    };
    let state = r.str("daemoneye.process.state")?;
    let states = [
        ("running", ProcessState::Running),
        ("sleeping", ProcessState::Sleeping),
        ("disk_sleep", ProcessState::DiskSleep),
        ("stopped", ProcessState::Stopped),
        ("traced", ProcessState::Traced),
        ("zombie", ProcessState::Zombie),
        ("dead", ProcessState::Dead),
        ("idle", ProcessState::Idle),
    ];
    let state = match states.iter().find(|(n, _)| *n == state) {
        Some((_, s)) => *s,
        None => ProcessState::Other(state.chars().next().unwrap_or('?')),
    };
    let process = ProcessRecord {
        pid: r.u32("process.pid")?,
        ppid: r.u32("process.parent.pid")?,
        start_time: r.u64("daemoneye.process.start_time")?,
        started_unix: r.field("process.start", |x| Some(parse_timestamp(x.as_str()?)? / 1000))?,
        name: r.str("process.name")?.to_owned(),
        state: state.into(),
        session: r.field("process.session_leader.pid", |x| u32::try_from(x.as_u64()?).ok())?,
        threads: r.field("daemoneye.process.threads", |x| u32::try_from(x.as_u64()?).ok())?,
        rss_bytes: r.u64("daemoneye.process.rss_bytes")?,
        virtual_bytes: r.u64("daemoneye.process.virtual_bytes")?,
        cpu_time_ms: r.field("daemoneye.process.cpu_time_ms", Value::as_u64)?,
        kernel_thread: r
            .get("daemoneye.process.kernel_thread")?
            .as_bool()
            .ok_or("kernel_thread: not a bool")?,
        details: Arc::new(details),
    };
    let sha256 = match r.get("process.hash.sha256")?.as_str() {
        Some(h) => Some(HashOutcome::Sha256(h.to_owned())),
        None => match r.missing("process.hash.sha256") {
            Some("not_hashed") | None => None,
            Some("deferred") => Some(HashOutcome::Deferred),
            Some("too_large") => Some(HashOutcome::TooLarge {
                size: process.details.exe_file.as_ref().map_or(0, |f| f.size),
                cap: 0,
            }),
            Some(why) => Some(HashOutcome::Unavailable(unavailable(why))),
        },
    };
    let exit = match (r.get("process.exit_code")?.as_i64(), r.get("daemoneye.exit.signal")?.as_u64()) {
        (Some(code), _) => {
            Some(ExitStatus::Code(i32::try_from(code).map_err(|_| "exit_code: out of range")?))
        }
        (None, Some(signal)) => Some(ExitStatus::Signal {
            signal: u32::try_from(signal).map_err(|_| "signal: out of range")?,
            core_dumped: r.get("daemoneye.exit.core_dumped")?.as_bool().unwrap_or(false),
        }),
        (None, None) => None,
    };
    let late = match (r.get("daemoneye.late.after")?.as_str(), r.get("daemoneye.late.before")?.as_str()) {
        (Some(a), Some(b)) => Some(LateWindow {
            after_unix_ms: parse_timestamp(a).ok_or("late.after: not a time")?,
            before_unix_ms: parse_timestamp(b).ok_or("late.before: not a time")?,
        }),
        _ => None,
    };
    let source = match r.str("daemoneye.source")? {
        "kernel" => EventSource::Kernel,
        _ => EventSource::Poll,
    };
    Ok(EventEnvelope {
        collector_id: r.str("daemoneye.collector_id")?.to_owned(),
        stream_id: r.u64("daemoneye.stream_id")?,
        seq: r.u64("daemoneye.seq")?,
        event: ProcessEvent {
            kind,
            snapshot: r.get("daemoneye.snapshot")?.as_bool().unwrap_or(false),
            changes,
            observed_unix_ms: parse_timestamp(r.str("@timestamp")?).ok_or("@timestamp: not a time")?,
            process,
            sha256,
            source,
            late,
            exit,
        },
        position: None,
    })
}

/// RFC 3339 to Unix milliseconds.
fn parse_timestamp(s: &str) -> Option<u64> {
    let t: jiff::Timestamp = s.parse().ok()?;
    u64::try_from(t.as_millisecond()).ok()
}

/// The platform reason of a `daemoneye.missing` name ([`reason`] reversed).
fn unavailable(why: &str) -> Unavailable {
    match why {
        "not_permitted" => Unavailable::NotPermitted,
        "not_supported" => Unavailable::NotSupported,
        "vanished" => Unavailable::Vanished,
        "not_applicable" => Unavailable::NotApplicable,
        "not_collected" => Unavailable::NotCollected,
        _ => Unavailable::Failed,
    }
}

/// Fields of a document by their dotted names.
struct Reader<'a> {
    v: &'a Value,
}

impl Reader<'_> {
    fn get(&self, path: &str) -> Result<&Value, String> {
        let mut at = self.v;
        for part in path.split('.') {
            at = at.get(part).ok_or_else(|| format!("{path}: missing"))?;
        }
        Ok(at)
    }

    fn str(&self, path: &str) -> Result<&str, String> {
        self.get(path)?.as_str().ok_or_else(|| format!("{path}: not text"))
    }

    fn u64(&self, path: &str) -> Result<u64, String> {
        self.get(path)?.as_u64().ok_or_else(|| format!("{path}: not a number"))
    }

    fn u32(&self, path: &str) -> Result<u32, String> {
        u32::try_from(self.u64(path)?).map_err(|_| format!("{path}: out of range"))
    }

    fn missing(&self, path: &str) -> Option<&str> {
        self.v.get("daemoneye")?.get("missing")?.get(path)?.as_str()
    }

    /// The value, or `null` read back as its reason.
    fn field<T>(&self, path: &str, read: impl FnOnce(&Value) -> Option<T>) -> Result<Field<T>, String> {
        let v = self.get(path)?;
        if v.is_null() {
            return Ok(Err(self.missing(path).map_or(Unavailable::Failed, unavailable)));
        }
        read(v).map(Ok).ok_or_else(|| format!("{path}: of the wrong type"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::{Change, EventSource, LateWindow};

    fn env(kind: EventKind) -> EventEnvelope {
        crate::testing::envelope("c1", 7, 42, kind, crate::testing::record(10, 5, "sshd"), 1_714_566_896_789)
    }

    /// Every leaf's dotted path and value.
    fn leaves(v: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) if prefix != "daemoneye.missing" => {
                for (k, v) in m {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    leaves(v, &path, out);
                }
            }
            other => out.push((prefix.to_owned(), other.clone())),
        }
    }

    fn has_no_enum_shapes(v: &Value) {
        let text = v.to_string();
        for shape in
            ["\"Ok\"", "\"Err\"", "\"Sha256\"", "\"Code\"", "\"Signal\"", "NotPermitted", "\"Kernel\""]
        {
            assert!(!text.contains(shape), "{shape} in {text}");
        }
    }

    #[test]
    fn an_event_is_flat_values_under_ecs_names() {
        let mut e = env(EventKind::Stopped);
        e.event.sha256 = Some(HashOutcome::Sha256("ab".repeat(32)));
        e.event.exit = Some(daemoneye_platform::ExitStatus::Code(3));
        e.event.source = EventSource::Kernel;
        let v = event(&e, Some(1234));
        has_no_enum_shapes(&v);
        assert_eq!(v["@timestamp"], "2024-05-01T12:34:56.789Z");
        assert_eq!(v["event"]["created"], "2024-05-01T12:34:56.789Z");
        assert_eq!(v["event"]["kind"], "event");
        assert_eq!(v["event"]["action"], "stopped");
        assert_eq!(v["event"]["type"], serde_json::json!(["end"]));
        assert_eq!(v["event"]["sequence"], 42);
        assert!(v["event"]["id"].as_str().unwrap().ends_with("/c1/7/42"), "{v}");
        assert_eq!(v["process"]["pid"], 10);
        assert_eq!(v["process"]["parent"]["pid"], 1);
        assert_eq!(v["process"]["name"], "sshd");
        assert_eq!(v["process"]["executable"], "/usr/bin/sshd");
        assert_eq!(v["process"]["args"], serde_json::json!(["sshd"]));
        assert_eq!(v["process"]["command_line"], "sshd");
        assert_eq!(v["process"]["start"], "2023-11-14T22:13:25.000Z");
        assert_eq!(v["process"]["hash"]["sha256"], "ab".repeat(32));
        assert_eq!(v["process"]["exit_code"], 3);
        assert_eq!(v["process"]["user"]["id"], "1000");
        assert_eq!(v["user"]["id"], "1000");
        assert_eq!(v["user"]["name"], "user");
        assert_eq!(v["daemoneye"]["store_id"], 1234);
        assert_eq!(v["daemoneye"]["source"], "kernel");
        assert_eq!(v["daemoneye"]["process"]["state"], "sleeping");
        assert_eq!(v["daemoneye"]["missing"], serde_json::json!({}));
        assert_eq!(v["ecs"]["version"], ECS_VERSION);
        // Nested objects only: no key holds a dot (bar the missing map's).
        let mut all = Vec::new();
        leaves(&v, "", &mut all);
        assert!(all.iter().all(|(p, _)| !p.split('.').any(str::is_empty)), "{all:?}");
    }

    #[test]
    fn a_missing_value_is_null_with_its_reason_and_every_field_is_always_there() {
        let mut e = env(EventKind::Modified);
        let mut d = (*e.event.process.details).clone();
        d.exe = Err(Unavailable::NotPermitted);
        d.argv = Err(Unavailable::Vanished);
        d.cwd = Err(Unavailable::NotCollected);
        e.event.process.details = Arc::new(d);
        e.event.changes = vec![Change::Exec, Change::ExeDeleted];
        e.event.late = Some(LateWindow { after_unix_ms: 0, before_unix_ms: 1_000 });
        let v = event(&e, None);
        has_no_enum_shapes(&v);
        assert!(v["process"]["executable"].is_null());
        assert_eq!(v["daemoneye"]["missing"]["process.executable"], "not_permitted");
        for f in ["process.args", "process.args_count", "process.command_line"] {
            assert_eq!(v["daemoneye"]["missing"][f], "vanished", "{f}: {v}");
        }
        assert_eq!(v["daemoneye"]["missing"]["process.working_directory"], "not_collected");
        assert_eq!(v["daemoneye"]["missing"]["process.hash.sha256"], "not_hashed");
        assert_eq!(v["daemoneye"]["changes"], serde_json::json!(["exec", "exe_deleted"]));
        assert_eq!(v["daemoneye"]["late"]["before"], "1970-01-01T00:00:01.000Z");
        assert!(v["daemoneye"]["store_id"].is_null() && v["process"]["exit_code"].is_null());
        // Each null with a reason is named by its path; every reason is documented.
        let known: Vec<&str> = REASONS.iter().map(|(r, _)| *r).collect();
        for (path, why) in v["daemoneye"]["missing"].as_object().unwrap() {
            let mut at = &v;
            for part in path.split('.') {
                at = &at[part];
            }
            assert!(at.is_null(), "{path}");
            assert!(known.contains(&why.as_str().unwrap()), "{why}");
        }
        // The same fields whatever is missing.
        let paths = |v: &Value| {
            let mut all = Vec::new();
            leaves(v, "", &mut all);
            all.into_iter().map(|(p, _)| p).collect::<Vec<_>>()
        };
        assert_eq!(paths(&v), paths(&event(&env(EventKind::Started), Some(1))));
    }

    #[test]
    fn an_event_document_reads_back_into_the_event() {
        let mut events = Vec::new();
        let mut e = env(EventKind::Modified);
        e.event.changes = vec![Change::Exec, Change::Credentials];
        e.event.sha256 = Some(HashOutcome::Sha256("cd".repeat(32)));
        e.event.snapshot = true;
        e.event.late = Some(LateWindow { after_unix_ms: 5, before_unix_ms: 7 });
        events.push(e);
        let mut e = env(EventKind::Stopped);
        e.event.exit = Some(daemoneye_platform::ExitStatus::Signal { signal: 9, core_dumped: true });
        e.event.source = EventSource::Kernel;
        e.event.sha256 = Some(HashOutcome::Unavailable(Unavailable::Vanished));
        let mut d = (*e.event.process.details).clone();
        d.exe = Err(Unavailable::NotPermitted);
        d.exe_file = Err(Unavailable::NotPermitted);
        d.credentials = Err(Unavailable::Vanished);
        d.cwd = Err(Unavailable::NotCollected);
        d.argv = Ok(daemoneye_platform::Argv { args: vec!["a b".into(), String::new()], truncated: true });
        e.event.process.details = Arc::new(d);
        e.event.process.state = daemoneye_platform::ProcessState::Zombie;
        e.event.process.threads = Err(Unavailable::NotSupported);
        events.push(e);
        let mut e = env(EventKind::Stopped);
        e.event.exit = Some(daemoneye_platform::ExitStatus::Code(-1));
        e.event.sha256 = Some(HashOutcome::Deferred);
        let mut d = (*e.event.process.details).clone();
        d.argv = Ok(daemoneye_platform::Argv { args: Vec::new(), truncated: false });
        e.event.process.details = Arc::new(d);
        e.event.process.kernel_thread = true;
        events.push(e);
        for e in events {
            let doc = event(&e, Some(3));
            let back = parse_event(&serde_json::from_str(&doc.to_string()).unwrap());
            assert_eq!(back.as_ref(), Ok(&e), "{doc}");
        }
        let mut doc = event(&env(EventKind::Started), None);
        doc["process"]["pid"] = "ten".into();
        assert_eq!(parse_event(&doc).unwrap_err(), "process.pid: not a number");
        assert!(parse_event(&serde_json::json!({})).is_err());
    }

    #[test]
    fn hash_outcomes_and_states_are_plain() {
        for (h, why) in [
            (HashOutcome::TooLarge { size: 10, cap: 5 }, "too_large"),
            (HashOutcome::Deferred, "deferred"),
            (HashOutcome::Unavailable(Unavailable::NotPermitted), "not_permitted"),
        ] {
            let mut e = env(EventKind::Started);
            e.event.sha256 = Some(h.clone());
            let v = event(&e, None);
            assert!(v["process"]["hash"]["sha256"].is_null());
            assert_eq!(v["daemoneye"]["missing"]["process.hash.sha256"], why);
            let f = file_hash("/x", None, &h);
            assert_eq!(f["daemoneye"]["missing"]["file.hash.sha256"], why);
        }
        let killed = {
            let mut e = env(EventKind::Stopped);
            e.event.exit = Some(daemoneye_platform::ExitStatus::Signal { signal: 9, core_dumped: true });
            event(&e, None)
        };
        assert_eq!(
            (killed["daemoneye"]["exit"]["signal"].as_u64(), killed["process"]["exit_code"].is_null()),
            (Some(9), true)
        );
        assert_eq!(state_name(daemoneye_platform::ProcessState::Other('W')), "W");
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert!(timestamp(u64::MAX).starts_with("9999-12-"), "{}", timestamp(u64::MAX));
    }

    #[test]
    fn ps_and_inspect_use_the_same_names() {
        let r = crate::testing::record(10, 5, "sshd");
        let mut s = ProcessSummary::of(&r);
        s.exe = Err(Unavailable::NotPermitted);
        let v = ps(&s, 1_000, &["pm-a", "pm-b"]);
        has_no_enum_shapes(&v);
        assert_eq!((v["process"]["pid"].as_u64(), v["process"]["name"].as_str()), (Some(10), Some("sshd")));
        assert_eq!(v["event"]["kind"], "state");
        assert_eq!(v["daemoneye"]["missing"]["process.executable"], "not_permitted");
        assert_eq!(v["daemoneye"]["seen_by"], serde_json::json!(["pm-a", "pm-b"]));
        assert_eq!(v["user"]["name"], "user");
        let d = ProcessDetail { observed_unix_ms: 1_000, process: r, sha256: HashOutcome::Deferred };
        let v = inspect(&d, Some("pm-a"));
        has_no_enum_shapes(&v);
        assert_eq!(v["process"]["executable"], "/usr/bin/sshd");
        assert_eq!(v["daemoneye"]["missing"]["process.hash.sha256"], "deferred");
        assert_eq!(v["daemoneye"]["collector_id"], "pm-a");
    }
}
