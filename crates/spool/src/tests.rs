use super::*;
use proptest::prelude::*;

fn cfg(segment_bytes: u64, max_bytes: u64) -> SpoolConfig {
    SpoolConfig {
        segment_bytes,
        max_bytes,
        fsync: FsyncPolicy::OnCommit,
    }
}

fn payload(i: u64) -> Vec<u8> {
    format!(
        "{{\"event\":{i},\"pad\":\"{}\"}}",
        "x".repeat((i % 50) as usize)
    )
    .into_bytes()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn appends_read_back_in_order_across_segments_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, r) = Spool::open(dir.path(), cfg(1024, 1 << 30)).unwrap();
    assert_eq!(r, Recovery::default());
    for i in 1..=200 {
        assert_eq!(s.append(&payload(i)).unwrap(), i);
    }
    s.commit().unwrap();
    assert!(segments(dir.path()).len() > 5, "rolled segments");
    let all = s.read_from(1, 1000).unwrap();
    assert_eq!(all.len(), 200);
    assert!(all.iter().all(|(seq, p)| *p == payload(*seq)));
    drop(s);
    let (s, r) = Spool::open(dir.path(), cfg(1024, 1 << 30)).unwrap();
    assert_eq!(r.records, 200);
    assert!(r.torn_tail.is_none() && r.corrupt.is_empty());
    assert_eq!(s.next_seq(), 201);
    assert_eq!(
        s.read_from(150, 10).unwrap().first().map(|x| x.0),
        Some(150)
    );
}

#[test]
fn ack_trims_whole_segments_and_is_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = Spool::open(dir.path(), cfg(1024, 1 << 30)).unwrap();
    for i in 1..=200 {
        s.append(&payload(i)).unwrap();
    }
    s.commit().unwrap();
    let before = segments(dir.path()).len();
    s.ack(120).unwrap();
    assert!(segments(dir.path()).len() < before);
    assert_eq!(s.backlog(), 80);
    assert_eq!(
        s.read_from(1, 1).unwrap().first().map(|x| x.0),
        Some(121),
        "acknowledged records are not re-read"
    );
    drop(s);
    let (s, _) = Spool::open(dir.path(), cfg(1024, 1 << 30)).unwrap();
    assert_eq!(s.acked(), 120);
    assert_eq!(s.read_from(1, 1).unwrap().first().map(|x| x.0), Some(121));
    // Everything acknowledged: sequence numbers still continue after a restart.
    let (mut s, _) = (s, ());
    s.ack(200).unwrap();
    drop(s);
    let (mut s, _) = Spool::open(dir.path(), cfg(1024, 1 << 30)).unwrap();
    assert_eq!(s.append(b"next").unwrap(), 201);
}

#[test]
fn a_full_spool_refuses_instead_of_dropping() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = Spool::open(dir.path(), cfg(4096, 2048)).unwrap();
    let mut n = 0;
    let err = loop {
        match s.append(&payload(7)) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    s.commit().unwrap();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert!(n > 10);
    assert_eq!(
        s.read_from(1, 10_000).unwrap().len(),
        n,
        "nothing accepted was lost"
    );
    // Acknowledging frees room again once whole segments go.
    assert!(matches!(s.append(b"x"), Err(SpoolError::Full { .. })));
}

#[test]
fn a_torn_tail_is_cut_and_reported_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
    for i in 1..=10 {
        s.append(&payload(i)).unwrap();
    }
    s.commit().unwrap();
    drop(s);
    let seg = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let (mut s, r) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
    let (path, _, dropped) = r.torn_tail.clone().expect("torn tail reported");
    assert_eq!(path, seg);
    assert!(dropped > 0);
    assert_eq!(r.records, 9);
    assert_eq!(
        s.next_seq(),
        10,
        "the torn record's number is reused: it was never acknowledged as written"
    );
    s.append(b"after").unwrap();
    s.commit().unwrap();
    drop(s);
    let (s, r) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
    assert!(r.torn_tail.is_none() && r.corrupt.is_empty(), "{r:?}");
    assert_eq!(s.read_from(1, 100).unwrap().len(), 10);
}

#[test]
fn a_flipped_byte_mid_segment_loses_only_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
    let mut offsets = Vec::new();
    for i in 1..=10 {
        offsets.push(s.bytes());
        s.append(&payload(i)).unwrap();
    }
    s.commit().unwrap();
    drop(s);
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // Flip a payload byte of record 5.
    let at = offsets[4] as usize + FRAME + 3;
    bytes[at] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let (s, r) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
    assert_eq!(r.corrupt, vec![(seg, offsets[4])]);
    assert!(r.torn_tail.is_none());
    let seqs: Vec<u64> = s
        .read_from(1, 100)
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
    assert_eq!(s.next_seq(), 11);
}

#[test]
fn always_policy_syncs_every_append() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = Spool::open(
        dir.path(),
        SpoolConfig {
            fsync: FsyncPolicy::Always,
            ..cfg(1 << 20, 1 << 30)
        },
    )
    .unwrap();
    s.append(b"a").unwrap();
    assert!(!s.dirty);
    let dir2 = tempfile::tempdir().unwrap();
    let (mut s2, _) = Spool::open(dir2.path(), cfg(1 << 20, 1 << 30)).unwrap();
    s2.append(b"a").unwrap();
    assert!(s2.dirty);
    assert!(
        s2.read_from(1, 10).unwrap().is_empty(),
        "uncommitted records are not visible"
    );
    s2.commit().unwrap();
    assert!(!s2.dirty);
    assert_eq!(s2.read_from(1, 10).unwrap().len(), 1);
}

#[test]
fn uncommitted_records_are_lost_in_a_crash_and_their_numbers_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
    for i in 1..=5 {
        s.append(&payload(i)).unwrap();
    }
    s.commit().unwrap();
    s.append(&payload(6)).unwrap();
    std::mem::forget(s); // a crash: no destructor, nothing more written
    let (s, r) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
    assert_eq!(r.records, 5);
    assert_eq!(s.next_seq(), 6);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Any window (start, count) reads exactly those records, across segment boundaries,
    /// acknowledged records skipped and uncommitted ones invisible.
    #[test]
    fn read_from_returns_exactly_the_window(n in 1u64..300, acked in 0u64..300, from in 0u64..320, max in 0usize..400, segment in 200u64..3000) {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), cfg(segment, 1 << 30)).unwrap();
        for i in 1..=n {
            s.append(&payload(i)).unwrap();
        }
        s.commit().unwrap();
        s.append(&payload(n + 1)).unwrap(); // not committed
        let acked = acked.min(n);
        s.ack(acked).unwrap();
        let got = s.read_from(from, max).unwrap();
        let first = from.max(acked + 1);
        let want: Vec<u64> = (first..=n).take(max).collect();
        prop_assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), want);
        for (seq, p) in &got {
            prop_assert_eq!(p, &payload(*seq));
        }
    }

    /// Whatever prefix of the last segment survives a crash, recovery never panics and
    /// yields exactly a prefix of what was appended.
    #[test]
    fn recovery_after_any_truncation_yields_a_prefix(n in 1u64..60, cut in 0u64..4000, flip in proptest::option::of((0usize..4000, any::<u8>()))) {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
        for i in 1..=n {
            s.append(&payload(i)).unwrap();
        }
        s.commit().unwrap();
        drop(s);
        let seg = segments(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        let keep = (HEADER as u64 + cut).min(bytes.len() as u64) as usize;
        bytes.truncate(keep);
        if let Some((i, b)) = flip {
            if i >= HEADER && i < bytes.len() { bytes[i] ^= b | 1; }
        }
        std::fs::write(&seg, &bytes).unwrap();
        let (s, _) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
        let got = s.read_from(1, 1000).unwrap();
        let mut last = 0;
        for (seq, p) in &got {
            prop_assert!(*seq > last && *seq <= n);
            prop_assert_eq!(p, &payload(*seq));
            last = *seq;
        }
    }
}

#[test]
fn last_record_survives_acknowledgement_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
    assert_eq!(s.last_record().unwrap(), None);
    for i in 1..=100 {
        s.append(&payload(i)).unwrap();
    }
    assert_eq!(
        s.last_record().unwrap(),
        None,
        "uncommitted records are not visible"
    );
    s.commit().unwrap();
    s.ack(100).unwrap();
    assert!(s.read_from(1, 10).unwrap().is_empty());
    assert_eq!(s.last_record().unwrap(), Some((100, payload(100))));
    drop(s);
    let (s, _) = Spool::open(dir.path(), cfg(1 << 20, 1 << 30)).unwrap();
    assert_eq!(s.last_record().unwrap(), Some((100, payload(100))));
    assert_eq!(s.next_seq(), 101);
}
