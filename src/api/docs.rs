//! `GET /openapi.json` (OpenAPI 3.1, generated from the handlers' annotations, so it cannot drift
//! from the code) and `GET /docs` (Swagger UI, vendored into the binary: no CDN, no download).

use super::{anomalies, drivers, error, ingest, keys, locations, ops, socket, stream, track};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "FleetTracker",
        description = "Real-time fleet location service: report positions, find the nearest drivers, read a driver's latest state, follow drivers live.\n\n\
Authentication: `Authorization: Bearer <API key>` (stream endpoints also take `?access_token=`). Keys have a role \
(`admin`, `reader`, `device`) and a tenant; a tenant sees only its own drivers. Without a valid key the answer \
is 401 `unauthorized`; a role or driver the key does not cover is 403 `forbidden`; past a key's rate limit, 429 \
`rate_limited` with `Retry-After`. While no key exists the server runs in open mode (loopback only unless \
`--allow-open`) and none of these apply. POST endpoints accept `Idempotency-Key`; device keys with a signing \
secret must send `X-Signature` and `X-Signature-Timestamp`."
    ),
    paths(
        locations::post_location,
        locations::post_batch,
        drivers::nearby,
        drivers::get_driver,
        stream::stream_ws,
        stream::stream_sse,
        ingest::ingest,
        track::track,
        ops::stats,
        ops::health,
        ops::ready,
        ops::metrics,
        anomalies::list,
        keys::create,
        keys::list,
        keys::revoke,
    ),
    components(schemas(
        error::ErrorResponse,
        error::ErrorBody,
        crate::domain::FieldError,
        crate::hub::message::PositionMessage,
        crate::hub::message::RemovedMessage,
        crate::hub::message::SnapshotMessage,
        crate::hub::message::DriverView,
        crate::hub::RemovedReason,
        socket::ErrorMessage,
        ingest::IngestAck,
    )),
    tags(
        (name = "locations", description = "Position reports from devices"),
        (name = "drivers", description = "Queries of the live state"),
        (name = "streams", description = "Live positions pushed over WebSocket or Server-Sent Events"),
        (name = "ops", description = "Health, readiness, metrics and counts"),
        (name = "keys", description = "API keys of the caller's tenant (admin keys)"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
