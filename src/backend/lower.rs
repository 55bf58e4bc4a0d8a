//! Lowering of the `rules` IR to nf_tables messages, mirroring what `nft` 1.0.6 sends for the
//! same text (registers, byte order, prefix folding, set udata), so that `nft list` prints a
//! netlink-built table exactly like one loaded with `nft -f`.
//!
//! The layouts here were read off `nft --debug=netlink` and the raw batches `nft -f` sends
//! (captured with `strace -e write=all`) for every construct of the IR, in `ip` and `ip6`.

use std::collections::HashMap;
use std::net::IpAddr;

use rules::ir::{
    quote, BaseChain, ChainType, DataType, ElemData, Element, Expr as IrExpr, Hook, Operand, Rule, Selector, SetDef,
    SetType, Value, Verdict, TABLE, TABLE_COMMENT,
};
use rules::model::{Cidr, Family, Protocol};
use rules::transaction::Op;

use super::netlink::{Elem, ElemData as RawData, Expr, Msg, RawHook, RawSet, RawVerdict};

// ---- Constants from linux/netfilter/nf_tables.h and friends. ----
const NFPROTO_IPV4: u16 = 2;
const NFPROTO_IPV6: u16 = 10;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
/// IFNAMSIZ: `meta iifname` loads the name NUL-padded to this many bytes.
const IFNAMSIZ: usize = 16;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_STATUS: u32 = 2;
/// NF_CT_STATE_BIT(IP_CT_NEW)
const CT_STATE_NEW: u32 = 1 << 3;
/// IPS_DST_NAT
const IPS_DST_NAT: u32 = 1 << 5;
const NFTA_FIB_F_SADDR: u32 = 1 << 0;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
/// RTN_LOCAL
const RTN_LOCAL: u32 = 2;
const NFT_NG_RANDOM: u32 = 1;
const NFT_BYTEORDER_HTON: u32 = 1;
const NFT_NAT_DNAT: u32 = 1;
/// NF_NAT_RANGE_PROTO_RANDOM_FULLY
const NAT_RANDOM_FULLY: u32 = 1 << 4;
const NFT_REJECT_ICMP_UNREACH: u32 = 0;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_PORT_UNREACH: u8 = 4;
const NF_ACCEPT: i32 = 1;
const NF_DROP: i32 = 0;
const NFT_RETURN: i32 = -5;
const NFT_GOTO: i32 = -4;
const NFT_JUMP: i32 = -3;
/// NFT_REG_VERDICT
const REG_VERDICT: u32 = 0;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
/// `flags dynamic`: the packet path may update the set.
const NFT_SET_EVAL: u32 = 0x20;
const NFT_SET_CONCAT: u32 = 0x80;
/// NFT_DYNSET_OP_UPDATE: add the element, or restart its timeout.
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
/// 16 32-bit registers (NFT_REG32_00..15) hold a concatenation.
const REG32_COUNT: u32 = 16;
/// Longest chain/set name the kernel accepts (NFT_NAME_MAXLEN 256, including the NUL).
const NAME_MAX: usize = 255;
/// nft refuses comments longer than this (NFTNL_UDATA_COMMENT_MAXLEN).
const COMMENT_MAX: usize = 128;

// nft's datatype ids (src/datatype.h) and their byte order in set udata (enum byteorder:
// 0 invalid, 1 host, 2 big endian).
const TYPE_INTEGER: u32 = 4;
const TYPE_VERDICT: u32 = 0xffff_ff00;
const TYPE_BITS: u32 = 6;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;

// libnftnl udata tags (libnftnl/udata.h) as nft 1.0.6 writes them.
const UDATA_TABLE_COMMENT: u8 = 0;
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_DATA_TYPEOF: u8 = 4;
const UDATA_SET_DATA_INTERVAL: u8 = 6;
const UDATA_SET_ELEM_COMMENT: u8 = 0;
const UDATA_SET_ELEM_FLAGS: u8 = 1;
/// NFTNL_SET_ELEM_F_INTERVAL_OPEN: an interval reaching the maximum value has no end element.
const SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
// nft expression ids (enum expr_types) and protocol description ids used in `typeof` udata.
const EXPR_PAYLOAD: u32 = 7;
const EXPR_CONCAT: u32 = 13;
const EXPR_NUMGEN: u32 = 23;
const PROTO_DESC_UDP: u32 = 6;
const PROTO_DESC_TCP: u32 = 8;
const PROTO_DESC_SCTP: u32 = 10;
const PROTO_DESC_IP: u32 = 12;
const PROTO_DESC_IP6: u32 = 13;
const IPHDR_DADDR: u32 = 12;
const IP6HDR_DADDR: u32 = 9;
const THDR_DPORT: u32 = 2;

/// Element messages are cut when their payload reaches this bound: the element list is one
/// attribute, whose length field is 16 bits.
const ELEMS_PER_MSG_BYTES: usize = 48 * 1024;

/// Why an op could not be lowered (bad IR; nothing was sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct LowerError(pub String);

fn err<T>(s: impl Into<String>) -> Result<T, LowerError> {
    Err(LowerError(s.into()))
}

pub(crate) fn nfproto(f: Family) -> u16 {
    match f {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

/// One lowered message; for element messages, the index (in the op's element list) of the IR
/// element each netlink element came from, so a kernel error can name the element.
pub(crate) struct Lowered {
    pub msg: Msg,
    pub elem_index: Vec<u32>,
}

/// Lowers the ops of one transaction, tracking the sets it creates.
pub(crate) struct Lowerer<'a> {
    family: Family,
    /// Sets known to exist in the kernel from earlier transactions (this family).
    known: &'a HashMap<String, SetDef>,
    /// Sets created by this transaction, with their batch-local ids.
    created: HashMap<String, (u32, SetDef)>,
    next_set_id: u32,
    table: &'a str,
}

impl<'a> Lowerer<'a> {
    /// Lowers ops on kproxy's table, `kube-proxy` (see `on_table` for another).
    pub(crate) fn new(family: Family, known: &'a HashMap<String, SetDef>) -> Self {
        Lowerer { family, known, created: HashMap::new(), next_set_id: 1, table: TABLE }
    }

    /// The same ops on the table named `table` (kproxy's restart table).
    pub(crate) fn on_table(mut self, table: &'a str) -> Self {
        self.table = table;
        self
    }

    fn fam(&self) -> u16 {
        nfproto(self.family)
    }

    fn set_def(&self, name: &str) -> Option<&SetDef> {
        self.created.get(name).map(|(_, d)| d).or_else(|| self.known.get(name))
    }

    fn set_id(&self, name: &str) -> Option<u32> {
        self.created.get(name).map(|(id, _)| *id)
    }

    pub(crate) fn lower(&mut self, op: &Op) -> Result<Vec<Lowered>, LowerError> {
        let fam = self.fam();
        let table = self.table.to_string();
        let one = |msg| Ok(vec![Lowered { msg, elem_index: Vec::new() }]);
        match op {
            Op::AddTable => {
                let mut u = Udata::default();
                u.strz(UDATA_TABLE_COMMENT, TABLE_COMMENT);
                one(Msg::NewTable { family: fam, name: table, udata: u.0 })
            }
            Op::DeleteTable => one(Msg::DelTable { family: fam, name: table }),
            Op::AddSet(def) => {
                check_name(&def.name)?;
                let id = self.next_set_id;
                self.next_set_id += 1;
                let set = raw_set(def, id)?;
                self.created.insert(def.name.clone(), (id, def.clone()));
                one(Msg::NewSet { family: fam, table, set })
            }
            Op::DeleteSet(name) => {
                check_name(name)?;
                one(Msg::DelSet { family: fam, table, name: name.clone() })
            }
            Op::AddChain { name, base } => {
                check_name(name)?;
                one(Msg::NewChain { family: fam, table, name: name.clone(), hook: base.as_ref().map(raw_hook) })
            }
            Op::FlushChain(name) => {
                check_name(name)?;
                one(Msg::FlushChain { family: fam, table, chain: name.clone() })
            }
            Op::DeleteChain(name) => {
                check_name(name)?;
                one(Msg::DelChain { family: fam, table, name: name.clone() })
            }
            Op::AddRule { chain, rule } => {
                check_name(chain)?;
                let exprs = self.rule(rule)?;
                one(Msg::NewRule { family: fam, table, chain: chain.clone(), exprs })
            }
            Op::AddElements { set, elements } => self.elements(set, elements, false),
            // A DELSETELEM without elements flushes the set (nf_tables_delsetelem).
            Op::FlushSet { name, .. } => {
                check_name(name)?;
                one(Msg::Elems {
                    delete: true,
                    family: fam,
                    table,
                    set: name.clone(),
                    set_id: self.set_id(name),
                    elems: Vec::new(),
                })
            }
            Op::DeleteElements { set, elements } => self.elements(set, elements, true),
        }
    }

    // ---- rules ----

    fn rule(&self, rule: &Rule) -> Result<Vec<Expr>, LowerError> {
        let mut out = Vec::new();
        for e in &rule.exprs {
            self.expr(e, &mut out)?;
        }
        Ok(out)
    }

    fn expr(&self, e: &IrExpr, out: &mut Vec<Expr>) -> Result<(), LowerError> {
        let fam = self.family;
        match e {
            IrExpr::Cmp { sel, neq, right } => self.cmp(*sel, *neq, right, out)?,
            IrExpr::InSet { key, set, neq } => {
                check_name(set)?;
                let sreg = self.load_key(key, out)?;
                out.push(Expr::Lookup { sreg, dreg: None, set: set.clone(), set_id: self.set_id(set), invert: *neq });
            }
            IrExpr::Vmap { key, map } => {
                check_name(map)?;
                let sreg = self.load_key(key, out)?;
                out.push(Expr::Lookup {
                    sreg,
                    dreg: Some(REG_VERDICT),
                    set: map.clone(),
                    set_id: self.set_id(map),
                    invert: false,
                });
            }
            IrExpr::CtStateNew => flag_match(out, Expr::CtLoad { key: NFT_CT_STATE, dreg: 1 }, CT_STATE_NEW),
            IrExpr::CtStatusDnat => flag_match(out, Expr::CtLoad { key: NFT_CT_STATUS, dreg: 1 }, IPS_DST_NAT),
            IrExpr::FibDaddrLocal => {
                out.push(Expr::Fib { flags: NFTA_FIB_F_DADDR, result: NFT_FIB_RESULT_ADDRTYPE, dreg: 1 });
                out.push(Expr::Cmp { sreg: 1, op: NFT_CMP_EQ, data: RTN_LOCAL.to_ne_bytes().to_vec() });
            }
            IrExpr::FibSaddrLocal => {
                out.push(Expr::Fib { flags: NFTA_FIB_F_SADDR, result: NFT_FIB_RESULT_ADDRTYPE, dreg: 1 });
                out.push(Expr::Cmp { sreg: 1, op: NFT_CMP_EQ, data: RTN_LOCAL.to_ne_bytes().to_vec() });
            }
            IrExpr::MarkClear(m) => {
                // Marks are host-order integers in the register (no .to_be()).
                out.push(Expr::MetaLoad { key: NFT_META_MARK, dreg: 1 });
                out.push(bitwise32(*m, 0));
                out.push(Expr::Cmp { sreg: 1, op: NFT_CMP_EQ, data: 0u32.to_ne_bytes().to_vec() });
            }
            IrExpr::MarkOr(m) => mark_set(out, !*m, *m),
            IrExpr::MarkXor(m) => mark_set(out, u32::MAX, *m),
            IrExpr::DnatSlots { proto, modulus, offset, map } => {
                check_name(map)?;
                if *modulus == 0 {
                    return err("numgen modulus 0 (the kernel refuses it with ERANGE)");
                }
                // kproxy's endpoint map is an interval map; a map we know nothing about is
                // assumed to be one.
                let interval = match self.set_def(map) {
                    Some(def) if !matches!(def.set_type, SetType::EndpointSlots { family, .. } if family == fam) => {
                        return err(format!("dnat map @{map} is not an endpoint-slot map of family {}", fam.nft()));
                    }
                    Some(def) => def.interval,
                    None => true,
                };
                l4proto_eq(out, *proto);
                out.push(Expr::Numgen { dreg: 1, modulus: *modulus, ng_type: NFT_NG_RANDOM, offset: *offset });
                if interval {
                    // Interval (rbtree) keys are compared as big-endian numbers, so nft stores
                    // them big-endian and converts the host-order numgen result first. A plain
                    // map keeps host order and needs no conversion.
                    out.push(Expr::Byteorder { sreg: 1, dreg: 1, op: NFT_BYTEORDER_HTON, len: 4, size: 4 });
                }
                out.push(Expr::Lookup {
                    sreg: 1,
                    dreg: Some(1),
                    set: map.clone(),
                    set_id: self.set_id(map),
                    invert: false,
                });
                // Data is `addr . port`: the port sits in the 32-bit register after the address.
                out.push(Expr::Nat {
                    nat_type: NFT_NAT_DNAT,
                    family: nfproto(fam) as u32,
                    reg_addr_min: 1,
                    reg_proto_min: reg(slots(addr_len(fam))),
                });
            }
            IrExpr::Dnat { proto, addr, port } => {
                if Family::of(addr) != fam {
                    return err(format!("dnat to {addr} in family {}", fam.nft()));
                }
                // As nft: address in register 1, port in register 2 (128-bit registers).
                l4proto_eq(out, *proto);
                out.push(Expr::ImmediateData { dreg: 1, data: addr_bytes(addr) });
                out.push(Expr::ImmediateData { dreg: 2, data: port.to_be_bytes().to_vec() });
                out.push(Expr::Nat {
                    nat_type: NFT_NAT_DNAT,
                    family: nfproto(fam) as u32,
                    reg_addr_min: 1,
                    reg_proto_min: 2,
                });
            }
            IrExpr::NumgenEq { modulus, value } => {
                if *modulus == 0 {
                    return err("numgen modulus 0 (the kernel refuses it with ERANGE)");
                }
                out.push(Expr::Numgen { dreg: 1, modulus: *modulus, ng_type: NFT_NG_RANDOM, offset: 0 });
                out.push(Expr::Cmp { sreg: 1, op: NFT_CMP_EQ, data: value.to_ne_bytes().to_vec() });
            }
            IrExpr::SetUpdate { key, set } => {
                check_name(set)?;
                let sreg = self.load_key(key, out)?;
                out.push(Expr::Dynset {
                    sreg_key: sreg,
                    op: NFT_DYNSET_OP_UPDATE,
                    set: set.clone(),
                    set_id: self.set_id(set),
                });
            }
            IrExpr::Masquerade => out.push(Expr::Masq { flags: NAT_RANDOM_FULLY }),
            IrExpr::Iifname { name, prefix, neq } => {
                // `iifname "x"` compares all IFNAMSIZ bytes (NUL-padded); `iifname "x*"` only the
                // prefix bytes, as nft encodes them.
                if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['"', '*', ' ', '\0']) {
                    return err(format!("invalid interface name {name:?}"));
                }
                let mut data = name.as_bytes().to_vec();
                if !*prefix {
                    data.resize(IFNAMSIZ, 0);
                }
                out.push(Expr::MetaLoad { key: NFT_META_IIFNAME, dreg: 1 });
                out.push(Expr::Cmp { sreg: 1, op: if *neq { NFT_CMP_NEQ } else { NFT_CMP_EQ }, data });
            }
            IrExpr::Reject => {
                // `reject` in an ip/ip6 table is ICMP(v6) port-unreachable. nftnl's safe Reject
                // writes an ICMPX code here, which the kernel reads as host-unreachable.
                let code = match fam {
                    Family::V4 => ICMP_PORT_UNREACH,
                    Family::V6 => ICMPV6_PORT_UNREACH,
                };
                out.push(Expr::Reject { reject_type: NFT_REJECT_ICMP_UNREACH, code });
            }
            IrExpr::Verdict(v) => out.push(Expr::Immediate { verdict: raw_verdict(v)? }),
        }
        Ok(())
    }

    /// `SEL [!=] VALUE` and `SEL [!=] PREFIX`.
    fn cmp(&self, sel: Selector, neq: bool, right: &Operand, out: &mut Vec<Expr>) -> Result<(), LowerError> {
        let fam = self.family;
        let op = if neq { NFT_CMP_NEQ } else { NFT_CMP_EQ };
        let mismatch = || err(format!("cannot compare {sel:?} with {right:?} in family {}", fam.nft()));
        match (sel, right) {
            (Selector::Saddr | Selector::Daddr, Operand::Value(Value::Addr(a))) => {
                if Family::of(a) != fam {
                    return mismatch();
                }
                out.push(self.load(sel, 1));
                out.push(Expr::Cmp { sreg: 1, op, data: addr_bytes(a) });
            }
            (Selector::Saddr | Selector::Daddr, Operand::Prefix(c)) => {
                if c.family() != fam {
                    return mismatch();
                }
                self.prefix(sel, op, c, out);
            }
            (Selector::L4Proto, Operand::Value(Value::Proto(p))) => {
                out.push(self.load(sel, 1));
                out.push(Expr::Cmp { sreg: 1, op, data: vec![p.number()] });
            }
            (Selector::ThDport | Selector::Dport(_), Operand::Value(Value::Port(p))) => {
                if let Selector::Dport(proto) = sel {
                    l4proto_eq(out, proto);
                }
                out.push(self.load(sel, 1));
                out.push(Expr::Cmp { sreg: 1, op, data: p.to_be_bytes().to_vec() });
            }
            _ => return mismatch(),
        }
        Ok(())
    }

    /// A prefix match, folded the way nft folds it: a full-length prefix is a plain compare, a
    /// byte-aligned one loads only the prefix bytes, anything else masks the whole address.
    fn prefix(&self, sel: Selector, op: u32, c: &Cidr, out: &mut Vec<Expr>) {
        let full = addr_len(self.family);
        let bytes = addr_bytes(&c.addr);
        let (base, offset) = self.addr_offset(sel);
        if c.len as u32 == full * 8 {
            out.push(Expr::Payload { dreg: 1, base, offset, len: full });
            out.push(Expr::Cmp { sreg: 1, op, data: bytes });
        } else if c.len.is_multiple_of(8) && c.len > 0 {
            let n = (c.len / 8) as usize;
            out.push(Expr::Payload { dreg: 1, base, offset, len: n as u32 });
            out.push(Expr::Cmp { sreg: 1, op, data: bytes[..n].to_vec() });
        } else {
            out.push(Expr::Payload { dreg: 1, base, offset, len: full });
            out.push(Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                len: full,
                mask: c.mask_bytes(),
                xor: vec![0; full as usize],
                op_attr: false,
            });
            out.push(Expr::Cmp { sreg: 1, op, data: bytes });
        }
    }

    fn addr_offset(&self, sel: Selector) -> (u32, u32) {
        let off = match (self.family, sel) {
            (Family::V4, Selector::Saddr) => 12,
            (Family::V4, _) => 16,
            (Family::V6, Selector::Saddr) => 8,
            (Family::V6, _) => 24,
        };
        (NFT_PAYLOAD_NETWORK_HEADER, off)
    }

    /// Loads a selector into `dreg`.
    fn load(&self, sel: Selector, dreg: u32) -> Expr {
        match sel {
            Selector::Saddr | Selector::Daddr => {
                let (base, offset) = self.addr_offset(sel);
                Expr::Payload { dreg, base, offset, len: addr_len(self.family) }
            }
            Selector::L4Proto => Expr::MetaLoad { key: NFT_META_L4PROTO, dreg },
            Selector::ThDport | Selector::Dport(_) => {
                Expr::Payload { dreg, base: NFT_PAYLOAD_TRANSPORT_HEADER, offset: 2, len: 2 }
            }
        }
    }

    fn sel_len(&self, sel: Selector) -> u32 {
        match sel {
            Selector::Saddr | Selector::Daddr => addr_len(self.family),
            Selector::L4Proto => 1,
            Selector::ThDport | Selector::Dport(_) => 2,
        }
    }

    /// Loads a (possibly concatenated) key into consecutive 32-bit registers, as nft does, and
    /// returns the source register of the lookup. `tcp dport` style selectors first match their
    /// protocol (before any key register is written, since the match uses register 1).
    fn load_key(&self, key: &[Selector], out: &mut Vec<Expr>) -> Result<u32, LowerError> {
        if key.is_empty() {
            return err("empty set key");
        }
        let mut protos: Vec<Protocol> = Vec::new();
        for s in key {
            if let Selector::Dport(p) = s {
                if !protos.contains(p) {
                    protos.push(*p);
                }
            }
        }
        for p in protos {
            l4proto_eq(out, p);
        }
        let mut slot = 0;
        for s in key {
            let len = self.sel_len(*s);
            if slot + slots(len) > REG32_COUNT {
                return err(format!("set key {key:?} is longer than the 64 bytes of registers"));
            }
            out.push(self.load(*s, reg(slot)));
            slot += slots(len);
        }
        Ok(reg(0))
    }

    // ---- elements ----

    fn elements(&self, set: &str, elements: &[Element], delete: bool) -> Result<Vec<Lowered>, LowerError> {
        check_name(set)?;
        let def = self.set_def(set);
        let shape = match def {
            Some(d) => Shape::of(d),
            // A set we have not seen (not created by this transaction, nor by an earlier one of
            // this backend): infer from the elements. kproxy always creates its sets in the
            // first (full) transaction, so this only serves hand-written transactions.
            None => Shape {
                interval: elements.iter().any(|e| e.key_end.is_some()),
                concat: elements.first().is_some_and(|e| e.key.len() > 1),
            },
        };
        let mut out = Vec::new();
        let mut cur: Vec<Elem> = Vec::new();
        let mut cur_idx: Vec<u32> = Vec::new();
        let mut cur_bytes = 0;
        let flush = |cur: &mut Vec<Elem>, idx: &mut Vec<u32>, bytes: &mut usize, out: &mut Vec<Lowered>| {
            if cur.is_empty() {
                return;
            }
            out.push(Lowered {
                msg: Msg::Elems {
                    delete,
                    family: self.fam(),
                    table: self.table.to_string(),
                    set: set.to_string(),
                    set_id: self.set_id(set),
                    elems: std::mem::take(cur),
                },
                elem_index: std::mem::take(idx),
            });
            *bytes = 0;
        };
        for (i, e) in elements.iter().enumerate() {
            if let Some(d) = def {
                check_element(d, e, delete).map_err(|r| LowerError(format!("element {e}: {r}")))?;
            }
            let raws = lower_element(e, shape, delete).map_err(|r| LowerError(format!("element {e}: {}", r.0)))?;
            let size: usize = raws.iter().map(Elem::size_bound).sum();
            if cur_bytes + size > ELEMS_PER_MSG_BYTES {
                flush(&mut cur, &mut cur_idx, &mut cur_bytes, &mut out);
            }
            for r in raws {
                cur.push(r);
                cur_idx.push(i as u32);
            }
            cur_bytes += size;
        }
        flush(&mut cur, &mut cur_idx, &mut cur_bytes, &mut out);
        Ok(out)
    }
}

/// How a set stores its elements.
#[derive(Debug, Clone, Copy)]
struct Shape {
    interval: bool,
    concat: bool,
}

impl Shape {
    fn of(d: &SetDef) -> Shape {
        let concat = match &d.set_type {
            SetType::Typed { key, .. } => key.len() > 1,
            SetType::EndpointSlots { .. } | SetType::Affinity { .. } => false,
        };
        Shape { interval: d.interval, concat }
    }
}

fn lower_element(e: &Element, shape: Shape, delete: bool) -> Result<Vec<Elem>, LowerError> {
    // Integer (slot) keys: big-endian in interval sets, host order otherwise (see DnatSlots).
    let key = values_bytes(&e.key, shape.interval)?;
    let data = if delete {
        None
    } else {
        match &e.data {
            None => None,
            Some(ElemData::Verdict(v)) => Some(RawData::Verdict(raw_verdict(v)?)),
            Some(ElemData::Values(vs)) => Some(RawData::Bytes(values_bytes(vs, true)?)),
        }
    };
    let mut udata = Udata::default();
    if !delete {
        if let Some(c) = &e.comment {
            udata.strz(UDATA_SET_ELEM_COMMENT, &comment_text(c));
        }
    }
    if !shape.interval {
        if e.key_end.is_some() {
            return err("a range in a set without `flags interval`");
        }
        return Ok(vec![Elem { key, key_end: None, flags: 0, data, udata: udata.0 }]);
    }
    let last = match &e.key_end {
        Some(k) => values_bytes(k, shape.interval)?,
        None => key.clone(),
    };
    if last.len() != key.len() {
        return err("range start and end differ in type");
    }
    if shape.concat {
        // Concatenated intervals (pipapo) carry the inclusive end in NFTA_SET_ELEM_KEY_END.
        return Ok(vec![Elem { key, key_end: Some(last), flags: 0, data, udata: udata.0 }]);
    }
    if last < key {
        return err("range end is below its start");
    }
    // rbtree intervals: a start element with the data, and an end element (flag INTERVAL_END)
    // one past the last value, exactly as nft sends `a-b`. A range up to the maximum value has no
    // end element and is marked open in the udata instead.
    match be_increment(&last) {
        Some(end) => Ok(vec![
            Elem { key, key_end: None, flags: 0, data, udata: udata.0 },
            Elem { key: end, key_end: None, flags: NFT_SET_ELEM_INTERVAL_END, data: None, udata: Vec::new() },
        ]),
        None => {
            if !delete {
                udata.u32(UDATA_SET_ELEM_FLAGS, SET_ELEM_F_INTERVAL_OPEN);
            }
            Ok(vec![Elem { key, key_end: None, flags: 0, data, udata: udata.0 }])
        }
    }
}

/// Checks an element against its set's declaration, so that a malformed IR is reported as such
/// instead of as an EINVAL from the kernel (or, worse, accepted with the wrong meaning).
fn check_element(d: &SetDef, e: &Element, delete: bool) -> Result<(), String> {
    let (key_types, data_t): (Vec<Option<DataType>>, Option<Option<DataType>>) = match &d.set_type {
        SetType::Typed { key, data } => (key.iter().map(|t| Some(*t)).collect(), data.map(Some)),
        // Keys are numgen slots (integers), data is addr . port.
        SetType::EndpointSlots { .. } => (vec![None], Some(None)),
        SetType::Affinity { family, .. } => (vec![Some(DataType::addr(*family))], None),
    };
    let check_key = |vs: &[Value]| -> Result<(), String> {
        if vs.len() != key_types.len() {
            return Err(format!("key has {} fields, set @{} has {}", vs.len(), d.name, key_types.len()));
        }
        for (v, t) in vs.iter().zip(&key_types) {
            let ok = match t {
                Some(t) => value_is(v, *t),
                None => matches!(v, Value::Int(_)),
            };
            if !ok {
                return Err(format!("{v} does not fit the key type of @{}", d.name));
            }
        }
        Ok(())
    };
    check_key(&e.key)?;
    if let Some(k) = &e.key_end {
        check_key(k)?;
        if !d.interval {
            return Err(format!("range in @{}, which has no `flags interval`", d.name));
        }
    }
    if delete {
        return Ok(());
    }
    match (&data_t, &e.data) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(format!("@{} is a set, not a map", d.name)),
        (Some(_), None) => Err(format!("map @{} needs data", d.name)),
        (Some(Some(DataType::Verdict)), Some(ElemData::Verdict(_))) => Ok(()),
        (Some(Some(t)), Some(ElemData::Values(vs))) if vs.len() == 1 && value_is(&vs[0], *t) => Ok(()),
        (Some(None), Some(ElemData::Values(vs))) => {
            let fam = match &d.set_type {
                SetType::EndpointSlots { family, .. } => *family,
                SetType::Typed { .. } | SetType::Affinity { .. } => {
                    unreachable!("only endpoint maps have untyped data")
                }
            };
            match vs.as_slice() {
                [Value::Addr(a), Value::Port(_)] if Family::of(a) == fam => Ok(()),
                _ => Err(format!("@{} data must be {} address . port", d.name, fam.nft())),
            }
        }
        _ => Err(format!("data does not fit the data type of @{}", d.name)),
    }
}

fn value_is(v: &Value, t: DataType) -> bool {
    matches!(
        (v, t),
        (Value::Addr(IpAddr::V4(_)), DataType::Ipv4Addr)
            | (Value::Addr(IpAddr::V6(_)), DataType::Ipv6Addr)
            | (Value::Proto(_), DataType::InetProto)
            | (Value::Port(_), DataType::InetService)
    )
}

/// Adds one to a big-endian number; None on overflow.
fn be_increment(b: &[u8]) -> Option<Vec<u8>> {
    let mut v = b.to_vec();
    for byte in v.iter_mut().rev() {
        let (n, carry) = byte.overflowing_add(1);
        *byte = n;
        if !carry {
            return Some(v);
        }
    }
    None
}

fn value_bytes(v: &Value, int_be: bool) -> Vec<u8> {
    match v {
        Value::Addr(a) => addr_bytes(a),
        Value::Proto(p) => vec![p.number()],
        Value::Port(p) => p.to_be_bytes().to_vec(),
        Value::Int(i) if int_be => i.to_be_bytes().to_vec(),
        Value::Int(i) => i.to_ne_bytes().to_vec(),
    }
}

/// A key or data value: one field as is, a concatenation with every field padded to 4 bytes
/// (each field occupies whole 32-bit registers).
fn values_bytes(vs: &[Value], int_be: bool) -> Result<Vec<u8>, LowerError> {
    match vs {
        [] => err("empty key or data"),
        [v] => Ok(value_bytes(v, int_be)),
        _ => {
            let mut out = Vec::new();
            for v in vs {
                let mut b = value_bytes(v, int_be);
                b.resize(b.len().div_ceil(4) * 4, 0);
                out.extend(b);
            }
            if out.len() > (REG32_COUNT * 4) as usize {
                return err("concatenation longer than 64 bytes");
            }
            Ok(out)
        }
    }
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn addr_len(f: Family) -> u32 {
    match f {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

fn slots(len: u32) -> u32 {
    len.div_ceil(4)
}

/// The register number of 32-bit slot `slot`: nft names a slot by its 128-bit register
/// (NFT_REG_1..4) when aligned, and by NFT_REG32_xx otherwise, for old-kernel compatibility.
fn reg(slot: u32) -> u32 {
    if slot.is_multiple_of(4) {
        1 + slot / 4
    } else {
        8 + slot
    }
}

fn l4proto_eq(out: &mut Vec<Expr>, p: Protocol) {
    out.push(Expr::MetaLoad { key: NFT_META_L4PROTO, dreg: 1 });
    out.push(Expr::Cmp { sreg: 1, op: NFT_CMP_EQ, data: vec![p.number()] });
}

/// `ct state new` style: load, mask the bit, compare != 0.
fn flag_match(out: &mut Vec<Expr>, load: Expr, bit: u32) {
    out.push(load);
    out.push(Expr::Bitwise {
        sreg: 1,
        dreg: 1,
        len: 4,
        mask: bit.to_ne_bytes().to_vec(),
        xor: vec![0; 4],
        op_attr: false,
    });
    out.push(Expr::Cmp { sreg: 1, op: NFT_CMP_NEQ, data: vec![0; 4] });
}

fn bitwise32(mask: u32, xor: u32) -> Expr {
    Expr::Bitwise {
        sreg: 1,
        dreg: 1,
        len: 4,
        mask: mask.to_ne_bytes().to_vec(),
        xor: xor.to_ne_bytes().to_vec(),
        op_attr: true,
    }
}

/// `meta mark set meta mark | X` is `(mark & ~X) ^ X`; `^ X` is `(mark & ~0) ^ X`.
fn mark_set(out: &mut Vec<Expr>, mask: u32, xor: u32) {
    out.push(Expr::MetaLoad { key: NFT_META_MARK, dreg: 1 });
    out.push(bitwise32(mask, xor));
    out.push(Expr::MetaSet { key: NFT_META_MARK, sreg: 1 });
}

fn raw_verdict(v: &Verdict) -> Result<RawVerdict, LowerError> {
    Ok(match v {
        Verdict::Accept => RawVerdict { code: NF_ACCEPT, chain: None },
        Verdict::Drop => RawVerdict { code: NF_DROP, chain: None },
        Verdict::Return => RawVerdict { code: NFT_RETURN, chain: None },
        Verdict::Jump(c) => {
            check_name(c)?;
            RawVerdict { code: NFT_JUMP, chain: Some(c.clone()) }
        }
        Verdict::Goto(c) => {
            check_name(c)?;
            RawVerdict { code: NFT_GOTO, chain: Some(c.clone()) }
        }
    })
}

fn raw_hook(b: &BaseChain) -> RawHook {
    RawHook {
        chain_type: match b.chain_type {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        },
        // NF_INET_* hook numbers.
        hooknum: match b.hook {
            Hook::Prerouting => 0,
            Hook::Input => 1,
            Hook::Forward => 2,
            Hook::Output => 3,
            Hook::Postrouting => 4,
        },
        priority: b.priority,
    }
}

fn check_name(n: &str) -> Result<(), LowerError> {
    if n.is_empty() || n.len() > NAME_MAX || n.contains('\0') {
        return err(format!("invalid nftables name {n:?} (1 to {NAME_MAX} bytes, no NUL)"));
    }
    Ok(())
}

/// The comment as the text form carries it: `quote` strips what nft cannot hold in a quoted
/// string. nft refuses comments over 128 bytes, while `ns/name:port` can reach 143; we cut
/// instead of failing the whole transaction (the text form of such an element fails in nft).
fn comment_text(c: &str) -> String {
    let q = quote(c);
    let mut s = q[1..q.len() - 1].to_string();
    if s.len() > COMMENT_MAX {
        let mut cut = COMMENT_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

// ---- sets ----

fn type_id(t: DataType) -> u32 {
    match t {
        DataType::Ipv4Addr => 7,
        DataType::Ipv6Addr => 8,
        DataType::InetProto => 12,
        DataType::InetService => 13,
        DataType::Verdict => TYPE_VERDICT,
    }
}

fn type_len(t: DataType) -> u32 {
    match t {
        DataType::Ipv4Addr => 4,
        DataType::Ipv6Addr => 16,
        DataType::InetProto => 1,
        DataType::InetService => 2,
        DataType::Verdict => 0,
    }
}

fn type_byteorder(t: DataType) -> u32 {
    match t {
        DataType::Ipv4Addr | DataType::Ipv6Addr | DataType::InetService => BYTEORDER_BIG,
        // One-byte and verdict types have no byte order in nft.
        DataType::InetProto | DataType::Verdict => 0,
    }
}

fn addr_type(f: Family) -> DataType {
    DataType::addr(f)
}

fn raw_set(def: &SetDef, id: u32) -> Result<RawSet, LowerError> {
    let mut u = Udata::default();
    let mut flags = 0;
    if def.interval {
        flags |= NFT_SET_INTERVAL;
    }
    let mut timeout_ms = None;
    let (key_type, key_len, data, desc_concat) = match &def.set_type {
        SetType::Typed { key, data } => {
            if key.is_empty() || key.contains(&DataType::Verdict) {
                return err(format!("set @{}: invalid key type {key:?}", def.name));
            }
            let concat = key.len() > 1;
            let key_type = key.iter().fold(0u32, |acc, t| (acc << TYPE_BITS) | type_id(*t));
            let key_len =
                if concat { key.iter().map(|t| type_len(*t).div_ceil(4) * 4).sum() } else { type_len(key[0]) };
            if key_len > REG32_COUNT * 4 {
                return err(format!("set @{}: key longer than 64 bytes", def.name));
            }
            u.u32(UDATA_SET_KEYBYTEORDER, if concat { 0 } else { type_byteorder(key[0]) });
            if let Some(d) = data {
                flags |= NFT_SET_MAP;
                u.u32(UDATA_SET_DATABYTEORDER, type_byteorder(*d));
            }
            if concat {
                // nft records a concatenation of plain types as an (empty) concat `typeof`.
                u.nest(UDATA_SET_KEY_TYPEOF, |u| {
                    u.u32(0, EXPR_CONCAT);
                    u.nest(1, |_| {});
                });
            }
            if data.is_some() {
                u.u32(UDATA_SET_DATA_INTERVAL, 0);
            }
            let desc = if concat && def.interval {
                flags |= NFT_SET_CONCAT;
                key.iter().map(|t| type_len(*t) as u8).collect()
            } else {
                Vec::new()
            };
            (key_type, key_len, data.map(|d| (type_id(d), type_len(d))), desc)
        }
        SetType::EndpointSlots { family, proto } => {
            flags |= NFT_SET_MAP;
            // tcp, udp and sctp header templates all number dport 2, as th's does.
            let proto_desc = match proto {
                Protocol::Tcp => PROTO_DESC_TCP,
                Protocol::Udp => PROTO_DESC_UDP,
                Protocol::Sctp => PROTO_DESC_SCTP,
            };
            let (desc, tmpl) = match family {
                Family::V4 => (PROTO_DESC_IP, IPHDR_DADDR),
                Family::V6 => (PROTO_DESC_IP6, IP6HDR_DADDR),
            };
            // `typeof numgen random mod 1 : ip daddr . tcp dport`, byte for byte as nft 1.0.6.
            u.u32(UDATA_SET_KEYBYTEORDER, BYTEORDER_HOST);
            u.u32(UDATA_SET_DATABYTEORDER, 0);
            u.nest(UDATA_SET_KEY_TYPEOF, |u| {
                u.u32(0, EXPR_NUMGEN);
                u.nest(1, |u| {
                    u.u32(0, NFT_NG_RANDOM);
                    u.u32(1, 1); // modulus
                    u.u32(2, 0); // offset
                });
            });
            u.nest(UDATA_SET_DATA_TYPEOF, |u| {
                u.u32(0, EXPR_CONCAT);
                u.nest(1, |u| {
                    for (i, (d, t)) in [(desc, tmpl), (proto_desc, THDR_DPORT)].into_iter().enumerate() {
                        u.nest(i as u8, |u| {
                            u.u32(0, EXPR_PAYLOAD);
                            u.nest(1, |u| {
                                u.u32(0, d);
                                u.u32(1, t);
                            });
                        });
                    }
                });
            });
            u.u32(UDATA_SET_DATA_INTERVAL, 0);
            let at = addr_type(*family);
            let data_type = (type_id(at) << TYPE_BITS) | type_id(DataType::InetService);
            let data_len = type_len(at) + 4;
            (TYPE_INTEGER, 4, Some((data_type, data_len)), Vec::new())
        }
        SetType::Affinity { family, timeout } => {
            // `type ipv4_addr ; flags dynamic,timeout ; timeout Ns ;` as nft 1.0.6 sends it: the
            // flags, the timeout in ms, the key byte order; no size (the kernel lists 65535).
            flags |= NFT_SET_TIMEOUT | NFT_SET_EVAL;
            timeout_ms = Some(*timeout as u64 * 1000);
            let at = addr_type(*family);
            u.u32(UDATA_SET_KEYBYTEORDER, type_byteorder(at));
            (type_id(at), type_len(at), None, Vec::new())
        }
    };
    Ok(RawSet { name: def.name.clone(), id, flags, key_type, key_len, data, desc_concat, timeout_ms, udata: u.0 })
}

/// libnftnl's udata TLV format: one byte type, one byte length, value (u32s in host order).
#[derive(Default)]
struct Udata(Vec<u8>);

impl Udata {
    fn u32(&mut self, t: u8, v: u32) {
        self.0.push(t);
        self.0.push(4);
        self.0.extend(v.to_ne_bytes());
    }
    fn strz(&mut self, t: u8, s: &str) {
        // Callers keep s well under 255 bytes (comments are cut at 128).
        let len = (s.len() + 1).min(255);
        self.0.push(t);
        self.0.push(len as u8);
        self.0.extend(&s.as_bytes()[..len - 1]);
        self.0.push(0);
    }
    fn nest(&mut self, t: u8, f: impl FnOnce(&mut Udata)) {
        let at = self.0.len();
        self.0.push(t);
        self.0.push(0);
        f(self);
        self.0[at + 1] = (self.0.len() - at - 2) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn typed(name: &str, key: Vec<DataType>, data: Option<DataType>, interval: bool) -> SetDef {
        SetDef { name: name.into(), set_type: SetType::Typed { key, data }, interval }
    }

    // Expected udata bytes below were captured from `nft -f` 1.0.6 (strace of its sendmsg).
    #[test]
    fn set_udata_matches_nft() {
        use DataType::*;
        let cases = [
            (typed("a", vec![Ipv4Addr], None, false), "000402000000"),
            (typed("b", vec![InetProto], None, false), "000400000000"),
            (typed("d", vec![InetProto], Some(Verdict), false), "000400000000010400000000060400000000"),
            (typed("f", vec![Ipv6Addr, Ipv6Addr], None, false), "000400000000030800040d0000000100"),
            (
                typed("h", vec![Ipv6Addr, InetProto, InetService], Some(Verdict), false),
                "000400000000010400000000030800040d0000000100060400000000",
            ),
            (typed("j", vec![InetService], Some(Ipv6Addr), false), "000402000000010402000000060400000000"),
        ];
        for (def, want) in cases {
            assert_eq!(hex(&raw_set(&def, 1).unwrap().udata), want, "{}", def.name);
        }
        let v4 = SetDef {
            name: "e".into(),
            set_type: SetType::EndpointSlots { family: Family::V4, proto: Protocol::Tcp },
            interval: true,
        };
        let s = raw_set(&v4, 7).unwrap();
        assert_eq!(
            hex(&s.udata),
            "000401000000010400000000031a0004170000000112000401000000010401000000020400000000\
             043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000\
             010c000408000000010402000000060400000000"
        );
        assert_eq!((s.flags, s.key_type, s.key_len, s.data), (0xc, 4, 4, Some((0x1cd, 8))));
        let v6 = SetDef {
            name: "e".into(),
            set_type: SetType::EndpointSlots { family: Family::V6, proto: Protocol::Tcp },
            interval: true,
        };
        let s = raw_set(&v6, 7).unwrap();
        assert!(hex(&s.udata).contains("00040d000000010409000000"), "ip6 daddr template");
        assert_eq!(s.data, Some((0x20d, 20)));
        let svc = typed("s", vec![Ipv4Addr, InetProto, InetService], Some(Verdict), false);
        let s = raw_set(&svc, 3).unwrap();
        assert_eq!((s.flags, s.key_type, s.key_len, s.data), (8, 0x730d, 12, Some((TYPE_VERDICT, 0))));
        let iv = typed("s2", vec![Ipv4Addr, InetService], None, true);
        let s = raw_set(&iv, 2).unwrap();
        assert_eq!((s.flags, s.key_type, s.key_len, s.desc_concat.clone()), (0x84, 0x1cd, 8, vec![4, 2]));
    }

    #[test]
    fn affinity_sets_as_nft_sends_them() {
        // `type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ;`, captured with
        // `nft --debug=mnl` 1.0.6: flags 0x30, key ipv4_addr, NFTA_SET_TIMEOUT 10800000 ms, udata
        // holding only the key byte order; no size.
        for (fam, key_type, key_len) in [(Family::V4, 7, 4), (Family::V6, 8, 16)] {
            let def = SetDef {
                name: "affinity-x".into(),
                set_type: SetType::Affinity { family: fam, timeout: 10800 },
                interval: false,
            };
            let s = raw_set(&def, 1).unwrap();
            assert_eq!(
                (s.flags, s.key_type, s.key_len, s.data, s.timeout_ms),
                (0x30, key_type, key_len, None, Some(10_800_000))
            );
            assert_eq!(hex(&s.udata), "000402000000");
        }
    }

    #[test]
    fn registers_follow_nft() {
        assert_eq!((reg(0), reg(1), reg(2), reg(4), reg(5)), (1, 9, 10, 2, 13));
    }

    #[test]
    fn interval_elements_as_nft_sends_them() {
        let e = Element {
            key: vec![Value::Int(13860)],
            key_end: Some(vec![Value::Int(27719)]),
            data: Some(ElemData::Values(vec![Value::Addr("10.180.0.2".parse().unwrap()), Value::Port(80)])),
            comment: None,
        };
        let shape = Shape { interval: true, concat: false };
        let r = lower_element(&e, shape, false).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(hex(&r[0].key), "00003624");
        assert_eq!(r[0].data, Some(RawData::Bytes(vec![10, 180, 0, 2, 0, 80, 0, 0])));
        assert_eq!((hex(&r[1].key), r[1].flags, r[1].data.is_none()), ("00006c48".into(), 1, true));
        let d = lower_element(&e, shape, true).unwrap();
        assert!(d.iter().all(|x| x.data.is_none() && x.udata.is_empty()));
        // A range up to the maximum is open: no end element, flagged in udata.
        let open = Element::key(vec![Value::Port(65535)]);
        let r = lower_element(&open, shape, false).unwrap();
        assert_eq!((r.len(), hex(&r[0].udata)), (1, "010401000000".to_string()));
    }

    #[test]
    fn comments_are_sanitised_and_cut() {
        let mut u = Udata::default();
        u.strz(UDATA_SET_ELEM_COMMENT, &comment_text("ns1/svc1:p80"));
        assert_eq!(hex(&u.0), "000d6e73312f737663313a70383000");
        assert_eq!(comment_text("a\"b\\c"), "abc");
        assert_eq!(comment_text(&"x".repeat(200)).len(), 128);
    }

    #[test]
    fn bad_ir_is_an_error_not_a_panic() {
        let known = HashMap::new();
        let mut l = Lowerer::new(Family::V4, &known);
        let bad = Op::AddRule {
            chain: "c".into(),
            rule: Rule::new(vec![IrExpr::Cmp {
                sel: Selector::Saddr,
                neq: false,
                right: Operand::Value(Value::Addr("::1".parse().unwrap())),
            }]),
        };
        assert!(l.lower(&bad).is_err());
        assert!(l.lower(&Op::FlushChain("x".repeat(300))).is_err());
        l.lower(&Op::AddSet(typed("s", vec![DataType::Ipv4Addr], None, false))).unwrap();
        let wrong = Op::AddElements { set: "s".into(), elements: vec![Element::key(vec![Value::Port(1)])] };
        assert!(l.lower(&wrong).is_err());
    }
}
