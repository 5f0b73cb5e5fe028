//! The server's request loop over an in-memory pipe and a RAM disk: out-of-order completion,
//! byte-exact cookies, malformed requests answered as the spec says without losing the stream,
//! shutdown behaviour.

use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use twinvol::block::mem::MemTarget;
use twinvol::nbd::proto::client::{
    encode_info_request, encode_meta_request, encode_option, parse_option_reply,
    parse_reply_header, ReplyHeader,
};
use twinvol::nbd::proto::consts::{cf, cflag, chunk, cmd, err, opt, rep, BASE_ALLOCATION};
use twinvol::nbd::proto::transmission::RequestHeader;
use twinvol::nbd::server::{serve_connection, ServerConfig, Shared};

struct Client {
    s: DuplexStream,
}

/// A reply as the test sees it.
#[derive(Debug)]
struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
    chunks: Vec<u16>,
}

impl Client {
    async fn connect(
        shared: Shared<MemTarget>,
        structured: bool,
    ) -> (Client, tokio::task::JoinHandle<Result<(), String>>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(b);
        let server = tokio::task::spawn_local(async move {
            serve_connection(shared, r, w)
                .await
                .map_err(|e| e.to_string())
        });
        let mut c = Client { s: a };
        let mut greeting = [0u8; 18];
        c.s.read_exact(&mut greeting).await.unwrap();
        let mut hello = (cf::FIXED_NEWSTYLE | cf::NO_ZEROES).to_be_bytes().to_vec();
        if structured {
            hello.extend(encode_option(opt::STRUCTURED_REPLY, &[]));
            hello.extend(encode_option(
                opt::SET_META_CONTEXT,
                &encode_meta_request("", &[BASE_ALLOCATION]),
            ));
        }
        hello.extend(encode_option(opt::GO, &encode_info_request("", &[])));
        c.s.write_all(&hello).await.unwrap();
        let mut buf = Vec::new();
        loop {
            if let Some((r, n)) = parse_option_reply(&buf).unwrap() {
                buf.drain(..n);
                assert!(
                    r.reply_type & rep::ERR_BIT == 0,
                    "option {} refused",
                    r.option
                );
                if r.option == opt::GO && r.reply_type == rep::ACK {
                    break;
                }
                continue;
            }
            let mut tmp = [0u8; 4096];
            let n = c.s.read(&mut tmp).await.unwrap();
            assert!(n > 0, "server closed during negotiation");
            buf.extend_from_slice(&tmp[..n]);
        }
        (c, server)
    }

    async fn send(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let h = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
    }

    /// Reads one complete reply (all chunks up to DONE); `read_len` is the data length a
    /// successful simple READ reply carries.
    async fn recv(&mut self, read_len: impl Fn(u64) -> usize) -> Option<Reply> {
        let mut hdr = [0u8; 20];
        if self.s.read_exact(&mut hdr[..4]).await.is_err() {
            return None;
        }
        let simple = u32::from_be_bytes(hdr[..4].try_into().unwrap()) == 0x6744_6698;
        let hl = if simple { 16 } else { 20 };
        self.s.read_exact(&mut hdr[4..hl]).await.ok()?;
        match parse_reply_header(&hdr[..hl]).unwrap().unwrap().0 {
            ReplyHeader::Simple { error, cookie } => {
                let mut data = vec![0; if error == 0 { read_len(cookie) } else { 0 }];
                self.s.read_exact(&mut data).await.ok()?;
                Some(Reply {
                    cookie,
                    error,
                    data,
                    chunks: vec![],
                })
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                length,
            } => {
                let mut payload = vec![0; length as usize];
                self.s.read_exact(&mut payload).await.ok()?;
                assert!(
                    flags & chunk::FLAG_DONE != 0,
                    "twinvol sends single-chunk replies"
                );
                let (error, data) = match kind {
                    chunk::OFFSET_DATA => (0, payload[8..].to_vec()),
                    chunk::ERROR => (u32::from_be_bytes(payload[..4].try_into().unwrap()), vec![]),
                    _ => (0, payload),
                };
                Some(Reply {
                    cookie,
                    error,
                    data,
                    chunks: vec![kind],
                })
            }
        }
    }
}

fn shared(size: u64) -> (Shared<MemTarget>, Rc<MemTarget>, watch::Sender<bool>) {
    let t = Rc::new(MemTarget::new(size));
    let (tx, rx) = watch::channel(false);
    (
        Shared::new(t.clone(), String::new(), &ServerConfig::default(), rx),
        t,
        tx,
    )
}

fn local<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f);
}

#[test]
fn pipelined_writes_and_reads_echo_every_cookie_once() {
    local(async {
        let (sh, target, _tx) = shared(1 << 20);
        let (mut c, _srv) = Client::connect(sh, true).await;
        for i in 0..64u64 {
            let data = vec![i as u8; 4096];
            c.send(
                cmd::WRITE,
                0,
                0xdead_0000_0000_0000 | i,
                i * 4096,
                4096,
                &data,
            )
            .await;
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let r = c.recv(|_| 0).await.unwrap();
            assert_eq!(r.error, 0);
            assert!(seen.insert(r.cookie), "cookie {:#x} twice", r.cookie);
        }
        for i in 0..64u64 {
            c.send(cmd::READ, 0, i, i * 4096, 4096, &[]).await;
        }
        for _ in 0..64 {
            let r = c.recv(|_| 4096).await.unwrap();
            assert_eq!(r.data, vec![r.cookie as u8; 4096]);
            assert_eq!(r.chunks, vec![chunk::OFFSET_DATA]);
        }
        assert_eq!(target.snapshot(63 * 4096, 4), vec![63; 4]);
    });
}

#[test]
fn simple_replies_for_clients_without_structured_replies_keep_cookies_byte_exact() {
    local(async {
        let (sh, _t, _tx) = shared(1 << 20);
        let (mut c, _srv) = Client::connect(sh, false).await;
        c.send(cmd::WRITE, cflag::FUA, u64::MAX, 512, 3, b"abc")
            .await;
        let r = c.recv(|_| 0).await.unwrap();
        assert_eq!((r.cookie, r.error), (u64::MAX, 0));
        c.send(cmd::READ, 0, 0x0102_0304_0506_0708, 512, 3, &[])
            .await;
        let r = c.recv(|_| 3).await.unwrap();
        assert_eq!(
            (r.cookie, r.data.as_slice()),
            (0x0102_0304_0506_0708, &b"abc"[..])
        );
        // BLOCK_STATUS without a negotiated context is invalid.
        c.send(cmd::BLOCK_STATUS, 0, 5, 0, 4096, &[]).await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, err::EINVAL);
    });
}

#[test]
fn refused_requests_get_errors_and_the_stream_stays_in_sync() {
    local(async {
        let (sh, target, _tx) = shared(1 << 20);
        let (mut c, _srv) = Client::connect(sh, true).await;
        // A write larger than the maximum block size: refused, payload drained.
        let big = vec![7u8; (32 << 20) + 512];
        c.send(cmd::WRITE, 0, 1, 0, big.len() as u32, &big).await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, err::EINVAL);
        // Past the end.
        c.send(cmd::WRITE, 0, 2, (1 << 20) - 512, 1024, &[1u8; 1024])
            .await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, err::ENOSPC);
        c.send(cmd::READ, 0, 3, 1 << 20, 1, &[]).await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, err::EINVAL);
        // Unknown command and unknown flag.
        c.send(42, 0, 4, 0, 0, &[]).await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, err::EINVAL);
        c.send(cmd::FLUSH, 1 << 12, 5, 0, 0, &[]).await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, err::EINVAL);
        // Nothing of the refused writes reached the disk; a normal request still works.
        assert_eq!(target.snapshot(0, 4), vec![0; 4]);
        c.send(cmd::WRITE, 0, 6, 0, 4, b"ok!!").await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, 0);
        assert_eq!(target.snapshot(0, 4), b"ok!!".to_vec());
    });
}

#[test]
fn bad_request_magic_closes_the_connection() {
    local(async {
        let (sh, _t, _tx) = shared(1 << 20);
        let (mut c, srv) = Client::connect(sh, true).await;
        c.s.write_all(&[0xffu8; 28]).await.unwrap();
        let res = tokio::time::timeout(Duration::from_secs(5), srv)
            .await
            .expect("server ends")
            .unwrap();
        assert!(res.unwrap_err().contains("bad request magic"));
        assert!(
            c.recv(|_| 0).await.is_none(),
            "connection closed without a reply"
        );
    });
}

#[test]
fn trim_zero_and_block_status_report_zeroes() {
    local(async {
        let (sh, target, _tx) = shared(1 << 20);
        let (mut c, _srv) = Client::connect(sh, true).await;
        c.send(cmd::WRITE, 0, 1, 0, 8192, &[9u8; 8192]).await;
        c.recv(|_| 0).await.unwrap();
        c.send(cmd::WRITE_ZEROES, cflag::NO_HOLE, 2, 4096, 4096, &[])
            .await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, 0);
        assert_eq!(target.snapshot(4096, 4096), vec![0; 4096]);
        c.send(cmd::BLOCK_STATUS, 0, 3, 0, 16384, &[]).await;
        let r = c.recv(|_| 0).await.unwrap();
        assert_eq!(r.chunks, vec![chunk::BLOCK_STATUS]);
        // context id, then (4096 data), (12288 zero)
        assert_eq!(
            &r.data[4..20],
            &[0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x30, 0, 0, 0, 0, 2]
        );
        c.send(cmd::BLOCK_STATUS, cflag::REQ_ONE, 4, 0, 16384, &[])
            .await;
        assert_eq!(c.recv(|_| 0).await.unwrap().data.len(), 12);
        c.send(cmd::TRIM, cflag::FUA, 5, 0, 4096, &[]).await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, 0);
        c.send(cmd::CACHE, 0, 6, 0, 4096, &[]).await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, 0);
        c.send(cmd::FLUSH, 0, 7, 0, 0, &[]).await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, 0);
        assert_eq!(target.flushes(), 1);
    });
}

#[test]
fn after_shutdown_new_requests_get_eshutdown_and_disc_closes_cleanly() {
    local(async {
        let (sh, _t, tx) = shared(1 << 20);
        let (mut c, srv) = Client::connect(sh, true).await;
        c.send(cmd::WRITE, 0, 1, 0, 4, b"data").await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, 0);
        tx.send(true).unwrap();
        c.send(cmd::WRITE, 0, 2, 0, 4, b"late").await;
        assert_eq!(c.recv(|_| 0).await.unwrap().error, err::ESHUTDOWN);
        c.send(cmd::DISC, 0, 3, 0, 0, &[]).await;
        let res = tokio::time::timeout(Duration::from_secs(5), srv)
            .await
            .expect("server ends")
            .unwrap();
        assert!(res.is_ok(), "{res:?}");
    });
}

#[test]
fn pipelined_writes_of_mixed_sizes_land_byte_exact() {
    // Large write payloads are read past the connection's read buffer and the header after one
    // without read-ahead; small requests keep the buffered path. A stream that mixes them, sent
    // as one burst so that headers and payload pieces arrive in every alignment, must still land
    // byte for byte.
    local(async {
        const SIZE: u64 = 8 << 20;
        let (sh, target, _tx) = shared(SIZE);
        let (mut c, _srv) = Client::connect(sh, true).await;
        let lens: [u32; 8] = [
            512,
            4096,
            64 * 1024,
            64 * 1024 + 512,
            300 * 1024,
            1 << 20,
            (1 << 20) + 4096,
            4096,
        ];
        let mut model = vec![0u8; SIZE as usize];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut burst = Vec::new();
        let mut cookies = 0u64;
        for round in 0..40u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = lens[(seed % lens.len() as u64) as usize];
            let offset = (seed >> 8) % (SIZE - u64::from(len)) / 512 * 512;
            let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ round ^ seed) as u8).collect();
            model[offset as usize..][..len as usize].copy_from_slice(&data);
            let h = RequestHeader {
                flags: 0,
                kind: cmd::WRITE,
                cookie: round,
                offset,
                length: len,
            };
            burst.extend_from_slice(&h.encode());
            burst.extend_from_slice(&data);
            if round % 7 == 3 {
                let f = RequestHeader {
                    flags: 0,
                    kind: cmd::FLUSH,
                    cookie: 1000 + round,
                    offset: 0,
                    length: 0,
                };
                burst.extend_from_slice(&f.encode());
                cookies += 1;
            }
            cookies += 1;
        }
        // The client writes while the server replies: send in one task, collect in this one.
        let (mut rd, mut wr) = tokio::io::split(c.s);
        let sender = tokio::task::spawn_local(async move {
            wr.write_all(&burst).await.unwrap();
            wr
        });
        let mut got = 0;
        let mut hdr = [0u8; 16];
        let mut seen = std::collections::HashSet::new();
        while got < cookies {
            // Writes and flushes get simple replies even with structured replies negotiated.
            rd.read_exact(&mut hdr).await.unwrap();
            match parse_reply_header(&hdr).unwrap().unwrap().0 {
                ReplyHeader::Simple { error, cookie } => {
                    assert_eq!(error, 0, "request {cookie} failed");
                    assert!(seen.insert(cookie), "cookie {cookie} twice");
                }
                other => panic!("unexpected reply {other:?}"),
            }
            got += 1;
        }
        let wr = sender.await.unwrap();
        c.s = rd.unsplit(wr);
        for at in (0..SIZE).step_by(1 << 20) {
            c.send(cmd::READ, 0, at, at, 1 << 20, &[]).await;
            let r = c.recv(|_| 1 << 20).await.unwrap();
            assert_eq!(r.error, 0);
            assert!(
                r.data == model[r.cookie as usize..][..1 << 20],
                "MiB at {} differs from what was written",
                r.cookie
            );
        }
        assert_eq!(target.snapshot(0, 1), model[..1].to_vec());
    });
}
