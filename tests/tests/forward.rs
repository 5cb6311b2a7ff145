//! Forwarding into real receivers: an rsyslog started by the test on a
//! loopback port (imtcp, a file action, in a temp dir), fed by a real
//! agent with a real procmond; rsyslog SIGKILLed and restarted while
//! events flow, over plain TCP and over TLS (rsyslog's OpenSSL driver,
//! client certificates required); TLS receivers the agent must refuse. The file output, through a real agent SIGKILLed while its
//! output has unsent events.

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use daemoneye_agent::api::AgentState;
use daemoneye_tests::forwarding::{Churn, Pki, TlsTerminator, free_port, stored};
use daemoneye_tests::{CYCLE, CollectorDef, System, signal, wait_until};
use nix::sys::signal::Signal;

/// An rsyslogd this test started (killed on drop, by its own pid).
struct Rsyslog {
    child: Child,
}

impl Rsyslog {
    /// Starts rsyslogd in the foreground with `dir/rsyslog.conf`: imtcp on
    /// 127.0.0.1:`port`, every message to `dir/out.log` as
    /// `app-name msgid severity msg`, processed as it is read (a direct
    /// queue), so what it had read when killed is at most one read's worth.
    /// With `tls`: TLS only (rsyslog's `ossl` driver, the PKI's server
    /// certificate), and clients must show a certificate of its CA.
    fn start(dir: &Path, port: u16, tls: Option<&Pki>) -> Rsyslog {
        let work = dir.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let (driver, imtcp) = tls.map(|pki| pki.rsyslog_params("x509/certvalid")).unwrap_or_default();
        let conf = format!(
            "global(workDirectory=\"{work}\" maxMessageSize=\"256k\"{driver})\n\
             module(load=\"imtcp\"{imtcp})\n\
             main_queue(queue.type=\"Direct\")\n\
             template(name=\"t\" type=\"string\" string=\"%app-name% %msgid% %syslogseverity% %msg%\\n\")\n\
             ruleset(name=\"r\") {{ action(type=\"omfile\" file=\"{out}\" template=\"t\" \
             flushOnTXEnd=\"on\" asyncWriting=\"off\") }}\n\
             input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"r\")\n",
            work = work.display(),
            out = dir.join("out.log").display(),
        );
        Rsyslog::start_with(dir, port, &conf)
    }

    /// Starts rsyslogd in the foreground with `conf` (listening on
    /// `port`), its pid file and output in `dir`.
    fn start_with(dir: &Path, port: u16, conf: &str) -> Rsyslog {
        std::fs::write(dir.join("rsyslog.conf"), conf).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("rsyslogd.log")).unwrap();
        let child = Command::new(rsyslogd())
            .arg("-n")
            .arg("-f")
            .arg(dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("rsyslogd starts");
        let r = Rsyslog { child };
        let listening =
            wait_until(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(
            listening,
            "rsyslogd does not listen on {port}: {}",
            std::fs::read_to_string(dir.join("rsyslogd.log")).unwrap_or_default()
        );
        r
    }

    fn kill(mut self) {
        signal(self.child.id(), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rsyslogd() -> PathBuf {
    ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("rsyslogd is not installed (Debian package rsyslog; .ci/run installs it)")
}

/// rsyslog's file: `(app-name, msgid, severity, json)` per line; a line
/// that is not that (a framing error would split or join messages) fails.
fn received(path: &Path) -> Vec<(String, String, String, serde_json::Value)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let mut next = || parts.next().unwrap_or_default().to_owned();
            let (app, msgid, sev, msg) = (next(), next(), next(), next());
            let json = serde_json::from_str(msg.trim())
                .unwrap_or_else(|e| panic!("a message that is not one JSON document ({e}): {l}"));
            (app, msgid, sev, json)
        })
        .collect()
}

fn event_ids(lines: &[(String, String, String, serde_json::Value)]) -> Vec<String> {
    lines.iter().filter_map(|(_, _, _, j)| j["event"]["id"].as_str().map(str::to_owned)).collect()
}

#[test]
fn every_event_reaches_rsyslog_framed_even_across_a_sigkilled_rsyslog() {
    every_event_reaches_rsyslog_across_a_sigkill(false);
}

#[test]
fn every_event_reaches_rsyslog_over_tls_with_a_client_certificate_across_a_sigkill() {
    every_event_reaches_rsyslog_across_a_sigkill(true);
}

fn every_event_reaches_rsyslog_across_a_sigkill(tls: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tls.then(|| Pki::make(&tmp.path().join("pki")));
    let port = free_port();
    let rsyslog = Rsyslog::start(tmp.path(), port, pki.as_ref());
    let batch_max = 50;
    let tls_settings = match &pki {
        Some(pki) => format!(
            ", tls: {{ca_file: {}, cert_file: {}, key_file: {}}}",
            pki.file("ca.pem"),
            pki.file("client.pem"),
            pki.file("client.key")
        ),
        None => String::new(),
    };
    let extra = format!(
        "outputs:\n  - name: siem\n    type: syslog\n    batch_max: {batch_max}\n    retry_min_ms: 50\n    \
         retry_max_ms: 500\n    poll_ms: 50\n    \
         syslog: {{address: \"127.0.0.1:{port}\", timeout_ms: 5000{tls_settings}}}\n"
    );
    let mut sys = System::start(&[CollectorDef::procmond("pm-s")], &extra);
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let out = tmp.path().join("out.log");
    let churn = Churn::start();

    // The first events arrive; then rsyslog is killed while they flow.
    assert!(
        wait_until(CYCLE, || event_ids(&received(&out)).len() >= 20),
        "nothing reached rsyslog\n{}",
        sys.tail()
    );
    rsyslog.kill();
    let db = sys.database();
    // The output notices and retries (events go on being stored).
    let retrying = wait_until(CYCLE, || stored(&db, "siem").1.is_some_and(|c| c.retried > 0));
    assert!(retrying, "the output never failed while rsyslog was down\n{}", sys.tail());
    let status = sys.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("OUTPUT") && text.contains("siem"), "{text}");
    // A second of outage while events keep coming, then two seconds of
    // them flowing into the restarted rsyslog.
    std::thread::sleep(Duration::from_secs(1));
    let _rsyslog = Rsyslog::start(tmp.path(), port, pki.as_ref());
    std::thread::sleep(Duration::from_secs(2));
    drop(churn);

    // Every event stored up to now arrives, once the output caught up.
    let target = stored(&db, "siem").0.last().map(|e| e.0).unwrap();
    let caught_up = wait_until(CYCLE, || {
        let (events, cursor) = stored(&db, "siem");
        let got: HashSet<String> = event_ids(&received(&out)).into_iter().collect();
        cursor.is_some_and(|c| c.events_through >= target)
            && events.iter().filter(|(id, _)| *id <= target).all(|(_, e)| got.contains(e))
    });
    let (events, cursor) = stored(&db, "siem");
    let lines = received(&out);
    let ids = event_ids(&lines);
    let got: HashSet<&String> = ids.iter().collect();
    let missing: Vec<&String> =
        events.iter().filter(|(id, _)| *id <= target).map(|(_, e)| e).filter(|e| !got.contains(e)).collect();
    assert!(
        caught_up,
        "{} of {} events missing after the restart (first {:?}); cursor {cursor:?}\n{}",
        missing.len(),
        events.len(),
        missing.first(),
        sys.tail()
    );
    // Framed and labelled right: each line one message of ours.
    for (app, msgid, sev, json) in &lines {
        assert_eq!(app, "daemoneye");
        if msgid == "alert" {
            // A built-in rule's: severity from the alert's.
            let want = match json["severity"].as_str().unwrap() {
                "critical" => "2",
                "high" => "3",
                "medium" => "4",
                _ => "5",
            };
            assert_eq!(sev, want, "{json}");
        } else {
            assert_eq!(sev, "6", "events are informational");
            let action = json["event"]["action"].as_str().unwrap();
            assert_eq!(msgid, &format!("process-{action}"));
        }
    }
    // Duplicates: at most one batch, the one written again after the
    // reconnect.
    let mut seen: HashMap<&String, usize> = HashMap::new();
    for id in &ids {
        *seen.entry(id).or_default() += 1;
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    assert!(duplicates <= batch_max, "{duplicates} duplicates (more than one batch of {batch_max})");
    let c = cursor.unwrap();
    // And counted: what was sent again bounds what arrived twice.
    assert!(c.resent >= duplicates as u64 && c.resent > 0, "resent {} for {duplicates} duplicates", c.resent);
    assert!(c.sent >= events.iter().filter(|(id, _)| *id <= target).count() as u64);
    assert_eq!(c.lost, 0);
    assert!(sys.log().contains("output siem: delivering again after"), "{}", sys.tail());

    // status shows the output, caught up.
    let status = sys.cli(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let o = &doc["outputs"][0];
    assert_eq!((o["name"].as_str(), o["state"].as_str()), (Some("siem"), Some("ok")), "{doc}");
    assert!(o["retried"].as_u64().unwrap() > 0 && o["sent"].as_u64().unwrap() > 0, "{doc}");
    assert_eq!(o["resent"].as_u64(), Some(c.resent), "{doc}");
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn tls_receivers_the_agent_cannot_trust_or_that_refuse_it_get_nothing_and_the_status_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::make(&tmp.path().join("pki"));
    let port = free_port();
    let _rsyslog = Rsyslog::start(tmp.path(), port, Some(&pki));
    // An https receiver: socat's TLS in front of a port where nothing
    // listens (the handshake fails before socat would connect to it).
    let https = TlsTerminator::start(&pki, free_port());
    let (ca, other, cert, key) =
        (pki.file("ca.pem"), pki.file("other-ca.pem"), pki.file("client.pem"), pki.file("client.key"));
    let common = "retry_min_ms: 50\n    retry_max_ms: 300\n    poll_ms: 50";
    let extra = format!(
        "outputs:\n\
         \x20 - name: unknown-ca\n    type: syslog\n    {common}\n    \
         syslog: {{address: \"127.0.0.1:{port}\", tls: {{ca_file: {other}, cert_file: {cert}, key_file: {key}}}}}\n\
         \x20 - name: wrong-name\n    type: syslog\n    {common}\n    \
         syslog: {{address: \"127.0.0.1:{port}\", tls: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}, \
         server_name: siem.example}}}}\n\
         \x20 - name: no-client-cert\n    type: syslog\n    {common}\n    \
         syslog: {{address: \"127.0.0.1:{port}\", tls: {{ca_file: {ca}}}}}\n\
         \x20 - name: https-unknown-ca\n    type: http\n    {common}\n    \
         http: {{url: \"https://127.0.0.1:{}/\", tls: {{ca_file: {other}, cert_file: {cert}, key_file: {key}}}}}\n",
        https.port
    );
    let mut sys = System::start(&[CollectorDef::procmond("pm-t")], &extra);
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let _churn = Churn::start();
    let db = sys.database();
    let outputs = [
        ("unknown-ca", "TLS handshake: invalid peer certificate: UnknownIssuer"),
        (
            "wrong-name",
            "TLS handshake: invalid peer certificate: certificate not valid for name \"siem.example\"",
        ),
        // Refused after the handshake (TLS 1.3), before anything counted.
        ("no-client-cert", "TLS handshake: refused by the receiver"),
        ("https-unknown-ca", "invalid peer certificate: UnknownIssuer"),
    ];
    // Each has failed a few times (events were there to send).
    let failed = wait_until(CYCLE, || {
        outputs.iter().all(|(name, _)| stored(&db, name).1.is_some_and(|c| c.retried >= 3))
    });
    assert!(failed, "an output did not fail 3 times\n{}", sys.tail());
    for (name, reason) in outputs {
        let c = stored(&db, name).1.unwrap();
        assert_eq!((c.events_through, c.sent, c.state.as_str()), (0, 0, "retrying"), "{name}: {c:?}");
        let error = c.last_error.clone().unwrap_or_default();
        assert!(error.contains(reason), "{name}: {error}");
    }
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("out.log")).unwrap_or_default(),
        "",
        "rsyslog got messages"
    );
    // The refusals are in the status, as the operator sees them.
    let status = String::from_utf8_lossy(&sys.cli(&["status"]).stdout).into_owned();
    assert!(status.contains("UnknownIssuer"), "{status}");
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_sigkilled_agent_resumes_its_file_output_at_the_cursor_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("events.ndjson");
    let extra = format!(
        "outputs:\n  - name: file\n    type: file\n    send: events\n    batch_max: 20\n    poll_ms: 50\n    \
         file: {{path: {}}}\n  - name: down\n    type: syslog\n    retry_max_ms: 500\n    \
         syslog: {{address: \"127.0.0.1:{}\", timeout_ms: 1000}}\n",
        path.display(),
        free_port()
    );
    let mut sys = System::start(&[CollectorDef::procmond("pm-f")], &extra);
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let churn = Churn::start();
    let db = sys.database();
    // The event ids in the file (100 MiB before a rotation: none here;
    // rotation has its unit test).
    let written = |dir: &Path| -> Vec<String> {
        let text = std::fs::read_to_string(dir.join("events.ndjson")).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                v["event"]["id"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    assert!(wait_until(CYCLE, || written(tmp.path()).len() >= 20), "nothing written\n{}", sys.tail());
    sys.kill_agent();
    drop(churn);
    // Its collector goes on; the restarted agent adopts it, and the
    // output resumes at its cursor.
    sys.start_agent();
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let target = stored(&db, "file").0.last().map(|e| e.0).unwrap();
    let done = wait_until(CYCLE, || {
        let (events, cursor) = stored(&db, "file");
        let got: HashSet<String> = written(tmp.path()).into_iter().collect();
        cursor.is_some_and(|c| c.events_through >= target)
            && events.iter().filter(|(id, _)| *id <= target).all(|(_, e)| got.contains(e))
    });
    assert!(done, "events missing from the file after the agent's restart\n{}", sys.tail());
    let ids = written(tmp.path());
    let unique: HashSet<&String> = ids.iter().collect();
    // A batch written before the kill and not yet marked: at most one.
    assert!(ids.len() - unique.len() <= 20, "{} duplicates", ids.len() - unique.len());
    // The other output's receiver was never there: it retries, holding
    // nothing of the file output's, and says why. (Its thread may not
    // have made its first attempt yet when the file output caught up.)
    wait_until(CYCLE, || stored(&db, "down").1.is_some_and(|c| c.retried > 0));
    let down = stored(&db, "down").1.unwrap();
    assert_eq!((down.events_through, down.sent, down.state.as_str()), (0, 0, "retrying"), "{down:?}");
    assert!(
        down.retried > 0 && down.last_error.as_deref().is_some_and(|e| e.contains("connect")),
        "{down:?}"
    );
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_dead_output_thread_stops_the_agent_with_a_failure_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!(
        "outputs:\n  - name: doomed\n    type: file\n    file: {{path: {}}}\n",
        tmp.path().join("x.ndjson").display()
    );
    let mut sys = System::create(&[CollectorDef::procmond("pm-o")], &extra);
    let mut agent = Command::new(daemoneye_tests::bin("daemoneye-agent"));
    agent
        .arg("--config")
        .arg(sys.dir.path().join("agent.yaml"))
        .env("DAEMONEYE_TEST_PANIC", "agent-output-doomed");
    sys.spawn_agent(agent);
    let mut child = sys.agent.take().expect("agent");
    let mut status = None;
    let ended = wait_until(Duration::from_secs(30), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    assert!(ended, "the agent kept running with a dead output thread\n{}", sys.tail());
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", sys.tail());
    assert!(sys.log().contains("thread agent-output-doomed ended unexpectedly"), "{}", sys.tail());
}

/// The fenced block of README.md that starts with `first_line`.
fn readme_block(first_line: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find(first_line).unwrap_or_else(|| panic!("README.md has no block {first_line:?}"));
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end].to_owned()
}

#[test]
fn the_readmes_rsyslog_example_works_as_pasted() {
    readme_example_works("# /etc/rsyslog.d/daemoneye.conf", "# agent.yaml\noutputs:", "1514", None);
}

#[test]
fn the_readmes_rsyslog_tls_example_works_as_pasted() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::make(tmp.path());
    readme_example_works(
        "# /etc/rsyslog.d/daemoneye-tls.conf",
        "# agent.yaml, over TLS\n",
        "6514",
        Some(&pki),
    );
}

/// Runs README's rsyslog configuration starting `rsyslog_block` and its
/// agent.yaml starting `yaml_block`; only the port, the output file and
/// the certificates' paths are the test's own.
fn readme_example_works(rsyslog_block: &str, yaml_block: &str, readme_port: &str, pki: Option<&Pki>) {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = tmp.path().join("daemoneye.ndjson");
    let mut conf = readme_block(rsyslog_block)
        .replace(&format!("port=\"{readme_port}\""), &format!("port=\"{port}\""))
        .replace("/var/log/daemoneye.ndjson", &out.display().to_string());
    let mut yaml =
        readme_block(yaml_block).replace(&format!("127.0.0.1:{readme_port}"), &format!("127.0.0.1:{port}"));
    if let Some(pki) = pki {
        for (readme, ours) in
            [("ca.pem", "ca.pem"), ("server.pem", "server.pem"), ("server.key", "server.key")]
        {
            conf = conf.replace(&format!("/etc/rsyslog.d/tls/{readme}"), &pki.file(ours));
        }
        for (readme, ours) in [("ca.pem", "ca.pem"), ("agent.pem", "client.pem"), ("agent.key", "client.key")]
        {
            yaml = yaml.replace(&format!("/etc/daemoneye/tls/{readme}"), &pki.file(ours));
        }
        let stray = |text: &str| text.lines().any(|l| !l.starts_with('#') && l.contains("/etc/"));
        assert!(!stray(&conf) && !stray(&yaml), "a path not replaced:\n{conf}\n{yaml}");
    }
    std::fs::write(tmp.path().join("check.conf"), &conf).unwrap();
    let check =
        Command::new(rsyslogd()).arg("-N1").arg("-f").arg(tmp.path().join("check.conf")).output().unwrap();
    assert!(check.status.success(), "rsyslogd -N1: {}", String::from_utf8_lossy(&check.stderr));
    let _rsyslog = Rsyslog::start_with(tmp.path(), port, &conf);
    let mut sys = System::start(&[CollectorDef::procmond("pm-r")], &yaml);
    let _churn = Churn::start();
    let lines = || -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    };
    assert!(wait_until(CYCLE, || lines().len() >= 20), "README's rsyslog got nothing\n{}", sys.tail());
    for doc in lines() {
        let id = doc["event"]["id"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| doc["id"].as_i64().map(|i| i.to_string()));
        assert!(id.is_some(), "a document without its id: {doc}");
    }
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}
