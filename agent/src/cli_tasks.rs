//! `daemoneye-cli ps`, `inspect` and `hash`: the requests to the agent's
//! task coordinator (topic `agent.task`) and what is printed of the
//! answers. Kept apart from the binary so the rendering is tested.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use daemoneye_bus::{Client, ClientError};
use daemoneye_contract::control::{ProcessDetail, ProcessSummary, TaskResult, TaskStatus};
use daemoneye_contract::event::HashOutcome;
use daemoneye_contract::render::printable;

use crate::api::{
    self, AgentTaskRequest, AgentTaskResponse, CollectorAnswer, GatherOutcome, TASK_TOPIC, TASKS_CLIENT_ID,
    TaskOutcome,
};
use crate::cli::CliError;
use crate::cli_output::{Table, format_utc};
use crate::config::TasksSpec;

/// How long the CLI waits beyond the agent's own limits for an answer.
const MARGIN: Duration = Duration::from_secs(3);

/// How long the CLI waits for the agent's answer to `req`: the agent's
/// deadline (or gather window) as agent.yaml sets it, plus a margin.
pub fn answer_timeout(req: &AgentTaskRequest, tasks: &TasksSpec) -> Duration {
    let ms = match req {
        AgentTaskRequest::One { .. } => tasks.deadline_ms,
        AgentTaskRequest::All { .. } => tasks.gather_timeout_ms,
    };
    Duration::from_millis(ms) + MARGIN
}

/// Sends a task request to the agent and waits for its answer.
pub fn ask(
    client: &Client,
    req: &AgentTaskRequest,
    timeout: Duration,
) -> Result<AgentTaskResponse, CliError> {
    let reply = client.request(TASK_TOPIC, &api::encode(req), timeout).map_err(|e| match e {
        ClientError::Timeout(_) => CliError::NoTaskAnswer(timeout),
        ClientError::ResponderGone { .. } => CliError::AgentLeft,
        ClientError::NoResponders { .. } => CliError::NoTaskService,
        other => CliError::Bus(other),
    })?;
    // The broker vouches for the sender: only the agent's coordinator
    // speaks for the agent.
    if reply.from != TASKS_CLIENT_ID {
        return Err(CliError::BadReply(format!("answered by {:?}, not the agent", reply.from)));
    }
    api::decode(&reply.payload).map_err(|e| CliError::BadReply(e.to_string()))
}

/// The final answer of a one-collector task, or why there is none: no
/// collector served it (attempts listed), the agent refused it, or the
/// collector said not found / not permitted / failed.
pub fn served(resp: AgentTaskResponse) -> Result<(TaskOutcome, TaskResult), CliError> {
    let outcome = match resp {
        AgentTaskResponse::One(o) => o,
        AgentTaskResponse::Refused(why) => return Err(CliError::TaskRefused(why)),
        AgentTaskResponse::All(_) => {
            return Err(CliError::BadReply("a gathered answer to a single task".into()));
        }
    };
    let Some(r) = outcome.response.clone() else {
        let tried: Vec<String> = outcome
            .attempts
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let who = a.collector.as_deref().unwrap_or("-");
                format!("  attempt {}: {who}: {} ({} ms)", i + 1, printable(&a.outcome), a.elapsed_ms)
            })
            .collect();
        let why = outcome.error.clone().unwrap_or_else(|| "no collector served the task".into());
        return Err(CliError::NoCollector(format!("{why}\n{}", tried.join("\n"))));
    };
    let by = format!("collector {}", r.collector_id);
    // The message may quote a hostile path or name.
    let message = printable(r.message.as_deref().unwrap_or_default()).into_owned();
    match (r.status, r.result) {
        (TaskStatus::Ok, Some(result)) => Ok((outcome, result)),
        (TaskStatus::NotFound, _) => Err(CliError::TaskNotFound(format!("{message} ({by})"))),
        (TaskStatus::NotPermitted, _) => Err(CliError::TaskNotPermitted(format!("{message} ({by})"))),
        (_, _) => Err(CliError::TaskFailed(format!("{message} ({by})"))),
    }
}

/// The `ps` table's headers.
pub const PS_HEADERS: [&str; 8] =
    ["PID", "PPID", "USER", "STATE", "STARTED (UTC)", "NAME", "SEEN BY", "COMMAND"];

fn field<T: ToString>(f: &Result<T, daemoneye_platform::Unavailable>) -> String {
    match f {
        Ok(v) => v.to_string(),
        Err(_) => "-".to_owned(),
    }
}

fn user(p: &ProcessSummary) -> String {
    match (&p.user, &p.uid) {
        (Ok(name), _) => name.clone(),
        (Err(_), Ok(uid)) => uid.to_string(),
        _ => "-".to_owned(),
    }
}

fn command(p: &ProcessSummary) -> String {
    match &p.command_line {
        Ok(c) if !c.is_empty() => c.clone(),
        // Kernel threads and zombies have no command line.
        _ => format!("[{}]", p.name),
    }
}

/// Who listed a process, by collector id.
fn seen_by(g: &GatherOutcome, idx: &[u16]) -> String {
    let mut ids: Vec<&str> =
        idx.iter().filter_map(|&i| g.answered.get(usize::from(i)).map(|a| a.collector_id.as_str())).collect();
    ids.sort_unstable();
    ids.join(",")
}

/// `ps` as a table, by pid.
pub fn render_ps_table(g: &GatherOutcome) -> String {
    let rows: Vec<Vec<String>> = g
        .processes
        .iter()
        .map(|m| {
            let p = &m.process;
            vec![
                p.pid.to_string(),
                p.ppid.to_string(),
                user(p),
                format!("{:?}", p.state).to_lowercase(),
                p.started_unix.as_ref().map_or("-".to_owned(), |s| format_utc(s * 1000)),
                p.name.clone(),
                seen_by(g, &m.seen_by),
                command(p),
            ]
        })
        .collect();
    Table::render(&PS_HEADERS, &rows)
}

/// `ps --json`: one document per process ([`daemoneye_contract::ecs::ps`]),
/// by pid. Its time is when the first collector that listed it took its
/// list (`now_ms` if none said).
pub fn ps_json(g: &GatherOutcome, now_ms: u64) -> Vec<serde_json::Value> {
    g.processes
        .iter()
        .map(|m| {
            let by: Vec<&CollectorAnswer> =
                m.seen_by.iter().filter_map(|&i| g.answered.get(usize::from(i))).collect();
            let observed = by.iter().find_map(|a| a.observed_unix_ms).unwrap_or(now_ms);
            let mut ids: Vec<&str> = by.iter().map(|a| a.collector_id.as_str()).collect();
            ids.sort_unstable();
            daemoneye_contract::ecs::ps(&m.process, observed, &ids)
        })
        .collect()
}

/// `ps --tree`: each process under its parent, children by pid. A process
/// whose parent is not in the list (pid 1, kernel threads' parent 0, or a
/// parent filtered out) starts a tree of its own.
pub fn render_ps_tree(g: &GatherOutcome) -> String {
    let procs: Vec<&ProcessSummary> = g.processes.iter().map(|m| &m.process).collect();
    let pids: HashSet<u32> = procs.iter().map(|p| p.pid).collect();
    let mut children: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut roots = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        if p.ppid != p.pid && pids.contains(&p.ppid) {
            children.entry(p.ppid).or_default().push(i);
        } else {
            roots.push(i);
        }
    }
    for c in children.values_mut() {
        c.sort_by_key(|&i| procs[i].pid);
    }
    let mut out = String::new();
    let mut printed = vec![false; procs.len()];
    // Depth first, without recursion: (index, prefix for its children,
    // the prefix of its own line).
    let walk = |root: usize, out: &mut String, printed: &mut Vec<bool>| {
        let mut stack = vec![(root, String::new(), String::new())];
        while let Some((i, own, below)) = stack.pop() {
            if printed[i] {
                continue;
            }
            printed[i] = true;
            let p = procs[i];
            out.push_str(&format!(
                "{own}{} {} ({}) {}\n",
                p.pid,
                printable(&p.name),
                printable(&user(p)),
                printable(&command(p))
            ));
            let kids = children.get(&p.pid).map(Vec::as_slice).unwrap_or(&[]);
            for (k, &c) in kids.iter().enumerate().rev() {
                let last = k + 1 == kids.len();
                let (branch, cont) = if last { ("└─ ", "   ") } else { ("├─ ", "│  ") };
                stack.push((c, format!("{below}{branch}"), format!("{below}{cont}")));
            }
        }
    };
    for r in roots {
        walk(r, &mut out, &mut printed);
    }
    // A parent loop (pid reuse between reads) has no root: print it anyway.
    for i in 0..procs.len() {
        if !printed[i] {
            walk(i, &mut out, &mut printed);
        }
    }
    out
}

/// Lines for stderr about what a gathered answer lacks.
pub fn gather_warnings(g: &GatherOutcome) -> Vec<String> {
    g.missing
        .iter()
        .map(|m| {
            format!("warning: partial result: collector {} missing: {}", m.collector_id, printable(&m.reason))
        })
        .collect()
}

fn hash_text(h: &HashOutcome) -> String {
    match h {
        HashOutcome::Sha256(hex) => hex.clone(),
        HashOutcome::TooLarge { size, cap } => format!("not hashed: {size} bytes, over the cap of {cap}"),
        HashOutcome::Deferred => "not hashed yet: time budget ran out, ask again".to_owned(),
        HashOutcome::Unavailable(why) => format!("unavailable: {why}"),
    }
}

/// `inspect PID` for people: one `key: value` per line.
pub fn render_inspect(d: &ProcessDetail, o: &TaskOutcome) -> String {
    let p = &d.process;
    let x = &p.details;
    let path = |f: &Result<std::path::PathBuf, daemoneye_platform::Unavailable>| match f {
        Ok(p) => p.display().to_string(),
        Err(why) => format!("({why})"),
    };
    let creds = match &x.credentials {
        Ok(c) => format!("uid {} euid {} gid {} egid {}", c.uid, c.euid, c.gid, c.egid),
        Err(why) => format!("({why})"),
    };
    let argv = match &x.argv {
        Ok(a) => format!("{}{}", a.args.join(" "), if a.truncated { " …" } else { "" }),
        Err(why) => format!("({why})"),
    };
    let rows = [
        ("pid", p.pid.to_string()),
        ("ppid", p.ppid.to_string()),
        ("name", p.name.clone()),
        ("state", format!("{:?}", p.state).to_lowercase()),
        ("started (UTC)", p.started_unix.as_ref().map_or("-".to_owned(), |s| format_utc(s * 1000))),
        ("user", x.user.clone().unwrap_or_else(|why| format!("({why})"))),
        ("credentials", creds),
        ("exe", path(&x.exe)),
        ("exe deleted", field(&x.exe_deleted)),
        ("sha256", hash_text(&d.sha256)),
        ("command line", argv),
        ("cwd", path(&x.cwd)),
        ("session", field(&p.session)),
        ("threads", field(&p.threads)),
        ("rss", format!("{} KiB", p.rss_bytes / 1024)),
        ("cpu time", p.cpu_time_ms.as_ref().map_or("-".to_owned(), |ms| format!("{ms} ms"))),
        ("kernel thread", p.kernel_thread.to_string()),
        ("observed (UTC)", format_utc(d.observed_unix_ms)),
        ("served by", served_line(o)),
    ];
    rows.iter().map(|(k, v)| format!("{k:<14} {}\n", printable(v))).collect()
}

/// "pm-b (2 attempts, 14 ms)".
pub fn served_line(o: &TaskOutcome) -> String {
    let n = o.attempts.len();
    let s = if n == 1 { "" } else { "s" };
    format!("{} ({n} attempt{s}, {} ms)", o.served_by.as_deref().unwrap_or("-"), o.elapsed_ms)
}

/// `hash PATH` for people: `sha256sum`'s format.
pub fn render_hash(path: &str, h: &HashOutcome) -> String {
    format!("{}  {}\n", printable(&hash_text(h)), printable(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MergedProcess, MissingCollector};
    use daemoneye_platform::{ProcessState, Unavailable};

    fn p(pid: u32, ppid: u32, name: &str) -> MergedProcess {
        MergedProcess {
            process: ProcessSummary {
                pid,
                start_time: u64::from(pid) * 10,
                ppid,
                started_unix: Ok(1_700_000_000),
                name: name.to_owned(),
                state: ProcessState::Sleeping,
                user: Ok("alice".to_owned()),
                uid: Ok(1000),
                euid: Ok(1000),
                exe: Err(Unavailable::NotPermitted),
                command_line: if name == "kworker" { Ok(String::new()) } else { Ok(format!("{name} --x")) },
                kernel_thread: name == "kworker",
            },
            seen_by: vec![1, 0],
        }
    }

    fn outcome(processes: Vec<MergedProcess>) -> GatherOutcome {
        let answer = |id: &str| CollectorAnswer {
            collector_id: id.to_owned(),
            status: TaskStatus::Ok,
            message: None,
            processes: 0,
            observed_unix_ms: Some(1),
            latency_ms: 1,
        };
        GatherOutcome {
            processes,
            answered: vec![answer("pm-b"), answer("pm-a")],
            missing: vec![MissingCollector {
                collector_id: "pm-c".into(),
                reason: "no answer within 3 ms".into(),
            }],
            elapsed_ms: 3,
        }
    }

    #[test]
    fn the_tree_nests_children_under_parents_and_survives_loops() {
        // 1 → {5 → 9, 7}; 2 (parent 0); 20 ↔ 21 (a parent loop); 30's parent
        // is not listed.
        let g = outcome(vec![
            p(1, 0, "init"),
            p(2, 0, "kworker"),
            p(5, 1, "sshd"),
            p(7, 1, "cron"),
            p(9, 5, "bash"),
            p(20, 21, "a"),
            p(21, 20, "b"),
            p(30, 29, "orphan"),
        ]);
        let tree = render_ps_tree(&g);
        let expected = "\
1 init (alice) init --x
├─ 5 sshd (alice) sshd --x
│  └─ 9 bash (alice) bash --x
└─ 7 cron (alice) cron --x
2 kworker (alice) [kworker]
30 orphan (alice) orphan --x
20 a (alice) a --x
└─ 21 b (alice) b --x
";
        assert_eq!(tree, expected);
    }

    #[test]
    fn the_table_names_who_saw_each_process_and_warnings_name_the_missing() {
        let g = outcome(vec![p(1, 0, "init")]);
        let table = render_ps_table(&g);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("PID") && lines[0].contains("SEEN BY"), "{table}");
        assert!(lines[1].contains("pm-a,pm-b") && lines[1].contains("2023-11-14"), "{table}");
        assert_eq!(
            gather_warnings(&g),
            ["warning: partial result: collector pm-c missing: no answer within 3 ms"]
        );
    }

    #[test]
    fn ps_json_is_one_ecs_document_per_process() {
        let g = outcome(vec![p(1, 0, "init"), p(2, 0, "kworker")]);
        let docs = ps_json(&g, 99);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["process"]["pid"], 1);
        assert_eq!(docs[0]["@timestamp"], "1970-01-01T00:00:00.001Z");
        assert_eq!(docs[0]["daemoneye"]["seen_by"], serde_json::json!(["pm-a", "pm-b"]));
        assert_eq!(docs[0]["daemoneye"]["missing"]["process.executable"], "not_permitted");
        assert_eq!(docs[1]["daemoneye"]["missing"]["process.command_line"], "not_applicable");
        assert!(!serde_json::Value::Array(docs).to_string().contains("\"Ok\""));
    }

    #[test]
    fn hostile_names_and_command_lines_stay_on_their_line_and_send_no_escapes() {
        let mut evil = p(5, 1, "x\ny");
        evil.process.command_line = Ok("sh -c \"a\n9 fake (root) line\u{1b}[2J\u{202e}\"".into());
        let g = outcome(vec![p(1, 0, "init"), evil]);
        for text in [render_ps_tree(&g), render_ps_table(&g)] {
            assert_eq!(
                text.trim_end().lines().count(),
                if text.starts_with("PID") { 3 } else { 2 },
                "{text}"
            );
            assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}'), "{text}");
            assert!(
                text.contains("x\\ny") && text.contains("a\\n9 fake (root) line\\u{1b}[2J\\u{202e}"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_task_without_an_answer_lists_its_attempts() {
        let o = TaskOutcome {
            response: None,
            served_by: None,
            attempts: vec![
                crate::api::Attempt {
                    collector: Some("pm-b".into()),
                    outcome: "disconnected before answering".into(),
                    elapsed_ms: 3,
                },
                crate::api::Attempt {
                    collector: None,
                    outcome: "no answer within 2000 ms".into(),
                    elapsed_ms: 2000,
                },
            ],
            elapsed_ms: 2003,
            error: Some("no collector of type process-monitor served the task".into()),
        };
        let e = served(AgentTaskResponse::One(o)).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("no collector of type process-monitor served the task\n"), "{text}");
        assert!(text.contains("  attempt 1: pm-b: disconnected before answering (3 ms)"), "{text}");
        assert!(text.contains("  attempt 2: -: no answer within 2000 ms (2000 ms)"), "{text}");
        assert_eq!(e.exit_code(), 1);
        let refused = served(AgentTaskResponse::Refused("malformed task request: x".into())).unwrap_err();
        assert_eq!(refused.to_string(), "the agent refused the task: malformed task request: x");
    }
}
