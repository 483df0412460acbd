//! Every setting, in one place: a command-line flag, an `FLEET_<FLAG>` environment variable, and a
//! default. `fleettracker <command> --help` prints this file's doc comments.

use crate::trust::filters::{kmh_to_mps, SanityFilters};
use crate::trust::keys::Role;
use crate::trust::limiter::LimitConfig;
use crate::wal::FsyncPolicy;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "fleettracker",
    version,
    about = "Real-time fleet location service: latest positions, nearby search, live metrics."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (embedded mode: everything in this process, nothing else to install).
    Serve(Box<ServeConfig>),
    /// Run virtual drivers that move along a street grid and post positions to a running server.
    Simulate(SimulateConfig),
    /// Move accepted positions from the Redis Stream into PostgreSQL (`--history-store postgres`);
    /// run one or more next to the servers. Stops cleanly on SIGINT/SIGTERM.
    Worker(WorkerConfig),
    /// Manage API keys: create (prints the secret once), list, revoke.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret (shown only this once).
    Create(KeysCreate),
    /// List keys (never their secrets).
    List(KeysList),
    /// Revoke a key; requests with it are refused from then on.
    Revoke(KeysRevoke),
}

/// Where the key store lives.
#[derive(Debug, Clone, Args)]
pub struct KeyStoreArgs {
    /// The server's data directory; keys are in `<data-dir>/keys.json`.
    #[arg(long, env = "FLEET_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct KeysCreate {
    /// The tenant (fleet) the key belongs to: 1-64 of a-z 0-9 _ . -
    #[arg(long)]
    pub tenant: String,
    /// admin (manages keys, reads), reader (queries and streams), device (writes positions).
    #[arg(long, value_enum)]
    pub role: Role,
    /// Device keys: a driver id the key may write (repeat for several).
    #[arg(long = "driver", value_name = "DRIVER_ID")]
    pub drivers: Vec<String>,
    /// A label, e.g. the device or the person the key is for.
    #[arg(long)]
    pub name: Option<String>,
    /// Device keys: also create a signing secret; requests must then carry `X-Signature`.
    #[arg(long)]
    pub signing: bool,
    #[command(flatten)]
    pub store: KeyStoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KeysList {
    /// Only this tenant's keys.
    #[arg(long)]
    pub tenant: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: KeyStoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KeysRevoke {
    /// The key id (the 16 hex digits after `ft_`).
    pub key_id: String,
    #[command(flatten)]
    pub store: KeyStoreArgs,
}

/// A sanity filter `--no-filter` can switch off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FilterName {
    /// (0, 0) fixes.
    NullIsland,
    /// Timestamps more than --max-ahead in the future.
    Future,
    /// Timestamps older than --max-age.
    TooOld,
    /// Implied speed above --max-speed, and teleports.
    Speed,
    /// Same driver and timestamp as the latest fix (accepted, not stored).
    Duplicates,
}

/// Authentication, rate limits and GPS sanity filters (`serve`).
#[derive(Debug, Clone, Args)]
pub struct TrustArgs {
    /// While no API key exists the server runs in open mode (every request allowed, a warning at
    /// start-up) and only on a loopback address; this flag allows open mode on any address.
    #[arg(long, env = "FLEET_ALLOW_OPEN")]
    pub allow_open: bool,

    /// Directory of the API key file `keys.json` (default: --data-dir). Point every instance of a
    /// scale-out deployment at one shared directory so they all know the same keys; manage it with
    /// `fleettracker keys ... --data-dir <that directory>`.
    #[arg(long, env = "FLEET_KEYS_DIR")]
    pub keys_dir: Option<PathBuf>,

    /// `GET /metrics` needs a reader or admin key.
    #[arg(long, env = "FLEET_METRICS_KEY_REQUIRED")]
    pub metrics_key_required: bool,

    /// Position updates per second per driver for device keys (a number, `/s` optional).
    #[arg(long, env = "FLEET_DEVICE_RATE", default_value = "5", value_parser = parse_rate)]
    pub device_rate: f64,

    /// Updates a device key may send at once per driver after an idle period.
    #[arg(long, env = "FLEET_DEVICE_BURST", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub device_burst: u32,

    /// Requests per second per reader (or admin) key.
    #[arg(long, env = "FLEET_READER_RATE", default_value = "50", value_parser = parse_rate)]
    pub reader_rate: f64,

    /// Requests a reader key may send at once after an idle period.
    #[arg(long, env = "FLEET_READER_BURST", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub reader_burst: u32,

    /// Positions older than this are rejected (`too_old`).
    #[arg(long, env = "FLEET_MAX_AGE", default_value = "24h", value_parser = parse_duration)]
    pub max_age: Duration,

    /// Positions further in the future than this are rejected (`future`).
    #[arg(long, env = "FLEET_MAX_AHEAD", default_value = "5m", value_parser = parse_duration)]
    pub max_ahead: Duration,

    /// Highest believable speed between consecutive fixes, in km/h (`impossible_speed`).
    #[arg(long, env = "FLEET_MAX_SPEED", default_value = "250", value_parser = parse_speed_kmh)]
    pub max_speed: f64,

    /// Switch a sanity filter off (repeatable, or comma-separated): null-island, future, too-old,
    /// speed, duplicates.
    #[arg(
        long = "no-filter",
        env = "FLEET_NO_FILTER",
        value_enum,
        value_delimiter = ','
    )]
    pub no_filter: Vec<FilterName>,

    /// Anomalies (impossible speed, teleports) are kept this long for review.
    #[arg(long, env = "FLEET_ANOMALY_RETENTION", default_value = "90d", value_parser = parse_duration)]
    pub anomaly_retention: Duration,
}

impl TrustArgs {
    fn filter_on(&self, name: FilterName) -> bool {
        !self.no_filter.contains(&name)
    }

    /// The sanity filters these flags describe.
    pub fn sanity_filters(&self) -> SanityFilters {
        let micros = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        SanityFilters {
            reject_null_island: self.filter_on(FilterName::NullIsland),
            max_ahead: self
                .filter_on(FilterName::Future)
                .then(|| micros(self.max_ahead)),
            max_age: self
                .filter_on(FilterName::TooOld)
                .then(|| micros(self.max_age)),
            max_speed_mps: self
                .filter_on(FilterName::Speed)
                .then(|| kmh_to_mps(self.max_speed)),
            duplicates: self.filter_on(FilterName::Duplicates),
            ..SanityFilters::default()
        }
    }

    /// Device buckets: per (key, driver).
    pub fn device_limits(&self) -> LimitConfig {
        LimitConfig {
            rate_per_sec: self.device_rate,
            burst: self.device_burst,
            ..LimitConfig::DEVICE_DEFAULT
        }
    }

    /// Reader buckets: per key.
    pub fn reader_limits(&self) -> LimitConfig {
        LimitConfig {
            rate_per_sec: self.reader_rate,
            burst: self.reader_burst,
            ..LimitConfig::READER_DEFAULT
        }
    }

    /// Anomaly retention in microseconds.
    pub fn anomaly_retention_micros(&self) -> i64 {
        i64::try_from(self.anomaly_retention.as_micros()).unwrap_or(i64::MAX)
    }
}

/// A positive rate per second: `5`, `0.5`, `5/s`.
fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches("/s");
    match number.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1e9 => Ok(r),
        _ => Err("expected a positive number per second, such as 5 or 0.5/s".into()),
    }
}

/// A positive speed in km/h: `250`, `250km/h`.
fn parse_speed_kmh(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches("km/h");
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err("expected a positive speed in km/h, such as 250".into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address and port to listen on (port 0 picks a free one; the chosen address is printed).
    #[arg(long, env = "FLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for the service's data; created if missing.
    #[arg(long, env = "FLEET_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// A driver with no update for this long disappears from queries (e.g. 60s, 2s, 500ms).
    #[arg(long, env = "FLEET_DRIVER_TTL", default_value = "60s", value_parser = parse_duration)]
    pub driver_ttl: Duration,

    /// Log line format.
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// When an accepted position is on disk: `always` (the 202 waits for the fsync, shared by
    /// concurrent requests), `interval:<duration>` (answer at once, fsync that often: a power loss
    /// loses at most that window), or `off` (no log, no history, no snapshots: memory only).
    #[arg(long, env = "FLEET_FSYNC", default_value = "always", value_parser = parse_fsync)]
    pub fsync: FsyncSetting,

    /// How often the live state is snapshotted (restart loads the snapshot, then replays the log).
    #[arg(long, env = "FLEET_SNAPSHOT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub snapshot_interval: Duration,

    #[command(flatten)]
    pub retention: RetentionArgs,

    /// Map tiles of the live map page (`GET /`): a URL template with `{z}`, `{x}`, `{y}` (and
    /// optionally `{s}`, one of a, b, c), or `none` for the plain coordinate grid.
    #[arg(long, env = "FLEET_TILE_URL", default_value = DEFAULT_TILE_URL, value_parser = parse_tile_url)]
    pub tile_url: String,

    /// Origins whose browser apps may call the API (CORS), e.g. https://dispatch.example.com;
    /// comma-separated or repeated, `*` for any. None by default: no CORS headers are sent.
    #[arg(long, env = "FLEET_CORS_ORIGIN", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_origin: Vec<String>,

    #[command(flatten)]
    pub connections: ConnectionLimits,

    /// Where the latest positions live: `memory` (this process) or `redis` (--redis-url, shared
    /// by every instance on it).
    #[arg(long, env = "FLEET_LIVE_STORE", value_enum, default_value_t = LiveStoreKind::Memory)]
    pub live_store: LiveStoreKind,

    /// Where history lives: `embedded` (the data directory, fed by the log) or `postgres`
    /// (--postgres-url, fed through a Redis Stream on --redis-url by the history worker).
    #[arg(long, env = "FLEET_HISTORY_STORE", value_enum, default_value_t = HistoryStoreKind::Embedded)]
    pub history_store: HistoryStoreKind,

    #[command(flatten)]
    pub backend: BackendArgs,

    #[command(flatten)]
    pub trust: TrustArgs,

    /// Also run the history worker (Redis Stream → PostgreSQL) inside this server.
    #[arg(long, env = "FLEET_EMBEDDED_WORKER")]
    pub embedded_worker: bool,

    /// Entries the history stream keeps at most (`XADD MAXLEN ~`); each entry holds the batches
    /// acknowledged together (one to a few hundred requests). Entries the worker has not written
    /// to PostgreSQL yet are lost when trimmed: size it for the longest PostgreSQL outage to ride out.
    #[arg(long, env = "FLEET_STREAM_MAX_LEN", default_value_t = crate::history::postgres::DEFAULT_STREAM_MAX_LEN)]
    pub stream_max_len: usize,
}

/// `--live-store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LiveStoreKind {
    /// In this process (snapshots and the log make it survive restarts).
    Memory,
    /// In Redis: GEO sets and per-driver hashes, shared by every instance.
    Redis,
}

/// `--history-store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HistoryStoreKind {
    /// In the data directory (fjall), fed by the write-ahead log.
    Embedded,
    /// In PostgreSQL, partitioned by day, fed through a Redis Stream.
    Postgres,
}

/// What one client may hold of the server: limits that keep a slow or hostile client (slow-loris,
/// connection floods, huge headers, endless bodies) from wedging it.
#[derive(Debug, Clone, Args)]
pub struct ConnectionLimits {
    /// Most open connections (streams included); one more is answered 503 and closed.
    #[arg(long, env = "FLEET_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A connection must send a complete request head within this time of opening or of its
    /// previous response; otherwise it is closed (idle keep-alive connections, slow-loris clients).
    #[arg(long, env = "FLEET_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A request body must arrive completely within this time (408 otherwise).
    #[arg(long, env = "FLEET_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// Largest request head (request line and headers), in bytes; larger is answered 431.
    #[arg(long, env = "FLEET_MAX_HEADER_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1024..=1024 * 1024))]
    pub max_header_bytes: u32,

    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "FLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "FLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Where the external engines of the scale-out mode are. Shared by every command that needs them
/// (`#[command(flatten)]`), so the flags and their environment variables are spelled once.
#[derive(Debug, Clone, Default, Args)]
pub struct BackendArgs {
    /// Redis URL (`redis://host:port[/db]`); with --redis-cluster, a comma-separated list of seed
    /// nodes.
    #[arg(long, env = "FLEET_REDIS_URL")]
    pub redis_url: Option<String>,

    /// The Redis URLs are nodes of a Redis Cluster.
    #[arg(long, env = "FLEET_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// PostgreSQL URL (`postgres://user:password@host:port/database`).
    #[arg(long, env = "FLEET_POSTGRES_URL")]
    pub postgres_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub backend: BackendArgs,

    /// Positions written per PostgreSQL transaction (entries read per batch adapt to reach it).
    #[arg(long, env = "FLEET_BATCH_SIZE", default_value_t = 20_000, value_parser = parse_batch_size)]
    pub batch_size: usize,

    /// Entries another worker read but left unacknowledged this long are taken over (it crashed).
    #[arg(long, env = "FLEET_CLAIM_IDLE", default_value = "30s", value_parser = parse_duration)]
    pub claim_idle: Duration,

    #[command(flatten)]
    pub retention: RetentionArgs,

    /// How often this worker runs retention (one worker at a time does it; cheap when nothing is due).
    #[arg(long, env = "FLEET_RETENTION_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub retention_interval: Duration,

    /// Do not run retention in this worker.
    #[arg(long, env = "FLEET_NO_RETENTION")]
    pub no_retention: bool,

    /// Serve this worker's `/metrics` (stream lag, positions written, errors) on this address, e.g.
    /// 127.0.0.1:9091 (port 0 picks a free one; the address is printed). Off by default.
    #[arg(long, env = "FLEET_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log line format.
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How long history keeps what (the server's embedded history and the PostgreSQL worker alike).
#[derive(Debug, Clone, Copy, Args)]
pub struct RetentionArgs {
    /// History keeps every point for this long.
    #[arg(long, env = "FLEET_HISTORY_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub history_retention: Duration,

    /// After --history-retention and up to this age, history keeps a simplified track; older is deleted.
    #[arg(long, env = "FLEET_COLD_RETENTION", default_value = "90d", value_parser = parse_duration)]
    pub cold_retention: Duration,

    /// Douglas–Peucker tolerance, in metres, of the simplified (cold) tracks.
    #[arg(long, env = "FLEET_COLD_SIMPLIFY_M", default_value_t = 5.0, value_parser = parse_tolerance_m)]
    pub cold_simplify_m: f64,
}

impl RetentionArgs {
    /// What one flag cannot check alone: full history must not outlive the age past which history
    /// is deleted.
    pub fn check(&self) -> Result<(), String> {
        if self.cold_retention < self.history_retention {
            return Err(format!(
                "--cold-retention ({}) must be at least --history-retention ({}): it is the age past \
                 which history is deleted, and every point is kept for --history-retention",
                in_whole_units(self.cold_retention),
                in_whole_units(self.history_retention),
            ));
        }
        Ok(())
    }
}

/// `40d` rather than humantime's `1month 9days 13h 26m 24s` (it counts a month as 30.44 days).
fn in_whole_units(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// A simplification tolerance in metres, in the range the track endpoint's `simplify_m` takes.
fn parse_tolerance_m(text: &str) -> Result<f64, String> {
    crate::geo::parse_tolerance_m(text)
        .ok_or_else(|| format!("expected {}, such as 5", crate::geo::TOLERANCE_EXPECTED))
}

impl Cli {
    /// Checks what clap cannot (settings that must agree with each other); the message names the
    /// flags.
    pub fn check(&self) -> Result<(), String> {
        match &self.command {
            Command::Serve(config) => config.retention.check(),
            Command::Worker(config) => config.retention.check(),
            Command::Simulate(_) | Command::Keys(_) => Ok(()),
        }
    }

    /// Parses the command line and runs [`Cli::check`]; exits like clap does (status 2, the
    /// subcommand's usage) when either fails.
    pub fn parse_checked() -> Cli {
        let cli = Cli::parse();
        if let Err(message) = cli.check() {
            let mut command = Cli::command();
            command.build(); // names the subcommands' usage "fleettracker serve", not "serve"
            let name = match &cli.command {
                Command::Serve(_) => "serve",
                Command::Worker(_) => "worker",
                Command::Simulate(_) => "simulate",
                Command::Keys(_) => "keys",
            };
            let error = match command.find_subcommand_mut(name) {
                Some(sub) => sub.error(ErrorKind::ArgumentConflict, message),
                None => command.error(ErrorKind::ArgumentConflict, message),
            };
            error.exit();
        }
        cli
    }
}

/// OpenStreetMap's standard tiles.
pub const DEFAULT_TILE_URL: &str = "https://tile.openstreetmap.org/{z}/{x}/{y}.png";

/// `*`, or an origin as browsers send it: `http(s)://host[:port]`, no path, no trailing slash.
fn parse_origin(text: &str) -> Result<String, String> {
    let text = text.trim();
    let host = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"));
    let valid = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    };
    match host {
        _ if text == "*" => Ok(text.to_string()),
        Some(h) if valid(h) => Ok(text.to_string()),
        _ => Err("expected `*` or an origin such as https://dispatch.example.com (scheme and host, optional port, no path)".into()),
    }
}

/// A tile URL template: `none`, or an http(s) URL (or an absolute path) with `{z}`, `{x}`, `{y}`.
fn parse_tile_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text == "none" {
        return Ok(text.to_string());
    }
    let scheme_ok = ["http://", "https://", "/"]
        .iter()
        .any(|p| text.starts_with(p));
    let missing: Vec<&str> = ["{z}", "{x}", "{y}"]
        .into_iter()
        .filter(|p| !text.contains(p))
        .collect();
    if !scheme_ok || !missing.is_empty() || text.chars().any(|c| c.is_whitespace() || c == '"') {
        return Err(format!(
            "expected `none` or an http(s) URL template with {{z}}, {{x}} and {{y}}, such as {DEFAULT_TILE_URL}"
        ));
    }
    Ok(text.to_string())
}

/// The `--fsync` setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FsyncSetting {
    /// Memory only.
    Off,
    /// Log every position under this policy.
    Log(FsyncPolicy),
}

fn parse_fsync(text: &str) -> Result<FsyncSetting, String> {
    if text == "off" {
        return Ok(FsyncSetting::Off);
    }
    if text != "always" && !text.starts_with("interval:") {
        return Err("expected always, interval:<duration> (e.g. interval:100ms) or off".into());
    }
    // What is left to go wrong is the interval, which the policy's own error names.
    text.parse::<FsyncPolicy>()
        .map(FsyncSetting::Log)
        .map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Args)]
pub struct SimulateConfig {
    /// Base URL of the server to post to.
    #[arg(long, env = "FLEET_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Number of virtual drivers.
    #[arg(long, env = "FLEET_DRIVERS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub drivers: u32,

    /// How often each driver reports its position (closed loop; ignored with --rate).
    #[arg(long, env = "FLEET_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,

    /// How long to run.
    #[arg(long, env = "FLEET_DURATION", default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Positions per request: 1 posts to /v1/locations, more to /v1/locations/batch (max 1000).
    #[arg(long, env = "FLEET_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch: u32,

    /// Fixed open-loop request rate per second; latency is measured from each request's scheduled
    /// time, so a stalling server cannot hide its queueing delay.
    #[arg(long, env = "FLEET_RATE")]
    pub rate: Option<f64>,

    /// Requests in flight at most.
    #[arg(long, env = "FLEET_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,

    /// City box the drivers move in: min_lat,min_lon,max_lat,max_lon.
    #[arg(long, env = "FLEET_CITY", default_value = "31.13,121.35,31.33,121.60")]
    pub city: String,

    /// Seed for the drivers' routes (the same seed drives the same routes).
    #[arg(long, env = "FLEET_SEED", default_value_t = 1)]
    pub seed: u64,

    /// Hide the progress bar (for logs and CI).
    #[arg(long, env = "FLEET_QUIET")]
    pub quiet: bool,
}

fn parse_batch_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err("expected a number of positions from 1 to 1000000".to_string()),
    }
}

/// Parses humantime durations such as `60s`, `2s`, `500ms`, `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 60s, 500ms, 2m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let cli = Cli::try_parse_from(["fleettracker", "serve"]).unwrap();
        let Command::Serve(c) = cli.command else {
            panic!("serve expected")
        };
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.driver_ttl, Duration::from_secs(60));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.fsync, FsyncSetting::Log(FsyncPolicy::Always));
        assert_eq!(
            c.retention.history_retention,
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(c.retention.cold_retention, Duration::from_secs(90 * 86_400));
        assert_eq!(c.retention.cold_simplify_m, 5.0);
        assert_eq!(c.tile_url, DEFAULT_TILE_URL);
    }

    fn serve_check(args: &[&str]) -> Result<(), String> {
        let argv = ["fleettracker", "serve"].iter().chain(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.check()
    }

    #[test]
    fn retention_settings_must_agree() {
        assert_eq!(serve_check(&[]), Ok(()));
        assert_eq!(
            serve_check(&["--history-retention", "7d", "--cold-retention", "7d"]),
            Ok(())
        );
        let shorter = serve_check(&["--history-retention", "40d", "--cold-retention", "10d"]);
        let message = shorter.expect_err("cold shorter than hot");
        assert!(
            message.contains("--cold-retention (10d)")
                && message.contains("--history-retention (40d)"),
            "{message}"
        );
        let worker = Cli::try_parse_from([
            "fleettracker",
            "worker",
            "--redis-url",
            "redis://a:1",
            "--postgres-url",
            "postgres://p@h/db",
            "--cold-retention",
            "36h",
        ])
        .unwrap();
        let message = worker.check().expect_err("the worker checks the same");
        assert!(
            message.contains("(36h)") && message.contains("(30d)"),
            "{message}"
        );
    }

    #[test]
    fn cold_simplify_m_is_a_tolerance_in_metres() {
        assert_eq!(serve_check(&["--cold-simplify-m", "0"]), Ok(()));
        for bad in ["-3", "nan", "inf", "100001", "five"] {
            let e = serve_check(&[&format!("--cold-simplify-m={bad}")]).expect_err(bad);
            assert!(e.contains("metres from 0 to 100000"), "{bad}: {e}");
        }
    }

    #[test]
    fn cors_origins_are_origins() {
        let cli = Cli::try_parse_from([
            "fleettracker",
            "serve",
            "--cors-origin",
            "https://a.example,http://localhost:3000",
            "--cors-origin",
            "http://[::1]:8000",
        ])
        .unwrap();
        let Command::Serve(c) = cli.command else {
            panic!("serve expected")
        };
        assert_eq!(
            c.cors_origin,
            [
                "https://a.example",
                "http://localhost:3000",
                "http://[::1]:8000"
            ]
        );
        assert_eq!(serve_check(&["--cors-origin", "*"]), Ok(()));
        for bad in [
            "a.example",
            "https://a.example/",
            "ftp://a",
            "https://",
            "https://a b",
        ] {
            let e = serve_check(&["--cors-origin", bad]).expect_err(bad);
            assert!(e.contains("expected `*` or an origin"), "{bad}: {e}");
        }
    }

    #[test]
    fn fsync_errors_say_what_is_expected_once() {
        let e = serve_check(&["--fsync", "sometimes"]).expect_err("not a policy");
        assert!(e.contains("expected always, interval:<duration>"), "{e}");
        assert_eq!(e.matches("expected").count(), 1, "{e}");
        let e = serve_check(&["--fsync", "interval:abc"]).expect_err("not a duration");
        assert!(e.contains("invalid fsync interval \"abc\""), "{e}");
    }

    #[test]
    fn worker_takes_backend_flags() {
        let cli = Cli::try_parse_from([
            "fleettracker",
            "worker",
            "--redis-url",
            "redis://a:1,redis://b:2",
            "--redis-cluster",
            "--postgres-url",
            "postgres://p@h/db",
            "--batch-size",
            "500",
        ])
        .unwrap();
        let Command::Worker(c) = cli.command else {
            panic!("worker expected")
        };
        assert_eq!(
            c.backend.redis_url.as_deref(),
            Some("redis://a:1,redis://b:2")
        );
        assert!(c.backend.redis_cluster);
        assert_eq!(c.backend.postgres_url.as_deref(), Some("postgres://p@h/db"));
        assert_eq!(c.batch_size, 500);
        assert_eq!(c.claim_idle, Duration::from_secs(30));
        assert!(!c.no_retention);
    }

    #[test]
    fn fsync_settings_parse() {
        assert_eq!(parse_fsync("off"), Ok(FsyncSetting::Off));
        assert_eq!(
            parse_fsync("interval:200ms"),
            Ok(FsyncSetting::Log(FsyncPolicy::Interval(
                Duration::from_millis(200)
            )))
        );
        assert!(parse_fsync("sometimes").is_err());
    }

    #[test]
    fn tile_urls_need_the_placeholders() {
        assert!(parse_tile_url("https://tiles.example.com/{z}/{x}/{y}.png").is_ok());
        assert!(parse_tile_url("https://{s}.tiles.example.com/{z}/{x}/{y}@2x.png").is_ok());
        assert!(parse_tile_url("/tiles/{z}/{x}/{y}.png").is_ok());
        assert_eq!(parse_tile_url("none").as_deref(), Ok("none"));
        assert!(parse_tile_url("https://tiles.example.com/{z}/{x}.png").is_err());
        assert!(parse_tile_url("ftp://tiles.example.com/{z}/{x}/{y}.png").is_err());
        assert!(parse_tile_url("").is_err());
    }

    #[derive(Debug, Parser)]
    struct TrustOnly {
        #[command(flatten)]
        trust: TrustArgs,
    }

    fn trust(args: &[&str]) -> Result<TrustArgs, clap::Error> {
        TrustOnly::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|t| t.trust)
    }

    #[test]
    fn trust_defaults_match_the_issue() {
        let t = trust(&[]).unwrap();
        assert!(!t.allow_open && !t.metrics_key_required);
        assert_eq!((t.device_rate, t.device_burst), (5.0, 20));
        assert_eq!((t.reader_rate, t.reader_burst), (50.0, 100));
        assert_eq!(t.max_age, Duration::from_secs(86_400));
        assert_eq!(t.max_ahead, Duration::from_secs(300));
        assert_eq!(t.max_speed, 250.0);
        assert_eq!(t.anomaly_retention, Duration::from_secs(90 * 86_400));
        assert_eq!(t.sanity_filters(), SanityFilters::default());
        assert_eq!(t.device_limits().burst, 20);
        assert_eq!(t.reader_limits().rate_per_sec, 50.0);
    }

    #[test]
    fn trust_flags_switch_filters_and_limits() {
        let t = trust(&[
            "--no-filter",
            "speed",
            "--no-filter",
            "null-island,duplicates",
            "--device-rate",
            "2/s",
            "--max-age",
            "1h",
            "--allow-open",
        ])
        .unwrap();
        let f = t.sanity_filters();
        assert_eq!(f.max_speed_mps, None);
        assert!(!f.reject_null_island && !f.duplicates);
        assert_eq!(f.max_age, Some(3_600_000_000));
        assert_eq!(f.max_ahead, Some(300_000_000));
        assert_eq!(t.device_limits().rate_per_sec, 2.0);
        assert!(t.allow_open);
        let f = trust(&["--max-speed", "120"]).unwrap().sanity_filters();
        assert!((f.max_speed_mps.unwrap() - 33.333).abs() < 0.001);
        for bad in [
            &["--device-rate", "0"][..],
            &["--device-rate", "fast"],
            &["--device-burst", "0"],
            &["--max-speed", "-5"],
            &["--no-filter", "gravity"],
        ] {
            assert!(trust(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_parse_humantime() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
    }
}
