//! Command-line sanitization. Every command line goes through a
//! [`Sanitizer`] before anything leaves the collector, so that secrets never
//! reach the write-ahead log, the bus or the store. Values are redacted by
//! the name they are given (`--password x`, `--api-key=x`, `API_KEY=x`,
//! `{"token":"x"}`, `Authorization: x`), by where they sit (the password of
//! a URL's userinfo, a handful of programs' secret short flags such as
//! `mysql -pX`) and by their shape (AWS access key ids, GitHub, Slack and
//! JSON Web Tokens, PEM private keys). Everything else is kept as it is:
//! harmless flags and values (`ssh -p 22`, `grep -r pass .`) stay readable,
//! since a process monitor that hides every command line is blind. Each
//! redacted value becomes [`REDACTED`]; the argument count never grows.
//!
//! The rules, in the order they apply to each argument:
//!
//! 1. The value of a flag that takes a secret: the argument after a
//!    matching `--flag` or `-flag` without `=` is replaced whole (unless it
//!    starts with `--`: it is then the next flag, not a value), and so is the
//!    part after `=` of a matching `--flag=value`. A matching name is one
//!    from the word list (see [`Sanitizer`]); a `--no-` flag (`--no-password`)
//!    is a negation and takes no value.
//! 2. Program rules for well-known single-letter secret flags, which the word
//!    list never matches: `mysql`/`mariadb` tools `-pSECRET` (attached only:
//!    a lone `-p` prompts and the next argument is the database), `sshpass
//!    -p`, `redis-cli -a`/`--pass`, `curl -u`/`-U`/`--user`/`--proxy-user`
//!    (the part after the first `:`) and `--oauth2-bearer`, `openssl -k` and
//!    `pass:SECRET` values. The program is `args[0]` or the latest argument
//!    naming a known program (`sudo mysql -pX`, `sshpass -p X ssh -p 22`).
//! 3. `KEY=value` arguments (env style, `env AWS_SECRET_ACCESS_KEY=x cmd`)
//!    and `Name: value` arguments (HTTP headers, `-H "X-Api-Key: x"`) whose
//!    name matches.
//! 4. Inside any argument or value: `key=value` pairs with a matching key
//!    (`https://h/?token=x&a=1`, up to the next `&`, `;`, `,`, quote, bracket
//!    or whitespace), JSON string members with a matching key, the password
//!    of `scheme://user:password@host` (the user stays), and the token
//!    shapes above.
//! 5. An argument containing whitespace (`sh -c "..."`, a rewritten argv[0]
//!    such as `python app.py --api-key k`) is also sanitized word by word as
//!    a nested command line, so `sh -c "app --password x"` loses `x`.
//!
//! 6. A command line cut at the platform's limit
//!    ([`Sanitizer::sanitize_cut`]): the rules run on what was read, then
//!    the last word of the last argument, which the cut may have split, is
//!    replaced whole, whatever it looks like: half a token or the first
//!    characters of a password match no rule, and a prefix of a secret is
//!    still a secret. Only that word is lost (a long `sh -c` script keeps
//!    everything before it).
//!
//! Not covered, by design or by ambiguity: plain words equal to a sensitive
//! name (`grep password f` keeps `f`, so `aws configure set
//! aws_secret_access_key X` keeps `X`), userinfo without a scheme
//! (`user:pass@host` is also scp's `user@host:path`), Windows `/p` flags, and
//! values that look like nothing in particular after a flag that is not
//! known to take a secret. With `strip_all_arguments`, everything after the
//! program is dropped instead.

use crate::config::SanitizeConfig;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "********";

/// The sensitive names redacted by default (matched as described on
/// [`Sanitizer`]).
///
/// The first ten are the default `sensitive_words` of the Datadog agent's
/// process scrubber (`pkg/process/procutil/data_scrubber.go`, where they are
/// `*word*` globs; here a name must *end* with the word). The rest are common
/// names of secrets in command lines and environment-style arguments. `pwd`
/// is deliberately absent (`PWD=/home/me` is a directory) and so is `pass`
/// (`--bypass`, `ffmpeg -pass 1`); add them with `extra_words` if wanted.
pub const DEFAULT_WORDS: &[&str] = &[
    // Datadog agent process scrubber defaults.
    "password",
    "passwd",
    "mysql_pwd",
    "access_token",
    "auth_token",
    "api_key",
    "apikey",
    "secret",
    "credentials",
    "stripetoken",
    // Common additions.
    "token",
    "private_key",
    "client_secret",
    "secret_key",
    "secret_access_key",
    "aws_secret_access_key",
    "passphrase",
    "credential",
    "authorization",
    "cookie",
    "license_key",
    "account_key",
    "encryption_key",
    "signing_key",
];

/// Redacts secrets from command lines. Built once from the configuration;
/// cheap to clone.
///
/// **Word matching.** A flag or key name is normalized by dropping its
/// leading dashes, lowercasing it and removing every `-` and `_`; the word
/// list is normalized the same way. The name matches when its normalized
/// form is at least two characters long and *ends with* a normalized word.
/// So `--api-key`, `--api_key`, `--apikey`, `--apiKey` and `API_KEY=` all
/// match `api_key`, and so do `--db-password`, `MYSQL_PWD`,
/// `--client-secret` and `-Djavax.net.ssl.keyStorePassword=`; while
/// `--secretariat-mode`, `--password-file`, `--password-stdin`,
/// `--token-ttl` and `--max-tokens` do not (what they take is named by
/// their last part, and it is not a secret). Single-letter flags (`-p`,
/// `-k`, `--p`) are never matched against the words: they mean different
/// things to every program (`ssh -p 22`, `sort -k 2`); the few that take
/// secrets are the program rules of the module documentation.
///
/// Over-redaction is the failure mode chosen where the command line is
/// ambiguous (`--password --x`, `mysql --password db` lose the next value).
#[derive(Debug, Clone)]
pub struct Sanitizer {
    /// Normalized words, sorted, deduplicated, none empty.
    words: Vec<String>,
    /// Drop every argument after the program.
    strip_all: bool,
}

/// A sanitized command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sanitized {
    /// The sanitized argv: as long as the input, or at most one argument with
    /// `strip_all_arguments`.
    pub args: Vec<String>,
    /// How many values were replaced by [`REDACTED`], plus the dropped
    /// arguments with `strip_all_arguments`.
    pub redacted: usize,
}

/// A program with secret-bearing short flags (or one that ends the previous
/// program's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    /// The MySQL and MariaDB clients: `-pSECRET`.
    Mysql,
    /// `sshpass -p SECRET`.
    Sshpass,
    /// `redis-cli -a SECRET`, `--pass SECRET`.
    RedisCli,
    /// `curl -u user:SECRET`, `--oauth2-bearer SECRET`.
    Curl,
    /// `openssl ... -k SECRET`, `pass:SECRET`.
    Openssl,
    /// `ssh`, `scp` and the like: no rule, but `sshpass -p x ssh -p 22` must
    /// not take the port for a password.
    Ssh,
}

/// What the next argument is, after a flag that takes a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// A secret, replaced whole.
    Whole,
    /// `user:secret`, the part after the first `:` replaced.
    UserPass,
}

/// Where the walk over a command line is.
#[derive(Debug, Default)]
struct State {
    /// The previous argument was a flag whose value is a secret.
    pending: Option<Pending>,
    /// The program whose rules apply.
    program: Option<Program>,
}

/// A `-flag`, `--flag` or `--flag=value` argument.
struct Flag<'a> {
    /// The leading dashes.
    dashes: &'a str,
    /// The name, up to the first `=`.
    name: &'a str,
    /// What follows the first `=`.
    value: Option<&'a str>,
}

impl Sanitizer {
    /// Builds a sanitizer: the words are [`DEFAULT_WORDS`] plus
    /// `extra_words` (or only `extra_words` with `replace_default_words`),
    /// normalized; words that normalize to nothing (`"-"`) are ignored. The
    /// program rules and the URL and token-shape rules do not depend on the
    /// words and always apply.
    pub fn new(cfg: &SanitizeConfig) -> Sanitizer {
        let defaults: &[&str] = if cfg.replace_default_words { &[] } else { DEFAULT_WORDS };
        let mut words: Vec<String> = defaults
            .iter()
            .copied()
            .chain(cfg.extra_words.iter().map(String::as_str))
            .map(normalize)
            .filter(|w| !w.is_empty())
            .collect();
        words.sort();
        words.dedup();
        Sanitizer { words, strip_all: cfg.strip_all_arguments }
    }

    /// Sanitizes one command line. `args[0]` is the program; it goes through
    /// the same rules (a process may have rewritten it into a whole command
    /// line) but is never dropped. Returns the sanitized argv and how many
    /// values were redacted. An empty argv gives an empty one. Never panics.
    pub fn sanitize(&self, args: &[String]) -> Sanitized {
        let mut redacted = 0;
        let mut state = State::default();
        let Some((program, rest)) = args.split_first() else {
            return Sanitized { args: Vec::new(), redacted: 0 };
        };
        if self.strip_all {
            let program = self.process_arg(program, &mut state, &mut redacted);
            return Sanitized { args: vec![program], redacted: redacted + rest.len() };
        }
        let args = args.iter().map(|a| self.process_arg(a, &mut state, &mut redacted)).collect();
        Sanitized { args, redacted }
    }

    /// Sanitizes a command line that was cut at a byte limit (`truncated`
    /// in the platform's `Argv`): as [`Sanitizer::sanitize`], then the
    /// last word of the last argument (after its last whitespace, or all
    /// of it) becomes [`REDACTED`] unless it already is.
    pub fn sanitize_cut(&self, args: &[String]) -> Sanitized {
        let mut out = self.sanitize(args);
        // With `strip_all_arguments` the cut argument is gone, unless it
        // is the program.
        let cut_kept = !self.strip_all || args.len() == 1;
        if cut_kept && let Some(last) = out.args.last_mut() {
            mask_last_word(last, &mut out.redacted);
        }
        out
    }

    /// Whether a flag or key name matches the word list.
    fn matches(&self, name: &str) -> bool {
        let key = normalize(name.trim_start_matches('-'));
        key.chars().count() > 1 && self.words.iter().any(|w| key.ends_with(w.as_str()))
    }

    /// Whether a flag without `=` takes a secret as the next argument.
    fn takes_secret(&self, name: &str) -> bool {
        self.matches(name) && !is_negation(name)
    }

    /// One argument of the command line.
    fn process_arg(&self, arg: &str, st: &mut State, n: &mut usize) -> String {
        if let Some(out) = self.pending_value(arg, st, n) {
            return out;
        }
        if !arg.bytes().any(|b| b.is_ascii_whitespace()) {
            return self.process_word(arg, st, n);
        }
        if let Some(out) = self.whole_rules(arg, st, n) {
            return out;
        }
        // Shapes that span whitespace (PEM blocks, JSON, `k=v k=v`) first,
        // then each word as a nested command line. Values redacted by the
        // first pass are `REDACTED` already and are not counted again.
        let scanned = self.content(arg, n);
        let mut inner = State::default();
        let mut out = String::with_capacity(scanned.len());
        for (piece, is_space) in split_whitespace_runs(&scanned) {
            if is_space {
                out.push_str(piece);
            } else {
                out.push_str(&self.process_word(piece, &mut inner, n));
            }
        }
        out
    }

    /// The argument after a flag that takes a secret, redacted; `None` if
    /// there is no such flag or the argument is the next `--flag`.
    fn pending_value(&self, arg: &str, st: &mut State, n: &mut usize) -> Option<String> {
        let pending = st.pending.take()?;
        if arg.starts_with("--") {
            return None;
        }
        Some(match pending {
            Pending::Whole => redact(arg, n),
            Pending::UserPass => self.user_pass(arg, n),
        })
    }

    /// Rules that take the rest of the argument as the value, whitespace
    /// included: program short flags with an attached value, a matching
    /// `--flag=value`, a matching `Name: value` header.
    fn whole_rules(&self, a: &str, st: &State, n: &mut usize) -> Option<String> {
        if let Some(out) = self.program_attached(st.program, a, n) {
            return Some(out);
        }
        if let Some(flag) = parse_flag(a)
            && let Some(value) = flag.value
            && self.matches(flag.name)
        {
            return Some(format!("{}{}={}", flag.dashes, flag.name, redact(value, n)));
        }
        if let Some((name, prefix, value)) = split_header(a)
            && self.matches(name)
        {
            return Some(format!("{prefix}{}", redact(value, n)));
        }
        None
    }

    /// One argument without whitespace (or one word of an argument with).
    fn process_word(&self, w: &str, st: &mut State, n: &mut usize) -> String {
        if let Some(out) = self.pending_value(w, st, n) {
            return out;
        }
        if let Some(out) = self.whole_rules(w, st, n) {
            return out;
        }
        if let Some(pending) = program_value_flag(st.program, w) {
            st.pending = Some(pending);
            return w.to_owned();
        }
        if let Some(flag) = parse_flag(w) {
            return match flag.value {
                None => {
                    if self.takes_secret(flag.name) {
                        st.pending = Some(Pending::Whole);
                    }
                    self.content(w, n)
                }
                Some(value) => format!("{}{}={}", flag.dashes, flag.name, self.env_or_content(value, n)),
            };
        }
        if split_env(w).is_none()
            && let Some(program) = program_of(w)
        {
            st.program = Some(program);
        }
        self.env_or_content(w, n)
    }

    /// A `KEY=value` (value redacted if the key matches, scanned otherwise)
    /// or any other text (scanned).
    fn env_or_content(&self, s: &str, n: &mut usize) -> String {
        match split_env(s) {
            Some((key, value)) if self.matches(key) => format!("{key}={}", redact(value, n)),
            Some((key, value)) => format!("{key}={}", self.content(value, n)),
            None => self.content(s, n),
        }
    }

    /// Program short flags with an attached value (`-pSECRET`).
    fn program_attached(&self, program: Option<Program>, a: &str, n: &mut usize) -> Option<String> {
        // Every prefix below is ASCII, so slicing after it is on a boundary.
        let attached = |flag: &str| a.strip_prefix(flag).filter(|v| !v.is_empty());
        match program? {
            Program::Mysql | Program::Sshpass => attached("-p").map(|v| format!("-p{}", redact(v, n))),
            Program::RedisCli => attached("-a").map(|v| format!("-a{}", redact(v, n))),
            Program::Curl => {
                let flag = if a.starts_with("-u") { "-u" } else { "-U" };
                attached(flag).map(|v| format!("{flag}{}", self.user_pass(v, n)))
            }
            Program::Openssl => attached("pass:").map(|v| format!("pass:{}", redact(v, n))),
            Program::Ssh => None,
        }
    }

    /// `user:secret` with the secret redacted; without a `:`, scanned.
    fn user_pass(&self, v: &str, n: &mut usize) -> String {
        match v.split_once(':') {
            Some((user, pass)) => format!("{user}:{}", redact(pass, n)),
            None => self.content(v, n),
        }
    }

    /// The shapes found inside any text.
    fn content(&self, s: &str, n: &mut usize) -> String {
        let s = scan_pem(s, n);
        let s = self.scan_json(&s, n);
        let s = self.scan_key_values(&s, n);
        let s = scan_userinfo(&s, n);
        scan_tokens(&s, n)
    }

    /// `key=value` pairs with a matching key, the value up to a delimiter.
    fn scan_key_values(&self, s: &str, n: &mut usize) -> String {
        let b = s.as_bytes();
        let mut out = String::with_capacity(s.len());
        let (mut copied, mut i) = (0, 0);
        while i < b.len() {
            if b[i] == b'=' {
                // The key is the run of key bytes before `=`: ASCII, so its
                // start is a char boundary. `=` is not a key byte, so the
                // walks back never overlap: linear overall.
                let mut k = i;
                while k > copied && is_key_byte(b[k - 1]) {
                    k -= 1;
                }
                if self.matches(&s[k..i]) {
                    let end =
                        b[i + 1..].iter().position(|&c| is_value_delimiter(c)).map_or(b.len(), |p| i + 1 + p);
                    out.push_str(&s[copied..=i]);
                    out.push_str(&redact(&s[i + 1..end], n));
                    copied = end;
                    i = end;
                    continue;
                }
            }
            i += 1;
        }
        out.push_str(&s[copied..]);
        out
    }

    /// JSON string members with a matching key: `"password": "x"`.
    fn scan_json(&self, s: &str, n: &mut usize) -> String {
        let b = s.as_bytes();
        let mut out = String::with_capacity(s.len());
        let (mut copied, mut i) = (0, 0);
        let mut prev_quote: Option<usize> = None;
        while i < b.len() {
            if b[i] != b'"' {
                i += 1;
                continue;
            }
            let open = prev_quote.replace(i);
            let colon = skip_whitespace(b, i + 1);
            if let Some(open) = open
                && b.get(colon) == Some(&b':')
                && self.matches(&s[open + 1..i])
            {
                let start = skip_whitespace(b, colon + 1);
                if b.get(start) == Some(&b'"') {
                    let end = json_string_end(b, start + 1);
                    out.push_str(&s[copied..=start]);
                    out.push_str(&redact(&s[start + 1..end], n));
                    copied = end;
                    prev_quote = Some(end);
                    i = end + 1;
                    continue;
                }
            }
            i += 1;
        }
        out.push_str(&s[copied..]);
        out
    }
}

/// Lowercase, without `-` and `_`.
fn normalize(s: &str) -> String {
    s.chars().filter(|&c| c != '-' && c != '_').flat_map(char::to_lowercase).collect()
}

/// `--no-x`, `--no_x`: a negation, which takes no value.
fn is_negation(name: &str) -> bool {
    let mut parts = name.split(['-', '_']).filter(|p| !p.is_empty());
    parts.next().is_some_and(|p| p.eq_ignore_ascii_case("no")) && parts.next().is_some()
}

/// [`REDACTED`], counted; an empty value, or one redacted already, is kept
/// and not counted.
fn redact(value: &str, n: &mut usize) -> String {
    if value.is_empty() || value == REDACTED {
        return value.to_owned();
    }
    *n += 1;
    REDACTED.to_owned()
}

/// Replaces what follows the last whitespace of `arg` (all of it if it has
/// none) with [`REDACTED`], counting it unless it was already redacted.
fn mask_last_word(arg: &mut String, n: &mut usize) {
    let start = arg.rfind(|c: char| c.is_ascii_whitespace()).map_or(0, |i| i + 1);
    let word = &arg[start..];
    if word.is_empty() || word == REDACTED {
        return;
    }
    *n += 1;
    arg.truncate(start);
    arg.push_str(REDACTED);
}

/// Splits `-flag`, `--flag`, `--flag=value`; `None` for anything else
/// (`-`, `--`, `--=x`, names with whitespace).
fn parse_flag(a: &str) -> Option<Flag<'_>> {
    let body = a.trim_start_matches('-');
    let dashes = &a[..a.len() - body.len()];
    if dashes.is_empty() || body.is_empty() {
        return None;
    }
    let (name, value) = match body.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (body, None),
    };
    if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
        return None;
    }
    Some(Flag { dashes, name, value })
}

/// Bytes of a key name: ASCII letters and digits, `_`, `-`, `.`.
fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

/// Bytes that end an embedded `key=value` value.
fn is_value_delimiter(b: u8) -> bool {
    b.is_ascii_whitespace()
        || matches!(b, b'&' | b';' | b',' | b'"' | b'\'' | b'`' | b'|' | b')' | b']' | b'}' | b'<' | b'>')
}

/// `KEY=value` with a key of key bytes not starting with `-`.
fn split_env(a: &str) -> Option<(&str, &str)> {
    let (key, value) = a.split_once('=')?;
    if key.is_empty() || key.starts_with('-') || !key.bytes().all(is_key_byte) {
        return None;
    }
    Some((key, value))
}

/// `Name: value` (at least one space or tab after the colon, so that
/// `host:path` is not a header): the name, everything before the value, the
/// value.
fn split_header(a: &str) -> Option<(&str, &str, &str)> {
    let b = a.as_bytes();
    let name_len = b.iter().take_while(|&&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_').count();
    if name_len == 0 || b.get(name_len) != Some(&b':') {
        return None;
    }
    let spaces = b[name_len + 1..].iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    let start = name_len + 1 + spaces;
    if spaces == 0 || start >= b.len() {
        return None;
    }
    Some((&a[..name_len], &a[..start], &a[start..]))
}

/// The program an argument names, by its base name.
fn program_of(w: &str) -> Option<Program> {
    let base = w.rsplit(['/', '\\']).next().unwrap_or(w);
    if base.len() > 32 {
        return None;
    }
    let base = base.to_ascii_lowercase();
    let base = base.strip_suffix(".exe").unwrap_or(&base);
    match base {
        "mysql" | "mysqldump" | "mysqladmin" | "mysqlimport" | "mysqlshow" | "mysqlcheck" | "mysqlpump"
        | "mysqlslap" | "mysqlbinlog" | "mariadb" | "mariadb-dump" | "mariadb-admin" | "mariadb-import"
        | "mariadb-check" | "mariadb-show" => Some(Program::Mysql),
        "sshpass" => Some(Program::Sshpass),
        "redis-cli" | "valkey-cli" | "keydb-cli" => Some(Program::RedisCli),
        "curl" => Some(Program::Curl),
        "openssl" => Some(Program::Openssl),
        "ssh" | "scp" | "sftp" | "rsync" => Some(Program::Ssh),
        _ => None,
    }
}

/// Program flags whose next argument is a secret.
fn program_value_flag(program: Option<Program>, w: &str) -> Option<Pending> {
    match (program?, w) {
        (Program::Sshpass, "-p") | (Program::RedisCli, "-a" | "--pass") | (Program::Openssl, "-k") => {
            Some(Pending::Whole)
        }
        (Program::Curl, "-u" | "-U" | "--user" | "--proxy-user") => Some(Pending::UserPass),
        (Program::Curl, "--oauth2-bearer") => Some(Pending::Whole),
        _ => None,
    }
}

/// Alternating runs of ASCII whitespace and of anything else, with whether
/// each is whitespace. Boundaries are next to ASCII bytes: char boundaries.
fn split_whitespace_runs(s: &str) -> Vec<(&str, bool)> {
    let b = s.as_bytes();
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=b.len() {
        if i == b.len() || b[i].is_ascii_whitespace() != b[start].is_ascii_whitespace() {
            runs.push((&s[start..i], b[start].is_ascii_whitespace()));
            start = i;
        }
    }
    runs
}

/// The first `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// The first byte after `from` that is not ASCII whitespace.
fn skip_whitespace(b: &[u8], from: usize) -> usize {
    from + b.get(from..).map_or(0, |r| r.iter().take_while(|c| c.is_ascii_whitespace()).count())
}

/// The closing quote of a JSON string whose content starts at `from`
/// (escapes skipped), or the end. Always an ASCII `"` or the end, so a
/// char boundary.
fn json_string_end(b: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// PEM private key blocks, `-----BEGIN ... PRIVATE KEY-----` to the end of
/// the matching `-----END ...-----` (or of the text), replaced whole.
fn scan_pem(s: &str, n: &mut usize) -> String {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    const DASHES: &[u8] = b"-----";
    const MAX_LABEL: usize = 64;
    let b = s.as_bytes();
    let mut out = String::new();
    let (mut copied, mut from) = (0, 0);
    while let Some(begin) = find(b, BEGIN, from) {
        let label = begin + BEGIN.len();
        from = label;
        let window = &b[..(label + MAX_LABEL).min(b.len())];
        let Some(label_end) = find(window, DASHES, label) else { continue };
        if !b[label..label_end].ends_with(b"PRIVATE KEY") {
            continue;
        }
        let end = find(b, END, label_end + DASHES.len())
            .map_or(b.len(), |e| find(b, DASHES, e + END.len()).map_or(b.len(), |d| d + DASHES.len()));
        out.push_str(&s[copied..begin]);
        out.push_str(&redact(&s[begin..end], n));
        copied = end;
        from = end;
    }
    out.push_str(&s[copied..]);
    out
}

/// The password of `scheme://user:password@host`; the user stays.
fn scan_userinfo(s: &str, n: &mut usize) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let (mut copied, mut from) = (0, 0);
    while let Some(sep) = find(b, b"://", from) {
        let start = sep + 3;
        from = start;
        // The authority ends at the path (or whitespace, quotes); `?` and
        // `#` do not end it, so that a password containing them is still
        // caught. The last `@` separates the userinfo, whose first `:`
        // separates the password.
        let end = b[start..]
            .iter()
            .position(|&c| {
                c == b'/' || c.is_ascii_whitespace() || matches!(c, b'"' | b'\'' | b'`' | b'<' | b'>')
            })
            .map_or(b.len(), |p| start + p);
        let Some(at) = b[start..end].iter().rposition(|&c| c == b'@').map(|p| start + p) else { continue };
        let Some(colon) = b[start..at].iter().position(|&c| c == b':').map(|p| start + p) else { continue };
        if colon < copied {
            continue;
        }
        out.push_str(&s[copied..=colon]);
        out.push_str(&redact(&s[colon + 1..at], n));
        copied = at;
    }
    out.push_str(&s[copied..]);
    out
}

/// Well-known token shapes, wherever they start a word.
fn scan_tokens(s: &str, n: &mut usize) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let (mut copied, mut i, mut jwt_skip) = (0, 0, 0);
    while i < b.len() {
        if (i == 0 || !b[i - 1].is_ascii_alphanumeric())
            && let Some(end) = token_at(b, i, &mut jwt_skip)
        {
            // A token starts with an ASCII letter and ends after ASCII bytes.
            out.push_str(&s[copied..i]);
            out.push_str(&redact(&s[i..end], n));
            copied = end;
            i = end;
        } else {
            i += 1;
        }
    }
    out.push_str(&s[copied..]);
    out
}

/// The end of the run of bytes satisfying `ok` from `from`.
fn run_end(b: &[u8], from: usize, ok: impl Fn(u8) -> bool) -> usize {
    from + b.get(from..).map_or(0, |r| r.iter().take_while(|&&c| ok(c)).count())
}

/// Base64url bytes (JWT segments).
fn is_base64url(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

/// The end of a token starting at `i`, if one does. `jwt_skip` remembers
/// where a failed JWT's first segment ended: a JWT starting inside it would
/// fail the same way, and not rescanning it keeps the scan linear.
fn token_at(b: &[u8], i: usize, jwt_skip: &mut usize) -> Option<usize> {
    let rest = &b[i..];
    // AWS access key ids: AKIA (long-term) or ASIA (temporary) + 16.
    if (rest.starts_with(b"AKIA") || rest.starts_with(b"ASIA"))
        && rest.len() >= 20
        && rest[4..20].iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        && rest.get(20).is_none_or(|c| !c.is_ascii_alphanumeric())
    {
        return Some(i + 20);
    }
    // GitHub tokens: classic (prefix + 36 alphanumerics) and fine-grained.
    for prefix in [b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_"] {
        if rest.starts_with(prefix) {
            let end = run_end(b, i + 4, |c| c.is_ascii_alphanumeric());
            if end - (i + 4) >= 20 {
                return Some(end);
            }
        }
    }
    if rest.starts_with(b"github_pat_") {
        let end = run_end(b, i + 11, |c| c.is_ascii_alphanumeric() || c == b'_');
        if end - (i + 11) >= 20 {
            return Some(end);
        }
    }
    // Slack tokens: xoxb-, xoxa-, xoxp-, xoxr-, xoxs-.
    if rest.len() > 5
        && rest.starts_with(b"xox")
        && matches!(rest[3], b'b' | b'a' | b'p' | b'r' | b's')
        && rest[4] == b'-'
    {
        let end = run_end(b, i + 5, |c| c.is_ascii_alphanumeric() || c == b'-');
        if end - (i + 5) >= 10 {
            return Some(end);
        }
    }
    // JSON Web Tokens: header (`{"` is `eyJ`) . payload . signature (may be
    // empty for unsigned tokens).
    if i >= *jwt_skip && rest.starts_with(b"eyJ") {
        let header = run_end(b, i, is_base64url);
        if header - i >= 10 && b.get(header) == Some(&b'.') {
            let payload = run_end(b, header + 1, is_base64url);
            if payload - (header + 1) >= 4 && b.get(payload) == Some(&b'.') {
                return Some(run_end(b, payload + 1, is_base64url));
            }
        }
        *jwt_skip = header;
    }
    None
}

#[cfg(test)]
mod tests;
