//! The metrics file, read by a real node_exporter (Debian package
//! `prometheus-node-exporter`; `.ci/run` installs it) with only its
//! textfile collector, on a loopback port, in a temp dir: what a
//! Prometheus would scrape from a host running DaemonEye.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use daemoneye_agent::api::AgentState;
use daemoneye_tests::{CollectorDef, System, wait_until};

/// A node_exporter this test started (killed on drop).
struct NodeExporter {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl NodeExporter {
    fn start(textfile_dir: &Path, log: PathBuf) -> NodeExporter {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(node_exporter())
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!("--collector.textfile.directory={}", textfile_dir.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("node_exporter starts");
        let n = NodeExporter { child, port, log };
        assert!(
            wait_until(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "node_exporter does not listen: {}",
            n.log()
        );
        n
    }

    /// `GET /metrics`, the body (empty when the request fails).
    fn scrape(&self) -> String {
        let get = || -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
        };
        get().unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_exporter() -> PathBuf {
    ["/usr/bin/prometheus-node-exporter", "/usr/local/bin/node_exporter"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect(
            "node_exporter is not installed (Debian package prometheus-node-exporter; .ci/run installs it)",
        )
}

/// The value of the sample named exactly `series` in a scrape.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn node_exporters_textfile_collector_serves_the_agents_counters() {
    let textfiles = tempfile::tempdir().unwrap();
    let prom = textfiles.path().join("daemoneye.prom");
    let extra = format!(
        "metrics: {{file: {}, interval_secs: 1}}\noutputs:\n  - name: archive\n    type: file\n    \
         poll_ms: 100\n    file: {{path: {}}}\n",
        prom.display(),
        textfiles.path().join("events.ndjson").display()
    );
    let mut sys = System::start(&[CollectorDef::procmond("pm-m")], &extra);
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let exporter = NodeExporter::start(textfiles.path(), textfiles.path().join("node_exporter.log"));

    // What a Prometheus scrape would see once the agent has collected and
    // forwarded: node_exporter parsed the file (no scrape error) and
    // serves our samples with their values.
    let mut last = String::new();
    let seen = wait_until(Duration::from_secs(30), || {
        last = exporter.scrape();
        value(&last, "node_textfile_scrape_error") == Some(0.0)
            && value(&last, r#"daemoneye_agent_state{state="SteadyState"}"#) == Some(1.0)
            && value(&last, r#"daemoneye_collector_up{collector="pm-m"}"#) == Some(1.0)
            && value(&last, r#"daemoneye_collectors{phase="running"}"#) == Some(1.0)
            && value(&last, "daemoneye_store_events_committed_total").is_some_and(|n| n > 0.0)
            && value(&last, r#"daemoneye_collector_events_stored_total{collector="pm-m"}"#)
                .is_some_and(|n| n > 0.0)
            && value(&last, r#"daemoneye_output_sent_total{output="archive"}"#).is_some_and(|n| n > 0.0)
            && value(&last, r#"daemoneye_output_up{output="archive"}"#) == Some(1.0)
            && value(&last, "daemoneye_bus_connections").is_some_and(|n| n >= 1.0)
    });
    assert!(seen, "node_exporter's scrape:\n{last}\nits log:\n{}\nagent:\n{}", exporter.log(), sys.tail());

    // Rewritten every second (its timestamp moves), whole, 0644, with no
    // temporary file left for the collector to trip over.
    let stamp = |s: &str| value(s, "daemoneye_metrics_timestamp_seconds").unwrap_or(0.0);
    let first = stamp(&last);
    assert!(wait_until(Duration::from_secs(10), || stamp(&exporter.scrape()) > first), "{}", sys.tail());
    let mode = std::fs::metadata(&prom).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o644);
    let names: Vec<String> = std::fs::read_dir(textfiles.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".prom"))
        .collect();
    assert_eq!(names, ["daemoneye.prom"]);
    assert!(sys.log().contains(&format!("metrics: writing {} every 1 s", prom.display())), "{}", sys.tail());

    assert!(sys.stop(Duration::from_secs(30)).success(), "{}", sys.tail());
}

#[test]
fn a_metrics_file_it_cannot_write_is_logged_once_and_the_agent_goes_on() {
    let textfiles = tempfile::tempdir().unwrap();
    let prom = textfiles.path().join("daemoneye.prom");
    // A directory in the file's place: every rename over it fails.
    std::fs::create_dir(&prom).unwrap();
    std::fs::write(prom.join("keep"), "").unwrap();
    let extra = format!("metrics: {{file: {}, interval_secs: 1}}\n", prom.display());
    let mut sys = System::start(&[CollectorDef::procmond("pm-n")], &extra);
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let warned = |sys: &System| sys.log().lines().filter(|l| l.contains("metrics: cannot write")).count();
    assert!(wait_until(Duration::from_secs(10), || warned(&sys) >= 1), "no warning\n{}", sys.tail());
    // Three more intervals fail the same way: that nothing more is logged
    // can only be seen by letting them pass.
    std::thread::sleep(Duration::from_secs(3));
    let log = sys.log();
    let warnings = log.lines().filter(|l| l.contains("metrics: cannot write")).count();
    assert_eq!(warnings, 1, "one warning for one lasting failure:\n{}", sys.tail());
    assert!(prom.join("keep").exists());
    assert!(sys.status().is_some_and(|s| s.state == AgentState::SteadyState), "{}", sys.tail());
    assert!(sys.stop(Duration::from_secs(30)).success(), "{}", sys.tail());
}
