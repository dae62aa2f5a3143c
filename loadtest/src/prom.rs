//! The gateway's Prometheus text endpoint (`GET {gateway_url}/metrics`), read by hand: the
//! text format is a line per sample, `name{label="value",...} value [timestamp]`, `#` lines
//! being help and type comments. A parser of a few dozen lines keeps the load generator free
//! of a metrics library, and reads exactly what the gateway's exporter writes (label values
//! escaped with `\\`, `\"` and `\n`; values as Go floats, `+Inf`, `-Inf`, `NaN`).
//!
//! Counters are read twice, at the edges of the measured window, and reported as deltas
//! ([`counter_delta`]); gauges are sampled once a second ([`crate::resources`]).

use std::collections::BTreeMap;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};

use crate::client::{HttpClient, SendError};

/// The largest `/metrics` answer read (the gateway's is a few tens of kB: histograms by route).
pub const MAX_METRICS_BYTES: usize = 4 * 1024 * 1024;
/// More labels than this on one sample: not a line of ours, skipped as malformed.
const MAX_LABELS: usize = 32;

/// One sample: a metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Lines that were neither a sample, a comment nor blank (skipped).
    pub malformed: usize,
}

impl Scrape {
    /// Parses a whole text exposition; a malformed line is counted and skipped, never fatal.
    pub fn parse(text: &str) -> Self {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            match parse_line(line) {
                Ok(Some(sample)) => scrape.samples.push(sample),
                Ok(None) => {}
                Err(Malformed) => scrape.malformed += 1,
            }
        }
        scrape
    }

    /// The samples of metric `name` (every label set).
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The sum of every series of `name`; `None` when the metric is not in the scrape (the
    /// exporter writes a counter only once it has been touched).
    pub fn total(&self, name: &str) -> Option<f64> {
        let mut series = self.series(name).peekable();
        series.peek()?;
        Some(series.map(|s| s.value).sum())
    }

    /// The series of `name` summed by the value of `label` (`""` for a series without it);
    /// `None` when the metric is absent.
    pub fn by_label(&self, name: &str, label: &str) -> Option<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        let mut any = false;
        for sample in self.series(name) {
            any = true;
            let key = sample.labels.get(label).cloned().unwrap_or_default();
            *out.entry(key).or_insert(0.0) += sample.value;
        }
        any.then_some(out)
    }
}

/// A line that is neither a sample, a comment nor blank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// One line: `Ok(None)` for a comment or a blank line.
pub fn parse_line(line: &str) -> Result<Option<Sample>, Malformed> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut cursor = Cursor(line);
    let name = cursor.take_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(Malformed);
    }
    let mut labels = BTreeMap::new();
    cursor.skip_spaces();
    if cursor.eat('{') {
        loop {
            cursor.skip_spaces();
            if cursor.eat('}') {
                break;
            }
            let label = cursor.take_while(|c| c.is_ascii_alphanumeric() || c == '_');
            if label.is_empty() || label.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(Malformed);
            }
            cursor.skip_spaces();
            if !cursor.eat('=') {
                return Err(Malformed);
            }
            cursor.skip_spaces();
            let value = cursor.quoted()?;
            if labels.insert(label.to_owned(), value).is_some() || labels.len() > MAX_LABELS {
                return Err(Malformed);
            }
            cursor.skip_spaces();
            if cursor.eat(',') {
                continue;
            }
            if cursor.eat('}') {
                break;
            }
            return Err(Malformed);
        }
    }
    let mut rest = cursor.0.split_ascii_whitespace();
    let value = parse_value(rest.next().ok_or(Malformed)?)?;
    // An optional timestamp (integer ms), then nothing.
    if let Some(timestamp) = rest.next() {
        timestamp.parse::<i64>().map_err(|_| Malformed)?;
    }
    if rest.next().is_some() {
        return Err(Malformed);
    }
    Ok(Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    }))
}

/// A sample value: a float, or `+Inf`, `-Inf`, `NaN` as Prometheus writes them.
fn parse_value(text: &str) -> Result<f64, Malformed> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|_| Malformed),
    }
}

/// What is left of a line.
struct Cursor<'a>(&'a str);

impl<'a> Cursor<'a> {
    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> &'a str {
        let end = self.0.find(|c: char| !keep(c)).unwrap_or(self.0.len());
        let (taken, rest) = self.0.split_at(end);
        self.0 = rest;
        taken
    }

    fn skip_spaces(&mut self) {
        self.0 = self.0.trim_start_matches([' ', '\t']);
    }

    fn eat(&mut self, c: char) -> bool {
        match self.0.strip_prefix(c) {
            Some(rest) => {
                self.0 = rest;
                true
            }
            None => false,
        }
    }

    /// A label value: `"…"` with `\\`, `\"` and `\n` escaped (any other escape is kept as
    /// written, as Prometheus itself does).
    fn quoted(&mut self) -> Result<String, Malformed> {
        if !self.eat('"') {
            return Err(Malformed);
        }
        let mut value = String::new();
        let mut chars = self.0.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.0 = &self.0[i + 1..];
                    return Ok(value);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => return Err(Malformed),
                },
                other => value.push(other),
            }
        }
        Err(Malformed)
    }
}

/// GETs `uri` (the gateway's `/metrics`) and parses it. Any failure is a message for the
/// report's warnings: a scrape never fails a run.
pub async fn scrape(client: &HttpClient, uri: &Uri) -> Result<Scrape, String> {
    let request = Request::builder()
        .method(Method::GET)
        .uri(uri.clone())
        .body(Full::new(Bytes::new()))
        .expect("a request of valid parts");
    match client.send_limited(request, MAX_METRICS_BYTES).await {
        Ok(answer) if answer.status == StatusCode::OK => std::str::from_utf8(&answer.body)
            .map(Scrape::parse)
            .map_err(|_| format!("GET {uri}: the answer is not UTF-8 text")),
        Ok(answer) => Err(format!("GET {uri}: answered {}", answer.status)),
        Err(SendError::Timeout) => Err(format!(
            "GET {uri}: no answer within {} ms",
            client.timeout().as_millis()
        )),
        Err(SendError::Transport { kind, detail }) => Err(format!("GET {uri}: {kind}: {detail}")),
    }
}

/// How a counter moved between two scrapes: the total and by the value of one label.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub total: f64,
    pub by_label: BTreeMap<String, f64>,
}

/// `after − before` of counter `name`, per series, then summed (and by `label`).
///
/// - absent from both scrapes: `Ok(None)` (the gateway does not export it);
/// - a series absent `before` counts from 0 (the exporter writes a counter only once it has
///   been incremented, e.g. the first time in the window);
/// - a series that went down, or disappeared, means the gateway restarted (or its counters
///   were reset) in the window: `Err`, as no delta would be true.
pub fn counter_delta(
    before: &Scrape,
    after: &Scrape,
    name: &str,
    label: &str,
) -> Result<Option<Delta>, String> {
    let mut present = false;
    let mut delta = Delta {
        total: 0.0,
        by_label: BTreeMap::new(),
    };
    for sample in after.series(name) {
        present = true;
        let start = before
            .series(name)
            .find(|b| b.labels == sample.labels)
            .map_or(0.0, |b| b.value);
        let moved = sample.value - start;
        if !moved.is_finite() || moved < 0.0 {
            return Err(format!(
                "{name}{:?} went from {start} to {}: the gateway restarted (or reset its counters) during the window",
                sample.labels, sample.value
            ));
        }
        delta.total += moved;
        let key = sample.labels.get(label).cloned().unwrap_or_default();
        *delta.by_label.entry(key).or_insert(0.0) += moved;
    }
    if let Some(gone) = before
        .series(name)
        .find(|b| !after.series(name).any(|a| a.labels == b.labels))
    {
        return Err(format!(
            "{name}{:?} disappeared during the window: the gateway restarted",
            gone.labels
        ));
    }
    Ok(present.then_some(delta))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like the gateway's own `/metrics` (metrics-exporter-prometheus).
    const TEXT: &str = r#"# HELP gateway_redis_round_trips_total Redis round trips made by the gateway, by operation
# TYPE gateway_redis_round_trips_total counter
gateway_redis_round_trips_total{op="authorize"} 17514
gateway_redis_round_trips_total{op="mark_settled"} 12176
gateway_redis_round_trips_total{op="sweep"} 3

# TYPE gateway_settlement_queue_depth gauge
gateway_settlement_queue_depth 12

gateway_settlement_batch_rows{quantile="0.5"} 0
gateway_settlement_batch_rows_sum 18026
gateway_settlement_batch_rows_count 7776
gateway_http_requests_total{route="/v1/payments/{id}",method="GET",status="200"} 200
gateway_http_requests_total{route="/v1/payments",method="POST",status="201"} 17514
odd_labels{a="say \"hi\", then \\ and\nmore",b="x}y"  ,} 1.5e3 1700000000000
gateway_http_request_duration_seconds_bucket{route="/v1/payments",le="+Inf"} 17514
weird{a="\u"} NaN
"#;

    #[test]
    fn samples_labels_and_escapes_are_parsed() {
        let scrape = Scrape::parse(TEXT);
        assert_eq!(scrape.malformed, 0, "{scrape:?}");
        assert_eq!(scrape.samples.len(), 12);
        let odd = scrape.series("odd_labels").next().unwrap();
        assert_eq!(odd.labels["a"], "say \"hi\", then \\ and\nmore");
        assert_eq!(odd.labels["b"], "x}y");
        assert_eq!(odd.value, 1500.0);
        // Braces inside a label value are not the end of the label set.
        let get = scrape
            .series("gateway_http_requests_total")
            .find(|s| s.labels["method"] == "GET")
            .unwrap();
        assert_eq!(get.labels["route"], "/v1/payments/{id}");
        assert_eq!(get.value, 200.0);
        // An unknown escape is kept as written; NaN is a value.
        let weird = scrape.series("weird").next().unwrap();
        assert_eq!(weird.labels["a"], "\\u");
        assert!(weird.value.is_nan());
        assert_eq!(scrape.total("gateway_settlement_queue_depth"), Some(12.0));
    }

    #[test]
    fn counters_are_summed_by_label() {
        let scrape = Scrape::parse(TEXT);
        assert_eq!(
            scrape.total("gateway_redis_round_trips_total"),
            Some(29_693.0)
        );
        let by_op = scrape
            .by_label("gateway_redis_round_trips_total", "op")
            .unwrap();
        assert_eq!(by_op["authorize"], 17_514.0);
        assert_eq!(by_op["mark_settled"], 12_176.0);
        assert_eq!(by_op.len(), 3);
        // A label the series lack groups them under "".
        assert_eq!(
            scrape.by_label("gateway_settlement_batch_rows_sum", "op"),
            Some([(String::new(), 18_026.0)].into_iter().collect())
        );
        assert_eq!(
            scrape.total("gateway_settlement_batch_rows_count"),
            Some(7_776.0)
        );
    }

    #[test]
    fn a_missing_metric_is_none_not_zero() {
        let scrape = Scrape::parse(TEXT);
        assert_eq!(scrape.total("gateway_store_commits_total"), None);
        assert_eq!(scrape.by_label("gateway_store_commits_total", "op"), None);
        // A name that only starts like another is another metric.
        assert_eq!(scrape.total("gateway_settlement_batch_rows"), Some(0.0));
        assert_eq!(
            counter_delta(&scrape, &scrape, "gateway_store_commits_total", "op"),
            Ok(None)
        );
        assert_eq!(Scrape::parse(""), Scrape::default());
    }

    #[test]
    fn malformed_lines_are_counted_and_skipped() {
        for bad in [
            "no_value",
            "1starts_with_digit 1",
            "m{a=\"unterminated} 1",
            "m{a=unquoted} 1",
            "m{a=\"1\" b=\"2\"} 1",
            "m{a=\"1\",a=\"2\"} 1",
            "m 1 2 3",
            "m one",
            "m 1 notatimestamp",
        ] {
            assert_eq!(parse_line(bad), Err(Malformed), "{bad}");
        }
        assert_eq!(parse_line("  # TYPE m counter"), Ok(None));
        assert_eq!(parse_line("   "), Ok(None));
        let scrape = Scrape::parse("m 1\nbroken{\nm{x=\"y\"} +Inf\n");
        assert_eq!(scrape.malformed, 1);
        assert_eq!(scrape.samples.len(), 2);
        assert_eq!(scrape.samples[1].value, f64::INFINITY);
    }

    #[test]
    fn deltas_count_new_series_from_zero_and_refuse_a_restart() {
        let before = Scrape::parse(
            "c_total{op=\"authorize\",backend=\"pg\"} 100\nc_total{op=\"settle\",backend=\"pg\"} 10\n",
        );
        let after = Scrape::parse(
            "c_total{op=\"authorize\",backend=\"pg\"} 160\nc_total{op=\"settle\",backend=\"pg\"} 13\nc_total{op=\"refund\",backend=\"pg\"} 2\n",
        );
        let delta = counter_delta(&before, &after, "c_total", "op")
            .unwrap()
            .unwrap();
        assert_eq!(delta.total, 65.0);
        assert_eq!(delta.by_label["authorize"], 60.0);
        assert_eq!(delta.by_label["settle"], 3.0);
        assert_eq!(delta.by_label["refund"], 2.0);
        // Absent at the start (the first increment was in the window): from zero.
        let delta = counter_delta(&Scrape::default(), &after, "c_total", "backend")
            .unwrap()
            .unwrap();
        assert_eq!(delta.by_label["pg"], 175.0);
        // Backwards, or gone: the gateway restarted.
        assert!(counter_delta(&after, &before, "c_total", "op").is_err());
        assert!(counter_delta(&before, &Scrape::default(), "c_total", "op").is_err());
    }
}
