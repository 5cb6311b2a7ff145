//! The harness: spawns the processes of each case (roles and peer
//! servers) and collects their results.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::common::{Lat, kv};
use super::roles::client;
use super::{ADDR, COUNT, FLOOD_PAYLOAD, ID, OVERFLOW, PAYLOAD, QUEUE_MSGS, ROLE, SECS};

/// A spawned process (a role or a peer server), killed by its own pid and
/// reaped on drop.
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) child: Child,
    pub(super) lines: Receiver<String>,
}

impl Proc {
    pub(super) fn start(name: &str, mut cmd: Command) -> Result<Proc, String> {
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
    pub(super) fn expect(&self, prefix: &str, timeout: Duration) -> Result<String, String> {
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

pub(super) struct Harness {
    pub(super) exe: PathBuf,
    pub(super) dir: tempfile::TempDir,
    pub(super) rt: usize,
    pub(super) flood_ms: u64,
    pub(super) taskset: bool,
    pub(super) mosquitto: Option<PathBuf>,
    pub(super) nats: Option<PathBuf>,
    pub(super) filter: Option<String>,
    pub(super) seq: u32,
}

impl Harness {
    pub(super) fn cmd(&self, program: &Path, pinned: bool) -> Command {
        if pinned {
            let mut c = Command::new("taskset");
            c.arg("-c").arg("0").arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    pub(super) fn role(
        &self,
        role: &str,
        pinned: bool,
        addr: &str,
        extra: &[(&str, String)],
    ) -> Result<Proc, String> {
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

    pub(super) fn fresh_path(&mut self, what: &str) -> String {
        self.seq += 1;
        self.dir.path().join(format!("{what}{}.sock", self.seq)).display().to_string()
    }

    pub(super) fn broker(
        &mut self,
        pinned: bool,
        extra: &[(&str, String)],
    ) -> Result<(Proc, String), String> {
        let path = self.fresh_path("bus");
        let b = self.role("broker", pinned, &path, extra)?;
        b.expect("ready", Duration::from_secs(5))?;
        Ok((b, path))
    }

    pub(super) fn mosquitto(&mut self, pinned: bool) -> Result<(Proc, String), String> {
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

    pub(super) fn nats(&mut self, pinned: bool) -> Result<(Proc, String), String> {
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
    pub(super) fn round_trip(&mut self, kind: &str, payload: usize, pinned: bool) -> Result<Lat, String> {
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
    pub(super) fn flood(&mut self, kind: &str, subs: usize, drop_newest: bool) -> Result<Flood, String> {
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

    pub(super) fn wanted(&self, name: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| name.contains(f.as_str()))
    }
}

pub(super) struct Flood {
    pub(super) publisher: Vec<(String, f64)>,
    pub(super) subscribers: Vec<Vec<(String, f64)>>,
    pub(super) stats: Option<daemoneye_bus::BrokerStats>,
}

pub(super) fn wait_for(mut ok: impl FnMut() -> bool, what: &str) -> Result<(), String> {
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
pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
