//! Helpers of the forwarding tests (`tests/forward*.rs`): events that keep
//! coming, a free port, what the store holds and where an output stands.

use std::net::TcpListener;
use std::path::Path;
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
