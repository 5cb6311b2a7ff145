//! daemoneye-cli, the operator's tool: asks the running agent for its
//! status over the bus, for the live process list, one process in detail
//! or a file's hash (tasks the agent hands to its collectors), reads events
//! and alerts from the agent's SQLite store (read-only), follows new ones
//! live on the bus, and lists and validates the detection rules of
//! agent.yaml.
//!
//! SIGINT and SIGTERM keep their default action (the process ends): the
//! CLI holds nothing that needs a clean shutdown, the store is opened
//! read-only.
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use crossbeam_channel::{select, tick};
use daemoneye_agent::api::{
    self, ALERT_TOPIC, AgentTaskRequest, AgentTaskResponse, Alert, STORE_CLIENT_ID, now_unix_ms,
};
use daemoneye_agent::cli::{self, CliError, SeenStreams};
use daemoneye_agent::cli_output::{self, Table};
use daemoneye_agent::cli_tasks;
use daemoneye_agent::config::{AgentConfig, Severity};
use daemoneye_agent::rules::{self, AlertQuery};
use daemoneye_bus::{Client, ConnectionState, Message, Overflow, Subscription};
use daemoneye_contract::control::{SnapshotFilter, TaskRequest, TaskResult, TaskStatus};
use daemoneye_contract::ecs;
use daemoneye_contract::event::{EVENTS_PATTERN, EventEnvelope, EventKind, GAP_TOPIC};
use daemoneye_contract::render::{self, TimeZone, printable};
use daemoneye_store::EventQuery;

/// DaemonEye's command-line tool.
///
/// Talks to the running daemoneye-agent: its status over the agent's bus
/// socket, stored events and alerts straight from its SQLite database
/// (read-only), and new ones live with --follow.
///
/// The socket and the database are found like the agent finds them: from
/// agent.yaml (--config; without it the agent's embedded default), with
/// --data-dir and --socket overriding it. Run it as the agent's user (or
/// root): the socket and the database are private to that user.
#[derive(Parser, Debug)]
#[command(name = "daemoneye-cli", version, about, long_about, after_help = AFTER_HELP)]
struct Cli {
    /// The agent's configuration [default: the agent's embedded default].
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent's bus socket [default: broker_socket from agent.yaml, else
    /// <data dir>/run/broker.sock].
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The agent's data dir, holding events.db [default: data_dir from
    /// agent.yaml, else /var/lib/daemoneye if writable, else
    /// ~/.local/share/daemoneye].
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Machine output: one JSON object per line, in Elastic Common Schema
    /// names for events and processes (README.md, "JSON").
    #[arg(long, global = true, help_heading = GLOBAL)]
    json: bool,
    /// Log level on stderr: error, warn, info, debug, trace or off.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        value_name = "LEVEL",
        default_value = "warn",
        value_parser = parse_level
    )]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

/// The heading of the options every command takes.
const GLOBAL: &str = "Global options";

const AFTER_HELP: &str = "\
Examples:
  daemoneye-cli status                        the agent, its collectors, bus and store
  daemoneye-cli ps --tree --user www-data     live processes, from every collector
  daemoneye-cli inspect 4242                  one process in full, with its exe's hash
  daemoneye-cli hash /usr/bin/sudo            SHA-256 through a collector's hash cache
  daemoneye-cli events --since 10m --name sshd
  daemoneye-cli events --follow --kind started
  daemoneye-cli alerts --severity high --since 1d
  daemoneye-cli rules validate --config /etc/daemoneye/agent.yaml
  daemoneye-cli --data-dir /tmp/de status --json | jq .collectors

Exit status: 0 on success; 1 on errors (bad configuration, unreadable store,
a rule that does not validate, no collector could serve a task, a process
or file not found); 2 on bad usage and when the agent cannot be reached (no
socket, connection refused, permission denied, no answer).";

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the agent's state, its collectors, and the bus and store
    /// counters.
    ///
    /// Connects to the agent's bus socket as `cli-<pid>` and asks for its
    /// status (topic agent.status), waiting at most 3 s.
    #[command(after_help = STATUS_HELP)]
    Status,
    /// List stored process events, and follow new ones.
    ///
    /// Prints the newest --limit events matching every filter given,
    /// oldest first, in procmond --foreground's format (or its JSON lines
    /// with --json).
    #[command(after_help = EVENTS_HELP)]
    Events(EventsArgs),
    /// List alerts raised by the detection rules, and follow new ones.
    ///
    /// Prints the newest --limit alerts matching every filter given,
    /// oldest first: a table, or one JSON object per line with --json.
    #[command(after_help = ALERTS_HELP)]
    Alerts(AlertsArgs),
    /// List or validate the detection rules of the configuration.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// The live process list, from every collector, merged.
    ///
    /// The agent asks every registered collector of the type for its
    /// current list (the last collection cycle's) and merges them by
    /// process identity (pid and start time). A collector that did not
    /// answer is named on stderr ("partial result"); the list still prints.
    #[command(after_help = PS_HELP)]
    Ps(PsArgs),
    /// One process in full detail, with the SHA-256 of its executable.
    ///
    /// One collector serves it (load balanced; another is tried if it
    /// fails to answer).
    #[command(after_help = "Examples:\n  daemoneye-cli inspect 1\n  daemoneye-cli inspect 4242 --json")]
    Inspect {
        /// The process id.
        pid: u32,
        /// The collector type that serves it.
        #[arg(long = "type", value_name = "TYPE", default_value = daemoneye_contract::ids::COLLECTOR_TYPE)]
        collector_type: String,
    },
    /// The SHA-256 of a file, through a collector's hash cache.
    ///
    /// Read by the collector, with its privileges; a relative path is taken
    /// from the current directory. Prints `sha256sum`'s format.
    #[command(
        after_help = "Examples:\n  daemoneye-cli hash /usr/sbin/sshd\n  daemoneye-cli hash ./a.out --json"
    )]
    Hash {
        /// The file.
        path: PathBuf,
        /// The collector type that serves it.
        #[arg(long = "type", value_name = "TYPE", default_value = daemoneye_contract::ids::COLLECTOR_TYPE)]
        collector_type: String,
    },
}

const PS_HELP: &str = "\
Examples:
  daemoneye-cli ps
  daemoneye-cli ps --tree
  daemoneye-cli ps --user root --name 'ssh*'
  daemoneye-cli ps --json | jq -s length

SEEN BY lists the collectors that reported the process. With --tree a
process whose parent is not listed (filtered out, or pid 0) starts its own
tree. --json prints one document per process and line (NDJSON). Exit
status 0 also for a partial result; the collectors that gave no list, and
why, are named on stderr.";

#[derive(Args, Debug)]
struct PsArgs {
    /// Show processes as a tree under their parents.
    #[arg(long)]
    tree: bool,
    /// Only this user's processes (real user, by name or uid).
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Only processes whose name or executable's file name matches this
    /// glob (`*` and `?`).
    #[arg(long, value_name = "PATTERN")]
    name: Option<String>,
    /// The collector type to ask.
    #[arg(long = "type", value_name = "TYPE", default_value = daemoneye_contract::ids::COLLECTOR_TYPE)]
    collector_type: String,
}

const STATUS_HELP: &str = "\
Examples:
  daemoneye-cli status
  daemoneye-cli status --json

Columns: LAST HEARTBEAT is its age and the collector's own health; MISSED
counts heartbeats missed in a row; LAST ESCALATION is the last step taken
after missed heartbeats (health_check, graceful_shutdown, kill, restart).";

const EVENTS_HELP: &str = "\
Examples:
  daemoneye-cli events                        the last 50 events
  daemoneye-cli events --since 2h --pid 4242
  daemoneye-cli events --kind stopped --limit 0   every stopped process stored
  daemoneye-cli events --follow --name 'ba*' --json

Each line starts with when the event was seen, in local time (TZ, else
/etc/localtime), then #<id> (its id in the store); seq=<n> is its number
in its collector's stream, and argv=... comes last, one shell word per
argument.

--follow prints the events stored so far, then every new event that passes
the same filters, as collectors publish it. If the agent is not up yet, or
goes away, it says so on stderr and waits for it (collectors replay what
the agent missed; what was stored meanwhile is printed when it is back).
It runs until interrupted (Ctrl-C).";

const ALERTS_HELP: &str = "\
Examples:
  daemoneye-cli alerts
  daemoneye-cli alerts --severity high --since 1d
  daemoneye-cli alerts --rule exe-in-temp-dir --follow";

#[derive(Args, Debug)]
struct EventsArgs {
    /// Only events observed within this long: a number and a unit, s, m, h, d
    /// or w (30s, 10m, 2h, 1d).
    #[arg(long, value_name = "DURATION", value_parser = cli::parse_duration)]
    since: Option<Duration>,
    /// Only this process id.
    #[arg(long, value_name = "N")]
    pid: Option<u32>,
    /// Only processes whose name or executable's file name matches this
    /// glob (`*` and `?`), as `ps --name`.
    #[arg(long, value_name = "PATTERN")]
    name: Option<String>,
    /// Only this kind of event.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
    /// Only events from this collector id.
    #[arg(long, value_name = "ID")]
    collector: Option<String>,
    /// Show the newest N stored events (0: all of them).
    #[arg(long, value_name = "N", default_value_t = 50)]
    limit: usize,
    /// Keep printing new events as they arrive, until interrupted.
    #[arg(long, short)]
    follow: bool,
}

#[derive(Args, Debug)]
struct AlertsArgs {
    /// Only alerts raised within this long: a number and a unit, s, m, h, d
    /// or w (30s, 10m, 2h, 1d).
    #[arg(long, value_name = "DURATION", value_parser = cli::parse_duration)]
    since: Option<Duration>,
    /// Only alerts of this rule.
    #[arg(long, value_name = "NAME")]
    rule: Option<String>,
    /// Only alerts at least this severe.
    #[arg(long, value_enum, value_name = "LEVEL")]
    severity: Option<SeverityArg>,
    /// Show the newest N stored alerts (0: all of them).
    #[arg(long, value_name = "N", default_value_t = 50)]
    limit: usize,
    /// Keep printing new alerts as they are raised, until interrupted.
    #[arg(long, short)]
    follow: bool,
}

#[derive(Subcommand, Debug)]
enum RulesCommand {
    /// List every rule: built-in and from agent.yaml, enabled or not.
    #[command(after_help = "Examples:\n  daemoneye-cli rules list\n  daemoneye-cli rules list --json")]
    List,
    /// Check every active rule's SQL against the store's schema.
    ///
    /// Prints OK or ERROR (with the reason) per rule the agent would run;
    /// exits 1 if any rule fails.
    #[command(after_help = "Examples:\n  daemoneye-cli rules validate --config /etc/daemoneye/agent.yaml")]
    Validate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KindArg {
    /// A process appeared.
    Started,
    /// A process exited.
    Stopped,
    /// A process changed (exec, credentials, parent, executable).
    Modified,
}

impl From<KindArg> for EventKind {
    fn from(k: KindArg) -> EventKind {
        match k {
            KindArg::Started => EventKind::Started,
            KindArg::Stopped => EventKind::Stopped,
            KindArg::Modified => EventKind::Modified,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SeverityArg {
    /// Low and above (every alert).
    Low,
    /// Medium and above.
    Medium,
    /// High and critical.
    High,
    /// Critical only.
    Critical,
}

impl From<SeverityArg> for Severity {
    fn from(s: SeverityArg) -> Severity {
        match s {
            SeverityArg::Low => Severity::Low,
            SeverityArg::Medium => Severity::Medium,
            SeverityArg::High => Severity::High,
            SeverityArg::Critical => Severity::Critical,
        }
    }
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse().map_err(|_| format!("{s:?} is not one of error, warn, info, debug, trace, off"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // `daemoneye-cli events | head`: a closed stdout is the reader's
            // choice, not a failure.
            if e.chain()
                .any(|c| c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("daemoneye-cli: {e:#}");
            let code = e.chain().find_map(|c| c.downcast_ref::<CliError>()).map_or(1, CliError::exit_code);
            ExitCode::from(code)
        }
    }
}

/// Where the agent is, from the configuration and the overrides.
struct Ctx {
    cfg: AgentConfig,
    json: bool,
    /// The local time zone, for event lines.
    tz: TimeZone,
}

impl Ctx {
    fn socket(&self) -> PathBuf {
        self.cfg.broker_socket()
    }

    fn database(&self) -> PathBuf {
        self.cfg.database()
    }
}

fn run(args: Cli) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let exe_dir = exe.parent().unwrap_or(Path::new("/"));
    let mut cfg = cli::load_config(args.config.as_deref(), exe_dir)?;
    if let Some(dir) = args.data_dir {
        cfg.data_dir = Some(dir);
    }
    if let Some(socket) = args.socket {
        cfg.broker_socket = Some(socket);
    }
    let ctx = Ctx { cfg, json: args.json, tz: render::local_zone() };
    log::debug!("socket {}, store {}", ctx.socket().display(), ctx.database().display());
    match args.command {
        Command::Status => status(&ctx),
        Command::Events(args) => events(&ctx, &args),
        Command::Alerts(args) => alerts(&ctx, &args),
        Command::Rules(RulesCommand::List) => rules_list(&ctx),
        Command::Rules(RulesCommand::Validate) => rules_validate(&ctx),
        Command::Ps(args) => ps(&ctx, args),
        Command::Inspect { pid, collector_type } => {
            one_task(&ctx, AgentTaskRequest::One { collector_type, task: TaskRequest::Inspect { pid } })
        }
        Command::Hash { path, collector_type } => {
            let path = std::path::absolute(&path).with_context(|| format!("bad path {}", path.display()))?;
            let Some(path) = path.to_str().map(str::to_owned) else {
                anyhow::bail!("the path {} is not UTF-8", path.display());
            };
            one_task(&ctx, AgentTaskRequest::One { collector_type, task: TaskRequest::Hash { path } })
        }
    }
}

/// Sends a task request to the agent and waits as long as its limits say.
fn ask(ctx: &Ctx, req: &AgentTaskRequest) -> anyhow::Result<AgentTaskResponse> {
    let client = cli::connect(&ctx.socket(), ctx.cfg.run_as.as_deref())?;
    let resp = cli_tasks::ask(&client, req, cli_tasks::answer_timeout(req, &ctx.cfg.tasks))?;
    client.close();
    Ok(resp)
}

fn ps(ctx: &Ctx, args: PsArgs) -> anyhow::Result<ExitCode> {
    let filter = SnapshotFilter { user: args.user, name_pattern: args.name, pids: Vec::new() };
    filter.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let req = AgentTaskRequest::All { collector_type: args.collector_type, filter };
    let g = match ask(ctx, &req)? {
        AgentTaskResponse::All(g) => g,
        AgentTaskResponse::Refused(why) => return Err(CliError::TaskRefused(why).into()),
        AgentTaskResponse::One(_) => return Err(CliError::BadReply("a single answer to ps".into()).into()),
    };
    if g.answered.iter().all(|a| a.status != TaskStatus::Ok) {
        let why: Vec<String> =
            g.missing.iter().map(|m| format!("  {}: {}", m.collector_id, printable(&m.reason))).collect();
        let why = if why.is_empty() {
            "  (no collector of that type is configured, or none answered)".to_owned()
        } else {
            why.join("\n")
        };
        return Err(CliError::NoCollector(format!("no collector gave a process list:\n{why}")).into());
    }
    for w in cli_tasks::gather_warnings(&g) {
        eprintln!("{w}");
    }
    if ctx.json {
        for doc in cli_tasks::ps_json(&g, now_unix_ms()) {
            out(&doc.to_string())?;
        }
    } else {
        let text = if args.tree { cli_tasks::render_ps_tree(&g) } else { cli_tasks::render_ps_table(&g) };
        io::stdout().lock().write_all(text.as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `inspect` and `hash`: one collector serves the task.
fn one_task(ctx: &Ctx, req: AgentTaskRequest) -> anyhow::Result<ExitCode> {
    let (outcome, result) = cli_tasks::served(ask(ctx, &req)?)?;
    let asked = match &req {
        AgentTaskRequest::One { task, .. } => task,
        AgentTaskRequest::All { .. } => return Err(CliError::BadReply("not a single task".into()).into()),
    };
    // The answer must be about what was asked.
    let (text, doc) = match (asked, result) {
        (TaskRequest::Inspect { pid }, TaskResult::Inspect(d)) if d.process.pid == *pid => {
            (cli_tasks::render_inspect(&d, &outcome), ecs::inspect(&d, outcome.served_by.as_deref()))
        }
        (TaskRequest::Hash { path }, TaskResult::Hash(h)) if h.path == *path => {
            (cli_tasks::render_hash(path, &h.sha256), ecs::file_hash(path, Some(h.size), &h.sha256))
        }
        _ => return Err(CliError::BadReply("the answer is not about what was asked".into()).into()),
    };
    if ctx.json {
        out(&doc.to_string())?;
    } else {
        io::stdout().lock().write_all(text.as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One line on stdout; a write error (a closed pipe) ends the command.
fn out(line: &str) -> io::Result<()> {
    writeln!(io::stdout().lock(), "{line}")
}

fn json_line<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    out(&serde_json::to_string(value)?)?;
    Ok(())
}

fn status(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let client = cli::connect(&ctx.socket(), ctx.cfg.run_as.as_deref())?;
    let status = cli::fetch_status(&client)?;
    client.close();
    let outputs = output_status(ctx);
    if ctx.json {
        let mut doc = serde_json::to_value(&status)?;
        if let Some(map) = doc.as_object_mut() {
            map.insert("outputs".to_owned(), serde_json::to_value(&outputs)?);
        }
        json_line(&doc)?;
    } else {
        let mut text = cli_output::render_status(&status, now_unix_ms());
        text.push_str(&cli_output::render_outputs(&outputs));
        io::stdout().lock().write_all(text.as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Each configured output's cursor, counters and lag, read from the store
/// (none when it cannot be read: logged, the rest of the status stands).
fn output_status(ctx: &Ctx) -> Vec<cli_output::OutputStatus> {
    if ctx.cfg.outputs.is_empty() {
        return Vec::new();
    }
    let read = || -> anyhow::Result<Vec<cli_output::OutputStatus>> {
        let store = cli::open_store(&ctx.database())?;
        Ok(cli_output::OutputStatus::read_all(store.connection(), &ctx.cfg, now_unix_ms())?)
    };
    read().unwrap_or_else(|e| {
        log::warn!("outputs: cannot read their state from the store: {e:#}");
        Vec::new()
    })
}

/// Subscribes before anything is read from the store, so nothing committed
/// in between is missed (what arrives twice is dropped by the caller).
/// `DropOldest`: a slow terminal loses lines instead of pushing back on
/// the collectors. An agent that is not up yet is waited for (said on
/// stderr): the client connects when it comes.
fn subscribe(ctx: &Ctx, pattern: &str, what: &str) -> anyhow::Result<(Client, Subscription)> {
    let socket = ctx.socket();
    let run_as = ctx.cfg.run_as.as_deref();
    let client = match cli::connect(&socket, run_as) {
        Ok(client) => client,
        Err(e) if cli::agent_not_up(&e) => {
            eprintln!("daemoneye-cli: {e}; showing the stored {what}, then waiting for the agent...");
            cli::client(&socket, run_as)?
        }
        Err(e) => return Err(e.into()),
    };
    let sub = client.subscribe_with(pattern, None, Overflow::DropOldest).map_err(CliError::Bus)?;
    if client.state() == ConnectionState::Connected {
        barrier(&client);
    }
    Ok((client, sub))
}

/// The broker handles one connection's frames in order: once it answers
/// this request, the subscriptions sent before it are in place.
fn barrier(client: &Client) {
    if let Err(e) = client.broker_stats(cli::AGENT_TIMEOUT) {
        log::debug!("broker stats (subscription barrier): {e}");
    }
}

/// What [`follow`] hands its handler.
enum Followed {
    /// A message on the subscription.
    Message(Message),
    /// The client (re)connected and its subscription is in place: what
    /// the store committed meanwhile can be read now without a gap.
    Connected,
}

/// Hands every message to `handle` until the client fails. When the agent
/// goes away it says so once and keeps waiting: the client reconnects and
/// re-subscribes by itself. Each (re)connection is handed over too.
fn follow(
    client: &Client,
    sub: &Subscription,
    socket: &Path,
    mut handle: impl FnMut(Followed) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let check = tick(Duration::from_millis(250));
    // Not connected yet: `subscribe` said it waits.
    let mut gone = client.state() != ConnectionState::Connected;
    let mut dropped = 0;
    loop {
        // Back: what was stored meanwhile goes first, before the messages
        // of the new connection (each stream is printed in order).
        let mut came_back = |gone: &mut bool| -> anyhow::Result<()> {
            *gone = false;
            eprintln!("daemoneye-cli: agent up at {}, following", socket.display());
            barrier(client);
            handle(Followed::Connected)
        };
        select! {
            recv(sub.messages()) -> msg => match msg {
                Ok(msg) => {
                    if gone && client.state() == ConnectionState::Connected {
                        came_back(&mut gone)?;
                    }
                    handle(Followed::Message(msg))?
                }
                Err(_) => return Err(CliError::Bus(daemoneye_bus::ClientError::Closed).into()),
            },
            recv(check) -> _ => {
                match client.state() {
                    ConnectionState::Connected if gone => came_back(&mut gone)?,
                    ConnectionState::Connected => {}
                    ConnectionState::Disconnected if !gone => {
                        gone = true;
                        eprintln!("daemoneye-cli: agent gone, waiting for it at {}...", socket.display());
                    }
                    ConnectionState::Disconnected => {}
                    ConnectionState::Refused => return Err(CliError::ClientRefused(socket.to_owned()).into()),
                    ConnectionState::Closed => {
                        return Err(CliError::Bus(daemoneye_bus::ClientError::Closed).into());
                    }
                }
                let now = client.dropped();
                if now > dropped {
                    eprintln!(
                        "daemoneye-cli: {} messages dropped: output is slower than the bus",
                        now - dropped
                    );
                    dropped = now;
                }
            }
        }
    }
}

/// One event, with its row id when it was read from the store.
fn print_event(ctx: &Ctx, env: &EventEnvelope, store_id: Option<i64>) -> io::Result<()> {
    if ctx.json {
        out(&render::json_line(env, store_id))
    } else {
        out(&render::human_line(env, store_id, &ctx.tz))
    }
}

/// The stored events of `q` after `after_id` (the newest `limit`; 0: all),
/// printed unless already seen; returns the last id read. Without a store
/// yet (no agent has run) and `waiting`, nothing, said once.
fn print_stored(
    ctx: &Ctx,
    q: &EventQuery,
    limit: usize,
    seen: &mut SeenStreams,
    after_id: Option<i64>,
    waiting: bool,
) -> anyhow::Result<Option<i64>> {
    let store = match cli::open_store(&ctx.database()) {
        Ok(store) => store,
        Err(CliError::NoStore(path)) if waiting => {
            if after_id.is_none() {
                eprintln!("daemoneye-cli: no events stored yet at {}", path.display());
            }
            return Ok(after_id);
        }
        Err(e) => return Err(e.into()),
    };
    let q = EventQuery { after_id, ..q.clone() };
    let mut last = after_id;
    for stored in store.query_newest(&q, limit).map_err(CliError::Store)? {
        let id = stored.id;
        last = Some(id);
        let env = cli::envelope(stored);
        if seen.admit(&env) {
            print_event(ctx, &env, Some(id))?;
        }
    }
    Ok(last)
}

fn events(ctx: &Ctx, args: &EventsArgs) -> anyhow::Result<ExitCode> {
    // The same check as `ps --name`'s.
    SnapshotFilter { name_pattern: args.name.clone(), ..SnapshotFilter::default() }
        .validate()
        .map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let q = EventQuery {
        since_ms: args.since.map(|d| cli::since_ms(now_unix_ms(), d)),
        pid: args.pid,
        name: args.name.clone(),
        kind: args.kind.map(EventKind::from),
        collector_id: args.collector.clone(),
        ..EventQuery::default()
    };
    let following = if args.follow { Some(subscribe(ctx, EVENTS_PATTERN, "events")?) } else { None };
    let mut seen = SeenStreams::default();
    let mut last_id = print_stored(ctx, &q, args.limit, &mut seen, None, following.is_some())?;
    let Some((client, sub)) = following else { return Ok(ExitCode::SUCCESS) };
    follow(&client, &sub, &ctx.socket(), |followed| {
        let msg = match followed {
            Followed::Message(msg) => msg,
            // What was committed while nobody listened (the agent starting,
            // collectors replaying): from the store, each event once.
            Followed::Connected => {
                last_id = print_stored(ctx, &q, 0, &mut seen, last_id.or(Some(0)), true)?;
                return Ok(());
            }
        };
        if msg.topic == GAP_TOPIC {
            return Ok(());
        }
        let env = match EventEnvelope::decode(&msg.payload) {
            Ok(env) => env,
            Err(e) => {
                log::warn!("undecodable event on {} from {}: {e}", msg.topic, msg.from);
                return Ok(());
            }
        };
        // The broker vouches for the publisher: a client may speak only
        // for its own collector id.
        if env.collector_id != msg.from {
            log::warn!("ignoring an event of collector {:?} published by {:?}", env.collector_id, msg.from);
            return Ok(());
        }
        if cli::event_matches(&q, &env) && seen.admit(&env) {
            print_event(ctx, &env, None)?;
        }
        Ok(())
    })
}

fn alerts(ctx: &Ctx, args: &AlertsArgs) -> anyhow::Result<ExitCode> {
    let mut q = AlertQuery {
        since_ms: args.since.map(|d| cli::since_ms(now_unix_ms(), d)),
        rule: args.rule.clone(),
        min_severity: args.severity.map(Severity::from),
        after_id: None,
        limit: args.limit,
    };
    let following = if args.follow { Some(subscribe(ctx, ALERT_TOPIC, "alerts")?) } else { None };
    let stored = stored_alerts(ctx, &q, following.is_some())?;
    let mut table = Table::new(&cli_output::ALERT_HEADERS);
    let rows: Vec<Vec<String>> = stored.iter().map(cli_output::alert_row).collect();
    for row in &rows {
        table.fit(row);
    }
    if ctx.json {
        for a in &stored {
            json_line(a)?;
        }
    } else if !rows.is_empty() || following.is_some() {
        out(&table.line(&cli_output::ALERT_HEADERS))?;
        for row in &rows {
            out(&table.line(row))?;
        }
    }
    let Some((client, sub)) = following else { return Ok(ExitCode::SUCCESS) };
    // Alert ids only grow: the stored ones are not printed again.
    q.after_id = Some(stored.last().map_or(0, |a| a.id));
    follow(&client, &sub, &ctx.socket(), |followed| {
        let msg = match followed {
            Followed::Message(msg) => msg,
            // Alerts raised while nobody listened: from the store.
            Followed::Connected => {
                for alert in stored_alerts(ctx, &AlertQuery { limit: 0, ..q.clone() }, true)? {
                    q.after_id = Some(alert.id);
                    print_alert(ctx, &table, &alert)?;
                }
                return Ok(());
            }
        };
        if msg.from != STORE_CLIENT_ID {
            log::warn!("ignoring an alert published by {:?}, not the agent's store writer", msg.from);
            return Ok(());
        }
        let alert: Alert = match api::decode(&msg.payload) {
            Ok(a) => a,
            Err(e) => {
                log::warn!("undecodable alert from {}: {e}", msg.from);
                return Ok(());
            }
        };
        if cli::alert_matches(&q, &alert) {
            q.after_id = Some(alert.id);
            print_alert(ctx, &table, &alert)?;
        }
        Ok(())
    })
}

fn print_alert(ctx: &Ctx, table: &Table, alert: &Alert) -> anyhow::Result<()> {
    if ctx.json { json_line(alert) } else { Ok(out(&table.line(&cli_output::alert_row(alert)))?) }
}

/// The stored alerts of `q`; none when there is no store yet and
/// `waiting` (`--follow` before the agent's first start).
fn stored_alerts(ctx: &Ctx, q: &AlertQuery, waiting: bool) -> anyhow::Result<Vec<Alert>> {
    let db = ctx.database();
    let store = match cli::open_store(&db) {
        Ok(store) => store,
        Err(CliError::NoStore(_)) if waiting => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(rules::query_alerts(store.connection(), q).map_err(|source| CliError::Alerts { path: db, source })?)
}

fn rules_list(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let rows = cli_output::rule_rows(&ctx.cfg);
    if ctx.json {
        for r in &rows {
            json_line(r)?;
        }
    } else {
        let cells: Vec<Vec<String>> = rows.iter().map(cli_output::RuleRow::cells).collect();
        out(&Table::render(&cli_output::RULE_HEADERS, &cells))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks the rules the agent would run (the built-ins when enabled, and
/// agent.yaml's enabled ones), each on its own against a scratch store.
fn rules_validate(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let verdicts = rules::validate(&ctx.cfg.active_rules());
    let failed = verdicts.iter().filter(|(_, v)| v.is_err()).count();
    for (name, verdict) in &verdicts {
        if ctx.json {
            json_line(
                &serde_json::json!({"rule": name, "ok": verdict.is_ok(), "error": verdict.as_ref().err()}),
            )?;
        } else {
            match verdict {
                Ok(()) => out(&format!("OK     {name}"))?,
                Err(reason) => out(&format!("ERROR  {name}: {reason}"))?,
            }
        }
    }
    if failed > 0 {
        eprintln!("daemoneye-cli: {failed} of {} active rules failed validation", verdicts.len());
        return Ok(ExitCode::FAILURE);
    }
    if !ctx.json {
        out(&format!("{} active rules, all valid", verdicts.len()))?;
    }
    Ok(ExitCode::SUCCESS)
}
