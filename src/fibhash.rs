//! Maps keyed by small integers this node hands out or bounds itself (the volume's sequence
//! numbers and write ids, the activity log's extent numbers), hashed with one multiply.
//!
//! Such keys need no protection against colliding keys: the volume's are handed out in order
//! (the peer's acks only look keys up, they never insert one), and the activity log's are
//! bounded by the device size in a map bounded by its slot count. SipHash, the standard
//! library's default, took 0.2% of the Primary's core for the volume's two maps in the async
//! 4k benchmark (docs/BENCHMARKS.md).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` from an integer key of the kinds above to `V`, hashed by [`FibHasher`].
pub type FibMap<K, V> = HashMap<K, V, BuildHasherDefault<FibHasher>>;

/// Fibonacci hashing: the key times 2^64 / φ. Multiplying by an odd constant is a bijection on
/// every run of low bits (consecutive keys fill distinct buckets), and the high bits, which
/// hashbrown uses as its tag, depend on the whole key.
///
/// Invariant: integer keys go through `write_u32` / `write_u64`, one multiply each; `write`
/// (other key types) folds the bytes in one multiply per byte, so equal inputs still hash
/// equally.
#[derive(Debug, Default, Clone, Copy)]
pub struct FibHasher(u64);

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for FibHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(GOLDEN);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(GOLDEN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    #[test]
    fn consecutive_keys_land_in_distinct_buckets_and_distinct_tags_spread() {
        let b = BuildHasherDefault::<FibHasher>::default();
        // Bucket index = low bits; 1024 consecutive keys fill 1024 buckets exactly.
        let buckets: HashSet<u64> = (5000..6024u64).map(|k| b.hash_one(k) & 1023).collect();
        assert_eq!(buckets.len(), 1024);
        // hashbrown's tag is the top 7 bits: consecutive keys use all 128 values.
        let tags: HashSet<u64> = (0..4096u64).map(|k| b.hash_one(k) >> 57).collect();
        assert_eq!(tags.len(), 128);
    }

    #[test]
    fn the_map_behaves_as_a_map() {
        let mut m: FibMap<u64, u64> = FibMap::default();
        for k in 0..10_000u64 {
            m.insert(k * 3, k);
        }
        for k in (0..10_000u64).step_by(2) {
            assert_eq!(m.remove(&(k * 3)), Some(k));
        }
        assert_eq!(m.len(), 5_000);
        assert!((1..10_000u64)
            .step_by(2)
            .all(|k| m.get(&(k * 3)) == Some(&k)));
        assert_eq!(m.get(&1), None);
    }
}
