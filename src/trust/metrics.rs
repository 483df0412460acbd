//! The counters of the trust layer, registered up front through [`Metrics::counter`] so every
//! series exists (at 0) from the start and the hot path increments a held handle:
//!
//! | metric | labels |
//! |---|---|
//! | `positions_rejected_total` | `reason`: `null_island`, `future`, `too_old`, `impossible_speed`, `teleport` |
//! | `positions_duplicate_total` | — (duplicates are accepted, not stored) |
//! | `rate_limited_total` | `role`: `admin`, `reader`, `device` |
//! | `auth_failures_total` | `reason`: `missing`, `malformed`, `unknown_key`, `bad_secret`, `revoked`, `forbidden`, `signature_missing`, `signature_malformed`, `signature_stale`, `signature_bad` |
//!
//! Every label value comes from a fixed enum, never from a key id or driver id.

use super::filters::Reason;
use super::keys::{AuthError, Role};
use super::signing::SignatureError;
use crate::metrics::Metrics;
use metrics::Counter;

const REJECTED: &str = "positions_rejected_total";
const DUPLICATES: &str = "positions_duplicate_total";
const RATE_LIMITED: &str = "rate_limited_total";
const AUTH_FAILURES: &str = "auth_failures_total";

/// Handles to the trust counters.
#[derive(Clone)]
pub struct TrustMetrics {
    rejected: [Counter; Reason::ALL.len()],
    duplicates: Counter,
    rate_limited: [Counter; Role::ALL.len()],
    auth: [Counter; AuthError::ALL.len()],
    forbidden: Counter,
    signature: [Counter; SignatureError::ALL.len()],
}

impl TrustMetrics {
    /// Registers every series (with its `# HELP`) in `metrics`.
    pub fn new(metrics: &Metrics) -> TrustMetrics {
        metrics.describe_counter(
            REJECTED,
            "Positions rejected by the sanity filters, by reason.",
        );
        metrics.describe_counter(
            DUPLICATES,
            "Positions with the same driver and timestamp as the latest: accepted, not stored.",
        );
        metrics.describe_counter(RATE_LIMITED, "Requests answered 429, by the key's role.");
        metrics.describe_counter(AUTH_FAILURES, "Requests answered 401 or 403, by reason.");
        let auth = |reason: &'static str| metrics.counter(AUTH_FAILURES, &[("reason", reason)]);
        TrustMetrics {
            rejected: Reason::ALL.map(|r| metrics.counter(REJECTED, &[("reason", r.as_str())])),
            duplicates: metrics.counter(DUPLICATES, &[]),
            rate_limited: Role::ALL.map(|r| metrics.counter(RATE_LIMITED, &[("role", r.as_str())])),
            auth: AuthError::ALL.map(|e| auth(e.reason())),
            forbidden: auth("forbidden"),
            signature: SignatureError::ALL.map(|e| auth(e.reason())),
        }
    }

    pub fn rejected(&self, reason: Reason) {
        self.rejected[reason as usize].increment(1);
    }

    pub fn duplicate(&self) {
        self.duplicates.increment(1);
    }

    pub fn rate_limited(&self, role: Role) {
        self.rate_limited[role as usize].increment(1);
    }

    pub fn auth_failure(&self, error: AuthError) {
        self.auth[error as usize].increment(1);
    }

    /// A valid key without the role or driver a request needs (403).
    pub fn forbidden(&self) {
        self.forbidden.increment(1);
    }

    pub fn signature_failure(&self, error: SignatureError) {
        self.signature[error as usize].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exported_from_the_start_and_counts() {
        let metrics = Metrics::new();
        let t = TrustMetrics::new(&metrics);
        let text = metrics.render(None);
        for reason in Reason::ALL {
            let series = format!(
                "positions_rejected_total{{reason=\"{}\"}} 0",
                reason.as_str()
            );
            assert!(text.contains(&series), "{series} missing in\n{text}");
        }
        for role in ["admin", "reader", "device"] {
            assert!(text.contains(&format!("rate_limited_total{{role=\"{role}\"}} 0")));
        }
        for reason in ["missing", "revoked", "forbidden", "signature_stale"] {
            assert!(text.contains(&format!("auth_failures_total{{reason=\"{reason}\"}} 0")));
        }
        t.rejected(Reason::ImpossibleSpeed);
        t.rejected(Reason::ImpossibleSpeed);
        t.rate_limited(Role::Device);
        t.auth_failure(AuthError::Revoked);
        t.signature_failure(SignatureError::Bad);
        t.forbidden();
        t.duplicate();
        let text = metrics.render(None);
        assert!(text.contains("positions_rejected_total{reason=\"impossible_speed\"} 2"));
        assert!(text.contains("positions_rejected_total{reason=\"teleport\"} 0"));
        assert!(text.contains("rate_limited_total{role=\"device\"} 1"));
        assert!(text.contains("auth_failures_total{reason=\"revoked\"} 1"));
        assert!(text.contains("auth_failures_total{reason=\"signature_bad\"} 1"));
        assert!(text.contains("auth_failures_total{reason=\"forbidden\"} 1"));
        assert!(text.contains("positions_duplicate_total 1"));
        assert!(text.contains("# HELP positions_rejected_total"));
    }
}
