//! The broker permissions the agent configures, on a real broker: a
//! collector may publish only events, its own heartbeat and registration
//! requests, and read only what is addressed to it; only the agent may
//! publish control topics; other local clients (the CLI) may ask for
//! status and follow events.

use std::time::Duration;

use daemoneye_agent::api::{
    AGENT_CLIENT_ID, ALERT_TOPIC, STATUS_TOPIC, STORE_CLIENT_ID, TASK_TOPIC, TASKS_CLIENT_ID,
};
use daemoneye_agent::config::AgentConfig;
use daemoneye_agent::daemon::permissions;
use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig, ClientError, ErrorCode};
use daemoneye_contract::control;

fn config(dir: &std::path::Path) -> AgentConfig {
    let bin = dir.join("procmond");
    std::fs::write(&bin, "").unwrap();
    std::process::Command::new("chmod").arg("755").arg(&bin).status().unwrap();
    let yaml = "collectors:\n  - {id: pm-a, binary: procmond}\n  - {id: pm-b, binary: procmond}\n";
    AgentConfig::parse(yaml, "test", dir).unwrap()
}

fn client(socket: &std::path::Path, id: &str) -> Client {
    let c = Client::connect(ClientConfig::new(socket, id)).unwrap();
    assert!(c.wait_connected(Duration::from_secs(5)), "{id} connects");
    c
}

fn forbidden(r: Result<(), ClientError>) -> bool {
    matches!(r, Err(ClientError::Refused { code: ErrorCode::Forbidden, .. }))
}

#[test]
fn collectors_cli_and_agent_get_exactly_their_rights() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let socket = dir.path().join("run").join("bus.sock");
    let mut b = BrokerConfig::new(&socket);
    let (rules, others) = permissions(&cfg);
    b.permissions = rules;
    b.default_permissions = Some(others);
    let _broker = Broker::start(b).unwrap();

    let agent = client(&socket, AGENT_CLIENT_ID);
    let store = client(&socket, STORE_CLIENT_ID);
    let pm_a = client(&socket, "pm-a");
    let pm_b = client(&socket, "pm-b");
    let cli = client(&socket, "cli-1234");
    let bytes = b"x";

    // A collector: its own events, heartbeat and registration...
    assert!(pm_a.publish_confirmed("events.process.started", bytes).is_ok());
    assert!(pm_a.publish_confirmed(&control::heartbeat_topic("pm-a"), bytes).is_ok());
    assert!(pm_a.publish_confirmed(control::REGISTRATION_TOPIC, bytes).is_ok());
    // ...and no other collector's heartbeat, no control topic, no alert.
    assert!(forbidden(pm_a.publish_confirmed(&control::heartbeat_topic("pm-b"), bytes)));
    assert!(forbidden(pm_a.publish_confirmed(control::LIFECYCLE_TOPIC, bytes)));
    assert!(forbidden(pm_a.publish_confirmed(&control::ack_topic("pm-a"), bytes)));
    assert!(forbidden(pm_a.publish_confirmed(&control::rpc_topic("pm-b"), bytes)));
    assert!(forbidden(pm_a.publish_confirmed("events.alert", bytes)));
    // Nor the broker's counters (bus.stats obeys the permissions).
    assert!(matches!(pm_a.broker_stats(Duration::from_secs(5)), Err(ClientError::Refused { .. })));
    assert!(cli.broker_stats(Duration::from_secs(5)).is_ok());
    // It reads what is addressed to it, not another collector's acks: the
    // store publishes on pm-b's topic first, then on pm-a's, so once pm-a
    // has its own, the other would have arrived before it.
    let own = pm_a.subscribe(&control::ack_topic("pm-a")).unwrap();
    let other = pm_a.subscribe(&control::ack_topic("pm-b")).unwrap();
    let cli_regs = cli.subscribe(control::REGISTRATION_TOPIC).unwrap();
    let cli_events = cli.subscribe("events.#").unwrap();
    // Subscriptions are set up in order with the publishes below: a
    // confirmed publish from each client flushes its subscribes first.
    assert!(pm_a.publish_confirmed(&control::heartbeat_topic("pm-a"), bytes).is_ok());
    assert!(cli.publish_confirmed(STATUS_TOPIC, bytes).is_ok());
    assert!(store.publish_confirmed(&control::ack_topic("pm-b"), b"not yours").is_ok());
    assert!(pm_b.publish_confirmed(control::REGISTRATION_TOPIC, b"not yours").is_ok());
    assert!(store.publish_confirmed(&control::ack_topic("pm-a"), b"yours").is_ok());
    assert!(pm_b.publish_confirmed("events.process.stopped", b"yours").is_ok());
    assert_eq!(own.recv_timeout(Duration::from_secs(5)).map(|m| m.payload), Some(b"yours".to_vec()));
    assert!(other.messages().try_recv().is_err(), "pm-a read pm-b's acknowledgements");
    assert_eq!(cli_events.recv_timeout(Duration::from_secs(5)).map(|m| m.payload), Some(b"yours".to_vec()));
    assert!(cli_regs.messages().try_recv().is_err(), "the CLI read registrations");

    // The CLI: status and task requests and following events, nothing else
    // (no task straight to the collectors: the agent hands them out).
    assert!(cli.publish_confirmed(TASK_TOPIC, bytes).is_ok());
    assert!(forbidden(cli.publish_confirmed(&control::task_topic("process-monitor"), bytes)));
    assert!(forbidden(cli.publish_confirmed(&control::task_broadcast_topic("process-monitor"), bytes)));
    assert!(forbidden(cli.publish_confirmed("events.process.started", bytes)));
    assert!(forbidden(cli.publish_confirmed(control::LIFECYCLE_TOPIC, bytes)));
    assert!(forbidden(cli.publish_confirmed(&control::rpc_topic("pm-a"), bytes)));

    // The agent's monitor: the lifecycle broadcast and the collectors'
    // RPCs, nothing else (no acks, events, alerts or tasks; no bus.stats:
    // it reads the broker in-process).
    assert!(agent.publish_confirmed(control::LIFECYCLE_TOPIC, bytes).is_ok());
    assert!(agent.publish_confirmed(&control::rpc_topic("pm-b"), bytes).is_ok());
    assert!(forbidden(agent.publish_confirmed(&control::rpc_topic("pm-c"), bytes)));
    assert!(forbidden(agent.publish_confirmed(&control::ack_topic("pm-a"), bytes)));
    assert!(forbidden(agent.publish_confirmed("events.process.started", bytes)));
    assert!(forbidden(agent.publish_confirmed(ALERT_TOPIC, bytes)));
    assert!(forbidden(agent.publish_confirmed(&control::task_topic("process-monitor"), bytes)));
    assert!(forbidden(agent.publish_confirmed(daemoneye_bus::STATS_TOPIC, bytes)));
    assert!(agent.subscribe(control::HEARTBEAT_PATTERN).is_ok());
    // The store writer: the collectors' acks and alerts.
    assert!(store.publish_confirmed(ALERT_TOPIC, bytes).is_ok());
    assert!(forbidden(store.publish_confirmed(control::LIFECYCLE_TOPIC, bytes)));
    assert!(forbidden(store.publish_confirmed(&control::rpc_topic("pm-a"), bytes)));
    assert!(forbidden(store.publish_confirmed("events.process.started", bytes)));
    assert!(forbidden(store.publish_confirmed(&control::ack_topic("pm-c"), bytes)));

    // The task coordinator: tasks to the collectors and status, nothing
    // else; collectors may take tasks, one by one or all at once.
    let tasks = client(&socket, TASKS_CLIENT_ID);
    assert!(tasks.publish_confirmed(&control::task_topic("process-monitor"), bytes).is_ok());
    assert!(tasks.publish_confirmed(&control::task_broadcast_topic("process-monitor"), bytes).is_ok());
    assert!(tasks.publish_confirmed(STATUS_TOPIC, bytes).is_ok());
    assert!(forbidden(tasks.publish_confirmed(control::LIFECYCLE_TOPIC, bytes)));
    assert!(forbidden(tasks.publish_confirmed(&control::rpc_topic("pm-a"), bytes)));
    assert!(forbidden(tasks.publish_confirmed("events.process.started", bytes)));
    let all = pm_a.subscribe(&control::task_broadcast_topic("process-monitor")).unwrap();
    assert!(pm_a.publish_confirmed(&control::heartbeat_topic("pm-a"), bytes).is_ok());
    assert!(tasks.publish_confirmed(&control::task_broadcast_topic("process-monitor"), b"all").is_ok());
    assert_eq!(all.recv_timeout(Duration::from_secs(5)).map(|m| m.payload), Some(b"all".to_vec()));
}
