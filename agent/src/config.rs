//! `agent.yaml`: the agent's configuration, its validation, and the
//! embedded default used when no file is given.
//!
//! Every refusal names the file, the field and the reason
//! (`agent.yaml: collectors[1].binary: /opt/x/procmond is not executable`),
//! so an operator can fix it without reading code. Unknown keys are
//! refused, so a typo never silently falls back to a default.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A refused configuration: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {field}: {reason}")]
pub struct ConfigError {
    /// The file (or "embedded default").
    pub file: String,
    /// The field, as a path (`collectors[0].startup_timeout_secs`).
    pub field: String,
    /// Why.
    pub reason: String,
}

/// One collector the agent supervises.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSpec {
    /// Unique id on the bus (a-z, 0-9, '-', '_').
    pub id: String,
    /// The collector type ("process-monitor").
    #[serde(rename = "type", default = "default_type")]
    pub collector_type: String,
    /// The executable; a relative path is resolved against the agent's own
    /// directory.
    pub binary: PathBuf,
    /// Extra arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Spawned at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Restarted after a crash, within the restart limits.
    #[serde(default = "yes")]
    pub auto_restart: bool,
    /// Seconds to wait for its registration at startup.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout_secs: u64,
    /// Its heartbeat period in seconds.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_secs: u64,
    /// At most this many restarts per `restart_window_secs`.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// The window of `max_restarts`, in seconds.
    #[serde(default = "default_restart_window")]
    pub restart_window_secs: u64,
}

fn default_type() -> String {
    "process-monitor".to_owned()
}
fn yes() -> bool {
    true
}
fn default_startup_timeout() -> u64 {
    30
}
fn default_heartbeat() -> u64 {
    30
}
fn default_max_restarts() -> u32 {
    5
}
fn default_restart_window() -> u64 {
    300
}

/// The whole `agent.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The broker's Unix socket [default: `<data_dir>/run/broker.sock`].
    #[serde(default)]
    pub broker_socket: Option<PathBuf>,
    /// Where the store and the collectors' data live [default: the
    /// platform's data dir].
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// The collectors to supervise.
    #[serde(default)]
    pub collectors: Vec<CollectorSpec>,
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// The configuration used without a file: one procmond next to the agent.
pub const EMBEDDED_DEFAULT: &str = "\
collectors:
  - id: procmond
    type: process-monitor
    binary: procmond
";

impl AgentConfig {
    /// Parses and validates YAML text; `file` names it in errors and
    /// `exe_dir` resolves relative binary paths.
    pub fn parse(text: &str, file: &str, exe_dir: &Path) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig = serde_yaml_ng::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            field: e.location().map_or("(document)".to_owned(), |l| format!("line {}", l.line())),
            reason: e.to_string(),
        })?;
        for c in &mut cfg.collectors {
            if c.binary.is_relative() {
                c.binary = exe_dir.join(&c.binary);
            }
        }
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Reads a file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>, exe_dir: &Path) -> Result<AgentConfig, ConfigError> {
        match path {
            None => AgentConfig::parse(EMBEDDED_DEFAULT, "embedded default", exe_dir),
            Some(p) => {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                    file: name.clone(),
                    field: "(file)".into(),
                    reason: e.to_string(),
                })?;
                AgentConfig::parse(&text, &name, exe_dir)
            }
        }
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |field: String, reason: String| ConfigError { file: file.to_owned(), field, reason };
        if !["error", "warn", "info", "debug", "trace", "off"].contains(&self.log_level.as_str()) {
            return Err(err(
                "log_level".into(),
                format!("{:?} is not one of error, warn, info, debug, trace, off", self.log_level),
            ));
        }
        let mut ids = HashSet::new();
        for (i, c) in self.collectors.iter().enumerate() {
            let at = |f: &str| format!("collectors[{i}].{f}");
            if let Err(e) = procmond::config::validate_collector_id(&c.id) {
                return Err(err(at("id"), e.to_string()));
            }
            if !ids.insert(c.id.as_str()) {
                return Err(err(at("id"), format!("duplicate id {:?}", c.id)));
            }
            for (field, v) in [
                ("startup_timeout_secs", c.startup_timeout_secs),
                ("heartbeat_interval_secs", c.heartbeat_interval_secs),
                ("restart_window_secs", c.restart_window_secs),
            ] {
                if v == 0 {
                    return Err(err(at(field), "must be at least 1".into()));
                }
            }
            if c.enabled {
                check_executable(&c.binary).map_err(|reason| err(at("binary"), reason))?;
            }
        }
        Ok(())
    }
}

/// A binary must exist, be a file, and be executable by someone.
fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(format!("{} is not executable", path.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("procmond");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        (dir, bin)
    }

    #[test]
    fn the_embedded_default_runs_one_procmond_next_to_the_agent() {
        let (dir, bin) = setup();
        let cfg = AgentConfig::load(None, dir.path()).unwrap();
        assert_eq!(cfg.collectors.len(), 1);
        assert_eq!(cfg.collectors[0].binary, bin);
        assert!(cfg.collectors[0].enabled && cfg.collectors[0].auto_restart);
    }

    #[test]
    fn each_rule_refuses_with_the_field_named() {
        let (dir, _) = setup();
        let noexec = dir.path().join("plain");
        std::fs::write(&noexec, "x").unwrap();
        let cases: [(&str, &str, &str); 7] = [
            (
                "collectors:\n  - {id: a, binary: procmond}\n  - {id: a, binary: procmond}\n",
                "collectors[1].id",
                "duplicate",
            ),
            ("collectors:\n  - {id: a, binary: missing}\n", "collectors[0].binary", "No such file"),
            ("collectors:\n  - {id: a, binary: plain}\n", "collectors[0].binary", "not executable"),
            (
                "collectors:\n  - {id: a, binary: procmond, startup_timeout_secs: 0}\n",
                "collectors[0].startup_timeout_secs",
                "at least 1",
            ),
            (
                "collectors:\n  - {id: a, binary: procmond, heartbeat_interval_secs: 0}\n",
                "collectors[0].heartbeat_interval_secs",
                "at least 1",
            ),
            ("collectors:\n  - {id: a, binary: procmond, colour: red}\n", "line", "colour"),
            ("collectors:\n  - {id: Bad, binary: procmond}\n", "collectors[0].id", "collector_id"),
        ];
        for (text, field, reason) in cases {
            let e = AgentConfig::parse(text, "agent.yaml", dir.path()).unwrap_err();
            assert_eq!(e.file, "agent.yaml");
            assert!(e.field.starts_with(field), "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
        // A disabled collector's binary is not checked.
        assert!(
            AgentConfig::parse(
                "collectors:\n  - {id: a, binary: missing, enabled: false}\n",
                "f",
                dir.path()
            )
            .is_ok()
        );
    }
}
