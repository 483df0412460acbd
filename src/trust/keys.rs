//! API keys: who is calling, for which tenant (fleet), in which role.
//!
//! # Why it looks like this
//!
//! * **Token format** `ft_<key id>_<secret>`: the key id (16 lowercase hex digits) is public and
//!   names the stored key, so authentication is one map lookup plus one hash, never a scan over all
//!   keys. The secret is 32 random bytes from the operating system–seeded CSPRNG, base64url without
//!   padding (43 characters). The `ft_` prefix lets secret scanners recognise leaked keys.
//! * **Only SHA-256 of the secret is stored.** A slow password KDF (argon2, bcrypt) exists to slow
//!   down guessing *low-entropy* human passwords; a 256-bit random secret cannot be guessed, so one
//!   SHA-256 is as strong and keeps authentication at a microsecond per request. Comparison is
//!   constant-time (`subtle`), so response timing leaks nothing about the stored hash.
//! * **The secret is shown once**, by [`KeyStore::create`]; nothing can show it again.
//! * **Signing secrets** (optional, devices) are stored in clear, because the server must compute
//!   the same HMAC as the device (see [`super::signing`]). The file is therefore written with mode
//!   0600, and the signing secret is never listed.
//! * **The store is a JSON file** `<data-dir>/keys.json`, written atomically (temp file, fsync,
//!   rename, fsync of the directory) under an advisory lock (`keys.lock`), so the CLI and a running
//!   server can both change it without tearing or losing each other's writes. A running server picks
//!   up changes made by the CLI through [`KeyStore::reload_if_changed`] (a `stat` of the file: inode,
//!   length, modification time), which the server calls periodically.
//! * **Revoked keys stay in the file** (with `revoked_at`) for audit; authenticating with one fails
//!   with [`AuthError::Revoked`].
//!
//! Roles: `admin` manages the keys of its tenant and may also read; `reader` queries and streams;
//! `device` writes positions, and only for the driver ids bound to its key (none when the list is
//! empty). Only devices write positions.

use crate::domain::position::is_valid_driver_id;
use crate::domain::{format_rfc3339, now_micros, DriverId, Micros};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use compact_str::CompactString;
use parking_lot::RwLock;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use subtle::ConstantTimeEq;

/// Prefix of every API key token.
pub const TOKEN_PREFIX: &str = "ft_";
/// Prefix of every signing secret.
pub const SIGNING_PREFIX: &str = "fts_";
/// Length of a key id: 16 lowercase hex digits (64 random bits).
pub const KEY_ID_LEN: usize = 16;
/// Random bytes in a secret.
pub const SECRET_BYTES: usize = 32;
/// Longest tenant name.
pub const MAX_TENANT_LEN: usize = 64;
/// Longest key name (label).
pub const MAX_NAME_LEN: usize = 128;
/// Most driver ids one device key may be bound to.
pub const MAX_DRIVERS_PER_KEY: usize = 10_000;
/// File name of the store inside the data directory.
pub const KEYS_FILE: &str = "keys.json";
const LOCK_FILE: &str = "keys.lock";
const FILE_VERSION: u32 = 1;

/// What a key may do.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages the keys of its tenant; may also read.
    Admin,
    /// Queries and streams.
    Reader,
    /// Writes positions for the driver ids bound to its key.
    Device,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Reader, Role::Device];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Reader => "reader",
            Role::Device => "device",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored key. `Debug` never prints the hash or the signing secret.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: CompactString,
    pub tenant: CompactString,
    pub role: Role,
    /// Device keys only: the driver ids it may write, sorted and deduplicated. Empty: none.
    #[serde(default)]
    pub drivers: Vec<DriverId>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(with = "super::serde_time::rfc3339")]
    pub created_at: Micros,
    #[serde(default, with = "super::serde_time::opt_rfc3339")]
    pub revoked_at: Option<Micros>,
    /// SHA-256 of the secret's 32 bytes, hex.
    #[serde(with = "hex_32")]
    secret_sha256: [u8; 32],
    /// The HMAC key for request signing (the exact string shown at creation), if any.
    #[serde(default)]
    signing_secret: Option<String>,
}

impl ApiKey {
    /// The HMAC key for [`super::signing`], if this key signs its requests.
    pub fn signing_secret(&self) -> Option<&str> {
        self.signing_secret.as_deref()
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    /// The listable view: no hash, no signing secret.
    pub fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id.to_string(),
            tenant: self.tenant.to_string(),
            role: self.role,
            drivers: self.drivers.iter().map(|d| d.to_string()).collect(),
            name: self.name.clone(),
            created_at: format_rfc3339(self.created_at),
            revoked_at: self.revoked_at.map(format_rfc3339),
            signing: self.signing_secret.is_some(),
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("role", &self.role)
            .field("drivers", &self.drivers)
            .field("name", &self.name)
            .field("created_at", &self.created_at)
            .field("revoked_at", &self.revoked_at)
            .field("signing", &self.signing_secret.is_some())
            .finish_non_exhaustive()
    }
}

/// What `keys list` and admin endpoints show about a key: never a secret or a hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyInfo {
    pub id: String,
    pub tenant: String,
    pub role: Role,
    pub drivers: Vec<String>,
    pub name: Option<String>,
    pub created_at: String,
    pub revoked_at: Option<String>,
    /// Whether the key has a signing secret.
    pub signing: bool,
}

/// Secrets of a newly created key, shown once.
pub struct NewSecrets {
    /// The bearer token: `ft_<key id>_<secret>`.
    pub token: String,
    /// The signing secret (`fts_...`), when requested. Its UTF-8 bytes are the HMAC key.
    pub signing_secret: Option<String>,
}

impl fmt::Debug for NewSecrets {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("NewSecrets { .. }")
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub key_id: CompactString,
    pub tenant: CompactString,
    pub role: Role,
    /// Sorted; device keys only.
    pub drivers: Arc<[DriverId]>,
    /// The key's signing secret, for [`super::signing::verify`] when signing is enforced.
    pub signing_secret: Option<Arc<str>>,
    /// Open mode (no key configured): may do everything (see [`Principal::open`]).
    pub unrestricted: bool,
}

/// Tenant of requests in open mode: none, so driver ids are stored as given
/// (see [`crate::domain::tenant`]).
pub const OPEN_TENANT: &str = "";

impl Principal {
    /// The caller of every request while no key is configured (open mode): tenant
    /// [`OPEN_TENANT`], may read and write any driver.
    pub fn open() -> Principal {
        Principal {
            key_id: CompactString::const_new("open"),
            tenant: CompactString::const_new(OPEN_TENANT),
            role: Role::Admin,
            drivers: Arc::new([]),
            signing_secret: None,
            unrestricted: true,
        }
    }

    /// Queries and streams: readers and admins.
    pub fn can_read(&self) -> bool {
        matches!(self.role, Role::Reader | Role::Admin)
    }

    /// Writing a position of `driver_id`: a device key bound to that driver.
    pub fn can_write_driver(&self, driver_id: &str) -> bool {
        self.unrestricted
            || (self.role == Role::Device
                && self
                    .drivers
                    .binary_search_by(|d| d.as_str().cmp(driver_id))
                    .is_ok())
    }

    /// Managing keys (of its own tenant).
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Why a request was not authenticated; every variant is a 401 `unauthorized`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an API key is required (Authorization: Bearer <key>)")]
    Missing,
    #[error("the Authorization header must be `Bearer ft_<key id>_<secret>`")]
    Malformed,
    #[error("invalid API key")]
    UnknownKey,
    #[error("invalid API key")]
    BadSecret,
    #[error("the API key has been revoked")]
    Revoked,
}

impl AuthError {
    pub const ALL: [AuthError; 5] = [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::UnknownKey,
        AuthError::BadSecret,
        AuthError::Revoked,
    ];

    /// The `reason` label of `auth_failures_total`.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::UnknownKey => "unknown_key",
            AuthError::BadSecret => "bad_secret",
            AuthError::Revoked => "revoked",
        }
    }
}

/// Errors of the store and of key creation.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("tenant must be 1-{MAX_TENANT_LEN} characters of a-z 0-9 _ . - starting with a letter or digit, got {0:?}")]
    InvalidTenant(String),
    #[error("key name must be 1-{MAX_NAME_LEN} printable characters, got {0:?}")]
    InvalidName(String),
    #[error("driver id must be 1-64 characters of A-Z a-z 0-9 _ . : @ -, got {0:?}")]
    InvalidDriver(String),
    #[error("only device keys are bound to drivers")]
    DriversNeedDevice,
    #[error("a device key may be bound to at most {MAX_DRIVERS_PER_KEY} drivers")]
    TooManyDrivers,
    #[error("only device keys have signing secrets")]
    SigningNeedsDevice,
    #[error("no key with id {0:?}")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a valid key file: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Checks a tenant name: 1–64 of `a-z 0-9 _ . -`, starting with a letter or digit.
pub fn validate_tenant(tenant: &str) -> Result<(), KeyStoreError> {
    let ok = !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_LEN
        && tenant.as_bytes()[0].is_ascii_alphanumeric()
        && tenant.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(KeyStoreError::InvalidTenant(tenant.to_string()))
    }
}

/// Checks a key name: 1–128 characters, none of them a control character, not blank.
pub fn validate_name(name: &str) -> Result<(), KeyStoreError> {
    let ok = !name.trim().is_empty()
        && name.chars().count() <= MAX_NAME_LEN
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(KeyStoreError::InvalidName(name.to_string()))
    }
}

/// A bearer token split into its parts; the secret is decoded.
#[derive(PartialEq, Eq)]
pub struct Token<'a> {
    pub key_id: &'a str,
    secret: [u8; SECRET_BYTES],
}

impl fmt::Debug for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("Token")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Parses an `Authorization` header value: `Bearer ft_<key id>_<secret>` (scheme case-insensitive,
/// surrounding spaces allowed). Any other shape is [`AuthError::Malformed`]; never panics.
pub fn parse_authorization(value: &[u8]) -> Result<Token<'_>, AuthError> {
    let text = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
    let text = text.trim_matches(|c| c == ' ' || c == '\t');
    let (scheme, rest) = text.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    parse_token(rest.trim_start_matches(' '))
}

/// Parses a token `ft_<16 lowercase hex>_<43 base64url>`.
pub fn parse_token(token: &str) -> Result<Token<'_>, AuthError> {
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(AuthError::Malformed)?;
    let (key_id, secret) = rest.split_once('_').ok_or(AuthError::Malformed)?;
    if !is_key_id(key_id) {
        return Err(AuthError::Malformed);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(secret)
        .map_err(|_| AuthError::Malformed)?;
    let secret: [u8; SECRET_BYTES] = bytes.try_into().map_err(|_| AuthError::Malformed)?;
    Ok(Token { key_id, secret })
}

/// True for a well-formed key id: 16 lowercase hex digits.
pub fn is_key_id(id: &str) -> bool {
    id.len() == KEY_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// File identity for change detection: inode, length, modification time.
type Stamp = (u64, u64, Option<SystemTime>);

fn stamp_of(path: &Path) -> io::Result<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(path) {
        Ok(m) => Ok(Some((m.ino(), m.len(), m.modified().ok()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    keys: Vec<ApiKey>,
}

/// A stored key with its ready-made principal, so authenticating a device bound to thousands of
/// drivers clones an `Arc`, not the list.
struct Loaded {
    key: Arc<ApiKey>,
    principal: Principal,
}

impl Loaded {
    fn new(key: ApiKey) -> (CompactString, Loaded) {
        let principal = Principal {
            key_id: key.id.clone(),
            tenant: key.tenant.clone(),
            role: key.role,
            drivers: key.drivers.iter().cloned().collect(),
            signing_secret: key.signing_secret.as_deref().map(Arc::from),
            unrestricted: false,
        };
        (
            key.id.clone(),
            Loaded {
                key: Arc::new(key),
                principal,
            },
        )
    }
}

struct State {
    keys: HashMap<CompactString, Loaded>,
    stamp: Option<Stamp>,
}

/// The keys of every tenant, loaded from and saved to `<data-dir>/keys.json`.
pub struct KeyStore {
    dir: PathBuf,
    state: RwLock<State>,
}

impl KeyStore {
    /// Opens the store in `data_dir` (created if missing); no file means no keys yet.
    pub fn open(data_dir: impl Into<PathBuf>) -> Result<KeyStore, KeyStoreError> {
        let dir = data_dir.into();
        fs::create_dir_all(&dir).map_err(|source| KeyStoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let store = KeyStore {
            dir,
            state: RwLock::new(State {
                keys: HashMap::new(),
                stamp: None,
            }),
        };
        store.reload()?;
        Ok(store)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(KEYS_FILE)
    }

    fn io_err(&self, path: PathBuf) -> impl FnOnce(io::Error) -> KeyStoreError {
        move |source| KeyStoreError::Io { path, source }
    }

    /// Reads the file (no file: no keys) and replaces the in-memory keys.
    fn reload(&self) -> Result<(), KeyStoreError> {
        let path = self.path();
        let stamp = stamp_of(&path).map_err(self.io_err(path.clone()))?;
        let keys = read_file(&path)?;
        let mut state = self.state.write();
        state.keys = keys.into_iter().map(Loaded::new).collect();
        state.stamp = stamp;
        Ok(())
    }

    /// Reloads the file when it changed since it was last read or written by this store (another
    /// process, such as `fleettracker keys`, wrote it). True when it reloaded. Cheap: one `stat`.
    pub fn reload_if_changed(&self) -> Result<bool, KeyStoreError> {
        let path = self.path();
        let stamp = stamp_of(&path).map_err(self.io_err(path))?;
        if stamp == self.state.read().stamp {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Runs `change` on the current file contents under the cross-process lock, then writes the
    /// result atomically and makes it the in-memory state.
    fn modify<T>(
        &self,
        change: impl FnOnce(&mut Vec<ApiKey>) -> Result<T, KeyStoreError>,
    ) -> Result<T, KeyStoreError> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(self.io_err(lock_path.clone()))?;
        lock.lock().map_err(self.io_err(lock_path))?;
        let path = self.path();
        let mut keys = read_file(&path)?;
        let out = change(&mut keys)?;
        write_atomically(&self.dir, &path, &keys)?;
        let stamp = stamp_of(&path).map_err(self.io_err(path.clone()))?;
        let mut state = self.state.write();
        state.keys = keys.into_iter().map(Loaded::new).collect();
        state.stamp = stamp;
        drop(state);
        drop(lock); // releases the advisory lock
        Ok(out)
    }

    /// Creates a key; the returned secrets are the only time they can be seen.
    pub fn create(
        &self,
        tenant: &str,
        role: Role,
        drivers: &[&str],
        name: Option<&str>,
        with_signing_secret: bool,
    ) -> Result<(ApiKey, NewSecrets), KeyStoreError> {
        validate_tenant(tenant)?;
        if let Some(name) = name {
            validate_name(name)?;
        }
        if role != Role::Device && !drivers.is_empty() {
            return Err(KeyStoreError::DriversNeedDevice);
        }
        if role != Role::Device && with_signing_secret {
            return Err(KeyStoreError::SigningNeedsDevice);
        }
        if let Some(bad) = drivers.iter().find(|d| !is_valid_driver_id(d)) {
            return Err(KeyStoreError::InvalidDriver(bad.to_string()));
        }
        let mut drivers: Vec<DriverId> = drivers.iter().map(|d| DriverId::new(d)).collect();
        drivers.sort_unstable();
        drivers.dedup();
        if drivers.len() > MAX_DRIVERS_PER_KEY {
            return Err(KeyStoreError::TooManyDrivers);
        }
        let secret: [u8; SECRET_BYTES] = random_bytes();
        let signing_secret = with_signing_secret.then(|| {
            format!(
                "{SIGNING_PREFIX}{}",
                URL_SAFE_NO_PAD.encode(random_bytes::<SECRET_BYTES>())
            )
        });
        self.modify(|keys| {
            let id = loop {
                let id = CompactString::new(hex::encode(random_bytes::<8>()));
                if !keys.iter().any(|k| k.id == id) {
                    break id;
                }
            };
            let key = ApiKey {
                id: id.clone(),
                tenant: CompactString::new(tenant),
                role,
                drivers,
                name: name.map(str::to_string),
                created_at: now_micros(),
                revoked_at: None,
                secret_sha256: Sha256::digest(secret).into(),
                signing_secret: signing_secret.clone(),
            };
            keys.push(key.clone());
            let token = format!("{TOKEN_PREFIX}{id}_{}", URL_SAFE_NO_PAD.encode(secret));
            Ok((
                key,
                NewSecrets {
                    token,
                    signing_secret,
                },
            ))
        })
    }

    /// Keys, of one tenant or of all, oldest first; revoked ones included (see `revoked_at`).
    pub fn list(&self, tenant: Option<&str>) -> Vec<KeyInfo> {
        let state = self.state.read();
        let mut keys: Vec<&Arc<ApiKey>> = state
            .keys
            .values()
            .map(|l| &l.key)
            .filter(|k| tenant.is_none_or(|t| k.tenant == t))
            .collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        keys.into_iter().map(|k| k.info()).collect()
    }

    /// The stored key, if any.
    pub fn get(&self, id: &str) -> Option<Arc<ApiKey>> {
        self.state.read().keys.get(id).map(|l| l.key.clone())
    }

    /// Revokes a key (idempotent: revoking a revoked key keeps the first time). Returns the key.
    pub fn revoke(&self, id: &str) -> Result<KeyInfo, KeyStoreError> {
        self.modify(|keys| {
            let key = keys
                .iter_mut()
                .find(|k| k.id == id)
                .ok_or_else(|| KeyStoreError::NotFound(id.to_string()))?;
            key.revoked_at.get_or_insert_with(now_micros);
            Ok(key.info())
        })
    }

    /// Authenticates an `Authorization` header value (`None`: the header is absent).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Principal, AuthError> {
        let token = parse_authorization(authorization.ok_or(AuthError::Missing)?)?;
        self.authenticate_token(&token)
    }

    /// Authenticates a parsed token (for transports that carry the token elsewhere).
    pub fn authenticate_token(&self, token: &Token<'_>) -> Result<Principal, AuthError> {
        let hash: [u8; 32] = Sha256::digest(token.secret).into();
        let state = self.state.read();
        let loaded = state.keys.get(token.key_id).ok_or(AuthError::UnknownKey)?;
        if !bool::from(hash.ct_eq(&loaded.key.secret_sha256)) {
            return Err(AuthError::BadSecret);
        }
        if loaded.key.is_revoked() {
            return Err(AuthError::Revoked);
        }
        Ok(loaded.principal.clone())
    }
}

fn read_file(path: &Path) -> Result<Vec<ApiKey>, KeyStoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(KeyStoreError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let file: KeyFile =
        serde_json::from_slice(&bytes).map_err(|source| KeyStoreError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(file.keys)
}

/// Writes `keys` to a temporary file (mode 0600), fsyncs it, renames it over `path`, and fsyncs
/// the directory so the rename itself survives a crash.
fn write_atomically(dir: &Path, path: &Path, keys: &[ApiKey]) -> Result<(), KeyStoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = KeyFile {
        version: FILE_VERSION,
        keys: keys.to_vec(),
    };
    let tmp = dir.join(format!(".{KEYS_FILE}.tmp"));
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| KeyStoreError::Io { path: p, source }
    };
    let mut bytes = serde_json::to_vec_pretty(&file).map_err(|source| KeyStoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    out.write_all(&bytes).map_err(io_err(&tmp))?;
    out.sync_all().map_err(io_err(&tmp))?;
    drop(out);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

mod hex_32 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store() -> (tempfile::TempDir, KeyStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path()).unwrap();
        (dir, store)
    }

    fn header(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn created_key_authenticates_with_its_role_and_tenant() {
        let (_dir, store) = store();
        let (key, secrets) = store
            .create("acme", Role::Reader, &[], Some("dashboard"), false)
            .unwrap();
        assert!(secrets.token.starts_with(&format!("ft_{}_", key.id)));
        assert_eq!(secrets.token.len(), 3 + 16 + 1 + 43);
        assert!(secrets.signing_secret.is_none());
        let p = store.authenticate(Some(&header(&secrets.token))).unwrap();
        assert_eq!(p.tenant, "acme");
        assert_eq!(p.role, Role::Reader);
        assert_eq!(p.key_id, key.id);
        assert!(p.can_read() && !p.is_admin() && !p.can_write_driver("d1"));
    }

    #[test]
    fn roles_grant_what_the_issue_says() {
        let (_dir, store) = store();
        let (_, admin) = store.create("acme", Role::Admin, &[], None, false).unwrap();
        let admin = store.authenticate(Some(&header(&admin.token))).unwrap();
        assert!(admin.is_admin() && admin.can_read() && !admin.can_write_driver("d1"));
        let (_, device) = store
            .create("acme", Role::Device, &["d2", "d1", "d1"], None, true)
            .unwrap();
        assert!(device
            .signing_secret
            .as_deref()
            .unwrap()
            .starts_with("fts_"));
        let device = store.authenticate(Some(&header(&device.token))).unwrap();
        assert_eq!(&*device.drivers, &["d1", "d2"]);
        assert!(device.can_write_driver("d1") && device.can_write_driver("d2"));
        assert!(
            !device.can_write_driver("d3"),
            "unbound driver is forbidden"
        );
        assert!(!device.can_read() && !device.is_admin());
        assert!(device.signing_secret.is_some());
        let (_, unbound) = store
            .create("acme", Role::Device, &[], None, false)
            .unwrap();
        let unbound = store.authenticate(Some(&header(&unbound.token))).unwrap();
        assert!(
            !unbound.can_write_driver("d1"),
            "empty list binds no driver"
        );
    }

    #[test]
    fn the_open_principal_may_do_everything() {
        let p = Principal::open();
        assert!(p.can_read() && p.is_admin() && p.can_write_driver("any"));
        assert_eq!(p.tenant, OPEN_TENANT);
    }

    #[test]
    fn tenant_is_part_of_the_principal() {
        let (_dir, store) = store();
        let (_, a) = store
            .create("acme", Role::Reader, &[], None, false)
            .unwrap();
        let (_, b) = store
            .create("globex", Role::Reader, &[], None, false)
            .unwrap();
        assert_eq!(
            store.authenticate(Some(&header(&a.token))).unwrap().tenant,
            "acme"
        );
        assert_eq!(
            store.authenticate(Some(&header(&b.token))).unwrap().tenant,
            "globex"
        );
        assert_eq!(store.list(Some("acme")).len(), 1);
        assert_eq!(store.list(Some("initech")).len(), 0);
        assert_eq!(store.list(None).len(), 2);
    }

    #[test]
    fn bad_bearers_are_rejected_with_distinct_reasons() {
        let (_dir, store) = store();
        let (key, s) = store
            .create("acme", Role::Reader, &[], None, false)
            .unwrap();
        assert_eq!(store.authenticate(None), Err(AuthError::Missing));
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Basic dXNlcjpwYXNz",
            "ft_0123456789abcdef_x",
            "Bearer ft_",
            "Bearer ft_0123456789abcdef",
            "Bearer ft_0123456789ABCDEF_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "Bearer xx_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "Bearer ft_0123456789abcdef_AAAA",
            "Bearer ft_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "Bearer ft_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA!",
        ] {
            assert_eq!(
                store.authenticate(Some(bad.as_bytes())),
                Err(AuthError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(
            store.authenticate(Some(b"Bearer \xff\xfe")),
            Err(AuthError::Malformed)
        );
        // Well-formed but unknown id.
        let unknown = format!("Bearer ft_0123456789abcdef_{}", &s.token[20..]);
        assert_eq!(
            store.authenticate(Some(unknown.as_bytes())),
            Err(AuthError::UnknownKey)
        );
        // Known id, wrong secret.
        let wrong = format!("Bearer ft_{}_{}", key.id, URL_SAFE_NO_PAD.encode([7u8; 32]));
        assert_eq!(
            store.authenticate(Some(wrong.as_bytes())),
            Err(AuthError::BadSecret)
        );
        // Scheme is case-insensitive, extra spaces tolerated.
        let lenient = format!("  bearer   {}  ", s.token);
        assert!(store.authenticate(Some(lenient.as_bytes())).is_ok());
    }

    #[test]
    fn revoked_keys_fail_and_stay_listed() {
        let (_dir, store) = store();
        let (key, s) = store
            .create("acme", Role::Reader, &[], None, false)
            .unwrap();
        let info = store.revoke(&key.id).unwrap();
        assert!(info.revoked_at.is_some());
        assert_eq!(
            store.authenticate(Some(&header(&s.token))),
            Err(AuthError::Revoked)
        );
        let again = store.revoke(&key.id).unwrap();
        assert_eq!(
            again.revoked_at, info.revoked_at,
            "first revocation time kept"
        );
        assert!(matches!(
            store.revoke("ffffffffffffffff"),
            Err(KeyStoreError::NotFound(_))
        ));
        assert_eq!(store.list(None)[0].revoked_at, info.revoked_at);
    }

    #[test]
    fn names_and_tenants_are_validated() {
        let (_dir, store) = store();
        for bad in [
            "",
            "Acme",
            "-acme",
            "ac me",
            "ac/me",
            &"a".repeat(65),
            "äcme",
        ] {
            assert!(
                matches!(
                    store.create(bad, Role::Reader, &[], None, false),
                    Err(KeyStoreError::InvalidTenant(_))
                ),
                "{bad:?}"
            );
        }
        assert!(store
            .create(&"a".repeat(64), Role::Reader, &[], None, false)
            .is_ok());
        assert!(store
            .create("fleet-1.eu_west", Role::Reader, &[], None, false)
            .is_ok());
        for bad in ["", "   ", "tab\there", &"n".repeat(129)] {
            assert!(matches!(
                store.create("acme", Role::Reader, &[], Some(bad), false),
                Err(KeyStoreError::InvalidName(_))
            ));
        }
        assert!(store
            .create("acme", Role::Reader, &[], Some("Ünïcode ok"), false)
            .is_ok());
        assert!(matches!(
            store.create("acme", Role::Reader, &["d1"], None, false),
            Err(KeyStoreError::DriversNeedDevice)
        ));
        assert!(matches!(
            store.create("acme", Role::Admin, &[], None, true),
            Err(KeyStoreError::SigningNeedsDevice)
        ));
        assert!(matches!(
            store.create("acme", Role::Device, &["bad id"], None, false),
            Err(KeyStoreError::InvalidDriver(_))
        ));
        let err = store
            .create("Bad", Role::Reader, &[], None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a-z 0-9"), "{err}");
    }

    #[test]
    fn file_is_private_hashed_and_survives_reopen() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = store();
        let (key, s) = store
            .create("acme", Role::Device, &["d1"], Some("van 7"), true)
            .unwrap();
        let path = dir.path().join(KEYS_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        let secret_part = &s.token[20..];
        assert!(!text.contains(secret_part), "secret must not be stored");
        assert!(text.contains(&hex::encode(Sha256::digest(
            URL_SAFE_NO_PAD.decode(secret_part).unwrap()
        ))));
        let reopened = KeyStore::open(dir.path()).unwrap();
        let p = reopened.authenticate(Some(&header(&s.token))).unwrap();
        assert_eq!(p.key_id, key.id);
        assert_eq!(*reopened.get(&key.id).unwrap(), key);
        assert!(!format!("{key:?}").contains(s.signing_secret.as_deref().unwrap()));
        assert!(!dir.path().join(".keys.json.tmp").exists());
    }

    #[test]
    fn a_corrupted_file_does_not_wipe_loaded_keys() {
        let (dir, store) = store();
        let (_, s) = store
            .create("acme", Role::Reader, &[], None, false)
            .unwrap();
        fs::write(dir.path().join(KEYS_FILE), b"{\"half").unwrap();
        assert!(store.reload_if_changed().is_err());
        assert!(store.authenticate(Some(&header(&s.token))).is_ok());
        assert!(
            store
                .create("acme", Role::Reader, &[], None, false)
                .is_err(),
            "no overwrite"
        );
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEYS_FILE), b"{not json").unwrap();
        assert!(matches!(
            KeyStore::open(dir.path()),
            Err(KeyStoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn server_sees_keys_created_and_revoked_by_another_process() {
        let (dir, server) = store();
        assert!(!server.reload_if_changed().unwrap(), "nothing changed yet");
        let cli = KeyStore::open(dir.path()).unwrap();
        let (key, s) = cli.create("acme", Role::Reader, &[], None, false).unwrap();
        assert_eq!(
            server.authenticate(Some(&header(&s.token))),
            Err(AuthError::UnknownKey)
        );
        assert!(server.reload_if_changed().unwrap());
        assert!(server.authenticate(Some(&header(&s.token))).is_ok());
        assert!(!server.reload_if_changed().unwrap());
        cli.revoke(&key.id).unwrap();
        assert!(server.reload_if_changed().unwrap());
        assert_eq!(
            server.authenticate(Some(&header(&s.token))),
            Err(AuthError::Revoked)
        );
        // Writes through the server's own store do not need a reload; neither lose the other's.
        server
            .create("acme", Role::Admin, &[], None, false)
            .unwrap();
        cli.create("acme", Role::Admin, &[], None, false).unwrap();
        assert!(server.reload_if_changed().unwrap());
        assert_eq!(server.list(None).len(), 3);
    }

    #[test]
    fn concurrent_writers_in_separate_stores_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let stores: Vec<Arc<KeyStore>> = (0..2)
            .map(|_| Arc::new(KeyStore::open(dir.path()).unwrap()))
            .collect();
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let store = stores[i % 2].clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        store
                            .create("acme", Role::Reader, &[], None, false)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let fresh = KeyStore::open(dir.path()).unwrap();
        assert_eq!(fresh.list(None).len(), 40);
    }

    #[test]
    fn key_info_never_carries_secrets() {
        let (_dir, store) = store();
        let (key, s) = store
            .create("acme", Role::Device, &["d"], None, true)
            .unwrap();
        let json = serde_json::to_string(&key.info()).unwrap();
        assert!(!json.contains(&s.token[20..]));
        assert!(!json.contains(s.signing_secret.as_deref().unwrap()));
        assert!(!json.contains(&hex::encode(key.secret_sha256)));
        assert!(json.contains(r#""signing":true"#));
    }

    proptest! {
        #[test]
        fn authorization_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = parse_authorization(&bytes);
        }

        #[test]
        fn token_like_strings_never_panic(s in "(B|b)earer ft_[0-9a-f_]{0,20}[A-Za-z0-9_=-]{0,50}") {
            let _ = parse_authorization(s.as_bytes());
        }
    }
}
