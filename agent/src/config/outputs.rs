//! `outputs:` in agent.yaml: where events and alerts are forwarded
//! (`crate::forward`), each output with a name, what it sends, its filters
//! and the settings of its type. Validated with the rest of the file: every
//! refusal names `outputs[i].<field>` and the reason.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

use daemoneye_contract::api::Severity;

/// One output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Unique; names its cursor in the store and its line in `status`
    /// (1-64 of a-z, 0-9, '-', '_').
    pub name: String,
    /// `syslog` or `file`.
    #[serde(rename = "type")]
    pub output_type: OutputType,
    /// `events`, `alerts` or `both`.
    #[serde(default)]
    pub send: Send,
    /// The event kinds sent (started, stopped, modified) [default: all].
    #[serde(default)]
    pub kinds: Vec<EventKindName>,
    /// Alerts at least this severe are sent [default: low, all].
    #[serde(default = "low")]
    pub min_severity: Severity,
    /// Only what these collectors saw [default: every collector].
    #[serde(default)]
    pub collectors: Vec<String>,
    /// Events (and alerts) per batch, each batch one delivery.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// How often the store is read for new rows when the output has caught
    /// up, ms.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// The first wait after a failed delivery, ms; doubles per failure.
    #[serde(default = "default_retry_min_ms")]
    pub retry_min_ms: u64,
    /// The longest wait between two attempts, ms.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Settings of a `syslog` output.
    #[serde(default)]
    pub syslog: Option<SyslogSpec>,
    /// Settings of a `file` output.
    #[serde(default)]
    pub file: Option<FileSpec>,
    /// Settings of an `http` output.
    #[serde(default)]
    pub http: Option<HttpSpec>,
}

/// An output's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputType {
    /// RFC 5424 over TCP, RFC 6587 octet counting.
    Syslog,
    /// NDJSON to a file, rotated by size.
    File,
    /// Batches POSTed over HTTP: NDJSON, or Elasticsearch `_bulk`.
    Http,
}

/// What an output sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Send {
    /// Process events only.
    Events,
    /// Alerts only.
    Alerts,
    /// Both.
    #[default]
    Both,
}

impl Send {
    /// Events are sent.
    pub fn events(self) -> bool {
        matches!(self, Send::Events | Send::Both)
    }
    /// Alerts are sent.
    pub fn alerts(self) -> bool {
        matches!(self, Send::Alerts | Send::Both)
    }
}

/// An event kind, as agent.yaml names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKindName {
    /// `started`.
    Started,
    /// `stopped`.
    Stopped,
    /// `modified`.
    Modified,
}

impl EventKindName {
    /// The same name as the store's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKindName::Started => "started",
            EventKindName::Stopped => "stopped",
            EventKindName::Modified => "modified",
        }
    }
}

/// A `syslog` output's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogSpec {
    /// The receiver, `host:port` (TCP).
    pub address: String,
    /// The facility: kern, user, daemon, auth, authpriv, local0 .. local7.
    #[serde(default = "default_facility")]
    pub facility: String,
    /// Connecting and one write may take this long before the attempt
    /// fails, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// TLS (RFC 5425; port 6514 by convention); absent: plain TCP.
    #[serde(default)]
    pub tls: Option<TlsSpec>,
}

/// TLS settings of a `syslog` or `http` output (`crate::forward::tls`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// PEM file of the CA certificates the receiver's certificate must
    /// chain to [default: the Mozilla roots compiled in].
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the agent's certificate (and its chain), for receivers
    /// that authenticate clients; needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file of the key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the receiver's certificate must carry (syslog only; http
    /// checks the URL's host) [default: the address's host].
    #[serde(default)]
    pub server_name: Option<String>,
}

/// A `file` output's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// The file written (absolute); rotated files are `<path>.1` (newest)
    /// to `<path>.<keep>`.
    pub path: PathBuf,
    /// Rotated when a batch finds it this large, bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (0: none, the file is truncated instead).
    #[serde(default = "default_keep")]
    pub keep: u32,
}

/// An `http` output's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// The receiver, `http://host:port/path` or `https://...`. With
    /// `format: elasticsearch`, the cluster's URL: batches go to
    /// `<url>/_bulk`.
    pub url: String,
    /// `ndjson` (one document per line, any HTTP input) or
    /// `elasticsearch` (the `_bulk` API, `_id` = the document's id).
    #[serde(default)]
    pub format: HttpFormat,
    /// The index (or data stream) of `format: elasticsearch`.
    #[serde(default = "default_index")]
    pub index: String,
    /// A file whose content (trimmed) is sent as `Authorization: Bearer`.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// A file holding `user:password` for basic authentication.
    #[serde(default)]
    pub basic_auth_file: Option<PathBuf>,
    /// Compress request bodies (`Content-Encoding: gzip`).
    #[serde(default)]
    pub gzip: bool,
    /// One request (connect, send, answer) may take this long, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// TLS settings of an `https://` URL [default: the Mozilla roots, no
    /// client certificate].
    #[serde(default)]
    pub tls: Option<TlsSpec>,
}

/// What an `http` output POSTs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpFormat {
    /// `application/x-ndjson`, one document per line.
    #[default]
    Ndjson,
    /// Elasticsearch / OpenSearch `_bulk` with `create` actions.
    Elasticsearch,
}

fn default_index() -> String {
    "daemoneye".to_owned()
}

fn low() -> Severity {
    Severity::Low
}
fn default_batch_max() -> usize {
    500
}
fn default_poll_ms() -> u64 {
    250
}
fn default_retry_min_ms() -> u64 {
    200
}
fn default_retry_max_ms() -> u64 {
    30_000
}
fn default_facility() -> String {
    "local0".to_owned()
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_keep() -> u32 {
    5
}

/// Facility names and numbers (RFC 5424 section 6.2.1).
pub const FACILITIES: [(&str, u8); 16] = [
    ("kern", 0),
    ("user", 1),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("authpriv", 10),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
    ("cron", 9),
    ("ftp", 11),
];

/// A facility's number.
pub fn facility_code(name: &str) -> Option<u8> {
    FACILITIES.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// Checks every output; `Err((field, reason))` with the field relative to
/// the file (`outputs[1].syslog.address`).
pub fn validate(outputs: &[OutputSpec], collectors: &[String]) -> Result<(), (String, String)> {
    let mut names = HashSet::new();
    for (i, o) in outputs.iter().enumerate() {
        let at = |f: &str| format!("outputs[{i}].{f}");
        let ok_name = (1..=64).contains(&o.name.len())
            && o.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok_name {
            return Err((at("name"), format!("{:?}: use 1-64 of a-z, 0-9, '-', '_'", o.name)));
        }
        if !names.insert(o.name.as_str()) {
            return Err((at("name"), format!("duplicate output name {:?}", o.name)));
        }
        for (field, v, max) in [
            ("batch_max", o.batch_max as u64, 100_000),
            ("poll_ms", o.poll_ms, 60_000),
            ("retry_min_ms", o.retry_min_ms, 3_600_000),
            ("retry_max_ms", o.retry_max_ms, 3_600_000),
        ] {
            match v {
                0 => return Err((at(field), "must be at least 1".into())),
                v if v > max => return Err((at(field), format!("{v} is over the maximum of {max}"))),
                _ => {}
            }
        }
        if o.retry_max_ms < o.retry_min_ms {
            return Err((
                at("retry_max_ms"),
                format!("{} is less than retry_min_ms ({})", o.retry_max_ms, o.retry_min_ms),
            ));
        }
        if let Some(c) = o.collectors.iter().find(|c| !collectors.contains(c)) {
            return Err((at("collectors"), format!("{c:?} is not a configured collector")));
        }
        let wanted = match o.output_type {
            OutputType::Syslog => "syslog",
            OutputType::File => "file",
            OutputType::Http => "http",
        };
        let set = [("syslog", o.syslog.is_some()), ("file", o.file.is_some()), ("http", o.http.is_some())];
        if let Some((other, _)) = set.iter().find(|(n, present)| *present && *n != wanted) {
            return Err((at(other), format!("belongs to a {other} output; this one is type {wanted}")));
        }
        match o.output_type {
            OutputType::Syslog => {
                let Some(s) = &o.syslog else {
                    return Err((
                        at("syslog"),
                        "a syslog output needs `syslog: {address: host:port}`".into(),
                    ));
                };
                check_address(&s.address).map_err(|r| (at("syslog.address"), r))?;
                if facility_code(&s.facility).is_none() {
                    let known: Vec<&str> = FACILITIES.iter().map(|(n, _)| *n).collect();
                    return Err((
                        at("syslog.facility"),
                        format!("{:?} is not one of {}", s.facility, known.join(", ")),
                    ));
                }
                if !(1..=600_000).contains(&s.timeout_ms) {
                    return Err((
                        at("syslog.timeout_ms"),
                        format!("{} is not within 1-600000", s.timeout_ms),
                    ));
                }
                if let Some(tls) = &s.tls {
                    crate::forward::tls::check(tls)
                        .map_err(|(field, r)| (at(&format!("syslog.{}", tls_field(field))), r))?;
                }
            }
            OutputType::File => {
                let Some(f) = &o.file else {
                    return Err((at("file"), "a file output needs `file: {path: /absolute/path}`".into()));
                };
                if !f.path.is_absolute() || f.path.file_name().is_none() {
                    return Err((
                        at("file.path"),
                        format!("{}: must be an absolute file path", f.path.display()),
                    ));
                }
                if f.max_bytes < 4096 {
                    return Err((
                        at("file.max_bytes"),
                        format!("{} is under the minimum of 4096", f.max_bytes),
                    ));
                }
                if f.keep > 1000 {
                    return Err((at("file.keep"), format!("{} is over the maximum of 1000", f.keep)));
                }
            }
            OutputType::Http => {
                let Some(h) = &o.http else {
                    return Err((
                        at("http"),
                        "an http output needs `http: {url: http://host:port/path}`".into(),
                    ));
                };
                check_http(h).map_err(|(field, reason)| (at(&format!("http.{field}")), reason))?;
                check_http_tls(h).map_err(|(field, reason)| (at(&format!("http.{field}")), reason))?;
            }
        }
    }
    Ok(())
}

/// An `http` output's settings: `Err((field, reason))`.
fn check_http(h: &HttpSpec) -> Result<(), (&'static str, String)> {
    let (rest, default_port) = match (h.url.strip_prefix("http://"), h.url.strip_prefix("https://")) {
        (Some(rest), _) => (rest, 80),
        (_, Some(rest)) => (rest, 443),
        _ => return Err(("url", format!("{:?}: expected http://host:port/path or https://...", h.url))),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(("url", "credentials in the URL would be logged: use basic_auth_file".into()));
    }
    let has_port = match authority.rfind(']') {
        Some(i) => authority[i + 1..].starts_with(':'),
        None => authority.contains(':'),
    };
    let with_port = if has_port { authority.to_owned() } else { format!("{authority}:{default_port}") };
    check_address(&with_port).map_err(|r| ("url", format!("{}: {r}", h.url)))?;
    if h.format == HttpFormat::Elasticsearch {
        let bad = h.index.is_empty()
            || h.index.len() > 255
            || h.index.starts_with(['-', '_', '+'])
            || h.index.chars().any(|c| c.is_ascii_uppercase() || "\\/*?\"<>|, #:".contains(c));
        if bad {
            return Err((
                "index",
                format!(
                    "{:?}: an index name is lowercase, without \\ / * ? \" < > | , # : or spaces, \
                     and does not start with - _ +",
                    h.index
                ),
            ));
        }
    }
    if h.bearer_token_file.is_some() && h.basic_auth_file.is_some() {
        return Err(("basic_auth_file", "set one of bearer_token_file and basic_auth_file".into()));
    }
    for (field, file) in
        [("bearer_token_file", &h.bearer_token_file), ("basic_auth_file", &h.basic_auth_file)]
    {
        if let Some(f) = file {
            let text = std::fs::read_to_string(f).map_err(|e| (field, format!("{}: {e}", f.display())))?;
            if text.trim().is_empty() {
                return Err((field, format!("{} is empty", f.display())));
            }
            if field == "basic_auth_file" && !text.trim().contains(':') {
                return Err((field, format!("{}: expected user:password", f.display())));
            }
        }
    }
    if !(1..=600_000).contains(&h.timeout_ms) {
        return Err(("timeout_ms", format!("{} is not within 1-600000", h.timeout_ms)));
    }
    Ok(())
}

/// A `tls` block's field as agent.yaml names it under its output's type.
fn tls_field(field: &str) -> String {
    if field == "tls" { field.to_owned() } else { format!("tls.{field}") }
}

/// An `http` output's TLS: `Err((field, reason))`, the field under
/// `http`.
fn check_http_tls(h: &HttpSpec) -> Result<(), (String, String)> {
    let https = h.url.starts_with("https://");
    match &h.tls {
        Some(_) if !https => Err(("tls".into(), format!("{}: TLS settings need an https:// URL", h.url))),
        Some(tls) if tls.server_name.is_some() => {
            Err(("tls.server_name".into(), "an http output checks the URL's host; remove it".into()))
        }
        Some(tls) => crate::forward::tls::check(tls).map_err(|(field, r)| (tls_field(field), r)),
        None if https => crate::forward::tls::check(&TlsSpec::default())
            .map_err(|(_, r)| ("url".into(), format!("{}: {r}", h.url))),
        None => Ok(()),
    }
}

/// `host:port` with a port of 1-65535 (the host is resolved at each
/// connection, so a name that does not resolve yet is not refused).
fn check_address(address: &str) -> Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{address:?}: expected host:port"));
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{address:?}: the host is empty or has spaces"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{address:?}: {port:?} is not a port (1-65535)")),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::AgentConfig;

    const SYSLOG: &str = "outputs:\n  - {name: siem, type: syslog, syslog: {address: \"127.0.0.1:514\"}}\n";

    #[test]
    fn an_output_takes_its_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig::parse(SYSLOG, "agent.yaml", dir.path()).unwrap();
        let o = &cfg.outputs[0];
        assert_eq!((o.name.as_str(), o.send, o.batch_max), ("siem", super::Send::Both, 500));
        assert!(o.kinds.is_empty() && o.collectors.is_empty());
        let s = o.syslog.as_ref().unwrap();
        assert_eq!((s.facility.as_str(), s.timeout_ms), ("local0", 10_000));
        // No outputs: nothing is forwarded.
        assert!(AgentConfig::parse("log_level: info\n", "f", dir.path()).unwrap().outputs.is_empty());
    }

    #[test]
    fn the_packaged_sample_documents_every_output_key() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/agent.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let start = text.find("# Outputs:").unwrap();
        let section = &text[start..];
        for key in [
            "name",
            "type",
            "send",
            "kinds",
            "min_severity",
            "collectors",
            "batch_max",
            "poll_ms",
            "retry_min_ms",
            "retry_max_ms",
            "syslog:",
            "address",
            "facility",
            "timeout_ms",
            "tls",
            "ca_file",
            "cert_file",
            "key_file",
            "server_name",
            "file:",
            "path",
            "max_bytes",
            "keep",
            "http:",
            "url",
            "format",
            "index",
            "bearer_token_file",
            "basic_auth_file",
            "gzip",
        ] {
            let documented = section.lines().any(|l| {
                l.strip_prefix('#').is_some_and(|l| l.trim_start().starts_with(key) && l.starts_with("   "))
            });
            assert!(documented, "outputs key {key} is not documented in packaging/agent.yaml");
        }
        // The example parses (uncommented) to what it says.
        let example: String = section[section.find("#   outputs:").unwrap()..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let cfg = AgentConfig::parse(&example, "example", dir.path()).unwrap();
        assert_eq!(cfg.outputs.len(), 4);
        assert!(cfg.outputs[1].syslog.as_ref().is_some_and(|s| s.tls == Some(super::TlsSpec::default())));
        assert_eq!(cfg.outputs[2].min_severity, crate::config::Severity::Medium);
        assert!(cfg.outputs[3].http.as_ref().is_some_and(|h| h.gzip));
    }

    #[test]
    fn an_http_output_accepts_a_port_less_or_ipv6_url_and_its_secrets_files() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "user:pass\n").unwrap();
        for settings in [
            "url: \"http://vector.local/ingest\"".to_owned(),
            "url: \"http://[::1]:8686\"".to_owned(),
            "url: \"http://[::1]\"".to_owned(),
            format!(
                "url: \"http://es:9200/\", format: elasticsearch, gzip: true, basic_auth_file: {}",
                token.display()
            ),
            format!("url: \"http://h:1/x?y=1\", bearer_token_file: {}", token.display()),
        ] {
            let text = format!("outputs:\n  - {{name: h, type: http, http: {{{settings}}}}}\n");
            let cfg =
                AgentConfig::parse(&text, "agent.yaml", dir.path()).unwrap_or_else(|e| panic!("{text}: {e}"));
            let h = cfg.outputs[0].http.as_ref().unwrap();
            assert_eq!(h.timeout_ms, 10_000);
            if h.format == super::HttpFormat::Elasticsearch {
                assert_eq!(h.index, "daemoneye");
            }
        }
    }

    #[test]
    fn each_output_rule_refuses_with_the_field_named() {
        let dir = tempfile::tempdir().unwrap();
        let o = |rest: &str| format!("outputs:\n  - {{name: a, {rest}}}\n");
        let sys = |extra: &str| o(&format!("type: syslog, syslog: {{address: \"h:514\"{extra}}}"));
        let http = |settings: &str| o(&format!("type: http, http: {{{settings}}}"));
        let (empty, token) = (dir.path().join("empty"), dir.path().join("token"));
        std::fs::write(&empty, "\n").unwrap();
        std::fs::write(&token, "s3cret\n").unwrap();
        let cases: Vec<(String, &str, &str)> = vec![
            (sys(", facility: local9"), "outputs[0].syslog.facility", "\"local9\" is not one of"),
            (sys(", timeout_ms: 0"), "outputs[0].syslog.timeout_ms", "not within"),
            (o("type: syslog, syslog: {address: nowhere}"), "outputs[0].syslog.address", "expected host:port"),
            (o("type: syslog, syslog: {address: \"h:0\"}"), "outputs[0].syslog.address", "is not a port"),
            (o("type: syslog, syslog: {address: \"h:99999\"}"), "outputs[0].syslog.address", "is not a port"),
            (o("type: syslog"), "outputs[0].syslog", "needs `syslog:"),
            (o("type: file"), "outputs[0].file", "needs `file:"),
            (o("type: file, file: {path: rel.ndjson}"), "outputs[0].file.path", "absolute"),
            (o("type: file, file: {path: /x.ndjson, max_bytes: 10}"), "outputs[0].file.max_bytes", "minimum of 4096"),
            (o("type: file, file: {path: /x.ndjson, keep: 1001}"), "outputs[0].file.keep", "maximum of 1000"),
            (
                o("type: file, file: {path: /x}, syslog: {address: \"h:1\"}"),
                "outputs[0].syslog",
                "belongs to a syslog output",
            ),
            (o("type: kafka"), "line", "unknown variant `kafka`"),
            (o("type: http"), "outputs[0].http", "needs `http:"),
            (http("url: \"ftp://x\""), "outputs[0].http.url", "expected http://host:port/path"),
            (http("url: \"http://u:p@h/\""), "outputs[0].http.url", "use basic_auth_file"),
            (http("url: \"http://h:0/x\""), "outputs[0].http.url", "is not a port"),
            (http("url: \"http:///x\""), "outputs[0].http.url", "the host is empty"),
            (
                http("url: \"http://es:9200\", format: elasticsearch, index: Events"),
                "outputs[0].http.index",
                "lowercase",
            ),
            (http("url: \"http://h\", format: splunk"), "line", "unknown variant `splunk`"),
            (http("url: \"http://h\", timeout_ms: 0"), "outputs[0].http.timeout_ms", "not within"),
            (
                http(&format!("url: \"http://h\", bearer_token_file: {}/missing", dir.path().display())),
                "outputs[0].http.bearer_token_file",
                "No such file",
            ),
            (
                http(&format!("url: \"http://h\", basic_auth_file: {}", empty.display())),
                "outputs[0].http.basic_auth_file",
                "is empty",
            ),
            (
                http(&format!("url: \"http://h\", basic_auth_file: {}", token.display())),
                "outputs[0].http.basic_auth_file",
                "expected user:password",
            ),
            (
                http(&format!(
                    "url: \"http://h\", bearer_token_file: {0}, basic_auth_file: {0}",
                    token.display()
                )),
                "outputs[0].http.basic_auth_file",
                "set one of",
            ),
            (o("type: http, http: {url: \"http://h\"}, file: {path: /x}"), "outputs[0].file", "belongs to a file"),
            (o("type: file, file: {path: /x, colour: red}"), "line", "colour"),
            (o("type: file, send: everything, file: {path: /x}"), "line", "unknown variant `everything`"),
            (o("type: file, kinds: [exploded], file: {path: /x}"), "line", "unknown variant `exploded`"),
            (o("type: file, min_severity: dire, file: {path: /x}"), "line", "unknown variant `dire`"),
            (o("type: file, collectors: [nope], file: {path: /x}"), "outputs[0].collectors", "not a configured"),
            (o("type: file, batch_max: 0, file: {path: /x}"), "outputs[0].batch_max", "at least 1"),
            (o("type: file, poll_ms: 60001, file: {path: /x}"), "outputs[0].poll_ms", "maximum of 60000"),
            (
                o("type: file, retry_min_ms: 500, retry_max_ms: 100, file: {path: /x}"),
                "outputs[0].retry_max_ms",
                "less than retry_min_ms",
            ),
            (o("name: Bad, type: file, file: {path: /x}").replacen("name: a, ", "", 1), "outputs[0].name", "use 1-64"),
            (
                "outputs:\n  - {name: a, type: file, file: {path: /x}}\n  - {name: a, type: file, file: {path: /y}}\n"
                    .to_owned(),
                "outputs[1].name",
                "duplicate output name",
            ),
        ];
        for (text, field, reason) in cases {
            let e = AgentConfig::parse(&text, "agent.yaml", dir.path()).unwrap_err();
            assert_eq!(e.file, "agent.yaml");
            assert!(e.field.starts_with(field), "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }

    /// A self-signed certificate and its key, made with `openssl`.
    fn certificate(dir: &std::path::Path) -> (String, String) {
        let (cert, key) = (dir.join("c.pem"), dir.join("c.key"));
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-days", "1", "-subj", "/CN=t", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (cert.display().to_string(), key.display().to_string())
    }

    #[test]
    fn tls_settings_are_read_and_checked_with_the_field_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let junk = junk.display().to_string();
        let sys = |tls: &str| {
            format!("outputs:\n  - {{name: s, type: syslog, syslog: {{address: \"h:6514\", tls: {tls}}}}}\n")
        };
        let http = |url: &str, tls: &str| {
            format!("outputs:\n  - {{name: h, type: http, http: {{url: \"{url}\"{tls}}}}}\n")
        };
        for good in [
            sys("{}"),
            sys(&format!(
                "{{ca_file: {cert}, cert_file: {cert}, key_file: {key}, server_name: siem.example}}"
            )),
            sys("{server_name: \"10.0.0.1\"}"),
            http("https://es:9200", ""),
            http("https://es", &format!(", tls: {{ca_file: {cert}, cert_file: {cert}, key_file: {key}}}")),
        ] {
            let cfg =
                AgentConfig::parse(&good, "agent.yaml", dir.path()).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(cfg.outputs.len(), 1);
        }
        let cases = [
            (sys("{ca_file: /nonexistent.pem}"), "outputs[0].syslog.tls.ca_file", "No such file"),
            (sys(&format!("{{ca_file: {junk}}}")), "outputs[0].syslog.tls.ca_file", "no certificate"),
            (sys(&format!("{{ca_file: {key}}}")), "outputs[0].syslog.tls.ca_file", "no certificate"),
            (sys(&format!("{{cert_file: {cert}}}")), "outputs[0].syslog.tls.key_file", "needs its key_file"),
            (sys(&format!("{{key_file: {key}}}")), "outputs[0].syslog.tls.cert_file", "needs its cert_file"),
            (
                sys(&format!("{{cert_file: {cert}, key_file: {cert}}}")),
                "outputs[0].syslog.tls.key_file",
                "no private key",
            ),
            (sys("{server_name: \"bad name!\"}"), "outputs[0].syslog.tls.server_name", "not a DNS name"),
            (sys("{verify: false}"), "line", "unknown field `verify`"),
            (
                http("http://es", &format!(", tls: {{ca_file: {cert}}}")),
                "outputs[0].http.tls",
                "need an https:// URL",
            ),
            (http("https://es", ", tls: {server_name: es}"), "outputs[0].http.tls.server_name", "URL's host"),
            (
                http("https://es", &format!(", tls: {{ca_file: {junk}}}")),
                "outputs[0].http.tls.ca_file",
                "no certificate",
            ),
            (http("https://:9200", ""), "outputs[0].http.url", "the host is empty"),
        ];
        for (text, field, reason) in cases {
            let e = AgentConfig::parse(&text, "agent.yaml", dir.path()).unwrap_err();
            assert!(e.field.starts_with(field), "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }
}
