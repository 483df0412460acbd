//! The end-of-run table. Plain aligned text on stdout, so it reads well in a terminal, a CI log, or
//! a pasted issue, and a script can still pick a line out with grep.

use super::load::{ErrorKind, ErrorTally, Outcome};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

/// Everything the table shows.
pub struct Summary {
    /// How the load was paced, in words.
    pub mode: String,
    /// Requests per second the pacing aims at.
    pub target_rate: f64,
    /// How long requests went out (the drain after it is not counted).
    pub elapsed: Duration,
    pub concurrency: usize,
    pub outcome: Outcome,
}

/// Percentiles shown, with their labels.
const QUANTILES: [(&str, f64); 4] = [
    ("latency p50", 0.50),
    ("latency p90", 0.90),
    ("latency p99", 0.99),
    ("latency p99.9", 0.999),
];

/// The table, one `label  value` line each, ending with a newline.
pub fn render(s: &Summary) -> String {
    let o = &s.outcome;
    let mut t = Table::default();
    t.line("mode", &s.mode);
    t.line(
        "target rate",
        &format!("{} req/s", one_decimal(s.target_rate)),
    );
    t.line("elapsed", &format!("{:.2} s", s.elapsed.as_secs_f64()));
    t.line("requests sent", &thousands(o.sent));
    t.line("positions sent", &thousands(o.positions));
    t.line("errors", &thousands(o.failed));
    for (kind, tally) in &o.errors {
        t.line(&format!("  {kind}"), &thousands(tally.count));
    }
    let not_sent = o.due.saturating_sub(o.sent);
    if not_sent > 0 {
        let why = format!(
            "(due, but no free slot of --concurrency {} before the end)",
            s.concurrency
        );
        t.line("not sent", &format!("{}  {why}", thousands(not_sent)));
    }
    let unanswered = o.sent.saturating_sub(o.ok + o.failed);
    if unanswered > 0 {
        let count = thousands(unanswered);
        t.line(
            "no answer",
            &format!("{count}  (still in flight when the run ended)"),
        );
    }
    t.line("achieved rate", &rates(o, s.elapsed));
    latency_lines(&mut t, o);
    first_errors(&mut t, &o.errors);
    t.text
}

#[derive(Default)]
struct Table {
    text: String,
}

impl Table {
    fn line(&mut self, label: &str, value: &str) {
        let _ = writeln!(self.text, "{label:<19}{value}");
    }
}

fn rates(o: &Outcome, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let requests = o.sent as f64 / secs;
    let positions = o.positions as f64 / secs;
    format!(
        "{} req/s ({} positions/s)",
        one_decimal(requests),
        one_decimal(positions)
    )
}

fn latency_lines(t: &mut Table, o: &Outcome) {
    let h = &o.latency;
    let shown = |micros: u64| {
        if h.is_empty() {
            "-".to_string()
        } else {
            millis(micros)
        }
    };
    for (label, q) in QUANTILES {
        t.line(label, &shown(h.value_at_quantile(q)));
    }
    t.line("latency max", &shown(h.max()));
}

/// What the first error of each kind said, to tell a bad request from a sick server.
fn first_errors(t: &mut Table, errors: &BTreeMap<ErrorKind, ErrorTally>) {
    for (kind, tally) in errors {
        let detail = tally.first.replace('\n', " ");
        let _ = writeln!(t.text, "first {kind}: {detail}");
    }
}

/// Microseconds as milliseconds with 3 decimals.
fn millis(micros: u64) -> String {
    format!("{}.{:03} ms", thousands(micros / 1000), micros % 1000)
}

/// `12345.67` as `12,345.7`.
pub fn one_decimal(x: f64) -> String {
    let tenths = (x.max(0.0) * 10.0).round() as u64;
    format!("{}.{}", thousands(tenths / 10), tenths % 10)
}

/// `12345` as `12,345`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;

    fn outcome() -> Outcome {
        let mut latency = Histogram::<u64>::new(3).unwrap();
        for us in 1..=1000 {
            latency.record(us * 10).unwrap();
        }
        Outcome {
            due: 1_010,
            sent: 1_005,
            positions: 50_250,
            ok: 1_000,
            failed: 3,
            errors: BTreeMap::from([(
                ErrorKind::Http(503),
                ErrorTally {
                    count: 3,
                    first: "{\"error\":\n\"busy\"}".into(),
                },
            )]),
            latency,
        }
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
        assert_eq!(one_decimal(12_345.67), "12,345.7");
        assert_eq!(one_decimal(0.04), "0.0");
        assert_eq!(millis(1_201_151), "1,201.151 ms");
        assert_eq!(millis(412), "0.412 ms");
    }

    #[test]
    fn table_shows_counts_rates_errors_and_percentiles() {
        let table = render(&Summary {
            mode: "open loop".into(),
            target_rate: 200.0,
            elapsed: Duration::from_secs(5),
            concurrency: 64,
            outcome: outcome(),
        });
        for expected in [
            "requests sent      1,005\n",
            "positions sent     50,250\n",
            "errors             3\n",
            "  HTTP 503         3\n",
            "not sent           5  (due, but no free slot of --concurrency 64 before the end)\n",
            "no answer          2  (still in flight when the run ended)\n",
            "achieved rate      201.0 req/s (10,050.0 positions/s)\n",
            "latency p50        5.003 ms\n",
            "latency max        10.007 ms\n",
            "first HTTP 503: {\"error\": \"busy\"}\n",
        ] {
            assert!(table.contains(expected), "{expected:?} not in\n{table}");
        }
    }

    #[test]
    fn no_success_shows_dashes_and_hides_empty_lines() {
        let mut o = outcome();
        o.latency.reset();
        (o.due, o.sent, o.ok, o.failed) = (3, 3, 0, 3);
        let table = render(&Summary {
            mode: "closed loop".into(),
            target_rate: 1.0,
            elapsed: Duration::from_secs(1),
            concurrency: 1,
            outcome: o,
        });
        assert!(table.contains("latency p99.9      -\n"), "{table}");
        assert!(
            !table.contains("not sent") && !table.contains("no answer"),
            "{table}"
        );
    }
}
