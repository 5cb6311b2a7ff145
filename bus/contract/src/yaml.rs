//! Reading an operator's YAML file (`agent.yaml`, procmond's `--config`)
//! with errors that point at the line to fix.
//!
//! A key indented one step too little is the classic slip: YAML then
//! reads it as part of an outer mapping, and the parser reports the entry
//! it left behind ("missing field `binary` at line 2"), not the line that
//! moved. [`from_str`] looks for that key elsewhere in the file at another
//! indentation and, when it finds it, names that line and says why.

use serde::de::DeserializeOwned;

/// Why a YAML file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// The 1-based line to look at, when known.
    pub line: Option<usize>,
    /// What is wrong, for a person.
    pub reason: String,
}

/// Parses `text` into `T` (see the module docs for the errors).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    serde_yaml_ng::from_str(text).map_err(|e| {
        let reason = e.to_string();
        let at = e.location().map(|l| (l.line(), l.column()));
        match at.and_then(|(line, column)| misplaced_key(text, &reason, line, column)) {
            Some((line, hint)) => YamlError { line: Some(line), reason: format!("{hint} ({reason})") },
            None => YamlError { line: at.map(|(line, _)| line), reason },
        }
    })
}

/// For "missing field `KEY`" reported at the mapping that starts at
/// `line`/`column` (1-based): the first line after it (else before it)
/// holding `KEY:` at another indentation than that mapping's keys, with
/// the explanation.
fn misplaced_key(text: &str, reason: &str, line: usize, column: usize) -> Option<(usize, String)> {
    let key = reason
        .strip_prefix("missing field `")
        .or_else(|| reason.find(": missing field `").map(|i| &reason[i + ": missing field `".len()..]))?;
    let key = &key[..key.find('`')?];
    let want = column.checked_sub(1)?;
    let found = |(i, l): (usize, &str)| -> Option<(usize, usize)> {
        let indent = l.len() - l.trim_start_matches(' ').len();
        let mut rest = &l[indent..];
        let mut at = indent;
        // A key that opens a sequence entry ("- binary: x") sits 2 further in.
        while let Some(after) = rest.strip_prefix("- ") {
            let pad = after.len() - after.trim_start_matches(' ').len();
            at += 2 + pad;
            rest = &after[pad..];
        }
        let after = rest.strip_prefix(key)?.strip_prefix(':')?;
        (after.is_empty() || after.starts_with([' ', '\t'])).then_some((i + 1, at))
    };
    let lines: Vec<&str> = text.lines().collect();
    let (at, indent) = lines
        .iter()
        .copied()
        .enumerate()
        .skip(line)
        .chain(lines.iter().copied().enumerate().take(line.saturating_sub(1)))
        .filter_map(found)
        .find(|(_, indent)| *indent != want)?;
    Some((
        at,
        format!(
            "`{key}:` on line {at} is indented by {indent} space(s), so it is not part of the entry that begins \
             on line {line}, whose keys are indented by {want}: indent it by {want}"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Collector {
        id: String,
        binary: String,
        #[serde(default)]
        args: Vec<String>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        #[serde(default)]
        collectors: Vec<Collector>,
        #[serde(default)]
        binary: Option<String>,
    }

    #[test]
    fn a_key_indented_too_little_is_named_on_its_own_line() {
        // `binary` slid left: YAML reads the entry without it.
        let text = "collectors:\n  - id: procmond\n  binary: procmond\n";
        let e = from_str::<File>(text).unwrap_err();
        assert_eq!(e.line, Some(3), "{e:?}");
        assert!(e.reason.starts_with("`binary:` on line 3 is indented by 2 space(s)"), "{e:?}");
        assert!(e.reason.contains("begins on line 2, whose keys are indented by 4: indent it by 4"), "{e:?}");
        assert!(e.reason.contains("missing field `binary`"), "the parser's words are kept: {e:?}");

        // The second entry of a list: the right entry is named.
        let text = "collectors:\n  - id: a\n    binary: x\n  - id: b\n   binary: y\n";
        let e = from_str::<File>(text).unwrap_err();
        assert_eq!(e.line, Some(5), "{e:?}");

        // A key that is missing for real is reported as the parser says.
        let text = "collectors:\n  - id: procmond\n    args: []\n";
        let e = from_str::<File>(text).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.reason.starts_with("collectors[0]: missing field `binary`"), "{e:?}");

        // The key, rightly indented in an entry, is no hint for another.
        let text = "collectors:\n  - id: a\n    binary: x\n  - id: b\n";
        let e = from_str::<File>(text).unwrap_err();
        assert_eq!(e.line, Some(4), "{e:?}");
        assert!(e.reason.starts_with("collectors[1]: missing field"), "{e:?}");

        // Other errors keep their own line.
        let e = from_str::<File>("collectors:\n  - id: a\n    binary: x\n      args: [x]\n").unwrap_err();
        assert_eq!(e.line, Some(4), "{e:?}");
        assert!(from_str::<File>("collectors:\n  - {id: a, binary: x}\n").is_ok());
    }
}
