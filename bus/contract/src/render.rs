//! How an event is printed for a person or a program: the one format
//! shared by `procmond --foreground` and `daemoneye-cli events`, so a line
//! reads the same whichever tool printed it; and [`printable`], through
//! which any text that comes from a process reaches a terminal or a log.

use std::borrow::Cow;
use std::fmt::Write as _;

use daemoneye_platform::ExitStatus;
/// The time zone type of [`local_zone`] (jiff's).
pub use jiff::tz::TimeZone;

use crate::event::{EventEnvelope, HashOutcome};

/// A string from a process (name, command line, path, user) made safe to
/// print on one terminal line: control characters (newline, tab, escape,
/// C1) and bidirectional overrides become escapes like `\n` and
/// `\u{1b}`, so a hostile command line can neither forge lines of output
/// nor send the terminal escape sequences. Anything else is unchanged.
pub fn printable(s: &str) -> Cow<'_, str> {
    let needs_escape =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            // `escape_debug` gives `\n`, `\t`, `\r` and `\u{..}` for these.
            let _ = write!(out, "{}", c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The local time zone, for people: `TZ` when set (an IANA name or a POSIX
/// rule), else `/etc/localtime`; UTC when neither can be read.
pub fn local_zone() -> TimeZone {
    TimeZone::try_system().unwrap_or(TimeZone::UTC)
}

/// Unix milliseconds in `tz`, ISO 8601 with the offset and milliseconds:
/// `2024-05-01T14:34:56.789+02:00` (one token, no spaces).
pub fn local_time(ms: u64, tz: &TimeZone) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    let t = jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::MAX);
    t.to_zoned(tz.clone()).strftime("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string()
}

/// Unix seconds in `tz`, to the second: `2024-05-01T14:34:56+02:00`.
pub fn local_time_secs(secs: u64, tz: &TimeZone) -> String {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    let t = jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::MAX);
    t.to_zoned(tz.clone()).strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

/// One argument as a POSIX shell word: unchanged when it holds only
/// characters no shell treats specially, else in single quotes (a single
/// quote inside becomes `'\''`); the empty argument is `''`. Control
/// characters are then escaped by [`printable`], so the word stays on its
/// line (and is no longer literally pasteable: it shows `\n`).
pub fn shell_word(arg: &str) -> Cow<'_, str> {
    let plain = |c: char| c.is_alphanumeric() || "-_./=:,+@%^".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        return printable(arg);
    }
    let quoted = format!("'{}'", arg.replace('\'', "'\\''"));
    Cow::Owned(printable(&quoted).into_owned())
}

/// An argv as a shell command line: each argument a [`shell_word`], so
/// the boundaries between arguments show (`sh -c 'echo a b'`).
pub fn shell_words(args: &[String]) -> String {
    args.iter().map(|a| shell_word(a)).collect::<Vec<_>>().join(" ")
}

/// One readable line (without a newline), the same from `procmond
/// --foreground` and `daemoneye-cli events`:
///
/// `<observed, local> [#<store id>] <kind>[(snapshot)][[changes]] pid=…
/// ppid=… user=… name="…" exe=…[ (deleted)] [sha256=<64 hex>]
/// started=<local> [exit=<code>|signal=<n>[(core)]] [late=<local>..<local>]
/// source=kernel|poll collector=<id> seq=<n> argv=<shell words>[ …]`
///
/// Times are local (`tz`), with their offset. `#<id>` is the event's row
/// id in the agent's store (only when read from there); `seq` is its
/// number in its collector's stream. The command line comes last, one
/// shell word per argument, `…` when it was cut. A value that could not be
/// read is `-(<why>)`. Text from the process passes through [`printable`].
pub fn human_line(env: &EventEnvelope, store_id: Option<i64>, tz: &TimeZone) -> String {
    let e = &env.event;
    let p = &e.process;
    let d = &p.details;
    let mut what = e.kind.as_str().to_owned();
    if e.snapshot {
        what.push_str("(snapshot)");
    }
    if !e.changes.is_empty() {
        let names: Vec<&str> = e.changes.iter().map(|c| c.as_str()).collect();
        what.push_str(&format!("[{}]", names.join(",")));
    }
    let user = match (&d.user, &d.credentials) {
        (Ok(u), _) => printable(u).into_owned(),
        (Err(_), Ok(c)) => c.euid.to_string(),
        (Err(why), Err(_)) => format!("-({why})"),
    };
    let exe = match &d.exe {
        Ok(path) => printable(&path.to_string_lossy()).into_owned(),
        Err(why) => format!("-({why})"),
    };
    let deleted = if d.exe_deleted == Ok(true) { " (deleted)" } else { "" };
    let hash = match &e.sha256 {
        Some(HashOutcome::Sha256(h)) => format!(" sha256={}", printable(h)),
        Some(HashOutcome::TooLarge { size, .. }) => format!(" sha256=-(too large: {size} B)"),
        Some(HashOutcome::Deferred) => " sha256=-(deferred)".to_owned(),
        Some(HashOutcome::Unavailable(why)) => format!(" sha256=-({why})"),
        None => String::new(),
    };
    let started = match &p.started_unix {
        Ok(s) => local_time_secs(*s, tz),
        Err(why) => format!("-({why})"),
    };
    let exit = match e.exit {
        Some(ExitStatus::Code(code)) => format!(" exit={code}"),
        Some(ExitStatus::Signal { signal, core_dumped }) => {
            format!(" signal={signal}{}", if core_dumped { "(core)" } else { "" })
        }
        None => String::new(),
    };
    let late = match e.late {
        Some(w) => format!(" late={}..{}", local_time(w.after_unix_ms, tz), local_time(w.before_unix_ms, tz)),
        None => String::new(),
    };
    let args = match &d.argv {
        Ok(argv) if argv.args.is_empty() => String::new(),
        Ok(argv) => format!(" argv={}{}", shell_words(&argv.args), if argv.truncated { " …" } else { "" }),
        Err(why) => format!(" argv=-({why})"),
    };
    let id = store_id.map_or(String::new(), |id| format!("#{id} "));
    format!(
        "{} {id}{what:<10} pid={} ppid={} user={user} name={:?} exe={exe}{deleted}{hash} started={started}{exit}{late} \
         source={} collector={} seq={}{args}",
        local_time(e.observed_unix_ms, tz),
        p.pid,
        p.ppid,
        p.name,
        e.source.as_str(),
        printable(&env.collector_id),
        env.seq,
    )
}

/// The envelope as one JSON object on one line (without a newline), in
/// the shape [`crate::ecs::event`] documents; `store_id` is its row id in
/// the agent's store, when read from there.
pub fn json_line(env: &EventEnvelope, store_id: Option<i64>) -> String {
    crate::ecs::event(env, store_id).to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use daemoneye_platform::{Argv, ExitStatus};

    use super::*;
    use crate::event::{EventKind, EventSource, LateWindow};

    /// +05:30 all year (a POSIX rule: no tz database needed).
    fn india() -> TimeZone {
        TimeZone::posix("IST-5:30").unwrap()
    }

    #[test]
    fn printable_escapes_control_characters_and_leaves_the_rest() {
        assert!(matches!(printable("/usr/bin/sshd -D é ✓"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\nb\tc\rd\u{1b}[31m\u{7f}\u{9b}\u{202e}"),
            "a\\nb\\tc\\rd\\u{1b}[31m\\u{7f}\\u{9b}\\u{202e}"
        );
    }

    fn stopped(exit: Option<ExitStatus>, late: Option<LateWindow>, source: EventSource) -> EventEnvelope {
        let mut env = crate::testing::envelope(
            "c1",
            7,
            43,
            EventKind::Stopped,
            crate::testing::record(11, 5, "sleep"),
            1_714_566_896_789,
        );
        env.event.exit = exit;
        env.event.late = late;
        env.event.source = source;
        env
    }

    #[test]
    fn the_line_shows_local_time_the_store_id_the_whole_hash_and_argument_boundaries() {
        let mut env = stopped(None, None, EventSource::Poll);
        env.event.kind = EventKind::Started;
        env.event.sha256 = Some(HashOutcome::Sha256("0123456789abcdef".repeat(4)));
        let mut d = (*env.event.process.details).clone();
        d.argv = Ok(Argv {
            args: vec![
                "sh".into(),
                "-c".into(),
                "echo a b".into(),
                "it's".into(),
                String::new(),
                "x\ny".into(),
            ],
            truncated: true,
        });
        env.event.process.details = Arc::new(d);
        let line = human_line(&env, Some(1234), &india());
        // 12:34:56.789Z is 18:04:56.789 at +05:30.
        assert!(line.starts_with("2024-05-01T18:04:56.789+05:30 #1234 started "), "{line}");
        assert!(line.contains(&format!(" sha256={} ", "0123456789abcdef".repeat(4))), "{line}");
        // started_unix 1_700_000_005 is 2023-11-14T22:13:25Z.
        assert!(line.contains(" started=2023-11-15T03:43:25+05:30 "), "{line}");
        assert!(line.contains(" collector=c1 seq=43 "), "{line}");
        assert!(line.ends_with(r#" argv=sh -c 'echo a b' 'it'\''s' '' 'x\ny' …"#), "{line}");
        assert!(!line.contains('\n'), "{line}");
        // procmond has no store id.
        let line = human_line(&env, None, &TimeZone::UTC);
        assert!(line.starts_with("2024-05-01T12:34:56.789+00:00 started "), "{line}");
    }

    #[test]
    fn both_formats_carry_the_source_exit_status_and_late_window() {
        let tz = TimeZone::UTC;
        let code = stopped(Some(ExitStatus::Code(3)), None, EventSource::Kernel);
        let human = human_line(&code, None, &tz);
        assert!(human.contains(" stopped "), "{human}");
        assert!(human.contains(" exit=3 ") && human.contains(" source=kernel "), "{human}");
        let json: serde_json::Value = serde_json::from_str(&json_line(&code, None)).unwrap();
        assert_eq!(json["daemoneye"]["source"], "kernel");
        assert_eq!(json["process"]["exit_code"], 3);

        let killed =
            stopped(Some(ExitStatus::Signal { signal: 9, core_dumped: false }), None, EventSource::Kernel);
        let human = human_line(&killed, None, &tz);
        assert!(human.contains(" signal=9 ") && !human.contains("exit="), "{human}");
        let dumped =
            stopped(Some(ExitStatus::Signal { signal: 11, core_dumped: true }), None, EventSource::Kernel);
        assert!(human_line(&dumped, None, &tz).contains(" signal=11(core) "));
        let json: serde_json::Value = serde_json::from_str(&json_line(&dumped, Some(5))).unwrap();
        assert_eq!(json["daemoneye"]["exit"]["signal"], 11);
        assert_eq!(json["daemoneye"]["exit"]["core_dumped"], true);
        assert_eq!(json["daemoneye"]["store_id"], 5);

        // Found at a restart: the walk saw it gone, somewhere in the window.
        let window = LateWindow { after_unix_ms: 1_700_000_000_000, before_unix_ms: 1_700_000_060_000 };
        let late = stopped(None, Some(window), EventSource::Poll);
        let human = human_line(&late, None, &tz);
        assert!(
            human.contains(" late=2023-11-14T22:13:20.000+00:00..2023-11-14T22:14:20.000+00:00 "),
            "{human}"
        );
        assert!(human.contains(" source=poll ") && !human.contains("exit="), "{human}");
        let json = json_line(&late, None);
        assert!(!json.contains('\n'));
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json["daemoneye"]["late"]["after"], "2023-11-14T22:13:20.000Z");
        assert!(json["process"]["exit_code"].is_null(), "{json}");
    }
}
