//! Property tests of the wire codec: round trips of every message, compressed or not; any
//! single flipped bit is refused; the decoder never panics and never allocates beyond its limit.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::frame::{parse_header, FLAG_ZSTD, MAGIC};
use super::message::*;
use super::*;

const MAX: u32 = DEFAULT_MAX_PAYLOAD;

/// Payload bytes that are sometimes compressible (repeats) and sometimes not (random).
fn payload(max: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from),
        (any::<u8>(), 0..max).prop_map(|(b, n)| Bytes::from(vec![b; n])),
        (0..max).prop_map(|n| Bytes::from(json_like(n))),
    ]
}

/// Text resembling JSON documents, as written by applications on a mirrored volume.
pub(crate) fn json_like(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 128);
    let mut i = 0u64;
    while out.len() < n {
        let line = format!(
            "{{\"id\":{i},\"user\":\"user{}\",\"status\":\"{}\",\"amount\":{}.{:02},\"tags\":[\"a\",\"b{}\"]}}\n",
            i % 977,
            ["active", "pending", "closed"][(i % 3) as usize],
            (i * 7919) % 10000,
            i % 100,
            i % 13
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(n);
    out
}

/// `n` pseudo-random (incompressible) bytes from `seed` (xorshift64).
pub(crate) fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn node_id() -> impl Strategy<Value = String> {
    "[a-z0-9_-]{1,64}"
}

fn block_size() -> impl Strategy<Value = u32> {
    (9u32..=20).prop_map(|s| 1 << s)
}

fn digests_for(length: u32) -> impl Strategy<Value = Digests> {
    block_size().prop_flat_map(move |bs| {
        let n = length.div_ceil(bs) as usize;
        proptest::collection::vec(any::<u32>(), n..=n).prop_map(move |crcs| Digests {
            block_size: bs,
            crcs,
        })
    })
}

fn reason() -> impl Strategy<Value = DisconnectReason> {
    prop_oneof![
        (1u16..=10).prop_map(DisconnectReason::from_code),
        (11u16..).prop_map(DisconnectReason::Other)
    ]
}

/// Every message type, with fields across their ranges.
pub(crate) fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            (
                any::<u16>(),
                any::<u16>(),
                any::<[u8; 16]>(),
                node_id(),
                node_id()
            ),
            (
                any::<[u64; 4]>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>()
            )
        )
            .prop_map(
                |(
                    (a, b, volume_uuid, node_id, peer_node_id),
                    (g, disk_state, bitmap_granularity, device_size, features),
                )| {
                    Message::Hello(Hello {
                        proto_min: a.min(b),
                        proto_max: a.max(b),
                        volume_uuid,
                        node_id,
                        peer_node_id,
                        generations: Generations {
                            current: g[0],
                            bitmap: g[1],
                            history1: g[2],
                            history2: g[3],
                        },
                        disk_state,
                        bitmap_granularity,
                        device_size,
                        features,
                    })
                }
            ),
        any::<[u8; 32]>().prop_map(|nonce| Message::AuthChallenge { nonce }),
        any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse { mac }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            0u32..=DataFlags::ALL,
            payload(70_000)
        )
            .prop_map(|(seq, epoch, offset, f, data)| Message::Data(Data {
                seq,
                epoch,
                offset,
                flags: DataFlags(f),
                data
            })),
        (any::<u64>(), any::<u32>()).prop_map(|(seq, status)| Message::Ack { seq, status }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, epoch)| Message::Barrier { seq, epoch }),
        any::<u64>().prop_map(|seq| Message::Flush { seq }),
        any::<u64>().prop_map(|seq| Message::ResyncDone { seq }),
        (payload(5000), any::<u32>(), any::<u16>()).prop_map(|(data, pre, post)| {
            let offset = u64::from(pre);
            let total_len = offset + data.len() as u64 + u64::from(post);
            Message::BitmapChunk(BitmapChunk {
                offset,
                total_len,
                data,
            })
        }),
        (any::<u64>(), any::<u64>(), 0u32..(8 << 20), any::<bool>()).prop_flat_map(
            |(seq, offset, length, checksum)| {
                let mode = if checksum {
                    digests_for(length).prop_map(ResyncMode::Checksum).boxed()
                } else {
                    Just(ResyncMode::Plain).boxed()
                };
                mode.prop_map(move |mode| {
                    Message::ResyncRequest(ResyncRequest {
                        seq,
                        offset,
                        length,
                        mode,
                    })
                })
            }
        ),
        (
            any::<u64>(),
            any::<u64>(),
            prop_oneof![payload(20_000).prop_map(Some), Just(None)],
            any::<u32>()
        )
            .prop_map(|(seq, offset, p, l)| {
                let (length, payload) = match p {
                    Some(b) => (b.len() as u32, ResyncPayload::Bytes(b)),
                    None => (l, ResyncPayload::InSync),
                };
                Message::ResyncData(ResyncData {
                    seq,
                    offset,
                    length,
                    payload,
                })
            }),
        (any::<u64>(), any::<u64>(), any::<u32>(), block_size()).prop_map(
            |(seq, offset, length, block_size)| Message::VerifyRequest(VerifyRequest {
                seq,
                offset,
                length,
                block_size
            })
        ),
        (any::<u64>(), any::<u64>(), 0u32..(4 << 20)).prop_flat_map(|(seq, offset, length)| {
            digests_for(length).prop_map(move |digests| {
                Message::VerifyReply(VerifyReply {
                    seq,
                    offset,
                    length,
                    digests,
                })
            })
        }),
        (any::<u64>(), any::<u64>(), 1u32..=MAX_READ).prop_map(|(seq, offset, length)| {
            Message::ReadRequest(ReadRequest {
                seq,
                offset,
                length,
            })
        }),
        (
            any::<u64>(),
            any::<u64>(),
            prop_oneof![payload(20_000).prop_map(Ok), (1u32..).prop_map(Err)]
        )
            .prop_map(|(seq, offset, r)| {
                let (status, data) = match r {
                    Ok(b) => (0, b),
                    Err(errno) => (errno, Bytes::new()),
                };
                Message::ReadReply(ReadReply {
                    seq,
                    offset,
                    status,
                    data,
                })
            }),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        (reason(), "[ -~]{0,200}")
            .prop_map(|(reason, detail)| Message::Disconnect { reason, detail }),
    ]
}

fn encode(level: i32, m: &Message) -> Vec<u8> {
    FrameEncoder::new(level, MAX)
        .unwrap()
        .encode_to_vec(m)
        .unwrap()
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Message>, WireError> {
    let mut d = FrameDecoder::new(MAX).unwrap();
    d.push(bytes);
    let mut out = vec![];
    while let Some(m) = d.pop()? {
        out.push(m);
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips_uncompressed(m in message()) {
        let bytes = encode(0, &m);
        prop_assert_eq!(decode_all(&bytes).unwrap(), vec![m]);
    }

    #[test]
    fn every_message_round_trips_compressed(m in message(), level in 1i32..=3) {
        let bytes = encode(level, &m);
        prop_assert_eq!(decode_all(&bytes).unwrap(), vec![m]);
    }

    #[test]
    fn compressed_frames_are_never_larger_than_raw(m in message()) {
        let raw = encode(0, &m);
        let z = encode(1, &m);
        prop_assert!(z.len() <= raw.len());
    }

    #[test]
    fn a_stream_split_anywhere_decodes_the_same(ms in proptest::collection::vec(message(), 1..6), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let mut enc = FrameEncoder::new(1, MAX).unwrap();
        let mut stream = BytesMut::new();
        for m in &ms { enc.encode(m, &mut stream).unwrap(); }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len())).collect();
        points.sort_unstable();
        let mut d = FrameDecoder::new(MAX).unwrap();
        let mut got = vec![];
        let mut prev = 0;
        for p in points.into_iter().chain([stream.len()]) {
            d.push(&stream[prev..p]);
            prev = p;
            while let Some(m) = d.pop().unwrap() { got.push(m); }
        }
        prop_assert_eq!(got, ms);
        prop_assert!(d.is_idle());
    }

    #[test]
    fn any_single_bit_flip_is_refused_or_harmless(m in message(), level in prop_oneof![Just(0), Just(1)], bit in any::<prop::sample::Index>()) {
        let mut bytes = encode(level, &m);
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        match decode_all(&bytes) {
            Err(_) => {}
            // zstd may ignore a bit in an unused field: the message must then be unchanged.
            Ok(got) => prop_assert_eq!(got, vec![m], "bit {} flipped yet a different message was accepted", bit),
        }
    }

    #[test]
    fn garbage_never_panics_and_never_yields_unchecked_frames(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_all(&bytes);
    }

    #[test]
    fn garbage_after_a_valid_magic_never_panics(rest in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = MAGIC.to_be_bytes().to_vec();
        bytes.extend(rest);
        let _ = decode_all(&bytes);
    }
}

/// Builds a frame with a valid header CRC around arbitrary header fields and payload.
#[allow(clippy::too_many_arguments)]
fn forge(
    kind: u8,
    flags: u16,
    seq: u64,
    offset: u64,
    raw_len: u32,
    wire_len: u32,
    crc: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN + payload.len());
    h.extend(MAGIC.to_be_bytes());
    h.push(1);
    h.push(kind);
    h.extend(flags.to_be_bytes());
    h.extend(seq.to_be_bytes());
    h.extend(offset.to_be_bytes());
    h.extend(raw_len.to_be_bytes());
    h.extend(wire_len.to_be_bytes());
    h.extend(crc.to_be_bytes());
    let hc = crc32fast::hash(&h);
    h.extend(hc.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

#[test]
fn corrupted_data_payload_names_sequence_and_offset() {
    let m = Message::Data(Data {
        seq: 42,
        epoch: 1,
        offset: 8192,
        flags: DataFlags::default(),
        data: Bytes::from(vec![9u8; 4096]),
    });
    let mut bytes = encode(0, &m);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    let e = decode_all(&bytes).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::PayloadCrc {
                kind: MessageKind::Data,
                seq: 42,
                offset: 8192,
                ..
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("seq 42") && text.contains("offset 8192"),
        "{text}"
    );
}

#[test]
fn corruption_inside_the_compressor_output_is_caught_by_the_payload_crc() {
    // A compressor bug that emits a valid zstd frame of *different* data of the same length:
    // simulated by compressing other bytes under the original payload's CRC.
    let good = json_like(8192);
    let mut bad = good.clone();
    bad[100] ^= 1;
    let m = Message::Data(Data {
        seq: 7,
        epoch: 0,
        offset: 0,
        flags: DataFlags::default(),
        data: Bytes::from(good),
    });
    let mut p = BytesMut::new();
    m.encode_payload(&mut p).unwrap();
    let crc = crc32fast::hash(&p);
    let mut q = BytesMut::new();
    Message::Data(Data {
        seq: 7,
        epoch: 0,
        offset: 0,
        flags: DataFlags::default(),
        data: Bytes::from(bad),
    })
    .encode_payload(&mut q)
    .unwrap();
    let z = zstd::bulk::compress(&q, 1).unwrap();
    let frame = forge(
        MessageKind::Data as u8,
        FLAG_ZSTD,
        7,
        0,
        p.len() as u32,
        z.len() as u32,
        crc,
        &z,
    );
    assert!(matches!(
        decode_all(&frame),
        Err(WireError::PayloadCrc { seq: 7, .. })
    ));
}

#[test]
fn oversize_frame_is_refused_from_the_header_alone() {
    let frame = forge(MessageKind::Data as u8, 0, 1, 0, u32::MAX, u32::MAX, 0, &[]);
    assert!(
        matches!(decode_all(&frame), Err(WireError::Oversize { len, .. }) if len == u64::from(u32::MAX))
    );
}

#[test]
fn decompression_bomb_is_cut_at_the_announced_size() {
    // 16 MiB of zeros compress to a few hundred bytes; the header claims 1000 bytes.
    let bomb = zstd::bulk::compress(&vec![0u8; 16 << 20], 1).unwrap();
    let frame = forge(
        MessageKind::Data as u8,
        FLAG_ZSTD,
        1,
        0,
        1000.max(bomb.len() as u32 + 1),
        bomb.len() as u32,
        0,
        &bomb,
    );
    assert!(
        matches!(decode_all(&frame), Err(WireError::Decompress { .. })),
        "{:?}",
        decode_all(&frame)
    );
}

#[test]
fn unknown_type_and_reserved_flags_are_refused() {
    assert_eq!(
        decode_all(&forge(0x99, 0, 0, 0, 0, 0, 0, &[])),
        Err(WireError::UnknownKind { code: 0x99 })
    );
    assert_eq!(
        decode_all(&forge(MessageKind::Flush as u8, 0x8000, 0, 0, 0, 0, 0, &[])),
        Err(WireError::ReservedFlags { flags: 0x8000 })
    );
}

#[test]
fn header_fields_a_type_does_not_have_must_be_zero() {
    let p = 5u64.to_be_bytes();
    let frame = forge(
        MessageKind::Ping as u8,
        0,
        3,
        0,
        8,
        8,
        crc32fast::hash(&p),
        &p,
    );
    assert!(matches!(decode_all(&frame), Err(WireError::Malformed(_))));
}

#[test]
fn trailing_bytes_in_a_payload_are_refused() {
    let p = [0u8; 9];
    let frame = forge(
        MessageKind::Ping as u8,
        0,
        0,
        0,
        9,
        9,
        crc32fast::hash(&p),
        &p,
    );
    let e = decode_all(&frame).unwrap_err();
    assert!(e.to_string().contains("after the last field"), "{e}");
}

#[test]
fn bad_magic_is_named_and_the_decoder_stays_failed() {
    let mut d = FrameDecoder::new(MAX).unwrap();
    d.push(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxx");
    assert!(matches!(d.pop(), Err(WireError::BadMagic { .. })));
    assert_eq!(d.pop(), Err(WireError::Poisoned));
}

#[test]
fn incompressible_payload_goes_raw_and_text_is_at_most_half() {
    let mut enc = FrameEncoder::new(1, MAX).unwrap();
    let mut out = BytesMut::new();
    let mut noise = vec![0u8; 65536];
    getrandom::fill(&mut noise).unwrap();
    let s = enc
        .encode(
            &Message::Data(Data {
                seq: 1,
                epoch: 0,
                offset: 0,
                flags: DataFlags::default(),
                data: noise.into(),
            }),
            &mut out,
        )
        .unwrap();
    assert!(!s.compressed && s.wire_len == s.raw_len);
    let s = enc
        .encode(
            &Message::Data(Data {
                seq: 2,
                epoch: 0,
                offset: 0,
                flags: DataFlags::default(),
                data: json_like(65536).into(),
            }),
            &mut out,
        )
        .unwrap();
    assert!(
        s.compressed && s.frame_len() * 2 <= s.raw_len as usize,
        "{s:?}"
    );
    let h = parse_header(&out[..HEADER_LEN], MAX).unwrap();
    assert_eq!(h.flags, 0);
}

#[test]
fn encoder_refuses_payloads_above_its_limit_and_leaves_output_untouched() {
    let mut enc = FrameEncoder::new(0, 65536).unwrap();
    let mut out = BytesMut::from(&b"keep"[..]);
    let m = Message::Data(Data {
        seq: 1,
        epoch: 0,
        offset: 0,
        flags: DataFlags::default(),
        data: vec![0u8; 70000].into(),
    });
    assert!(matches!(
        enc.encode(&m, &mut out),
        Err(frame::EncodeError::TooLarge { .. })
    ));
    assert_eq!(&out[..], b"keep");
}

#[test]
fn a_short_header_slice_is_an_error_not_a_panic() {
    assert!(matches!(
        parse_header(&[0u8; 39], MAX),
        Err(WireError::BadLengths { .. })
    ));
}

#[test]
fn invalid_zstd_level_is_refused_with_the_fix() {
    let e = FrameEncoder::new(1000, MAX).unwrap_err().to_string();
    assert!(e.contains("compression_level"), "{e}");
}

#[test]
fn every_bit_of_compressed_and_raw_frames_is_protected() {
    let msgs = [
        Message::Data(Data {
            seq: 9,
            epoch: 3,
            offset: 1 << 20,
            flags: DataFlags(DataFlags::FUA),
            data: json_like(2048).into(),
        }),
        Message::Hello(Hello {
            proto_min: 1,
            proto_max: 2,
            volume_uuid: [3; 16],
            node_id: "node-a".into(),
            peer_node_id: "node-b".into(),
            generations: Generations {
                current: 1,
                bitmap: 2,
                history1: 3,
                history2: 4,
            },
            disk_state: 5,
            bitmap_granularity: 4096,
            device_size: 1 << 34,
            features: 7,
        }),
    ];
    for m in msgs {
        for level in [0, 1] {
            let good = encode(level, &m);
            for bit in 0..good.len() * 8 {
                let mut bytes = good.clone();
                bytes[bit / 8] ^= 1 << (bit % 8);
                if let Ok(got) = decode_all(&bytes) {
                    assert_eq!(
                        got,
                        vec![m.clone()],
                        "level {level} bit {bit}: a different message was accepted"
                    );
                }
            }
        }
    }
}

/// The seeds in fuzz/seeds/repl-wire-frames were written by fuzz/gen_repl_wire_seeds.py from
/// docs/PROTOCOL.md alone: they decode here only if the document and the code agree.
#[test]
fn documented_layout_seeds_decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/repl-wire-frames");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let msgs = decode_all(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!msgs.is_empty(), "{}", path.display());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match name.as_str() {
            "hello" => {
                let Message::Hello(h) = &msgs[0] else {
                    panic!("{msgs:?}")
                };
                assert_eq!(
                    (h.node_id.as_str(), h.peer_node_id.as_str(), h.device_size),
                    ("node-a", "node-b", 1 << 30)
                );
                assert_eq!(
                    h.generations,
                    Generations {
                        current: 5,
                        bitmap: 0,
                        history1: 4,
                        history2: 3
                    }
                );
            }
            "data-raw" => assert_eq!(
                msgs,
                vec![Message::Data(Data {
                    seq: 7,
                    epoch: 1,
                    offset: 4096,
                    flags: DataFlags(DataFlags::FUA),
                    data: vec![b'x'; 512].into()
                })]
            ),
            "data-zstd" => {
                assert_ne!(
                    parse_header(&bytes, MAX).unwrap().flags & FLAG_ZSTD,
                    0,
                    "seed not compressed"
                );
                let Message::Data(d) = &msgs[0] else {
                    panic!("{msgs:?}")
                };
                assert!(d.data.starts_with(b"{\"id\":0,") && d.offset == 1 << 20);
            }
            "data-bulk" | "resync-bulk" => {
                let b = bulk_of(&msgs[0]).unwrap_or_else(|| panic!("{msgs:?}"));
                assert_eq!(b.len(), 70000);
                assert!(b.len() >= frame::BULK_MIN);
                // Received the way the link does it: into a buffer of its own.
                for chunk in [1, 4096, bytes.len()] {
                    assert_eq!(decode_all_bulk(&bytes, chunk).unwrap(), msgs);
                }
            }
            "bitmap-two-chunks" => {
                let mut a = bitmap::BitmapAssembler::new(100);
                let Message::BitmapChunk(c0) = &msgs[0] else {
                    panic!()
                };
                let Message::BitmapChunk(c1) = &msgs[1] else {
                    panic!()
                };
                assert_eq!(a.push(c0).unwrap(), None);
                assert_eq!(a.push(c1).unwrap().as_deref(), Some(&b"abcdef"[..]));
            }
            _ => {}
        }
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} seeds in {}", dir.display());
}

#[test]
fn a_large_payload_whose_probe_is_incompressible_goes_raw_without_compressing_the_rest() {
    let mut enc = FrameEncoder::new(1, MAX).unwrap();
    // 1 MiB: zeros around 64 KiB of random bytes in the middle (where the probe looks).
    let mut data = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut data[(1 << 19) - 32768..(1 << 19) + 32768] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let m = Message::Data(Data {
        seq: 1,
        epoch: 1,
        offset: 0,
        flags: DataFlags(0),
        data: Bytes::from(data),
    });
    let mut out = BytesMut::new();
    let st = enc.encode(&m, &mut out).unwrap();
    assert!(
        !st.compressed,
        "the probe saw random bytes: the frame must go raw"
    );
    assert_eq!(decode_all(&out).unwrap(), vec![m]);
    // The same size of JSON-like text is compressed to at most half.
    let text = Message::Data(Data {
        seq: 2,
        epoch: 1,
        offset: 0,
        flags: DataFlags(0),
        data: Bytes::from(json_like(1 << 20)),
    });
    let mut out = BytesMut::new();
    let st = enc.encode(&text, &mut out).unwrap();
    assert!(st.compressed && st.wire_len * 2 <= st.raw_len, "{st:?}");
    assert_eq!(decode_all(&out).unwrap(), vec![text]);
}

/// Decodes `bytes` the way the link receives: whenever the decoder offers a bulk payload, it
/// is read into a buffer of its own; `chunk` bytes are pushed at a time otherwise.
fn decode_all_bulk(bytes: &[u8], chunk: usize) -> Result<Vec<Message>, WireError> {
    let mut d = FrameDecoder::new(MAX).unwrap();
    let (mut out, mut pos) = (vec![], 0);
    loop {
        while let Some(m) = d.pop()? {
            out.push(m);
        }
        if let Some(plan) = d.bulk_pending() {
            let mut buf = vec![0u8; plan.wire_len];
            let got = d.take_buffered(&mut buf);
            let rest = plan.wire_len - got;
            assert!(
                pos + rest <= bytes.len(),
                "stream ends inside a bulk payload"
            );
            buf[got..].copy_from_slice(&bytes[pos..pos + rest]);
            pos += rest;
            out.push(d.finish_bulk(Bytes::from(buf))?);
            continue;
        }
        if pos == bytes.len() {
            assert!(d.is_idle(), "stream ends inside a frame");
            return Ok(out);
        }
        let n = chunk.min(bytes.len() - pos);
        d.push(&bytes[pos..pos + n]);
        pos += n;
    }
}

/// Data and resync frames with payloads around and above [`frame::BULK_MIN`].
fn bulk_messages() -> impl Strategy<Value = Vec<Message>> {
    let data = prop_oneof![
        (0usize..300_000).prop_map(|n| Bytes::from(json_like(n))),
        (0usize..300_000, any::<u64>()).prop_map(|(n, seed)| Bytes::from(noise(seed, n))),
    ];
    proptest::collection::vec((data, any::<bool>(), any::<u32>()), 1..4).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .flat_map(|(i, (data, resync, seq))| {
                let m = if resync {
                    Message::ResyncData(ResyncData {
                        seq: u64::from(seq),
                        offset: 4096 * i as u64,
                        length: data.len() as u32,
                        payload: ResyncPayload::Bytes(data),
                    })
                } else {
                    Message::Data(Data {
                        seq: u64::from(seq),
                        epoch: 1,
                        offset: 4096 * i as u64,
                        flags: DataFlags(DataFlags::FUA),
                        data,
                    })
                };
                [m, Message::Ping { nonce: i as u64 }]
            })
            .collect()
    })
}

/// Whether `b`'s own memory is one of the segments `q` would write (queued by reference).
fn queued_by_reference(q: &frame::FrameQueue, b: &Bytes) -> bool {
    let mut iov = [std::io::IoSlice::new(&[]); 256];
    let k = q.io_slices(&mut iov);
    iov[..k].iter().any(|s| s.as_ptr() == b.as_ptr())
}

fn bulk_of(m: &Message) -> Option<&Bytes> {
    match m {
        Message::Data(d) => Some(&d.data),
        Message::ResyncData(ResyncData {
            payload: ResyncPayload::Bytes(b),
            ..
        }) => Some(b),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The queue's segments are exactly the bytes `encode` produces; bulk data that goes raw
    /// without a compression attempt is queued by reference (its own memory, no copy); both
    /// receive paths decode them alike.
    #[test]
    fn queued_frames_equal_encoded_bytes_and_share_large_raw_data(ms in bulk_messages(), level in 0i32..=1, chunk in 1usize..100_000) {
        let mut flat = BytesMut::new();
        let mut enc = FrameEncoder::new(level, MAX).unwrap();
        for m in &ms { enc.encode(m, &mut flat).unwrap(); }
        let mut q = frame::FrameQueue::new();
        let mut enc = FrameEncoder::new(level, MAX).unwrap();
        let stats: Vec<FrameStats> = ms.iter().map(|m| enc.encode_into(m, &mut q).unwrap()).collect();
        prop_assert_eq!(q.len(), flat.len());
        for (m, s) in ms.iter().zip(&stats) {
            if let Some(b) = bulk_of(m) {
                let shared = queued_by_reference(&q, b);
                // By reference exactly when it went raw without an attempt on the whole
                // payload: no compressor, or a long payload whose probe failed (this test's
                // few frames never close the gate).
                let unattempted = level == 0 || s.raw_len as usize >= frame::PROBE_FROM_LEN;
                prop_assert_eq!(shared, !s.compressed && unattempted && b.len() >= frame::SEND_REF_MIN, "bulk of {} bytes", b.len());
            }
        }
        let queued = q.into_contiguous();
        prop_assert_eq!(&queued[..], &flat[..]);
        prop_assert_eq!(&decode_all(&flat).unwrap(), &ms);
        prop_assert_eq!(&decode_all_bulk(&flat, chunk).unwrap(), &ms);
    }

    /// Partial writes: advancing the queue by any amounts leaves exactly the unsent tail.
    #[test]
    fn the_queue_advances_across_segments(ms in bulk_messages(), steps in proptest::collection::vec(1usize..200_000, 1..20)) {
        let mut q = frame::FrameQueue::new();
        let mut enc = FrameEncoder::new(0, MAX).unwrap();
        let mut flat = BytesMut::new();
        let mut enc2 = FrameEncoder::new(0, MAX).unwrap();
        for m in &ms {
            enc.encode_into(m, &mut q).unwrap();
            enc2.encode(m, &mut flat).unwrap();
        }
        let mut sent = 0;
        for s in steps {
            let n = s.min(q.len());
            q.advance(n);
            sent += n;
            prop_assert_eq!(q.len(), flat.len() - sent);
            let mut iov = [std::io::IoSlice::new(&[]); 64];
            let k = q.io_slices(&mut iov);
            let first = iov[..k].iter().find(|s| !s.is_empty());
            if let Some(f) = first {
                prop_assert_eq!(&f[..], &flat[sent..sent + f.len()]);
            }
        }
    }
}

#[test]
fn a_corrupted_bulk_payload_is_refused_and_the_decoder_stays_failed() {
    let data = Bytes::from(
        (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    );
    let m = Message::Data(Data {
        seq: 9,
        epoch: 1,
        offset: 1 << 20,
        flags: DataFlags(0),
        data,
    });
    let bytes = encode(0, &m);
    let mut d = FrameDecoder::new(MAX).unwrap();
    d.push(&bytes[..HEADER_LEN + 100]);
    assert_eq!(d.pop().unwrap(), None);
    let plan = d.bulk_pending().expect("a raw 200 KB Data frame is bulk");
    assert_eq!(plan.lead, 16);
    assert_eq!(plan.wire_len, bytes.len() - HEADER_LEN);
    let mut buf = vec![0u8; plan.wire_len];
    assert_eq!(d.take_buffered(&mut buf), 100);
    buf[100..].copy_from_slice(&bytes[HEADER_LEN + 100..]);
    buf[150_000] ^= 0x10;
    let e = d.finish_bulk(Bytes::from(buf)).unwrap_err();
    assert!(
        matches!(e, WireError::PayloadCrc { seq: 9, offset, .. } if offset == 1 << 20),
        "{e}"
    );
    assert_eq!(d.pop().unwrap_err(), WireError::Poisoned);
    assert!(d.bulk_pending().is_none());
}

#[test]
fn a_bulk_payload_of_the_wrong_length_is_refused() {
    let m = Message::Data(Data {
        seq: 1,
        epoch: 1,
        offset: 0,
        flags: DataFlags(0),
        data: Bytes::from(vec![0x5a; frame::BULK_MIN]),
    });
    let bytes = encode(0, &m);
    let mut d = FrameDecoder::new(MAX).unwrap();
    d.push(&bytes[..HEADER_LEN]);
    assert_eq!(d.pop().unwrap(), None);
    assert!(d.bulk_pending().is_some());
    let e = d.finish_bulk(Bytes::from(vec![0; 10])).unwrap_err();
    assert!(matches!(e, WireError::BadLengths { .. }), "{e}");
    // Small and compressed frames are never offered as bulk.
    let mut d = FrameDecoder::new(MAX).unwrap();
    d.push(&encode(1, &m)[..HEADER_LEN]);
    assert_eq!(d.pop().unwrap(), None);
    assert!(
        d.bulk_pending().is_none(),
        "a compressed frame is decoded from the buffer"
    );
}

#[test]
fn the_gate_closes_after_a_window_that_saved_under_an_eighth_and_reopens_after_the_skip() {
    use super::frame::{CompressGate, GATE_SKIP_BYTES, GATE_WINDOW_BYTES};
    let mut g = CompressGate::default();
    for _ in 0..GATE_WINDOW_BYTES / 4096 {
        assert!(g.admit(4096));
        g.record(4096, 3900);
    }
    for _ in 0..GATE_SKIP_BYTES / (1 << 20) {
        assert!(
            !g.admit(1 << 20),
            "payloads after a poor window go raw untried"
        );
    }
    assert!(g.admit(4096), "a new window tries again");
    // Windows that save at least 1/8 keep compression on.
    let mut g = CompressGate::default();
    for _ in 0..3 * GATE_WINDOW_BYTES / 4096 {
        assert!(g.admit(4096));
        g.record(4096, 3584);
    }
}

#[test]
fn poor_windows_in_a_row_double_the_skip_up_to_the_cap_and_a_saving_window_resets_it() {
    use super::frame::{CompressGate, GATE_MAX_BACKOFF};
    const WINDOW: u64 = 4096;
    const SKIP: u64 = 16 * 4096;
    /// One window of attempts saving `wire`/4096, then how many 4 KiB payloads go untried.
    fn window_then_skipped(g: &mut CompressGate, wire: usize) -> u64 {
        assert!(g.admit(4096), "a window starts with an attempt");
        g.record(4096, wire);
        let mut skipped = 0;
        while !g.admit(4096) {
            skipped += 1;
        }
        // That admit opened the next window: give it back as part of the next call's window.
        g.record(0, 0);
        skipped
    }
    let mut g = CompressGate::new(WINDOW, SKIP);
    let mut seen = Vec::new();
    for _ in 0..GATE_MAX_BACKOFF + 3 {
        seen.push(window_then_skipped(&mut g, 4000));
    }
    let want: Vec<u64> = (0..GATE_MAX_BACKOFF + 3)
        .map(|i| (SKIP << i.min(GATE_MAX_BACKOFF)) / 4096)
        .collect();
    assert_eq!(
        seen, want,
        "each poor window doubles the skip, then it stays capped"
    );
    assert_eq!(
        window_then_skipped(&mut g, 1024),
        0,
        "a saving window opens the gate"
    );
    assert_eq!(
        window_then_skipped(&mut g, 4000),
        SKIP / 4096,
        "and the next poor window starts from the base skip again"
    );
}

/// Random bytes with a run of 12 zeroes in every 128: zstd saves a few percent (the runs),
/// reliably less than 1/8.
fn barely_compressible(seed: u64, n: usize) -> Bytes {
    let mut b = noise(seed, n);
    for (i, x) in b.iter_mut().enumerate() {
        if i % 128 >= 116 {
            *x = 0;
        }
    }
    Bytes::from(b)
}

fn data_msg(seq: u64, data: Bytes) -> Message {
    Message::Data(Data {
        seq,
        epoch: 1,
        offset: 0,
        flags: DataFlags(0),
        data,
    })
}

/// Random bytes except 8 KiB of zeroes in the middle: the probe's sample compresses, the
/// whole saves about 3%.
fn compressible_middle_only(seed: u64, n: usize) -> Bytes {
    let mut b = noise(seed, n);
    let mid = n / 2 - 4096;
    b[mid..mid + 8192].fill(0);
    Bytes::from(b)
}

#[test]
fn payloads_that_barely_compress_go_raw_after_a_window_short_or_long() {
    use super::frame::CompressGate;
    type Make = fn(u64, usize) -> Bytes;
    let cases: [(usize, u64, u64, Make); 2] = [
        (4096, 64 * 4096, 256 * 4096, barely_compressible),
        (256 << 10, 1 << 20, 8 << 20, compressible_middle_only),
    ];
    for (len, window, skip, make) in cases {
        let mut enc = FrameEncoder::new(1, MAX).unwrap();
        enc.set_gate(CompressGate::new(window, skip));
        let mut out = BytesMut::new();
        let tried = (window / len as u64) as usize;
        let skipped = (skip / len as u64) as usize;
        let total = tried + skipped + 1;
        let compressed: Vec<bool> = (0..total)
            .map(|i| {
                enc.encode(&data_msg(i as u64, make(i as u64, len)), &mut out)
                    .unwrap()
                    .compressed
            })
            .collect();
        assert_eq!(
            compressed[..tried].iter().position(|c| !c),
            None,
            "{len}: each attempt saves a little"
        );
        assert!(
            compressed[tried..tried + skipped].iter().all(|&c| !c),
            "{len}: then the gate sends them raw"
        );
        assert!(
            compressed[tried + skipped],
            "{len}: and tries again after the skip"
        );
        assert_eq!(decode_all(&out).unwrap().len(), total);
    }
}

/// Long incompressible payloads whose probes fail count as attempts: after a window of them
/// the gate skips, so the next payloads go raw without a probe, even one whose sample would
/// compress; after the skip it is tried again.
#[test]
fn failed_probes_close_the_gate_like_failed_compressions() {
    use super::frame::CompressGate;
    const LEN: usize = 256 << 10;
    let (window, skip) = (1u64 << 20, 8u64 << 20);
    let mut enc = FrameEncoder::new(1, MAX).unwrap();
    enc.set_gate(CompressGate::new(window, skip));
    let mut out = BytesMut::new();
    let mut seq = 0;
    let mut send = |data: Bytes, enc: &mut FrameEncoder| {
        seq += 1;
        enc.encode(&data_msg(seq, data), &mut out)
            .unwrap()
            .compressed
    };
    // Check first that the probe of this payload passes on an open gate.
    let mut open = FrameEncoder::new(1, MAX).unwrap();
    assert!(
        open.encode(
            &data_msg(0, compressible_middle_only(1, LEN)),
            &mut BytesMut::new()
        )
        .unwrap()
        .compressed,
        "the payload's sample must compress: the test proves nothing"
    );
    for i in 0..window / LEN as u64 {
        assert!(!send(Bytes::from(noise(100 + i, LEN)), &mut enc));
    }
    for i in 0..skip / LEN as u64 {
        assert!(
            !send(compressible_middle_only(i, LEN), &mut enc),
            "payload {i} of the skip was probed after a window of failed probes"
        );
    }
    assert!(
        send(compressible_middle_only(99, LEN), &mut enc),
        "after the skip the gate tries again"
    );
    assert_eq!(decode_all(&out).unwrap().len(), seq as usize);
}

/// A 4 KiB write goes by reference once the gate is closed (its only copy on the sending
/// node is then the socket's), and is compressed whole while the gate is open.
#[test]
fn a_small_payload_goes_by_reference_only_when_no_attempt_is_made() {
    use super::frame::{CompressGate, FrameQueue, SEND_REF_MIN};
    let text = Bytes::from(json_like(SEND_REF_MIN));
    let mut enc = FrameEncoder::new(1, MAX).unwrap();
    let mut q = FrameQueue::new();
    let s = enc.encode_into(&data_msg(1, text.clone()), &mut q).unwrap();
    assert!(
        s.compressed && !queued_by_reference(&q, &text),
        "an open gate compresses a 4 KiB payload"
    );

    // Close the gate with one window of incompressible 4 KiB writes.
    let (window, skip) = (64u64 << 10, 1u64 << 20);
    let mut enc = FrameEncoder::new(1, MAX).unwrap();
    enc.set_gate(CompressGate::new(window, skip));
    let mut flat = BytesMut::new();
    let mut q = FrameQueue::new();
    let mut msgs = Vec::new();
    for i in 0..window / SEND_REF_MIN as u64 {
        let m = data_msg(i, Bytes::from(noise(i, SEND_REF_MIN)));
        let s = enc.encode_into(&m, &mut q).unwrap();
        let Message::Data(d) = &m else { unreachable!() };
        assert!(
            !s.compressed && !queued_by_reference(&q, &d.data),
            "attempted, so copied in"
        );
        msgs.push(m);
    }
    for (i, data) in [text.clone(), Bytes::from(noise(7, SEND_REF_MIN))]
        .into_iter()
        .enumerate()
    {
        let m = data_msg(100 + i as u64, data.clone());
        let s = enc.encode_into(&m, &mut q).unwrap();
        assert!(!s.compressed, "a closed gate sends raw");
        assert!(
            queued_by_reference(&q, &data),
            "payload {i} was copied although no attempt was made"
        );
        msgs.push(m);
    }
    // A payload shorter than SEND_REF_MIN is copied in with its header.
    let small = Bytes::from(noise(9, SEND_REF_MIN - 1));
    let m = data_msg(200, small.clone());
    enc.encode_into(&m, &mut q).unwrap();
    assert!(!queued_by_reference(&q, &small));
    msgs.push(m);
    // The same bytes as the contiguous encoding, and they decode to the messages.
    let mut enc2 = FrameEncoder::new(1, MAX).unwrap();
    enc2.set_gate(CompressGate::new(window, skip));
    for m in &msgs {
        enc2.encode(m, &mut flat).unwrap();
    }
    assert_eq!(&q.into_contiguous()[..], &flat[..]);
    assert_eq!(decode_all(&flat).unwrap(), msgs);
}

#[test]
fn json_like_text_is_never_gated() {
    let mut enc = FrameEncoder::new(1, MAX).unwrap();
    let mut out = BytesMut::new();
    for i in 0..1200u64 {
        let len = if i % 100 == 0 { 256 << 10 } else { 4096 };
        let s = enc
            .encode(&data_msg(i, Bytes::from(json_like(len))), &mut out)
            .unwrap();
        assert!(s.compressed && s.wire_len * 2 <= s.raw_len, "{s:?}");
    }
}
