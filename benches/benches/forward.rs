//! Forwarding throughput: a store of 100,000 events (as a procmond
//! stores them) delivered by one output thread, as the agent runs it
//! (`daemoneye_agent::forward::Outputs`), into a real rsyslogd on a
//! loopback port (imtcp, a file action) and into an NDJSON file. Reports
//! events per second until the output's cursor reached the last event,
//! this process's CPU per 1,000 events, and (rsyslog) that every message
//! reached rsyslog's file. Owns `main`; needs rsyslogd (package rsyslog).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemoneye_agent::config::AgentConfig;
use daemoneye_agent::forward::{AlertFn, Outputs};
use daemoneye_benches::cpu_of;
use daemoneye_contract::event::EventKind;
use daemoneye_contract::testing::{envelope, record};
use daemoneye_store::EventStore;

const EVENTS: u64 = 100_000;

fn fill(db: &Path) {
    let mut store = EventStore::open(db).expect("store");
    let mut seq = 1;
    while seq <= EVENTS {
        let batch: Vec<_> = (seq..(seq + 1000).min(EVENTS + 1))
            .map(|s| {
                let rec = record(u32::try_from(1000 + s % 30_000).unwrap_or(1), s, "bash");
                envelope("procmond", 1, s, EventKind::Started, rec, 1_700_000_000_000 + s)
            })
            .collect();
        seq += batch.len() as u64;
        store.insert_batch(&batch).expect("insert");
    }
}

/// Runs one output over the filled store until its cursor is at the last
/// event: (seconds, CPU ms of this process).
fn run(db: &Path, output_yaml: &str) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = AgentConfig::parse(output_yaml, "bench", dir.path()).expect("config");
    let alert: AlertFn = Arc::new(|_: &str, _: &str, _: &str| {});
    let tps = 100;
    let cpu0 = cpu_of(std::process::id());
    let t0 = Instant::now();
    let outputs = Outputs::start(db, &cfg.outputs, alert).expect("outputs");
    let conn = rusqlite::Connection::open(db).expect("db");
    let max: i64 = conn.query_row("SELECT max(id) FROM process_events", [], |r| r.get(0)).expect("max");
    loop {
        let at = daemoneye_store::outputs::read(&conn, Some(&cfg.outputs[0].name)).expect("cursor");
        if at.first().is_some_and(|c| c.events_through >= max) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "no progress: {at:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_of(std::process::id()).ms_since(&cpu0, tps);
    outputs.shutdown();
    (secs, cpu)
}

fn lines(path: &Path) -> usize {
    std::fs::read(path).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("events.db");
    fill(&db);
    println!("forward: {EVENTS} stored events, one output, batch_max 1000");

    // File.
    let file = dir.path().join("out.ndjson");
    let yaml = format!(
        "outputs:\n  - {{name: file, type: file, batch_max: 1000, file: {{path: {}, max_bytes: 1073741824}}}}\n",
        file.display()
    );
    let (secs, cpu) = run(&db, &yaml);
    assert_eq!(lines(&file) as u64, EVENTS);
    report("file", secs, cpu);

    // rsyslog over TCP.
    let Some(rsyslogd) = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"].into_iter().find(|p| Path::new(p).exists())
    else {
        println!("rsyslog: skipped (rsyslogd is not installed: apt-get install rsyslog)");
        return;
    };
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let out = dir.path().join("rsyslog.out");
    std::fs::create_dir_all(dir.path().join("work")).expect("work dir");
    let conf = format!(
        "global(workDirectory=\"{}\" maxMessageSize=\"256k\")\nmodule(load=\"imtcp\")\n\
         template(name=\"t\" type=\"string\" string=\"%msg%\\n\")\n\
         ruleset(name=\"r\") {{ action(type=\"omfile\" file=\"{}\" template=\"t\") }}\n\
         input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"r\")\n",
        dir.path().join("work").display(),
        out.display()
    );
    std::fs::write(dir.path().join("rsyslog.conf"), conf).expect("conf");
    let mut child = Command::new(rsyslogd)
        .args(["-n", "-f"])
        .arg(dir.path().join("rsyslog.conf"))
        .arg("-i")
        .arg(dir.path().join("rsyslog.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rsyslogd");
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "rsyslogd does not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rs_cpu0 = cpu_of(child.id());
    let yaml = format!(
        "outputs:\n  - {{name: siem, type: syslog, batch_max: 1000, syslog: {{address: \"127.0.0.1:{port}\"}}}}\n"
    );
    let (secs, cpu) = run(&db, &yaml);
    let t = Instant::now();
    while (lines(&out) as u64) < EVENTS && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let rs_cpu = cpu_of(child.id()).ms_since(&rs_cpu0, 100);
    let _ = child.kill();
    let _ = child.wait();
    report("rsyslog (TCP, loopback)", secs, cpu);
    println!(
        "  rsyslog wrote {} of {EVENTS} messages; its CPU {:.0} ms per 1,000 events",
        lines(&out),
        rs_cpu / (EVENTS as f64 / 1000.0)
    );
    assert_eq!(lines(&out) as u64, EVENTS, "rsyslog did not write every message");
}

fn report(what: &str, secs: f64, cpu_ms: f64) {
    println!(
        "{what}: {:.0} events/s ({secs:.2} s), this process's CPU {:.1} ms per 1,000 events",
        EVENTS as f64 / secs,
        cpu_ms / (EVENTS as f64 / 1000.0)
    );
}
