//! The `syslog` output: RFC 5424 messages over TCP, framed by octet
//! counting (RFC 6587 section 3.4.1), over `std::net::TcpStream`, or over
//! TLS (RFC 5425, with `tls:`; [`super::tls`]) with the same framing.
//!
//! # Format
//!
//! Each document is one message, `<LEN> SP <MSG>` on the wire, where
//! `<LEN>` is the decimal byte length of `<MSG>`:
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME daemoneye PROCID MSGID - JSON
//! ```
//!
//! `PRI` is facility × 8 + severity: 6 (informational) for an event, 5 to
//! 2 (notice, warning, error, critical) for an alert of severity low to
//! critical. `TIMESTAMP` is when the event was observed (the alert
//! raised), RFC 3339 UTC with milliseconds. `MSGID` is the document's kind
//! (`process-started`, `process-stopped`, `process-modified`, `alert`).
//! No structured data; the message is the document's JSON (the same as
//! `daemoneye-cli events --json` / `alerts --json`), without a BOM.
//!
//! # Delivery
//!
//! A batch is accepted when its frames were written whole and the
//! connection was still open afterwards (a receiver that closed it, or
//! sends anything, is noticed by a non-blocking read; over TLS, what it
//! reads goes through the TLS session: session tickets are not garbage,
//! a close_notify is a close). A TLS handshake that fails (an unknown CA,
//! a wrong name, no client certificate where one is required) fails the
//! batch with rustls's reason; nothing of it counts as sent. Plain TCP syslog
//! has no application acknowledgement: a receiver that dies can lose what
//! it had read but not yet written. So after a reconnect the previous
//! batch of the failed connection is written again before the next:
//! duplicates are at most one batch, and receivers drop them by the
//! document's stable id.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{Item, Sink};
use crate::config::outputs::{OutputSpec, TlsSpec, facility_code};

/// How long, at most, a new TLS 1.3 connection waits for the receiver's
/// verdict on the client certificate it asked for
/// ([`super::tls::TlsStream::handshake`]).
#[cfg(feature = "tls")]
const TLS_VERDICT: Duration = Duration::from_secs(2);

/// The APP-NAME of every message.
pub const APP_NAME: &str = "daemoneye";

/// A syslog receiver over TCP or TLS.
pub struct SyslogSink {
    name: String,
    address: String,
    facility: u8,
    timeout: Duration,
    tls: Option<TlsSpec>,
    hostname: String,
    procid: String,
    stream: Option<Conn>,
    /// The frames of the last batch accepted on the current connection,
    /// written again first on the next connection, and how many
    /// documents they hold.
    last: Vec<u8>,
    last_items: u64,
    /// Documents written again after reconnects, not yet taken.
    resent: u64,
}

/// One connection to the receiver.
enum Conn {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<super::tls::TlsStream>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            #[cfg(feature = "tls")]
            Conn::Tls(s) => &s.stream.sock,
        }
    }

    /// Writes `frames` whole, then checks the receiver kept the
    /// connection open.
    fn write(&mut self, frames: &[u8]) -> Result<(), String> {
        let written = match self {
            Conn::Plain(s) => s.write_all(frames).and_then(|()| s.flush()),
            #[cfg(feature = "tls")]
            Conn::Tls(s) => s.stream.write_all(frames).and_then(|()| s.stream.flush()),
        };
        written.map_err(|e| format!("write: {e}"))?;
        self.tcp().set_nonblocking(true).map_err(|e| e.to_string())?;
        let verdict = match self {
            Conn::Plain(s) => check_open(s),
            #[cfg(feature = "tls")]
            Conn::Tls(s) => check_open(&mut s.stream),
        };
        self.tcp().set_nonblocking(false).map_err(|e| e.to_string())?;
        verdict
    }
}

impl SyslogSink {
    /// A sink for `spec` (a syslog output); connects at the first batch.
    pub fn new(spec: &OutputSpec) -> SyslogSink {
        let s = spec.syslog.clone().expect("a syslog output has syslog settings (validated)");
        SyslogSink {
            name: spec.name.clone(),
            facility: facility_code(&s.facility).unwrap_or(16),
            address: s.address,
            timeout: Duration::from_millis(s.timeout_ms),
            tls: s.tls,
            hostname: header_field(daemoneye_platform::hostname().unwrap_or("-"), 255),
            procid: std::process::id().to_string(),
            stream: None,
            last: Vec::new(),
            last_items: 0,
            resent: 0,
        }
    }

    fn connect(&self) -> Result<Conn, String> {
        let addrs = self.address.to_socket_addrs().map_err(|e| format!("{}: {e}", self.address))?;
        let mut last = format!("{}: resolves to no address", self.address);
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(s) => {
                    // Reads too: a TLS handshake waits for the receiver.
                    s.set_write_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
                    s.set_nodelay(true).map_err(|e| e.to_string())?;
                    return self.secure(s).map_err(|e| format!("{}: {e}", self.address));
                }
                Err(e) => last = format!("connect to {addr}: {e}"),
            }
        }
        Err(last)
    }

    /// `tcp` as it is, or wrapped in TLS when the output has `tls:` (its
    /// files read again: a renewed certificate is used from now on).
    fn secure(&self, tcp: TcpStream) -> Result<Conn, String> {
        let Some(tls) = &self.tls else { return Ok(Conn::Plain(tcp)) };
        #[cfg(feature = "tls")]
        {
            let host = match &tls.server_name {
                Some(name) => name.as_str(),
                None => self.address.rsplit_once(':').map_or(self.address.as_str(), |(h, _)| h),
            };
            let mut stream = super::tls::TlsStream::new(tls, host, tcp)?;
            stream.handshake(self.timeout.min(TLS_VERDICT))?;
            Ok(Conn::Tls(Box::new(stream)))
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (tls, tcp);
            Err("this agent was built without TLS".to_owned())
        }
    }

    fn frame_into(&self, item: &Item, out: &mut Vec<u8>) {
        let msg = format!(
            "<{}>1 {} {} {APP_NAME} {} {} - {}",
            u16::from(self.facility) * 8 + u16::from(item.severity),
            daemoneye_contract::ecs::timestamp(item.time_ms),
            self.hostname,
            self.procid,
            item.kind,
            item.json
        );
        frame(msg.as_bytes(), out);
    }
}

impl Sink for SyslogSink {
    fn deliver(&mut self, batch: &[Item]) -> Result<(), String> {
        let mut frames = Vec::new();
        for item in batch {
            self.frame_into(item, &mut frames);
        }
        let mut stream = match self.stream.take() {
            Some(s) => s,
            None => {
                let mut s = self.connect()?;
                if !self.last.is_empty() {
                    // What the failed connection may have dropped.
                    s.write(&self.last).map_err(|e| format!("{}: {e}", self.address))?;
                    self.resent += self.last_items;
                    log::info!(
                        "output {}: connected to {}; the previous batch ({} bytes) written again",
                        self.name,
                        self.address,
                        self.last.len()
                    );
                }
                s
            }
        };
        match stream.write(&frames) {
            Ok(()) => {
                self.stream = Some(stream);
                self.last = frames;
                self.last_items = batch.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = stream.tcp().shutdown(Shutdown::Both);
                Err(format!("{}: {e}", self.address))
            }
        }
    }

    fn take_resent(&mut self) -> u64 {
        std::mem::take(&mut self.resent)
    }
}

/// Appends `msg` framed by octet counting: its length, a space, itself.
pub fn frame(msg: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
}

/// A header field: printable US-ASCII without spaces, at most `max`
/// characters, `-` when empty (RFC 5424 section 6).
fn header_field(s: &str, max: usize) -> String {
    let v: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if v.is_empty() { "-".to_owned() } else { v }
}

/// A syslog receiver sends nothing: end of stream or an error means it
/// closed the connection (what it had not processed may be lost), and
/// bytes are garbage, read and dropped (with a warning). `stream` is
/// non-blocking; over TLS it is the session, which takes in the
/// receiver's protocol messages (tickets, key updates) and yields only
/// data.
fn check_open(stream: &mut impl Read) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Err("the receiver closed the connection".to_owned()),
            Ok(n) => {
                log::warn!("syslog receiver sent {n} unexpected bytes; ignored");
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("connection: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;

    use super::*;

    fn item(n: u64) -> Item {
        Item {
            id: format!("h/c/1/{n}"),
            kind: "process-started",
            severity: 6,
            time_ms: 1_700_000_000_123,
            json: format!("{{\"n\":{n},\"s\":\"é\"}}"),
        }
    }

    fn spec(address: String) -> OutputSpec {
        let text = format!("outputs:\n  - {{name: s, type: syslog, syslog: {{address: \"{address}\"}}}}\n");
        let dir = tempfile::tempdir().unwrap();
        crate::config::AgentConfig::parse(&text, "t", dir.path()).unwrap().outputs.remove(0)
    }

    /// Splits octet-counted frames; panics on a malformed one.
    fn unframe(mut b: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let sp = b.iter().position(|&c| c == b' ').unwrap();
            let len: usize = std::str::from_utf8(&b[..sp]).unwrap().parse().unwrap();
            out.push(String::from_utf8(b[sp + 1..sp + 1 + len].to_vec()).unwrap());
            b = &b[sp + 1 + len..];
        }
        out
    }

    #[test]
    fn the_length_counts_bytes_not_characters() {
        let mut out = Vec::new();
        frame("é".as_bytes(), &mut out);
        assert_eq!(out, b"2 \xc3\xa9");
        assert_eq!(header_field("a b\tc", 255), "abc");
        assert_eq!(header_field("", 255), "-");
    }

    #[test]
    fn a_batch_arrives_framed_and_a_reconnect_writes_the_last_batch_again() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sink = SyslogSink::new(&spec(listener.local_addr().unwrap().to_string()));
        sink.deliver(&[item(1), item(2)]).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        // The receiver goes away: the next batch fails (now or, with the
        // close not yet seen, on the following write)...
        drop(conn);
        let mut accepted = vec![1, 2];
        let mut failed = false;
        for n in 3..20 {
            if sink.deliver(&[item(n)]).is_err() {
                failed = true;
                break;
            }
            accepted = vec![n];
        }
        assert!(failed, "writes into a closed connection kept succeeding");
        // ...and the next connection starts with the last accepted batch.
        sink.deliver(&[item(100)]).unwrap();
        (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while unframe(&got).len() < accepted.len() + 1 {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let msgs = unframe(&got);
        let pri = format!("<{}>1 2023-11-14T22:13:20.123Z ", 16 * 8 + 6);
        assert!(msgs.iter().all(|m| m.starts_with(&pri)), "{msgs:?}");
        assert!(msgs.iter().all(|m| m.contains(" daemoneye ") && m.contains(" process-started - {")));
        let ns: Vec<u64> = msgs
            .iter()
            .map(|m| {
                let v: serde_json::Value = serde_json::from_str(m.rsplit_once(" - ").unwrap().1).unwrap();
                v["n"].as_u64().unwrap()
            })
            .collect();
        accepted.push(100);
        assert_eq!(ns, accepted);
    }

    #[test]
    fn a_receiver_that_never_reads_fails_the_batch_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let text = format!(
            "outputs:\n  - {{name: s, type: syslog, syslog: {{address: \"{address}\", timeout_ms: 300}}}}\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::config::AgentConfig::parse(&text, "t", dir.path()).unwrap().outputs.remove(0);
        let mut sink = SyslogSink::new(&spec);
        let big = Item { json: format!("\"{}\"", "x".repeat(1 << 20)), ..item(0) };
        // Accepted, never read: the kernel's buffers fill, then a write
        // times out (at most 256 MiB written; loopback buffers hold a few).
        let (_held, _) = {
            sink.deliver(std::slice::from_ref(&big)).unwrap();
            listener.accept().unwrap()
        };
        let failure = (0..256).find_map(|_| sink.deliver(std::slice::from_ref(&big)).err());
        let e = failure.expect("a receiver that never reads never failed a batch");
        assert!(e.contains(&address) && e.contains("write"), "{e}");
    }

    #[test]
    fn bytes_from_the_receiver_are_dropped_and_the_batch_still_delivered() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sink = SyslogSink::new(&spec(listener.local_addr().unwrap().to_string()));
        // The receiver keeps the connection until the last delivery is
        // done (a close seen by its check would fail it).
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let garbage = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"\x00\xffgarbage\n").unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while unframe(&got).len() < 3 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = done.recv_timeout(Duration::from_secs(10));
            unframe(&got).len()
        });
        sink.deliver(&[item(1)]).unwrap();
        // The garbage is there to be read by now or soon; each delivery
        // reads and drops what came.
        sink.deliver(&[item(2)]).unwrap();
        sink.deliver(&[item(3)]).unwrap();
        done_tx.send(()).unwrap();
        assert_eq!(garbage.join().unwrap(), 3);
    }
}
