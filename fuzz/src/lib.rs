//! The bodies of the cargo-fuzz targets, one plain function per target.
//!
//! Each `fuzz_targets/<name>.rs` only hands libFuzzer's input to the function of the same
//! name. Keeping the bodies here lets the main crate's `tests/fuzz_seeds.rs` include this file
//! (`#[path]`) and run every seed in `fuzz/seeds/` through exactly the code and assertions the
//! fuzzer runs, with a stable toolchain and no sanitizer. Invariant of every function: it
//! returns normally for any input unless the code under test broke a stated property (a
//! panic is the finding). No function touches the network or the disk.

use std::rc::Rc;

use twinvol::block::mem::MemTarget;
use twinvol::cloud::aws::error::quoted_id;
use twinvol::cloud::dns_wire::decode_answer;
use twinvol::cloud::vip_route::cidr_contains;
use twinvol::cluster::control::Request;
use twinvol::cluster::heartbeat::{decode, encode};
use twinvol::cluster::witness::status_code;
use twinvol::config::cloud::{check_record_name, CloudConfig};
use twinvol::config::cluster::WitnessUrl;
use twinvol::config::SplitBrainPolicy;
use twinvol::meta::bitmap::{BitmapGeometry, DirtyBitmap, Granularity};
use twinvol::meta::format::{
    decode_al_block, decode_bitmap_page, decode_superblock, encode_al_block, encode_bitmap_page,
    encode_superblock, BLOCK,
};
use twinvol::meta::gen::{self, Decision, DiskFlags, GenIds, NodeGen, SplitBrainEvidence};
use twinvol::nbd::kernel::netlink::nbd_family::parse_any_reply;
use twinvol::nbd::server::{serve_connection, ServerConfig, Shared};
use twinvol::repl::wire::auth::PreSharedKey;
use twinvol::repl::wire::{FrameDecoder, FrameEncoder, Message};
use twinvol::volume::plan::{plan, Plan, Refusal, Side};

/// The whole NBD server (handshake + transmission) over a raw client byte stream, the input
/// `twinvol export --stdio` reads, against a 1 MiB in-memory volume. Property: no panic and
/// no hang, whatever the bytes.
pub fn nbd_stream(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime builds");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let shared = Shared::new(
            Rc::new(MemTarget::new(1 << 20)),
            String::new(),
            &ServerConfig::default(),
            rx,
        );
        let _ = serve_connection(shared, data, tokio::io::sink()).await;
    });
}

/// The parsers of netlink replies (`nbd::kernel::netlink`): message splitting, ack and error
/// classification, attribute walking, family-id, STATUS and CONNECT replies. No panic.
pub fn netlink_reply(data: &[u8]) {
    let _ = parse_any_reply(data);
}

const REPL_MAX: u32 = 1 << 20;

/// Feeds `bytes` to a `FrameDecoder` in pieces of `step`; messages until the first error
/// (`true`).
fn repl_decode(bytes: &[u8], step: usize) -> (Vec<Message>, bool) {
    let mut d = FrameDecoder::new(REPL_MAX).expect("limit is valid");
    let mut out = Vec::new();
    for piece in bytes.chunks(step.max(1)) {
        d.push(piece);
        loop {
            match d.pop() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

/// Like `repl_decode`, but a bulk payload the decoder offers is moved into a buffer of its
/// own and completed with `finish_bulk`, as the link receives large writes.
fn repl_decode_bulk(bytes: &[u8], step: usize) -> (Vec<Message>, bool) {
    let mut d = FrameDecoder::new(REPL_MAX).expect("limit is valid");
    let (mut out, mut pos) = (Vec::new(), 0);
    loop {
        loop {
            match d.pop() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
        if let Some(plan) = d.bulk_pending() {
            let mut buf = vec![0u8; plan.wire_len];
            let got = d.take_buffered(&mut buf);
            let rest = (plan.wire_len - got).min(bytes.len() - pos);
            buf[got..got + rest].copy_from_slice(&bytes[pos..pos + rest]);
            pos += rest;
            if got + rest < plan.wire_len {
                return (out, false);
            }
            match d.finish_bulk(buf.into()) {
                Ok(m) => out.push(m),
                Err(_) => return (out, true),
            }
            continue;
        }
        if pos == bytes.len() {
            return (out, false);
        }
        let n = step.max(1).min(bytes.len() - pos);
        d.push(&bytes[pos..pos + n]);
        pos += n;
    }
}

/// `repl::wire::FrameDecoder`: no panic; the same bytes whole or in small pieces, or with
/// large payloads received into buffers of their own, give the same messages and fail at the
/// same point; every accepted message re-encodes to a frame that decodes to the same message
/// (the codec is canonical).
pub fn repl_wire_decoder(data: &[u8]) {
    let whole = repl_decode(data, data.len());
    let pieces = repl_decode(data, 1 + data.len() % 61);
    assert_eq!(whole, pieces, "split changed the outcome");
    let bulk = repl_decode_bulk(data, 1 + data.len() % 61);
    assert_eq!(whole, bulk, "bulk receive changed the outcome");
    let mut enc = FrameEncoder::new(0, REPL_MAX).expect("limit is valid");
    for m in whole.0 {
        let again = enc
            .encode_to_vec(&m)
            .expect("an accepted message must re-encode");
        assert_eq!(repl_decode(&again, again.len()), (vec![m], false));
    }
}

/// The run-length bitmap decoder: no panic; what it accepts re-encodes to the same bytes
/// (the encoding is canonical).
pub fn meta_rle_decode(data: &[u8]) {
    let Ok(g) = Granularity::new(4096) else {
        return;
    };
    let Ok(geometry) = BitmapGeometry::new(64 << 20, g) else {
        return;
    };
    if let Ok(bm) = DirtyBitmap::decode_rle(data, geometry) {
        assert_eq!(bm.encode_rle(), data);
    }
}

/// Superblock, bitmap-page and activity-log decoders over one 4 KiB block (input zero
/// padded): no panic; what they accept survives encode/decode unchanged (compared on values:
/// reserved bytes are covered by the CRC but not re-encoded).
pub fn meta_block_decode(data: &[u8]) {
    let mut b = [0u8; BLOCK];
    let n = data.len().min(BLOCK);
    b[..n].copy_from_slice(&data[..n]);
    for slot in 0..2 {
        if let Ok(sb) = decode_superblock(&b, slot) {
            assert_eq!(
                decode_superblock(&encode_superblock(&sb), slot).ok(),
                Some(sb)
            );
        }
    }
    let uuid = [0u8; 16];
    if let Ok(words) = decode_bitmap_page(&b, &uuid, 0) {
        assert_eq!(
            decode_bitmap_page(&encode_bitmap_page(&uuid, 0, &words), &uuid, 0).ok(),
            Some(words)
        );
    }
    if let Ok(rec) = decode_al_block(&b, &uuid, 1024, 0, 4) {
        assert_eq!(
            decode_al_block(&encode_al_block(&uuid, 1024, &rec), &uuid, 1024, 0, 4).ok(),
            Some(rec)
        );
    }
}

/// Parsers of outside text in the cloud room: AWS error messages, CIDR blocks, record names,
/// `[cloud]` TOML, DNS answers. No panic; accepted record names are already normalised.
pub fn cloud_parsers(data: &[u8]) {
    if data.len() >= 2 {
        let id = u16::from_be_bytes([data[0], data[1]]);
        let _ = decode_answer(id, data);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(id) = quoted_id(text) {
        assert!(text.contains(&format!("'{id}'")));
    }
    let _ = cidr_contains(text, std::net::Ipv4Addr::new(10, 0, 0, 1));
    if check_record_name(text).is_ok() {
        assert!(text.ends_with('.') && !text.bytes().any(|b| b.is_ascii_uppercase()));
    }
    if let Ok(c) = toml::from_str::<CloudConfig>(text) {
        let _ = c.validate();
    }
}

/// Parsers of outside bytes in the cluster room: heartbeat datagrams, witness HTTP status
/// lines, witness URLs, control requests. No panic; a datagram that decodes re-encodes to
/// the same bytes.
pub fn cluster_parsers(data: &[u8]) {
    let Ok(key) = PreSharedKey::new(vec![7; 32]) else {
        return;
    };
    if let Ok(hb) = decode(data, &key) {
        assert_eq!(encode(&hb, &key), data);
    }
    let _ = status_code(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = WitnessUrl::parse(text) {
        assert!(!u.host.is_empty() && u.port != 0 && u.path.starts_with('/'));
    }
    let _ = serde_json::from_str::<Request>(text);
}

/// Reads the fuzz input as a stream of bytes, 0 once exhausted.
struct Bytes<'a>(std::slice::Iter<'a, u8>);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        self.0.next().copied().unwrap_or(0)
    }

    /// A generation id: mostly from a small set (0, just created, 10..=15) so both sides
    /// share ids often; sometimes a full 64-bit value.
    fn id(&mut self) -> u64 {
        match self.byte() {
            b @ 0..=239 => match b % 8 {
                0 => 0,
                1 => gen::JUST_CREATED,
                k => 8 + u64::from(k),
            },
            _ => (0..8).fold(0u64, |acc, _| (acc << 8) | u64::from(self.byte())),
        }
    }

    fn side(&mut self, name: &str) -> Side {
        let node_id = u32::from(self.byte() % 3);
        let ids = GenIds {
            current: self.id(),
            bitmap: self.id(),
            history: [self.id(), self.id()],
        };
        let flags = DiskFlags(u32::from(self.byte()) & DiskFlags::ALL);
        let dirty_chunks = u64::from(self.byte() % 3);
        let role = self.byte();
        let primary = role & 1 == 1;
        // Rarely detached: most inputs exercise the generation decision.
        let detached = role & 0x1e == 0x1e;
        Side {
            name: name.into(),
            gen: NodeGen {
                node_id,
                ids,
                flags,
            },
            dirty_chunks,
            primary,
            detached,
        }
    }
}

/// `volume::plan` and `meta::gen::decide` on arbitrary generation ids, flags, node ids,
/// names, dirty counts, roles and policies. Checks the invariants both nodes rely on:
/// `decide` is antisymmetric; the two nodes' plans agree (never two Sources, never two
/// Targets, same full/bitmap choice); a Primary is never a Target; a Source is Consistent;
/// unrelated data, two Primaries and split brain under `disconnect` copy nothing; a bitmap
/// resync only where a bitmap bounds the differences; "in sync" only at equal generations
/// or with a detached node, to or from which nothing is ever copied.
pub fn volume_plan(data: &[u8]) {
    let mut input = Bytes(data.iter());
    let names = ["a", "b"];
    let name_a = names[usize::from(input.byte() & 1)];
    let mut a = input.side(name_a);
    let mut b = input.side("b");
    if input.byte() & 1 == 1 {
        std::mem::swap(&mut a, &mut b);
    }
    let policy = match input.byte() % 5 {
        0 => SplitBrainPolicy::Disconnect,
        1 => SplitBrainPolicy::DiscardZeroChanges,
        2 => SplitBrainPolicy::DiscardNode(a.name.clone()),
        3 => SplitBrainPolicy::DiscardNode(b.name.clone()),
        _ => SplitBrainPolicy::DiscardNode("c".into()),
    };

    let d = gen::decide(&a.gen, &b.gen);
    assert_eq!(
        gen::decide(&b.gen, &a.gen),
        d.mirrored(),
        "decide is not antisymmetric"
    );

    let pa = plan(&a, &b, &policy);
    let pb = plan(&b, &a, &policy);
    match (&pa, &pb) {
        (Plan::Source { full: f1 }, Plan::Target { full: f2 })
        | (Plan::Target { full: f1 }, Plan::Source { full: f2 }) => {
            assert_eq!(f1, f2, "the two nodes disagree on full vs bitmap resync")
        }
        (Plan::InSync, Plan::InSync)
        | (Plan::AwaitInitialSync, Plan::AwaitInitialSync)
        | (Plan::Refuse(_), Plan::Refuse(_)) => {}
        _ => panic!("the two nodes disagree: {pa:?} vs {pb:?}"),
    }
    for (me, other, mine) in [(&a, &b, &pa), (&b, &a, &pb)] {
        match mine {
            Plan::Target { .. } => {
                assert!(!me.primary, "a Primary was made a resync target");
                assert!(
                    !me.detached && !other.detached,
                    "a resync with a detached node"
                );
            }
            Plan::Source { full } => {
                assert!(
                    !me.detached && !other.detached,
                    "a resync with a detached node"
                );
                assert!(
                    me.gen.flags.has(DiskFlags::CONSISTENT),
                    "resync from an inconsistent source"
                );
                assert!(!other.primary, "a Primary was made a resync target");
                let bitmap_bounded = matches!(d, Decision::BitmapResync { .. })
                    || matches!(
                        d,
                        Decision::SplitBrain {
                            evidence: SplitBrainEvidence::BitmapIdsEqual { common, .. }
                        } if common != gen::JUST_CREATED
                    );
                assert!(
                    *full || bitmap_bounded,
                    "bitmap resync without a bound: {d:?}"
                );
            }
            Plan::InSync => assert!(
                me.gen.ids.current == other.gen.ids.current || me.detached || other.detached,
                "in sync at different generations"
            ),
            Plan::AwaitInitialSync => assert_eq!(d, Decision::InitialSyncPending),
            Plan::Refuse(_) => {}
        }
    }
    let copies = |p: &Plan| matches!(p, Plan::Source { .. } | Plan::Target { .. });
    if a.primary && b.primary {
        assert_eq!(pa, Plan::Refuse(Refusal::BothPrimary));
    }
    if matches!(
        d,
        Decision::UnrelatedData | Decision::SameNodeId { .. } | Decision::SourceInconsistent { .. }
    ) || a.name == b.name
        || (matches!(d, Decision::SplitBrain { .. }) && policy == SplitBrainPolicy::Disconnect)
    {
        assert!(!copies(&pa) && !copies(&pb), "{d:?} led to a copy: {pa:?}");
    }
}
