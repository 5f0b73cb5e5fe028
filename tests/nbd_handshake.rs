//! The server handshake state machine against the spec: every option, malformed input, the
//! seed streams of nbdkit's fuzzing corpus, and chunking invariance.

use proptest::prelude::*;
use twinvol::block::mem::MemTarget;
use twinvol::block::BlockTarget;
use twinvol::nbd::proto::client::{
    encode_info_request, encode_meta_request, encode_option, parse_option_reply, OptionReply,
};
use twinvol::nbd::proto::consts::{cf, info, opt, rep, tf, BASE_ALLOCATION, IHAVEOPT, NBDMAGIC};
use twinvol::nbd::proto::handshake::{
    greeting, ExportSpec, HandshakeError, Outcome, ServerHandshake, MAX_OPTION_LEN,
};

fn spec(name: &str) -> ExportSpec {
    ExportSpec {
        name: name.into(),
        info: MemTarget::new(1 << 20).info().clone(),
    }
}

fn flags(f: u32) -> Vec<u8> {
    f.to_be_bytes().to_vec()
}

/// Feeds everything at once and collects all output, looping like the server does.
fn run(hs: &mut ServerHandshake, input: &[u8]) -> (Vec<u8>, Outcome, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let step = hs.feed(&input[pos..]);
        pos += step.consumed;
        out.extend_from_slice(&step.output);
        match step.outcome {
            Outcome::NeedMore if step.consumed > 0 && pos < input.len() => continue,
            o => return (out, o, pos),
        }
    }
}

fn replies(mut out: &[u8]) -> Vec<OptionReply> {
    let mut v = Vec::new();
    while let Some((r, n)) = parse_option_reply(out).expect("valid option replies") {
        v.push(r);
        out = &out[n..];
    }
    assert!(
        out.is_empty(),
        "trailing bytes after option replies: {out:?}"
    );
    v
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let g = greeting();
    assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
    assert_eq!(&g[16..18], &[0, 3]);
}

#[test]
fn go_sends_export_info_block_size_and_ack() {
    let mut hs = ServerHandshake::new(spec(""));
    let mut input = flags(cf::FIXED_NEWSTYLE | cf::NO_ZEROES);
    input.extend(encode_option(
        opt::GO,
        &encode_info_request("", &[info::BLOCK_SIZE, info::NAME, info::DESCRIPTION]),
    ));
    let (out, outcome, _) = run(&mut hs, &input);
    let r = replies(&out);
    assert_eq!(r.len(), 5);
    assert_eq!(r[0].reply_type, rep::INFO);
    assert_eq!(&r[0].data[0..2], &info::EXPORT.to_be_bytes());
    assert_eq!(&r[0].data[2..10], &(1u64 << 20).to_be_bytes());
    let f = u16::from_be_bytes([r[0].data[10], r[0].data[11]]);
    assert!(f & tf::HAS_FLAGS != 0 && f & tf::SEND_FLUSH != 0 && f & tf::CAN_MULTI_CONN != 0);
    assert_eq!(&r[1].data[0..2], &info::BLOCK_SIZE.to_be_bytes());
    assert_eq!(r[4].reply_type, rep::ACK);
    match outcome {
        Outcome::Transmission(n) => assert!(n.block_size_negotiated && !n.structured),
        o => panic!("expected transmission, got {o:?}"),
    }
}

#[test]
fn info_for_unknown_export_is_err_unknown_and_negotiation_goes_on() {
    let mut hs = ServerHandshake::new(spec("data"));
    let mut input = flags(cf::FIXED_NEWSTYLE);
    input.extend(encode_option(opt::INFO, &encode_info_request("other", &[])));
    input.extend(encode_option(opt::GO, &encode_info_request("data", &[])));
    let (out, outcome, _) = run(&mut hs, &input);
    let r = replies(&out);
    assert_eq!(r[0].reply_type, rep::ERR_UNKNOWN);
    assert_eq!(r.last().map(|r| r.reply_type), Some(rep::ACK));
    assert!(matches!(outcome, Outcome::Transmission(_)));
}

#[test]
fn unknown_and_unsupported_options_get_err_unsup_and_parsing_continues() {
    let mut hs = ServerHandshake::new(spec(""));
    let mut input = flags(cf::FIXED_NEWSTYLE);
    input.extend(encode_option(999, b"whatever"));
    input.extend(encode_option(opt::STARTTLS, &[]));
    input.extend(encode_option(opt::EXTENDED_HEADERS, &[]));
    input.extend(encode_option(opt::LIST, &[]));
    let (out, outcome, _) = run(&mut hs, &input);
    let r = replies(&out);
    let types: Vec<u32> = r.iter().map(|r| r.reply_type).collect();
    assert_eq!(
        types,
        vec![
            rep::ERR_UNSUP,
            rep::ERR_UNSUP,
            rep::ERR_UNSUP,
            rep::SERVER,
            rep::ACK
        ]
    );
    assert_eq!(outcome, Outcome::NeedMore);
}

#[test]
fn oversized_option_is_skipped_without_buffering_and_refused() {
    let mut hs = ServerHandshake::new(spec(""));
    let big = MAX_OPTION_LEN as usize + 10;
    let mut input = flags(cf::FIXED_NEWSTYLE);
    input.extend(encode_option(opt::GO, &vec![0u8; big]));
    input.extend(encode_option(opt::LIST, &[]));
    // Feed in small pieces, as a socket would deliver it.
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for piece in input.chunks(1000) {
        pending.extend_from_slice(piece);
        loop {
            let step = hs.feed(&pending);
            pending.drain(..step.consumed);
            out.extend(step.output);
            assert!(
                pending.len() < 70_000,
                "the handshake must not buffer an oversized option"
            );
            if step.consumed == 0 || step.outcome != Outcome::NeedMore {
                break;
            }
        }
    }
    let types: Vec<u32> = replies(&out).iter().map(|r| r.reply_type).collect();
    assert_eq!(types, vec![rep::ERR_TOO_BIG, rep::SERVER, rep::ACK]);
}

#[test]
fn meta_context_needs_structured_replies_then_selects_base_allocation() {
    let mut hs = ServerHandshake::new(spec(""));
    let mut input = flags(cf::FIXED_NEWSTYLE);
    input.extend(encode_option(
        opt::SET_META_CONTEXT,
        &encode_meta_request("", &[BASE_ALLOCATION]),
    ));
    input.extend(encode_option(opt::STRUCTURED_REPLY, &[]));
    input.extend(encode_option(
        opt::LIST_META_CONTEXT,
        &encode_meta_request("", &[]),
    ));
    input.extend(encode_option(
        opt::SET_META_CONTEXT,
        &encode_meta_request("", &["qemu:dirty-bitmap:x", BASE_ALLOCATION]),
    ));
    input.extend(encode_option(opt::GO, &encode_info_request("", &[])));
    let (out, outcome, _) = run(&mut hs, &input);
    let r = replies(&out);
    assert_eq!(r[0].reply_type, rep::ERR_INVALID);
    assert_eq!(r[1].reply_type, rep::ACK);
    assert_eq!(r[2].reply_type, rep::META_CONTEXT);
    assert_eq!(&r[2].data[4..], BASE_ALLOCATION.as_bytes());
    assert_eq!(r[3].reply_type, rep::ACK);
    assert_eq!(r[4].reply_type, rep::META_CONTEXT);
    match outcome {
        Outcome::Transmission(n) => {
            assert!(n.structured);
            assert_eq!(
                n.base_allocation,
                Some(u32::from_be_bytes([
                    r[4].data[0],
                    r[4].data[1],
                    r[4].data[2],
                    r[4].data[3]
                ]))
            );
        }
        o => panic!("expected transmission, got {o:?}"),
    }
}

#[test]
fn malformed_info_and_list_data_get_err_invalid() {
    let mut hs = ServerHandshake::new(spec(""));
    let mut input = flags(cf::FIXED_NEWSTYLE);
    input.extend(encode_option(opt::INFO, &[0, 0, 0, 9, b'x']));
    input.extend(encode_option(opt::LIST, b"junk"));
    input.extend(encode_option(opt::STRUCTURED_REPLY, b"junk"));
    let (out, _, _) = run(&mut hs, &input);
    let types: Vec<u32> = replies(&out).iter().map(|r| r.reply_type).collect();
    assert_eq!(
        types,
        vec![rep::ERR_INVALID, rep::ERR_INVALID, rep::ERR_INVALID]
    );
}

#[test]
fn export_name_for_unknown_export_closes_and_known_one_answers_with_padding() {
    let mut hs = ServerHandshake::new(spec(""));
    let mut input = flags(cf::FIXED_NEWSTYLE);
    input.extend(encode_option(opt::EXPORT_NAME, b"/"));
    let (_, outcome, _) = run(&mut hs, &input);
    assert_eq!(
        outcome,
        Outcome::Close(HandshakeError::UnknownExport("/".into()))
    );

    let mut hs = ServerHandshake::new(spec(""));
    let mut input = flags(cf::FIXED_NEWSTYLE);
    input.extend(encode_option(opt::EXPORT_NAME, b""));
    let (out, outcome, _) = run(&mut hs, &input);
    assert_eq!(
        out.len(),
        8 + 2 + 124,
        "size, flags and 124 zero bytes without NO_ZEROES"
    );
    assert!(matches!(outcome, Outcome::Transmission(_)));
}

#[test]
fn bad_option_magic_unknown_client_flags_and_abort_close() {
    let mut hs = ServerHandshake::new(spec(""));
    let mut input = flags(cf::FIXED_NEWSTYLE);
    input.extend(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
    assert!(matches!(
        run(&mut hs, &input).1,
        Outcome::Close(HandshakeError::BadOptionMagic(_))
    ));

    let mut hs = ServerHandshake::new(spec(""));
    assert!(matches!(
        run(&mut hs, &flags(0x80)).1,
        Outcome::Close(HandshakeError::UnknownClientFlags(0x80))
    ));

    let mut hs = ServerHandshake::new(spec(""));
    let mut input = flags(cf::FIXED_NEWSTYLE);
    input.extend(encode_option(opt::ABORT, &[]));
    let (out, outcome, _) = run(&mut hs, &input);
    assert_eq!(replies(&out)[0].reply_type, rep::ACK);
    assert_eq!(outcome, Outcome::Close(HandshakeError::Aborted));
}

#[test]
fn nbdkit_seed_streams_reach_the_expected_phase() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/nbd-client-streams");
    let expect = [
        ("newstyle-cflags", "needmore"),
        ("newstyle-cflags-exportname", "close"),
        ("newstyle-cflags-exportname-read4", "close"),
        ("newstyle-cflags-go", "transmission"),
        ("newstyle-cflags-go-read", "transmission"),
        ("newstyle-cflags-go-read4", "transmission"),
        ("newstyle-cflags-go-write", "transmission"),
    ];
    for (file, want) in expect {
        let bytes = std::fs::read(dir.join(file)).expect("seed file present");
        let mut hs = ServerHandshake::new(spec(""));
        let (_, outcome, consumed) = run(&mut hs, &bytes);
        let got = match outcome {
            Outcome::NeedMore => "needmore",
            Outcome::Transmission(_) => "transmission",
            Outcome::Close(_) => "close",
        };
        assert_eq!(got, want, "{file}");
        if want == "transmission" {
            assert!(
                (bytes.len() - consumed) % 28 == 0 || file.ends_with("write"),
                "{file}: requests left intact"
            );
        }
    }
}

fn arb_option() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(encode_option(opt::LIST, &[])),
        Just(encode_option(opt::STRUCTURED_REPLY, &[])),
        "[a-z]{0,8}".prop_map(|n| encode_option(
            opt::INFO,
            &encode_info_request(&n, &[info::NAME, info::BLOCK_SIZE])
        )),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|d| encode_option(opt::LIST_META_CONTEXT, &d)),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|d| encode_option(opt::SET_META_CONTEXT, &d)),
        (12u32..100, proptest::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(o, d)| encode_option(o, &d)),
        Just(encode_option(opt::GO, &encode_info_request("", &[]))),
    ]
}

proptest! {
    /// However the bytes are split across reads, the server answers the same.
    #[test]
    fn output_is_independent_of_chunking(options in proptest::collection::vec(arb_option(), 0..8), cut in 1usize..40) {
        let mut input = flags(cf::FIXED_NEWSTYLE | cf::NO_ZEROES);
        for o in &options { input.extend(o); }
        let mut whole = ServerHandshake::new(spec(""));
        let (expected, expected_outcome, _) = run(&mut whole, &input);

        let mut hs = ServerHandshake::new(spec(""));
        let mut out = Vec::new();
        let mut pending = Vec::new();
        let mut outcome = Outcome::NeedMore;
        'feed: for piece in input.chunks(cut) {
            pending.extend_from_slice(piece);
            loop {
                let step = hs.feed(&pending);
                pending.drain(..step.consumed);
                out.extend(step.output);
                if step.outcome != Outcome::NeedMore { outcome = step.outcome; break 'feed; }
                if step.consumed == 0 { break; }
            }
        }
        prop_assert_eq!(out, expected);
        prop_assert_eq!(outcome, expected_outcome);
    }

    /// Arbitrary bytes never panic, and every reply the server writes parses.
    #[test]
    fn arbitrary_input_never_panics_and_replies_parse(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut input = flags(cf::FIXED_NEWSTYLE);
        input.extend(&body);
        let mut hs = ServerHandshake::new(spec(""));
        let (out, _, _) = run(&mut hs, &input);
        let mut rest = &out[..];
        while !rest.is_empty() {
            match parse_option_reply(rest) {
                Ok(Some((_, n))) => rest = &rest[n..],
                // EXPORT_NAME success writes size+flags, not an option reply.
                _ => { prop_assert_eq!(rest.len(), 10); break; }
            }
        }
    }
}
