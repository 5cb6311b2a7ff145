//! End-to-end tests that spawn the real DaemonEye binaries (agent, procmond)
//! over real Unix sockets in temporary directories, kill them at the worst
//! moment and check that nothing is lost or doubled. The per-crate tests live
//! beside each crate; this crate holds the whole-system tests, which arrive
//! with the agent issue.
#![forbid(unsafe_code)]
