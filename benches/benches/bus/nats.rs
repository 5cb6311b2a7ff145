//! NATS text protocol over TCP (for nats-server).

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;

use super::common::other;

pub(super) struct Nats {
    pub(super) r: BufReader<TcpStream>,
    pub(super) w: BufWriter<TcpStream>,
    pub(super) line: Vec<u8>,
    pub(super) payload: Vec<u8>,
    pub(super) reply: String,
}

impl Nats {
    pub(super) fn connect(addr: &str) -> io::Result<Nats> {
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

    pub(super) fn read_line(&mut self) -> io::Result<()> {
        self.line.clear();
        if self.r.read_until(b'\n', &mut self.line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// PING, then wait for the PONG: everything sent before is handled.
    pub(super) fn sync(&mut self) -> io::Result<()> {
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

    pub(super) fn control(&mut self) -> io::Result<()> {
        if self.line.starts_with(b"PING") {
            self.w.write_all(b"PONG\r\n")?;
            self.w.flush()?;
        } else if self.line.starts_with(b"-ERR") {
            return Err(other(String::from_utf8_lossy(&self.line)));
        }
        Ok(())
    }

    pub(super) fn subscribe(&mut self, subject: &str) -> io::Result<()> {
        write!(self.w, "SUB {subject} 1\r\n")?;
        self.sync()
    }

    /// Buffers a PUB (flush separately).
    pub(super) fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) -> io::Result<()> {
        match reply {
            Some(r) => write!(self.w, "PUB {subject} {r} {}\r\n", payload.len())?,
            None => write!(self.w, "PUB {subject} {}\r\n", payload.len())?,
        }
        self.w.write_all(payload)?;
        self.w.write_all(b"\r\n")
    }

    /// The next MSG: payload in `payload`, reply subject in `reply`.
    pub(super) fn next_msg(&mut self) -> io::Result<usize> {
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
