//! The hub's limits. They are tuning knobs rather than everyday settings, so they are read from
//! `FLEET_STREAM_*` environment variables (a bad value is logged and the default kept) instead of
//! flags; tests use them to make a subscriber slow or keep-alives frequent.

use std::time::Duration;

/// Per-subscriber limits and keep-alive period.
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    /// Messages a subscriber's queue holds before it is switched to latest-per-driver updates
    /// (`FLEET_STREAM_QUEUE`, default 1024).
    pub queue: usize,
    /// Drivers a lagging subscriber may have pending before it is closed as too slow
    /// (`FLEET_STREAM_BACKLOG`, default 20000).
    pub backlog: usize,
    /// Longest a subscriber may go without taking its pending messages, or a single write may
    /// stay blocked, before it is closed as too slow (`FLEET_STREAM_MAX_LAG`, default 10s).
    pub max_lag: Duration,
    /// Period of SSE keep-alive comments and WebSocket pings (`FLEET_STREAM_KEEPALIVE`, default
    /// 15s).
    pub keepalive: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            queue: 1024,
            backlog: 20_000,
            max_lag: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
        }
    }
}

impl HubConfig {
    /// The defaults, overridden by whichever `FLEET_STREAM_*` variables are set.
    pub fn from_env() -> HubConfig {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> HubConfig {
        let d = HubConfig::default();
        HubConfig {
            queue: read(&lookup, "FLEET_STREAM_QUEUE", d.queue, parse_count),
            backlog: read(&lookup, "FLEET_STREAM_BACKLOG", d.backlog, parse_count),
            max_lag: read(&lookup, "FLEET_STREAM_MAX_LAG", d.max_lag, parse_period),
            keepalive: read(&lookup, "FLEET_STREAM_KEEPALIVE", d.keepalive, parse_period),
        }
    }
}

fn read<T>(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: T,
    parse: fn(&str) -> Option<T>,
) -> T {
    let Some(text) = lookup(name) else {
        return default;
    };
    parse(text.trim()).unwrap_or_else(|| {
        tracing::warn!(variable = name, value = %text, "ignoring an invalid value; using the default");
        default
    })
}

fn parse_count(text: &str) -> Option<usize> {
    text.parse().ok().filter(|&n| n > 0)
}

fn parse_period(text: &str) -> Option<Duration> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_override_defaults_and_bad_values_are_ignored() {
        let config = HubConfig::from_lookup(|name| match name {
            "FLEET_STREAM_QUEUE" => Some("8".into()),
            "FLEET_STREAM_MAX_LAG" => Some("250ms".into()),
            "FLEET_STREAM_BACKLOG" => Some("zero".into()),
            "FLEET_STREAM_KEEPALIVE" => Some("0s".into()),
            _ => None,
        });
        assert_eq!(config.queue, 8);
        assert_eq!(config.max_lag, Duration::from_millis(250));
        assert_eq!(config.backlog, HubConfig::default().backlog);
        assert_eq!(config.keepalive, HubConfig::default().keepalive);
    }
}
