//! Long-lived threads that end before their time. A daemon's long-lived
//! threads end only when it shuts down; one that ends before (a panic)
//! leaves the daemon half alive: still registered and heartbeating, say,
//! while nothing is stored or sent any more. So each daemon's main thread
//! is a watchdog: it asks every such thread whether it ended (a
//! `thread_ended` method on the thread's handle) once a second, and an
//! early end stops the daemon with a non-zero status and a log line naming
//! the thread ([`first_ended`]), for the service manager or the agent to
//! restart it.

/// The test hook: `DAEMONEYE_TEST_PANIC=<thread>` makes that thread panic
/// at its hook point, for the tests of the watchdogs. Unset in
/// production: one environment read per call, at points that run once or
/// rarely.
pub fn test_panic_point(thread: &str) {
    if std::env::var_os("DAEMONEYE_TEST_PANIC").is_some_and(|v| v == thread) {
        panic!("DAEMONEYE_TEST_PANIC={thread}: the test hook panics this thread");
    }
}

/// The watchdog's verdict on `(thread name, whether it ended)` pairs: the
/// reason to stop, naming the first thread that ended, or `None`.
pub fn first_ended(threads: &[(&str, bool)]) -> Option<String> {
    threads.iter().find(|(_, ended)| *ended).map(|(name, _)| ended_unexpectedly(name))
}

/// Why the daemon stops: thread `name` ended before its time.
pub fn ended_unexpectedly(name: &str) -> String {
    format!("thread {name} ended unexpectedly (a panic; see the log above)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_thread_that_ended_is_named() {
        assert_eq!(first_ended(&[("a", false), ("b", false)]), None);
        let why = first_ended(&[("a", false), ("b", true), ("c", true)]).unwrap();
        assert!(why.starts_with("thread b ended unexpectedly"), "{why}");
    }
}
