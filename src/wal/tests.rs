use super::segment::HEADER_LEN;
use super::*;
use crate::domain::Status;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

fn pos(id: &str, n: i32) -> Position {
    Position {
        driver_id: id.into(),
        lat_e6: 31_000_000 + n,
        lon_e6: 121_000_000 - n,
        status: Status::from_index((n % 3) as u8),
        timestamp: 1_790_000_000_000_000 + n as i64,
        speed_mps: (n % 2 == 0).then_some(n as f32 / 10.0),
        heading_deg: None,
        accuracy_m: (n % 5 == 0).then_some(3.5),
    }
}

fn batch(n: i32, size: usize) -> Batch {
    Batch {
        received_at: 1_790_000_000_000_000 + n as i64,
        positions: (0..size)
            .map(|i| pos(&format!("drv-{n}-{i}"), n + i as i32))
            .collect(),
    }
}

fn read_all(wal: &Wal, after: Lsn) -> Vec<(Lsn, Batch)> {
    wal.read_from(after)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    files
}

/// Appends `count` batches one after another (each its own group); returns them with their LSNs.
async fn append_sequentially(wal: &Wal, count: i32, size: usize) -> Vec<(Lsn, Batch)> {
    let mut out = Vec::new();
    for n in 0..count {
        let b = batch(n, size);
        let lsn = wal.append(&b).await.unwrap();
        out.push((lsn, b));
    }
    out
}

/// Flips one byte of `path` at `offset`.
fn flip(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

/// Runs `f` with a tracing subscriber that records formatted events; returns them too.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let make = {
        let sink = sink.clone();
        move || sink.clone()
    };
    let subscriber = tracing_subscriber::fmt()
        .with_writer(make)
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    (out, logs)
}

#[tokio::test]
async fn appends_read_back_across_segment_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open_with(dir.path(), FsyncPolicy::Always, 400).unwrap();
    assert_eq!(wal.end_lsn(), 0);
    let mut written = Vec::new();
    for n in 0..60 {
        let b = batch(n, 1 + (n as usize % 4));
        written.push((wal.append(&b).await.unwrap(), b));
    }
    assert!(written.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(wal.end_lsn(), written.last().unwrap().0);
    let files = segment_files(dir.path());
    assert!(files.len() > 5, "expected rotation, got {files:?}");
    let lens: Vec<u64> = files
        .iter()
        .map(|f| fs::metadata(f).unwrap().len())
        .collect();
    assert_eq!(wal.disk_bytes(), lens.iter().sum::<u64>());
    // Zeros are written ahead only up to the segment limit, and cut off finished segments; a
    // direct write may pad the active one to the end of its last block.
    let (active, finished) = lens.split_last().unwrap();
    assert!(
        finished.iter().all(|&len| len <= HEADER_LEN + 400),
        "{lens:?}"
    );
    assert!(
        *active <= (HEADER_LEN + 400).next_multiple_of(4096),
        "{lens:?}"
    );

    assert_eq!(read_all(&wal, 0), written);
    // From a record boundary (the fast path), and from inside a record (the fallback).
    assert_eq!(read_all(&wal, written[29].0), written[30..]);
    assert_eq!(read_all(&wal, written[29].0 + 3), written[30..]);
    assert!(read_all(&wal, wal.end_lsn()).is_empty());
    assert!(read_all(&wal, wal.end_lsn() + 100).is_empty());
    wal.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_distinct_lsns_and_share_fsyncs() {
    const TASKS: usize = 64;
    const EACH: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open_with(dir.path(), FsyncPolicy::Always, 64 << 10).unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let wal = wal.clone();
            tokio::spawn(async move {
                let mut lsns = Vec::new();
                for i in 0..EACH {
                    let b = Batch {
                        received_at: 0,
                        positions: vec![pos(&format!("t{t}"), i as i32)],
                    };
                    lsns.push(wal.append(&b).await.unwrap());
                }
                lsns
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        let lsns = task.await.unwrap();
        assert!(
            lsns.windows(2).all(|w| w[0] < w[1]),
            "one task's LSNs increase"
        );
        all.extend(lsns);
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), TASKS * EACH, "LSNs are distinct");

    let read: Vec<Lsn> = read_all(&wal, 0).into_iter().map(|(lsn, _)| lsn).collect();
    assert_eq!(read, all, "every append is read back, in LSN order");
    let fsyncs = wal.fsync_count();
    assert!(
        fsyncs * 4 < (TASKS * EACH) as u64,
        "{fsyncs} fsyncs for {} appends: group commit did not group",
        TASKS * EACH
    );
    wal.close().await.unwrap();
}

#[tokio::test]
async fn torn_tail_is_truncated_with_a_warning_and_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    let written = append_sequentially(&wal, 5, 3).await;
    wal.close().await.unwrap();
    let file = &segment_files(dir.path())[0];
    // Cut the last record in half, as a crash mid-write would.
    let last_start = HEADER_LEN + written[3].0;
    let cut = last_start + (written[4].0 - written[3].0) / 2;
    OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(cut)
        .unwrap();

    let (wal, logs) = capture_logs(|| Wal::open(dir.path(), FsyncPolicy::Always));
    let wal = wal.unwrap();
    assert!(logs.contains("WARN"), "{logs}");
    assert!(logs.contains("torn tail truncated"), "{logs}");
    assert!(logs.contains(&file.display().to_string()), "{logs}");
    assert!(logs.contains(&format!("offset={last_start}")), "{logs}");
    assert!(
        logs.contains(&format!("dropped_bytes={}", cut - last_start)),
        "{logs}"
    );
    assert_eq!(fs::metadata(file).unwrap().len(), last_start);
    assert_eq!(wal.end_lsn(), written[3].0);
    assert_eq!(read_all(&wal, 0), written[..4]);

    let again = batch(99, 2);
    let lsn = wal.append(&again).await.unwrap();
    wal.close().await.unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    let mut expected = written[..4].to_vec();
    expected.push((lsn, again));
    assert_eq!(read_all(&wal, 0), expected);
}

#[tokio::test]
async fn garbage_after_the_last_record_is_truncated() {
    use rand::{RngCore, SeedableRng};
    let mut garbage = vec![0u8; 2 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut garbage);
    let mut zeros_then_garbage = vec![0u8; 5000];
    zeros_then_garbage[4000] = 1;
    for tail in [garbage, zeros_then_garbage, vec![0xff; 7]] {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
        let written = append_sequentially(&wal, 4, 2).await;
        wal.close().await.unwrap();
        let file = &segment_files(dir.path())[0];
        let good_len = fs::metadata(file).unwrap().len();
        OpenOptions::new()
            .append(true)
            .open(file)
            .unwrap()
            .write_all(&tail)
            .unwrap();

        let started = Instant::now();
        let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
        // Every offset of the tail is searched for intact records; that must stay linear.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(fs::metadata(file).unwrap().len(), good_len);
        assert_eq!(read_all(&wal, 0), written);
        let lsn = wal.append(&batch(7, 1)).await.unwrap();
        assert_eq!(read_all(&wal, written[3].0), [(lsn, batch(7, 1))]);
        wal.close().await.unwrap();
    }
}

/// What a crash leaves of the space the writer pre-allocates: zeros after the last record. They are
/// kept (no warning, nothing truncated) and the next record goes right after the last one.
#[tokio::test]
async fn zeros_after_the_last_record_are_preallocated_space() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    let written = append_sequentially(&wal, 4, 2).await;
    let file = segment_files(dir.path())[0].clone();
    let data_end = HEADER_LEN + wal.end_lsn();
    let len = fs::metadata(&file).unwrap().len();
    assert!(
        len >= data_end + super::writer::PREALLOCATE_BYTES / 2,
        "{len} bytes for records ending at {data_end}: nothing written ahead"
    );
    assert_eq!(wal.disk_bytes(), len);
    drop(wal); // as a crash would leave it: not closed, so not trimmed

    let (wal, logs) = capture_logs(|| Wal::open(dir.path(), FsyncPolicy::Always));
    let wal = wal.unwrap();
    assert!(!logs.contains("torn"), "{logs}");
    assert_eq!(
        fs::metadata(&file).unwrap().len(),
        len,
        "the zeros are kept"
    );
    assert_eq!(wal.disk_bytes(), len);
    assert_eq!(read_all(&wal, 0), written);
    let lsn = wal.append(&batch(7, 1)).await.unwrap();
    assert_eq!(read_all(&wal, written[3].0), [(lsn, batch(7, 1))]);
    wal.close().await.unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_eq!(read_all(&wal, written[3].0), [(lsn, batch(7, 1))]);
    assert_eq!(fs::metadata(&file).unwrap().len(), HEADER_LEN + lsn);
}

#[tokio::test]
async fn corruption_in_a_non_last_segment_names_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open_with(dir.path(), FsyncPolicy::Always, 600).unwrap();
    let written = append_sequentially(&wal, 30, 2).await;
    wal.close().await.unwrap();
    let files = segment_files(dir.path());
    assert!(files.len() >= 3);
    // The second record of the first segment (which starts at LSN 0).
    let record_offset = HEADER_LEN + written[0].0;
    flip(&files[0], record_offset + 20);

    let err = Wal::open(dir.path(), FsyncPolicy::Always).err().unwrap();
    match &err {
        WalError::Corrupt { path, offset, .. } => {
            assert_eq!(path, &files[0]);
            assert_eq!(*offset, record_offset);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&files[0].display().to_string()), "{text}");
    assert!(text.contains(&format!("offset {record_offset}")), "{text}");
    // Nothing was truncated or deleted.
    assert_eq!(segment_files(dir.path()), files);
}

#[tokio::test]
async fn damage_in_the_last_segment_that_later_records_prove_synced_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    // Awaited one by one: each record is written after the previous one's fsync.
    let written = append_sequentially(&wal, 5, 2).await;
    wal.close().await.unwrap();
    let file = &segment_files(dir.path())[0];
    let len = fs::metadata(file).unwrap().len();
    let record_offset = HEADER_LEN + written[1].0;
    flip(file, record_offset + 12);

    let err = Wal::open(dir.path(), FsyncPolicy::Always).err().unwrap();
    assert!(
        matches!(&err, WalError::Corrupt { path, offset, .. } if path == file && *offset == record_offset),
        "{err}"
    );
    assert!(err.to_string().contains("not a torn write"), "{err}");
    assert_eq!(fs::metadata(file).unwrap().len(), len, "nothing truncated");
}

#[tokio::test]
async fn damage_never_synced_before_later_writes_counts_as_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Interval(Duration::from_secs(3600))).unwrap();
    let written = append_sequentially(&wal, 5, 2).await;
    assert_eq!(wal.fsync_count(), 0);
    wal.close().await.unwrap();
    let file = &segment_files(dir.path())[0];
    flip(file, HEADER_LEN + written[1].0 + 12);

    // No later record was written after a sync past the damage: it may be a reordered, interrupted
    // write, so the log resumes after the last record before it.
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_eq!(read_all(&wal, 0), written[..2]);
}

#[tokio::test]
async fn a_missing_middle_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open_with(dir.path(), FsyncPolicy::Always, 300).unwrap();
    append_sequentially(&wal, 20, 2).await;
    wal.close().await.unwrap();
    let files = segment_files(dir.path());
    assert!(files.len() >= 3);
    fs::remove_file(&files[1]).unwrap();
    let err = Wal::open(dir.path(), FsyncPolicy::Always).err().unwrap();
    assert!(
        matches!(&err, WalError::Corrupt { path, offset: 0, .. } if path == &files[2]),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");
}

#[tokio::test]
async fn remove_segments_before_deletes_only_covered_segments() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open_with(dir.path(), FsyncPolicy::Always, 500).unwrap();
    let written = append_sequentially(&wal, 40, 2).await;
    let files = segment_files(dir.path());
    let starts: Vec<Lsn> = files
        .iter()
        .map(|f| f.file_stem().unwrap().to_str().unwrap().parse().unwrap())
        .collect();
    assert!(starts.len() >= 4);
    let before = wal.disk_bytes();

    // An LSN inside the third segment covers the first two only.
    assert_eq!(wal.remove_segments_before(starts[2] + 1).unwrap(), 2);
    assert_eq!(segment_files(dir.path()), files[2..]);
    let removed_bytes: u64 = 2 * HEADER_LEN + (starts[2] - starts[0]);
    assert_eq!(wal.disk_bytes(), before - removed_bytes);
    assert_eq!(wal.start_lsn(), starts[2]);
    assert!(matches!(
        wal.read_from(0),
        Err(WalError::Removed { after: 0, first }) if first == starts[2]
    ));
    let kept: Vec<_> = written
        .iter()
        .filter(|(lsn, _)| *lsn > starts[2])
        .cloned()
        .collect();
    assert_eq!(read_all(&wal, starts[2]), kept);

    // The active segment is never removed, however far `lsn` is.
    let removed = wal.remove_segments_before(Lsn::MAX).unwrap();
    assert_eq!(removed, starts.len() - 3);
    assert_eq!(segment_files(dir.path()), files[files.len() - 1..]);
    assert_eq!(wal.remove_segments_before(Lsn::MAX).unwrap(), 0);

    let lsn = wal.append(&batch(1, 1)).await.unwrap();
    wal.close().await.unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_eq!(wal.end_lsn(), lsn);
    assert_eq!(wal.start_lsn(), *starts.last().unwrap());
}

#[tokio::test]
async fn reopen_after_close_keeps_end_lsn_and_disk_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open_with(dir.path(), FsyncPolicy::Always, 1000).unwrap();
    let written = append_sequentially(&wal, 25, 3).await;
    wal.close().await.unwrap();
    // Closing trims the space written ahead: the files hold records only.
    let (end, bytes) = (wal.end_lsn(), wal.disk_bytes());
    let files = segment_files(dir.path());
    let on_disk: u64 = files.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    assert_eq!(bytes, on_disk);
    assert_eq!(on_disk, HEADER_LEN * files.len() as u64 + end);

    let wal = Wal::open_with(dir.path(), FsyncPolicy::Always, 1000).unwrap();
    assert_eq!((wal.end_lsn(), wal.disk_bytes()), (end, bytes));
    let next = wal.append(&batch(100, 1)).await.unwrap();
    assert!(next > end);
    assert_eq!(read_all(&wal, 0)[..written.len()], written);
    wal.close().await.unwrap();
}

#[tokio::test]
async fn interval_policy_acknowledges_without_fsync_and_syncs_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Interval(Duration::from_secs(3600))).unwrap();
    append_sequentially(&wal, 50, 1).await;
    assert_eq!(wal.fsync_count(), 0, "no fsync per append");
    wal.close().await.unwrap();
    assert_eq!(wal.fsync_count(), 1, "close syncs");

    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Interval(Duration::from_millis(20))).unwrap();
    wal.append(&batch(1, 1)).await.unwrap();
    let started = Instant::now();
    while wal.fsync_count() == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "never synced");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Idle and clean: no more fsyncs.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(wal.fsync_count(), 1);
    wal.close().await.unwrap();
}

#[tokio::test]
async fn a_failed_fsync_breaks_the_log_for_good() {
    for buffered in [false, true] {
        a_failed_commit_breaks_the_log(buffered).await;
    }
}

async fn a_failed_commit_breaks_the_log(buffered: bool) {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    if buffered {
        wal.buffered_only();
    }
    let written = append_sequentially(&wal, 2, 1).await;
    assert_eq!(wal.direct_commits(), !buffered);
    wal.fail_next_sync();
    let err = wal.append(&batch(5, 1)).await.unwrap_err();
    assert!(
        matches!(&err, WalError::Broken(why) if why.contains("injected")),
        "{err}"
    );
    assert!(matches!(
        wal.append(&batch(6, 1)).await,
        Err(WalError::Broken(_))
    ));
    assert!(matches!(wal.close().await, Err(WalError::Broken(_))));
    // The acknowledged records are intact; a restart takes writes again.
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_eq!(read_all(&wal, 0)[..2], written);
    wal.append(&batch(7, 1)).await.unwrap();
}

#[tokio::test]
async fn appends_after_close_fail_and_close_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    wal.append(&batch(1, 1)).await.unwrap();
    wal.close().await.unwrap();
    assert!(matches!(
        wal.append(&batch(2, 1)).await,
        Err(WalError::Closed)
    ));
    wal.close().await.unwrap();
}

#[tokio::test]
async fn an_oversized_batch_is_refused_before_it_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    let huge_id = "x".repeat(1 << 20);
    let b = Batch {
        received_at: 0,
        positions: (0..17).map(|i| pos(&huge_id, i)).collect(),
    };
    assert!(matches!(
        wal.append(&b).await,
        Err(WalError::TooLarge { .. })
    ));
    wal.append(&batch(1, 1)).await.unwrap();
}

#[test]
fn fsync_policy_parses_and_displays() {
    assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
    assert_eq!(
        "interval:250ms".parse(),
        Ok(FsyncPolicy::Interval(Duration::from_millis(250)))
    );
    assert_eq!(
        "interval:1s".parse::<FsyncPolicy>().unwrap().to_string(),
        "interval:1s"
    );
    assert_eq!(FsyncPolicy::Always.to_string(), "always");
    assert_eq!(FsyncPolicy::default(), FsyncPolicy::Always);
    for bad in [
        "",
        "never",
        "Always",
        "interval",
        "interval:",
        "interval:soon",
    ] {
        let err = bad.parse::<FsyncPolicy>().unwrap_err().to_string();
        assert!(err.contains("interval"), "{bad:?}: {err}");
    }
    let zero = "interval:0s".parse::<FsyncPolicy>().unwrap_err();
    assert!(zero.to_string().contains("above zero"), "{zero}");
}

#[test]
fn wal_is_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Wal>();
}

/// Throughput of the log on this machine's disk. Run with
/// `cargo test --release --lib wal::tests::bench -- --ignored --nocapture`
/// (`WAL_BENCH_DIR` picks the file system; default: the temp dir).
#[test]
#[ignore]
fn bench_group_commit() {
    let base = std::env::var_os("WAL_BENCH_DIR").map(PathBuf::from);
    let tempdir = || match &base {
        Some(base) => tempfile::tempdir_in(base).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let run = Duration::from_secs(3);
    for policy in [
        FsyncPolicy::Always,
        FsyncPolicy::Interval(Duration::from_millis(100)),
    ] {
        for (tasks, size) in [(64, 1), (1, 1000), (8, 1000)] {
            let dir = tempdir();
            let (appends, fsyncs, secs, bytes) = runtime.block_on(async {
                let wal = Wal::open(dir.path(), policy).unwrap();
                let started = Instant::now();
                let handles: Vec<_> = (0..tasks)
                    .map(|t| {
                        let wal = wal.clone();
                        let b = batch(t, size);
                        tokio::spawn(async move {
                            let mut n = 0u64;
                            while started.elapsed() < run {
                                wal.append(&b).await.unwrap();
                                n += 1;
                            }
                            n
                        })
                    })
                    .collect();
                let mut appends = 0;
                for h in handles {
                    appends += h.await.unwrap();
                }
                let secs = started.elapsed().as_secs_f64();
                let fsyncs = wal.fsync_count();
                let bytes = wal.disk_bytes();
                wal.close().await.unwrap();
                (appends, fsyncs, secs, bytes)
            });
            println!(
                "{policy:<16} {tasks:>2} tasks x {size:>4} positions: {:>9.0} appends/s, \
                 {:>10.0} positions/s, {:>6} fsyncs ({:.1} appends/fsync), {:.1} bytes/position",
                appends as f64 / secs,
                (appends * size as u64) as f64 / secs,
                fsyncs,
                appends as f64 / fsyncs.max(1) as f64,
                bytes as f64 / (appends * size as u64) as f64,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_reads_behind_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open_with(dir.path(), FsyncPolicy::Always, 2000).unwrap();
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let wal = wal.clone();
            tokio::spawn(async move {
                for n in 0..100 {
                    wal.append(&batch(t * 1000 + n, 3)).await.unwrap();
                }
            })
        })
        .collect();
    // Follow as the history follower does: from the last LSN seen, until everything is read.
    let mut seen = 0;
    let mut records = 0;
    while records < 400 {
        for record in wal.read_from(seen).unwrap() {
            let (lsn, b) = record.unwrap();
            assert!(lsn > seen);
            assert_eq!(b.positions.len(), 3);
            seen = lsn;
            records += 1;
        }
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(seen, wal.end_lsn());
    assert!(segment_files(dir.path()).len() > 5);
    wal.close().await.unwrap();
}

#[tokio::test]
async fn a_slow_inline_write_moves_writes_to_the_blocking_pool() {
    // (slow writes, offload ends at once, groups written on the pool): the first group goes to
    // the pool either way (it writes the zeros ahead), the next three are written inline; after
    // three slow ones in a row, the other three go to the pool too, unless the offload is already
    // over.
    for (slow, brief, pool) in [(false, false, 1), (true, false, 4), (true, true, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
        wal.buffered_only(); // direct commits never write on the worker
        if slow {
            wal.make_writes_slow();
        }
        if brief {
            wal.offload_briefly();
        }
        let written = append_sequentially(&wal, 7, 3).await;
        assert_eq!(wal.pool_writes(), pool, "slow: {slow}, brief: {brief}");
        assert_eq!(read_all(&wal, 0), written);
        wal.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_slow_direct_submit_moves_submits_off_the_worker() {
    // (slow submits, offload ends at once, submits off the worker): the first three groups are
    // submitted on the worker; after three slow ones in a row, the other four are submitted off it
    // (on a runtime with a single worker, whose tasks then move to another thread), unless the
    // offload is already over.
    for (slow, brief, off_worker) in [(false, false, 0), (true, false, 4), (true, true, 0)] {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
        if slow {
            wal.make_writes_slow();
        }
        if brief {
            wal.offload_briefly();
        }
        let written = append_sequentially(&wal, 7, 3).await;
        assert!(wal.direct_commits(), "this file system takes direct I/O");
        assert_eq!(
            wal.off_worker_submits(),
            off_worker,
            "slow: {slow}, brief: {brief}"
        );
        assert_eq!(
            wal.writing_off_worker(),
            slow && !brief,
            "what metrics show"
        );
        assert_eq!(
            wal.pool_writes(),
            0,
            "direct commits write nothing on the pool"
        );
        assert_eq!(read_all(&wal, 0), written);
        drop(wal);
        // Reopened as after a crash: the records submitted off the worker are on disk too.
        let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
        assert_eq!(read_all(&wal, 0), written);
        wal.close().await.unwrap();
    }
}

/// Appends batches `from..to` of varying sizes, one after another; returns them with their LSNs.
async fn append_range(wal: &Wal, from: i32, to: i32) -> Vec<(Lsn, Batch)> {
    let mut out = Vec::new();
    for n in from..to {
        let b = batch(n, 1 + (n as usize * 7) % 40);
        out.push((wal.append(&b).await.unwrap(), b));
    }
    out
}

#[tokio::test]
async fn direct_commits_rewrite_the_tail_block_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    // Groups of one record each, many ending mid-block: each commit rewrites the partial block
    // with the records already in it.
    let mut written = append_range(&wal, 0, 150).await;
    assert!(wal.direct_commits(), "this file system takes direct I/O");
    assert!(wal.end_lsn() > 3 * 4096, "spans several blocks");
    assert_eq!(read_all(&wal, 0), written);
    // Dropped without a close, as on a crash: every acknowledged record is on disk already.
    drop(wal);
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_ne!(
        wal.end_lsn() % 4096,
        0,
        "reopened with a partial last block"
    );
    written.extend(append_range(&wal, 150, 300).await);
    assert!(wal.direct_commits());
    wal.close().await.unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_eq!(read_all(&wal, 0), written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_direct_commits_lose_nothing_across_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open_with(dir.path(), FsyncPolicy::Always, 6000).unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let wal = wal.clone();
            tokio::spawn(async move { append_range(&wal, t * 1000, t * 1000 + 60).await })
        })
        .collect();
    let mut written = Vec::new();
    for t in tasks {
        written.extend(t.await.unwrap());
    }
    assert!(wal.direct_commits());
    assert!(
        wal.fsync_count() < written.len() as u64,
        "groups share commits"
    );
    written.sort_by_key(|(lsn, _)| *lsn);
    assert!(segment_files(dir.path()).len() > 3, "rotated");
    drop(wal);
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_eq!(read_all(&wal, 0), written);
}

#[tokio::test]
async fn a_direct_commit_larger_than_the_kept_buffer_is_followed_by_small_ones() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    let mut written = append_range(&wal, 0, 3).await;
    // ~9 MiB in one record: the tail's buffer grows past what it keeps, then shrinks back with
    // the partial block carried over.
    let big_id = "y".repeat(1 << 20);
    let big = Batch {
        received_at: 7,
        positions: (0..9).map(|i| pos(&big_id, i)).collect(),
    };
    written.push((wal.append(&big).await.unwrap(), big));
    written.extend(append_range(&wal, 3, 40).await);
    assert!(wal.direct_commits());
    drop(wal);
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_eq!(read_all(&wal, 0), written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn large_groups_poll_for_their_write_and_single_appends_sleep() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    // One append at a time (light load): groups of one, whose writes are slept on.
    let mut written = append_sequentially(&wal, 20, 2).await;
    assert!(wal.direct_commits(), "this file system takes direct I/O");
    assert_eq!(wal.polled_commits(), 0, "a quiet log polls for nothing");
    // 64 appenders at once on the only worker: they stage before the writer takes a group, so
    // the groups are large, and their writes are polled for.
    let appenders: Vec<_> = (0..64)
        .map(|n| {
            let wal = wal.clone();
            tokio::spawn(async move {
                let b = batch(1000 + n, 2);
                (wal.append(&b).await.unwrap(), b)
            })
        })
        .collect();
    for appender in appenders {
        written.push(appender.await.unwrap());
    }
    assert!(
        wal.polled_commits() > 0,
        "no group of 64 appends was polled for"
    );
    written.sort_by_key(|(lsn, _)| *lsn);
    assert_eq!(read_all(&wal, 0), written);
    drop(wal);
    // Reopened as after a crash: every polled-for write is on disk.
    let wal = Wal::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_eq!(read_all(&wal, 0), written);
    wal.close().await.unwrap();
}
