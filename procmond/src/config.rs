//! procmond's configuration: defaults, the YAML file (`--config`), command
//! line overrides, validation, and hot-reload updates.
//!
//! Hot-reloadable (an `UpdateConfig` applies them at the next cycle
//! boundary): `interval_secs`, `max_events_in_flight`, `lifecycle`,
//! `compute_hashes`. Restart-only (an update touching them is rejected with
//! that reason): `collector_id`, `database`, `data_dir`, `excluded_pids`,
//! and everything else not listed as hot-reloadable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use daemoneye_contract::control::{ConfigUpdate, LifecycleConfig};

/// The allowed collection interval, in seconds.
pub const INTERVAL_RANGE_SECS: std::ops::RangeInclusive<u64> = 5..=3600;
/// The default collection interval, in seconds.
pub const DEFAULT_INTERVAL_SECS: u64 = 30;
/// The default in-memory send buffer: 10 MiB.
pub const DEFAULT_BUFFER_BYTES: usize = 10 << 20;
/// The WAL's default size cap: 256 MiB.
pub const DEFAULT_WAL_MAX_BYTES: u64 = 256 << 20;

/// A configuration value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value is out of range or malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// An update touched a field that only a restart can change.
    #[error("{field} cannot change at runtime; restart procmond with the new value")]
    RestartRequired {
        /// The field.
        field: &'static str,
    },
    /// The configuration file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, reason: reason.into() }
}

/// Where events come from (`--events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EventsMode {
    /// The kernel's process events where this host gives them to this
    /// process, else the periodic walk alone (logged once, with the reason).
    #[default]
    Auto,
    /// The kernel's process events, or refuse to start.
    Kernel,
    /// The periodic walk alone: processes that live less than an interval
    /// may never be seen.
    Poll,
}

impl EventsMode {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventsMode::Auto => "auto",
            EventsMode::Kernel => "kernel",
            EventsMode::Poll => "poll",
        }
    }
}

/// The kernel event source's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelEventsConfig {
    /// Socket receive buffer to ask for, bytes. When it is full the kernel
    /// drops events (an overrun: counted, then recovered by a walk). Past
    /// `net.core.rmem_max` only with CAP_NET_ADMIN.
    pub receive_buffer_bytes: usize,
    /// How long a forked child may take to exec before it is reported as
    /// it is, ms.
    pub fork_window_ms: u64,
    /// Nice levels the kernel event thread raises its priority by (0..=19;
    /// needs CAP_SYS_NICE, else it runs at procmond's): it must read each
    /// process before it exits, also when busy processes fill the CPUs.
    pub priority_boost: u8,
}

impl Default for KernelEventsConfig {
    fn default() -> Self {
        KernelEventsConfig { receive_buffer_bytes: 4 << 20, fork_window_ms: 25, priority_boost: 10 }
    }
}

/// Executable hashing limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashConfig {
    /// Files larger than this are not read; the event says so.
    pub max_file_bytes: u64,
    /// Hashing time per cycle; what does not fit is deferred to the next.
    pub cycle_budget_ms: u64,
    /// Hashes kept in the LRU cache.
    pub cache_entries: usize,
}

impl Default for HashConfig {
    fn default() -> Self {
        HashConfig { max_file_bytes: 256 << 20, cycle_budget_ms: 500, cache_entries: 4096 }
    }
}

/// Command-line sanitization.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SanitizeConfig {
    /// Replace every argument after the program name with nothing.
    pub strip_all_arguments: bool,
    /// Words added to the default list of sensitive names (`-` and `_`
    /// are equivalent; case is ignored).
    pub extra_words: Vec<String>,
    /// Replace the default list instead of extending it.
    pub replace_default_words: bool,
}

/// The whole configuration of one procmond.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorConfig {
    /// Unique id on the bus. Restart-only.
    pub collector_id: String,
    /// SQLite event store for standalone mode. Restart-only.
    pub database: PathBuf,
    /// Where the WAL and the lock file live. Restart-only.
    pub data_dir: PathBuf,
    /// Pids never reported. Restart-only.
    pub excluded_pids: Vec<u32>,
    /// Collection interval. Hot.
    pub interval: Duration,
    /// Events published but not yet acknowledged by the store before
    /// publishing pauses. Hot.
    pub max_events_in_flight: usize,
    /// Compare at most this many processes per walk (0: no limit). Over
    /// it, processes not reported yet come first, newest first, then the
    /// reported ones; a process is reported Stopped only when the whole
    /// list lacks it; each cut walk is counted (health `errors`, a
    /// `Degraded` heartbeat) and warned about (at most once a minute).
    pub max_processes: usize,
    /// Include cwd, session, threads and CPU time. Restart-only.
    pub enhanced_metadata: bool,
    /// SHA-256 of new executables. Hot.
    pub compute_hashes: bool,
    /// What counts as a modification. Hot.
    pub lifecycle: LifecycleConfig,
    /// Hashing limits. Restart-only.
    pub hash: HashConfig,
    /// Sanitization. Restart-only.
    pub sanitize: SanitizeConfig,
    /// Heartbeat period. Restart-only.
    pub heartbeat_interval: Duration,
    /// In-memory send buffer. Restart-only.
    pub buffer_bytes: usize,
    /// The WAL's size cap in bytes: at it, new events are refused
    /// (counted, alerted, and recorded as a gap once the store's
    /// acknowledgements free space). Restart-only.
    pub wal_max_bytes: u64,
    /// Where events come from. Restart-only.
    pub events: EventsMode,
    /// The kernel event source. Restart-only.
    pub kernel_events: KernelEventsConfig,
}

impl CollectorConfig {
    /// Defaults with a data directory (the database goes inside it).
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> CollectorConfig {
        let data_dir = data_dir.into();
        CollectorConfig {
            collector_id: "procmond".to_owned(),
            database: data_dir.join("procmond.db"),
            data_dir,
            excluded_pids: Vec::new(),
            interval: Duration::from_secs(DEFAULT_INTERVAL_SECS),
            max_events_in_flight: 10_000,
            max_processes: 0,
            enhanced_metadata: false,
            compute_hashes: false,
            lifecycle: LifecycleConfig::default(),
            hash: HashConfig::default(),
            sanitize: SanitizeConfig::default(),
            heartbeat_interval: Duration::from_secs(30),
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            wal_max_bytes: DEFAULT_WAL_MAX_BYTES,
            events: EventsMode::Auto,
            kernel_events: KernelEventsConfig::default(),
        }
    }

    /// The WAL directory of this collector.
    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir.join("wal").join(&self.collector_id)
    }

    /// Checks every value. `interval_floor` is the shortest interval
    /// accepted: 5 s for the daemon (`INTERVAL_RANGE_SECS`); tests of the
    /// library may pass less.
    pub fn validate(&self, interval_floor: Duration) -> Result<(), ConfigError> {
        validate_collector_id(&self.collector_id)?;
        validate_interval(self.interval, interval_floor)?;
        if self.max_events_in_flight == 0 {
            return Err(invalid("max_events_in_flight", "must be at least 1"));
        }
        if self.heartbeat_interval < Duration::from_millis(100)
            || self.heartbeat_interval > Duration::from_secs(3600)
        {
            return Err(invalid("heartbeat_interval_ms", "must be between 100 and 3600000"));
        }
        if self.wal_max_bytes < 1 << 20 {
            return Err(invalid("wal_max_bytes", "must be at least 1048576"));
        }
        if self.buffer_bytes < 64 << 10 {
            return Err(invalid("buffer_bytes", "must be at least 65536"));
        }
        if self.hash.max_file_bytes == 0 {
            return Err(invalid("hash.max_file_bytes", "must be at least 1"));
        }
        if self.hash.cycle_budget_ms == 0 {
            return Err(invalid("hash.cycle_budget_ms", "must be at least 1"));
        }
        if self.hash.cache_entries == 0 {
            return Err(invalid("hash.cache_entries", "must be at least 1"));
        }
        if self.database.as_os_str().is_empty() {
            return Err(invalid("database", "must not be empty"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let rcvbuf = self.kernel_events.receive_buffer_bytes;
        if !(1024..=1 << 30).contains(&rcvbuf) {
            return Err(invalid(
                "kernel_events.receive_buffer_bytes",
                format!("{rcvbuf} is out of range 1024..=1073741824"),
            ));
        }
        if self.kernel_events.fork_window_ms > 1000 {
            return Err(invalid(
                "kernel_events.fork_window_ms",
                format!("{} is out of range 0..=1000", self.kernel_events.fork_window_ms),
            ));
        }
        if self.kernel_events.priority_boost > 19 {
            return Err(invalid(
                "kernel_events.priority_boost",
                format!("{} is out of range 0..=19", self.kernel_events.priority_boost),
            ));
        }
        for word in &self.sanitize.extra_words {
            if word.trim().is_empty() {
                return Err(invalid("sanitize.extra_words", "words must not be empty"));
            }
        }
        Ok(())
    }

    /// Applies an update to a copy, after checking it touches only
    /// hot-reloadable fields; the caller validates the result.
    pub fn updated(&self, update: &ConfigUpdate) -> Result<CollectorConfig, ConfigError> {
        if let Some(id) = &update.collector_id
            && *id != self.collector_id
        {
            return Err(ConfigError::RestartRequired { field: "collector_id" });
        }
        if let Some(db) = &update.database
            && *db != self.database
        {
            return Err(ConfigError::RestartRequired { field: "database" });
        }
        if let Some(dir) = &update.data_dir
            && *dir != self.data_dir
        {
            return Err(ConfigError::RestartRequired { field: "data_dir" });
        }
        if let Some(pids) = &update.excluded_pids
            && *pids != self.excluded_pids
        {
            return Err(ConfigError::RestartRequired { field: "excluded_pids" });
        }
        let mut next = self.clone();
        if let Some(secs) = update.interval_secs {
            next.interval = Duration::from_secs(secs);
        }
        if let Some(ms) = update.interval_ms {
            next.interval = Duration::from_millis(ms);
        }
        if let Some(n) = update.max_events_in_flight {
            next.max_events_in_flight = n;
        }
        if let Some(lifecycle) = &update.lifecycle {
            next.lifecycle = lifecycle.clone();
        }
        if let Some(on) = update.compute_hashes {
            next.compute_hashes = on;
        }
        Ok(next)
    }
}

/// A collector id is one bus topic segment (see
/// [`daemoneye_contract::ids::validate_collector_id`]).
pub fn validate_collector_id(id: &str) -> Result<(), ConfigError> {
    daemoneye_contract::ids::validate_collector_id(id).map_err(|why| invalid("collector_id", why))
}

fn validate_interval(interval: Duration, floor: Duration) -> Result<(), ConfigError> {
    let max = Duration::from_secs(*INTERVAL_RANGE_SECS.end());
    if interval < floor || interval > max {
        return Err(invalid(
            "interval",
            format!(
                "{} s is out of range {}..={} s",
                interval.as_secs_f64(),
                floor.as_secs_f64(),
                INTERVAL_RANGE_SECS.end()
            ),
        ));
    }
    Ok(())
}

/// The YAML file given with `--config`. Every key is optional; unknown
/// keys are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFile {
    /// See [`CollectorConfig::collector_id`].
    pub collector_id: Option<String>,
    /// See [`CollectorConfig::database`].
    pub database: Option<PathBuf>,
    /// See [`CollectorConfig::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`CollectorConfig::excluded_pids`].
    pub excluded_pids: Option<Vec<u32>>,
    /// See [`CollectorConfig::interval`].
    pub interval_secs: Option<u64>,
    /// See [`CollectorConfig::max_events_in_flight`].
    pub max_events_in_flight: Option<usize>,
    /// See [`CollectorConfig::max_processes`].
    pub max_processes: Option<usize>,
    /// See [`CollectorConfig::enhanced_metadata`].
    pub enhanced_metadata: Option<bool>,
    /// See [`CollectorConfig::compute_hashes`].
    pub compute_hashes: Option<bool>,
    /// See [`CollectorConfig::lifecycle`].
    pub lifecycle: Option<LifecycleConfig>,
    /// See [`CollectorConfig::hash`].
    pub hash: Option<HashConfig>,
    /// See [`CollectorConfig::sanitize`].
    pub sanitize: Option<SanitizeConfig>,
    /// See [`CollectorConfig::heartbeat_interval`].
    pub heartbeat_interval_ms: Option<u64>,
    /// See [`CollectorConfig::buffer_bytes`].
    pub buffer_bytes: Option<usize>,
    /// See [`CollectorConfig::wal_max_bytes`].
    pub wal_max_bytes: Option<u64>,
    /// See [`CollectorConfig::events`].
    pub events: Option<EventsMode>,
    /// See [`CollectorConfig::kernel_events`].
    pub kernel_events: Option<KernelEventsConfig>,
}

impl ConfigFile {
    /// Reads and parses a YAML file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File { path: path.to_owned(), reason: e.to_string() })?;
        ConfigFile::parse(&text).map_err(|reason| ConfigError::File { path: path.to_owned(), reason })
    }

    /// Parses YAML text (an empty document is all defaults).
    pub fn parse(text: &str) -> Result<ConfigFile, String> {
        if text.trim().is_empty() {
            return Ok(ConfigFile::default());
        }
        // The reason names the line (a key indented too little: its own).
        daemoneye_contract::yaml::from_str(text).map_err(|e| e.reason)
    }

    /// Lays the file's values over `cfg`.
    pub fn apply(&self, cfg: &mut CollectorConfig) {
        if let Some(dir) = &self.data_dir {
            let default_db = cfg.data_dir.join("procmond.db");
            if cfg.database == default_db {
                cfg.database = dir.join("procmond.db");
            }
            cfg.data_dir = dir.clone();
        }
        if let Some(v) = &self.collector_id {
            cfg.collector_id = v.clone();
        }
        if let Some(v) = &self.database {
            cfg.database = v.clone();
        }
        if let Some(v) = &self.excluded_pids {
            cfg.excluded_pids = v.clone();
        }
        if let Some(v) = self.interval_secs {
            cfg.interval = Duration::from_secs(v);
        }
        if let Some(v) = self.max_events_in_flight {
            cfg.max_events_in_flight = v;
        }
        if let Some(v) = self.max_processes {
            cfg.max_processes = v;
        }
        if let Some(v) = self.enhanced_metadata {
            cfg.enhanced_metadata = v;
        }
        if let Some(v) = self.compute_hashes {
            cfg.compute_hashes = v;
        }
        if let Some(v) = &self.lifecycle {
            cfg.lifecycle = v.clone();
        }
        if let Some(v) = &self.hash {
            cfg.hash = v.clone();
        }
        if let Some(v) = &self.sanitize {
            cfg.sanitize = v.clone();
        }
        if let Some(v) = self.heartbeat_interval_ms {
            cfg.heartbeat_interval = Duration::from_millis(v);
        }
        if let Some(v) = self.buffer_bytes {
            cfg.buffer_bytes = v;
        }
        if let Some(v) = self.wal_max_bytes {
            cfg.wal_max_bytes = v;
        }
        if let Some(v) = self.events {
            cfg.events = v;
        }
        if let Some(v) = &self.kernel_events {
            cfg.kernel_events = v.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CollectorConfig {
        CollectorConfig::with_data_dir("/data")
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(base().validate(Duration::from_secs(5)), Ok(()));
    }

    #[test]
    fn interval_out_of_range_names_the_range() {
        let mut cfg = base();
        cfg.interval = Duration::from_secs(4);
        let err = cfg.validate(Duration::from_secs(5)).unwrap_err().to_string();
        assert!(err.contains("interval") && err.contains("5..=3600"), "{err}");
        cfg.interval = Duration::from_secs(3601);
        assert!(cfg.validate(Duration::from_secs(5)).is_err());
        cfg.interval = Duration::from_millis(50);
        assert_eq!(cfg.validate(Duration::from_millis(10)), Ok(()));
    }

    #[test]
    fn bad_collector_ids_are_refused() {
        for id in ["", "Upper", "a.b", "has space", &"x".repeat(65)] {
            assert!(validate_collector_id(id).is_err(), "{id:?}");
        }
        assert!(validate_collector_id("procmond-2_a").is_ok());
    }

    #[test]
    fn updates_to_restart_only_fields_are_rejected_by_name() {
        let cfg = base();
        let cases: [(ConfigUpdate, &str); 4] = [
            (ConfigUpdate { collector_id: Some("other".into()), ..Default::default() }, "collector_id"),
            (ConfigUpdate { database: Some("/elsewhere.db".into()), ..Default::default() }, "database"),
            (ConfigUpdate { data_dir: Some("/elsewhere".into()), ..Default::default() }, "data_dir"),
            (ConfigUpdate { excluded_pids: Some(vec![1]), ..Default::default() }, "excluded_pids"),
        ];
        for (update, field) in cases {
            assert_eq!(cfg.updated(&update), Err(ConfigError::RestartRequired { field }));
        }
        // The current value of a restart-only field is not a change.
        let same = ConfigUpdate { collector_id: Some("procmond".into()), ..Default::default() };
        assert_eq!(cfg.updated(&same), Ok(cfg.clone()));
    }

    #[test]
    fn hot_fields_apply() {
        let cfg = base();
        let update = ConfigUpdate {
            interval_secs: Some(60),
            max_events_in_flight: Some(7),
            compute_hashes: Some(true),
            lifecycle: Some(LifecycleConfig { command_line: true, ..Default::default() }),
            ..Default::default()
        };
        let next = cfg.updated(&update).unwrap();
        assert_eq!(next.interval, Duration::from_secs(60));
        assert_eq!(next.max_events_in_flight, 7);
        assert!(next.compute_hashes && next.lifecycle.command_line);
    }

    #[test]
    fn the_example_file_parses_and_matches_the_defaults() {
        let text = include_str!("../procmond.example.yaml");
        let file = ConfigFile::parse(text).unwrap();
        let mut cfg = base();
        file.apply(&mut cfg);
        assert_eq!(cfg, base(), "the example documents the defaults");
    }

    #[test]
    fn config_file_refuses_unknown_keys_and_applies_known_ones() {
        let err = ConfigFile::parse("interval_secs: 10\nintervall: 3\n").unwrap_err();
        assert!(err.contains("intervall"), "{err}");
        let file =
            ConfigFile::parse("interval_secs: 10\ndata_dir: /d\nlifecycle:\n  command_line: true\n").unwrap();
        let mut cfg = base();
        file.apply(&mut cfg);
        assert_eq!(cfg.interval, Duration::from_secs(10));
        assert_eq!(cfg.database, PathBuf::from("/d/procmond.db"));
        assert!(cfg.lifecycle.command_line && cfg.lifecycle.reparent);
        assert_eq!(ConfigFile::parse("").unwrap(), ConfigFile::default());
        let file = ConfigFile::parse("events: poll\nkernel_events:\n  fork_window_ms: 5\n").unwrap();
        file.apply(&mut cfg);
        assert_eq!((cfg.events, cfg.kernel_events.fork_window_ms), (EventsMode::Poll, 5));
        assert!(ConfigFile::parse("events: ebpf\n").unwrap_err().contains("ebpf"));
    }

    #[test]
    fn kernel_event_settings_out_of_range_are_named() {
        let mut cfg = base();
        cfg.kernel_events.receive_buffer_bytes = 10;
        let err = cfg.validate(Duration::from_secs(5)).unwrap_err().to_string();
        assert!(err.contains("kernel_events.receive_buffer_bytes") && err.contains("1024"), "{err}");
        let mut cfg = base();
        cfg.kernel_events.fork_window_ms = 5000;
        let err = cfg.validate(Duration::from_secs(5)).unwrap_err().to_string();
        assert!(err.contains("kernel_events.fork_window_ms"), "{err}");
    }
}
