//! `fleettracker keys create|list|revoke`: key management without a running server (bootstrap the
//! first admin key, rotate keys from a shell). It edits the same `<data-dir>/keys.json` a running
//! server reads; the server notices within its reload interval ([`KeyStore::reload_if_changed`]).
//!
//! Secrets are printed once, by `create`, and never again: `list` shows neither secrets nor hashes.

use super::keys::{KeyInfo, KeyStore, Role};
use crate::config::{KeysCommand, KeysCreate, KeysList, KeysRevoke};
use anyhow::Context;
use std::io::Write;

/// Runs one `keys` subcommand, writing its report to `out` (stdout in the binary).
pub fn run(command: KeysCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create(args) => create(args, out),
        KeysCommand::List(args) => list(args, out),
        KeysCommand::Revoke(args) => revoke(args, out),
    }
}

fn open(data_dir: &std::path::Path) -> anyhow::Result<KeyStore> {
    KeyStore::open(data_dir)
        .with_context(|| format!("opening the key store in {}", data_dir.display()))
}

fn create(args: KeysCreate, out: &mut dyn Write) -> anyhow::Result<()> {
    let store = open(&args.store.data_dir)?;
    let drivers: Vec<&str> = args.drivers.iter().map(String::as_str).collect();
    let (key, secrets) = store.create(
        &args.tenant,
        args.role,
        &drivers,
        args.name.as_deref(),
        args.signing,
    )?;
    writeln!(out, "key id:         {}", key.id)?;
    writeln!(out, "tenant:         {}", key.tenant)?;
    writeln!(out, "role:           {}", key.role)?;
    if key.role == Role::Device {
        let bound: Vec<&str> = key.drivers.iter().map(|d| d.as_str()).collect();
        writeln!(out, "drivers:        {}", bound.join(", "))?;
    }
    if let Some(name) = &key.name {
        writeln!(out, "name:           {name}")?;
    }
    writeln!(out, "API key:        {}", secrets.token)?;
    if let Some(signing) = &secrets.signing_secret {
        writeln!(out, "signing secret: {signing}")?;
    }
    writeln!(
        out,
        "Store the secret now: it is not shown again. Send it as `Authorization: Bearer <API key>`."
    )?;
    if key.role == Role::Device && key.drivers.is_empty() {
        eprintln!("warning: this device key is bound to no driver and cannot write positions");
    }
    Ok(())
}

fn list(args: KeysList, out: &mut dyn Write) -> anyhow::Result<()> {
    let store = open(&args.store.data_dir)?;
    let keys = store.list(args.tenant.as_deref());
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &keys)?;
        writeln!(out)?;
        return Ok(());
    }
    write_table(&keys, out)
}

fn write_table(keys: &[KeyInfo], out: &mut dyn Write) -> anyhow::Result<()> {
    let rows: Vec<[String; 8]> = keys
        .iter()
        .map(|k| {
            [
                k.id.clone(),
                k.tenant.clone(),
                k.role.to_string(),
                summarize(&k.drivers),
                k.name.clone().unwrap_or_default(),
                k.created_at.clone(),
                k.revoked_at.clone().unwrap_or_else(|| "-".into()),
                if k.signing { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    let header = [
        "ID", "TENANT", "ROLE", "DRIVERS", "NAME", "CREATED", "REVOKED", "SIGNING",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    writeln!(out, "{}", line(&header))?;
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        writeln!(out, "{}", line(&cells))?;
    }
    if rows.is_empty() {
        writeln!(out, "(no keys)")?;
    }
    Ok(())
}

/// The first drivers of a device key and how many more.
fn summarize(drivers: &[String]) -> String {
    match drivers.len() {
        0 => "-".into(),
        n if n <= 3 => drivers.join(","),
        n => format!("{} (+{} more)", drivers[..3].join(","), n - 3),
    }
}

fn revoke(args: KeysRevoke, out: &mut dyn Write) -> anyhow::Result<()> {
    let store = open(&args.store.data_dir)?;
    let info = store.revoke(&args.key_id)?;
    writeln!(
        out,
        "revoked {} (tenant {}, role {}) at {}",
        info.id,
        info.tenant,
        info.role,
        info.revoked_at.unwrap_or_default()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

    fn run_args(args: &[&str]) -> anyhow::Result<String> {
        let cli = Cli::try_parse_from(std::iter::once("fleettracker").chain(args.iter().copied()))?;
        let Command::Keys(cmd) = cli.command else {
            panic!("keys expected")
        };
        let mut out = Vec::new();
        run(cmd, &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    fn field<'a>(text: &'a str, label: &str) -> &'a str {
        text.lines()
            .find_map(|l| l.strip_prefix(label))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{label} missing in {text}"))
    }

    #[test]
    fn create_list_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let created = run_args(&[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--role",
            "device",
            "--driver",
            "d1",
            "--driver",
            "d2",
            "--name",
            "van 7",
            "--signing",
            "--data-dir",
            d,
        ])
        .unwrap();
        let id = field(&created, "key id:");
        let token = field(&created, "API key:");
        let signing = field(&created, "signing secret:");
        assert!(token.starts_with(&format!("ft_{id}_")));
        assert!(signing.starts_with("fts_"));
        assert_eq!(field(&created, "drivers:"), "d1, d2");

        let table = run_args(&["keys", "list", "--data-dir", d]).unwrap();
        assert!(table.contains(id) && table.contains("van 7") && table.contains("d1,d2"));
        assert!(!table.contains(&token[20..]) && !table.contains(signing));

        let json = run_args(&[
            "keys",
            "list",
            "--tenant",
            "acme",
            "--json",
            "--data-dir",
            d,
        ])
        .unwrap();
        let keys: Vec<KeyInfo> = serde_json::from_str(&json).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].id, id);
        assert!(!json.contains(&token[20..]));
        let other = run_args(&[
            "keys",
            "list",
            "--tenant",
            "globex",
            "--json",
            "--data-dir",
            d,
        ])
        .unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<KeyInfo>>(&other).unwrap().len(),
            0
        );

        let revoked = run_args(&["keys", "revoke", id, "--data-dir", d]).unwrap();
        assert!(revoked.starts_with(&format!("revoked {id}")));
        let json = run_args(&["keys", "list", "--json", "--data-dir", d]).unwrap();
        let keys: Vec<KeyInfo> = serde_json::from_str(&json).unwrap();
        assert!(keys[0].revoked_at.is_some());
    }

    #[test]
    fn errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let err = run_args(&[
            "keys",
            "create",
            "--tenant",
            "Bad!",
            "--role",
            "reader",
            "--data-dir",
            d,
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("tenant"), "{err}");
        assert!(run_args(&["keys", "revoke", "0123456789abcdef", "--data-dir", d]).is_err());
        assert!(run_args(&["keys", "create", "--tenant", "a", "--role", "root"]).is_err());
        let empty = run_args(&["keys", "list", "--data-dir", d]).unwrap();
        assert!(empty.contains("(no keys)"));
    }

    #[test]
    fn long_driver_lists_are_summarized() {
        let many: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
        assert_eq!(summarize(&many), "d0,d1,d2 (+2 more)");
        assert_eq!(summarize(&[]), "-");
    }
}
