//! The `http` output: each batch is one POST, through `ureq` (synchronous,
//! one kept-alive connection, no redirects followed).
//!
//! - `format: ndjson`: the documents one per line
//!   (`application/x-ndjson`), for Vector's `http_server`, Fluent Bit's
//!   `http` input, Logstash's `http` input or any endpoint. Accepted on a
//!   2xx answer.
//! - `format: elasticsearch`: the `_bulk` API at `<url>/_bulk`, a `create`
//!   action per document with `_id` = the document's stable id, so a
//!   batch sent again never makes a second document: an item the index
//!   already has answers 409, which counts as delivered. Accepted when
//!   the answer is 2xx and every item is 2xx or 409; otherwise the whole
//!   batch is sent again later (what was created answers 409 then).
//!
//! An `https://` URL goes over TLS ([`super::tls`]: the CA of `tls.ca_file`
//! or the Mozilla roots, a client certificate with `tls.cert_file`); the
//! TLS files are read when the client is made, at the first delivery and
//! again after any delivery that failed before an answer (so a renewed
//! certificate is picked up).
//!
//! A bearer token or `user:password` is read from its file at the first
//! delivery (and again after an authentication failure, so a rotated
//! secret is picked up); it is never logged. With `gzip: true` the body is
//! compressed (`Content-Encoding: gzip`). An answer's body is read up to
//! 16 MiB; a longer one is a failure.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::{Item, Sink};
use crate::config::outputs::{HttpFormat, OutputSpec, TlsSpec};

/// The longest answer read.
const MAX_ANSWER: u64 = 16 << 20;

/// An HTTP receiver.
pub struct HttpSink {
    name: String,
    endpoint: String,
    format: HttpFormat,
    index: String,
    secret: Option<Secret>,
    /// The `Authorization` header, once read from the secret's file.
    authorization: Option<String>,
    gzip: bool,
    timeout: Duration,
    tls: Option<TlsSpec>,
    /// The client (its connection kept alive), made at the first delivery
    /// and again after a failed one.
    agent: Option<ureq::Agent>,
}

/// Where the credentials come from.
enum Secret {
    Bearer(PathBuf),
    Basic(PathBuf),
}

impl HttpSink {
    /// A sink for `spec` (an http output, validated).
    pub fn new(spec: &OutputSpec) -> HttpSink {
        let h = spec.http.clone().expect("an http output has http settings (validated)");
        let endpoint = match h.format {
            HttpFormat::Ndjson => h.url.clone(),
            HttpFormat::Elasticsearch => format!("{}/_bulk", h.url.trim_end_matches('/')),
        };
        let secret = match (h.bearer_token_file, h.basic_auth_file) {
            (Some(f), _) => Some(Secret::Bearer(f)),
            (None, Some(f)) => Some(Secret::Basic(f)),
            (None, None) => None,
        };
        let https = h.url.starts_with("https://");
        HttpSink {
            name: spec.name.clone(),
            endpoint,
            format: h.format,
            index: h.index,
            secret,
            authorization: None,
            gzip: h.gzip,
            timeout: Duration::from_millis(h.timeout_ms),
            tls: if https { Some(h.tls.unwrap_or_default()) } else { None },
            agent: None,
        }
    }

    /// The client, made now if there is none (TLS files read).
    fn agent(&mut self) -> Result<ureq::Agent, String> {
        if let Some(agent) = &self.agent {
            return Ok(agent.clone());
        }
        #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("daemoneye-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = &self.tls {
            #[cfg(feature = "tls")]
            {
                config = config.tls_config(super::tls::ureq_config(tls)?);
            }
            #[cfg(not(feature = "tls"))]
            {
                let _ = tls;
                return Err("this agent was built without TLS".to_owned());
            }
        }
        let agent: ureq::Agent = config.build().into();
        self.agent = Some(agent.clone());
        Ok(agent)
    }

    /// The `Authorization` header's value, read from its file once.
    fn authorization(&mut self) -> Result<Option<&str>, String> {
        if self.authorization.is_none()
            && let Some(secret) = &self.secret
        {
            let (path, value): (&PathBuf, fn(&str) -> String) = match secret {
                Secret::Bearer(p) => (p, |t| format!("Bearer {t}")),
                Secret::Basic(p) => (p, |t| format!("Basic {}", BASE64.encode(t))),
            };
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the credentials in {}: {e}", path.display()))?;
            self.authorization = Some(value(text.trim()));
        }
        Ok(self.authorization.as_deref())
    }

    /// The request body of a batch.
    fn body(&self, batch: &[Item]) -> Vec<u8> {
        let mut body = Vec::with_capacity(batch.iter().map(|i| i.json.len() + 96).sum());
        for item in batch {
            if self.format == HttpFormat::Elasticsearch {
                let action = serde_json::json!({"create": {"_index": self.index, "_id": item.id}});
                body.extend_from_slice(action.to_string().as_bytes());
                body.push(b'\n');
            }
            body.extend_from_slice(item.json.as_bytes());
            body.push(b'\n');
        }
        body
    }
}

impl Sink for HttpSink {
    fn deliver(&mut self, batch: &[Item]) -> Result<(), String> {
        let mut body = self.body(batch);
        if self.gzip {
            let mut z = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::fast(),
            );
            body = z.write_all(&body).and_then(|()| z.finish()).map_err(|e| format!("gzip: {e}"))?;
        }
        let authorization = self.authorization()?.map(str::to_owned);
        let agent = self.agent()?;
        let mut request = agent.post(&self.endpoint).header("Content-Type", "application/x-ndjson");
        if self.gzip {
            request = request.header("Content-Encoding", "gzip");
        }
        if let Some(a) = &authorization {
            request = request.header("Authorization", a);
        }
        let mut answer = request.send(&body[..]).map_err(|e| {
            // A new client next time: a new connection, TLS files read again.
            self.agent = None;
            format!("POST {}: {e}", self.endpoint)
        })?;
        let status = answer.status().as_u16();
        let text = answer
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(|e| format!("POST {}: HTTP {status}, reading the answer: {e}", self.endpoint))?;
        if status == 401 || status == 403 {
            // Read the secret again next time: it may have been rotated.
            self.authorization = None;
        }
        if !(200..300).contains(&status) {
            return Err(format!("POST {}: HTTP {status}: {}", self.endpoint, excerpt(&text)));
        }
        if self.format == HttpFormat::Elasticsearch {
            bulk_outcome(&text, batch.len()).map_err(|e| format!("output {}: _bulk: {e}", self.name))?;
        }
        Ok(())
    }
}

/// Whether a `_bulk` answer took every item: each `create` is 2xx or 409
/// (already there). `Err` names how many were refused and the first
/// reason.
pub fn bulk_outcome(answer: &str, sent: usize) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_str(answer)
        .map_err(|e| format!("an answer that is not JSON ({e}): {}", excerpt(answer)))?;
    let items =
        v["items"].as_array().ok_or_else(|| format!("no items in the answer: {}", excerpt(answer)))?;
    if items.len() != sent {
        return Err(format!("{} items answered for {sent} sent", items.len()));
    }
    let mut refused = 0;
    let mut first = None;
    for item in items {
        let result = item.get("create").or_else(|| item.as_object().and_then(|o| o.values().next()));
        let status = result.and_then(|r| r["status"].as_u64()).unwrap_or(0);
        if !((200..300).contains(&status) || status == 409) {
            refused += 1;
            if first.is_none() {
                let reason = result.map(|r| r["error"].to_string()).unwrap_or_default();
                first = Some(format!("{status} {}", excerpt(&reason)));
            }
        }
    }
    match first {
        None => Ok(()),
        Some(first) => Err(format!("{refused} of {sent} documents refused, the first: {first}")),
    }
}

/// The start of a receiver's text, for an error message.
fn excerpt(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bulk_answer_counts_conflicts_as_delivered_and_anything_else_as_refused() {
        let ok = r#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":409,"error":{"type":"version_conflict_engine_exception"}}}]}"#;
        assert_eq!(bulk_outcome(ok, 2), Ok(()));
        let partial = r#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":429,"error":{"type":"es_rejected_execution_exception"}}},{"create":{"status":400,"error":"mapping"}}]}"#;
        let e = bulk_outcome(partial, 3).unwrap_err();
        assert!(e.starts_with("2 of 3 documents refused, the first: 429"), "{e}");
        assert!(e.contains("es_rejected_execution_exception"), "{e}");
        assert!(bulk_outcome(ok, 3).unwrap_err().contains("2 items answered for 3 sent"));
        assert!(bulk_outcome("<html>gateway</html>", 1).unwrap_err().contains("not JSON"));
        assert!(bulk_outcome(r#"{"took":1}"#, 1).unwrap_err().contains("no items"));
    }
}
