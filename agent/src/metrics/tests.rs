use std::collections::{HashMap, HashSet};

use daemoneye_contract::api::{
    BrokerStatus, CollectorDelivery, CollectorStatus, StoreStatus, TaskCounts, TasksStatus,
};
use daemoneye_contract::control::DeliveryStatus;
use nix::sys::stat::{Mode, umask};

use super::*;

fn collector(id: &str, phase: CollectorPhase, registered: bool, restarts: u32) -> CollectorStatus {
    CollectorStatus {
        id: id.to_owned(),
        collector_type: "process-monitor".to_owned(),
        phase,
        pid: Some(77),
        adopted: false,
        registered,
        heartbeat: None,
        missed_heartbeats: 2,
        restarts,
        last_exit: None,
        escalation: Vec::new(),
        events_stored: 1234,
        tasks: TaskCounts::default(),
    }
}

fn status() -> AgentStatus {
    AgentStatus {
        pid: 42,
        version: "0.1.0".to_owned(),
        state: AgentState::SteadyState,
        state_since_unix_ms: 10_000,
        uptime_secs: 75,
        collectors: vec![
            collector("procmond", CollectorPhase::Running, true, 0),
            // A hostile or odd id cannot break the format.
            collector("we\"ird\\id\nx", CollectorPhase::Restarting, false, 3),
        ],
        broker: BrokerStatus { socket: "/s".to_owned(), connections: 4, dropped: 7, ..Default::default() },
        store: StoreStatus {
            path: "/db".to_owned(),
            events_committed: 8,
            alerts_raised: 2,
            last_commit_unix_ms: Some(1_700_000_000_123),
            ..Default::default()
        },
        tasks: TasksStatus::default(),
        delivery: vec![CollectorDelivery {
            collector_id: "procmond".to_owned(),
            status: DeliveryStatus {
                stream_id: 5,
                base: 10,
                next: 20,
                unacknowledged: 10,
                oldest_unacknowledged_ms: 1_500,
                wal_bytes: 3 << 20,
                wal_cap_bytes: 4 << 20,
                wal_full: false,
                wal_full_times: 0,
                events_refused: 17,
            },
            ack_stall_secs: 120,
            stalled: false,
        }],
    }
}

fn output(name: &str, state: &str) -> OutputStatus {
    OutputStatus {
        name: name.to_owned(),
        state: state.to_owned(),
        lag_events: 11,
        lag_secs: 3,
        sent: 500,
        retried: 6,
        resent: 2,
        lost: 1,
        last_error: None,
        events_through: 0,
        alerts_through: 0,
    }
}

/// Parses the text format strictly enough to catch what a scraper
/// refuses: every sample belongs to the family whose `# HELP` and
/// `# TYPE` came just before it, each family is declared once, a metric
/// name and labels are well-formed, values are numbers, no sample is
/// repeated. Returns each sample (`name{labels}` → value).
fn parse(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut declared = HashSet::new();
    let mut family: Option<String> = None;
    let mut lines = text.lines().peekable();
    assert!(text.ends_with('\n'), "the last line ends with a newline");
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_owned();
            let typ = lines.next().expect("# TYPE after # HELP");
            let kind = typ.strip_prefix(&format!("# TYPE {name} ")).unwrap_or_else(|| panic!("{typ}"));
            assert!(["gauge", "counter"].contains(&kind), "{typ}");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "counters and only they end in _total: {name}"
            );
            assert!(declared.insert(name.clone()), "{name} declared twice");
            family = Some(name);
            continue;
        }
        let family = family.as_deref().expect("a sample after its family's # HELP");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert_eq!(name, family, "{line}");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).expect("braces");
            // Outside the quotes only `name="` pairs and commas; inside, an
            // unescaped quote would end the value.
            let mut chars = inner.chars();
            loop {
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                assert!(
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert_eq!(chars.next(), Some('"'), "{line}");
                loop {
                    match chars.next().expect("a closing quote") {
                        '\\' => assert!(matches!(chars.next(), Some('\\' | '"' | 'n')), "{line}"),
                        '"' => break,
                        '\n' => panic!("a raw newline in {line}"),
                        _ => {}
                    }
                }
                match chars.next() {
                    None => break,
                    Some(',') => {}
                    Some(c) => panic!("{c:?} after a label value: {line}"),
                }
            }
        }
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        assert!(samples.insert(series.to_owned(), value).is_none(), "{series} twice");
    }
    samples
}

#[test]
fn every_family_is_declared_once_and_each_sample_is_well_formed() {
    let text = render(&status(), &[output("siem", "ok"), output("archive", "retrying")], 1_700_000_001_500);
    let m = parse(&text);
    let v = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} missing from:\n{text}"));
    assert_eq!(v("daemoneye_metrics_timestamp_seconds"), 1_700_000_001.5);
    assert_eq!(v(r#"daemoneye_agent_info{version="0.1.0"}"#), 1.0);
    assert_eq!(v(r#"daemoneye_agent_state{state="SteadyState"}"#), 1.0);
    assert_eq!(v(r#"daemoneye_agent_state{state="Loading"}"#), 0.0);
    assert_eq!(v("daemoneye_agent_uptime_seconds"), 75.0);
    assert_eq!(v(r#"daemoneye_collectors{phase="running"}"#), 1.0);
    assert_eq!(v(r#"daemoneye_collectors{phase="restarting"}"#), 1.0);
    assert_eq!(v(r#"daemoneye_collectors{phase="failed"}"#), 0.0);
    assert_eq!(v(r#"daemoneye_collector_up{collector="procmond"}"#), 1.0);
    assert_eq!(v(r#"daemoneye_collector_up{collector="we\"ird\\id\nx"}"#), 0.0);
    assert_eq!(v(r#"daemoneye_collector_restarts_total{collector="we\"ird\\id\nx"}"#), 3.0);
    assert_eq!(v(r#"daemoneye_collector_events_stored_total{collector="procmond"}"#), 1234.0);
    assert_eq!(v(r#"daemoneye_collector_unacknowledged_events{collector="procmond"}"#), 10.0);
    assert_eq!(v(r#"daemoneye_collector_oldest_unacknowledged_seconds{collector="procmond"}"#), 1.5);
    assert_eq!(v(r#"daemoneye_collector_events_refused_total{collector="procmond"}"#), 17.0);
    assert_eq!(v("daemoneye_store_events_committed_total"), 8.0);
    assert_eq!(v("daemoneye_alerts_total"), 2.0);
    assert_eq!(v("daemoneye_store_last_commit_timestamp_seconds"), 1_700_000_000.123);
    assert_eq!(v("daemoneye_bus_connections"), 4.0);
    assert_eq!(v("daemoneye_bus_dropped_total"), 7.0);
    assert_eq!(v(r#"daemoneye_output_up{output="siem"}"#), 1.0);
    assert_eq!(v(r#"daemoneye_output_up{output="archive"}"#), 0.0);
    assert_eq!(v(r#"daemoneye_output_lag_events{output="archive"}"#), 11.0);
    assert_eq!(v(r#"daemoneye_output_lag_seconds{output="siem"}"#), 3.0);
    assert_eq!(v(r#"daemoneye_output_lost_total{output="siem"}"#), 1.0);
    assert_eq!(v(r#"daemoneye_output_resent_total{output="siem"}"#), 2.0);
}

#[test]
fn without_outputs_or_a_commit_their_families_are_left_out() {
    let mut s = status();
    s.store.last_commit_unix_ms = None;
    let text = render(&s, &[], 0);
    let m = parse(&text);
    assert!(!text.contains("daemoneye_output_"), "{text}");
    assert!(!text.contains("last_commit"), "{text}");
    assert_eq!(m["daemoneye_metrics_timestamp_seconds"], 0.0);
}

#[test]
fn the_file_is_replaced_whole_readable_by_others_and_never_through_a_link() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemoneye.prom");
    // A leftover temporary file (a crash between create and rename) and a
    // link in the final name's place are both replaced, not followed.
    let tmp = dir.path().join(".daemoneye.prom.tmp");
    let target = dir.path().join("target");
    std::fs::write(&target, "keep").unwrap();
    std::os::unix::fs::symlink(&target, &tmp).unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let old = umask(Mode::from_bits_truncate(0o077));
    let result = replace_readable(&path, b"a 1\n");
    umask(old);
    result.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 1\n");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
    assert!(!tmp.exists() && std::fs::symlink_metadata(&tmp).is_err(), "no temporary file left");
    replace_readable(&path, b"a 2\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
}
