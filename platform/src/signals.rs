//! SIGTERM/SIGINT handling for the daemons, with safe calls only.
//!
//! Unix: [`block`] blocks the signals in the calling thread; threads
//! started afterwards inherit the mask, so call it first thing in `main`.
//! Then [`ShutdownSignals::start`] takes them in one thread with
//! `sigwait`: the first SIGTERM or SIGINT calls `on_first` (which asks for
//! a graceful shutdown), a second one calls `on_second` and exits at once
//! with 128 + the signal number. Dropping the handle ends the thread (it
//! sends this process a `SIGUSR1`, which is blocked and taken by the same
//! `sigwait`).
//!
//! Windows: the console's Ctrl+C and Ctrl+Break (the `ctrlc` crate
//! registers the handler) play SIGINT's part, through the same thread and
//! callbacks; [`block`] does nothing; a second one exits with 130 (128 +
//! SIGINT, as on Unix). The console's close, logoff and shutdown events
//! reach the same handler, but Windows ends the process as soon as it
//! returns: those stops are not graceful. One [`ShutdownSignals`] per
//! process there (the console has one handler).

#[cfg(unix)]
pub use unix::{ShutdownSignals, Sig, block};
#[cfg(windows)]
pub use windows::{ShutdownSignals, Sig, block};

#[cfg(unix)]
mod unix {
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
}

#[cfg(windows)]
mod windows {
    use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
    use std::thread::JoinHandle;

    /// A console event that asks for a shutdown (`ctrlc` does not say
    /// which: Ctrl+C or Ctrl+Break).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Sig;

    impl std::fmt::Display for Sig {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Ctrl+C")
        }
    }

    /// Nothing to block: console events go to their handler's thread.
    pub fn block() -> std::io::Result<()> {
        Ok(())
    }

    /// What the thread hears: a console event, or its handle's drop.
    enum Knock {
        Interrupt,
        Stop,
    }

    /// The console event thread; dropping it ends the thread (the handler
    /// stays registered and its events go nowhere).
    pub struct ShutdownSignals {
        // Field order: the knock is sent before the thread is joined.
        knock: SyncSender<Knock>,
        thread: Option<JoinHandle<()>>,
    }

    impl ShutdownSignals {
        /// Whether the thread has ended (a panic): the host's watchdog asks.
        pub fn thread_ended(&self) -> bool {
            self.thread.as_ref().is_none_or(JoinHandle::is_finished)
        }

        /// Starts the thread `name` and registers the console handler
        /// (an error if one is registered already). `on_first` runs on the
        /// first event; `on_second` on the next, before the process exits
        /// with 130.
        pub fn start(
            name: &str,
            on_first: impl Fn(Sig) + Send + 'static,
            on_second: impl Fn(Sig) + Send + 'static,
        ) -> std::io::Result<ShutdownSignals> {
            let (knock, knocks): (SyncSender<Knock>, Receiver<Knock>) = sync_channel(4);
            let from_console = knock.clone();
            ctrlc::set_handler(move || {
                // Full: four unread events already, the second exits.
                let _ = from_console.try_send(Knock::Interrupt);
            })
            .map_err(std::io::Error::other)?;
            let hook = name.to_owned();
            let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
                crate::threads::test_panic_point(&hook);
                let mut requested = false;
                while let Ok(Knock::Interrupt) = knocks.recv() {
                    if requested {
                        log::warn!("second {Sig}: exiting now");
                        on_second(Sig);
                        std::process::exit(130);
                    }
                    requested = true;
                    log::info!(
                        "{Sig} received: shutting down gracefully (press Ctrl+C again to exit at once)"
                    );
                    on_first(Sig);
                }
            })?;
            Ok(ShutdownSignals { knock, thread: Some(thread) })
        }
    }

    impl Drop for ShutdownSignals {
        fn drop(&mut self) {
            // `send` waits for room: the thread drains the channel.
            let _ = self.knock.send(Knock::Stop);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}
