//! Helpers of the forwarding tests (`tests/forward*.rs`): events that keep
//! coming, a free port, what the store holds and where an output stands;
//! for TLS, certificates made with the `openssl` command and a TLS
//! terminator (`socat`) in front of a plain receiver.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use daemoneye_store::outputs::OutputCursor;
use daemoneye_store::{EventQuery, EventStore};

/// A free loopback port (bound and released: another process may take it
/// in between, unlikely in the few milliseconds before a receiver binds
/// it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts short-lived processes until dropped, so events keep flowing.
pub struct Churn {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    /// Starts the churn thread.
    pub fn start() -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut children: Vec<Child> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Ok(c) = Command::new("sleep").arg("0.3").stdin(Stdio::null()).spawn() {
                    children.push(c);
                }
                children.retain_mut(|c| c.try_wait().ok().flatten().is_none());
                std::thread::sleep(Duration::from_millis(100));
            }
            for mut c in children {
                let _ = c.kill();
                let _ = c.wait();
            }
        });
        Churn { stop, thread: Some(thread) }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The stored events' stable ids by row id, and the output's row.
pub fn stored(db: &Path, output: &str) -> (Vec<(i64, String)>, Option<OutputCursor>) {
    let Ok(store) = EventStore::open_read_only(db) else { return (Vec::new(), None) };
    let host = daemoneye_platform::hostname().unwrap_or("-");
    let events = store
        .query(&EventQuery::default())
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.id, format!("{host}/{}/{}/{}", e.collector_id, e.stream_id, e.seq)))
        .collect();
    let cursor =
        daemoneye_store::outputs::read(store.connection(), Some(output)).ok().and_then(|mut r| r.pop());
    (events, cursor)
}

/// A test PKI in a temp dir, made with the `openssl` command: a CA, a
/// server certificate for `localhost` and 127.0.0.1, a client certificate,
/// both signed by the CA, and another CA that signed neither. Keys are
/// P-256, PEM, mode 0600; everything is valid for two days.
pub struct Pki {
    /// Where the files are.
    pub dir: PathBuf,
}

impl Pki {
    /// Makes the files in `dir`.
    pub fn make(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let subject = format!("/CN=daemoneye test {ca}");
            let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subject];
            args.extend(ec);
            let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            args.extend(["-keyout", &key, "-out", &pem]);
            args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
            args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
            openssl(&args);
        }
        for (leaf, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let ext = format!(
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
            );
            std::fs::write(dir.join(format!("{leaf}.ext")), ext).unwrap();
            let subject = format!("/CN=daemoneye test {leaf}");
            let (key, csr, pem, extfile) =
                (format!("{leaf}.key"), format!("{leaf}.csr"), format!("{leaf}.pem"), format!("{leaf}.ext"));
            let mut args = vec!["req", "-new", "-subj", &subject];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr]);
            openssl(&args);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &extfile,
                "-out",
                &pem,
            ]);
        }
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "key") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        Pki { dir: dir.to_owned() }
    }

    /// A file of the PKI: `ca.pem`, `other-ca.pem`, `server.pem`,
    /// `server.key`, `client.pem`, `client.key`.
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// rsyslog's TLS settings with this PKI's server certificate (its
    /// `ossl` driver): the parameters to add to `global(...)` and to
    /// `module(load="imtcp" ...)`. `auth_mode`: `anon` (no client
    /// certificate asked for) or `x509/certvalid` (one of this CA's
    /// required).
    pub fn rsyslog_params(&self, auth_mode: &str) -> (String, String) {
        (
            format!(
                " DefaultNetstreamDriver=\"ossl\" DefaultNetstreamDriverCAFile=\"{}\" \
                 DefaultNetstreamDriverCertFile=\"{}\" DefaultNetstreamDriverKeyFile=\"{}\"",
                self.file("ca.pem"),
                self.file("server.pem"),
                self.file("server.key")
            ),
            format!(
                " StreamDriver.Name=\"ossl\" StreamDriver.Mode=\"1\" StreamDriver.AuthMode=\"{auth_mode}\""
            ),
        )
    }
}

/// A `socat` this test started that takes TLS on a loopback port (the
/// PKI's server certificate; clients must show a certificate of its CA)
/// and passes each connection, decrypted, to `127.0.0.1:backend`. Killed
/// on drop, by its own pid.
pub struct TlsTerminator {
    child: Child,
    /// The port it listens on.
    pub port: u16,
}

impl TlsTerminator {
    /// Starts it and waits until it listens.
    pub fn start(pki: &Pki, backend: u16) -> TlsTerminator {
        let port = free_port();
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},cafile={},verify=1",
            pki.file("server.pem"),
            pki.file("server.key"),
            pki.file("ca.pem")
        );
        let child = Command::new("socat")
            .arg(listen)
            .arg(format!("TCP:127.0.0.1:{backend}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat runs (Debian package socat; .ci/run installs it)");
        let t = TlsTerminator { child, port };
        let listening =
            crate::wait_until(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(listening, "socat does not listen on {port}");
        t
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
