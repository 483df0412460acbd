//! `GET /v1/anomalies`: fixes the sanity filters found suspicious (impossible speed, teleports),
//! kept for risk review and disputes; a tenant sees only its own.

use super::auth::{anomaly_tenant, Caller};
use super::drivers::check_driver_id;
use super::error::ApiError;
use super::extract::QueryParams;
use super::AppState;
use crate::domain::{now_micros, parse_rfc3339, FieldError};
use crate::trust::anomalies::Anomaly;
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Default and largest number of anomalies in one answer.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AnomalyParams {
    /// Only this driver's.
    pub driver_id: Option<String>,
    /// From this fix time, RFC 3339 (default: 24 hours before `to`).
    pub from: Option<String>,
    /// Up to this fix time, RFC 3339 (default: now).
    pub to: Option<String>,
    /// At most this many, oldest first (default 1000, at most 10000).
    pub limit: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnomalyList {
    pub anomalies: Vec<AnomalyView>,
}

/// One anomaly, as the tenant sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnomalyView {
    #[serde(flatten)]
    pub anomaly: Anomaly,
}

fn time(name: &str, value: &Option<String>, errors: &mut Vec<FieldError>) -> Option<i64> {
    let text = value.as_deref()?;
    let parsed = parse_rfc3339(text);
    if parsed.is_none() {
        errors.push(FieldError::new(name, "must be an RFC 3339 date-time"));
    }
    parsed
}

/// Suspicious fixes of the caller's tenant, oldest first.
#[utoipa::path(get, path = "/v1/anomalies", tag = "drivers",
    params(AnomalyParams),
    responses(
        (status = 200, description = "Anomalies in the window", body = AnomalyList),
        (status = 401, description = "No valid API key", body = super::error::ErrorResponse),
        (status = 403, description = "Not a reader or admin key", body = super::error::ErrorResponse),
        (status = 422, description = "Invalid parameters, one detail per parameter", body = super::error::ErrorResponse),
        (status = 429, description = "Rate limited", body = super::error::ErrorResponse),
        (status = 503, description = "The anomaly log cannot be read now", body = super::error::ErrorResponse),
    ))]
pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(params): QueryParams<AnomalyParams>,
) -> Result<Json<AnomalyList>, ApiError> {
    let mut errors = Vec::new();
    if let Some(id) = &params.driver_id {
        check_driver_id(id)?;
    }
    let now = now_micros();
    let to = time("to", &params.to, &mut errors).unwrap_or(now);
    let from = time("from", &params.from, &mut errors).unwrap_or(to - 86_400_000_000);
    let limit = match params.limit.as_deref().map(str::parse::<usize>) {
        None => DEFAULT_LIMIT,
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            errors.push(FieldError::new(
                "limit",
                "must be an integer from 1 to 10000",
            ));
            DEFAULT_LIMIT
        }
    };
    if from > to {
        errors.push(FieldError::new("from", "must not be after `to`"));
    }
    if !errors.is_empty() {
        return Err(ApiError::fields(errors));
    }
    let log = state.trust.anomalies.clone();
    let tenant = anomaly_tenant(&caller.tenant).to_string();
    let driver = params.driver_id.clone();
    let found = tokio::task::spawn_blocking(move || {
        log.query(&tenant, driver.as_deref(), from, to, limit, now)
    })
    .await
    .map_err(|_| ApiError::Internal)?
    .map_err(|e| ApiError::StoreUnavailable(format!("anomaly log: {e}")))?;
    Ok(Json(AnomalyList {
        anomalies: found
            .into_iter()
            .map(|mut anomaly| {
                anomaly.tenant = caller.tenant.to_string();
                AnomalyView { anomaly }
            })
            .collect(),
    }))
}
