//! Test support, public so the daemon's integration tests and the
//! benchmarks can drive the collector without a real process table: a
//! [`FakeSource`] whose process list the test edits. [`record`] and
//! [`envelope`] (plausible records and events) are the contract's.

use std::sync::Arc;

use daemoneye_platform::{CycleStats, ProcessRecord, ProcessSource};
use parking_lot::Mutex;

pub use daemoneye_contract::testing::{envelope, record};

/// A process source that returns whatever list the test put in it, and
/// counts its refreshes.
#[derive(Clone, Default)]
pub struct FakeSource {
    inner: Arc<Mutex<(Vec<ProcessRecord>, u64)>>,
}

impl FakeSource {
    /// An empty source.
    pub fn new() -> FakeSource {
        FakeSource::default()
    }

    /// Replaces the process list.
    pub fn set(&self, records: Vec<ProcessRecord>) {
        self.inner.lock().0 = records;
    }

    /// Edits the process list.
    pub fn edit(&self, f: impl FnOnce(&mut Vec<ProcessRecord>)) {
        f(&mut self.inner.lock().0);
    }

    /// How many times `refresh` ran.
    pub fn refreshes(&self) -> u64 {
        self.inner.lock().1
    }
}

impl ProcessSource for FakeSource {
    fn backend(&self) -> &'static str {
        "fake"
    }

    fn refresh(&mut self) -> Result<Vec<ProcessRecord>, daemoneye_platform::Error> {
        let mut g = self.inner.lock();
        g.1 += 1;
        Ok(g.0.clone())
    }

    fn last_cycle(&self) -> CycleStats {
        CycleStats::default()
    }
}
