//! Receiving the peer's dirty bitmap after the Hellos, with a typed error for each way it can
//! fail so the session can count corrupt frames without reading message text.

use std::time::Duration;

use crate::meta::bitmap::{self as meta_bitmap, BitmapGeometry, DirtyBitmap};
use crate::repl::link::{LinkError, ThreadedReader};
use crate::repl::wire::bitmap::{BitmapAssembler, BitmapError};
use crate::repl::wire::message::MessageKind;
use crate::repl::wire::{DisconnectReason, Message};

/// Why the peer's bitmap did not arrive whole; every variant ends the connection attempt.
#[derive(Debug, thiserror::Error)]
pub enum BitmapExchangeError {
    /// Nothing (or not all of it) arrived within the timeout.
    #[error("peer sent no bitmap within {0:?}; the peer is overloaded or the link drops packets")]
    Timeout(Duration),
    /// The link failed while receiving.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A chunk did not continue the bitmap being received.
    #[error(transparent)]
    Chunk(#[from] BitmapError),
    /// The assembled bitmap does not decode at this volume's geometry.
    #[error("peer's bitmap: {0}")]
    Decode(#[from] meta_bitmap::BitmapError),
    /// The peer ended the connection instead of sending its bitmap.
    #[error("peer refused: {reason:?}: {detail}")]
    PeerRefused {
        /// The peer's reason.
        reason: DisconnectReason,
        /// The peer's words.
        detail: String,
    },
    /// Another message came where a bitmap chunk was due.
    #[error("expected the peer's bitmap, got {0:?}; run the same twinvol version on both nodes")]
    Unexpected(MessageKind),
}

impl BitmapExchangeError {
    /// True when the peer's bytes failed frame verification (checksum, magic, length): the
    /// frame was refused and counts as a corrupt frame.
    pub fn is_corrupt_frame(&self) -> bool {
        matches!(self, Self::Link(e) if e.is_corrupt_frame())
    }
}

/// Receives the peer's bitmap chunks (pings and pongs may interleave) until the whole bitmap of
/// `geometry` has arrived; each message must come within `timeout`.
pub(super) async fn recv_bitmap(
    reader: &mut ThreadedReader,
    geometry: BitmapGeometry,
    timeout: Duration,
) -> Result<DirtyBitmap, BitmapExchangeError> {
    let mut asm = BitmapAssembler::new(geometry.chunks().saturating_mul(10).max(1 << 16));
    loop {
        let m = tokio::time::timeout(timeout, reader.recv())
            .await
            .map_err(|_| BitmapExchangeError::Timeout(timeout))??;
        match m {
            Message::BitmapChunk(c) => {
                if let Some(all) = asm.push(&c)? {
                    return Ok(DirtyBitmap::decode_rle(&all, geometry)?);
                }
            }
            Message::Disconnect { reason, detail } => {
                return Err(BitmapExchangeError::PeerRefused { reason, detail })
            }
            Message::Ping { .. } | Message::Pong { .. } => {}
            other => return Err(BitmapExchangeError::Unexpected(other.kind())),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::meta::bitmap::Granularity;
    use crate::repl::link::tests::connected_pair;
    use crate::repl::link::{Link, SentTraffic, WriterThread};
    use crate::repl::wire::bitmap::split;

    const WAIT: Duration = Duration::from_secs(5);

    fn bitmap() -> DirtyBitmap {
        let g = Granularity::new(4096).unwrap();
        let mut b = DirtyBitmap::new(BitmapGeometry::new(64 << 20, g).unwrap());
        b.set(0, 4096).unwrap();
        b.set(5 << 20, 300_000).unwrap();
        b.set((64 << 20) - 4096, 4096).unwrap();
        b
    }

    /// Node b's threaded reader (its writer thread kept alive beside it) and node a's link.
    async fn reader_and_sender() -> ((ThreadedReader, WriterThread), Link) {
        let (a, b) = connected_pair().await;
        let (_, rx, w) = b.into_threaded(SentTraffic::default(), false).unwrap();
        ((rx, w), a)
    }

    #[tokio::test]
    async fn a_bitmap_in_small_chunks_with_pings_between_arrives_whole() {
        let ((mut rx, _w), mut a) = reader_and_sender().await;
        let sent = bitmap();
        for c in split(&Bytes::from(sent.encode_rle()), 7) {
            a.send(&Message::BitmapChunk(c)).await.unwrap();
            a.send(&Message::Ping { nonce: 1 }).await.unwrap();
        }
        let got = recv_bitmap(&mut rx, sent.geometry(), WAIT).await.unwrap();
        assert_eq!(got.words(), sent.words());
        assert_eq!(got.dirty_chunks(), sent.dirty_chunks());
    }

    #[tokio::test]
    async fn garbage_bytes_during_the_exchange_count_as_a_corrupt_frame() {
        let ((mut rx, _w), a) = reader_and_sender().await;
        a.stream().writable().await.unwrap();
        a.stream().try_write(&[0xA5; 64]).unwrap();
        let e = recv_bitmap(&mut rx, bitmap().geometry(), WAIT)
            .await
            .unwrap_err();
        assert!(e.is_corrupt_frame(), "{e}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_and_is_not_counted_as_corruption() {
        let ((mut rx, _w), _a) = reader_and_sender().await;
        let e = recv_bitmap(&mut rx, bitmap().geometry(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, BitmapExchangeError::Timeout(_)), "{e}");
        assert!(!e.is_corrupt_frame());
        assert!(e.to_string().contains("no bitmap within"), "{e}");
    }

    #[tokio::test]
    async fn a_peer_disconnect_or_another_message_ends_the_exchange_naming_it() {
        let ((mut rx, _w), mut a) = reader_and_sender().await;
        a.send(&Message::Disconnect {
            reason: DisconnectReason::SplitBrain,
            detail: "both wrote".into(),
        })
        .await
        .unwrap();
        let e = recv_bitmap(&mut rx, bitmap().geometry(), WAIT)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, BitmapExchangeError::PeerRefused { reason: DisconnectReason::SplitBrain, detail } if detail == "both wrote"),
            "{e}"
        );
        assert!(!e.is_corrupt_frame());
        let ((mut rx, _w), mut a) = reader_and_sender().await;
        a.send(&Message::Flush { seq: 3 }).await.unwrap();
        let e = recv_bitmap(&mut rx, bitmap().geometry(), WAIT)
            .await
            .unwrap_err();
        assert!(
            matches!(e, BitmapExchangeError::Unexpected(MessageKind::Flush)),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_bitmap_of_another_geometry_is_refused_by_the_decoder() {
        let ((mut rx, _w), mut a) = reader_and_sender().await;
        let g = Granularity::new(4096).unwrap();
        let other = DirtyBitmap::new(BitmapGeometry::new(32 << 20, g).unwrap());
        for c in split(&Bytes::from(other.encode_rle()), 1 << 20) {
            a.send(&Message::BitmapChunk(c)).await.unwrap();
        }
        let e = recv_bitmap(&mut rx, bitmap().geometry(), WAIT)
            .await
            .unwrap_err();
        assert!(matches!(e, BitmapExchangeError::Decode(_)), "{e}");
    }
}
