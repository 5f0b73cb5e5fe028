//! Splitting an encoded (run-length) dirty bitmap into [`BitmapChunk`] frames and putting it
//! back together. The bitmap's bytes are opaque here: the metadata room encodes and decodes them.
//!
//! Invariant: [`BitmapAssembler`] returns a bitmap only when chunks arrived in order, without
//! gap or overlap, all announcing the same total, and never holds more than its limit.

use bytes::{Bytes, BytesMut};

use super::message::BitmapChunk;

/// Splits `encoded` into chunks of at most `max_chunk` bytes (at least one chunk, even for an
/// empty bitmap, so the receiver always learns the total).
pub fn split(encoded: &Bytes, max_chunk: usize) -> Vec<BitmapChunk> {
    let max_chunk = max_chunk.max(1);
    let total_len = encoded.len() as u64;
    if encoded.is_empty() {
        return vec![BitmapChunk {
            offset: 0,
            total_len,
            data: Bytes::new(),
        }];
    }
    (0..encoded.len())
        .step_by(max_chunk)
        .map(|start| {
            let end = (start + max_chunk).min(encoded.len());
            BitmapChunk {
                offset: start as u64,
                total_len,
                data: encoded.slice(start..end),
            }
        })
        .collect()
}

/// A chunk that does not continue the bitmap being received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The announced total exceeds what this node accepts.
    #[error("peer announces a {total} byte bitmap, more than the limit of {max}: the peer's device or bitmap granularity differs; check both nodes' volume configuration")]
    TooLarge {
        /// Announced total.
        total: u64,
        /// The limit.
        max: u64,
    },
    /// A chunk's total differs from the first chunk's.
    #[error("bitmap chunk announces total {got}, earlier chunks announced {want}")]
    TotalChanged {
        /// Total of the first chunk.
        want: u64,
        /// Total of this chunk.
        got: u64,
    },
    /// A chunk does not start where the previous one ended.
    #[error("bitmap chunk at offset {got}, expected {want}: chunks lost or reordered")]
    OutOfOrder {
        /// Where the next chunk must start.
        want: u64,
        /// Where it starts.
        got: u64,
    },
}

/// Collects consecutive chunks into the whole encoded bitmap.
#[derive(Debug)]
pub struct BitmapAssembler {
    max_total: u64,
    total: Option<u64>,
    buf: BytesMut,
}

impl BitmapAssembler {
    /// An assembler refusing bitmaps longer than `max_total` bytes.
    pub fn new(max_total: u64) -> Self {
        Self {
            max_total,
            total: None,
            buf: BytesMut::new(),
        }
    }

    /// Adds a chunk; returns the whole bitmap when this chunk completes it (and resets).
    pub fn push(&mut self, c: &BitmapChunk) -> Result<Option<Bytes>, BitmapError> {
        if c.total_len > self.max_total {
            return Err(BitmapError::TooLarge {
                total: c.total_len,
                max: self.max_total,
            });
        }
        match self.total {
            None => {
                if c.offset != 0 {
                    return Err(BitmapError::OutOfOrder {
                        want: 0,
                        got: c.offset,
                    });
                }
                self.total = Some(c.total_len);
            }
            Some(t) if t != c.total_len => {
                return Err(BitmapError::TotalChanged {
                    want: t,
                    got: c.total_len,
                })
            }
            Some(_) => {}
        }
        let have = self.buf.len() as u64;
        if c.offset != have {
            return Err(BitmapError::OutOfOrder {
                want: have,
                got: c.offset,
            });
        }
        self.buf.extend_from_slice(&c.data);
        if self.buf.len() as u64 == c.total_len {
            self.total = None;
            return Ok(Some(std::mem::take(&mut self.buf).freeze()));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn split_then_assemble_gives_the_bitmap_back(data in proptest::collection::vec(any::<u8>(), 0..5000), chunk in 1usize..1200) {
            let b = Bytes::from(data);
            let mut a = BitmapAssembler::new(1 << 20);
            let chunks = split(&b, chunk);
            let last = chunks.len() - 1;
            for (i, c) in chunks.iter().enumerate() {
                let r = a.push(c).unwrap();
                if i == last { prop_assert_eq!(r, Some(b.clone())); } else { prop_assert_eq!(r, None); }
            }
        }
    }

    #[test]
    fn lost_chunk_is_detected() {
        let b = Bytes::from(vec![5u8; 100]);
        let chunks = split(&b, 30);
        let mut a = BitmapAssembler::new(1000);
        a.push(&chunks[0]).unwrap();
        assert_eq!(
            a.push(&chunks[2]),
            Err(BitmapError::OutOfOrder { want: 30, got: 60 })
        );
    }

    #[test]
    fn oversized_bitmap_is_refused_before_buffering() {
        let mut a = BitmapAssembler::new(10);
        let c = BitmapChunk {
            offset: 0,
            total_len: 1 << 40,
            data: Bytes::from_static(b"x"),
        };
        assert!(matches!(a.push(&c), Err(BitmapError::TooLarge { .. })));
    }
}
