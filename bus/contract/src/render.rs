//! How an event is printed for a person or a program: the one format
//! shared by `procmond --foreground` and `daemoneye-cli events`, so a line
//! reads the same whichever tool printed it; and [`printable`], through
//! which any text that comes from a process reaches a terminal or a log.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::event::EventEnvelope;

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

/// One readable line: `#<seq> <kind> pid=… ppid=… user=… name=… exe=…`,
/// then for a `stopped` event with its exit status `exit=<code>` or
/// `signal=<n>` (`(core)` when a core was dumped), for a change that
/// happened while the collector was down `late=<after>..<before>` (Unix
/// milliseconds), and last `source=kernel|poll` (see
/// [`crate::event::ProcessEvent::human_line`]); without a newline.
pub fn human_line(env: &EventEnvelope) -> String {
    format!("#{:<6} {}", env.seq, env.event.human_line())
}

/// The envelope as one JSON object on one line, without a newline.
pub fn json_line(env: &EventEnvelope) -> String {
    // Serializing plain data (string keys, no maps with non-string keys)
    // to JSON cannot fail.
    serde_json::to_string(env).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use daemoneye_platform::ExitStatus;

    use super::*;
    use crate::event::{EventKind, EventSource, LateWindow, ProcessEvent};

    #[test]
    fn printable_escapes_control_characters_and_leaves_the_rest() {
        assert!(matches!(printable("/usr/bin/sshd -D é ✓"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\nb\tc\rd\u{1b}[31m\u{7f}\u{9b}\u{202e}"),
            "a\\nb\\tc\\rd\\u{1b}[31m\\u{7f}\\u{9b}\\u{202e}"
        );
    }

    #[test]
    fn both_formats_are_one_line_naming_the_process() {
        let env = EventEnvelope {
            collector_id: "c1".to_owned(),
            stream_id: 7,
            seq: 42,
            event: ProcessEvent {
                kind: EventKind::Started,
                snapshot: false,
                changes: Vec::new(),
                observed_unix_ms: 1_000,
                process: crate::testing::record(10, 5, "sshd"),
                sha256: None,
                source: crate::event::EventSource::Poll,
                late: None,
                exit: None,
            },
            position: None,
        };
        let human = human_line(&env);
        assert!(human.starts_with("#42     started"), "{human}");
        assert!(human.contains("pid=10") && human.contains("name=\"sshd\""), "{human}");
        let json = json_line(&env);
        assert!(!json.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["seq"], 42);
        assert_eq!(value["collector_id"], "c1");
        assert!(human.ends_with(" source=poll"), "{human}");
        assert!(!human.contains("exit=") && !human.contains("late="), "{human}");
        assert_eq!(value["event"]["source"], "Poll");
        assert!(value["event"]["exit"].is_null() && value["event"]["late"].is_null(), "{json}");
    }

    fn stopped(exit: Option<ExitStatus>, late: Option<LateWindow>, source: EventSource) -> EventEnvelope {
        let mut env = crate::testing::envelope(
            "c1",
            7,
            43,
            EventKind::Stopped,
            crate::testing::record(11, 5, "sleep"),
            2_000,
        );
        env.event.exit = exit;
        env.event.late = late;
        env.event.source = source;
        env
    }

    #[test]
    fn both_formats_carry_the_source_exit_status_and_late_window() {
        let code = stopped(Some(ExitStatus::Code(3)), None, EventSource::Kernel);
        let human = human_line(&code);
        assert!(human.starts_with("#43     stopped"), "{human}");
        assert!(human.contains(" exit=3 ") && human.ends_with(" source=kernel"), "{human}");
        let json: serde_json::Value = serde_json::from_str(&json_line(&code)).unwrap();
        assert_eq!(json["event"]["source"], "Kernel");
        assert_eq!(json["event"]["exit"], serde_json::json!({"Code": 3}));

        let killed =
            stopped(Some(ExitStatus::Signal { signal: 9, core_dumped: false }), None, EventSource::Kernel);
        let human = human_line(&killed);
        assert!(human.contains(" signal=9 ") && !human.contains("exit="), "{human}");
        let dumped =
            stopped(Some(ExitStatus::Signal { signal: 11, core_dumped: true }), None, EventSource::Kernel);
        assert!(human_line(&dumped).contains(" signal=11(core) "), "{}", human_line(&dumped));
        let json: serde_json::Value = serde_json::from_str(&json_line(&dumped)).unwrap();
        assert_eq!(json["event"]["exit"], serde_json::json!({"Signal": {"signal": 11, "core_dumped": true}}));

        // Found at a restart: the walk saw it gone, somewhere in the window.
        let window = LateWindow { after_unix_ms: 1_700_000_000_000, before_unix_ms: 1_700_000_060_000 };
        let late = stopped(None, Some(window), EventSource::Poll);
        let human = human_line(&late);
        assert!(human.contains(" late=1700000000000..1700000060000 "), "{human}");
        assert!(human.ends_with(" source=poll") && !human.contains("exit="), "{human}");
        let json: serde_json::Value = serde_json::from_str(&json_line(&late)).unwrap();
        assert_eq!(
            json["event"]["late"],
            serde_json::json!({"after_unix_ms": 1_700_000_000_000u64, "before_unix_ms": 1_700_000_060_000u64})
        );
        assert!(json["event"]["exit"].is_null(), "{json}");
    }
}
