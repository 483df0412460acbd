//! Who is calling: API keys, roles and tenants at the door of every request, reader rate limits,
//! and the per-position checks of writes (bound drivers, device rate limits, sanity filters).
//!
//! [`Trust`] holds the building blocks of [`crate::trust`]; [`authenticate`] is the middleware
//! that runs before every handler:
//! - open endpoints (`/health`, `/ready`, the docs, the live map's files, and `/metrics` unless
//!   `--metrics-key-required`) pass untouched;
//! - while no API key exists the service is in *open mode*: every request runs as
//!   [`Principal::open`] (no tenant, may do everything) — the server warns at start-up and refuses
//!   a non-loopback address unless `--allow-open`;
//! - otherwise the key comes from `Authorization: Bearer <key>` (or, for the stream endpoints,
//!   which browsers open without custom headers, an `access_token` query parameter): 401
//!   `unauthorized` without a valid one, 403 `forbidden` for a role the route needs, 429
//!   `rate_limited` past a reader key's bucket;
//! - the [`Principal`] is then in the request's extensions for the handlers ([`Caller`]).
//!
//! Writes are checked per position by [`Trust::admit`]: the driver must be bound to the device key
//! (403), each driver has a token bucket per key (429), and the sanity filters reject impossible
//! fixes (422 details; anomalies are recorded) or drop duplicates (accepted, not stored). Admitted
//! positions get their tenant's internal ids ([`crate::domain::tenant`]).

use super::error::ApiError;
use super::write_guard::IDEMPOTENCY_KEY;
use super::AppState;
use crate::domain::{now_micros, tenant, DriverId, FieldError, Position};
use crate::trust::anomalies::{Anomaly, AnomalyLog};
use crate::trust::filters::{SanityFilters, Verdict};
use crate::trust::idempotency::IdempotencyCache;
use crate::trust::keys::{AuthError, KeyStore, Principal, Role};
use crate::trust::limiter::{LimitConfig, Limited, RateLimiter};
use crate::trust::metrics::TrustMetrics;
use crate::trust::signing;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, Method};
use axum::response::{IntoResponse, Response};
use compact_str::CompactString;
use futures_util::future::Either;
use hashbrown::HashMap;
use parking_lot::Mutex;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::{Layer, Service};

/// The trust state of the service.
pub struct Trust {
    keys: KeyStore,
    /// No active key exists: every request runs as [`Principal::open`].
    open: AtomicBool,
    metrics_key_required: bool,
    readers: RateLimiter<CompactString>,
    devices: RateLimiter<(CompactString, DriverId)>,
    pub idempotency: IdempotencyCache,
    pub filters: SanityFilters,
    pub anomalies: Arc<AnomalyLog>,
    pub metrics: TrustMetrics,
    /// Positions accepted per tenant since start-up (`/v1/stats` of a tenant).
    accepted: Mutex<HashMap<CompactString, u64>>,
    /// The caller of every request in open mode (cloned, not rebuilt, per request).
    open_principal: Principal,
}

/// Settings of [`Trust::new`].
pub struct TrustSettings {
    pub metrics_key_required: bool,
    pub readers: LimitConfig,
    pub devices: LimitConfig,
    pub filters: SanityFilters,
}

impl Trust {
    pub fn new(
        keys: KeyStore,
        anomalies: AnomalyLog,
        settings: TrustSettings,
        metrics: &crate::metrics::Metrics,
    ) -> Trust {
        let open = !keys.list(None).iter().any(|k| k.revoked_at.is_none());
        let trust = Trust {
            keys,
            open: AtomicBool::new(open),
            metrics_key_required: settings.metrics_key_required,
            readers: RateLimiter::new(settings.readers),
            devices: RateLimiter::new(settings.devices),
            idempotency: IdempotencyCache::default(),
            filters: settings.filters,
            anomalies: Arc::new(anomalies),
            metrics: TrustMetrics::new(metrics),
            accepted: Mutex::new(HashMap::new()),
            open_principal: Principal::open(),
        };
        trust.refresh_mode();
        trust
    }

    /// True while no active key exists.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Open mode ends when the first key appears and never comes back while the process runs:
    /// revoking every key of a server started with keys (possibly on a public address) must lock
    /// it, not open it.
    fn refresh_mode(&self) {
        let any_key = self.keys.list(None).iter().any(|k| k.revoked_at.is_none());
        if any_key {
            self.open.store(false, Ordering::Relaxed);
        }
    }

    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// Picks up keys created or revoked by `fleettracker keys` (or another instance sharing the
    /// file), and forgets idle limiter and idempotency state. Run every few seconds.
    pub fn upkeep(&self) {
        match self.keys.reload_if_changed() {
            Ok(_) => self.refresh_mode(),
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the API keys; keeping the old ones")
            }
        }
        let now = Instant::now();
        self.readers.sweep(now);
        self.devices.sweep(now);
        self.idempotency.sweep(now);
        self.anomalies.sweep_caps();
    }

    /// After a key was created or revoked through the API.
    pub fn keys_changed(&self) {
        self.refresh_mode();
    }

    fn principal(&self, parts: &Parts, allow_query_token: bool) -> Result<Principal, AuthError> {
        if self.is_open() {
            return Ok(self.open_principal.clone());
        }
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match (
            header,
            allow_query_token.then(|| query_token(parts)).flatten(),
        ) {
            (None, Some(token)) => {
                let bearer = format!("Bearer {token}");
                self.keys.authenticate(Some(bearer.as_bytes()))
            }
            (header, _) => self.keys.authenticate(header),
        }
    }

    /// Counts accepted positions for `/v1/stats`.
    pub fn count_accepted(&self, tenant: &str, n: u64) {
        if tenant.is_empty() {
            return; // open mode: the tracker's own total is the answer
        }
        *self
            .accepted
            .lock()
            .entry(CompactString::from(tenant))
            .or_default() += n;
    }

    pub fn accepted(&self, tenant: &str) -> u64 {
        self.accepted.lock().get(tenant).copied().unwrap_or(0)
    }

    /// Checks a write's positions for `caller` (already validated): bound drivers (403), the
    /// device buckets (429), then the sanity filters against each driver's latest fix. Returns the
    /// positions to apply, with internal ids, and the rejections by index.
    pub async fn admit(
        &self,
        caller: &Principal,
        positions: Vec<(usize, Position)>,
        tracker: &crate::tracker::Tracker,
        received_at: crate::domain::Micros,
    ) -> Result<Admitted, ApiError> {
        for (_, p) in &positions {
            self.check_driver(caller, &p.driver_id)?;
        }
        if caller.role == Role::Device {
            let mut per_driver: HashMap<&str, u32> = HashMap::new();
            for (_, p) in &positions {
                *per_driver.entry(p.driver_id.as_str()).or_default() += 1;
            }
            for (driver, cost) in per_driver {
                self.limit_device(caller, driver, cost)?;
            }
        }
        let ids: Vec<DriverId> = positions
            .iter()
            .map(|(_, p)| tenant::internal(&caller.tenant, &p.driver_id))
            .collect();
        let previous = if self.filters.needs_previous() {
            tracker.previous_of(&ids).await?
        } else {
            vec![None; ids.len()]
        };
        let mut newest: HashMap<DriverId, Position> = HashMap::new();
        let several = positions.len() > 1;
        let mut admitted = Admitted::default();
        for (((index, position), id), stored) in positions.into_iter().zip(ids).zip(previous) {
            // The newest fix known of this driver: stored, or earlier in this request.
            let before = match (newest.get(&id), stored) {
                (Some(n), Some(s)) if s.timestamp > n.timestamp => Some(s),
                (Some(n), _) => Some(n.clone()),
                (None, s) => s,
            };
            match self.judge(caller, position, id, before, received_at) {
                Ok(Some(p)) => {
                    // Only a batch can hold a later fix of the same driver.
                    if several
                        && newest
                            .get(&p.driver_id)
                            .is_none_or(|n| n.timestamp < p.timestamp)
                    {
                        newest.insert(p.driver_id.clone(), p.clone());
                    }
                    admitted.positions.push(p);
                    admitted.accepted += 1;
                }
                Ok(None) => admitted.accepted += 1,
                Err(error) => admitted.rejected.push((index, error)),
            }
        }
        Ok(admitted)
    }

    /// [`Trust::admit`] for a request of one position, without the batch's bookkeeping (the
    /// hottest path of the service): `Ok(None)` for a duplicate (accepted, not stored), a 422 for a
    /// filter's rejection.
    pub async fn admit_one(
        &self,
        caller: &Principal,
        position: Position,
        tracker: &crate::tracker::Tracker,
        received_at: crate::domain::Micros,
    ) -> Result<Option<Position>, ApiError> {
        self.check_driver(caller, &position.driver_id)?;
        if caller.role == Role::Device {
            self.limit_device(caller, &position.driver_id, 1)?;
        }
        let id = tenant::internal(&caller.tenant, &position.driver_id);
        let previous = if !self.filters.needs_previous() {
            None
        } else if let Some(index) = tracker.memory_index() {
            index.get(&id, Instant::now()) // in process: no future to build
        } else {
            tracker
                .previous_of(std::slice::from_ref(&id))
                .await?
                .pop()
                .flatten()
        };
        self.judge(caller, position, id, previous, received_at)
            .map_err(|error| ApiError::fields(vec![error]))
    }

    /// 403 unless the caller's key may report positions of `driver_id`.
    fn check_driver(&self, caller: &Principal, driver_id: &str) -> Result<(), ApiError> {
        if caller.can_write_driver(driver_id) {
            return Ok(());
        }
        self.metrics.forbidden();
        Err(ApiError::Forbidden(format!(
            "this key may not report positions of driver {driver_id}"
        )))
    }

    /// Charges `cost` updates of `driver` to the device key's bucket (429 past it).
    fn limit_device(&self, caller: &Principal, driver: &str, cost: u32) -> Result<(), ApiError> {
        let key = (caller.key_id.clone(), DriverId::from(driver));
        self.devices
            .check(&key, cost, Instant::now())
            .map_err(|limited| {
                self.metrics.rate_limited(Role::Device);
                rate_limited(limited, &format!("driver {driver}"))
            })
    }

    /// The sanity filters' verdict on `position` (its tenant's id is `id`) against the driver's
    /// `previous` fix, counted and, for anomalies, recorded: the position to apply with its
    /// internal id, `None` for a duplicate, or the rejection's field error.
    fn judge(
        &self,
        caller: &Principal,
        mut position: Position,
        id: DriverId,
        previous: Option<Position>,
        now: crate::domain::Micros,
    ) -> Result<Option<Position>, FieldError> {
        // The filters compare fixes of one driver: the stored one carries the internal id.
        let previous = previous.map(|p| Position {
            driver_id: position.driver_id.clone(),
            ..p
        });
        match self.filters.check(&position, previous.as_ref(), now) {
            Verdict::Accept => {
                position.driver_id = id;
                Ok(Some(position))
            }
            Verdict::Duplicate => {
                self.metrics.duplicate();
                Ok(None)
            }
            Verdict::Reject { reason, evidence } => {
                self.metrics.rejected(reason);
                if let Some(evidence) = evidence {
                    self.record_anomaly(caller, &position, reason, &evidence, now);
                }
                Err(self.filters.field_error(reason))
            }
        }
    }

    fn record_anomaly(
        &self,
        caller: &Principal,
        position: &Position,
        reason: crate::trust::filters::Reason,
        evidence: &crate::trust::filters::Evidence,
        now: i64,
    ) {
        let Some(anomaly) = Anomaly::new(
            anomaly_tenant(&caller.tenant),
            position,
            reason,
            evidence,
            now,
        ) else {
            return;
        };
        let log = self.anomalies.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = log.record(&anomaly) {
                tracing::error!(error = %e, "cannot record an anomaly");
            }
        });
    }
}

/// The anomaly log's name for a tenant (open mode has none).
pub fn anomaly_tenant(tenant: &str) -> &str {
    if tenant.is_empty() {
        "_open"
    } else {
        tenant
    }
}

/// What [`Trust::admit`] let through.
#[derive(Default)]
pub struct Admitted {
    /// To apply, with internal ids.
    pub positions: Vec<Position>,
    /// Answered as accepted (includes duplicates, which are not applied).
    pub accepted: usize,
    /// Refused by a sanity filter: the position's index and why.
    pub rejected: Vec<(usize, FieldError)>,
}

fn rate_limited(limited: Limited, what: &str) -> ApiError {
    let message = match limited {
        Limited::RetryAfter(_) => format!("rate limit reached for {what}; retry later"),
        Limited::ExceedsBurst { burst } => {
            format!("more than {burst} updates of {what} at once; split the request")
        }
    };
    ApiError::RateLimited {
        message,
        retry_after_secs: limited.retry_after_secs(),
    }
}

/// `access_token` from the query string.
fn query_token(parts: &Parts) -> Option<String> {
    let query = parts.uri.query()?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v)
}

/// What a route needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Read,
    Write,
    Admin,
}

fn need(method: &Method, path: &str, metrics_key_required: bool) -> Need {
    match path {
        "/health" | "/ready" | "/openapi.json" => Need::Nothing,
        "/metrics" if !metrics_key_required => Need::Nothing,
        "/metrics" => Need::Read,
        "/v1/locations" | "/v1/locations/batch" | "/v1/ingest" => Need::Write,
        p if p.starts_with("/v1/keys") => Need::Admin,
        p if p.starts_with("/v1/") => Need::Read,
        _ if method == Method::GET => Need::Nothing, // the map page, its files, the docs
        _ => Need::Read,
    }
}

/// The trust gate around every route (see the module docs), as a hand-written layer: in open mode,
/// and for open endpoints, a request goes straight through (no allocation, no principal: the
/// [`Caller`] extractor stands in the open-mode principal); otherwise it is authenticated, its role
/// checked, a reader key's bucket charged, and POSTs pass the write guard (signature,
/// Idempotency-Key).
#[derive(Clone)]
pub struct TrustLayer {
    pub state: AppState,
}

impl<S> Layer<S> for TrustLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    state: AppState,
}

type Slow = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S, B> Service<axum::http::Request<B>> for Gate<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, Slow>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let request = request.map(axum::body::Body::new);
        let trust = &self.state.trust;
        let path = request.uri().path();
        let keyed_post =
            request.method() == Method::POST && request.headers().contains_key(&IDEMPOTENCY_KEY);
        // Open mode: only key management and keyed POSTs need the slow path.
        let (straight, need) = if trust.is_open() && !keyed_post && !path.starts_with("/v1/keys") {
            (true, Need::Nothing)
        } else {
            let need = need(request.method(), path, trust.metrics_key_required);
            (need == Need::Nothing, need)
        };
        if straight {
            return Either::Left(self.inner.call(request));
        }
        // The clone that was made ready goes with this request (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Either::Right(Box::pin(async move {
            let answer = match authenticate(&state, request, need) {
                Ok(request) => super::write_guard::guard_writes(&state, request, inner).await,
                Err(e) => Err(e),
            };
            Ok(answer.unwrap_or_else(IntoResponse::into_response))
        }))
    }
}

/// Authenticates and authorises a request that needs a key; puts the [`Principal`] in its
/// extensions.
fn authenticate(state: &AppState, request: Request, need: Need) -> Result<Request, ApiError> {
    let trust = &state.trust;
    let (mut parts, body) = request.into_parts();
    let streams = parts.uri.path().starts_with("/v1/stream") || parts.uri.path() == "/v1/ingest";
    let caller = trust.principal(&parts, streams).map_err(|e| {
        trust.metrics.auth_failure(e);
        ApiError::Unauthorized(e.to_string())
    })?;
    let allowed = match need {
        Need::Nothing => true,
        Need::Read => caller.can_read(),
        Need::Write => caller.unrestricted || caller.role == Role::Device,
        Need::Admin => caller.is_admin(),
    };
    if !allowed {
        trust.metrics.forbidden();
        return Err(ApiError::Forbidden(format!(
            "a {} key may not use this endpoint",
            caller.role.as_str()
        )));
    }
    if !caller.unrestricted && caller.role != Role::Device {
        if let Err(limited) = trust.readers.check(&caller.key_id, 1, Instant::now()) {
            trust.metrics.rate_limited(caller.role);
            return Err(rate_limited(limited, "this key"));
        }
    }
    parts.extensions.insert(caller);
    Ok(Request::from_parts(parts, body))
}

/// Verifies `X-Signature` of a write when the caller's key has a signing secret (401 otherwise).
pub fn verify_signature(
    trust: &Trust,
    caller: &Principal,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Result<(), ApiError> {
    let Some(secret) = &caller.signing_secret else {
        return Ok(());
    };
    let now = now_micros() / 1_000_000;
    signing::verify(
        secret,
        headers.get("x-signature").map(|v| v.as_bytes()),
        headers.get("x-signature-timestamp").map(|v| v.as_bytes()),
        body,
        now,
    )
    .map_err(|e| {
        trust.metrics.signature_failure(e);
        ApiError::Unauthorized(format!("request signature: {e}"))
    })
}

/// The authenticated caller, as a handler argument: the gate's principal, or in open mode (where
/// the gate lets requests straight through) the open-mode principal.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(caller) = parts.extensions.get::<Principal>() {
            return Ok(Caller(caller.clone()));
        }
        let trust = &state.trust;
        if trust.is_open() {
            return Ok(Caller(trust.open_principal.clone()));
        }
        // A key was created between the gate and here: authenticate as the gate would have.
        Err(ApiError::Unauthorized(
            "an API key is required (the server just left open mode); retry with one".into(),
        ))
    }
}

/// Open-mode trust over a temporary directory, for in-process tests of handlers.
#[cfg(test)]
pub(crate) fn open_for_tests(metrics: &crate::metrics::Metrics) -> (Arc<Trust>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = KeyStore::open(dir.path()).expect("key store");
    let anomalies =
        AnomalyLog::open(&dir.path().join("anomalies"), i64::MAX / 2).expect("anomaly log");
    let settings = TrustSettings {
        metrics_key_required: false,
        readers: LimitConfig::READER_DEFAULT,
        devices: LimitConfig::DEVICE_DEFAULT,
        filters: SanityFilters::default(),
    };
    (
        Arc::new(Trust::new(keys, anomalies, settings, metrics)),
        dir,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_what_their_callers_do() {
        let get = Method::GET;
        assert_eq!(need(&get, "/health", false), Need::Nothing);
        assert_eq!(need(&get, "/metrics", false), Need::Nothing);
        assert_eq!(need(&get, "/metrics", true), Need::Read);
        assert_eq!(need(&Method::POST, "/v1/locations", false), Need::Write);
        assert_eq!(need(&get, "/v1/ingest", false), Need::Write);
        assert_eq!(need(&get, "/v1/drivers/nearby", false), Need::Read);
        assert_eq!(need(&get, "/v1/anomalies", false), Need::Read);
        assert_eq!(need(&Method::POST, "/v1/keys", false), Need::Admin);
        assert_eq!(need(&get, "/", false), Need::Nothing);
        assert_eq!(need(&Method::POST, "/anything", false), Need::Read);
    }
}
