//! `/v1/keys`: admin keys manage the keys of their own tenant (create, list, revoke). The secret of
//! a new key is in the creation answer only; the store keeps its hash.
//!
//! The first key is made with `fleettracker keys create` on the server's machine: in open mode (no
//! key yet) nobody is authenticated, so the API refuses to create keys (403) rather than let
//! whoever reaches the port first own the service.

use super::auth::Caller;
use super::error::ApiError;
use super::extract::JsonBody;
use super::AppState;
use crate::trust::keys::{KeyInfo, KeyStoreError, Role};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub role: Role,
    /// Device keys: the driver ids it may report (up to 10,000).
    #[serde(default)]
    pub drivers: Vec<String>,
    /// A label for people.
    pub name: Option<String>,
    /// Device keys: also create a signing secret; requests must then carry `X-Signature`.
    #[serde(default)]
    pub signing: bool,
    /// The caller's tenant (the only one an admin key manages); may be omitted.
    pub tenant: Option<String>,
}

/// The new key, with its secrets: shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub key: KeyInfo,
    /// `Authorization: Bearer <token>`.
    pub token: String,
    /// HMAC-SHA256 key for `X-Signature`, if requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyInfo>,
}

fn store_error(e: KeyStoreError) -> ApiError {
    match e {
        KeyStoreError::NotFound(id) => ApiError::NotFound(format!("no key with id {id}")),
        KeyStoreError::Io { .. } | KeyStoreError::Corrupt { .. } => {
            tracing::error!(error = %e, "key store failure");
            ApiError::StoreUnavailable("the key store cannot be written now".into())
        }
        other => ApiError::validation(other.to_string(), vec![]),
    }
}

/// Create a key in the caller's tenant.
#[utoipa::path(post, path = "/v1/keys", tag = "keys",
    request_body = CreateKey,
    responses(
        (status = 201, description = "Created; the token is shown only now", body = CreatedKey),
        (status = 400, description = "Not JSON", body = super::error::ErrorResponse),
        (status = 401, description = "No valid API key", body = super::error::ErrorResponse),
        (status = 403, description = "Not an admin key, another tenant, or open mode (create the first key with the CLI)", body = super::error::ErrorResponse),
        (status = 413, description = "Body over 1 MiB", body = super::error::ErrorResponse),
        (status = 415, description = "Not application/json", body = super::error::ErrorResponse),
        (status = 422, description = "Invalid role, drivers, name or tenant", body = super::error::ErrorResponse),
        (status = 429, description = "Rate limited", body = super::error::ErrorResponse),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Caller(caller): Caller,
    JsonBody(input): JsonBody<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    if caller.tenant.is_empty() {
        return Err(ApiError::Forbidden(
            "no API key exists yet: create the first admin key with `fleettracker keys create`"
                .into(),
        ));
    }
    if input
        .tenant
        .as_deref()
        .is_some_and(|t| t != caller.tenant.as_str())
    {
        return Err(ApiError::Forbidden(
            "an admin key manages only its own tenant".into(),
        ));
    }
    let tenant = caller.tenant.to_string();
    let trust = state.trust.clone();
    let (key, secrets) = tokio::task::spawn_blocking(move || {
        let drivers: Vec<&str> = input.drivers.iter().map(String::as_str).collect();
        let created = trust.keys().create(
            &tenant,
            input.role,
            &drivers,
            input.name.as_deref(),
            input.signing,
        );
        trust.keys_changed();
        created
    })
    .await
    .map_err(|_| ApiError::Internal)?
    .map_err(store_error)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key: key.info(),
            token: secrets.token,
            signing_secret: secrets.signing_secret,
        }),
    ))
}

/// The keys of the caller's tenant (never their secrets).
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses(
        (status = 200, description = "Keys of the caller's tenant", body = KeyList),
        (status = 401, description = "No valid API key", body = super::error::ErrorResponse),
        (status = 403, description = "Not an admin key", body = super::error::ErrorResponse),
        (status = 429, description = "Rate limited", body = super::error::ErrorResponse),
    ))]
pub async fn list(State(state): State<AppState>, Caller(caller): Caller) -> Json<KeyList> {
    let tenant = (!caller.tenant.is_empty()).then_some(caller.tenant.as_str());
    Json(KeyList {
        keys: state.trust.keys().list(tenant),
    })
}

/// Revoke a key of the caller's tenant; requests with it are refused from now on.
#[utoipa::path(delete, path = "/v1/keys/{key_id}", tag = "keys",
    params(("key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "Revoked", body = KeyInfo),
        (status = 401, description = "No valid API key", body = super::error::ErrorResponse),
        (status = 403, description = "Not an admin key", body = super::error::ErrorResponse),
        (status = 404, description = "No such key in the caller's tenant", body = super::error::ErrorResponse),
        (status = 429, description = "Rate limited", body = super::error::ErrorResponse),
    ))]
pub async fn revoke(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(key_id): Path<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    let visible = state
        .trust
        .keys()
        .get(&key_id)
        .is_some_and(|k| caller.tenant.is_empty() || k.tenant == caller.tenant);
    if !visible {
        return Err(ApiError::NotFound(format!("no key with id {key_id}")));
    }
    let trust = state.trust.clone();
    let info = tokio::task::spawn_blocking(move || {
        let revoked = trust.keys().revoke(&key_id);
        trust.keys_changed();
        revoked
    })
    .await
    .map_err(|_| ApiError::Internal)?
    .map_err(store_error)?;
    Ok(Json(info))
}
