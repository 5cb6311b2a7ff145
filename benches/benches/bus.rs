//! Bus benchmark, all in one run: request/reply round trips through the
//! `daemoneye-bus` broker across three processes (requester, broker,
//! responder), with the blocking `Client` (what users get) and with a raw
//! blocking client speaking the wire protocol (the broker's own cost), at
//! 64 B and 256 B, unpinned and pinned to one core (`taskset -c 0`); a raw
//! Unix-socket ping-pong between two processes (the limit); one-way
//! throughput 1 publisher -> 1 subscriber at 256 B, and fan-out 1 -> 8
//! subscribers under a flood with every drop counted (broker and client
//! side, against what was sent); and the same round trip and 1 -> 1
//! throughput through Mosquitto (MQTT 3.1.1, QoS 0, over a Unix socket)
//! and nats-server (TCP 127.0.0.1) with tiny hand-written blocking protocol
//! clients. The peers are started and killed (by their own pid) by the
//! harness, in temp dirs; when one is not installed the harness says so and
//! measures the rest. The harness re-runs its own binary as every process
//! (`DAEMONEYE_BENCH_BUS_ROLE=<role>`).
//!
//! Run: `cargo bench -p daemoneye-benches --bench bus` (about a minute).
//! `DAEMONEYE_BENCH_RT=20000` sets the round trips per case,
//! `DAEMONEYE_BENCH_FLOOD_SECS=2` the flood length; a word after `--`
//! runs only the cases whose name contains it.
#![forbid(unsafe_code)]

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig, Frame, Mode, Overflow, decode, encode};

const ROLE: &str = "DAEMONEYE_BENCH_BUS_ROLE";
/// Socket path (bus, ping-pong, Mosquitto) or `host:port` (NATS).
const ADDR: &str = "DAEMONEYE_BENCH_ADDR";
const PAYLOAD: &str = "DAEMONEYE_BENCH_PAYLOAD";
const COUNT: &str = "DAEMONEYE_BENCH_COUNT";
const SECS: &str = "DAEMONEYE_BENCH_SECS";
const ID: &str = "DAEMONEYE_BENCH_ID";
const OVERFLOW: &str = "DAEMONEYE_BENCH_OVERFLOW";
const QUEUE_MSGS: &str = "DAEMONEYE_BENCH_QUEUE_MSGS";

const WARMUP: usize = 2_000;
const RPC_TOPIC: &str = "bench.rpc";
const FLOOD_TOPIC: &str = "bench.flood";
const FLOOD_PAYLOAD: usize = 256;
const FANOUT: usize = 8;
/// A subscriber that sees nothing for this long stops counting.
const IDLE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Small helpers shared by every role.

fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn other(e: impl ToString) -> io::Error {
    io::Error::other(e.to_string())
}

/// Latency summary of one case, in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Lat {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: u64,
    /// Round trips per second over the measured loop.
    rate: f64,
}

impl Lat {
    fn line(&self) -> String {
        format!(
            "result p50={} p99={} p999={} max={} mean={} rate={:.0}",
            self.p50, self.p99, self.p999, self.max, self.mean, self.rate
        )
    }

    fn parse(line: &str) -> Lat {
        let kv = kv(line);
        let g = |k: &str| kv.iter().find(|(a, _)| a == k).map_or(0.0, |(_, v)| *v);
        Lat {
            p50: g("p50") as u64,
            p99: g("p99") as u64,
            p999: g("p999") as u64,
            max: g("max") as u64,
            mean: g("mean") as u64,
            rate: g("rate"),
        }
    }
}

/// `key=value` pairs (numbers) of a result line.
fn kv(line: &str) -> Vec<(String, f64)> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

fn get(kv: &[(String, f64)], k: &str) -> f64 {
    kv.iter().find(|(a, _)| a == k).map_or(0.0, |(_, v)| *v)
}

/// Runs `WARMUP` then `n` timed round trips and summarizes them.
fn measure(n: usize, mut rt: impl FnMut() -> io::Result<()>) -> io::Result<Lat> {
    for _ in 0..WARMUP {
        rt()?;
    }
    let mut ns = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        rt()?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    let total = start.elapsed();
    ns.sort_unstable();
    let pct = |p: f64| ns[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Ok(Lat {
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        max: ns[n - 1],
        mean: ns.iter().sum::<u64>() / n as u64,
        rate: n as f64 / total.as_secs_f64(),
    })
}

/// Publishes with `send` for `secs` seconds, then `end` (the end marker),
/// and prints how many were sent.
fn flood(
    secs: f64,
    mut send: impl FnMut() -> io::Result<()>,
    end: impl FnOnce() -> io::Result<()>,
) -> ExitCode {
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut sent: u64 = 0;
    loop {
        for _ in 0..256 {
            if let Err(e) = send() {
                say(&format!("error publish: {e}"));
                return ExitCode::FAILURE;
            }
        }
        sent += 256;
        if start.elapsed() >= limit {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Err(e) = end() {
        say(&format!("error end marker: {e}"));
        return ExitCode::FAILURE;
    }
    say(&format!("result sent={sent} secs={secs:.6}"));
    ExitCode::SUCCESS
}

/// Counts messages until the end marker (`next` returns `Some(true)`) or
/// `IDLE` without any (`None`); prints the count and the rate between the
/// first and the last message.
fn count(mut next: impl FnMut() -> Option<bool>, extra: impl FnOnce() -> String) -> ExitCode {
    let mut received: u64 = 0;
    let mut first = None;
    let mut last = Instant::now();
    let mut ended = false;
    while let Some(end) = next() {
        if end {
            ended = true;
            break;
        }
        last = Instant::now();
        first.get_or_insert(last);
        received += 1;
    }
    let secs = first.map_or(0.0, |f: Instant| (last - f).as_secs_f64());
    say(&format!("result received={received} secs={secs:.6} ended={} {}", u8::from(ended), extra()));
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------
// A raw blocking client of the bus wire protocol: one socket, no thread.

struct RawBus {
    s: UnixStream,
    rbuf: Vec<u8>,
    pos: usize,
    end: usize,
    wbuf: Vec<u8>,
}

impl RawBus {
    fn connect(path: &Path, id: &str) -> io::Result<RawBus> {
        let s = UnixStream::connect(path)?;
        let mut b =
            RawBus { s, rbuf: vec![0; 256 * 1024], pos: 0, end: 0, wbuf: Vec::with_capacity(1 << 17) };
        b.queue(&Frame::Hello {
            protocol_version: daemoneye_bus::PROTOCOL_VERSION,
            client_id: id,
            pid: std::process::id(),
        })?;
        b.flush()?;
        match b.next(|f| matches!(f, Frame::WelcomeAs { .. }))? {
            true => Ok(b),
            false => Err(other("no Welcome")),
        }
    }

    fn queue(&mut self, f: &Frame<'_>) -> io::Result<()> {
        encode(f, &mut self.wbuf, u32::MAX).map_err(other)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.s.write_all(&self.wbuf)?;
        self.wbuf.clear();
        Ok(())
    }

    /// Hands the next frame to `f`.
    fn next<R>(&mut self, f: impl FnOnce(Frame<'_>) -> R) -> io::Result<R> {
        loop {
            if let Some((frame, n)) = decode(&self.rbuf[self.pos..self.end], u32::MAX).map_err(other)? {
                let r = f(frame);
                self.pos += n;
                return Ok(r);
            }
            if self.pos > 0 {
                self.rbuf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            }
            if self.end == self.rbuf.len() {
                self.rbuf.resize(self.rbuf.len() * 2, 0);
            }
            match self.s.read(&mut self.rbuf[self.end..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Subscribes and waits until the broker has handled it (Ping/Pong).
    fn subscribe(&mut self, pattern: &str, overflow: Overflow) -> io::Result<()> {
        self.queue(&Frame::Subscribe { sid: 1, pattern, mode: Mode::Broadcast, overflow })?;
        self.queue(&Frame::Ping(7))?;
        self.flush()?;
        while !self.next(|f| matches!(f, Frame::Pong(7)))? {}
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// MQTT 3.1.1, QoS 0 only, over a Unix stream (for Mosquitto).

struct Mqtt {
    r: BufReader<UnixStream>,
    w: BufWriter<UnixStream>,
    body: Vec<u8>,
}

fn mqtt_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn mqtt_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Mqtt {
    fn connect(path: &Path, id: &str) -> io::Result<Mqtt> {
        let s = UnixStream::connect(path)?;
        let mut m = Mqtt {
            r: BufReader::with_capacity(1 << 16, s.try_clone()?),
            w: BufWriter::with_capacity(1 << 16, s),
            body: Vec::new(),
        };
        let mut var = Vec::new();
        mqtt_str(&mut var, "MQTT");
        var.extend_from_slice(&[4, 0x02, 0, 60]); // level 4, clean session, keepalive 60 s
        mqtt_str(&mut var, id);
        m.packet(0x10, &var)?;
        m.w.flush()?;
        match m.read_packet()? {
            0x20 if m.body.get(1) == Some(&0) => Ok(m),
            h => Err(other(format!("CONNACK expected, got {h:#x} {:?}", m.body))),
        }
    }

    fn packet(&mut self, header: u8, body: &[u8]) -> io::Result<()> {
        let mut head = vec![header];
        mqtt_len(&mut head, body.len());
        self.w.write_all(&head)?;
        self.w.write_all(body)
    }

    fn subscribe(&mut self, topic: &str) -> io::Result<()> {
        let mut body = vec![0, 1];
        mqtt_str(&mut body, topic);
        body.push(0);
        self.packet(0x82, &body)?;
        self.w.flush()?;
        while self.read_packet()? & 0xf0 != 0x90 {}
        Ok(())
    }

    /// Buffers a QoS 0 PUBLISH (flush separately).
    fn publish(&mut self, topic: &str, payload: &[u8]) -> io::Result<()> {
        let mut head = vec![0x30];
        mqtt_len(&mut head, 2 + topic.len() + payload.len());
        self.w.write_all(&head)?;
        self.w.write_all(&(topic.len() as u16).to_be_bytes())?;
        self.w.write_all(topic.as_bytes())?;
        self.w.write_all(payload)
    }

    /// Reads one packet into `body`; returns its first header byte.
    fn read_packet(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b)?;
        let header = b[0];
        let (mut len, mut mult) = (0usize, 1usize);
        loop {
            self.r.read_exact(&mut b)?;
            len += usize::from(b[0] & 0x7f) * mult;
            mult *= 128;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        self.body.resize(len, 0);
        self.r.read_exact(&mut self.body)?;
        Ok(header)
    }

    /// The next PUBLISH's payload length.
    fn next_publish(&mut self) -> io::Result<usize> {
        loop {
            if self.read_packet()? & 0xf0 == 0x30 {
                let tlen = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
                return Ok(self.body.len() - 2 - tlen);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// NATS text protocol over TCP (for nats-server).

struct Nats {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    line: Vec<u8>,
    payload: Vec<u8>,
    reply: String,
}

impl Nats {
    fn connect(addr: &str) -> io::Result<Nats> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut n = Nats {
            r: BufReader::with_capacity(1 << 16, s.try_clone()?),
            w: BufWriter::with_capacity(1 << 16, s),
            line: Vec::new(),
            payload: Vec::new(),
            reply: String::new(),
        };
        n.read_line()?; // INFO
        n.w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false}\r\n")?;
        n.sync()?;
        Ok(n)
    }

    fn read_line(&mut self) -> io::Result<()> {
        self.line.clear();
        if self.r.read_until(b'\n', &mut self.line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// PING, then wait for the PONG: everything sent before is handled.
    fn sync(&mut self) -> io::Result<()> {
        self.w.write_all(b"PING\r\n")?;
        self.w.flush()?;
        loop {
            self.read_line()?;
            if self.line.starts_with(b"PONG") {
                return Ok(());
            }
            self.control()?;
        }
    }

    fn control(&mut self) -> io::Result<()> {
        if self.line.starts_with(b"PING") {
            self.w.write_all(b"PONG\r\n")?;
            self.w.flush()?;
        } else if self.line.starts_with(b"-ERR") {
            return Err(other(String::from_utf8_lossy(&self.line)));
        }
        Ok(())
    }

    fn subscribe(&mut self, subject: &str) -> io::Result<()> {
        write!(self.w, "SUB {subject} 1\r\n")?;
        self.sync()
    }

    /// Buffers a PUB (flush separately).
    fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) -> io::Result<()> {
        match reply {
            Some(r) => write!(self.w, "PUB {subject} {r} {}\r\n", payload.len())?,
            None => write!(self.w, "PUB {subject} {}\r\n", payload.len())?,
        }
        self.w.write_all(payload)?;
        self.w.write_all(b"\r\n")
    }

    /// The next MSG: payload in `payload`, reply subject in `reply`.
    fn next_msg(&mut self) -> io::Result<usize> {
        loop {
            self.read_line()?;
            if !self.line.starts_with(b"MSG ") {
                self.control()?;
                continue;
            }
            let line = std::str::from_utf8(&self.line).map_err(other)?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let len: usize = words.last().and_then(|w| w.parse().ok()).ok_or_else(|| other("bad MSG"))?;
            self.reply.clear();
            if words.len() == 5 {
                self.reply.push_str(words[3]);
            }
            self.payload.resize(len + 2, 0);
            self.r.read_exact(&mut self.payload)?;
            return Ok(len);
        }
    }
}

// ---------------------------------------------------------------------------
// Roles (child processes).

fn role_main(role: &str) -> ExitCode {
    let addr = env(ADDR);
    let path = PathBuf::from(&addr);
    let payload = vec![0xa5u8; env_num(PAYLOAD, 64) as usize];
    let n = env_num(COUNT, 20_000) as usize;
    let secs = env_num(SECS, 2_000) as f64 / 1000.0;
    let id = env(ID);
    let res: io::Result<ExitCode> = match role {
        "broker" => {
            let mut cfg = BrokerConfig::new(&path);
            if let Ok(m) = std::env::var(QUEUE_MSGS)
                && let Ok(m) = m.parse()
            {
                cfg.queue_limit_msgs = m;
            }
            match Broker::start(cfg) {
                Ok(_broker) => {
                    say("ready");
                    // Parked until the harness kills this process.
                    let (_tx, rx) = crossbeam_channel::bounded::<()>(0);
                    let _ = rx.recv();
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(other(e)),
            }
        }
        "client-responder" => (|| {
            let client = client(&path, "responder")?;
            let sub = client.subscribe(RPC_TOPIC).map_err(other)?;
            client.publish_confirmed("bench.sync", b"").map_err(other)?;
            say("ready");
            while let Ok(m) = sub.messages().recv() {
                client.reply(&m, &payload).map_err(other)?;
            }
            Ok(ExitCode::SUCCESS)
        })(),
        "client-requester" => (|| {
            let client = client(&path, "requester")?;
            let t = Duration::from_secs(5);
            let lat = measure(n, || client.request(RPC_TOPIC, &payload, t).map(drop).map_err(other))?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "raw-responder" => (|| {
            let mut bus = RawBus::connect(&path, "rawresp")?;
            bus.subscribe(RPC_TOPIC, Overflow::Block)?;
            say("ready");
            let mut reply = String::new();
            loop {
                let got = bus.next(|f| match f {
                    Frame::Deliver { reply_to: Some(r), .. } => {
                        reply.clear();
                        reply.push_str(r);
                        true
                    }
                    _ => false,
                })?;
                if got {
                    bus.queue(&Frame::Publish {
                        topic: &reply,
                        payload: &payload,
                        reply_to: None,
                        ack_id: None,
                    })?;
                    bus.flush()?;
                }
            }
        })(),
        "raw-requester" => (|| {
            let mut bus = RawBus::connect(&path, "rawreq")?;
            bus.subscribe("direct.rawreq.#", Overflow::Block)?;
            let lat = measure(n, || {
                let f = Frame::Publish {
                    topic: RPC_TOPIC,
                    payload: &payload,
                    reply_to: Some("direct.rawreq.r"),
                    ack_id: None,
                };
                bus.queue(&f)?;
                bus.flush()?;
                while !bus.next(|f| matches!(f, Frame::Deliver { .. }))? {}
                Ok(())
            })?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "uds-pong" => (|| {
            let l = UnixListener::bind(&path)?;
            say("ready");
            let (mut s, _) = l.accept()?;
            let mut buf = payload.clone();
            loop {
                if s.read_exact(&mut buf).is_err() {
                    return Ok(ExitCode::SUCCESS);
                }
                s.write_all(&buf)?;
            }
        })(),
        "uds-ping" => (|| {
            let mut s = UnixStream::connect(&path)?;
            let mut buf = payload.clone();
            let lat = measure(n, || {
                s.write_all(&payload)?;
                s.read_exact(&mut buf)
            })?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "client-sub" => (|| {
            let client = client(&path, &id)?;
            let overflow =
                if env(OVERFLOW) == "drop-newest" { Overflow::DropNewest } else { Overflow::Block };
            let sub = client.subscribe_with(FLOOD_TOPIC, None, overflow).map_err(other)?;
            client.publish_confirmed("bench.sync", b"").map_err(other)?;
            say("ready");
            let rx = sub.messages().clone();
            Ok(count(
                || rx.recv_timeout(IDLE).ok().map(|m| m.payload.is_empty()),
                || format!("client_dropped={}", client.dropped()),
            ))
        })(),
        "client-pub" => (|| {
            let client = client(&path, "publisher")?;
            let pl = &payload;
            let c = &client;
            Ok(flood(
                secs,
                || c.publish(FLOOD_TOPIC, pl).map_err(other),
                || c.publish_confirmed(FLOOD_TOPIC, b"").map_err(other),
            ))
        })(),
        "raw-sub" => (|| {
            let mut bus = RawBus::connect(&path, &id)?;
            bus.subscribe(FLOOD_TOPIC, Overflow::Block)?;
            bus.s.set_read_timeout(Some(IDLE))?;
            say("ready");
            Ok(count(
                || loop {
                    match bus.next(|f| match f {
                        Frame::Deliver { payload, .. } => Some(payload.is_empty()),
                        _ => None,
                    }) {
                        Ok(Some(end)) => return Some(end),
                        Ok(None) => {}
                        Err(_) => return None,
                    }
                },
                String::new,
            ))
        })(),
        "raw-pub" => (|| {
            let mut bus = RawBus::connect(&path, "rawpub")?;
            let mut pending = 0;
            let code = {
                let b = std::cell::RefCell::new(&mut bus);
                flood(
                    secs,
                    || {
                        let mut bus = b.borrow_mut();
                        let f = Frame::Publish {
                            topic: FLOOD_TOPIC,
                            payload: &payload,
                            reply_to: None,
                            ack_id: None,
                        };
                        bus.queue(&f)?;
                        pending += 1;
                        if pending == 128 {
                            pending = 0;
                            bus.flush()?;
                        }
                        Ok(())
                    },
                    || {
                        let mut bus = b.borrow_mut();
                        let f =
                            Frame::Publish { topic: FLOOD_TOPIC, payload: b"", reply_to: None, ack_id: None };
                        bus.queue(&f)?;
                        bus.queue(&Frame::Ping(9))?;
                        bus.flush()?;
                        while !bus.next(|f| matches!(f, Frame::Pong(9)))? {}
                        Ok(())
                    },
                )
            };
            Ok(code)
        })(),
        "mqtt-responder" => (|| {
            let mut m = Mqtt::connect(&path, "responder")?;
            m.subscribe("bench/req")?;
            say("ready");
            loop {
                m.next_publish()?;
                m.publish("bench/reply", &payload)?;
                m.w.flush()?;
            }
        })(),
        "mqtt-requester" => (|| {
            let mut m = Mqtt::connect(&path, "requester")?;
            m.subscribe("bench/reply")?;
            let lat = measure(n, || {
                m.publish("bench/req", &payload)?;
                m.w.flush()?;
                m.next_publish().map(drop)
            })?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "mqtt-sub" => (|| {
            let mut m = Mqtt::connect(&path, &id)?;
            m.subscribe("bench/flood")?;
            m.r.get_ref().set_read_timeout(Some(IDLE))?;
            say("ready");
            Ok(count(|| m.next_publish().ok().map(|len| len == 0), String::new))
        })(),
        "mqtt-pub" => (|| {
            let m = std::cell::RefCell::new(Mqtt::connect(&path, "publisher")?);
            Ok(flood(
                secs,
                || m.borrow_mut().publish("bench/flood", &payload),
                || {
                    let mut m = m.borrow_mut();
                    m.publish("bench/flood", b"")?;
                    m.w.flush()
                },
            ))
        })(),
        "nats-responder" => (|| {
            let mut c = Nats::connect(&addr)?;
            c.subscribe("bench.req")?;
            say("ready");
            loop {
                c.next_msg()?;
                let reply = std::mem::take(&mut c.reply);
                c.publish(&reply, None, &payload)?;
                c.w.flush()?;
                c.reply = reply;
            }
        })(),
        "nats-requester" => (|| {
            let mut c = Nats::connect(&addr)?;
            c.subscribe("_INBOX.requester")?;
            let lat = measure(n, || {
                c.publish("bench.req", Some("_INBOX.requester"), &payload)?;
                c.w.flush()?;
                c.next_msg().map(drop)
            })?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "nats-sub" => (|| {
            let mut c = Nats::connect(&addr)?;
            c.subscribe("bench.flood")?;
            c.r.get_ref().set_read_timeout(Some(IDLE))?;
            say("ready");
            Ok(count(|| c.next_msg().ok().map(|len| len == 0), String::new))
        })(),
        "nats-pub" => (|| {
            let c = std::cell::RefCell::new(Nats::connect(&addr)?);
            Ok(flood(
                secs,
                || c.borrow_mut().publish("bench.flood", None, &payload),
                || {
                    let mut c = c.borrow_mut();
                    c.publish("bench.flood", None, b"")?;
                    c.sync()
                },
            ))
        })(),
        other => {
            say(&format!("error unknown role {other}"));
            return ExitCode::FAILURE;
        }
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            say(&format!("error {role}: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn client(path: &Path, id: &str) -> io::Result<Client> {
    let client = Client::connect(ClientConfig::new(path, id)).map_err(other)?;
    if !client.wait_connected(Duration::from_secs(5)) {
        return Err(other(format!("{id}: not connected after 5 s")));
    }
    Ok(client)
}

// ---------------------------------------------------------------------------
// The harness: spawns the processes of each case and collects results.

/// A spawned process (a role or a peer server), killed by its own pid and
/// reaped on drop.
struct Proc {
    name: String,
    child: Child,
    lines: Receiver<String>,
}

impl Proc {
    fn start(name: &str, mut cmd: Command) -> Result<Proc, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {name}: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Ok(Proc { name: name.to_owned(), child, lines })
    }

    /// The first line starting with `prefix`; an `error` line or silence
    /// until `timeout` fails.
    fn expect(&self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(l) if l.starts_with("error") => return Err(format!("{}: {l}", self.name)),
                Ok(_) => {}
                Err(_) => return Err(format!("{}: no '{prefix}' within {timeout:?}", self.name)),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Harness {
    exe: PathBuf,
    dir: tempfile::TempDir,
    rt: usize,
    flood_ms: u64,
    taskset: bool,
    mosquitto: Option<PathBuf>,
    nats: Option<PathBuf>,
    filter: Option<String>,
    seq: u32,
}

impl Harness {
    fn cmd(&self, program: &Path, pinned: bool) -> Command {
        if pinned {
            let mut c = Command::new("taskset");
            c.arg("-c").arg("0").arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn role(&self, role: &str, pinned: bool, addr: &str, extra: &[(&str, String)]) -> Result<Proc, String> {
        let mut c = self.cmd(&self.exe, pinned);
        c.env(ROLE, role)
            .env(ADDR, addr)
            .env(COUNT, self.rt.to_string())
            .env(SECS, self.flood_ms.to_string());
        for (k, v) in extra {
            c.env(k, v);
        }
        Proc::start(role, c)
    }

    fn fresh_path(&mut self, what: &str) -> String {
        self.seq += 1;
        self.dir.path().join(format!("{what}{}.sock", self.seq)).display().to_string()
    }

    fn broker(&mut self, pinned: bool, extra: &[(&str, String)]) -> Result<(Proc, String), String> {
        let path = self.fresh_path("bus");
        let b = self.role("broker", pinned, &path, extra)?;
        b.expect("ready", Duration::from_secs(5))?;
        Ok((b, path))
    }

    fn mosquitto(&mut self, pinned: bool) -> Result<(Proc, String), String> {
        let bin = self.mosquitto.clone().ok_or("mosquitto is not installed")?;
        self.seq += 1;
        let dir = self.dir.path().join(format!("mosquitto{}", self.seq));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // Mosquitto started as root drops to the `mosquitto` user unless told
        // `user root`; the directory is world-writable either way.
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        let sock = dir.join("mqtt.sock");
        let conf = dir.join("mosquitto.conf");
        let text = format!(
            "listener 0 {}\nallow_anonymous true\nuser root\npersistence false\nlog_dest stderr\nlog_type error\n",
            sock.display()
        );
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        let mut c = self.cmd(&bin, pinned);
        c.arg("-c").arg(&conf).stderr(Stdio::null());
        let p = Proc::start("mosquitto", c)?;
        wait_for(|| UnixStream::connect(&sock).is_ok(), "mosquitto socket")?;
        Ok((p, sock.display().to_string()))
    }

    fn nats(&mut self, pinned: bool) -> Result<(Proc, String), String> {
        let bin = self.nats.clone().ok_or("nats-server is not installed")?;
        let port =
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let mut c = self.cmd(&bin, pinned);
        c.args(["-a", "127.0.0.1", "-p", &port.to_string()]).stderr(Stdio::null());
        let p = Proc::start("nats-server", c)?;
        let addr = format!("127.0.0.1:{port}");
        wait_for(|| TcpStream::connect(&addr).is_ok(), "nats-server port")?;
        Ok((p, addr))
    }

    /// A request/reply case: a server (broker or peer), a responder, then
    /// a requester whose result line is returned.
    fn round_trip(&mut self, kind: &str, payload: usize, pinned: bool) -> Result<Lat, String> {
        let pl = [(PAYLOAD, payload.to_string())];
        let (_server, addr) = match kind {
            "bus client" | "bus raw" => self.broker(pinned, &[])?,
            "mosquitto" => self.mosquitto(pinned)?,
            "nats-server" => self.nats(pinned)?,
            _ => {
                let path = self.fresh_path("uds");
                let pong = self.role("uds-pong", pinned, &path, &pl)?;
                pong.expect("ready", Duration::from_secs(5))?;
                let ping = self.role("uds-ping", pinned, &path, &pl)?;
                let line = ping.expect("result", Duration::from_secs(120))?;
                return Ok(Lat::parse(&line));
            }
        };
        let (resp, req) = match kind {
            "bus client" => ("client-responder", "client-requester"),
            "bus raw" => ("raw-responder", "raw-requester"),
            "mosquitto" => ("mqtt-responder", "mqtt-requester"),
            _ => ("nats-responder", "nats-requester"),
        };
        let responder = self.role(resp, pinned, &addr, &pl)?;
        responder.expect("ready", Duration::from_secs(10))?;
        let requester = self.role(req, pinned, &addr, &pl)?;
        let line = requester.expect("result", Duration::from_secs(120))?;
        Ok(Lat::parse(&line))
    }

    /// A flood case: `subs` subscribers, one publisher; returns the
    /// publisher's and every subscriber's result lines, and the broker's
    /// stats (bus cases).
    fn flood(&mut self, kind: &str, subs: usize, drop_newest: bool) -> Result<Flood, String> {
        let pl = (PAYLOAD, FLOOD_PAYLOAD.to_string());
        let mut broker_extra = Vec::new();
        if drop_newest {
            broker_extra.push((QUEUE_MSGS, "1024".to_owned()));
        }
        let (_server, addr) = match kind {
            "bus client" | "bus raw" => self.broker(false, &broker_extra)?,
            "mosquitto" => self.mosquitto(false)?,
            _ => self.nats(false)?,
        };
        let (sub_role, pub_role) = match kind {
            "bus client" => ("client-sub", "client-pub"),
            "bus raw" => ("raw-sub", "raw-pub"),
            "mosquitto" => ("mqtt-sub", "mqtt-pub"),
            _ => ("nats-sub", "nats-pub"),
        };
        let overflow = if drop_newest { "drop-newest" } else { "block" };
        let mut subscribers = Vec::new();
        for i in 0..subs {
            let extra = [pl.clone(), (ID, format!("sub{i}")), (OVERFLOW, overflow.to_owned())];
            let s = self.role(sub_role, false, &addr, &extra)?;
            s.expect("ready", Duration::from_secs(10))?;
            subscribers.push(s);
        }
        let publisher = self.role(pub_role, false, &addr, &[pl])?;
        let pub_line = publisher.expect("result", Duration::from_secs(60))?;
        let mut sub_lines = Vec::new();
        for s in &subscribers {
            sub_lines.push(kv(&s.expect("result", Duration::from_secs(60))?));
        }
        let stats = if kind.starts_with("bus") {
            let c = client(Path::new(&addr), "coordinator").map_err(|e| e.to_string())?;
            Some(c.broker_stats(Duration::from_secs(5)).map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok(Flood { publisher: kv(&pub_line), subscribers: sub_lines, stats })
    }

    fn wanted(&self, name: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| name.contains(f.as_str()))
    }
}

struct Flood {
    publisher: Vec<(String, f64)>,
    subscribers: Vec<Vec<(String, f64)>>,
    stats: Option<daemoneye_bus::BrokerStats>,
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        // Mosquitto and nats-server are third-party processes with no
        // readiness signal of their own: poll their socket, with a deadline.
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("{what} not up after 5 s"))
}

/// `name` on PATH or in the sbin directories (Debian puts both servers in
/// /usr/sbin, which a non-root PATH may lack).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(ROLE) {
        return role_main(&role);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find my own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = match tempfile::Builder::new().prefix("daemoneye-bench-bus").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
    let taskset = Command::new("taskset")
        .args(["-c", "0", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut h = Harness {
        exe,
        dir,
        rt: env_num("DAEMONEYE_BENCH_RT", 20_000) as usize,
        flood_ms: (env_num("DAEMONEYE_BENCH_FLOOD_SECS", 2) * 1000).max(100),
        taskset,
        mosquitto: find_program("mosquitto"),
        nats: find_program("nats-server"),
        filter: std::env::args().skip(1).find(|a| !a.starts_with('-')),
        seq: 0,
    };
    let started = Instant::now();
    println!(
        "bus benchmark: {} round trips per case (+{WARMUP} warm-up), floods of {:.1} s, {} CPUs",
        h.rt,
        h.flood_ms as f64 / 1000.0,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (name, bin) in [("mosquitto", &h.mosquitto), ("nats-server", &h.nats)] {
        match bin {
            Some(p) => println!("peer {name}: {}", p.display()),
            None => println!(
                "peer {name}: NOT INSTALLED, not measured (apt-get install -y mosquitto nats-server)"
            ),
        }
    }
    if !h.taskset {
        println!("taskset (util-linux) not usable: pinned cases are skipped");
    }

    // 1, 2, 4: round trips.
    println!("\n## Request/reply round trip (requester -> server -> responder -> server -> requester)\n");
    println!(
        "| {:<24} | {:>5} | {:<8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>9} |",
        "path", "bytes", "cpus", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "mean µs", "RT/s"
    );
    println!(
        "|{:-<26}|{:->7}|{:-<10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->11}|",
        "", "", "", "", "", "", "", "", ""
    );
    let kinds = ["bus client", "bus raw", "raw uds ping-pong", "mosquitto", "nats-server"];
    let mut lats: Vec<(String, usize, bool, Lat)> = Vec::new();
    for pinned in [false, true] {
        if pinned && !h.taskset {
            continue;
        }
        for payload in [64usize, 256] {
            for kind in kinds {
                let name = format!("rt {kind} {payload} {}", if pinned { "pinned" } else { "unpinned" });
                if !h.wanted(&name) {
                    continue;
                }
                let cpus = if pinned { "pinned 0" } else { "2 cores" };
                match h.round_trip(kind, payload, pinned) {
                    Ok(l) => {
                        println!(
                            "| {:<24} | {:>5} | {:<8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>9.0} |",
                            kind,
                            payload,
                            cpus,
                            us(l.p50),
                            us(l.p99),
                            us(l.p999),
                            us(l.max),
                            us(l.mean),
                            l.rate
                        );
                        lats.push((kind.to_owned(), payload, pinned, l));
                    }
                    Err(e) => println!("| {kind:<24} | {payload:>5} | {cpus:<8} | FAILED: {e}"),
                }
            }
        }
    }

    // 3, 4: one-way floods.
    println!(
        "\n## One-way throughput, {FLOOD_PAYLOAD} B, flood of {:.1} s (2 cores)\n",
        h.flood_ms as f64 / 1000.0
    );
    println!(
        "| {:<30} | {:>4} | {:>10} | {:>10} | {:>12} | {:>12} | {:>9} | {:>9} | {:>12} |",
        "path", "subs", "sent", "pub msg/s", "received", "sub msg/s", "broker dr", "client dr", "unaccounted"
    );
    println!(
        "|{:-<32}|{:->6}|{:->12}|{:->12}|{:->14}|{:->14}|{:->11}|{:->11}|{:->14}|",
        "", "", "", "", "", "", "", "", ""
    );
    let cases: [(&str, usize, bool); 7] = [
        ("bus client", 1, false),
        ("bus raw", 1, false),
        ("mosquitto", 1, false),
        ("nats-server", 1, false),
        ("bus client", FANOUT, false),
        ("bus raw", FANOUT, false),
        ("bus client", FANOUT, true),
    ];
    let mut rates: Vec<(String, usize, bool, f64)> = Vec::new();
    let mut drop_checks: Vec<String> = Vec::new();
    for (kind, subs, drop_newest) in cases {
        let label = format!("{kind}{}", if drop_newest { " DropNewest q=1024" } else { "" });
        let name = format!("flood {label} 1->{subs}");
        if !h.wanted(&name) {
            continue;
        }
        match h.flood(kind, subs, drop_newest) {
            Ok(f) => {
                let sent = get(&f.publisher, "sent");
                let pub_rate = sent / get(&f.publisher, "secs").max(1e-9);
                let received: f64 = f.subscribers.iter().map(|s| get(s, "received")).sum();
                // Aggregate delivery rate: messages received by all subscribers
                // per second of the slowest subscriber's window.
                let window = f.subscribers.iter().map(|s| get(s, "secs")).fold(0.0, f64::max);
                let sub_rate = received / window.max(1e-9);
                let client_dropped: f64 = f.subscribers.iter().map(|s| get(s, "client_dropped")).sum();
                let broker_dropped = f.stats.as_ref().map_or(0, |s| s.dropped) as f64;
                let ended_n: f64 = f.subscribers.iter().map(|s| get(s, "ended")).sum();
                let ended = ended_n == subs as f64;
                // Each subscriber is also owed the end marker (a drop too).
                let lost = sent * subs as f64 - received + (subs as f64 - ended_n);
                let unaccounted = lost - broker_dropped - client_dropped;
                let bdr = if f.stats.is_some() { format!("{broker_dropped:.0}") } else { "n/a".into() };
                let cdr = if kind == "bus client" { format!("{client_dropped:.0}") } else { "n/a".into() };
                println!(
                    "| {:<30} | {:>4} | {:>10.0} | {:>10.0} | {:>12.0} | {:>12.0} | {:>9} | {:>9} | {:>12.0} |",
                    label, subs, sent, pub_rate, received, sub_rate, bdr, cdr, unaccounted
                );
                if !ended {
                    drop_checks.push(format!("{label} 1->{subs}: a subscriber never saw the end marker"));
                }
                if kind.starts_with("bus") {
                    let strategy = if drop_newest { "DropNewest" } else { "Block" };
                    drop_checks.push(format!(
                        "{label} 1->{subs} ({strategy}): sent {sent:.0} x {subs}, received {received:.0}, lost {lost:.0}; \
                         counted: broker {broker_dropped:.0}, client {client_dropped:.0}; unaccounted {unaccounted:.0}{}",
                        match (drop_newest, lost == 0.0, unaccounted == 0.0) {
                            (false, true, _) => " -> zero drops: OK",
                            (false, false, _) => " -> DROPS UNDER Block",
                            (true, _, true) => " -> every drop counted: OK",
                            (true, _, false) => " -> UNCOUNTED DROPS",
                        }
                    ));
                }
                if !drop_newest {
                    rates.push((kind.to_owned(), subs, drop_newest, sub_rate));
                }
            }
            Err(e) => println!("| {label:<30} | {subs:>4} | FAILED: {e}"),
        }
    }
    println!("\nDrop accounting:");
    for c in &drop_checks {
        println!("- {c}");
    }

    // Goals.
    println!("\n## Goals\n");
    let find = |kind: &str, payload: usize, pinned: bool| {
        lats.iter().find(|l| l.0 == kind && l.1 == payload && l.2 == pinned).map(|l| l.3)
    };
    for pinned in [true, false] {
        for payload in [64usize, 256] {
            let Some(ours) = find("bus client", payload, pinned) else { continue };
            let pin = if pinned { "pinned" } else { "unpinned" };
            let raw = find("bus raw", payload, pinned);
            println!(
                "- {payload} B {pin}: bus client p99 {} µs{}{}{}{}",
                us(ours.p99),
                if pinned {
                    format!(" (goal < 40 µs: {})", if ours.p99 < 40_000 { "met" } else { "MISSED" })
                } else {
                    String::new()
                },
                raw.map_or(String::new(), |r| format!("; bus raw p99 {} µs", us(r.p99))),
                find("mosquitto", payload, pinned).map_or(String::new(), |m| format!(
                    "; vs Mosquitto p99 {} µs: {:.2}x ({})",
                    us(m.p99),
                    ours.p99 as f64 / m.p99 as f64,
                    if ours.p99 < m.p99 { "below, met" } else { "NOT below" }
                )),
                find("raw uds ping-pong", payload, pinned).map_or(String::new(), |u| format!(
                    "; vs raw UDS p99 {} µs: {:.2}x ({})",
                    us(u.p99),
                    ours.p99 as f64 / u.p99 as f64,
                    if ours.p99 <= 4 * u.p99 { "within 4x, met" } else { "MISSED 4x" }
                )),
            );
        }
    }
    let rate = |kind: &str, subs: usize| rates.iter().find(|r| r.0 == kind && r.1 == subs).map(|r| r.3);
    if let Some(ours) = rate("bus client", 1) {
        println!(
            "- 1->1 bus client {ours:.0} msg/s (goal >= 2,000,000: {}){}{}{}",
            if ours >= 2e6 { "met" } else { "MISSED" },
            rate("bus raw", 1).map_or(String::new(), |r| format!("; bus raw {r:.0} msg/s")),
            rate("nats-server", 1).map_or(String::new(), |n| format!(
                "; vs nats-server {n:.0}: {:.2}x ({})",
                ours / n,
                if ours > n { "ahead, met" } else { "NOT ahead" }
            )),
            rate("mosquitto", 1).map_or(String::new(), |m| format!(
                "; vs Mosquitto {m:.0}: {:.2}x ({})",
                ours / m,
                if ours >= 10.0 * m { ">= 10x, met" } else { "MISSED 10x" }
            )),
        );
    }
    println!("\ntotal {:.0} s", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}
