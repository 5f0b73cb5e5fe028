//! Replication wire codec micro-benchmarks: CRC32 and zstd level 1 throughput on one
//! core, frame encode+decode of 4 KiB and 1 MiB data frames, and the wire/payload byte ratio
//! for JSON-like data. Run: `nice -n 10 cargo bench --bench wire -- --warm-up-time 1 --measurement-time 3`.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use twinvol::repl::wire::frame::FrameQueue;
use twinvol::repl::wire::{
    Data, DataFlags, FrameDecoder, FrameEncoder, Message, DEFAULT_MAX_PAYLOAD,
};

/// Text resembling JSON documents (the "compressible text or JSON-like" data).
fn json_like(n: usize) -> Vec<u8> {
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

/// Pseudo-random (incompressible) bytes, deterministic.
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn data_msg(data: Vec<u8>) -> Message {
    Message::Data(Data {
        seq: 1,
        epoch: 0,
        offset: 4096,
        flags: DataFlags::default(),
        data: Bytes::from(data),
    })
}

fn crc32(c: &mut Criterion) {
    let buf = noise(1 << 20);
    let mut g = c.benchmark_group("crc32fast");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("1MiB", |b| b.iter(|| crc32fast::hash(black_box(&buf))));
    g.finish();
}

fn zstd_level1(c: &mut Criterion) {
    let text = json_like(1 << 20);
    let mut g = c.benchmark_group("zstd_level1_compress");
    g.throughput(Throughput::Bytes(text.len() as u64));
    let mut z = zstd::bulk::Compressor::new(1).expect("zstd context");
    let mut out = Vec::with_capacity(text.len());
    g.bench_function("json_like_1MiB", |b| {
        b.iter(|| {
            out.clear();
            z.compress_to_buffer(black_box(&text[..]), &mut out)
                .expect("fits");
        })
    });
    g.finish();
}

fn frame_round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode_decode");
    for (name, level, size, gen) in [
        ("raw_4KiB", 0, 4096, noise as fn(usize) -> Vec<u8>),
        ("raw_1MiB", 0, 1 << 20, noise),
        ("zstd1_json_4KiB", 1, 4096, json_like),
        ("zstd1_json_1MiB", 1, 1 << 20, json_like),
    ] {
        let msg = data_msg(gen(size));
        let mut enc = FrameEncoder::new(level, DEFAULT_MAX_PAYLOAD).expect("encoder");
        let mut dec = FrameDecoder::new(DEFAULT_MAX_PAYLOAD).expect("decoder");
        let mut out = BytesMut::with_capacity(size + 64);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &msg, |b, msg| {
            b.iter(|| {
                out.clear();
                enc.encode(msg, &mut out).expect("encode");
                dec.push(&out);
                black_box(dec.pop().expect("decode").expect("whole frame"))
            })
        });
    }
    g.finish();
}

/// Sending one raw 1 MiB Data frame: encoded into one contiguous buffer (a copy of the
/// payload) against queued by reference for a vectored write (`FrameQueue`, what the link
/// does); both compute the payload CRC.
fn frame_encode_send_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode_1MiB_raw");
    let msg = data_msg(noise(1 << 20));
    let mut enc = FrameEncoder::new(0, DEFAULT_MAX_PAYLOAD).expect("encoder");
    g.throughput(Throughput::Bytes(1 << 20));
    let mut out = BytesMut::with_capacity((1 << 20) + 64);
    g.bench_function("copied_into_buffer", |b| {
        b.iter(|| {
            out.clear();
            black_box(enc.encode(&msg, &mut out).expect("encode"))
        })
    });
    let mut q = FrameQueue::new();
    g.bench_function("queued_by_reference", |b| {
        b.iter(|| {
            q.clear();
            black_box(enc.encode_into(&msg, &mut q).expect("encode"))
        })
    });
    g.finish();
}

/// Not a timing: prints wire bytes / payload bytes for JSON-like data frames at level 1.
fn wire_ratio(_c: &mut Criterion) {
    let mut enc = FrameEncoder::new(1, DEFAULT_MAX_PAYLOAD).expect("encoder");
    for size in [4096usize, 65536, 1 << 20] {
        let mut out = BytesMut::new();
        let s = enc
            .encode(&data_msg(json_like(size)), &mut out)
            .expect("encode");
        println!(
            "wire_ratio json_like {size} B payload: {} wire bytes (header included) = {:.3} of payload",
            s.frame_len(),
            s.frame_len() as f64 / size as f64
        );
    }
}

criterion_group!(
    benches,
    wire_ratio,
    crc32,
    zstd_level1,
    frame_round_trip,
    frame_encode_send_side
);
criterion_main!(benches);
