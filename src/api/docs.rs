//! `GET /openapi.json` (OpenAPI 3.1, generated from the handlers' annotations, so it cannot drift
//! from the code) and `GET /docs` (Swagger UI, vendored into the binary: no CDN, no download).

use super::{drivers, error, ingest, locations, ops, socket, stream, track};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "FleetTracker",
        description = "Real-time fleet location service: report positions, find the nearest drivers, read a driver's latest state, follow drivers live."
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
    )
)]
pub struct ApiDoc;

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
