//! SIGTERM/SIGINT handling for the daemons, with safe calls only.
//!
//! [`block`] blocks the signals in the calling thread; threads started
//! afterwards inherit the mask, so call it first thing in `main`. Then
//! [`ShutdownSignals::start`] takes them in one thread with `sigwait`: the
//! first SIGTERM or SIGINT calls `on_first` (which asks for a graceful
//! shutdown), a second one calls `on_second` and exits at once with
//! 128 + the signal number. Dropping the handle ends the thread (it sends
//! this process a `SIGUSR1`, which is blocked and taken by the same
//! `sigwait`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use nix::sys::signal::{SigSet, Signal};

pub use nix::sys::signal::Signal as Sig;

/// The signals taken: SIGTERM, SIGINT, and SIGUSR1 (the stop knock).
fn set() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1] {
        set.add(s);
    }
    set
}

/// Blocks SIGTERM, SIGINT and SIGUSR1 in this thread (and in every thread
/// it starts afterwards).
pub fn block() -> std::io::Result<()> {
    set().thread_block().map_err(std::io::Error::from)
}

/// The signal thread; dropping it ends the thread.
pub struct ShutdownSignals {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ShutdownSignals {
    /// Whether the thread has ended (a failed `sigwait`, a panic): the
    /// host's watchdog asks, since the blocked signals now go unheard.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Starts the thread `name`. `on_first` runs on the first SIGTERM or
    /// SIGINT; `on_second` runs on the next one, just before the process
    /// exits with 128 + its number.
    pub fn start(
        name: &str,
        on_first: impl Fn(Signal) + Send + 'static,
        on_second: impl Fn(Signal) + Send + 'static,
    ) -> std::io::Result<ShutdownSignals> {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let set = set();
        let hook = name.to_owned();
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            crate::threads::test_panic_point(&hook);
            let mut requested = false;
            loop {
                let sig = match set.wait() {
                    Ok(sig) => sig,
                    Err(e) => {
                        log::error!("sigwait failed: {e}");
                        return;
                    }
                };
                if sig == Signal::SIGUSR1 {
                    if flag.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                if requested {
                    log::warn!("second {sig}: exiting now");
                    on_second(sig);
                    std::process::exit(128 + sig as i32);
                }
                requested = true;
                log::info!("{sig} received: shutting down gracefully (send it again to exit at once)");
                on_first(sig);
            }
        })?;
        Ok(ShutdownSignals { done, thread: Some(thread) })
    }
}

impl Drop for ShutdownSignals {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGUSR1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
