//! The simulator against a real server: it reports its virtual drivers and prints its table.

use crate::support::*;
use std::process::Command;

fn simulate(base: &str, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args([
            "simulate",
            "--url",
            base,
            "--drivers",
            "40",
            "--interval",
            "200ms",
            "--duration",
            "1s",
            "--quiet",
        ])
        .args(extra)
        .output()
        .expect("run simulate");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn table_value(table: &str, row: &str) -> Option<u64> {
    let line = table.lines().find(|l| l.starts_with(row))?;
    line[row.len()..]
        .split_whitespace()
        .next()?
        .replace(',', "")
        .parse()
        .ok()
}

#[tokio::test]
async fn simulated_drivers_reach_the_server() {
    let s = Server::start();
    for extra in [&[][..], &["--batch", "10"], &["--rate", "100"]] {
        let (ok, table, stderr) = simulate(&s.base, extra);
        assert!(ok, "simulate {extra:?} failed: {stderr}\n{table}");
        for row in [
            "requests sent",
            "errors",
            "achieved rate",
            "latency p50",
            "latency p90",
            "latency p99",
            "latency p99.9",
            "latency max",
        ] {
            assert!(table.contains(row), "{row} missing:\n{table}");
        }
        assert_eq!(table_value(&table, "errors"), Some(0), "{table}");
        assert!(
            table_value(&table, "requests sent").unwrap_or(0) > 0,
            "{table}"
        );
    }
    let stats = json(s.get("/v1/stats").await).await;
    assert_eq!(stats["drivers"]["total"], 40, "{stats}");
    assert!(
        stats["updates_total"].as_u64().unwrap() >= 40 * 3,
        "{stats}"
    );
    let d = json(s.get("/v1/drivers/sim-000007").await).await;
    assert!(
        d["latitude"]
            .as_f64()
            .is_some_and(|lat| (31.13..=31.33).contains(&lat)),
        "{d}"
    );
}

#[test]
fn simulate_fails_fast_without_a_server() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (ok, _, stderr) = simulate(&format!("http://127.0.0.1:{port}"), &[]);
    assert!(!ok);
    assert!(stderr.contains("cannot reach server"), "{stderr}");
}
