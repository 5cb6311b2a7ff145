//! The service definitions in `packaging/`, checked against the binaries
//! they start. The systemd unit passes `systemd-analyze verify` (where the
//! tool exists; a broken copy does not), and the agent it starts, with the
//! packaged agent.yaml and its procmond, reaches SteadyState and stores
//! events under the unit's own restrictions: read from the unit file and
//! applied in a private mount namespace (`ProtectSystem=strict` makes `/`,
//! `/tmp` and `/home` read-only, only the state directory stays
//! writable), with its `UMask=` and its capability bounding set. The
//! FreeBSD rc.d scripts are valid `sh`, and every argument they pass is
//! one the binaries accept.
//!
//! The mount namespace needs root, as CI runs: without it (or without
//! `unshare`, `mount` or `setpriv`) the test fails and says so.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use daemoneye_agent::api::AgentState;
use daemoneye_tests::{System, assert_exactly_once, bin, poll_status};

/// `packaging/`, from this crate's directory.
fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// The systemd unit.
fn unit_path() -> PathBuf {
    packaging().join("systemd/daemoneye-agent.service")
}

/// Where packaging/README.md installs the binaries, for both systems.
const INSTALL_DIR: &str = "/usr/local/bin";

/// systemd's `PATH` for a system service (systemd.exec(5), "Environment
/// Variables in Spawned Processes"); the rest of its environment is empty.
const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The capabilities in the kernel's order (capability.h): a bit number is
/// an index here. Names as setpriv(1) and `CapabilityBoundingSet=` take
/// them, without `CAP_`, lower-case.
const CAPABILITIES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// The bounding set of a process that keeps every capability.
const ALL_CAPABILITIES: u64 = (1 << CAPABILITIES.len()) - 1;

/// A systemd unit file's assignments, in order: (section, key, value).
struct Unit {
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn load(path: &Path) -> Unit {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Unit::parse(&text)
    }

    /// systemd.syntax(7): `[Section]` headers, `Key=Value` lines, `#` and
    /// `;` comments (also between continued lines), a trailing backslash
    /// continuing a line.
    fn parse(text: &str) -> Unit {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with(['#', ';']) || (line.is_empty() && pending.is_empty()) {
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let full = std::mem::take(&mut pending);
            if let Some(name) = full.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
            } else {
                let (key, value) = full.split_once('=').unwrap_or_else(|| panic!("not Key=Value: {full}"));
                entries.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
            }
        }
        Unit { entries }
    }

    /// A single-valued `[Service]` setting: its last assignment.
    fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().rev().find(|(s, k, _)| s == "Service" && k == key).map(|(_, _, v)| v.as_str())
    }

    /// A boolean `[Service]` setting (false when absent).
    fn flag(&self, key: &str) -> bool {
        match self.get(key).map(str::to_ascii_lowercase).as_deref() {
            None | Some("0" | "no" | "n" | "false" | "f" | "off") => false,
            Some("1" | "yes" | "y" | "true" | "t" | "on") => true,
            Some(other) => panic!("{key}={other} is not a boolean"),
        }
    }

    /// A list `[Service]` setting: the words of every assignment, an empty
    /// assignment resetting the list.
    fn list(&self, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (_, _, value) in self.entries.iter().filter(|(s, k, _)| s == "Service" && k == key) {
            if value.is_empty() {
                out.clear();
            }
            out.extend(value.split_whitespace().map(str::to_owned));
        }
        out
    }

    /// An octal mode setting (`UMask=`, `StateDirectoryMode=`).
    fn mode(&self, key: &str, default: u32) -> u32 {
        self.get(key).map_or(default, |m| {
            u32::from_str_radix(m, 8).unwrap_or_else(|e| panic!("{key}={m} is not octal: {e}"))
        })
    }
}

/// The unit's file-system and privilege restrictions, as systemd.exec(5)
/// defines them. Not modelled: system call filters, address families and
/// the kernel protections, which need systemd itself.
#[derive(Debug)]
struct Sandbox {
    /// `ProtectSystem=strict`: every mount read-only but the API file
    /// systems `/proc`, `/sys` and `/dev`.
    strict: bool,
    /// Directories made read-only besides (`ProtectSystem=yes|full`,
    /// `ProtectHome=read-only`), where they exist.
    read_only: Vec<PathBuf>,
    /// Writable despite the above: `/var/lib/<StateDirectory=>` and
    /// `/run/<RuntimeDirectory=>`, with the mode systemd creates them with,
    /// and `ReadWritePaths=` (no mode: they must exist).
    writable: Vec<(PathBuf, Option<u32>)>,
    /// `UMask=` (systemd's default 0022).
    umask: u32,
    /// `CapabilityBoundingSet=`; `None`: every capability.
    capabilities: Option<Vec<String>>,
    /// `NoNewPrivileges=`.
    no_new_privileges: bool,
}

impl Sandbox {
    fn of(unit: &Unit) -> Sandbox {
        let mut read_only: Vec<PathBuf> = Vec::new();
        let strict = match unit.get("ProtectSystem").map(str::to_ascii_lowercase).as_deref() {
            Some("strict") => true,
            Some("full") => {
                read_only.extend(["/usr", "/boot", "/efi", "/etc"].map(PathBuf::from));
                false
            }
            Some("yes" | "true" | "1" | "on") => {
                read_only.extend(["/usr", "/boot", "/efi"].map(PathBuf::from));
                false
            }
            None | Some("no" | "false" | "0" | "off") => false,
            Some(other) => panic!("ProtectSystem={other} is not a value systemd takes"),
        };
        match unit.get("ProtectHome").map(str::to_ascii_lowercase).as_deref() {
            Some("read-only") => read_only.extend(["/home", "/root", "/run/user"].map(PathBuf::from)),
            None | Some("no" | "false" | "0" | "off") => {}
            Some(other) => panic!("ProtectHome={other}: this test models read-only and no only"),
        }
        // Stand-ins for these directories live in the test's temp dir,
        // which a private /tmp would hide.
        assert!(
            !unit.flag("PrivateTmp"),
            "PrivateTmp=: this test does not model it (the unit says why it is not set)"
        );
        let mut writable = Vec::new();
        let state_mode = unit.mode("StateDirectoryMode", 0o755);
        for name in unit.list("StateDirectory") {
            writable.push((Path::new("/var/lib").join(name), Some(state_mode)));
        }
        let runtime_mode = unit.mode("RuntimeDirectoryMode", 0o755);
        for name in unit.list("RuntimeDirectory") {
            writable.push((Path::new("/run").join(name), Some(runtime_mode)));
        }
        for path in unit.list("ReadWritePaths") {
            // `-`: ignored when missing; `+`: relative to RootDirectory=
            // (unset here).
            let path = PathBuf::from(path.trim_start_matches(['-', '+']));
            if !writable.iter().any(|(p, _)| *p == path) {
                writable.push((path, None));
            }
        }
        let capabilities = unit.get("CapabilityBoundingSet").map(|set| {
            assert!(!set.starts_with('~'), "CapabilityBoundingSet=~…: this test models a list of those kept");
            set.split_whitespace()
                .map(|c| {
                    let name = c.to_ascii_lowercase().trim_start_matches("cap_").to_owned();
                    assert!(CAPABILITIES.contains(&name.as_str()), "CapabilityBoundingSet: unknown {c}");
                    name
                })
                .collect()
        });
        Sandbox {
            strict,
            read_only,
            writable,
            umask: unit.mode("UMask", 0o022),
            capabilities,
            no_new_privileges: unit.flag("NoNewPrivileges"),
        }
    }

    /// `argv` under these restrictions: `unshare` gives it a private mount
    /// namespace, where `sh` remounts what the unit makes read-only,
    /// binds each writable directory's stand-in (`stand_ins`: the unit's
    /// path and the test's) onto itself writable again, sets the umask and
    /// execs `setpriv` to drop the capabilities, which execs `argv`. Every
    /// step execs the next, so the child's pid ends up `argv`'s own; a
    /// failing mount ends the script with its error on stderr.
    fn command(&self, stand_ins: &[(PathBuf, PathBuf)], argv: &[OsString]) -> Command {
        let mut script = String::from("set -eu\n");
        if self.strict {
            for (mount_point, options) in mounts() {
                let api = ["/proc", "/sys", "/dev"].iter().any(|a| mount_point.starts_with(a));
                if api || options.split(',').any(|o| o == "ro") {
                    continue;
                }
                // The mount's own flags (nosuid, nodev, …) are kept: a bind
                // remount sets exactly those given.
                let keep: Vec<&str> = options.split(',').filter(|o| *o != "rw").collect();
                script.push_str(&format!(
                    "mount -o remount,bind,ro{}{} {}\n",
                    if keep.is_empty() { "" } else { "," },
                    keep.join(","),
                    quote(&mount_point)
                ));
            }
        }
        for dir in &self.read_only {
            let d = quote(dir);
            script.push_str(&format!(
                "if [ -d {d} ]; then mount --bind {d} {d}; mount -o remount,bind,ro {d}; fi\n"
            ));
        }
        for (path, _) in &self.writable {
            let (_, host) = stand_ins.iter().find(|(p, _)| p == path).unwrap_or_else(|| {
                panic!("the unit makes {} writable: this test has no stand-in for it", path.display())
            });
            let h = quote(host);
            script.push_str(&format!("mount --bind {h} {h}\nmount -o remount,bind,rw {h}\n"));
        }
        script.push_str(&format!("umask {:04o}\nexec \"$@\"\n", self.umask));
        let mut command = Command::new("unshare");
        command.args(["--mount", "--propagation", "private", "sh", "-c", &script, "sandbox"]);
        if self.capabilities.is_some() || self.no_new_privileges {
            command.arg("setpriv");
            if let Some(caps) = &self.capabilities {
                let keep: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
                command.arg("--bounding-set").arg(format!("-all,{}", keep.join(",")));
                // Root's exec would keep its inheritable set besides.
                command.args(["--inh-caps", "-all"]);
            }
            if self.no_new_privileges {
                command.arg("--no-new-privs");
            }
            command.arg("--");
        }
        command.args(argv).env_clear().env("PATH", SERVICE_PATH);
        command
    }

    /// The capability bounding set as /proc/PID/status shows it.
    fn bounding_mask(&self) -> u64 {
        self.capabilities.as_ref().map_or(ALL_CAPABILITIES, |caps| {
            caps.iter()
                .map(|c| 1u64 << CAPABILITIES.iter().position(|k| k == c).expect("known capability"))
                .fold(0, |a, b| a | b)
        })
    }
}

/// Every mount point of this process's mount namespace (which `unshare`
/// copies), parents first, with its per-mount options.
fn mounts() -> Vec<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (PathBuf::from(unescape(f[4])), f[5].to_owned())
        })
        .collect()
}

/// A mountinfo field: space, tab, newline and backslash are octal escapes.
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A word for `sh`, single-quoted.
fn quote(path: &Path) -> String {
    format!("'{}'", path.to_str().expect("UTF-8 path").replace('\'', r"'\''"))
}

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (as CI runs): it applies the unit's restrictions in a mount namespace"
    );
}

/// The unit's `ExecStart=`, split on spaces: the program and its arguments.
fn exec_start(unit: &Unit) -> (PathBuf, Vec<String>) {
    let line = unit.get("ExecStart").expect("ExecStart=");
    assert!(!line.contains(['"', '\'', '$', '%', '\\']), "this test splits ExecStart= on spaces: {line}");
    let mut words = line.split_whitespace().map(str::to_owned);
    let program = PathBuf::from(words.next().expect("ExecStart= names a program"));
    (program, words.collect())
}

/// The built binary standing in for an installed one: same file name, and
/// installed where packaging/README.md puts it.
fn built(installed: &Path) -> PathBuf {
    assert_eq!(
        installed.parent(),
        Some(Path::new(INSTALL_DIR)),
        "{} is not where packaging/README.md installs the binaries",
        installed.display()
    );
    bin(installed.file_name().and_then(|n| n.to_str()).expect("a file name"))
}

/// What a probe sees of the sandbox's file system, umask and capabilities:
/// whether `/`, `/tmp`, `/home` and `/var/tmp` are writable, whether a file
/// can be created in `$1` (the test's temp dir) and in `$2` (a writable
/// stand-in), the umask and the bounding set.
const PROBE: &str = r#"
for p in / /tmp /home /var/tmp; do
  if [ -e "$p" ] && [ -w "$p" ]; then echo "writable $p"; fi
done
if touch "$1/probe" 2>/dev/null; then echo "created $1/probe"; fi
if ! (touch "$2/probe" && rm "$2/probe"); then echo "cannot write $2"; fi
echo "umask $(umask)"
grep '^CapBnd:' /proc/self/status
"#;

#[test]
fn the_units_agent_reaches_steady_state_and_stores_events_under_its_file_system_restrictions() {
    require_root();
    let unit = Unit::load(&unit_path());
    let sandbox = Sandbox::of(&unit);
    assert!(sandbox.strict, "the unit sets ProtectSystem=strict (the case this test is about)");

    // The test's own agent.yaml is replaced by the packaged one, installed
    // as packaging/README.md does; its data dir stands in for the state
    // directory, which is the agent's default data dir on Linux.
    let mut sys = System::create(&[], "");
    let config = sys.dir.path().join("agent.yaml");
    std::fs::copy(packaging().join("agent.yaml"), &config).expect("copy packaging/agent.yaml");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod agent.yaml");
    let state_dirs = unit.list("StateDirectory");
    assert_eq!(
        state_dirs.iter().map(|d| Path::new("/var/lib").join(d)).collect::<Vec<_>>(),
        [daemoneye_platform::paths::system_data_dir()],
        "the unit's StateDirectory= is the agent's default data dir"
    );
    let mut stand_ins = Vec::new();
    for (path, mode) in &sandbox.writable {
        let host = if *path == daemoneye_platform::paths::system_data_dir() {
            sys.data_dir()
        } else if path.starts_with("/run") {
            // Not used by the packaged agent.yaml (its socket is in the
            // data dir), writable all the same.
            sys.dir.path().join(format!("run-{}", path.file_name().and_then(|n| n.to_str()).expect("a name")))
        } else {
            panic!("ReadWritePaths={}: this test has no stand-in for it", path.display())
        };
        // Created as systemd creates the state and runtime directories.
        std::fs::create_dir(&host).expect("create a stand-in");
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode.unwrap_or(0o755)))
            .expect("chmod a stand-in");
        stand_ins.push((path.clone(), host));
    }

    // The restrictions hold: only the stand-ins are writable.
    let mut probe: Vec<OsString> = ["sh", "-c", PROBE, "probe"].map(OsString::from).to_vec();
    probe.extend([sys.dir.path().into(), sys.data_dir().into()]);
    let probe = sandbox.command(&stand_ins, &probe).stdin(Stdio::null()).output().expect("run unshare");
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout),
        format!("umask {:04o}\nCapBnd:\t{:016x}\n", sandbox.umask, sandbox.bounding_mask()),
        "the sandbox is not the unit's (no unshare, mount or setpriv, or no mount namespace?); stderr: {}",
        String::from_utf8_lossy(&probe.stderr)
    );

    // The unit's command line, with the built binary, the config copy and
    // --data-dir for the state directory.
    let (program, args) = exec_start(&unit);
    let mut argv: Vec<OsString> = vec![built(&program).into()];
    for a in args {
        argv.push(match a.as_str() {
            "/etc/daemoneye/agent.yaml" => config.clone().into(),
            _ if a.starts_with('/') => panic!("ExecStart=: this test has no stand-in for {a}"),
            _ => a.into(),
        });
    }
    argv.extend([OsString::from("--data-dir"), sys.data_dir().into()]);
    sys.spawn_agent(sandbox.command(&stand_ins, &argv));

    let (steady, last) = poll_status(
        Duration::from_secs(40),
        || {
            if let Some(code) = sys.agent.as_mut().and_then(|a| a.try_wait().ok().flatten()) {
                panic!(
                    "the agent exited ({code}) under the unit's restrictions\n--- log ---\n{}",
                    sys.tail()
                );
            }
            sys.status()
        },
        |s| s.state == AgentState::SteadyState,
    );
    assert!(steady, "SteadyState not reached; last status {last:#?}\n--- log ---\n{}", sys.tail());
    assert_exactly_once(&sys, &["procmond"]);
    // The capabilities the unit keeps are the ones procmond uses: it reads
    // every process, has the kernel's process events and raises its event
    // thread's priority (each falls back, with a log line, without them).
    let log = sys.log();
    for (said, needs) in [
        ("all fields of all processes are readable", "CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"),
        ("event source: kernel", "CAP_NET_ADMIN"),
        ("kernel event thread runs at nice", "CAP_SYS_NICE"),
    ] {
        assert!(
            log.contains(said),
            "procmond did not log {said:?}: does the unit keep {needs}?\n{}",
            sys.tail()
        );
    }
    let data_dir = sys.data_dir();
    let events =
        sys.cli(&["--data-dir", data_dir.to_str().expect("UTF-8"), "events", "--json", "--limit", "3"]);
    let lines = String::from_utf8_lossy(&events.stdout).lines().count();
    assert!(
        events.status.success() && lines == 3,
        "daemoneye-cli events: {}\n{}\n{}",
        events.status,
        String::from_utf8_lossy(&events.stdout),
        String::from_utf8_lossy(&events.stderr)
    );

    // UMask=: what the agent and procmond created is private to root.
    let mut open = Vec::new();
    let mut dirs = vec![data_dir];
    while let Some(dir) = dirs.pop() {
        // A file or directory removed meanwhile (a WAL segment, SQLite's
        // journal) is skipped.
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.permissions().mode() & sandbox.umask != 0 {
                open.push(format!("{} {:o}", entry.path().display(), meta.permissions().mode() & 0o7777));
            }
            if meta.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    assert!(open.is_empty(), "not private under UMask={:04o}: {open:?}", sandbox.umask);

    // SIGTERM, as systemd's stop sends it (KillMode=mixed: the agent only).
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0), "{}", sys.tail());
}

/// `systemd-analyze verify` on a unit file written as
/// `dir/daemoneye-agent.service`: whether it passed (it exits 0 even when
/// it ignores an unknown key or a bad value, saying so: any output is a
/// complaint) and what it said.
fn verify(dir: &Path, text: &str) -> (bool, String) {
    let path = dir.join("daemoneye-agent.service");
    std::fs::write(&path, text).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && said.trim().is_empty(), said)
}

#[test]
fn systemd_analyze_verify_passes_the_unit_and_fails_broken_copies() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed: the unit is not verified (.ci/run installs it)");
        return;
    }
    let text = std::fs::read_to_string(unit_path()).expect("read the unit");
    let (program, _) = exec_start(&Unit::parse(&text));
    // verify wants the program of ExecStart= to exist: the built one, under the
    // same name.
    let exec = format!("ExecStart={}", program.display());
    assert_eq!(text.matches(&exec).count(), 1, "one {exec} line");
    let unit = text.replace(&exec, &format!("ExecStart={}", built(&program).display()));
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, said) = verify(dir.path(), &unit);
    assert!(ok, "systemd-analyze verify {}:\n{said}", unit_path().display());

    // The check can fail: a misspelt key, a bad value, a missing program.
    for (from, to, complaint) in [
        ("ProtectSystem=strict", "ProtectSytem=strict", "Unknown key"),
        ("ProtectHome=read-only", "ProtectHome=readonly", "Failed to parse"),
        (exec.as_str(), "ExecStart=/nonexistent/daemoneye-agent", "not executable"),
    ] {
        assert_eq!(text.matches(from).count(), 1, "one {from} in the unit");
        let broken =
            text.replace(from, to).replace(&exec, &format!("ExecStart={}", built(&program).display()));
        let (ok, said) = verify(dir.path(), &broken);
        assert!(!ok && said.contains(complaint), "{to}: verify said {said:?}");
    }
}

/// rc.subr(8) reduced to what the scripts call at load and start time: a
/// `start` prints the command it would run, one word a line.
const RC_SUBR: &str = r#"
load_rc_config() { :; }
checkyesno() {
	eval "_value=\${$1}"
	case $_value in
	[Yy][Ee][Ss]|[Tt][Rr][Uu][Ee]|[Oo][Nn]|1) return 0 ;;
	[Nn][Oo]|[Ff][Aa][Ll][Ss][Ee]|[Oo][Ff][Ff]|0) return 1 ;;
	*) echo "checkyesno: $1 is $_value" >&2; exit 1 ;;
	esac
}
warn() { echo "warn: $*" >&2; }
run_rc_command() {
	eval "set -- $command $command_args"
	printf '%s\n' "$@"
}
"#;

#[test]
fn the_rc_d_scripts_are_valid_sh_and_pass_only_arguments_the_binaries_accept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rc_subr = dir.path().join("rc.subr");
    std::fs::write(&rc_subr, RC_SUBR).expect("write rc.subr");
    // Each script with its defaults, and with the rc.conf variables
    // packaging/README.md shows.
    let cases: [(&str, &[(&str, &str)]); 4] = [
        ("daemoneye_agent", &[]),
        (
            "daemoneye_agent",
            &[("daemoneye_agent_args", "--log-level debug"), ("daemoneye_agent_restart", "NO")],
        ),
        ("procmond", &[]),
        (
            "procmond",
            &[
                ("procmond_args", "--interval 30 --compute-hashes"),
                ("procmond_config", "/usr/local/etc/daemoneye/procmond.yaml"),
            ],
        ),
    ];
    for (name, vars) in cases {
        let script = packaging().join("freebsd").join(name);
        let syntax = Command::new("sh").arg("-n").arg(&script).output().expect("run sh -n");
        assert!(
            syntax.status.success(),
            "sh -n {}: {}",
            script.display(),
            String::from_utf8_lossy(&syntax.stderr)
        );

        let text = std::fs::read_to_string(&script).expect("read the script");
        assert_eq!(text.matches("\n. /etc/rc.subr\n").count(), 1, "{name} sources /etc/rc.subr once");
        let copy = dir.path().join(name);
        std::fs::write(&copy, text.replace("\n. /etc/rc.subr\n", &format!("\n. {}\n", quote(&rc_subr))))
            .expect("write the copy");
        let out = Command::new("sh")
            .arg(&copy)
            .arg("start")
            .env_clear()
            .env("PATH", SERVICE_PATH)
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run the script");
        let words: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{name} start {vars:?}: {words:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // daemon(8) and its flags (FreeBSD's: not checked here), then the
        // program and its arguments.
        assert_eq!(words.first().map(String::as_str), Some("/usr/sbin/daemon"), "{name}: {words:?}");
        let at = words
            .iter()
            .position(|w| w.starts_with(&format!("{INSTALL_DIR}/")))
            .unwrap_or_else(|| panic!("{name}: no program in {INSTALL_DIR} in {words:?}"));
        let program = built(Path::new(&words[at]));
        let args = &words[at + 1..];
        for (var, value) in vars.iter().filter(|(v, _)| v.ends_with("_args")) {
            assert!(args.join(" ").contains(value), "{name}: {var} not passed: {args:?}");
        }
        // Every option is one the binary lists, and the binary accepts the
        // whole command line (clap stops at the first unknown option or
        // bad value, before the --help at the end).
        let help = Command::new(&program).arg("--help").output().expect("run --help");
        let listed = String::from_utf8_lossy(&help.stdout).into_owned();
        let known: Vec<&str> = listed.split(|c: char| c.is_whitespace() || ",=[]".contains(c)).collect();
        for option in args.iter().filter(|a| a.starts_with("--")) {
            let option = option.split('=').next().expect("a name");
            assert!(known.contains(&option), "{name}: {} --help lists no {option}", program.display());
        }
        let accepted = Command::new(&program).args(args).arg("--help").output().expect("run the program");
        assert!(
            accepted.status.success(),
            "{name}: {} {args:?} is refused: {}",
            program.display(),
            String::from_utf8_lossy(&accepted.stderr)
        );
    }
}
