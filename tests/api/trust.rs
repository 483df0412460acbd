//! Trust over HTTP: API keys and roles, tenant isolation on every endpoint, rate limits, the GPS
//! sanity filters and anomalies, Idempotency-Key, request signing, open mode rules, admin keys.

use crate::contract::{Deployment, Store};
use crate::keys_cli::field;
use crate::streams::{next, subscribe};
use crate::support::*;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// A data directory with keys made by the real `fleettracker keys create`.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Creates a key; returns (token, signing secret if any).
    fn create(&self, tenant: &str, role: &str, extra: &[&str]) -> (String, Option<String>) {
        let out = Command::new(env!("CARGO_BIN_EXE_fleettracker"))
            .args(["keys", "create", "--tenant", tenant, "--role", role])
            .args(extra)
            .arg("--data-dir")
            .arg(self.dir.path())
            .output()
            .expect("keys create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let signing = text
            .contains("signing secret:")
            .then(|| field(&text, "signing secret:").to_string());
        (field(&text, "API key:").to_string(), signing)
    }

    fn serve(&self, extra: &[&str]) -> Server {
        self.serve_on(Store::Memory, extra).server
    }

    /// A server on `store` with these keys.
    fn serve_on(&self, store: Store, extra: &[&str]) -> Deployment {
        let dir = self.dir.path().to_str().unwrap().to_string();
        let mut args = vec!["--data-dir", dir.as_str()];
        args.extend_from_slice(extra);
        store.start(&args)
    }
}

fn auth(r: RequestBuilder, token: &str) -> RequestBuilder {
    r.header("authorization", format!("Bearer {token}"))
}

async fn post(s: &Server, token: &str, path: &str, body: &Value) -> reqwest::Response {
    auth(s.client.post(s.url(path)), token)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn get(s: &Server, token: &str, path: &str) -> reqwest::Response {
    auth(s.client.get(s.url(path)), token).send().await.unwrap()
}

fn at(lat: f64, lon: f64) -> Value {
    json!({"latitude": lat, "longitude": lon})
}

fn fix(id: &str, lat: f64, lon: f64) -> Value {
    let mut v = at(lat, lon);
    v["driver_id"] = json!(id);
    v
}

#[tokio::test]
async fn keys_and_roles_guard_every_endpoint() {
    let keys = Keys::new();
    let (device, _) = keys.create("acme", "device", &["--driver", "d1"]);
    let (reader, _) = keys.create("acme", "reader", &[]);
    let s = keys.serve(&[]);

    // Open endpoints stay open.
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert_eq!(s.get(path).await.status(), StatusCode::OK, "{path}");
    }
    // No key, a malformed one, an unknown one: 401 with the JSON envelope.
    let r = s.get("/v1/drivers/nearby?lat=1&lon=1").await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    for bad in [
        "nonsense",
        "ft_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let r = get(&s, bad, "/v1/stats").await;
        assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    let r = s.post_json("/v1/locations", &fix("d1", 31.2, 121.4)).await;
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;

    // A device writes its own drivers only, and reads nothing.
    assert_eq!(
        post(&s, &device, "/v1/locations", &fix("d1", 31.2, 121.4))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    let r = post(&s, &device, "/v1/locations", &fix("d2", 31.2, 121.4)).await;
    assert_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    let r = get(&s, &device, "/v1/drivers/d1").await;
    assert_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    // A reader reads and never writes.
    assert_eq!(
        get(&s, &reader, "/v1/drivers/d1").await.status(),
        StatusCode::OK
    );
    let r = post(&s, &reader, "/v1/locations", &fix("d1", 31.2, 121.4)).await;
    assert_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    let r = get(&s, &reader, "/v1/keys").await;
    assert_error(r, StatusCode::FORBIDDEN, "forbidden").await;
}

/// Tenant isolation holds whichever live store holds the positions.
#[tokio::test]
async fn tenants_never_see_each_other() {
    tenants_never_see_each_other_on(Store::Memory).await;
}

#[tokio::test]
async fn tenants_never_see_each_other_on_redis() {
    tenants_never_see_each_other_on(Store::Redis).await;
}

#[tokio::test]
async fn tenants_never_see_each_other_on_a_redis_cluster() {
    tenants_never_see_each_other_on(Store::RedisCluster).await;
}

async fn tenants_never_see_each_other_on(store: Store) {
    let keys = Keys::new();
    let (acme_device, _) = keys.create("acme", "device", &["--driver", "d1"]);
    let (acme_reader, _) = keys.create("acme", "reader", &[]);
    let (zeta_device, _) = keys.create("zeta", "device", &["--driver", "d1"]);
    let (zeta_reader, _) = keys.create("zeta", "reader", &[]);
    let (zeta_admin, _) = keys.create("zeta", "admin", &[]);
    let deployment = keys.serve_on(store, &[]);
    let s = &deployment.server;

    let (mut acme_ws, snapshot) = subscribe(
        s,
        &format!("bbox=121.0,31.0,122.0,32.0&access_token={acme_reader}"),
    )
    .await;
    assert!(snapshot.is_empty());
    // The same driver id in two tenants: two different drivers (zeta's through the batch endpoint).
    let batch = json!({"locations": [fix("d1", 31.30, 121.50)]});
    assert_eq!(
        post(s, &zeta_device, "/v1/locations/batch", &batch)
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post(s, &acme_device, "/v1/locations", &fix("d1", 31.20, 121.40))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    // Acme's subscriber hears of acme's d1 only (zeta's was posted first and is not delivered).
    let m = next(&mut acme_ws).await;
    assert_eq!(
        (m["driver_id"].as_str(), m["latitude"].as_f64()),
        (Some("d1"), Some(31.2)),
        "{m}"
    );

    let acme = json(get(s, &acme_reader, "/v1/drivers/d1").await).await;
    let zeta = json(get(s, &zeta_reader, "/v1/drivers/d1").await).await;
    assert_eq!(
        (acme["latitude"].as_f64(), zeta["latitude"].as_f64()),
        (Some(31.2), Some(31.3))
    );
    assert_eq!(acme["driver_id"], "d1");

    let near = json(
        get(
            s,
            &acme_reader,
            "/v1/drivers/nearby?lat=31.25&lon=121.45&radius_m=50000",
        )
        .await,
    )
    .await;
    let found: Vec<f64> = near["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["latitude"].as_f64().unwrap())
        .collect();
    assert_eq!(found, [31.2], "{near}");
    // A new subscriber's snapshot holds its tenant's drivers only.
    let (_ws, snapshot) = subscribe(
        s,
        &format!("bbox=121.0,31.0,122.0,32.0&access_token={acme_reader}"),
    )
    .await;
    let lats: Vec<f64> = snapshot
        .iter()
        .map(|d| d["latitude"].as_f64().unwrap())
        .collect();
    assert_eq!(lats, [31.2], "{snapshot:?}");

    for (token, lat) in [(&acme_reader, 31.2), (&zeta_reader, 31.3)] {
        let stats = json(get(s, token, "/v1/stats").await).await;
        assert_eq!(stats["drivers"]["total"], 1, "{stats}");
        assert_eq!(stats["updates_total"], 1, "{stats}");
        let from = (chrono::Utc::now() - chrono::Duration::minutes(5))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let track = json(get(s, token, &format!("/v1/drivers/d1/track?from={from}")).await).await;
        let lats: Vec<f64> = track["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["latitude"].as_f64().unwrap())
            .collect();
        assert_eq!(lats, [lat], "{track}");
        assert_eq!(track["driver_id"], "d1");
    }
    // Keys: an admin lists and revokes only its tenant's.
    let listed = json(get(s, &zeta_admin, "/v1/keys").await).await;
    assert!(
        listed["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["tenant"] == "zeta"),
        "{listed}"
    );
    let acme_key_id = acme_reader.split('_').nth(1).unwrap();
    let r = auth(
        s.client.delete(s.url(&format!("/v1/keys/{acme_key_id}"))),
        &zeta_admin,
    )
    .send()
    .await
    .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn admins_create_and_revoke_keys_over_the_api() {
    let keys = Keys::new();
    let (admin, _) = keys.create("acme", "admin", &[]);
    let s = keys.serve(&[]);
    let r = post(
        &s,
        &admin,
        "/v1/keys",
        &json!({"role": "device", "drivers": ["v1"], "name": "van 1"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created = json(r).await;
    let token = created["token"].as_str().unwrap().to_string();
    assert_eq!(created["key"]["tenant"], "acme");
    assert_eq!(
        post(&s, &token, "/v1/locations", &fix("v1", 31.2, 121.4))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    // Another tenant cannot be named.
    let r = post(
        &s,
        &admin,
        "/v1/keys",
        &json!({"role": "reader", "tenant": "zeta"}),
    )
    .await;
    assert_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    let r = post(&s, &admin, "/v1/keys", &json!({"role": "wizard"})).await;
    assert!(r.status().is_client_error());
    let id = created["key"]["id"].as_str().unwrap();
    let r = auth(s.client.delete(s.url(&format!("/v1/keys/{id}"))), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = post(&s, &token, "/v1/locations", &fix("v1", 31.2, 121.4)).await;
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // Revoking every key locks the server; it never falls back to open mode.
    let admin_id = admin.split('_').nth(1).unwrap();
    let r = auth(
        s.client.delete(s.url(&format!("/v1/keys/{admin_id}"))),
        &admin,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s.post_json("/v1/locations", &fix("v1", 31.2, 121.4)).await;
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let keys = Keys::new();
    let (device, _) = keys.create("acme", "device", &["--driver", "d1", "--driver", "d2"]);
    let (reader, _) = keys.create("acme", "reader", &[]);
    let s = keys.serve(&[
        "--device-burst",
        "5",
        "--device-rate",
        "1",
        "--reader-burst",
        "3",
        "--reader-rate",
        "1",
    ]);
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = post(
            &s,
            &device,
            "/v1/locations",
            &fix("d1", 31.2 + i as f64 * 1e-5, 121.4),
        )
        .await;
        statuses.push(r.status());
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(
                r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
            assert_error(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
        }
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::ACCEPTED)
            .count(),
        5,
        "{statuses:?}"
    );
    // Per driver: d2 has its own bucket.
    assert_eq!(
        post(&s, &device, "/v1/locations", &fix("d2", 31.2, 121.4))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    let mut limited = false;
    for _ in 0..5 {
        limited |= get(&s, &reader, "/v1/stats").await.status() == StatusCode::TOO_MANY_REQUESTS;
    }
    assert!(limited, "the reader key was never limited");
    let metrics = s.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("rate_limited_total"), "{metrics}");
}

#[tokio::test]
async fn sanity_filters_reject_count_and_record_anomalies() {
    let s = Server::start_filtered(&[], &[]);
    let now = chrono::Utc::now();
    let ts = |secs: i64| (now + chrono::Duration::seconds(secs)).to_rfc3339();
    let s = &s;
    let rejected = |body: Value| async move {
        let r = s.post_json("/v1/locations", &body).await;
        assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await
    };
    rejected(json!({"driver_id": "z", "latitude": 0.0, "longitude": 0.0})).await;
    rejected(json!({"driver_id": "f", "latitude": 1.0, "longitude": 1.0, "timestamp": ts(600)}))
        .await;
    rejected(
        json!({"driver_id": "o", "latitude": 1.0, "longitude": 1.0, "timestamp": ts(-3 * 86_400)}),
    )
    .await;
    // A car at 31.2 N, then 50 km further 10 s later: 18,000 km/h.
    s.report(
        json!({"driver_id": "car", "latitude": 31.2, "longitude": 121.4, "timestamp": ts(-20)}),
    )
    .await;
    let body = rejected(
        json!({"driver_id": "car", "latitude": 31.65, "longitude": 121.4, "timestamp": ts(-10)}),
    )
    .await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("km/h"),
        "{body}"
    );
    // The same fix twice: accepted both times, stored once.
    let same =
        json!({"driver_id": "car", "latitude": 31.2001, "longitude": 121.4, "timestamp": ts(-5)});
    s.report(same.clone()).await;
    s.report(same).await;
    let from =
        (now - chrono::Duration::minutes(5)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let track = json(s.get(&format!("/v1/drivers/car/track?from={from}")).await).await;
    assert_eq!(track["points"].as_array().unwrap().len(), 2, "{track}");

    let metrics = s.get("/metrics").await.text().await.unwrap();
    for reason in ["null_island", "future", "too_old", "impossible_speed"] {
        let line = format!("positions_rejected_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing");
    }
    eventually(
        Duration::from_secs(5),
        "the anomaly is recorded",
        || async {
            let found = json(s.get("/v1/anomalies?driver_id=car").await).await;
            found["anomalies"].as_array().is_some_and(|a| !a.is_empty())
        },
    )
    .await;
    let anomalies = json(s.get("/v1/anomalies?driver_id=car").await).await;
    let a = &anomalies["anomalies"][0];
    assert_eq!(a["kind"], "impossible_speed", "{a}");
    assert!(a["implied_speed_mps"].as_f64().unwrap() > 1000.0);
    let none = json(s.get("/v1/anomalies?driver_id=z").await).await;
    assert!(none["anomalies"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer() {
    let s = Server::start();
    let body = json!({"locations": [fix("i1", 31.2, 121.4), fix("i2", 31.3, 121.5)]});
    let send = |body: Value, key: &'static str| {
        s.client
            .post(s.url("/v1/locations/batch"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let first = send(body.clone(), "req-1").await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first = first.text().await.unwrap();
    let again = send(body.clone(), "req-1").await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), first);
    let stats = json(s.get("/v1/stats").await).await;
    assert_eq!(stats["updates_total"], 2, "applied once: {stats}");
    let other = json!({"locations": [fix("i3", 31.2, 121.4)]});
    let r = send(other, "req-1").await.unwrap();
    assert_error(
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    let r = s
        .client
        .post(s.url("/v1/locations"))
        .header("idempotency-key", "k".repeat(300))
        .json(&fix("i4", 1.0, 1.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn signed_devices_must_sign_their_writes() {
    let keys = Keys::new();
    let (device, secret) = keys.create("acme", "device", &["--driver", "s1", "--signing"]);
    let secret = secret.expect("signing secret");
    let s = keys.serve(&[]);
    let body = fix("s1", 31.2, 121.4).to_string();
    let send = |signature: Option<String>, timestamp: String| {
        let mut r = auth(s.client.post(s.url("/v1/locations")), &device)
            .header("content-type", "application/json")
            .header("x-signature-timestamp", timestamp)
            .body(body.clone());
        if let Some(sig) = signature {
            r = r.header("x-signature", sig);
        }
        r.send()
    };
    let now = chrono::Utc::now().timestamp().to_string();
    let r = send(None, now.clone()).await.unwrap();
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let good = fleettracker::trust::signing::sign(&secret, &now, body.as_bytes());
    assert_eq!(
        send(Some(good), now.clone()).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    let stale = (chrono::Utc::now().timestamp() - 600).to_string();
    let old = fleettracker::trust::signing::sign(&secret, &stale, body.as_bytes());
    let r = send(Some(old), stale).await.unwrap();
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let forged = fleettracker::trust::signing::sign("fts_wrong", &now, body.as_bytes());
    let r = send(Some(forged), now).await.unwrap();
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[tokio::test]
async fn signed_devices_must_sign_their_ingest_socket() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};
    let keys = Keys::new();
    let (device, secret) = keys.create("acme", "device", &["--driver", "s1", "--signing"]);
    let secret = secret.expect("signing secret");
    let s = keys.serve(&[]);
    let open = |signature: Option<(String, String)>| {
        let mut request = format!("ws://{}/v1/ingest?access_token={device}", s.addr)
            .into_client_request()
            .unwrap();
        if let Some((timestamp, sig)) = signature {
            let headers = request.headers_mut();
            headers.insert("x-signature-timestamp", timestamp.parse().unwrap());
            headers.insert("x-signature", sig.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
    };
    let refused = |result: Result<_, WsError>| match result {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP answer, got {other}"),
        Ok(_) => panic!("an unsigned or badly signed socket was opened"),
    };

    // The bearer token alone does not open a socket, nor does a signature by another secret.
    assert_eq!(refused(open(None).await), 401);
    let now = chrono::Utc::now().timestamp().to_string();
    let forged = fleettracker::trust::signing::sign("fts_wrong", &now, b"");
    assert_eq!(refused(open(Some((now.clone(), forged))).await), 401);
    let stale = (chrono::Utc::now().timestamp() - 600).to_string();
    let old = fleettracker::trust::signing::sign(&secret, &stale, b"");
    assert_eq!(refused(open(Some((stale, old))).await), 401);

    // A signed upgrade opens it, and its messages are applied.
    let good = fleettracker::trust::signing::sign(&secret, &now, b"");
    let (mut socket, _) = open(Some((now, good))).await.expect("signed socket");
    socket
        .send(Message::text(fix("s1", 31.2, 121.4).to_string()))
        .await
        .unwrap();
    let ack = next(&mut socket).await;
    assert_eq!(ack["accepted"], 1, "{ack}");
}

#[test]
fn open_mode_refuses_a_public_address_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args(["serve", "--listen", "0.0.0.0:0", "--fsync", "off"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--allow-open"), "{stderr}");
}

#[tokio::test]
async fn open_mode_warns_and_serves_on_loopback_or_when_allowed() {
    let s = Server::start_with(&["--listen", "0.0.0.0:0", "--allow-open"], &[]);
    s.wait_log(Duration::from_secs(5), |l| l.contains("OPEN MODE"));
    assert_eq!(s.get("/health").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn instances_share_keys_through_a_keys_directory() {
    let keys = Keys::new();
    let (reader, _) = keys.create("acme", "reader", &[]);
    let shared = keys.dir.path().to_str().unwrap().to_string();
    // Two servers with their own data directories and one keys directory.
    let a = Server::start_with(&["--keys-dir", &shared], &[]);
    let b = Server::start_with(&["--keys-dir", &shared], &[]);
    for s in [&a, &b] {
        assert_eq!(get(s, &reader, "/v1/stats").await.status(), StatusCode::OK);
        assert_error(
            s.get("/v1/stats").await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        )
        .await;
    }
    // A key made later is picked up by both.
    let (late, _) = keys.create("acme", "reader", &[]);
    for s in [&a, &b] {
        eventually(Duration::from_secs(10), "the new key works", || async {
            get(s, &late, "/v1/stats").await.status() == StatusCode::OK
        })
        .await;
    }
}

#[tokio::test]
async fn metrics_can_require_a_key() {
    let keys = Keys::new();
    let (reader, _) = keys.create("acme", "reader", &[]);
    let s = keys.serve(&["--metrics-key-required"]);
    assert_error(
        s.get("/metrics").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_eq!(get(&s, &reader, "/metrics").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn tenants_are_isolated_on_sse_device_sockets_and_anomalies() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let keys = Keys::new();
    let (acme_device, _) = keys.create("acme", "device", &["--driver", "d1"]);
    let (acme_reader, _) = keys.create("acme", "reader", &[]);
    let (zeta_device, _) = keys.create("zeta", "device", &["--driver", "d1"]);
    let (zeta_reader, _) = keys.create("zeta", "reader", &[]);
    // The impossible-speed filter stays on: it makes the anomaly.
    let s = keys.serve(&["--no-filter", "too-old"]);

    // A device socket writes in its own tenant only.
    let (mut device, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/ingest?access_token={acme_device}",
        s.addr
    ))
    .await
    .expect("device socket");
    device
        .send(Message::text(fix("d1", 31.2, 121.4).to_string()))
        .await
        .unwrap();
    let ack = next(&mut device).await;
    assert_eq!(ack["accepted"], 1, "{ack}");
    let r = get(&s, &zeta_reader, "/v1/drivers/d1").await;
    assert_error(r, StatusCode::NOT_FOUND, "not_found").await;

    // SSE: zeta's subscriber sees none of acme's drivers, then only its own updates.
    let mut sse = crate::streams::Sse::open(
        &s,
        &format!("bbox=121.0,31.0,122.0,32.0&access_token={zeta_reader}"),
    )
    .await;
    let snapshot = sse.next().await;
    assert_eq!(snapshot["drivers"], json!([]), "{snapshot}");
    post(
        &s,
        &acme_device,
        "/v1/locations",
        &fix("d1", 31.2001, 121.4),
    )
    .await;
    post(&s, &zeta_device, "/v1/locations", &fix("d1", 31.5, 121.5)).await;
    let m = sse.next().await;
    assert_eq!(m["latitude"], 31.5, "{m}");

    // Anomalies: zeta's impossible jump is zeta's alone.
    let r = post(&s, &zeta_device, "/v1/locations", &fix("d1", 35.0, 121.5)).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    eventually(
        Duration::from_secs(5),
        "zeta's anomaly is recorded",
        || async {
            let found = json(get(&s, &zeta_reader, "/v1/anomalies").await).await;
            found["anomalies"].as_array().is_some_and(|a| a.len() == 1)
        },
    )
    .await;
    let acme = json(get(&s, &acme_reader, "/v1/anomalies").await).await;
    assert_eq!(acme["anomalies"], json!([]), "{acme}");
}

/// `--cors-origin`: a browser app on an allowed origin gets its preflight answered without a key
/// (browsers send none), and every answer, errors included, carries the CORS headers; the key is
/// still checked on the real request. Other origins, and servers without the flag, get none.
#[tokio::test]
async fn cors_lets_the_named_origins_in_and_still_checks_keys() {
    let keys = Keys::new();
    let (reader, _) = keys.create("acme", "reader", &[]);
    let dispatch = "https://dispatch.example";
    let s = keys.serve(&["--cors-origin", dispatch]);
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str, url: String| {
        client
            .request(reqwest::Method::OPTIONS, url)
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
    };
    let r = preflight(dispatch, s.url("/v1/stats"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
    };
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(dispatch)
    );
    let allowed = header(&r, "access-control-allow-headers").unwrap_or_default();
    assert!(
        allowed.contains("authorization") && allowed.contains("idempotency-key"),
        "{allowed}"
    );

    let get = |origin: &'static str| client.get(s.url("/v1/stats")).header("origin", origin);
    let r = get(dispatch).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "the key is still required"
    );
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(dispatch)
    );
    let r = auth(get(dispatch), &reader).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(dispatch)
    );
    let exposed = header(&r, "access-control-expose-headers").unwrap_or_default();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("link"),
        "{exposed}"
    );

    let r = auth(get("https://evil.example"), &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "access-control-allow-origin"), None);

    let plain = Server::start();
    let r = preflight(dispatch, plain.url("/v1/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::METHOD_NOT_ALLOWED,
        "no CORS without the flag"
    );
    assert_eq!(header(&r, "access-control-allow-origin"), None);
}
