//! Server side of the fixed-newstyle handshake as a state machine: feed it the client's bytes,
//! it says how many it consumed, what to send back, and whether negotiation is over.
//!
//! Option payloads are bounded ([`MAX_OPTION_LEN`]); a larger one is skipped without being
//! buffered and answered with ERR_TOO_BIG, so a client cannot make the server allocate at will.

use super::consts::{
    self, cf, hs, info, opt, rep, tf, BASE_ALLOCATION, BASE_ALLOCATION_ID, IHAVEOPT, MAX_STRING,
    NBDMAGIC, REPLY_MAGIC,
};
use crate::block::TargetInfo;

/// Largest option payload twinvol reads; larger ones are skipped and refused with ERR_TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options a client may send before it is disconnected (a runaway-client guard).
pub const MAX_OPTIONS: u32 = 4096;

/// What the server exports (one named export per server).
///
/// Invariant: `name.len() <= MAX_STRING` and contains no NUL.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// Export name ("" is the default export clients get when they name none).
    pub name: String,
    /// Geometry and capabilities.
    pub info: TargetInfo,
}

impl ExportSpec {
    /// Transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let i = &self.info;
        let mut f = tf::HAS_FLAGS | tf::SEND_DF;
        let mut set = |cond: bool, bit: u16| {
            if cond {
                f |= bit
            }
        };
        set(i.read_only, tf::READ_ONLY);
        set(i.can_flush, tf::SEND_FLUSH);
        set(i.can_fua, tf::SEND_FUA);
        set(i.rotational, tf::ROTATIONAL);
        set(i.can_trim && !i.read_only, tf::SEND_TRIM);
        set(i.can_zero && !i.read_only, tf::SEND_WRITE_ZEROES);
        set(
            i.can_fast_zero && i.can_zero && !i.read_only,
            tf::SEND_FAST_ZERO,
        );
        set(i.can_multi_conn, tf::CAN_MULTI_CONN);
        set(i.can_cache, tf::SEND_CACHE);
        f
    }
}

/// The result of a successful negotiation: what the transmission phase may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Context id of `base:allocation` if the client selected it (BLOCK_STATUS allowed).
    pub base_allocation: Option<u32>,
    /// The client asked for block-size information and so promised to honour it.
    pub block_size_negotiated: bool,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// Why negotiation ended without reaching transmission; the server closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client sent flags the server does not understand (the spec requires closing).
    #[error("client sent unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with IHAVEOPT.
    #[error("bad option magic {0:#018x} (not an NBD client, or a desynchronised stream)")]
    BadOptionMagic(u64),
    /// NBD_OPT_EXPORT_NAME named an export that does not exist (no error reply exists for it).
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// The client sent ABORT.
    #[error("client aborted the negotiation")]
    Aborted,
    /// A non-fixed-newstyle client sent an option the server cannot answer.
    #[error("option {0} from a client without fixed newstyle")]
    UnsupportedWithoutFixedNewstyle(u32),
    /// Too many options.
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

/// What happened after feeding bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// More bytes are needed.
    NeedMore,
    /// Negotiation is over; switch to transmission with these settings. Bytes after
    /// `consumed` belong to the transmission phase.
    Transmission(Negotiated),
    /// Negotiation ended; send `output` then close.
    Close(HandshakeError),
}

/// One step's result: how much input was used, what to send, and the outcome.
#[derive(Debug)]
pub struct Step {
    /// Input bytes consumed (the caller drops them from its buffer).
    pub consumed: usize,
    /// Bytes to send to the client, in order, before anything else.
    pub output: Vec<u8>,
    /// Where negotiation stands.
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    /// Skipping the rest of an oversized option, then replying ERR_TOO_BIG (or ERR_UNSUP).
    Skipping {
        option: u32,
        remaining: u64,
        unknown: bool,
    },
    Done,
}

/// The server's handshake state machine.
#[derive(Debug)]
pub struct ServerHandshake {
    export: ExportSpec,
    state: State,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    base_allocation: Option<u32>,
    options_seen: u32,
}

/// The 18 bytes the server sends first: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&(hs::FIXED_NEWSTYLE | hs::NO_ZEROES).to_be_bytes());
    g
}

/// Appends one option reply.
pub fn push_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn push_error(out: &mut Vec<u8>, option: u32, err: u32, msg: &str) {
    push_option_reply(out, option, err, msg.as_bytes());
}

/// A cursor over option data that refuses to read past the end.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.data.split_first_chunk::<2>()?;
        self.data = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.data.split_first_chunk::<4>()?;
        self.data = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (h, t) = self.data.split_at(n);
        self.data = t;
        Some(h)
    }
    fn string(&mut self, n: usize) -> Option<&'a str> {
        if n > MAX_STRING {
            return None;
        }
        let b = self.bytes(n)?;
        if b.contains(&0) {
            return None;
        }
        std::str::from_utf8(b).ok()
    }
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Parsed body of INFO / GO.
struct InfoRequest<'a> {
    name: &'a str,
    requests: Vec<u16>,
}

fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let mut r = Reader { data };
    let len = r.u32()? as usize;
    let name = r.string(len)?;
    let n = r.u16()?;
    let mut requests = Vec::with_capacity(n as usize);
    for _ in 0..n {
        requests.push(r.u16()?);
    }
    r.is_empty().then_some(InfoRequest { name, requests })
}

/// Parsed body of LIST_META_CONTEXT / SET_META_CONTEXT.
struct MetaRequest<'a> {
    name: &'a str,
    queries: Vec<&'a str>,
}

fn parse_meta_request(data: &[u8]) -> Option<MetaRequest<'_>> {
    let mut r = Reader { data };
    let len = r.u32()? as usize;
    let name = r.string(len)?;
    let n = r.u32()?;
    // Each query takes at least 4 bytes: refuse counts the payload cannot hold before allocating.
    if (n as usize).saturating_mul(4) > r.data.len() {
        return None;
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let qlen = r.u32()? as usize;
        queries.push(r.string(qlen)?);
    }
    r.is_empty().then_some(MetaRequest { name, queries })
}

impl ServerHandshake {
    /// A new negotiation for `export`. Send [`greeting`] first.
    pub fn new(export: ExportSpec) -> Self {
        Self {
            export,
            state: State::ClientFlags,
            fixed: false,
            no_zeroes: false,
            structured: false,
            base_allocation: None,
            options_seen: 0,
        }
    }

    /// Feeds client bytes and processes every complete message in `input`. The caller drops
    /// `consumed` bytes from its buffer, sends `output`, and on `NeedMore` reads more and calls
    /// again. Must not be called after a `Transmission` or `Close` outcome.
    pub fn feed(&mut self, input: &[u8]) -> Step {
        let mut output = Vec::new();
        let mut consumed = 0;
        loop {
            let rest = &input[consumed..];
            match self.state {
                State::Done => {
                    return Step {
                        consumed,
                        output,
                        outcome: Outcome::NeedMore,
                    };
                }
                State::ClientFlags => {
                    let Some(flags) = rest.first_chunk::<4>() else {
                        return Step {
                            consumed,
                            output,
                            outcome: Outcome::NeedMore,
                        };
                    };
                    consumed += 4;
                    let flags = u32::from_be_bytes(*flags);
                    if flags & !(cf::FIXED_NEWSTYLE | cf::NO_ZEROES) != 0 {
                        self.state = State::Done;
                        return Step {
                            consumed,
                            output,
                            outcome: Outcome::Close(HandshakeError::UnknownClientFlags(flags)),
                        };
                    }
                    self.fixed = flags & cf::FIXED_NEWSTYLE != 0;
                    self.no_zeroes = flags & cf::NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Skipping {
                    option,
                    remaining,
                    unknown,
                } => {
                    let take = (rest.len() as u64).min(remaining);
                    consumed += take as usize;
                    let remaining = remaining - take;
                    if remaining > 0 {
                        self.state = State::Skipping {
                            option,
                            remaining,
                            unknown,
                        };
                        return Step {
                            consumed,
                            output,
                            outcome: Outcome::NeedMore,
                        };
                    }
                    self.state = State::Options;
                    if unknown {
                        push_error(
                            &mut output,
                            option,
                            rep::ERR_UNSUP,
                            "option not supported by twinvol",
                        );
                    } else {
                        push_error(
                            &mut output,
                            option,
                            rep::ERR_TOO_BIG,
                            "option data too large",
                        );
                    }
                }
                State::Options => {
                    let Some(hdr) = rest.first_chunk::<16>() else {
                        return Step {
                            consumed,
                            output,
                            outcome: Outcome::NeedMore,
                        };
                    };
                    let magic = u64::from_be_bytes(hdr[0..8].try_into().unwrap_or_default());
                    let option = u32::from_be_bytes(hdr[8..12].try_into().unwrap_or_default());
                    let len = u32::from_be_bytes(hdr[12..16].try_into().unwrap_or_default());
                    if magic != IHAVEOPT {
                        self.state = State::Done;
                        return Step {
                            consumed,
                            output,
                            outcome: Outcome::Close(HandshakeError::BadOptionMagic(magic)),
                        };
                    }
                    self.options_seen += 1;
                    if self.options_seen > MAX_OPTIONS {
                        self.state = State::Done;
                        return Step {
                            consumed,
                            output,
                            outcome: Outcome::Close(HandshakeError::TooManyOptions),
                        };
                    }
                    let known = matches!(
                        option,
                        opt::EXPORT_NAME
                            | opt::ABORT
                            | opt::LIST
                            | opt::INFO
                            | opt::GO
                            | opt::STRUCTURED_REPLY
                            | opt::LIST_META_CONTEXT
                            | opt::SET_META_CONTEXT
                    );
                    if !known || len > MAX_OPTION_LEN {
                        if !self.fixed {
                            self.state = State::Done;
                            return Step {
                                consumed: consumed + 16,
                                output,
                                outcome: Outcome::Close(
                                    HandshakeError::UnsupportedWithoutFixedNewstyle(option),
                                ),
                            };
                        }
                        consumed += 16;
                        self.state = State::Skipping {
                            option,
                            remaining: u64::from(len),
                            unknown: !known,
                        };
                        continue;
                    }
                    if rest.len() < 16 + len as usize {
                        return Step {
                            consumed,
                            output,
                            outcome: Outcome::NeedMore,
                        };
                    }
                    let data = &rest[16..16 + len as usize];
                    consumed += 16 + len as usize;
                    if let Some(outcome) = self.option(option, data, &mut output) {
                        self.state = State::Done;
                        return Step {
                            consumed,
                            output,
                            outcome,
                        };
                    }
                }
            }
        }
    }

    /// How many more bytes negotiation can use, given the unconsumed `buffered` bytes. A server
    /// that reads no more than this never pulls pipelined transmission requests into the
    /// handshake. Zero once negotiation is over.
    pub fn wanted(&self, buffered: &[u8]) -> usize {
        let more = |total: usize| total.saturating_sub(buffered.len()).max(1);
        match self.state {
            State::ClientFlags => more(4),
            State::Options if buffered.len() >= 16 => {
                let len =
                    u32::from_be_bytes([buffered[12], buffered[13], buffered[14], buffered[15]]);
                more(16 + len.min(MAX_OPTION_LEN) as usize)
            }
            State::Options => more(16),
            State::Skipping { remaining, .. } => remaining.clamp(1, 64 * 1024) as usize,
            State::Done => 0,
        }
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated {
            structured: self.structured,
            base_allocation: self.base_allocation,
            block_size_negotiated: false,
            flags: self.export.transmission_flags(),
        }
    }

    /// Handles one complete option; `Some` ends negotiation.
    fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Option<Outcome> {
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                if name != self.export.name {
                    return Some(Outcome::Close(HandshakeError::UnknownExport(name)));
                }
                out.extend_from_slice(&self.export.info.size.to_be_bytes());
                out.extend_from_slice(&self.export.transmission_flags().to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Some(Outcome::Transmission(self.negotiated()))
            }
            opt::ABORT => {
                if self.fixed {
                    push_option_reply(out, option, rep::ACK, &[]);
                }
                Some(Outcome::Close(HandshakeError::Aborted))
            }
            opt::LIST => {
                if !data.is_empty() {
                    push_error(out, option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return None;
                }
                let mut d = Vec::with_capacity(4 + self.export.name.len());
                d.extend_from_slice(&(self.export.name.len() as u32).to_be_bytes());
                d.extend_from_slice(self.export.name.as_bytes());
                push_option_reply(out, option, rep::SERVER, &d);
                push_option_reply(out, option, rep::ACK, &[]);
                None
            }
            opt::INFO | opt::GO => {
                let Some(req) = parse_info_request(data) else {
                    push_error(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "malformed NBD_OPT_INFO/GO data",
                    );
                    return None;
                };
                if req.name != self.export.name {
                    push_error(
                        out,
                        option,
                        rep::ERR_UNKNOWN,
                        &format!("no export named {:?}", req.name),
                    );
                    return None;
                }
                let i = &self.export.info;
                let mut export = Vec::with_capacity(12);
                export.extend_from_slice(&info::EXPORT.to_be_bytes());
                export.extend_from_slice(&i.size.to_be_bytes());
                export.extend_from_slice(&self.export.transmission_flags().to_be_bytes());
                push_option_reply(out, option, rep::INFO, &export);
                let mut block_size_negotiated = false;
                let mut sent = Vec::new();
                for r in &req.requests {
                    if sent.contains(r) {
                        continue;
                    }
                    sent.push(*r);
                    match *r {
                        info::NAME => {
                            let mut d = info::NAME.to_be_bytes().to_vec();
                            d.extend_from_slice(self.export.name.as_bytes());
                            push_option_reply(out, option, rep::INFO, &d);
                        }
                        info::DESCRIPTION => {
                            let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
                            let desc =
                                &i.description.as_bytes()[..i.description.len().min(MAX_STRING)];
                            d.extend_from_slice(desc);
                            push_option_reply(out, option, rep::INFO, &d);
                        }
                        info::BLOCK_SIZE => {
                            block_size_negotiated = true;
                            let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
                            d.extend_from_slice(&i.min_block.to_be_bytes());
                            d.extend_from_slice(&i.preferred_block.to_be_bytes());
                            d.extend_from_slice(&i.max_block.to_be_bytes());
                            push_option_reply(out, option, rep::INFO, &d);
                        }
                        // INFO_EXPORT was sent already; unknown requests are ignored as the spec says.
                        _ => {}
                    }
                }
                push_option_reply(out, option, rep::ACK, &[]);
                if option == opt::GO {
                    let mut n = self.negotiated();
                    n.block_size_negotiated = block_size_negotiated;
                    return Some(Outcome::Transmission(n));
                }
                None
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    push_error(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    push_option_reply(out, option, rep::ACK, &[]);
                }
                None
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data, out);
                None
            }
            _ => {
                push_error(
                    out,
                    option,
                    rep::ERR_UNSUP,
                    "option not supported by twinvol",
                );
                None
            }
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) {
        if !self.structured {
            push_error(
                out,
                option,
                rep::ERR_INVALID,
                "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts",
            );
            return;
        }
        let Some(req) = parse_meta_request(data) else {
            push_error(
                out,
                option,
                rep::ERR_INVALID,
                "malformed metadata context request",
            );
            return;
        };
        if req.name != self.export.name {
            push_error(
                out,
                option,
                rep::ERR_UNKNOWN,
                &format!("no export named {:?}", req.name),
            );
            return;
        }
        let listing = option == consts::opt::LIST_META_CONTEXT;
        let matches = |q: &str| q == BASE_ALLOCATION || (listing && q == "base:");
        let selected = if listing && req.queries.is_empty() {
            true
        } else {
            req.queries.iter().any(|q| matches(q))
        };
        if option == opt::SET_META_CONTEXT {
            self.base_allocation = selected.then_some(BASE_ALLOCATION_ID);
        }
        if selected {
            let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            push_option_reply(out, option, rep::META_CONTEXT, &d);
        }
        push_option_reply(out, option, rep::ACK, &[]);
    }
}
