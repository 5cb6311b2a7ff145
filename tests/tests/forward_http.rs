//! The `http` output against an HTTP server in this test (loopback, a
//! thread per connection) that misbehaves on purpose: it answers 500,
//! answers after the agent's timeout (having kept the documents), closes
//! the connection without answering (before or after keeping them) and,
//! as Elasticsearch's `_bulk`, accepts only part of a batch. Whatever it
//! does, every stored event reaches it, and in `_bulk` mode each `_id`
//! is one document whose content never changes across retries.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use daemoneye_agent::api::AgentState;
use daemoneye_tests::forwarding::{Churn, Pki, TlsTerminator, stored};
use daemoneye_tests::{CYCLE, CollectorDef, System, wait_until};

/// What the server received and kept.
#[derive(Default)]
struct Received {
    /// `_bulk`: the document of each `_id`; NDJSON: of each `event.id`.
    docs: HashMap<String, String>,
    /// Documents that arrived again (a retry).
    repeats: u64,
    /// A repeated `_id` whose document differed from the first.
    changed: Vec<String>,
    /// Each request's `Authorization` and `Content-Encoding` headers.
    headers: Vec<(Option<String>, Option<String>)>,
    /// What the misbehaviour was, per kind.
    tricks: HashMap<&'static str, u64>,
}

/// The test's HTTP server.
struct Server {
    port: u16,
    received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
}

/// What one request gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trick {
    Error500,
    /// Keep the documents, answer after the client gave up.
    Late,
    /// Close without an answer, keeping nothing.
    Hangup,
    /// Keep the documents, then close without an answer.
    KeepAndHangup,
    /// `_bulk`: keep every other document, refuse the rest with 429.
    Partial,
    Ok,
}

impl Server {
    /// Listens on a loopback port; `bulk` speaks `_bulk`, else NDJSON.
    /// `late_ms`: how long a late answer waits (past the agent's timeout).
    fn start(bulk: bool, late_ms: u64) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (r, s) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (r, count) = (r.clone(), count.clone());
                std::thread::spawn(move || serve(conn, bulk, late_ms, &r, &count));
            }
        });
        Server { port, received, stop }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One connection: requests until the client closes it or a trick does.
fn serve(conn: TcpStream, bulk: bool, late_ms: u64, received: &Mutex<Received>, count: &AtomicU64) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if headers.get("content-encoding").is_some_and(|e| e == "gzip") {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut plain).expect("a gzip body");
            body = plain;
        }
        let text = String::from_utf8(body).expect("a UTF-8 body");
        let n = count.fetch_add(1, Ordering::Relaxed);
        // A fixed cycle of misbehaviours, a good request between each.
        let tricks = [Trick::Error500, Trick::Late, Trick::Hangup, Trick::KeepAndHangup, Trick::Partial];
        let trick = if n.is_multiple_of(2) { Trick::Ok } else { tricks[(n / 2) as usize % tricks.len()] };
        let trick = if trick == Trick::Partial && !bulk { Trick::Ok } else { trick };
        let answer = {
            let mut r = received.lock().unwrap();
            r.headers.push((headers.get("authorization").cloned(), headers.get("content-encoding").cloned()));
            let name = match trick {
                Trick::Error500 => "500",
                Trick::Late => "late",
                Trick::Hangup => "hangup",
                Trick::KeepAndHangup => "keep-and-hangup",
                Trick::Partial => "partial",
                Trick::Ok => "ok",
            };
            *r.tricks.entry(name).or_default() += 1;
            match trick {
                Trick::Error500 | Trick::Hangup => None,
                _ if bulk => Some(keep_bulk(&mut r, &text, trick == Trick::Partial)),
                _ => Some(keep_ndjson(&mut r, &text)),
            }
        };
        let reply = |conn: &mut TcpStream, status: &str, body: &str| {
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(body.as_bytes()));
        };
        match (trick, answer) {
            (Trick::Error500, _) => reply(&mut conn, "500 Internal Server Error", "{\"error\":\"boom\"}"),
            (Trick::Hangup | Trick::KeepAndHangup, _) => return,
            (Trick::Late, Some(answer)) => {
                std::thread::sleep(Duration::from_millis(late_ms));
                reply(&mut conn, "200 OK", &answer);
                return;
            }
            (_, answer) => reply(&mut conn, "200 OK", &answer.unwrap_or_default()),
        }
    }
}

/// Keeps a `_bulk` body's documents (every other one with `partial`) and
/// returns the answer: 201 created, 409 already there, 429 refused.
fn keep_bulk(r: &mut Received, text: &str, partial: bool) -> String {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() % 2, 0, "action and document lines in pairs: {text}");
    let mut items = Vec::new();
    for (i, pair) in lines.chunks(2).enumerate() {
        let action: serde_json::Value = serde_json::from_str(pair[0]).expect("an action line");
        let id = action["create"]["_id"].as_str().expect("create with an _id").to_owned();
        assert_eq!(action["create"]["_index"], "daemoneye-test");
        let status = if partial && i % 2 == 1 {
            429
        } else if let Some(first) = r.docs.get(&id) {
            if first != pair[1] {
                r.changed.push(id.clone());
            }
            r.repeats += 1;
            409
        } else {
            r.docs.insert(id.clone(), pair[1].to_owned());
            201
        };
        items.push(serde_json::json!({"create": {"_id": id, "status": status}}));
    }
    serde_json::json!({"took": 1, "errors": items.iter().any(|i| i["create"]["status"] != 201), "items": items})
        .to_string()
}

/// Keeps an NDJSON body's documents by `event.id`; answers `{}`.
fn keep_ndjson(r: &mut Received, text: &str) -> String {
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("one JSON document per line");
        let id = v["event"]["id"].as_str().expect("an event.id").to_owned();
        if r.docs.insert(id, line.to_owned()).is_some() {
            r.repeats += 1;
        }
    }
    "{}".to_owned()
}

/// Runs a procmond with churn until every stored event (up to a point
/// reached after the churn) is at the server and the cursor passed it.
fn run(server: &Server, http: &str) -> (System, String) {
    run_at(server, &format!("http://127.0.0.1:{}", server.port), http)
}

/// [`run`] with the server reached at `url` (through a TLS terminator).
fn run_at(server: &Server, url: &str, http: &str) -> (System, String) {
    let extra = format!(
        "outputs:\n  - name: web\n    type: http\n    send: events\n    batch_max: 500\n    poll_ms: 50\n    \
         retry_min_ms: 20\n    retry_max_ms: 200\n    http: {{url: \"{url}\", {http}, timeout_ms: 700}}\n"
    );
    let mut sys = System::start(&[CollectorDef::procmond("pm-h")], &extra);
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    // Four seconds of process churn: events while the server misbehaves.
    let churn = Churn::start();
    std::thread::sleep(Duration::from_secs(4));
    drop(churn);
    let db = sys.database();
    let target = stored(&db, "web").0.last().map(|e| e.0).expect("events stored");
    let mut missing = Vec::new();
    let done = wait_until(Duration::from_secs(120), || {
        let (events, cursor) = stored(&db, "web");
        let r = server.received.lock().unwrap();
        missing = events
            .iter()
            .filter(|(id, e)| *id <= target && !r.docs.contains_key(e))
            .map(|e| e.1.clone())
            .collect();
        cursor.is_some_and(|c| c.events_through >= target) && missing.is_empty()
    });
    let tail = sys.tail();
    assert!(done, "{} events missing at the server, e.g. {:?}\n{tail}", missing.len(), missing.first());
    let status = String::from_utf8_lossy(&sys.cli(&["status"]).stdout).into_owned();
    (sys, status)
}

#[test]
fn elasticsearch_bulk_keeps_one_document_per_id_through_errors_timeouts_hangups_and_partial_answers() {
    let server = Server::start(true, 1_500);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("es-credentials");
    std::fs::write(&secret, "elastic:ch@nge me\n").unwrap();
    let http = format!(
        "format: elasticsearch, index: daemoneye-test, gzip: true, basic_auth_file: {}",
        secret.display()
    );
    let (mut sys, status) = run(&server, &http);
    let r = server.received.lock().unwrap();
    assert!(r.changed.is_empty(), "an _id sent again with another document: {:?}", r.changed);
    for trick in ["500", "late", "hangup", "keep-and-hangup", "partial", "ok"] {
        assert!(r.tricks.get(trick).is_some_and(|&n| n > 0), "{trick} never happened: {:?}", r.tricks);
    }
    assert!(r.repeats > 0, "the late answers and kept hangups make repeats, answered 409");
    // user:password in base64, and every body compressed.
    let basic = "Basic ZWxhc3RpYzpjaEBuZ2UgbWU=";
    assert!(r.headers.iter().all(|(a, e)| a.as_deref() == Some(basic) && e.as_deref() == Some("gzip")));
    // The status shows the failures as retries (its lag is whatever the
    // host made since: not the test's to compare).
    let line = status.lines().find(|l| l.starts_with("web ")).unwrap_or_else(|| panic!("{status}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert!(cells[2].parse::<u64>().is_ok(), "lag: {line}");
    assert!(cells[5].parse::<u64>().is_ok_and(|n| n > 0), "retried: {line}");
    drop(r);
    assert!(sys.stop(Duration::from_secs(30)).success(), "{}", sys.tail());
}

#[test]
fn ndjson_reaches_the_endpoint_whole_with_its_bearer_token() {
    let server = Server::start(false, 1_500);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token");
    std::fs::write(&secret, "t0ken\n").unwrap();
    let http = format!("bearer_token_file: {}", secret.display());
    let (mut sys, _) = run(&server, &http);
    let r = server.received.lock().unwrap();
    assert!(r.headers.iter().all(|(a, e)| a.as_deref() == Some("Bearer t0ken") && e.is_none()));
    assert!(r.tricks.get("500").is_some_and(|&n| n > 0), "{:?}", r.tricks);
    drop(r);
    // The secret never reaches the log.
    assert!(!sys.log().contains("t0ken"));
    assert!(sys.stop(Duration::from_secs(30)).success(), "{}", sys.tail());
}

#[test]
fn ndjson_over_https_with_a_client_certificate_reaches_the_endpoint_whole() {
    // The same misbehaving server, behind socat's TLS (OpenSSL), which
    // requires a client certificate of the test CA.
    let server = Server::start(false, 1_500);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let tls = TlsTerminator::start(&pki, server.port);
    let http = format!(
        "gzip: true, tls: {{ca_file: {}, cert_file: {}, key_file: {}}}",
        pki.file("ca.pem"),
        pki.file("client.pem"),
        pki.file("client.key")
    );
    // `localhost`: the name in the server's certificate.
    let (mut sys, _) = run_at(&server, &format!("https://localhost:{}/ingest", tls.port), &http);
    let r = server.received.lock().unwrap();
    assert!(r.tricks.get("500").is_some_and(|&n| n > 0), "{:?}", r.tricks);
    assert!(r.headers.iter().all(|(_, e)| e.as_deref() == Some("gzip")));
    drop(r);
    assert!(sys.stop(Duration::from_secs(30)).success(), "{}", sys.tail());
}

/// The agent's resident memory, KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn hostile_receivers_hold_only_their_own_output() {
    // One that accepts and never reads; one that answers HTTP with garbage.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in mute.incoming().flatten() {
            held.push(c);
        }
    });
    let liar = TcpListener::bind("127.0.0.1:0").unwrap();
    let liar_port = liar.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in liar.incoming().flatten() {
            let mut buf = [0u8; 65536];
            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"\x00\xffHTTP/9 banana\r\n\x01\x02\r\n\r\n\xfe garbage");
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("events.ndjson");
    let extra = format!(
        "outputs:\n  - name: mute\n    type: syslog\n    send: events\n    retry_max_ms: 300\n    \
         syslog: {{address: \"127.0.0.1:{mute_port}\", timeout_ms: 500}}\n  - name: liar\n    type: http\n    \
         send: events\n    retry_max_ms: 300\n    http: {{url: \"http://127.0.0.1:{liar_port}/in\", timeout_ms: 500}}\n  \
         - name: file\n    type: file\n    send: events\n    poll_ms: 50\n    file: {{path: {}}}\n",
        file.display()
    );
    let mut sys = System::start(&[CollectorDef::procmond("pm-x")], &extra);
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let rss_before = rss_kib(sys.agent_pid());
    // Six seconds of process churn: events while the receivers misbehave.
    let churn = Churn::start();
    std::thread::sleep(Duration::from_secs(6));
    drop(churn);
    let db = sys.database();
    let target = stored(&db, "file").0.last().map(|e| e.0).expect("events stored");
    // The file output is not held up: everything stored reaches it.
    let ids_in_file = || -> std::collections::HashSet<String> {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["event"]["id"].as_str().map(str::to_owned))
            .collect()
    };
    let complete = wait_until(CYCLE, || {
        let (events, cursor) = stored(&db, "file");
        let got = ids_in_file();
        cursor.is_some_and(|c| c.events_through >= target)
            && events.iter().filter(|(id, _)| *id <= target).all(|(_, e)| got.contains(e))
    });
    assert!(complete, "the file output was held up by the hostile receivers\n{}", sys.tail());
    // The liar's answers are failures with a reason, never a delivery.
    let liar = stored(&db, "liar").1.expect("the liar output's row");
    assert_eq!(liar.events_through, 0, "nothing counts as delivered to a receiver that answers garbage");
    assert!(liar.retried > 0 && liar.last_error.is_some(), "{liar:?}");
    // The agent stays responsive and its memory bounded (generously: a
    // leak per attempt or per batch held would pass this in minutes).
    assert!(sys.status().is_some_and(|s| s.state == AgentState::SteadyState), "{}", sys.tail());
    let grown = rss_kib(sys.agent_pid()).saturating_sub(rss_before);
    assert!(grown < 32 * 1024, "the agent grew by {grown} KiB");
    assert!(sys.stop(Duration::from_secs(30)).success(), "{}", sys.tail());
}
