//! Unit tests of `control`.

use super::*;
use crate::testing::record;

#[test]
fn version_3_fields_are_left_out_for_older_peers_and_read_as_absent() {
    let hb = Heartbeat {
        collector_id: "c".into(),
        sequence: 3,
        timestamp_unix_ms: 4,
        status: HealthStatus::Degraded,
        metrics: HeartbeatMetrics {
            processes_collected: 1,
            events_published: 2,
            buffer_level_percent: 0.5,
            connection_status: ConnectionStatus::Connected,
            cycles: 3,
            errors: 0,
            tasks_served: 0,
            tasks_failed: 0,
            task_latency_avg_us: 0,
            event_source: EventSourceStatus::default(),
        },
        delivery: Some(DeliveryStatus {
            stream_id: 9,
            base: 5,
            next: 7,
            unacknowledged: 2,
            ..Default::default()
        }),
    };
    assert_eq!(decode::<Heartbeat>(&encode(&hb)).unwrap(), hb);
    for version in [Version::V1, Version::V2] {
        let old = decode::<Heartbeat>(&codec::encode_as(version, &hb)).unwrap();
        assert_eq!(old, Heartbeat { delivery: None, ..hb.clone() }, "{version:?}");
    }
    let reg = RegistrationMessage::Register(RegistrationRequest {
        collector_id: "c".into(),
        collector_type: "t".into(),
        version: "1".into(),
        capabilities: vec!["x".into()],
        pid: 7,
        heartbeat_interval_ms: 1000,
        stream_id: 9,
        position: Some(StreamPosition { base: 5, next: 7 }),
    });
    assert_eq!(decode::<RegistrationMessage>(&encode(&reg)).unwrap(), reg);
    for version in [Version::V1, Version::V2] {
        match decode::<RegistrationMessage>(&codec::encode_as(version, &reg)).unwrap() {
            RegistrationMessage::Register(r) => {
                assert_eq!((r.pid, r.stream_id, r.position), (7, 9, None))
            }
            other => panic!("{other:?}"),
        }
    }
    let bye = RegistrationMessage::Deregister { collector_id: "c".into(), reason: "r".into() };
    assert_eq!(decode::<RegistrationMessage>(&codec::encode_as(Version::V2, &bye)).unwrap(), bye);
}

#[test]
fn globs_match_like_a_shell() {
    let cases: &[(&str, &str, bool)] = &[
        ("sshd", "sshd", true),
        ("sshd", "sshd2", false),
        ("ssh*", "sshd", true),
        ("*d", "sshd", true),
        ("*", "", true),
        ("", "", true),
        ("", "a", false),
        ("?", "", false),
        ("s?hd", "sshd", true),
        ("s?hd", "shd", false),
        ("*sh*", "bash", true),
        ("a*b*c", "aXXbYYc", true),
        ("a*b*c", "aXXbYY", false),
        ("**a", "bba", true),
        ("*a*", "xyz", false),
        ("kworker/*", "kworker/0:1-events", true),
        ("é?", "éü", true),
        ("[a]", "a", false),
    ];
    for &(pattern, text, expected) in cases {
        assert_eq!(glob_match(pattern, text), expected, "{pattern:?} against {text:?}");
    }
}

#[test]
fn filters_keep_what_every_condition_allows() {
    let mut root = record(1, 10, "init");
    let mut d = (*root.details).clone();
    d.user = Ok("root".into());
    d.credentials = Ok(daemoneye_platform::Credentials { uid: 0, euid: 0, gid: 0, egid: 0 });
    d.exe = Ok("/usr/lib/systemd/systemd".into());
    root.details = std::sync::Arc::new(d);
    let procs = [ProcessSummary::of(&root), ProcessSummary::of(&record(2, 20, "bash"))];
    let keep = |f: SnapshotFilter| -> Vec<u32> {
        let m = f.matcher();
        procs.iter().filter(|p| m.matches(p)).map(|p| p.pid).collect()
    };
    assert_eq!(keep(SnapshotFilter::default()), [1, 2]);
    assert_eq!(keep(SnapshotFilter { user: Some("root".into()), ..Default::default() }), [1]);
    assert_eq!(keep(SnapshotFilter { user: Some("1000".into()), ..Default::default() }), [2]);
    assert_eq!(keep(SnapshotFilter { user: Some("nobody".into()), ..Default::default() }), [0u32; 0]);
    // The name, or the executable's file name.
    assert_eq!(keep(SnapshotFilter { name_pattern: Some("sys*".into()), ..Default::default() }), [1]);
    assert_eq!(keep(SnapshotFilter { name_pattern: Some("?ash".into()), ..Default::default() }), [2]);
    assert_eq!(keep(SnapshotFilter { pids: vec![9, 2, 2], ..Default::default() }), [2]);
    let both = SnapshotFilter { user: Some("root".into()), pids: vec![2], ..Default::default() };
    assert_eq!(keep(both), [0u32; 0]);
    let long = SnapshotFilter { name_pattern: Some("*".repeat(MAX_NAME_PATTERN + 1)), ..Default::default() };
    assert!(long.validate().is_err());
    assert!(SnapshotFilter::default().validate().is_ok());
}

#[test]
fn summaries_join_the_command_line_and_mark_a_cut() {
    let mut r = record(5, 50, "tool");
    let mut d = (*r.details).clone();
    d.argv = Ok(daemoneye_platform::Argv { args: vec!["tool".into(), "-v".into()], truncated: true });
    r.details = std::sync::Arc::new(d);
    let s = ProcessSummary::of(&r);
    assert_eq!(s.command_line.as_deref(), Ok("tool -v…"));
    assert_eq!((s.uid, s.euid, s.key()), (Ok(1000), Ok(1000), r.key()));
    assert_eq!(s.exe.as_deref(), Ok("/usr/bin/tool"));
    // Long lines are cut, on a character boundary.
    let mut d = (*r.details).clone();
    d.argv = Ok(daemoneye_platform::Argv { args: vec!["é".repeat(300)], truncated: false });
    r.details = std::sync::Arc::new(d);
    let line = ProcessSummary::of(&r).command_line.unwrap();
    assert_eq!(line, format!("{}…", "é".repeat(SUMMARY_COMMAND_LINE_MAX)));
}

#[test]
fn tasks_and_answers_round_trip_and_garbage_is_an_error() {
    let requests = [
        TaskRequest::Snapshot(SnapshotFilter {
            user: Some("root".into()),
            name_pattern: Some("ss*".into()),
            pids: vec![1, 2],
        }),
        TaskRequest::Inspect { pid: 7 },
        TaskRequest::Hash { path: "/usr/bin/env".into() },
    ];
    for req in requests {
        assert_eq!(decode::<TaskRequest>(&encode(&req)).unwrap(), req);
    }
    let r = record(3, 30, "x");
    let answers = [
        TaskResponse::ok(
            "c1",
            TaskResult::Snapshot(ProcessList {
                observed_unix_ms: 1,
                processes: vec![ProcessSummary::of(&r)],
            }),
        ),
        TaskResponse::ok(
            "c1",
            TaskResult::Inspect(Box::new(ProcessDetail {
                observed_unix_ms: 2,
                process: r,
                sha256: HashOutcome::Deferred,
            })),
        ),
        TaskResponse::status("c2", TaskStatus::NotFound, "no such file"),
    ];
    for a in answers {
        assert_eq!(decode::<TaskResponse>(&encode(&a)).unwrap(), a);
    }
    assert!(decode::<TaskRequest>(&[0xff, 0xff, 0xff, 0x07]).is_err());
    assert!(decode::<TaskRequest>(&[]).is_err());
    assert_eq!(task_topic("process-monitor"), "control.collector.task.process-monitor");
    assert!(daemoneye_bus::validate_topic(&task_topic("process-monitor")).is_ok());
}
