//! Everything OS-specific in DaemonEye lives here, and only here: the
//! `ProcessRecord` model and process enumeration (a direct `/proc` walk on
//! Linux, sysinfo on macOS, Windows and FreeBSD), privilege detection
//! (Linux CapEff, root or admin elsewhere), peer credentials of a connected
//! Unix socket, and per-OS default paths. It is the only crate that may use
//! `cfg(target_os)`. The enumeration code arrives with the platform issue;
//! this crate is an empty placeholder until then.
#![forbid(unsafe_code)]
