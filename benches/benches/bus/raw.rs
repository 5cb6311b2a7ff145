//! A raw blocking client of the bus wire protocol: one socket, no thread.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use daemoneye_bus::{Frame, Mode, Overflow, decode, encode};

use super::common::other;

pub(super) struct RawBus {
    pub(super) s: UnixStream,
    pub(super) rbuf: Vec<u8>,
    pub(super) pos: usize,
    pub(super) end: usize,
    pub(super) wbuf: Vec<u8>,
}

impl RawBus {
    pub(super) fn connect(path: &Path, id: &str) -> io::Result<RawBus> {
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

    pub(super) fn queue(&mut self, f: &Frame<'_>) -> io::Result<()> {
        encode(f, &mut self.wbuf, u32::MAX).map_err(other)
    }

    pub(super) fn flush(&mut self) -> io::Result<()> {
        self.s.write_all(&self.wbuf)?;
        self.wbuf.clear();
        Ok(())
    }

    /// Hands the next frame to `f`.
    pub(super) fn next<R>(&mut self, f: impl FnOnce(Frame<'_>) -> R) -> io::Result<R> {
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
    pub(super) fn subscribe(&mut self, pattern: &str, overflow: Overflow) -> io::Result<()> {
        self.queue(&Frame::Subscribe { sid: 1, pattern, mode: Mode::Broadcast, overflow })?;
        self.queue(&Frame::Ping(7))?;
        self.flush()?;
        while !self.next(|f| matches!(f, Frame::Pong(7)))? {}
        Ok(())
    }
}
