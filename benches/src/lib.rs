//! Benchmarks of DaemonEye's components live in `benches/` of this crate
//! (run them with `cargo bench -p daemoneye-benches`); the numbers and the
//! commands that produced them are recorded in `BENCHMARKS.md` at the
//! repository root. This library is empty: it exists so the benchmark
//! targets have a package.
#![forbid(unsafe_code)]
