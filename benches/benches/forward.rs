//! Forwarding: a store of 100,000 events (as a procmond stores them)
//! delivered by one output thread, as the agent runs it
//! (`daemoneye_agent::forward::Outputs`), into a real rsyslogd on a
//! loopback port (imtcp, a file action), into an NDJSON file, and into an
//! HTTP server in this process (NDJSON and `_bulk`). Reports events per
//! second until the output's cursor reached the last event, this
//! process's CPU per 1,000 events, and that every document arrived. Then
//! the lag at a steady 1,000 events/s (p50, p99, max: from the store's
//! commit to the line in the output's file). `-- down` instead measures
//! this process's RSS while an output's receiver is down for
//! `DAEMONEYE_BENCH_DOWN_SECS` (default 600) at 1,000 events/s. Owns
//! `main`; rsyslog's cases need rsyslogd (package rsyslog), its TLS case
//! rsyslog-openssl and the openssl command (and the `tls` feature, on by
//! default).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daemoneye_agent::config::AgentConfig;
use daemoneye_agent::forward::{AlertFn, Outputs};
use daemoneye_benches::{cpu_of, rss_kib};
use daemoneye_contract::event::EventKind;
use daemoneye_contract::testing::{envelope, record};
use daemoneye_store::EventStore;
use daemoneye_tests::forwarding::Pki;

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
    // `cargo bench` passes --bench; `down` picks the long memory run.
    if std::env::args().skip(1).any(|a| a == "down") {
        down();
        return;
    }
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

    // HTTP, NDJSON and `_bulk`, into a server in this process (its CPU is
    // in the figure: a receiver that only counts lines).
    for (name, output, format) in
        [("http (NDJSON)", "web", "ndjson"), ("http (_bulk)", "es", "elasticsearch")]
    {
        let server = HttpServer::start(format == "elasticsearch");
        let yaml = format!(
            "outputs:\n  - {{name: {output}, type: http, batch_max: 1000, \
             http: {{url: \"http://127.0.0.1:{}\", format: {format}}}}}\n",
            server.port
        );
        let (secs, cpu) = run(&db, &yaml);
        assert_eq!(server.documents.load(Ordering::Relaxed), EVENTS, "{name}: every document arrived once");
        report(name, secs, cpu);
    }

    lag(dir.path());

    // rsyslog over TCP, then over TLS (its OpenSSL driver).
    let Some(rsyslogd) = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"].into_iter().find(|p| Path::new(p).exists())
    else {
        println!("rsyslog: skipped (rsyslogd is not installed: apt-get install rsyslog)");
        return;
    };
    rsyslog(dir.path(), &db, rsyslogd, None);
    if cfg!(feature = "tls") {
        let pki = Pki::make(&dir.path().join("pki"));
        rsyslog(dir.path(), &db, rsyslogd, Some(&pki));
    }
}

/// Delivers the store into a real rsyslogd on a loopback port; with
/// `tls`, over TLS (the PKI's server certificate, no client certificate
/// asked for).
fn rsyslog(dir: &Path, db: &Path, rsyslogd: &str, tls: Option<&Pki>) {
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let name = if tls.is_some() { "tls" } else { "tcp" };
    let out = dir.join(format!("rsyslog-{name}.out"));
    let work = dir.join(format!("work-{name}"));
    std::fs::create_dir_all(&work).expect("work dir");
    let (driver, imtcp) = tls.map(|pki| pki.rsyslog_params("anon")).unwrap_or_default();
    let settings = tls.map(|pki| format!(", tls: {{ca_file: {}}}", pki.file("ca.pem"))).unwrap_or_default();
    let conf = format!(
        "global(workDirectory=\"{}\" maxMessageSize=\"256k\"{driver})\nmodule(load=\"imtcp\"{imtcp})\n\
         template(name=\"t\" type=\"string\" string=\"%msg%\\n\")\n\
         ruleset(name=\"r\") {{ action(type=\"omfile\" file=\"{}\" template=\"t\") }}\n\
         input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"r\")\n",
        work.display(),
        out.display()
    );
    let conf_path = dir.join(format!("rsyslog-{name}.conf"));
    std::fs::write(&conf_path, conf).expect("conf");
    let mut child = Command::new(rsyslogd)
        .args(["-n", "-f"])
        .arg(&conf_path)
        .arg("-i")
        .arg(dir.join(format!("rsyslog-{name}.pid")))
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
        "outputs:\n  - {{name: siem-{name}, type: syslog, batch_max: 1000, \
         syslog: {{address: \"127.0.0.1:{port}\"{settings}}}}}\n"
    );
    let (secs, cpu) = run(db, &yaml);
    let t = Instant::now();
    while (lines(&out) as u64) < EVENTS && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let rs_cpu = cpu_of(child.id()).ms_since(&rs_cpu0, 100);
    let _ = child.kill();
    let _ = child.wait();
    report(if tls.is_some() { "rsyslog (TLS, loopback)" } else { "rsyslog (TCP, loopback)" }, secs, cpu);
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

/// An HTTP receiver on a loopback port that counts the documents of each
/// POST and answers 200 (`{}`, or a `_bulk` answer of one 201 per item).
struct HttpServer {
    port: u16,
    documents: Arc<AtomicU64>,
}

impl HttpServer {
    fn start(bulk: bool) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let documents = Arc::new(AtomicU64::new(0));
        let count = documents.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let count = count.clone();
                std::thread::spawn(move || serve(conn, bulk, &count));
            }
        });
        HttpServer { port, documents }
    }
}

fn serve(conn: TcpStream, bulk: bool, count: &AtomicU64) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    let mut line = String::new();
    loop {
        let mut len = 0;
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line.trim_end().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut docs = body.iter().filter(|&&b| b == b'\n').count() as u64;
        let answer = if bulk {
            docs /= 2;
            let item = r#"{"create":{"status":201}}"#;
            let items = vec![item; docs as usize].join(",");
            format!(r#"{{"took":1,"errors":false,"items":[{items}]}}"#)
        } else {
            "{}".to_owned()
        };
        count.fetch_add(docs, Ordering::Relaxed);
        // One write: a head and a body in two small writes meet Nagle's
        // algorithm and the client's delayed ACK (40 ms per request).
        let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}", answer.len());
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// Events committed at `per_sec` (a batch every 10 ms, as a store writer
/// commits), `seq` from after the 100,000, until `stop`; each commit is
/// announced on `times` as (first seq of the batch, its count, when it
/// starts).
fn feed(db: &Path, per_sec: u64, stop: &AtomicBool, times: &crossbeam_channel::Sender<(u64, u64, Instant)>) {
    let mut store = EventStore::open(db).expect("store");
    let per_batch = (per_sec / 100).max(1);
    let mut seq = EVENTS + 1;
    let start = Instant::now();
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<_> = (seq..seq + per_batch)
            .map(|s| {
                let rec = record(u32::try_from(1000 + s % 30_000).unwrap_or(1), s, "bash");
                envelope("procmond", 1, s, EventKind::Started, rec, 1_700_000_000_000 + s)
            })
            .collect();
        // Said before the commit, so the reader knows of it before any
        // output can: the lag counts from the commit's start.
        let _ = times.send((seq, per_batch, Instant::now()));
        store.insert_batch(&batch).expect("insert");
        seq += per_batch;
        n += 1;
        let next = start + Duration::from_millis(10) * n;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// Outputs running over a new store that a thread feeds at 1,000
/// events/s.
struct Feeding {
    outputs: Outputs,
    stop: Arc<AtomicBool>,
    feeder: std::thread::JoinHandle<()>,
    /// Each commit: (first seq, count, when).
    commits: crossbeam_channel::Receiver<(u64, u64, Instant)>,
}

impl Feeding {
    fn start(db: &Path, outputs_yaml: &str) -> Feeding {
        let cfg_dir = tempfile::tempdir().expect("tempdir");
        let cfg = AgentConfig::parse(outputs_yaml, "bench", cfg_dir.path()).expect("config");
        EventStore::open(db).expect("store");
        let alert: AlertFn = Arc::new(|_: &str, _: &str, _: &str| {});
        let outputs = Outputs::start(db, &cfg.outputs, alert).expect("outputs");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, commits) = crossbeam_channel::unbounded();
        let feeder = {
            let (db, stop) = (db.to_owned(), stop.clone());
            std::thread::spawn(move || feed(&db, 1000, &stop, &tx))
        };
        Feeding { outputs, stop, feeder, commits }
    }
}

/// Lag at 1,000 events/s through the file output (its default `poll_ms`,
/// 250): from each batch's commit to its lines in the file, for 30 s.
fn lag(dir: &Path) {
    let db = dir.join("lag.db");
    let file = dir.join("lag.ndjson");
    // The output starts at the end of what is there: only fed events count.
    let yaml = format!("outputs:\n  - {{name: lag, type: file, file: {{path: {}}}}}\n", file.display());
    let Feeding { outputs, stop, feeder, commits: rx } = Feeding::start(&db, &yaml);
    let committed: std::cell::RefCell<std::collections::HashMap<u64, Instant>> = Default::default();
    let mut lags = Vec::new();
    let mut offset = 0usize;
    let t0 = Instant::now();
    let mut read_new = |lags: &mut Vec<Duration>| {
        // The new whole lines, then the commits announced so far: a line
        // read was committed, so announced, before it was read.
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&file) {
            use std::io::Seek;
            let _ = f.seek(std::io::SeekFrom::Start(offset as u64)).and_then(|_| f.read_to_string(&mut text));
        }
        let now = Instant::now();
        for (first, count, at) in rx.try_iter() {
            for s in first..first + count {
                committed.borrow_mut().insert(s, at);
            }
        }
        let Some(end) = text.rfind('\n') else { return };
        for l in text[..end].lines() {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            let seq: u64 =
                v["event"]["id"].as_str().and_then(|id| id.rsplit('/').next()?.parse().ok()).expect("id");
            if let Some(at) = committed.borrow_mut().remove(&seq) {
                lags.push(now - at);
            }
        }
        offset += end + 1;
    };
    while t0.elapsed() < Duration::from_secs(30) {
        read_new(&mut lags);
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    feeder.join().expect("feeder");
    let t = Instant::now();
    while !committed.borrow().is_empty() && t.elapsed() < Duration::from_secs(10) {
        read_new(&mut lags);
        std::thread::sleep(Duration::from_millis(2));
    }
    outputs.shutdown();
    let missing: Vec<u64> = committed.borrow().keys().copied().collect();
    assert!(
        missing.is_empty(),
        "{} fed events never reached the file (seq {:?} .. {:?}; {} reached it)",
        missing.len(),
        missing.iter().min(),
        missing.iter().max(),
        lags.len()
    );
    lags.sort();
    let pct = |p: usize| lags[(lags.len() * p / 100).min(lags.len() - 1)].as_secs_f64() * 1000.0;
    println!(
        "lag at 1,000 events/s (file output, poll_ms 250), {} events: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        lags.len(),
        pct(50),
        pct(99),
        lags.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    );
}

/// This process's RSS while an output's receiver is down (a closed port)
/// and events come at 1,000/s, with a file output beside it that keeps
/// up: sampled each minute.
fn down() {
    let secs: u64 =
        std::env::var("DAEMONEYE_BENCH_DOWN_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("down.db");
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let yaml = format!(
        "outputs:\n  - {{name: down, type: syslog, syslog: {{address: \"127.0.0.1:{port}\"}}}}\n  \
         - {{name: file, type: file, file: {{path: {}}}}}\n",
        dir.path().join("down.ndjson").display()
    );
    let Feeding { outputs, stop, feeder, commits: rx } = Feeding::start(&db, &yaml);
    let t0 = Instant::now();
    let mut samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(secs.min(60)));
        rx.try_iter().for_each(drop);
        samples.push((t0.elapsed().as_secs(), rss_kib()));
        println!("down: {:>4} s, RSS {} KiB", t0.elapsed().as_secs(), rss_kib());
    }
    stop.store(true, Ordering::Relaxed);
    feeder.join().expect("feeder");
    outputs.shutdown();
    let first = samples.first().map_or(0, |s| s.1);
    let last = samples.last().map_or(0, |s| s.1);
    println!(
        "down for {secs} s at 1,000 events/s: RSS {first} KiB after the first sample, {last} KiB at the end ({:+} KiB)",
        last as i64 - first as i64
    );
}
