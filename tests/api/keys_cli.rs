//! `fleettracker keys`: the real binary creates a key (printing the secret once), lists it without
//! the secret, and revokes it.

use std::process::Command;

fn keys(data_dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .arg("keys")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run fleettracker keys");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// The value after `label` on a line of `keys create`'s output.
pub(crate) fn field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(label))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{label} missing in {text}"))
}

#[test]
fn create_list_revoke_with_the_binary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ok, created, err) = keys(
        dir.path(),
        &[
            "create",
            "--tenant",
            "acme",
            "--role",
            "device",
            "--driver",
            "drv-1",
            "--signing",
        ],
    );
    assert!(ok, "create failed: {err}");
    let id = field(&created, "key id:").to_string();
    let token = field(&created, "API key:").to_string();
    let signing = field(&created, "signing secret:").to_string();
    // The secret is everything after the id: base64url, so it may hold '_' itself.
    let secret = token
        .strip_prefix(&format!("ft_{id}_"))
        .unwrap_or_else(|| panic!("token without its id: {created}"));
    assert!(secret.len() >= 40, "{created}");

    let (ok, listed, err) = keys(dir.path(), &["list", "--json"]);
    assert!(ok, "list failed: {err}");
    let list: serde_json::Value = serde_json::from_str(&listed).expect("list --json is JSON");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["role"], "device");
    assert_eq!(list[0]["drivers"][0], "drv-1");
    assert!(list[0]["revoked_at"].is_null());
    assert!(!listed.contains(secret) && !listed.contains(&signing));
    let (_, table, _) = keys(dir.path(), &["list", "--tenant", "acme"]);
    assert!(table.contains(&id) && !table.contains(secret));

    // The file holds a hash, not the secret, and is private.
    let file = std::fs::read_to_string(dir.path().join("keys.json")).expect("keys.json");
    assert!(!file.contains(secret));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("keys.json"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let (ok, revoked, err) = keys(dir.path(), &["revoke", &id]);
    assert!(ok, "revoke failed: {err}");
    assert!(revoked.contains(&id));
    let (_, listed, _) = keys(dir.path(), &["list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
    assert!(list[0]["revoked_at"].is_string());

    let (ok, _, err) = keys(dir.path(), &["revoke", "ffffffffffffffff"]);
    assert!(!ok && err.contains("no key"), "{err}");
    let (ok, _, err) = keys(
        dir.path(),
        &["create", "--tenant", "ACME", "--role", "reader"],
    );
    assert!(!ok && err.contains("tenant"), "{err}");
}
