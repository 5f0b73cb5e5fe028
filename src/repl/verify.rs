//! Online verify and checksum comparison, pure: per-block CRC32 digests of a region, the
//! blocks whose digests differ, and the regions a device is walked in. No I/O.

use std::ops::Range;

/// Bytes covered by one verify digest.
pub const VERIFY_BLOCK: u32 = 4096;
/// Bytes compared per VerifyRequest (one round trip; application writes to the region wait).
pub const VERIFY_REGION: u64 = 1 << 20;

/// Whether `block_size` is one the wire accepts for digests: a power of two in 512..=1 MiB.
pub fn valid_block_size(block_size: u32) -> bool {
    block_size.is_power_of_two() && (512..=1 << 20).contains(&block_size)
}

/// One CRC32 (crc32fast) per `block_size` bytes of `data`; the last block may be shorter.
/// Invariant: the result has `ceil(data.len() / block_size)` entries.
pub fn block_crcs(data: &[u8], block_size: u32) -> Vec<u32> {
    data.chunks(block_size.max(1) as usize)
        .map(crc32fast::hash)
        .collect()
}

/// Indexes of the blocks whose digests differ, or `None` when the two lists do not describe
/// the same number of blocks (a peer answering a different region).
pub fn differing_blocks(ours: &[u32], theirs: &[u32]) -> Option<Vec<usize>> {
    if ours.len() != theirs.len() {
        return None;
    }
    Some(
        ours.iter()
            .zip(theirs)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect(),
    )
}

/// `0..size` cut into consecutive regions of at most `region` bytes (`region > 0`).
pub fn regions(size: u64, region: u64) -> impl Iterator<Item = Range<u64>> {
    let region = region.max(1);
    (0..size.div_ceil(region)).map(move |i| i * region..((i + 1) * region).min(size))
}

/// The byte range of block `index` of a region starting at `offset` and `length` long.
pub fn block_range(offset: u64, length: u64, block_size: u32, index: usize) -> Range<u64> {
    let start = offset + index as u64 * u64::from(block_size);
    start..(start + u64::from(block_size)).min(offset + length)
}

/// For a resync piece starting at `offset` (chunk-aligned) and `length` long, compared in
/// `block_size` blocks of which `differing` (indexes) differ: the piece cut into runs of whole
/// bitmap chunks (`chunk` bytes; the last run may end with the piece), each with whether it
/// is in sync (no differing block). Consecutive chunks of the same kind form one run.
/// Invariant: the runs cover the piece exactly, in order.
pub fn chunk_runs(
    offset: u64,
    length: u64,
    block_size: u32,
    chunk: u64,
    differing: &[usize],
) -> Vec<(Range<u64>, bool)> {
    let end = offset + length;
    let chunk = chunk.max(1);
    let mut out: Vec<(Range<u64>, bool)> = Vec::new();
    let mut pos = offset;
    let mut d = differing.iter().peekable();
    while pos < end {
        let next = ((pos / chunk + 1) * chunk).min(end);
        let mut in_sync = true;
        while let Some(&&i) = d.peek() {
            let b = block_range(offset, length, block_size, i);
            if b.start >= next {
                break;
            }
            if b.end > pos {
                in_sync = false;
            }
            d.next();
        }
        match out.last_mut() {
            Some((r, s)) if *s == in_sync => r.end = next,
            _ => out.push((pos..next, in_sync)),
        }
        pos = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn identical_data_has_no_differing_block(data in proptest::collection::vec(any::<u8>(), 0..20000), shift in 9u32..14) {
            let bs = 1u32 << shift;
            let d = block_crcs(&data, bs);
            prop_assert_eq!(d.len(), data.len().div_ceil(bs as usize));
            prop_assert_eq!(differing_blocks(&d, &d), Some(vec![]));
        }

        #[test]
        fn one_changed_byte_is_found_in_exactly_its_block(data in proptest::collection::vec(any::<u8>(), 1..20000), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let i = at.index(data.len());
            let mut other = data.clone();
            other[i] ^= flip;
            let (a, b) = (block_crcs(&data, 4096), block_crcs(&other, 4096));
            prop_assert_eq!(differing_blocks(&a, &b), Some(vec![i / 4096]));
            let r = block_range(0, data.len() as u64, 4096, i / 4096);
            prop_assert!(r.contains(&(i as u64)));
        }

        #[test]
        fn regions_cover_the_device_once_in_order(size in 0u64..1 << 40, region in 1u64..1 << 30) {
            let mut next = 0;
            let mut n = 0u64;
            for r in regions(size, region).take(10_000) {
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end > r.start && r.end - r.start <= region);
                next = r.end;
                n += 1;
            }
            if n < 10_000 {
                prop_assert_eq!(next, size);
            }
        }
    }

    proptest! {
        #[test]
        fn chunk_runs_cover_the_piece_and_only_chunks_with_a_differing_block_are_sent(
            chunks in 1u64..12, shift in 12u32..17, diff in proptest::collection::btree_set(0usize..400, 0..10)
        ) {
            let chunk = 1u64 << shift;
            let length = chunks * chunk - 4096;
            let offset = 5 * chunk;
            let nblocks = length.div_ceil(4096) as usize;
            let diff: Vec<usize> = diff.into_iter().filter(|&i| i < nblocks).collect();
            let runs = chunk_runs(offset, length, 4096, chunk, &diff);
            let mut pos = offset;
            for (r, in_sync) in &runs {
                prop_assert_eq!(r.start, pos);
                pos = r.end;
                for &i in &diff {
                    let b = block_range(offset, length, 4096, i);
                    if b.start < r.end && r.start < b.end {
                        prop_assert!(!in_sync);
                    }
                }
                if !in_sync {
                    // every chunk of a sent run holds a differing block
                    let mut c = r.start;
                    while c < r.end {
                        let ce = ((c / chunk + 1) * chunk).min(r.end);
                        let has_diff = diff.iter().any(|&i| {
                            let b = block_range(offset, length, 4096, i);
                            b.start < ce && c < b.end
                        });
                        prop_assert!(has_diff, "sent chunk at {} has no differing block", c);
                        c = ce;
                    }
                }
            }
            prop_assert_eq!(pos, offset + length);
        }
    }

    #[test]
    fn digests_of_different_lengths_are_refused() {
        assert_eq!(differing_blocks(&[1, 2], &[1]), None);
    }

    #[test]
    fn wire_block_sizes() {
        assert!(valid_block_size(512) && valid_block_size(4096) && valid_block_size(1 << 20));
        assert!(!valid_block_size(256) && !valid_block_size(3000) && !valid_block_size(2 << 20));
    }
}
