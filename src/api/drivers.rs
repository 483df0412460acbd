//! `GET /v1/drivers/nearby` and `GET /v1/drivers/{driver_id}`: what dispatch asks.

use super::auth::Caller;
use super::error::ApiError;
use super::extract::QueryParams;
use super::AppState;
use crate::domain::position::is_valid_driver_id;
use crate::domain::tenant;
use crate::domain::{format_rfc3339, FieldError, Status, StatusSet};
use crate::hub::message::DriverView;
use crate::live::{NearbyHit, NearbyQuery};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub const MAX_RADIUS_M: f64 = 100_000.0;
pub const MAX_LIMIT: usize = 1000;

/// Query parameters of a nearby search, as text: each is checked and reported by name.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NearbyParams {
    /// Latitude of the point, −90..90.
    #[param(value_type = f64, required = true)]
    pub lat: Option<String>,
    /// Longitude of the point, −180..180.
    #[param(value_type = f64, required = true)]
    pub lon: Option<String>,
    /// Search radius in metres, 1..100000 (default 1000).
    #[param(value_type = Option<f64>)]
    pub radius_m: Option<String>,
    /// Most drivers returned, 1..1000 (default 50).
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// Comma-separated statuses to include (default `online,busy`; offline drivers are never returned).
    #[param(value_type = Option<String>, example = "online,busy")]
    pub status: Option<String>,
}

/// One nearby driver.
#[derive(Debug, Serialize, ToSchema)]
pub struct NearbyDriver {
    pub driver_id: String,
    pub latitude: f64,
    pub longitude: f64,
    /// Great-circle distance from the point, metres (to the centimetre).
    pub distance_m: f64,
    pub status: Status,
    #[schema(format = DateTime)]
    pub timestamp: String,
}

/// Nearest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct NearbyResponse {
    pub drivers: Vec<NearbyDriver>,
}

impl From<NearbyHit> for NearbyDriver {
    fn from(h: NearbyHit) -> Self {
        NearbyDriver {
            driver_id: crate::domain::tenant::external(&h.driver_id).into(),
            latitude: h.lat_e6 as f64 / 1e6,
            longitude: h.lon_e6 as f64 / 1e6,
            distance_m: (h.distance_m * 100.0).round() / 100.0,
            status: h.status,
            timestamp: format_rfc3339(h.timestamp),
        }
    }
}

/// Parses a number parameter within `min..=max`, recording an error by name when it is not one.
pub(super) fn number_param(
    errors: &mut Vec<FieldError>,
    name: &str,
    value: Option<&str>,
    default: Option<f64>,
    (min, max): (f64, f64),
) -> f64 {
    let Some(text) = value else {
        return default.unwrap_or_else(|| {
            errors.push(FieldError::new(name, "is required"));
            0.0
        });
    };
    match text.trim().parse::<f64>() {
        Ok(v) if (min..=max).contains(&v) => v,
        Ok(_) => {
            errors.push(FieldError::new(
                name,
                format!("must be between {min} and {max}, got {text}"),
            ));
            0.0
        }
        Err(_) => {
            errors.push(FieldError::new(
                name,
                format!("must be a number, got {text:?}"),
            ));
            0.0
        }
    }
}

pub(super) fn status_param(errors: &mut Vec<FieldError>, value: Option<&str>) -> StatusSet {
    let Some(text) = value else {
        return StatusSet::WORKING;
    };
    let mut set = StatusSet::empty();
    for part in text.split(',').map(str::trim) {
        match Status::parse(part) {
            Some(s) => set.insert(s),
            None => {
                errors.push(FieldError::new(
                    "status",
                    format!("must be a comma list of online, busy, offline; got {part:?}"),
                ));
                return set;
            }
        }
    }
    set
}

impl NearbyParams {
    /// Checks every parameter; on failure one detail per bad parameter.
    pub fn to_query(&self) -> Result<NearbyQuery, ApiError> {
        let mut errors = Vec::new();
        let lat = number_param(&mut errors, "lat", self.lat.as_deref(), None, (-90.0, 90.0));
        let lon = number_param(
            &mut errors,
            "lon",
            self.lon.as_deref(),
            None,
            (-180.0, 180.0),
        );
        let radius_m = number_param(
            &mut errors,
            "radius_m",
            self.radius_m.as_deref(),
            Some(1000.0),
            (1.0, MAX_RADIUS_M),
        );
        let limit = number_param(
            &mut errors,
            "limit",
            self.limit.as_deref(),
            Some(50.0),
            (1.0, MAX_LIMIT as f64),
        );
        if limit.fract() != 0.0 {
            errors.push(FieldError::new("limit", "must be a whole number"));
        }
        let statuses = status_param(&mut errors, self.status.as_deref());
        if !errors.is_empty() {
            let message = errors
                .iter()
                .map(|e| format!("{} {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ApiError::validation(message, errors));
        }
        Ok(NearbyQuery {
            lat_e6: (lat * 1e6).round() as i32,
            lon_e6: (lon * 1e6).round() as i32,
            radius_m,
            limit: limit as usize,
            statuses,
        })
    }
}

/// A driver id from a path, checked like a reported one (422 naming `driver_id` when invalid).
pub fn check_driver_id(driver_id: &str) -> Result<(), ApiError> {
    if is_valid_driver_id(driver_id) {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "driver_id",
            "must be 1-64 characters of A-Z a-z 0-9 _ . : @ -",
        ))
    }
}

/// The nearest drivers to a point within a radius, nearest first.
#[utoipa::path(
    get, path = "/v1/drivers/nearby", tag = "drivers",
    params(NearbyParams),
    responses(
        (status = 200, description = "Exactly the nearest `limit` matching drivers inside the radius", body = NearbyResponse),
        (status = 422, description = "Invalid parameters, one detail per parameter", body = super::error::ErrorResponse),
    )
)]
pub async fn nearby(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(params): QueryParams<NearbyParams>,
) -> Result<Json<NearbyResponse>, ApiError> {
    let query = params.to_query()?;
    let tenant = tenant::prefix(&caller.tenant);
    let drivers = state
        .tracker
        .nearby(&query, tenant.as_deref())
        .await?
        .into_iter()
        .map(NearbyDriver::from)
        .collect();
    Ok(Json(NearbyResponse { drivers }))
}

/// A driver's latest state.
#[utoipa::path(
    get, path = "/v1/drivers/{driver_id}", tag = "drivers",
    params(("driver_id" = String, Path, description = "The driver's id")),
    responses(
        (status = 200, description = "Latest state", body = DriverView),
        (status = 404, description = "Unknown, or silent for longer than the driver TTL", body = super::error::ErrorResponse),
        (status = 422, description = "Not a valid driver id", body = super::error::ErrorResponse),
    )
)]
pub async fn get_driver(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(driver_id): Path<String>,
) -> Result<Response, ApiError> {
    check_driver_id(&driver_id)?;
    state
        .tracker
        .driver(&tenant::internal(&caller.tenant, &driver_id))
        .await?
        .map(|p| Json(DriverView::from(&p)).into_response())
        .ok_or_else(|| {
            ApiError::NotFound(format!("driver {driver_id} is not known or has expired"))
        })
}
