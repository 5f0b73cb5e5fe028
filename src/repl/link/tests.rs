//! Link tests over loopback: 127.0.0.1 plays one node, 127.0.0.2 the other.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use socket2::SockRef;

use super::*;
use crate::repl::wire::{Data, DataFlags, Generations};

fn json_like(n: usize) -> Vec<u8> {
    crate::repl::wire::tests::json_like(n)
}

const KEY_A: &str = "KEY-A-very-secret-0123456789";
const KEY_B: &str = "KEY-B-other-secret-987654321";

fn hello(id: &str, peer: &str) -> Hello {
    Hello {
        proto_min: 1,
        proto_max: 1,
        volume_uuid: [0x42; 16],
        node_id: id.into(),
        peer_node_id: peer.into(),
        generations: Generations {
            current: 11,
            bitmap: 0,
            history1: 10,
            history2: 0,
        },
        disk_state: 4,
        bitmap_granularity: 4096,
        device_size: 1 << 30,
        features: 1,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn key(s: &str) -> PreSharedKey {
    PreSharedKey::new(s.as_bytes().to_vec()).unwrap()
}

/// Node "a" listens on 127.0.0.1 expecting peer 127.0.0.2; node "b" is configured to connect
/// from 127.0.0.2 to a's listener.
fn pair_configs(key_a: &str, key_b: &str) -> (LinkListener, LinkConfig) {
    let mut la = LinkConfig::new(
        addr("127.0.0.1:0"),
        addr("127.0.0.2:0"),
        key(key_a),
        hello("a", "b"),
    );
    la.handshake_timeout = Duration::from_secs(5);
    let listener = LinkListener::bind(la).unwrap();
    let port = listener.local_addr().unwrap().port();
    let cb = LinkConfig::new(
        addr("127.0.0.2:0"),
        SocketAddr::new("127.0.0.1".parse().unwrap(), port),
        key(key_b),
        hello("b", "a"),
    );
    (listener, cb)
}

/// Two authenticated links over loopback: node "a" (accepted) and node "b" (connected).
pub(crate) async fn connected_pair() -> (Link, Link) {
    let (listener, cb) = pair_configs(KEY_A, KEY_A);
    let (a, b) = tokio::join!(listener.accept(), connect(&cb));
    (a.unwrap(), b.unwrap())
}

fn assert_no_key(text: &str) {
    for k in [KEY_A, KEY_B] {
        assert!(!text.contains(k), "key leaked: {text}");
        let hex: String = k.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex), "key leaked as hex: {text}");
    }
}

#[tokio::test]
async fn authenticated_connect_succeeds_from_the_configured_address_and_carries_data() {
    let (listener, cb) = pair_configs(KEY_A, KEY_A);
    let (a, b) = tokio::join!(listener.accept(), connect(&cb));
    let (mut a, mut b) = (a.unwrap(), b.unwrap());

    assert_eq!(
        b.local_addr().unwrap().ip(),
        "127.0.0.2".parse::<std::net::IpAddr>().unwrap(),
        "did not bind replication.address"
    );
    assert_eq!(a.peer_info().hello, hello("b", "a"));
    assert_eq!(b.peer_info().hello, hello("a", "b"));
    for l in [&a, &b] {
        assert!(l.stream().nodelay().unwrap(), "TCP_NODELAY not set");
        assert!(
            SockRef::from(l.stream()).keepalive().unwrap(),
            "keepalive not set"
        );
    }

    let data = Message::Data(Data {
        seq: 1,
        epoch: 0,
        offset: 4096,
        flags: DataFlags(DataFlags::FUA),
        data: Bytes::from(vec![7u8; 1 << 20]),
    });
    b.send(&data).await.unwrap();
    assert_eq!(a.recv().await.unwrap(), data);
    a.send(&Message::Ack { seq: 1, status: 0 }).await.unwrap();
    assert_eq!(b.recv().await.unwrap(), Message::Ack { seq: 1, status: 0 });
    assert_eq!(
        a.recv_timeout(Duration::from_millis(50)).await.unwrap(),
        None,
        "nothing was sent"
    );
}

#[tokio::test]
async fn wrong_key_is_refused_on_both_sides_without_leaking_the_key() {
    let (listener, cb) = pair_configs(KEY_A, KEY_B);
    let (a, b) = tokio::join!(listener.accept(), connect(&cb));
    let ea = a.unwrap_err();
    let eb = b.unwrap_err();
    assert!(matches!(ea, LinkError::AuthFailed { .. }), "{ea:?}");
    assert!(matches!(eb, LinkError::AuthRejectedByPeer { .. }), "{eb:?}");
    assert!(
        ea.needs_operator() && eb.needs_operator(),
        "retrying cannot fix a key"
    );
    for text in [
        ea.to_string(),
        format!("{ea:?}"),
        eb.to_string(),
        format!("{eb:?}"),
        format!("{cb:?}"),
    ] {
        assert_no_key(&text);
        assert!(!text.is_empty());
    }
    assert!(ea.to_string().contains("key_file") && eb.to_string().contains("key_file"));
}

#[tokio::test]
async fn connection_from_a_non_peer_address_is_refused_and_the_listener_keeps_serving() {
    let (listener, cb) = pair_configs(KEY_A, KEY_A);
    // An impostor on 127.0.0.1 (not the configured peer 127.0.0.2) holding the right key.
    let mut impostor = cb.clone();
    impostor.local = addr("127.0.0.1:0");
    let (a, b) = tokio::join!(listener.accept(), connect(&impostor));
    match a.unwrap_err() {
        LinkError::NotPeer { from, expected } => {
            assert_eq!(from.ip().to_string(), "127.0.0.1");
            assert_eq!(expected.to_string(), "127.0.0.2");
        }
        e => panic!("expected NotPeer, got {e:?}"),
    }
    assert!(b.is_err(), "impostor got a link");
    // The real peer still gets in.
    let (a, b) = tokio::join!(listener.accept(), connect(&cb));
    assert!(a.is_ok() && b.is_ok());
}

#[tokio::test]
async fn bind_to_an_address_not_on_any_interface_names_it_and_the_fix() {
    // 192.0.2.0/24 is TEST-NET-1: never assigned to a local interface.
    let cfg = LinkConfig::new(
        addr("192.0.2.55:7789"),
        addr("127.0.0.1:7789"),
        key(KEY_A),
        hello("a", "b"),
    );
    let e = LinkListener::bind(cfg.clone()).unwrap_err().to_string();
    assert!(
        e.contains("192.0.2.55:7789")
            && e.contains("not on any interface")
            && e.contains("replication.address"),
        "{e}"
    );
    let e = connect(&cfg).await.unwrap_err().to_string();
    assert!(
        e.contains("192.0.2.55") && e.contains("replication.address"),
        "{e}"
    );
}

#[tokio::test]
async fn unknown_interface_is_named_with_the_fix() {
    let mut cfg = LinkConfig::new(
        addr("127.0.0.1:0"),
        addr("127.0.0.2:7789"),
        key(KEY_A),
        hello("a", "b"),
    );
    cfg.interface = Some("twv-noif0".into());
    let e = connect(&cfg).await.unwrap_err().to_string();
    assert!(
        e.contains("twv-noif0") && e.contains("replication.interface"),
        "{e}"
    );
}

#[tokio::test]
async fn sockets_pinned_to_the_loopback_interface_connect() {
    let (listener, mut cb) = pair_configs(KEY_A, KEY_A);
    cb.interface = Some("lo".into());
    let (a, b) = tokio::join!(listener.accept(), connect(&cb));
    let b = b.unwrap();
    a.unwrap();
    assert_eq!(
        SockRef::from(b.stream()).device().unwrap().as_deref(),
        Some(&b"lo"[..])
    );
}

#[tokio::test]
async fn a_silent_peer_times_out_the_handshake_naming_it() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (s, _) = silent.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(s);
    });
    let mut cfg = LinkConfig::new(addr("127.0.0.2:0"), peer, key(KEY_A), hello("b", "a"));
    cfg.handshake_timeout = Duration::from_millis(300);
    let e = connect(&cfg).await.unwrap_err();
    assert!(matches!(e, LinkError::HandshakeTimeout { .. }), "{e:?}");
    assert!(e.to_string().contains(&peer.to_string()));
    hold.abort();
}

#[tokio::test]
async fn connect_retrying_gives_up_after_the_attempt_limit_with_the_last_error() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = LinkConfig::new(
        addr("127.0.0.2:0"),
        SocketAddr::new("127.0.0.1".parse().unwrap(), port),
        key(KEY_A),
        hello("b", "a"),
    );
    let policy = BackoffPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(80),
        multiplier: 2,
        jitter: 0.0,
    };
    let t0 = std::time::Instant::now();
    let e = connect_retrying(&cfg, policy, Some(4)).await.unwrap_err();
    // Three sleeps between four attempts: 20 + 40 + 80 ms.
    assert!(
        t0.elapsed() >= Duration::from_millis(140),
        "{:?}",
        t0.elapsed()
    );
    assert!(matches!(e, LinkError::Connect { .. }), "{e:?}");
    assert!(!e.needs_operator(), "a peer not up yet may come up");
    assert!(e.to_string().contains(&port.to_string()));
}

#[tokio::test]
async fn connect_retrying_reaches_a_peer_that_starts_late() {
    let (listener, cb) = pair_configs(KEY_A, KEY_A);
    let port = listener.local_addr().unwrap().port();
    let cfg_a = listener.cfg.clone();
    drop(listener);
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut cfg_a = cfg_a;
        cfg_a.local = SocketAddr::new(cfg_a.local.ip(), port);
        LinkListener::bind(cfg_a).unwrap().accept().await
    });
    let policy = BackoffPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
        multiplier: 2,
        jitter: 0.5,
    };
    let b = connect_retrying(&cb, policy, Some(50)).await.unwrap();
    assert_eq!(b.peer_info().hello.node_id, "a");
    late.await.unwrap().unwrap();
}

/// What `sent` holds once it counts at least `frames` frames (or after 5 s, for the caller's
/// assertion to report): a writer thread adds what it sent after each socket write.
async fn counted(sent: &SentTraffic, frames: u64) -> Traffic {
    let t0 = std::time::Instant::now();
    loop {
        let t = *sent.lock().unwrap();
        if t.frames >= frames || t0.elapsed() > Duration::from_secs(5) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn split_halves_stream_writes_and_acks_concurrently_and_count_compressed_bytes() {
    let (listener, cb) = pair_configs(KEY_A, KEY_A);
    let (a, b) = tokio::join!(listener.accept(), connect(&cb));
    let (_, mut a_rx, a_w) = a
        .unwrap()
        .into_threaded(SentTraffic::default(), false)
        .unwrap();
    let b_sent = SentTraffic::default();
    let (_, mut b_rx, b_w) = b.unwrap().into_threaded(b_sent.clone(), true).unwrap();
    let (a_tx, b_tx) = (a_w.sender().unwrap(), b_w.sender().unwrap());
    let n = 64u64;
    let payload = Bytes::from(json_like(64 * 1024));
    let p2 = payload.clone();
    // Secondary role on a: ack every write as it arrives.
    let secondary = tokio::spawn(async move {
        for seq in 0..n {
            match a_rx.recv().await.unwrap() {
                Message::Data(d) => {
                    assert_eq!((d.seq, d.offset, &d.data), (seq, seq * 65536, &p2));
                    a_tx.send(Message::Ack {
                        seq: d.seq,
                        status: 0,
                    })
                    .unwrap();
                }
                m => panic!("unexpected {m:?}"),
            }
        }
        a_rx.received()
    });
    for seq in 0..n {
        b_tx.send(Message::Data(Data {
            seq,
            epoch: 0,
            offset: seq * 65536,
            flags: DataFlags::default(),
            data: payload.clone(),
        }))
        .unwrap();
    }
    for seq in 0..n {
        assert_eq!(b_rx.recv().await.unwrap(), Message::Ack { seq, status: 0 });
    }
    let sent = counted(&b_sent, n + 3).await;
    let received = secondary.await.unwrap();
    drop((a_w, b_w));
    // Handshake frames are counted too: Hello, AuthChallenge, AuthResponse.
    assert_eq!(sent.frames, n + 3);
    assert_eq!(received.frames, n + 3);
    assert_eq!(
        received.wire_bytes, sent.wire_bytes,
        "receiver read exactly what the sender wrote"
    );
    assert!(
        sent.wire_bytes * 2 <= sent.payload_bytes,
        "JSON-like data not compressed to half: {sent:?}"
    );
}

/// Large raw writes cross a narrow pipe in many partial reads and writes, with the reader's
/// `recv` cancelled over and over (the session's ping timer does that): every message arrives
/// intact, in order, its data aligned for direct I/O, and byte counts match.
#[tokio::test]
async fn bulk_payloads_survive_partial_io_and_cancelled_receives_and_arrive_aligned() {
    use crate::repl::wire::frame::BULK_ALIGN;
    use crate::repl::wire::{FrameDecoder, FrameEncoder, ResyncData, ResyncPayload};
    let (a, b) = tokio::io::duplex(7 * 1024 + 3);
    let peer = addr("127.0.0.2:7789");
    let mut tx = Framed::new(
        a,
        peer,
        FrameEncoder::new(1, crate::repl::wire::DEFAULT_MAX_PAYLOAD).unwrap(),
        FrameDecoder::new(crate::repl::wire::DEFAULT_MAX_PAYLOAD).unwrap(),
    );
    let mut rx = Framed::new(
        b,
        peer,
        FrameEncoder::new(1, crate::repl::wire::DEFAULT_MAX_PAYLOAD).unwrap(),
        FrameDecoder::new(crate::repl::wire::DEFAULT_MAX_PAYLOAD).unwrap(),
    );
    let mut msgs = vec![];
    for i in 0..12u64 {
        let data = Bytes::from(crate::repl::wire::tests::noise(
            i,
            64 * 1024 + 4096 * (i as usize % 5) * 17,
        ));
        msgs.push(if i % 3 == 2 {
            Message::ResyncData(ResyncData {
                seq: i,
                offset: i << 20,
                length: data.len() as u32,
                payload: ResyncPayload::Bytes(data),
            })
        } else {
            Message::Data(Data {
                seq: i,
                epoch: 1,
                offset: i << 20,
                flags: DataFlags::default(),
                data,
            })
        });
        msgs.push(Message::Ping { nonce: i });
        msgs.push(Message::Data(Data {
            seq: 100 + i,
            epoch: 1,
            offset: 0,
            flags: DataFlags::default(),
            data: Bytes::from(json_like(100_000)),
        }));
    }
    let expect = msgs.clone();
    let sender = tokio::spawn(async move {
        for m in &msgs {
            tx.queue(m).unwrap();
        }
        tx.flush().await.unwrap();
        tx.traffic().0
    });
    let mut got = vec![];
    let mut cancelled = 0;
    while got.len() < expect.len() {
        match tokio::time::timeout(Duration::from_micros(20), rx.recv()).await {
            Ok(m) => got.push(m.unwrap()),
            Err(_) => cancelled += 1,
        }
    }
    let sent = sender.await.unwrap();
    assert_eq!(got, expect);
    assert!(
        cancelled > 0,
        "no receive was cancelled: the test proves nothing"
    );
    for m in &got {
        if let Message::Data(Data { data, .. })
        | Message::ResyncData(ResyncData {
            payload: ResyncPayload::Bytes(data),
            ..
        }) = m
        {
            // Raw bulk data is received into a buffer of its own; the compressed JSON is not.
            if data.len() != 100_000 {
                assert_eq!(
                    data.as_ptr() as usize % BULK_ALIGN,
                    0,
                    "{} bytes",
                    data.len()
                );
            }
        }
    }
    assert_eq!(rx.traffic().1.wire_bytes, sent.wire_bytes);
    assert_eq!(rx.traffic().1.frames, sent.frames);
}

/// Messages already read come out of `try_recv_buffered` without touching the stream, in
/// the same order `recv` would give them; a bulk payload still arriving, and an empty buffer,
/// leave it to `recv`; a corrupt buffered frame is an error there too.
#[tokio::test]
async fn buffered_messages_are_taken_without_a_read_in_order_and_verified() {
    use crate::repl::wire::{FrameDecoder, FrameEncoder, DEFAULT_MAX_PAYLOAD};
    use tokio::io::AsyncWriteExt;
    let peer = addr("127.0.0.2:7789");
    let mut enc = FrameEncoder::new(0, DEFAULT_MAX_PAYLOAD).unwrap();
    let ack = |seq| Message::Ack { seq, status: 0 };
    let mut expect: Vec<Message> = (1..=5).map(ack).collect();
    expect.push(Message::Data(Data {
        seq: 6,
        epoch: 1,
        offset: 0,
        flags: DataFlags::default(),
        data: Bytes::from(crate::repl::wire::tests::noise(6, 70_000)),
    }));
    expect.extend((7..=9).map(ack));
    let mut bytes = vec![];
    for m in &expect {
        bytes.extend(enc.encode_to_vec(m).unwrap());
    }
    let (mut a, b) = tokio::io::duplex(1 << 20);
    let framed = Framed::new(
        b,
        peer,
        FrameEncoder::new(0, DEFAULT_MAX_PAYLOAD).unwrap(),
        FrameDecoder::new(DEFAULT_MAX_PAYLOAD).unwrap(),
    );
    let (mut rx, _) = framed.detach_sender();
    assert!(rx.try_recv_buffered().is_none(), "nothing was read yet");
    a.write_all(&bytes).await.unwrap();
    let (mut got, mut buffered) = (vec![], 0);
    while got.len() < expect.len() {
        match rx.try_recv_buffered() {
            Some(m) => {
                buffered += 1;
                got.push(m.unwrap());
            }
            None => got.push(rx.recv().await.unwrap()),
        }
    }
    assert_eq!(got, expect);
    assert!(
        buffered >= 4,
        "only {buffered} messages came from the buffer"
    );
    assert!(rx.try_recv_buffered().is_none());
    assert_eq!(rx.received().frames, expect.len() as u64);

    // A valid ack, then one whose payload was damaged, in one read.
    let mut corrupt = enc.encode_to_vec(&ack(11)).unwrap();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    a.write_all(&[enc.encode_to_vec(&ack(10)).unwrap(), corrupt].concat())
        .await
        .unwrap();
    assert_eq!(rx.recv().await.unwrap(), ack(10));
    assert!(matches!(
        rx.try_recv_buffered(),
        Some(Err(LinkError::Wire { .. }))
    ));
}

/// The threaded writer keeps the channel's order and counts what it sent; a message it cannot
/// encode stops it, and it shuts the socket down so both ends see the connection end at once
/// (the session then resyncs what was outstanding) instead of waiting for a ping timeout.
#[tokio::test]
async fn the_writer_thread_keeps_order_counts_and_closes_the_connection_when_it_fails() {
    let (listener, cb) = pair_configs(KEY_A, KEY_A);
    let (a, b) = tokio::join!(listener.accept(), connect(&cb));
    let sent = SentTraffic::default();
    let (_, mut a_rx, a_w) = a.unwrap().into_threaded(sent.clone(), false).unwrap();
    let (_, mut b_rx, _b_w) = b
        .unwrap()
        .into_threaded(SentTraffic::default(), false)
        .unwrap();
    let tx = a_w.sender().unwrap();
    for nonce in 0..100 {
        tx.send(Message::Ping { nonce }).unwrap();
    }
    for nonce in 0..100 {
        assert_eq!(b_rx.recv().await.unwrap(), Message::Ping { nonce });
    }
    // Hello, AuthChallenge and AuthResponse of the handshake are counted too.
    let t = counted(&sent, 103).await;
    assert_eq!(t.frames, 103);
    assert_eq!(t.wire_bytes, b_rx.received().wire_bytes);
    tx.send(Message::Data(Data {
        seq: 1,
        epoch: 1,
        offset: 0,
        flags: DataFlags(1 << 31),
        data: Bytes::from_static(b"reserved flag: cannot be encoded"),
    }))
    .unwrap();
    let peer = tokio::time::timeout(Duration::from_secs(5), b_rx.recv())
        .await
        .expect("the peer sees the connection end");
    assert!(peer.is_err(), "{peer:?}");
    let own = tokio::time::timeout(Duration::from_secs(5), a_rx.recv())
        .await
        .expect("this side's reader sees it too");
    assert!(own.is_err(), "{own:?}");
    a_w.finish(Duration::from_millis(100)).await;
}

/// In async mode (`background`) the writer lets a small batch of Data frames wait
/// [`COALESCE_WAIT`] once for company: two frames queued 100 µs apart go out in one socket
/// write (the counted `writes`), and a lone frame still goes out, in one write, after the pause.
#[tokio::test]
async fn an_async_writer_sends_data_frames_queued_close_together_in_one_write() {
    let (listener, cb) = pair_configs(KEY_A, KEY_A);
    let (a, b) = tokio::join!(listener.accept(), connect(&cb));
    let sent = SentTraffic::default();
    let (_, _a_rx, a_w) = a.unwrap().into_threaded(sent.clone(), true).unwrap();
    let (_, mut b_rx, _b_w) = b
        .unwrap()
        .into_threaded(SentTraffic::default(), false)
        .unwrap();
    let tx = a_w.sender().unwrap();
    let data = |seq: u64| {
        Message::Data(Data {
            seq,
            epoch: 1,
            offset: seq * 4096,
            flags: DataFlags(0),
            data: Bytes::from(vec![seq as u8; 4096]),
        })
    };
    // The handshake's three frames are added to `sent` with the writer's first write.
    tx.send(data(0)).unwrap();
    assert_eq!(b_rx.recv().await.unwrap(), data(0));
    let before = counted(&sent, 4).await;
    tx.send(data(1)).unwrap();
    assert_eq!(b_rx.recv().await.unwrap(), data(1));
    let lone = counted(&sent, before.frames + 1).await;
    assert_eq!(lone.frames, before.frames + 1);
    assert_eq!(
        lone.writes,
        before.writes + 1,
        "a lone frame is written once"
    );
    // Two frames 100 µs apart: one write. A loaded machine may deschedule this thread for
    // longer than the pause between the two sends, so a few attempts are allowed.
    let mut last = lone;
    let mut together = false;
    for attempt in 0..5u64 {
        let seq = 10 + 2 * attempt;
        tx.send(data(seq)).unwrap();
        std::thread::sleep(Duration::from_micros(100));
        tx.send(data(seq + 1)).unwrap();
        assert_eq!(b_rx.recv().await.unwrap(), data(seq));
        assert_eq!(b_rx.recv().await.unwrap(), data(seq + 1));
        let now = counted(&sent, last.frames + 2).await;
        assert_eq!(now.frames, last.frames + 2);
        together = now.writes == last.writes + 1;
        last = now;
        if together {
            break;
        }
    }
    assert!(
        together,
        "two Data frames 100 µs apart never shared a write: {last:?}"
    );
    a_w.finish(Duration::from_millis(100)).await;
}

/// The calling thread's nice value, from /proc (field 19 of its stat line).
fn thread_nice() -> i32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("/proc/thread-self/stat");
    let after_comm = &stat[stat.rfind(')').expect("stat has a comm field") + 2..];
    after_comm
        .split(' ')
        .nth(16)
        .expect("nice field")
        .parse()
        .expect("nice is a number")
}

#[test]
fn lowering_the_writer_priority_changes_only_the_calling_thread() {
    let main_before = thread_nice();
    let (before, returned, after) = std::thread::spawn(|| {
        let before = thread_nice();
        let returned = super::writer::lower_thread_priority(3).expect("nice(3)");
        (before, returned, thread_nice())
    })
    .join()
    .unwrap();
    let expected = (before + 3).min(19);
    assert_eq!(returned, expected);
    assert_eq!(after, expected);
    assert_eq!(
        thread_nice(),
        main_before,
        "the rest of the process keeps its priority"
    );
}

/// SO_RCVLOWAT of `s` as the kernel holds it.
fn rcvlowat(s: &tokio::net::TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut n = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and n are valid for writes of the sizes given; the fd is the stream's own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&mut v as *mut libc::c_int).cast(),
            &mut n,
        )
    };
    assert_eq!(
        r,
        0,
        "getsockopt(SO_RCVLOWAT): {}",
        std::io::Error::last_os_error()
    );
    v
}

/// A connected loopback pair: (sending std stream, receiving reader woken per frame), the
/// receiver's SO_RCVBUF set to `rcvbuf` first when given.
async fn low_water_pair(
    rcvbuf: Option<usize>,
) -> (std::net::TcpStream, FrameReader<tokio::net::TcpStream>) {
    use crate::repl::wire::{FrameDecoder, FrameEncoder, DEFAULT_MAX_PAYLOAD};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = l.local_addr().unwrap();
    let tx = tokio::task::spawn_blocking(move || std::net::TcpStream::connect(to).unwrap());
    let (rx, peer) = l.accept().await.unwrap();
    if let Some(size) = rcvbuf {
        SockRef::from(&rx).set_recv_buffer_size(size).unwrap();
    }
    let framed = Framed::new(
        rx,
        peer,
        FrameEncoder::new(0, DEFAULT_MAX_PAYLOAD).unwrap(),
        FrameDecoder::new(DEFAULT_MAX_PAYLOAD).unwrap(),
    );
    let (mut reader, _) = framed.detach_sender();
    assert!(
        reader.wake_per_frame(),
        "the receive buffer could not be read"
    );
    assert_eq!(rcvlowat(reader.get_ref()), 1, "raised before any frame");
    (tx.await.unwrap(), reader)
}

/// A 1 MiB Data frame encoded raw, and the message.
fn big_frame(seed: u64) -> (Vec<u8>, Message) {
    let m = Message::Data(Data {
        seq: seed,
        epoch: 1,
        offset: seed << 20,
        flags: DataFlags::default(),
        data: Bytes::from(crate::repl::wire::tests::noise(seed, 1 << 20)),
    });
    let mut enc =
        crate::repl::wire::FrameEncoder::new(0, crate::repl::wire::DEFAULT_MAX_PAYLOAD).unwrap();
    let mut out = bytes::BytesMut::new();
    enc.encode(&m, &mut out).unwrap();
    (out.to_vec(), m)
}

/// While a large frame arrives, the reader asks to be woken when the rest of it is there (one
/// wake-up per frame, not per segment); a cancelled receive keeps that; once the frame is
/// complete the mark is back at 1, so small frames (acks, pings) wake it at once.
#[tokio::test]
async fn a_reader_is_woken_for_the_rest_of_a_large_frame_and_then_for_any_byte() {
    use std::io::Write;
    // As the link sets it (net.core.rmem_max may cap it: then so is the mark).
    let (mut tx, mut reader) = low_water_pair(Some(4 << 20)).await;
    let rcvbuf = SockRef::from(reader.get_ref()).recv_buffer_size().unwrap();
    let (frame, msg) = big_frame(3);
    let first = 300 * 1024;
    tx.write_all(&frame[..first]).unwrap();
    // The receive reads all that arrived, then waits for the rest: cancelled here.
    let r = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await;
    assert!(r.is_err(), "a frame missing 700 KiB was returned");
    assert_eq!(
        rcvlowat(reader.get_ref()) as usize,
        (frame.len() - first).min(rcvbuf / 4),
        "the mark is not the rest of the frame (bounded by a quarter of the receive buffer {rcvbuf})"
    );
    tx.write_all(&frame[first..]).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), reader.recv())
        .await
        .expect("the rest of the frame never woke the reader")
        .unwrap();
    assert_eq!(got, msg);
    assert_eq!(rcvlowat(reader.get_ref()), 1, "left raised after the frame");
    // A small frame now arrives on its own.
    let mut out = bytes::BytesMut::new();
    crate::repl::wire::FrameEncoder::new(0, crate::repl::wire::DEFAULT_MAX_PAYLOAD)
        .unwrap()
        .encode(&Message::Ping { nonce: 9 }, &mut out)
        .unwrap();
    tx.write_all(&out).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), reader.recv())
        .await
        .expect("a ping after a large frame never woke the reader")
        .unwrap();
    assert_eq!(got, Message::Ping { nonce: 9 });
}

/// With a receive buffer far smaller than a frame, the mark stays at a quarter of the buffer
/// (a sender can always fill that much), so frames still arrive: no wait that cannot end.
#[tokio::test]
async fn the_mark_is_bounded_by_the_receive_buffer_so_large_frames_still_arrive() {
    use std::io::Write;
    let (mut tx, mut reader) = low_water_pair(Some(32 * 1024)).await;
    let frames: Vec<_> = (0..3).map(big_frame).collect();
    let bytes: Vec<u8> = frames.iter().flat_map(|(f, _)| f.clone()).collect();
    // Paced (1 ms after every 64 KiB): every frame takes many 1 ms receive windows to arrive,
    // so some receive is always cancelled while the mark is raised (unpaced, loopback could
    // deliver a frame inside one window and the test failed about one run in six).
    let writer = std::thread::spawn(move || {
        for piece in bytes.chunks(64 * 1024) {
            tx.write_all(piece)?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok::<_, std::io::Error>(tx)
    });
    let mut highest = 0;
    for (_, msg) in &frames {
        let got = loop {
            match tokio::time::timeout(Duration::from_millis(1), reader.recv()).await {
                Ok(m) => break m.unwrap(),
                Err(_) => highest = highest.max(rcvlowat(reader.get_ref())),
            }
        };
        assert_eq!(&got, msg);
    }
    let _tx = writer.join().unwrap().unwrap();
    let rcvbuf = SockRef::from(reader.get_ref()).recv_buffer_size().unwrap();
    assert!(
        highest > 1,
        "the mark was never raised: the test proves nothing"
    );
    assert!(
        highest as usize <= rcvbuf / 4,
        "mark {highest} above a quarter of the receive buffer {rcvbuf}"
    );
}
