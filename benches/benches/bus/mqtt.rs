//! MQTT 3.1.1, QoS 0 only, over a Unix stream (for Mosquitto).

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::common::other;

pub(super) struct Mqtt {
    pub(super) r: BufReader<UnixStream>,
    pub(super) w: BufWriter<UnixStream>,
    pub(super) body: Vec<u8>,
}

pub(super) fn mqtt_len(out: &mut Vec<u8>, mut n: usize) {
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

pub(super) fn mqtt_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Mqtt {
    pub(super) fn connect(path: &Path, id: &str) -> io::Result<Mqtt> {
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

    pub(super) fn packet(&mut self, header: u8, body: &[u8]) -> io::Result<()> {
        let mut head = vec![header];
        mqtt_len(&mut head, body.len());
        self.w.write_all(&head)?;
        self.w.write_all(body)
    }

    pub(super) fn subscribe(&mut self, topic: &str) -> io::Result<()> {
        let mut body = vec![0, 1];
        mqtt_str(&mut body, topic);
        body.push(0);
        self.packet(0x82, &body)?;
        self.w.flush()?;
        while self.read_packet()? & 0xf0 != 0x90 {}
        Ok(())
    }

    /// Buffers a QoS 0 PUBLISH (flush separately).
    pub(super) fn publish(&mut self, topic: &str, payload: &[u8]) -> io::Result<()> {
        let mut head = vec![0x30];
        mqtt_len(&mut head, 2 + topic.len() + payload.len());
        self.w.write_all(&head)?;
        self.w.write_all(&(topic.len() as u16).to_be_bytes())?;
        self.w.write_all(topic.as_bytes())?;
        self.w.write_all(payload)
    }

    /// Reads one packet into `body`; returns its first header byte.
    pub(super) fn read_packet(&mut self) -> io::Result<u8> {
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
    pub(super) fn next_publish(&mut self) -> io::Result<usize> {
        loop {
            if self.read_packet()? & 0xf0 == 0x30 {
                let tlen = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
                return Ok(self.body.len() - 2 - tlen);
            }
        }
    }
}
