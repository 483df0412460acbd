//! Every documented error code, with the JSON envelope, and nothing accepted by a failed request.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn malformed_json_is_400() {
    let s = Server::start();
    for body in [
        &b"{"[..],
        b"{\"driver_id\": }",
        b"",
        b"not json",
        b"{\"a\":1} trailing",
    ] {
        let r = s
            .post_raw("/v1/locations", Some("application/json"), body.to_vec())
            .await;
        assert_error(r, StatusCode::BAD_REQUEST, "malformed_json").await;
    }
    let r = s
        .post_raw(
            "/v1/locations/batch",
            Some("application/json"),
            b"[1,".to_vec(),
        )
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "malformed_json").await;
    assert_eq!(json(s.get("/v1/stats").await).await["updates_total"], 0);
}

/// Valid JSON that is not an object is a 422 saying what it got (not serde's words about our types,
/// nor an array read as a position's fields in order), and nothing is applied.
#[tokio::test]
async fn a_body_that_is_not_an_object_says_what_it_is() {
    let s = Server::start();
    for (path, body, kind) in [
        ("/v1/locations/batch", "[]", "an array"),
        ("/v1/locations", " [{\"driver_id\":\"a\"}]", "an array"),
        // serde reads an array as a struct's fields in order: this was taken as a position.
        ("/v1/locations", "[\"drv-x\", 31.2, 121.4]", "an array"),
        ("/v1/locations", "\"text\"", "a string"),
        ("/v1/locations", "42", "a number"),
        ("/v1/locations/batch", "null", "null"),
        ("/v1/locations", "true", "a boolean"),
    ] {
        let r = s
            .post_raw(path, Some("application/json"), body.as_bytes().to_vec())
            .await;
        let error = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert_eq!(
            error["error"]["message"],
            format!("request body must be a JSON object, got {kind}"),
            "{body}"
        );
    }
    assert_eq!(json(s.get("/v1/stats").await).await["updates_total"], 0);
}

#[tokio::test]
async fn validation_errors_are_422_with_one_detail_per_field() {
    let s = Server::start();
    let r = s
        .post_json(
            "/v1/locations",
            &json!({"driver_id": "ok", "latitude": -91, "longitude": "x", "status": "napping",
                    "timestamp": "2099-01-01T00:00:00Z", "speed_mps": -1, "heading_deg": 360, "accuracy_m": -0.5}),
        )
        .await;
    let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(
        detail_fields(&body),
        [
            "latitude",
            "longitude",
            "status",
            "timestamp",
            "speed_mps",
            "heading_deg",
            "accuracy_m"
        ]
    );
    for d in body["error"]["details"].as_array().unwrap() {
        assert!(d["message"].as_str().unwrap().len() > 3);
    }
    for (bad, field) in [
        (json!({"latitude": 1, "longitude": 1}), "driver_id"),
        (
            json!({"driver_id": "", "latitude": 1, "longitude": 1}),
            "driver_id",
        ),
        (
            json!({"driver_id": "a/b", "latitude": 1, "longitude": 1}),
            "driver_id",
        ),
        (
            json!({"driver_id": "x".repeat(65), "latitude": 1, "longitude": 1}),
            "driver_id",
        ),
        (
            json!({"driver_id": 7, "latitude": 1, "longitude": 1}),
            "driver_id",
        ),
        (json!({"driver_id": "a", "longitude": 1}), "latitude"),
        (
            json!({"driver_id": "a", "latitude": 1, "longitude": 180.5}),
            "longitude",
        ),
        (
            json!({"driver_id": "a", "latitude": 1, "longitude": 1, "timestamp": "yesterday"}),
            "timestamp",
        ),
        (
            json!({"driver_id": "a", "latitude": 1, "longitude": 1, "status": 1}),
            "status",
        ),
    ] {
        let r = s.post_json("/v1/locations", &bad).await;
        let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert_eq!(detail_fields(&body), [field], "{bad}");
    }
    // JSON that is not an object at all.
    let r = s.post_json("/v1/locations", &json!([1, 2])).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(json(s.get("/v1/stats").await).await["updates_total"], 0);
}

#[tokio::test]
async fn batch_limits_are_422() {
    let s = Server::start();
    let one = json!({"driver_id": "a", "latitude": 1, "longitude": 1});
    let too_many = json!({"locations": vec![one.clone(); 1001]});
    for body in [
        json!({"locations": []}),
        too_many,
        json!({}),
        json!({"locations": "many"}),
    ] {
        let r = s.post_json("/v1/locations/batch", &body).await;
        assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }
    let none_valid = json!({"locations": [{"driver_id": "a"}, {"latitude": 100, "longitude": 1, "driver_id": "b"}]});
    let r = s.post_json("/v1/locations/batch", &none_valid).await;
    let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(
        detail_fields(&body),
        [
            "locations[0].latitude",
            "locations[0].longitude",
            "locations[1].latitude"
        ]
    );
    assert_eq!(json(s.get("/v1/stats").await).await["updates_total"], 0);
}

#[tokio::test]
async fn bodies_over_one_mebibyte_are_413() {
    let s = Server::start();
    let padding = "x".repeat(1024 * 1024);
    let body = format!(r#"{{"driver_id":"a","latitude":1,"longitude":1,"pad":"{padding}"}}"#);
    let r = s
        .post_raw("/v1/locations", Some("application/json"), body.into_bytes())
        .await;
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    // Just under the limit is fine.
    let padding = "x".repeat(1024 * 1024 - 100);
    let body = format!(r#"{{"driver_id":"a","latitude":1,"longitude":1,"pad":"{padding}"}}"#);
    let r = s
        .post_raw("/v1/locations", Some("application/json"), body.into_bytes())
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn non_json_media_types_are_415() {
    let s = Server::start();
    let body = br#"{"driver_id":"a","latitude":1,"longitude":1}"#.to_vec();
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let r = s.post_raw("/v1/locations", ct, body.clone()).await;
        assert_error(
            r,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        let r = s.post_raw("/v1/locations/batch", ct, body.clone()).await;
        assert_error(
            r,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
    }
    let r = s
        .post_raw(
            "/v1/locations",
            Some("application/json; charset=utf-8"),
            body,
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let s = Server::start();
    assert_error(
        s.get("/v2/anything").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_error(s.get("/nope").await, StatusCode::NOT_FOUND, "not_found").await;
    assert_error(
        s.get("/v1/locations").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    let r = s
        .client
        .delete(s.url("/v1/drivers/a"))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    let r = s.post_json("/v1/stats", &json!({})).await;
    assert_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let s = Server::start();
    let r = s
        .client
        .get(s.url("/health"))
        .header("x-request-id", "trace-abc-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-abc-1");
    let a = s.get("/health").await.headers()["x-request-id"].clone();
    let b = s.get("/nope").await.headers()["x-request-id"].clone();
    assert!(!a.is_empty() && a != b);
    let r = s
        .post_raw("/v1/locations", Some("text/plain"), vec![])
        .await;
    assert!(r.headers().contains_key("x-request-id"));
}
