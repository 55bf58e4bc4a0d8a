//! The nftables backend: applies a `rules::Transaction` to the kernel of the current network
//! namespace as ONE atomic nf_tables netlink batch, and maps kernel errors back to the ops.
//!
//! Flow of `apply`: lower every op ([`super::lower`]) → serialize into one contiguous batch
//! (BEGIN, messages, END with NLM_F_ACK; [`super::netlink`]) → one `sendmsg` → read replies.
//! The kernel processes the whole batch synchronously inside `sendmsg`, and on failure sends
//! one error per failing message and no END ACK (even on 6.18). So after sending we drain the
//! socket without blocking: errors mean the batch was aborted, the END ACK means it was
//! committed. Kernels before 6.10 do not ACK the END message; if neither arrived we send a
//! GETGEN request and wait for its reply, which the kernel can only send after it has finished
//! with the batch, so any error would have been queued before it.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use rules::ir::SetDef;
use rules::model::Family;
use rules::transaction::Op;
use rules::Transaction;

use super::lower::{Lowered, Lowerer};
use super::netlink::{
    nfnl_message, nla_put_strz, Batch, NlSocket, NFNL_HDRLEN, NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN, NFT_MSG_NEWGEN,
    NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_REQUEST,
};

/// How long we wait for the kernel to answer the GETGEN barrier. The batch itself has already
/// been processed when `sendmsg` returns, so this is only a guard against a wedged socket.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(30);
/// Receive buffer for replies; with NETLINK_CAP_ACK each error is well under 100 bytes.
const RECV_BUF: usize = 256 * 1024;
/// At most this many lines of an op's text go into an error.
const TEXT_LINES: usize = 3;
/// At most this many failures are spelled out in an error message.
const SHOWN_FAILURES: usize = 5;

// Bits of nlmsghdr.nlmsg_flags in error replies (linux/netlink.h).
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
/// NFTA_SET_ELEM_LIST_ELEMENTS
const ELEM_LIST_ELEMENTS: u16 = 3;

/// Size of one applied batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Netlink messages, BEGIN and END included.
    pub messages: usize,
    /// Bytes of the batch.
    pub bytes: usize,
}

/// One message the kernel refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedOp {
    /// Index of the op in `Transaction::ops`; None when the kernel refused the batch framing
    /// itself (BEGIN/END), e.g. EPERM without CAP_NET_ADMIN.
    pub index: Option<usize>,
    pub errno: i32,
    /// The op's `nft -f` text (the failing element only, when the kernel pointed at one).
    pub text: String,
    /// The kernel's extended-ack message, if it sent one (nf_tables rarely does).
    pub message: Option<String>,
}

impl fmt::Display for FailedOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "op #{i} `{}`", self.text)?,
            None => write!(f, "{}", self.text)?,
        }
        write!(f, ": {}", io::Error::from_raw_os_error(self.errno))?;
        if let Some(m) = &self.message {
            write!(f, " ({m})")?;
        }
        Ok(())
    }
}

/// Rejected ops, for `NftError::Rejected`'s message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failures(pub Vec<FailedOp>);

impl fmt::Display for Failures {
    /// The first few failures (a batch of broken elements can fail in every message).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, x) in self.0.iter().take(SHOWN_FAILURES).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{x}")?;
        }
        if self.0.len() > SHOWN_FAILURES {
            write!(f, "; and {} more", self.0.len() - SHOWN_FAILURES)?;
        }
        Ok(())
    }
}

/// Errors of the nftables backend, one variant per step. Only `Rejected` means the kernel
/// looked at the batch and refused it; in every case nothing was committed, except where noted.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("opening the netfilter netlink socket: {0}")]
    Open(#[source] io::Error),
    /// The IR could not be lowered (nothing was sent).
    #[error("encoding op #{index} `{text}`: {reason}")]
    Encode { index: usize, text: String, reason: String },
    #[error("sending the batch ({messages} messages, {bytes} bytes): {source}")]
    Send {
        messages: usize,
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("reading the kernel's replies: {0}")]
    Receive(#[source] io::Error),
    /// The kernel aborted the batch; the ruleset is unchanged. `errno` is the first error.
    #[error("kernel rejected the transaction ({} error(s)): {failures}", failures.0.len())]
    Rejected { errno: i32, failures: Failures },
    /// Replies were dropped (receive buffer overflow) before an outcome was seen: the batch may
    /// or may not have been committed. Treat as failed (the next sync should be a full one).
    #[error("kernel replies were lost; whether the batch was committed is unknown")]
    RepliesLost,
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
}

/// Applies transactions through a netfilter netlink socket bound to one network namespace.
pub struct NftablesBackend {
    sock: NlSocket,
    seq: u32,
    /// Sets created by earlier successful transactions, per family: their declarations decide
    /// how elements are encoded (plain, rbtree interval, concatenated interval).
    known_sets: HashMap<(Family, String), HashMap<String, SetDef>>,
    /// The table transactions are applied to: `kube-proxy`, or kproxy's restart table.
    table: String,
    /// Prepared transactions `apply_prepared` had to lower again (see `relowered`).
    relowered: usize,
    recv_buf: Vec<u8>,
    /// Ask for the END ACK (kernels 6.10+ send it); off only to test the GETGEN fallback.
    end_ack: bool,
}

/// Where each message of the batch came from.
struct MsgOrigin {
    op: usize,
    /// Byte offset of the message in the batch.
    offset: usize,
    /// For element messages: the IR element index of every netlink element.
    elem_index: Vec<u32>,
}

/// What the replies said.
#[derive(Default)]
struct Replies {
    /// (seq, errno, extack offset, extack message)
    errors: Vec<(u32, i32, Option<u32>, Option<String>)>,
    end_acked: bool,
    barrier_seen: bool,
    lost: bool,
}

impl NftablesBackend {
    /// Opens a netlink socket in the calling thread's current network namespace.
    pub fn new() -> Result<Self, NftError> {
        let sock = NlSocket::open().map_err(NftError::Open)?;
        // Start sequence numbers somewhere distinct per socket, as libmnl users do (time).
        let seq = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
            as u32)
            .max(1);
        Ok(NftablesBackend {
            sock,
            seq,
            known_sets: HashMap::new(),
            table: rules::ir::TABLE.to_string(),
            relowered: 0,
            recv_buf: vec![0; RECV_BUF],
            end_ack: true,
        })
    }

    /// Whether to ask for the END ACK. Without it the backend behaves as on kernels before
    /// 6.10, which never send one: tests use this to exercise the GETGEN barrier.
    #[doc(hidden)]
    pub fn set_end_ack(&mut self, on: bool) {
        self.end_ack = on;
    }

    /// Deletes kproxy's tables of `family`, `kube-proxy` and the restart table; a missing table
    /// is not an error.
    pub fn delete_tables(&mut self, family: Family) -> Result<(), NftError> {
        let table = std::mem::replace(&mut self.table, rules::ir::TABLE.to_string());
        let result = [rules::ir::TABLE, rules::ir::RESTART_TABLE].into_iter().try_for_each(|t| {
            self.table = t.to_string();
            self.apply(&rules::transaction::cleanup(family)).map(|_| ())
        });
        self.table = table;
        result
    }

    /// The table later transactions (and `table_exists`) are about: `kube-proxy` (the default),
    /// or kproxy's restart table while a restart builds the new ruleset next to the old one.
    pub fn set_table(&mut self, table: &str) {
        self.table = table.to_string();
    }

    /// Applies tx as one atomic batch. An empty tx sends nothing and returns Ok with zero stats.
    pub fn apply(&mut self, tx: &Transaction) -> Result<ApplyStats, NftError> {
        if tx.ops.is_empty() {
            return Ok(ApplyStats::default());
        }
        let base = batch_base(self.seq);
        let empty = HashMap::new();
        let known = self.known_sets.get(&(tx.family, self.table.clone())).unwrap_or(&empty);
        let (batch, origins) = build_batch(tx, known, base, self.end_ack, &self.table)?;
        self.send_batch(tx, &batch, &origins, base)
    }

    /// A `Preparer` for transactions of `family` that will be applied next, in order, each with
    /// `apply_prepared` and nothing else on this backend in between (the parts of a cold start).
    pub fn preparer(&self, family: Family) -> Preparer {
        Preparer {
            known: self.known_sets.get(&(family, self.table.clone())).cloned().unwrap_or_default(),
            table: self.table.clone(),
            seq: self.seq,
            end_ack: self.end_ack,
        }
    }

    /// Applies a transaction its `Preparer` lowered ahead. Exactly as `apply`: if the backend was
    /// used otherwise since (the batch's sequence numbers are not the next ones), the transaction
    /// is lowered again here.
    pub fn apply_prepared(&mut self, p: &Prepared) -> Result<ApplyStats, NftError> {
        if p.tx.ops.is_empty() {
            return Ok(ApplyStats::default());
        }
        if p.base != batch_base(self.seq) || p.table != self.table {
            self.relowered += 1;
            return self.apply(&p.tx);
        }
        self.send_batch(&p.tx, &p.batch, &p.origins, p.base)
    }

    /// How many prepared transactions were lowered again because the socket was used in between
    /// (tests check that a run of parts is sent as prepared).
    #[doc(hidden)]
    pub fn relowered(&self) -> usize {
        self.relowered
    }

    /// Sends one batch built for `tx` with BEGIN at `base` and reads the kernel's verdict.
    fn send_batch(
        &mut self,
        tx: &Transaction,
        batch: &Batch,
        origins: &[MsgOrigin],
        base: u32,
    ) -> Result<ApplyStats, NftError> {
        // Sequence numbers: BEGIN = base, messages base+1.., END last; GETGEN barrier after it.
        let end_seq = base + 1 + origins.len() as u32;
        let barrier_seq = end_seq + 1;
        self.seq = barrier_seq + 1;
        let stats = ApplyStats { messages: batch.messages(), bytes: batch.bytes().len() };

        // Replies to an earlier, abandoned exchange must not be mistaken for ours.
        self.drain_stale();
        self.sock.send_batch(batch.bytes()).map_err(|source| NftError::Send {
            messages: stats.messages,
            bytes: stats.bytes,
            source,
        })?;

        let mut replies = Replies::default();
        self.read_replies(base, end_seq, barrier_seq, None, &mut replies)?;
        if replies.errors.is_empty() && !replies.end_acked && !replies.lost {
            // No verdict yet (a kernel before 6.10 sends no END ACK): use the barrier.
            self.sock.send_plain(&getgen_request(barrier_seq, self.sock.portid())).map_err(NftError::Receive)?;
            let deadline = Instant::now() + BARRIER_TIMEOUT;
            while !replies.barrier_seen && !replies.end_acked && replies.errors.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(NftError::Timeout(BARRIER_TIMEOUT));
                }
                self.read_replies(base, end_seq, barrier_seq, Some(left), &mut replies)?;
            }
        }
        if !replies.errors.is_empty() {
            let failures: Vec<FailedOp> = replies
                .errors
                .iter()
                .map(|(seq, errno, offs, message)| {
                    self.describe(tx, batch, origins, base, end_seq, *seq, *errno, *offs, message.clone())
                })
                .collect();
            return Err(NftError::Rejected { errno: failures[0].errno, failures: Failures(failures) });
        }
        if replies.lost && !replies.end_acked {
            return Err(NftError::RepliesLost);
        }
        remember_sets(self.known_sets.entry((tx.family, self.table.clone())).or_default(), tx);
        Ok(stats)
    }

    /// Whether the kernel holds kproxy's table of `family` (`ip kube-proxy` / `ip6 kube-proxy`):
    /// one NFT_MSG_GETTABLE request. `None` when the kernel's answer says neither (no answer in
    /// time, or an error other than ENOENT), so the caller must assume it may exist.
    pub fn table_exists(&mut self, family: Family) -> Option<bool> {
        let seq = batch_base(self.seq);
        self.seq = seq + 1;
        self.drain_stale();
        let req = gettable_request(seq, self.sock.portid(), family, &self.table);
        self.sock.send_plain(&req).ok()?;
        let deadline = Instant::now() + BARRIER_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let n = self.sock.recv(&mut self.recv_buf, Some(left)).ok()??;
            if let Some(answer) = gettable_answer(&self.recv_buf[..n.min(self.recv_buf.len())], seq) {
                return answer;
            }
        }
    }

    /// Discards whatever is queued on the socket.
    fn drain_stale(&mut self) {
        while let Ok(Some(_)) = self.sock.recv(&mut self.recv_buf, None) {}
    }

    /// Reads what is queued (waiting up to `wait` for the first datagram) and records replies
    /// that belong to this batch.
    fn read_replies(
        &mut self,
        base: u32,
        end_seq: u32,
        barrier_seq: u32,
        wait: Option<Duration>,
        out: &mut Replies,
    ) -> Result<(), NftError> {
        let mut timeout = wait;
        loop {
            let n = match self.sock.recv(&mut self.recv_buf, timeout) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // The kernel dropped replies; the socket error is reported once, keep reading.
                    out.lost = true;
                    continue;
                }
                Err(e) => return Err(NftError::Receive(e)),
            };
            timeout = None;
            if n > self.recv_buf.len() {
                // A truncated datagram: we cannot trust what we read of it.
                out.lost = true;
                continue;
            }
            parse_replies(&self.recv_buf[..n], base, end_seq, barrier_seq, out);
        }
    }

    /// Turns one error reply into a `FailedOp` naming the op (and element) it came from.
    #[allow(clippy::too_many_arguments)]
    fn describe(
        &self,
        tx: &Transaction,
        batch: &Batch,
        origins: &[MsgOrigin],
        base: u32,
        end_seq: u32,
        seq: u32,
        errno: i32,
        offs: Option<u32>,
        message: Option<String>,
    ) -> FailedOp {
        if seq == base || seq == end_seq || seq < base || seq > end_seq {
            let what = if seq == end_seq { "batch end" } else { "batch begin" };
            return FailedOp { index: None, errno, text: what.to_string(), message };
        }
        let origin = &origins[(seq - base - 1) as usize];
        let op = &tx.ops[origin.op];
        let element = offs.and_then(|o| failing_element(batch.bytes(), origin, o as usize));
        let text = match (op, element) {
            (Op::AddElements { set, elements }, Some(i)) => {
                op_text(tx, &Op::AddElements { set: set.clone(), elements: vec![elements[i].clone()] })
            }
            (Op::DeleteElements { set, elements }, Some(i)) => {
                op_text(tx, &Op::DeleteElements { set: set.clone(), elements: vec![elements[i].clone()] })
            }
            _ => op_text(tx, op),
        };
        FailedOp { index: Some(origin.op), errno, text, message }
    }
}

/// Where the next request (a batch's BEGIN) goes, given the backend's next sequence number:
/// wrapped early so that a batch never straddles u32::MAX.
fn batch_base(seq: u32) -> u32 {
    if seq > u32::MAX / 2 {
        1
    } else {
        seq
    }
}

/// Follows the sets a successful transaction created and deleted.
fn remember_sets(sets: &mut HashMap<String, SetDef>, tx: &Transaction) {
    for op in &tx.ops {
        match op {
            Op::DeleteTable => sets.clear(),
            Op::AddSet(def) => {
                sets.insert(def.name.clone(), def.clone());
            }
            Op::DeleteSet(name) => {
                sets.remove(name);
            }
            _ => {}
        }
    }
}

/// Lowers a run of transactions to netlink batches ahead of their apply, on any thread (the cold
/// start builds and lowers the next part while the kernel commits the one before). It follows the
/// sets and sequence numbers the backend will have if each transaction before succeeds; a run
/// stops at the first failure, so that is the only case it needs.
pub struct Preparer {
    known: HashMap<String, SetDef>,
    table: String,
    seq: u32,
    end_ack: bool,
}

/// A transaction and the batch `apply_prepared` sends for it.
pub struct Prepared {
    pub tx: Transaction,
    table: String,
    batch: Batch,
    origins: Vec<MsgOrigin>,
    base: u32,
}

impl Preparer {
    pub fn prepare(&mut self, tx: Transaction) -> Result<Prepared, NftError> {
        if tx.ops.is_empty() {
            return Ok(Prepared { tx, table: self.table.clone(), batch: Batch::new(), origins: Vec::new(), base: 0 });
        }
        let base = batch_base(self.seq);
        let (batch, origins) = build_batch(&tx, &self.known, base, self.end_ack, &self.table)?;
        // BEGIN, the messages, END, and the GETGEN barrier's number (see `send_batch`).
        self.seq = base + origins.len() as u32 + 3;
        remember_sets(&mut self.known, &tx);
        Ok(Prepared { tx, table: self.table.clone(), batch, origins, base })
    }
}

/// Serializes `tx` as one batch (BEGIN at seq `base`, END with NLM_F_ACK), without sending it.
fn build_batch(
    tx: &Transaction,
    known: &HashMap<String, SetDef>,
    base: u32,
    end_ack: bool,
    table: &str,
) -> Result<(Batch, Vec<MsgOrigin>), NftError> {
    let mut lowerer = Lowerer::new(tx.family, known).on_table(table);
    let mut batch = Batch::new();
    let mut origins: Vec<MsgOrigin> = Vec::new();
    batch.begin(base);
    for (index, op) in tx.ops.iter().enumerate() {
        let lowered = lowerer.lower(op).map_err(|e| NftError::Encode { index, text: op_text(tx, op), reason: e.0 })?;
        for Lowered { msg, elem_index } in lowered {
            let seq = base.wrapping_add(1 + origins.len() as u32);
            let offset = batch.bytes().len();
            batch.push(&msg, seq).map_err(|e| NftError::Encode {
                index,
                text: op_text(tx, op),
                reason: e.to_string(),
            })?;
            origins.push(MsgOrigin { op: index, offset, elem_index });
        }
    }
    batch.end(base.wrapping_add(1 + origins.len() as u32), end_ack);
    Ok((batch, origins))
}

/// The netlink batch `apply` would send for `tx` into a table whose sets are all created by
/// `tx` itself (true of full transactions), without touching the kernel: for size estimates
/// and byte-level tests. Sequence numbers start at 1.
pub fn encode(tx: &Transaction) -> Result<Vec<u8>, NftError> {
    let (batch, _) = build_batch(tx, &HashMap::new(), 1, true, rules::ir::TABLE)?;
    Ok(batch.bytes().to_vec())
}

/// The op's nft text (its lines from `Transaction`'s Display), cut to a few lines.
fn op_text(tx: &Transaction, op: &Op) -> String {
    let one = Transaction { family: tx.family, ops: vec![op.clone()] };
    let text = one.to_string();
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= TEXT_LINES {
        lines.join("\n")
    } else {
        format!("{}\n... ({} more lines)", lines[..TEXT_LINES].join("\n"), lines.len() - TEXT_LINES)
    }
}

/// The IR element an extended-ack offset points into, for element messages.
fn failing_element(batch: &[u8], origin: &MsgOrigin, offs: usize) -> Option<usize> {
    if origin.elem_index.is_empty() {
        return None;
    }
    let msg_len = read_u32(batch, origin.offset)? as usize;
    let msg = batch.get(origin.offset..origin.offset + msg_len)?;
    // Top-level attributes after nlmsghdr + nfgenmsg; find the element list, then the nested
    // element that contains the offset.
    for (ty, start, len) in attrs(msg, NFNL_HDRLEN) {
        if ty == ELEM_LIST_ELEMENTS {
            for (k, (_, cs, cl)) in attrs(&msg[..start + len], start + 4).enumerate() {
                if offs >= cs && offs < cs + cl {
                    return origin.elem_index.get(k).map(|i| *i as usize);
                }
            }
        }
    }
    None
}

/// Iterates netlink attributes in `buf` from `from`: (type without flags, offset, length).
fn attrs(buf: &[u8], from: usize) -> impl Iterator<Item = (u16, usize, usize)> + '_ {
    let mut off = from;
    std::iter::from_fn(move || {
        let len = read_u16(buf, off)? as usize;
        let ty = read_u16(buf, off + 2)? & 0x3fff;
        if len < 4 || off + len > buf.len() {
            return None;
        }
        let item = (ty, off, len);
        off += (len + 3) & !3;
        Some(item)
    })
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses one datagram of replies (safe: plain byte reads, any alignment).
fn parse_replies(buf: &[u8], base: u32, end_seq: u32, barrier_seq: u32, out: &mut Replies) {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let (Some(len), Some(ty), Some(flags), Some(seq)) =
            (read_u32(buf, off), read_u16(buf, off + 4), read_u16(buf, off + 6), read_u32(buf, off + 8))
        else {
            return;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return;
        }
        let msg = &buf[off..off + len];
        let ours = (base..=end_seq).contains(&seq);
        if ty == NLMSG_ERROR && msg.len() >= NLMSG_HDRLEN + 4 {
            let code = read_u32(msg, NLMSG_HDRLEN).unwrap_or(0) as i32;
            if seq == barrier_seq {
                // The barrier request itself failed; still a barrier.
                out.barrier_seen = true;
            } else if ours && code == 0 {
                if seq == end_seq {
                    out.end_acked = true;
                }
            } else if ours {
                let (offs, text) = extack(msg, flags);
                out.errors.push((seq, -code, offs, text));
            }
        } else if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN && seq == barrier_seq {
            out.barrier_seen = true;
        }
        off += (len + 3) & !3;
    }
}

/// Extended-ack TLVs of an error reply: the offending attribute's offset and the message.
fn extack(msg: &[u8], flags: u16) -> (Option<u32>, Option<String>) {
    if flags & NLM_F_ACK_TLVS == 0 {
        return (None, None);
    }
    // nlmsgerr = error code + the original header (+ its payload unless capped).
    let orig = NLMSG_HDRLEN + 4;
    let tlv_start = if flags & NLM_F_CAPPED != 0 {
        orig + NLMSG_HDRLEN
    } else {
        orig + ((read_u32(msg, orig).unwrap_or(0) as usize + 3) & !3)
    };
    let (mut offs, mut text) = (None, None);
    for (ty, start, len) in attrs(msg, tlv_start) {
        let payload = &msg[start + 4..start + len];
        match ty {
            NLMSGERR_ATTR_OFFS => offs = read_u32(payload, 0),
            NLMSGERR_ATTR_MSG => {
                text = Some(String::from_utf8_lossy(payload).trim_end_matches('\0').to_string());
            }
            _ => {}
        }
    }
    (offs, text)
}

/// NFT_MSG_GETGEN: answered with NEWGEN, only after everything before it was processed.
fn getgen_request(seq: u32, portid: u32) -> Vec<u8> {
    nfnl_message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN, NLM_F_REQUEST, seq, portid, 0, &[])
}

/// NFT_MSG_GETTABLE for kproxy's table of `family`, asking for an ACK.
fn gettable_request(seq: u32, portid: u32, family: Family, table: &str) -> Vec<u8> {
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFTA_TABLE_NAME: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    let mut attrs = Vec::new();
    nla_put_strz(&mut attrs, NFTA_TABLE_NAME, table);
    let family = super::lower::nfproto(family) as u8;
    nfnl_message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_ACK, seq, portid, family, &attrs)
}

/// The answer to [`gettable_request`] `seq` in `buf`, if `buf` holds it: the ACK (errno 0, the
/// table exists), ENOENT (it does not) or another error (unknown).
fn gettable_answer(buf: &[u8], seq: u32) -> Option<Option<bool>> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let (Some(len), Some(ty), Some(s)) = (read_u32(buf, off), read_u16(buf, off + 4), read_u32(buf, off + 8))
        else {
            return None;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return None;
        }
        if ty == NLMSG_ERROR && s == seq && len >= NLMSG_HDRLEN + 4 {
            let code = read_u32(buf, off + NLMSG_HDRLEN).unwrap_or(0) as i32;
            return Some(match -code {
                0 => Some(true),
                libc::ENOENT => Some(false),
                _ => None,
            });
        }
        off += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        b.extend(ty.to_ne_bytes());
        b.extend(flags.to_ne_bytes());
        b.extend(seq.to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        b.extend(payload);
        while b.len() % 4 != 0 {
            b.push(0);
        }
        b
    }

    fn error_reply(seq: u32, errno: i32, offs: Option<u32>) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend((-errno).to_ne_bytes());
        p.extend(nlmsg(0x0a06, 0, seq, &[])); // the capped original header
        let mut flags = NLM_F_CAPPED;
        if let Some(o) = offs {
            flags |= NLM_F_ACK_TLVS;
            p.extend(8u16.to_ne_bytes());
            p.extend(NLMSGERR_ATTR_OFFS.to_ne_bytes());
            p.extend(o.to_ne_bytes());
        }
        nlmsg(NLMSG_ERROR, flags, seq, &p)
    }

    #[test]
    fn replies_are_classified_by_seq() {
        let mut buf = error_reply(12, libc::ENOENT, Some(40));
        buf.extend(error_reply(99, libc::EEXIST, None)); // not ours
        buf.extend(error_reply(15, 0, None)); // END ack
        let mut r = Replies::default();
        parse_replies(&buf, 10, 15, 16, &mut r);
        assert_eq!(r.errors, vec![(12, libc::ENOENT, Some(40), None)]);
        assert!(r.end_acked);
        assert!(!r.barrier_seen);
        let gen = nlmsg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN, 0, 16, &[0; 4]);
        parse_replies(&gen, 10, 15, 16, &mut r);
        assert!(r.barrier_seen);
    }

    #[test]
    fn getgen_is_a_plain_request() {
        let b = getgen_request(7, 0);
        assert_eq!(b.len(), 20);
        assert_eq!(read_u16(&b, 4), Some(0x0a10));
        assert_eq!(read_u16(&b, 6), Some(NLM_F_REQUEST));
    }
}
