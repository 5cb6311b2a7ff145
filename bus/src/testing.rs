//! A hand-driven connection to a broker, for tests and probes.
//!
//! [`RawConnection`] speaks the frame codec over a plain [`UnixStream`]
//! and nothing more: no handshake, no reconnect, no check of who serves
//! the socket, no flow control. A test uses it to say exactly the frames
//! it means (a Hello under a reserved id, a `reply_to` onto someone
//! else's topic, half a frame, a never-read `Block` subscription) and to
//! see exactly what the broker answers. Production code uses
//! [`Client`](crate::Client).
//!
//! What a received frame means is the caller's business: [`recv`] and
//! [`sync`] hand each decoded [`Frame`] to a closure, so a test keeps its
//! own owned copy of the frames it cares about.
//!
//! [`recv`]: RawConnection::recv
//! [`sync`]: RawConnection::sync

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::frame::{Frame, decode, encode};

/// How long one read waits before a receive checks its deadline again.
const READ_POLL: Duration = Duration::from_millis(50);

/// The largest frame this connection encodes or decodes. Generous on
/// purpose: the broker enforces the limits, a probe only observes them.
const MAX_FRAME: u32 = 1 << 26;

/// One raw connection to a broker's socket: the stream and the bytes read
/// from it that do not make a whole frame yet.
#[derive(Debug)]
pub struct RawConnection {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl RawConnection {
    /// Connects to the socket at `path`. Nothing is sent.
    pub fn connect(path: &Path) -> io::Result<RawConnection> {
        let stream = UnixStream::connect(path)?;
        // Reads wake up regularly, so a receive can keep its deadline.
        stream.set_read_timeout(Some(READ_POLL))?;
        Ok(RawConnection { stream, buf: Vec::new() })
    }

    /// The stream, for socket options and clones.
    pub fn get_ref(&self) -> &UnixStream {
        &self.stream
    }

    /// The stream, to write bytes that are not a whole frame.
    pub fn get_mut(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Encodes and writes one frame.
    ///
    /// # Panics
    ///
    /// If the frame does not encode (larger than 64 MiB): the caller built
    /// it, so that is a bug in the test, not an answer from the broker.
    pub fn send(&mut self, frame: &Frame<'_>) -> io::Result<()> {
        let mut out = Vec::new();
        if let Err(e) = encode(frame, &mut out, MAX_FRAME) {
            panic!("a test frame does not encode: {e}");
        }
        self.stream.write_all(&out)
    }

    /// The next frame, through `f`; `None` when `timeout` passes first, at
    /// the end of the stream or on a read error.
    ///
    /// # Panics
    ///
    /// If the peer sends bytes that do not decode as a frame: a broker
    /// never does, and a test has nothing better to do than fail loudly.
    pub fn recv<T>(&mut self, timeout: Duration, f: impl FnOnce(Frame<'_>) -> T) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            match decode(&self.buf, MAX_FRAME) {
                Ok(Some((frame, n))) => {
                    let got = f(frame);
                    self.buf.drain(..n);
                    return Some(got);
                }
                Ok(None) => {}
                Err(e) => panic!("bad frame from the broker: {e}"),
            }
            if Instant::now() > deadline {
                return None;
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_retry(&e) => {}
                Err(_) => return None,
            }
        }
    }

    /// Sends `Ping(n)` and reads up to its `Pong`: the broker handles a
    /// connection's frames in order, so everything sent before has been
    /// handled (routed or refused). Returns the frames that came before
    /// the `Pong`, each through `f`; `Err` with those when no frame came
    /// within `timeout` (or the stream ended) before the `Pong`.
    ///
    /// # Panics
    ///
    /// As [`recv`](Self::recv).
    pub fn sync<T>(
        &mut self,
        n: u64,
        timeout: Duration,
        mut f: impl FnMut(Frame<'_>) -> T,
    ) -> Result<Vec<T>, Vec<T>> {
        // A failed write shows as a missing Pong.
        let _ = self.send(&Frame::Ping(n));
        let mut before = Vec::new();
        loop {
            match self.recv(timeout, |frame| match frame {
                Frame::Pong(a) if a == n => None,
                other => Some(f(other)),
            }) {
                Some(None) => return Ok(before),
                Some(Some(got)) => before.push(got),
                None => return Err(before),
            }
        }
    }

    /// Whether the peer closed the connection within `timeout`. Whatever
    /// it sent before the end is read and dropped.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if is_retry(&e) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// A read that timed out or was interrupted: nothing happened yet.
fn is_retry(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}
