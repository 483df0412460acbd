//! The live progress line on stderr: elapsed of planned time, requests, errors and the current rate,
//! so a user sees at once whether the server keeps up. Hidden with `--quiet`, and by indicatif
//! itself when stderr is not a terminal, so logs and pipes get the final table only.

use super::load::Counters;
use super::report::{one_decimal, thousands};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// The current rate is measured over this much recent time.
const RATE_WINDOW: Duration = Duration::from_secs(1);

pub struct Progress {
    bar: ProgressBar,
    duration: Duration,
    /// Recent (time, requests sent) samples, oldest first.
    samples: VecDeque<(Instant, u64)>,
}

impl Progress {
    pub fn new(quiet: bool, duration: Duration) -> Progress {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let length = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let bar = ProgressBar::with_draw_target(Some(length), target);
        if let Ok(style) = ProgressStyle::with_template("{bar:30} {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress {
            bar,
            duration,
            samples: VecDeque::new(),
        }
    }

    /// Redraws with the run `elapsed` time in.
    pub fn update(&mut self, elapsed: Duration, counters: &Counters) {
        let sent = counters.sent.load(Relaxed);
        let errors = counters.failed.load(Relaxed);
        let rate = self.rate(Instant::now(), sent);
        self.bar
            .set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
        self.bar.set_message(format!(
            "{:.1}s/{:.0}s  sent {}  errors {}  {} req/s",
            elapsed.min(self.duration).as_secs_f64(),
            self.duration.as_secs_f64(),
            thousands(sent),
            thousands(errors),
            one_decimal(rate),
        ));
    }

    /// Shown while the last answers come in.
    pub fn draining(&self, in_flight: usize) {
        self.bar
            .set_message(format!("waiting for {in_flight} requests in flight"));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Requests per second over the last [`RATE_WINDOW`].
    fn rate(&mut self, now: Instant, sent: u64) -> f64 {
        self.samples.push_back((now, sent));
        while self.samples.len() > 2 && now - self.samples[1].0 >= RATE_WINDOW {
            self.samples.pop_front();
        }
        match self.samples.front() {
            Some(&(t0, sent0)) if now > t0 => {
                sent.saturating_sub(sent0) as f64 / (now - t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}
