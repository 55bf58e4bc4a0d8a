//! The unsafe edge: plain-data nf_tables messages serialized by libnftnl into one batch buffer,
//! and the `NETLINK_NETFILTER` socket that sends it in a single `sendmsg`.
//!
//! Everything above this module is safe code that builds [`Msg`] values (tables, chains, rules
//! made of [`Expr`]s, sets, elements). This module turns each one into a libnftnl object, lets
//! libnftnl write the netlink attributes (so the bytes are the ones `nft` 1.0.6 sends, it uses
//! the same library), and frees the object again. Nothing libnftnl allocates outlives a call.
//!
//! We deliberately do not use `nftnl::Batch` or the crate's `Table`/`Chain`/`Rule` types:
//! - `Batch` hard-codes `NLM_F_ACK` on BEGIN/END depending on a `uname` parse that panics in debug
//!   builds on unusual release strings, and its pages must be sent as separate iovecs (the
//!   kernel sees a batch only inside one skb, so all pages must go in one `sendmsg`);
//! - the crate's message types always set `NLM_F_ACK` (one ACK per message floods the socket
//!   with 100k+ messages) and `NLM_F_EXCL` on elements (nft does not: re-adding an existing
//!   element must not fail);
//! - the safe expressions hard-wire register 1 and miss numgen, byteorder, fib, masquerade flags,
//!   lookup dreg, and write the wrong ICMP code for `reject` in an `ip` table.
//!
//! Instead [`Batch`] is one contiguous, zero-initialised `Vec<u8>`: each message is written by
//! libnftnl into reserved space whose size is bounded beforehand in safe code
//! ([`Msg::size_bound`]), because libmnl's attribute writers do no bounds checking.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::time::Duration;

use nftnl::nftnl_sys as sys;

// ---- Constants from linux/netfilter/nf_tables.h, linux/netlink.h (stable kernel ABI). ----

pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(crate) const NFT_MSG_DELCHAIN: u16 = 5;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
pub(crate) const NFT_MSG_DELRULE: u16 = 8;
pub(crate) const NFT_MSG_NEWSET: u16 = 9;
pub(crate) const NFT_MSG_DELSET: u16 = 11;
pub(crate) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(crate) const NFT_MSG_DELSETELEM: u16 = 14;
pub(crate) const NFT_MSG_NEWGEN: u16 = 15;
pub(crate) const NFT_MSG_GETGEN: u16 = 16;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// nlmsghdr + nfgenmsg.
pub(crate) const NFNL_HDRLEN: usize = 20;

/// Size reserved for a message on top of its computed bound (headers, alignment, slack).
const MSG_SLACK: usize = 512;

/// A verdict as the kernel encodes it: `code` (NF_ACCEPT, NF_DROP, NFT_JUMP, ...) and the target
/// chain for jump/goto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawVerdict {
    pub code: i32,
    pub chain: Option<std::sync::Arc<str>>,
}

/// One nf_tables expression, with exactly the attributes nft 1.0.6 sets for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    MetaLoad {
        key: u32,
        dreg: u32,
    },
    MetaSet {
        key: u32,
        sreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    /// `op_attr`: nft sets NFTA_BITWISE_OP only for binary operations written by the user
    /// (`meta mark & X`), not for flag matches and prefixes; mirrored for identical bytes.
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
        op_attr: bool,
    },
    CtLoad {
        key: u32,
        dreg: u32,
    },
    Fib {
        flags: u32,
        result: u32,
        dreg: u32,
    },
    Lookup {
        sreg: u32,
        dreg: Option<u32>,
        set: String,
        set_id: Option<u32>,
        invert: bool,
    },
    Numgen {
        dreg: u32,
        modulus: u32,
        ng_type: u32,
        offset: u32,
    },
    Byteorder {
        sreg: u32,
        dreg: u32,
        op: u32,
        len: u32,
        size: u32,
    },
    Nat {
        nat_type: u32,
        family: u32,
        reg_addr_min: u32,
        reg_proto_min: u32,
    },
    Masq {
        flags: u32,
    },
    Reject {
        reject_type: u32,
        code: u8,
    },
    Immediate {
        verdict: RawVerdict,
    },
    /// `immediate reg DREG DATA`: a constant into a data register.
    ImmediateData {
        dreg: u32,
        data: Vec<u8>,
    },
    /// `dynset`: add or update the key in `sreg_key` in a set from the packet path.
    Dynset {
        sreg_key: u32,
        op: u32,
        set: String,
        set_id: Option<u32>,
    },
}

impl Expr {
    fn size_bound(&self) -> usize {
        // Name + nests + up to 8 u32 attributes, plus the variable parts.
        let var = match self {
            Expr::Cmp { data, .. } => data.len(),
            Expr::Bitwise { mask, xor, .. } => mask.len() + xor.len(),
            Expr::Lookup { set, .. } => set.len(),
            Expr::Immediate { verdict } => verdict.chain.as_ref().map_or(0, |c| c.len()),
            Expr::ImmediateData { data, .. } => data.len(),
            Expr::Dynset { set, .. } => set.len(),
            _ => 0,
        };
        160 + 2 * var
    }
}

/// Data of a set element: a verdict (vmaps) or raw bytes (data maps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ElemData {
    Verdict(RawVerdict),
    Bytes(Vec<u8>),
}

/// One element as the kernel sees it (an interval is two of these, or one with `key_end`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Elem {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
    pub flags: u32,
    pub data: Option<ElemData>,
    pub udata: Vec<u8>,
}

impl Elem {
    pub(crate) fn size_bound(&self) -> usize {
        let data = match &self.data {
            None => 0,
            Some(ElemData::Verdict(v)) => 32 + v.chain.as_ref().map_or(0, |c| c.len()),
            Some(ElemData::Bytes(b)) => 16 + b.len(),
        };
        64 + self.key.len() + self.key_end.as_ref().map_or(0, |k| k.len()) + data + self.udata.len()
    }
}

/// A base chain's hook, as sent in NEWCHAIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawHook {
    pub chain_type: &'static str,
    pub hooknum: u32,
    pub priority: i32,
}

/// A set declaration, as sent in NEWSET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawSet {
    pub name: String,
    pub id: u32,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    /// (data type, data len) for maps.
    pub data: Option<(u32, u32)>,
    /// Field lengths (bytes) of a concatenated interval key (NFTA_SET_DESC_CONCAT).
    pub desc_concat: Vec<u8>,
    /// Default element timeout (NFTA_SET_TIMEOUT, ms) of a `flags timeout` set.
    pub timeout_ms: Option<u64>,
    pub udata: Vec<u8>,
}

/// One nf_tables message of a batch. Family is the NFPROTO value (2 = ip, 10 = ip6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Msg {
    NewTable {
        family: u16,
        name: String,
        udata: Vec<u8>,
    },
    DelTable {
        family: u16,
        name: String,
    },
    NewChain {
        family: u16,
        table: String,
        name: String,
        hook: Option<RawHook>,
    },
    DelChain {
        family: u16,
        table: String,
        name: String,
    },
    /// DELRULE without a handle: flushes every rule of the chain.
    FlushChain {
        family: u16,
        table: String,
        chain: String,
    },
    NewRule {
        family: u16,
        table: String,
        chain: String,
        exprs: Vec<Expr>,
    },
    NewSet {
        family: u16,
        table: String,
        set: RawSet,
    },
    DelSet {
        family: u16,
        table: String,
        name: String,
    },
    /// NEWSETELEM (`delete == false`) or DELSETELEM with the given elements.
    Elems {
        delete: bool,
        family: u16,
        table: String,
        set: String,
        set_id: Option<u32>,
        elems: Vec<Elem>,
    },
}

impl Msg {
    /// An upper bound of the serialized size; the batch reserves this much before libnftnl
    /// writes the message.
    pub(crate) fn size_bound(&self) -> usize {
        let names = |xs: &[&String]| xs.iter().map(|s| s.len() + 8).sum::<usize>();
        128 + match self {
            Msg::NewTable { name, udata, .. } => names(&[name]) + udata.len() + 16,
            Msg::DelTable { name, .. } => names(&[name]),
            Msg::NewChain { table, name, .. } => names(&[table, name]) + 64,
            Msg::DelChain { table, name, .. } => names(&[table, name]),
            Msg::FlushChain { table, chain, .. } => names(&[table, chain]),
            Msg::NewRule { table, chain, exprs, .. } => {
                names(&[table, chain]) + exprs.iter().map(Expr::size_bound).sum::<usize>()
            }
            Msg::NewSet { table, set, .. } => {
                names(&[table, &set.name]) + 128 + 16 * set.desc_concat.len() + set.udata.len()
            }
            Msg::DelSet { table, name, .. } => names(&[table, name]),
            Msg::Elems { table, set, elems, .. } => {
                names(&[table, set]) + 16 + elems.iter().map(Elem::size_bound).sum::<usize>()
            }
        }
    }
}

/// Why a message could not be serialized (before anything was sent).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EncodeError {
    #[error("name or string {0:?} contains a NUL byte")]
    Nul(String),
    #[error("libnftnl could not allocate a {0} object")]
    Alloc(&'static str),
    #[error("libnftnl refused attribute {attr} of a {what}")]
    Attr { what: &'static str, attr: u16 },
}

fn cstr(s: &str) -> Result<CString, EncodeError> {
    CString::new(s).map_err(|_| EncodeError::Nul(s.to_string()))
}

/// An owned libnftnl object, freed on drop. `T` is one of the opaque nftnl types.
struct Owned<T> {
    ptr: NonNull<T>,
    free: unsafe extern "C" fn(*mut T),
}

impl<T> Owned<T> {
    fn new(ptr: *mut T, free: unsafe extern "C" fn(*mut T), what: &'static str) -> Result<Self, EncodeError> {
        NonNull::new(ptr).map(|ptr| Owned { ptr, free }).ok_or(EncodeError::Alloc(what))
    }
    fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }
    /// Gives up ownership (the object now belongs to a parent libnftnl object).
    fn into_raw(self) -> *mut T {
        let p = self.ptr.as_ptr();
        std::mem::forget(self);
        p
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: ptr came from the matching nftnl_*_alloc and is freed exactly once.
        unsafe { (self.free)(self.ptr.as_ptr()) }
    }
}

// The libnftnl free functions take `*const`; adapt them to one signature.
unsafe extern "C" fn free_table(p: *mut sys::nftnl_table) {
    unsafe { sys::nftnl_table_free(p) }
}
unsafe extern "C" fn free_chain(p: *mut sys::nftnl_chain) {
    unsafe { sys::nftnl_chain_free(p) }
}
unsafe extern "C" fn free_rule(p: *mut sys::nftnl_rule) {
    unsafe { sys::nftnl_rule_free(p) }
}
unsafe extern "C" fn free_set(p: *mut sys::nftnl_set) {
    unsafe { sys::nftnl_set_free(p) }
}
unsafe extern "C" fn free_elem(p: *mut sys::nftnl_set_elem) {
    unsafe { sys::nftnl_set_elem_free(p) }
}
unsafe extern "C" fn free_expr(p: *mut sys::nftnl_expr) {
    unsafe { sys::nftnl_expr_free(p) }
}

fn check(rc: i32, what: &'static str, attr: u16) -> Result<(), EncodeError> {
    if rc < 0 {
        Err(EncodeError::Attr { what, attr })
    } else {
        Ok(())
    }
}

fn u16attr(a: u32) -> u16 {
    a as u16
}

/// Builds a libnftnl expression. Every `nftnl_expr_set*` copies its input.
fn build_expr(e: &Expr) -> Result<Owned<sys::nftnl_expr>, EncodeError> {
    use sys::*;
    let name: &[u8] = match e {
        Expr::Payload { .. } => b"payload\0",
        Expr::MetaLoad { .. } | Expr::MetaSet { .. } => b"meta\0",
        Expr::Cmp { .. } => b"cmp\0",
        Expr::Bitwise { .. } => b"bitwise\0",
        Expr::CtLoad { .. } => b"ct\0",
        Expr::Fib { .. } => b"fib\0",
        Expr::Lookup { .. } => b"lookup\0",
        Expr::Numgen { .. } => b"numgen\0",
        Expr::Byteorder { .. } => b"byteorder\0",
        Expr::Nat { .. } => b"nat\0",
        Expr::Masq { .. } => b"masq\0",
        Expr::Reject { .. } => b"reject\0",
        Expr::Immediate { .. } | Expr::ImmediateData { .. } => b"immediate\0",
        Expr::Dynset { .. } => b"dynset\0",
    };
    // SAFETY: name is NUL-terminated; a NULL return (unknown name / OOM) is checked by Owned::new.
    let x = Owned::new(unsafe { nftnl_expr_alloc(name.as_ptr() as *const c_char) }, free_expr, "expr")?;
    let p = x.as_ptr();
    // SAFETY (all calls below): p is a live expression of the kind the attribute belongs to;
    // data pointers are valid for the given lengths and copied by libnftnl.
    unsafe {
        let u32a = |attr: u32, v: u32| nftnl_expr_set_u32(p, u16attr(attr), v);
        let data = |attr: u32, d: &[u8]| -> Result<(), EncodeError> {
            check(nftnl_expr_set(p, u16attr(attr), d.as_ptr() as *const c_void, d.len() as u32), "expr", attr as u16)
        };
        match e {
            Expr::Payload { dreg, base, offset, len } => {
                u32a(NFTNL_EXPR_PAYLOAD_DREG, *dreg);
                u32a(NFTNL_EXPR_PAYLOAD_BASE, *base);
                u32a(NFTNL_EXPR_PAYLOAD_OFFSET, *offset);
                u32a(NFTNL_EXPR_PAYLOAD_LEN, *len);
            }
            Expr::MetaLoad { key, dreg } => {
                u32a(NFTNL_EXPR_META_KEY, *key);
                u32a(NFTNL_EXPR_META_DREG, *dreg);
            }
            Expr::MetaSet { key, sreg } => {
                u32a(NFTNL_EXPR_META_KEY, *key);
                u32a(NFTNL_EXPR_META_SREG, *sreg);
            }
            Expr::Cmp { sreg, op, data: d } => {
                u32a(NFTNL_EXPR_CMP_SREG, *sreg);
                u32a(NFTNL_EXPR_CMP_OP, *op);
                data(NFTNL_EXPR_CMP_DATA, d)?;
            }
            Expr::Bitwise { sreg, dreg, len, mask, xor, op_attr } => {
                u32a(NFTNL_EXPR_BITWISE_SREG, *sreg);
                u32a(NFTNL_EXPR_BITWISE_DREG, *dreg);
                if *op_attr {
                    // NFT_BITWISE_BOOL: (reg & mask) ^ xor, the only operation we use.
                    u32a(NFTNL_EXPR_BITWISE_OP, 0);
                }
                u32a(NFTNL_EXPR_BITWISE_LEN, *len);
                data(NFTNL_EXPR_BITWISE_MASK, mask)?;
                data(NFTNL_EXPR_BITWISE_XOR, xor)?;
            }
            Expr::CtLoad { key, dreg } => {
                u32a(NFTNL_EXPR_CT_KEY, *key);
                u32a(NFTNL_EXPR_CT_DREG, *dreg);
            }
            Expr::Fib { flags, result, dreg } => {
                u32a(NFTNL_EXPR_FIB_FLAGS, *flags);
                u32a(NFTNL_EXPR_FIB_RESULT, *result);
                u32a(NFTNL_EXPR_FIB_DREG, *dreg);
            }
            Expr::Lookup { sreg, dreg, set, set_id, invert } => {
                u32a(NFTNL_EXPR_LOOKUP_SREG, *sreg);
                if let Some(d) = dreg {
                    u32a(NFTNL_EXPR_LOOKUP_DREG, *d);
                }
                let name = cstr(set)?;
                check(nftnl_expr_set_str(p, u16attr(NFTNL_EXPR_LOOKUP_SET), name.as_ptr()), "lookup", 0)?;
                if let Some(id) = set_id {
                    u32a(NFTNL_EXPR_LOOKUP_SET_ID, *id);
                }
                if *invert {
                    u32a(NFTNL_EXPR_LOOKUP_FLAGS, 1); // NFT_LOOKUP_F_INV
                }
            }
            Expr::Numgen { dreg, modulus, ng_type, offset } => {
                u32a(NFTNL_EXPR_NG_DREG, *dreg);
                u32a(NFTNL_EXPR_NG_MODULUS, *modulus);
                u32a(NFTNL_EXPR_NG_TYPE, *ng_type);
                u32a(NFTNL_EXPR_NG_OFFSET, *offset);
            }
            Expr::Byteorder { sreg, dreg, op, len, size } => {
                u32a(NFTNL_EXPR_BYTEORDER_SREG, *sreg);
                u32a(NFTNL_EXPR_BYTEORDER_DREG, *dreg);
                u32a(NFTNL_EXPR_BYTEORDER_OP, *op);
                u32a(NFTNL_EXPR_BYTEORDER_LEN, *len);
                u32a(NFTNL_EXPR_BYTEORDER_SIZE, *size);
            }
            Expr::Nat { nat_type, family, reg_addr_min, reg_proto_min } => {
                u32a(NFTNL_EXPR_NAT_TYPE, *nat_type);
                u32a(NFTNL_EXPR_NAT_FAMILY, *family);
                u32a(NFTNL_EXPR_NAT_REG_ADDR_MIN, *reg_addr_min);
                u32a(NFTNL_EXPR_NAT_REG_PROTO_MIN, *reg_proto_min);
            }
            Expr::Masq { flags } => {
                u32a(NFTNL_EXPR_MASQ_FLAGS, *flags);
            }
            Expr::Reject { reject_type, code } => {
                u32a(NFTNL_EXPR_REJECT_TYPE, *reject_type);
                nftnl_expr_set_u8(p, u16attr(NFTNL_EXPR_REJECT_CODE), *code);
            }
            Expr::ImmediateData { dreg, data: d } => {
                u32a(NFTNL_EXPR_IMM_DREG, *dreg);
                data(NFTNL_EXPR_IMM_DATA, d)?;
            }
            Expr::Dynset { sreg_key, op, set, set_id } => {
                u32a(NFTNL_EXPR_DYNSET_SREG_KEY, *sreg_key);
                u32a(NFTNL_EXPR_DYNSET_OP, *op);
                let name = cstr(set)?;
                check(nftnl_expr_set_str(p, u16attr(NFTNL_EXPR_DYNSET_SET_NAME), name.as_ptr()), "dynset", 0)?;
                if let Some(id) = set_id {
                    u32a(NFTNL_EXPR_DYNSET_SET_ID, *id);
                }
            }
            Expr::Immediate { verdict } => {
                u32a(NFTNL_EXPR_IMM_DREG, 0); // NFT_REG_VERDICT
                u32a(NFTNL_EXPR_IMM_VERDICT, verdict.code as u32);
                if let Some(c) = &verdict.chain {
                    let c = cstr(c)?;
                    check(nftnl_expr_set_str(p, u16attr(NFTNL_EXPR_IMM_CHAIN), c.as_ptr()), "immediate", 0)?;
                }
            }
        }
    }
    Ok(x)
}

/// A set object carrying only what element messages need (table, name, id) plus elements.
fn build_elem_set(
    table: &str,
    set: &str,
    set_id: Option<u32>,
    elems: &[Elem],
) -> Result<Owned<sys::nftnl_set>, EncodeError> {
    use sys::*;
    // SAFETY: NULL checked by Owned::new.
    let s = Owned::new(unsafe { nftnl_set_alloc() }, free_set, "set")?;
    let (t, n) = (cstr(table)?, cstr(set)?);
    // SAFETY: s is live; strings are NUL-terminated and copied.
    unsafe {
        check(nftnl_set_set_str(s.as_ptr(), NFTNL_SET_TABLE as u16, t.as_ptr()), "set", 0)?;
        check(nftnl_set_set_str(s.as_ptr(), NFTNL_SET_NAME as u16, n.as_ptr()), "set", 1)?;
        if let Some(id) = set_id {
            nftnl_set_set_u32(s.as_ptr(), NFTNL_SET_ID as u16, id);
        }
    }
    for el in elems {
        // SAFETY: NULL checked by Owned::new.
        let e = Owned::new(unsafe { nftnl_set_elem_alloc() }, free_elem, "set element")?;
        let ep = e.as_ptr();
        // SAFETY: ep is live; data pointers valid for their lengths and copied by libnftnl.
        unsafe {
            let bytes = |attr: u32, d: &[u8]| {
                check(
                    nftnl_set_elem_set(ep, attr as u16, d.as_ptr() as *const c_void, d.len() as u32),
                    "element",
                    attr as u16,
                )
            };
            if el.flags != 0 {
                nftnl_set_elem_set_u32(ep, NFTNL_SET_ELEM_FLAGS as u16, el.flags);
            }
            bytes(NFTNL_SET_ELEM_KEY, &el.key)?;
            if let Some(k) = &el.key_end {
                bytes(NFTNL_SET_ELEM_KEY_END, k)?;
            }
            match &el.data {
                None => {}
                Some(ElemData::Verdict(v)) => {
                    nftnl_set_elem_set_u32(ep, NFTNL_SET_ELEM_VERDICT as u16, v.code as u32);
                    if let Some(c) = &v.chain {
                        let c = cstr(c)?;
                        check(nftnl_set_elem_set_str(ep, NFTNL_SET_ELEM_CHAIN as u16, c.as_ptr()), "element", 3)?;
                    }
                }
                Some(ElemData::Bytes(b)) => bytes(NFTNL_SET_ELEM_DATA, b)?,
            }
            if !el.udata.is_empty() {
                bytes(NFTNL_SET_ELEM_USERDATA, &el.udata)?;
            }
            // The set takes ownership of the element.
            nftnl_set_elem_add(s.as_ptr(), e.into_raw());
        }
    }
    Ok(s)
}

/// The batch being built: one contiguous buffer of netlink messages.
///
/// All bytes of `buf` are initialised (zeroed when grown), and `used` is the end of the last
/// complete message. A message is written at `used` into at least `size_bound + MSG_SLACK`
/// bytes of zeroed space, then `used` moves past it.
pub(crate) struct Batch {
    buf: Vec<u8>,
    used: usize,
    messages: usize,
}

impl Batch {
    pub(crate) fn new() -> Self {
        Batch { buf: Vec::new(), used: 0, messages: 0 }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    pub(crate) fn messages(&self) -> usize {
        self.messages
    }

    /// Makes `need` zeroed bytes available at `used` and returns a pointer to them.
    fn reserve(&mut self, need: usize) -> *mut u8 {
        let want = self.used + need;
        if self.buf.len() < want {
            let grow = want.max(self.buf.len() * 2).max(1 << 16);
            self.buf.resize(grow, 0);
        }
        // Space past `used` may hold a message whose encoding failed half-way. libnftnl writes
        // every byte inside nlmsg_len (headers and attribute padding are zeroed by libmnl), so
        // this is only for deterministic bytes.
        self.buf[self.used..want].fill(0);
        // SAFETY: used + need <= buf.len(), so the pointer and the range are in bounds.
        unsafe { self.buf.as_mut_ptr().add(self.used) }
    }

    /// Commits the message whose header is at `used`, checking it stayed inside `reserved`.
    fn commit(&mut self, reserved: usize) {
        let len = u32::from_ne_bytes(self.buf[self.used..self.used + 4].try_into().expect("4 bytes")) as usize;
        // A message longer than its reservation means libmnl wrote past it: memory is corrupt,
        // continuing would be unsound.
        if len > reserved {
            std::process::abort();
        }
        self.used += (len + 3) & !3;
        self.messages += 1;
    }

    /// BEGIN of an nf_tables batch.
    pub(crate) fn begin(&mut self, seq: u32) {
        let p = self.reserve(MSG_SLACK) as *mut c_char;
        // SAFETY: p points to MSG_SLACK zeroed bytes; a batch header is 20 bytes.
        unsafe { sys::nftnl_batch_begin(p, seq) };
        self.commit(MSG_SLACK);
    }

    /// END of the batch; `ack` asks the kernel (6.10+) to acknowledge a successful commit.
    pub(crate) fn end(&mut self, seq: u32, ack: bool) {
        let p = self.reserve(MSG_SLACK) as *mut c_char;
        // SAFETY: as in begin; the returned header lies inside the reserved space.
        unsafe {
            let nlh = sys::nftnl_batch_end(p, seq);
            if ack {
                (*nlh).nlmsg_flags |= NLM_F_ACK;
            }
        }
        self.commit(MSG_SLACK);
    }

    /// Serializes one message with sequence number `seq`.
    ///
    /// Flags mirror nft 1.0.6: NEWTABLE plain (re-adding a table is not an error), NEW* with
    /// NLM_F_CREATE, rules with NLM_F_CREATE|NLM_F_APPEND, deletions plain. Never NLM_F_ACK: a
    /// batch of 100k messages would get 100k ACKs and overflow the socket; errors are still
    /// reported, and success is confirmed by the END ACK.
    pub(crate) fn push(&mut self, msg: &Msg, seq: u32) -> Result<(), EncodeError> {
        use sys::*;
        let reserved = msg.size_bound() + MSG_SLACK;
        // Build the libnftnl object first (may fail cleanly), then write it.
        enum Obj {
            Table(Owned<nftnl_table>),
            Chain(Owned<nftnl_chain>),
            Rule(Owned<nftnl_rule>),
            Set(Owned<nftnl_set>),
            Elems(Owned<nftnl_set>),
        }
        let (msg_type, family, flags, obj) = match msg {
            Msg::NewTable { family, name, udata } => {
                let t = new_table(name)?;
                // SAFETY: t is live; udata valid for its length and copied.
                unsafe {
                    nftnl_table_set_u32(t.as_ptr(), NFTNL_TABLE_FLAGS as u16, 0);
                    if !udata.is_empty() {
                        check(
                            nftnl_table_set_data(
                                t.as_ptr(),
                                NFTNL_TABLE_USERDATA as u16,
                                udata.as_ptr() as *const c_void,
                                udata.len() as u32,
                            ),
                            "table",
                            5,
                        )?;
                    }
                }
                (NFT_MSG_NEWTABLE, *family, 0, Obj::Table(t))
            }
            Msg::DelTable { family, name } => (NFT_MSG_DELTABLE, *family, 0, Obj::Table(new_table(name)?)),
            Msg::NewChain { family, table, name, hook } => {
                let c = new_chain(table, name)?;
                if let Some(h) = hook {
                    let ty = cstr(h.chain_type)?;
                    // SAFETY: c is live; the type string is copied.
                    unsafe {
                        check(nftnl_chain_set_str(c.as_ptr(), NFTNL_CHAIN_TYPE as u16, ty.as_ptr()), "chain", 10)?;
                        nftnl_chain_set_u32(c.as_ptr(), NFTNL_CHAIN_HOOKNUM as u16, h.hooknum);
                        nftnl_chain_set_s32(c.as_ptr(), NFTNL_CHAIN_PRIO as u16, h.priority);
                    }
                }
                (NFT_MSG_NEWCHAIN, *family, NLM_F_CREATE, Obj::Chain(c))
            }
            Msg::DelChain { family, table, name } => {
                (NFT_MSG_DELCHAIN, *family, 0, Obj::Chain(new_chain(table, name)?))
            }
            Msg::FlushChain { family, table, chain } => {
                (NFT_MSG_DELRULE, *family, 0, Obj::Rule(new_rule(table, chain)?))
            }
            Msg::NewRule { family, table, chain, exprs } => {
                let r = new_rule(table, chain)?;
                for e in exprs {
                    let x = build_expr(e)?;
                    // SAFETY: both live; the rule takes ownership of the expression.
                    unsafe { nftnl_rule_add_expr(r.as_ptr(), x.into_raw()) };
                }
                (NFT_MSG_NEWRULE, *family, NLM_F_CREATE | NLM_F_APPEND, Obj::Rule(r))
            }
            Msg::NewSet { family, table, set } => {
                // SAFETY: NULL checked by Owned::new.
                let s = Owned::new(unsafe { nftnl_set_alloc() }, free_set, "set")?;
                let (t, n) = (cstr(table)?, cstr(&set.name)?);
                // SAFETY: s is live; strings and byte arrays are copied by libnftnl. For
                // DESC_CONCAT libnftnl 1.2.4 copies `data_len` bytes into a 16-byte array and
                // counts fields up to the first zero, so we pass at most 16 bytes, zero-ended.
                unsafe {
                    let sp = s.as_ptr();
                    check(nftnl_set_set_str(sp, NFTNL_SET_TABLE as u16, t.as_ptr()), "set", 0)?;
                    check(nftnl_set_set_str(sp, NFTNL_SET_NAME as u16, n.as_ptr()), "set", 1)?;
                    nftnl_set_set_u32(sp, NFTNL_SET_FLAGS as u16, set.flags);
                    nftnl_set_set_u32(sp, NFTNL_SET_KEY_TYPE as u16, set.key_type);
                    nftnl_set_set_u32(sp, NFTNL_SET_KEY_LEN as u16, set.key_len);
                    if let Some((dt, dl)) = set.data {
                        nftnl_set_set_u32(sp, NFTNL_SET_DATA_TYPE as u16, dt);
                        nftnl_set_set_u32(sp, NFTNL_SET_DATA_LEN as u16, dl);
                    }
                    nftnl_set_set_u32(sp, NFTNL_SET_ID as u16, set.id);
                    if let Some(t) = set.timeout_ms {
                        nftnl_set_set_u64(sp, NFTNL_SET_TIMEOUT as u16, t);
                    }
                    if !set.desc_concat.is_empty() {
                        let mut fields = [0u8; 16];
                        let n = set.desc_concat.len().min(15);
                        fields[..n].copy_from_slice(&set.desc_concat[..n]);
                        check(
                            nftnl_set_set_data(
                                sp,
                                NFTNL_SET_DESC_CONCAT as u16,
                                fields.as_ptr() as *const c_void,
                                fields.len() as u32,
                            ),
                            "set",
                            16,
                        )?;
                    }
                    if !set.udata.is_empty() {
                        check(
                            nftnl_set_set_data(
                                sp,
                                NFTNL_SET_USERDATA as u16,
                                set.udata.as_ptr() as *const c_void,
                                set.udata.len() as u32,
                            ),
                            "set",
                            13,
                        )?;
                    }
                }
                (NFT_MSG_NEWSET, *family, NLM_F_CREATE, Obj::Set(s))
            }
            Msg::DelSet { family, table, name } => {
                let s = build_elem_set(table, name, None, &[])?;
                (NFT_MSG_DELSET, *family, 0, Obj::Set(s))
            }
            Msg::Elems { delete, family, table, set, set_id, elems } => {
                let s = build_elem_set(table, set, *set_id, elems)?;
                if *delete {
                    (NFT_MSG_DELSETELEM, *family, 0, Obj::Elems(s))
                } else {
                    (NFT_MSG_NEWSETELEM, *family, NLM_F_CREATE, Obj::Elems(s))
                }
            }
        };
        let p = self.reserve(reserved) as *mut c_char;
        // SAFETY: p points to `reserved` zeroed bytes, more than the message can take
        // (Msg::size_bound); the objects are live for the duration of the calls.
        unsafe {
            let nlh = nftnl_nlmsg_build_hdr(p, msg_type, family, flags, seq);
            match &obj {
                Obj::Table(t) => nftnl_table_nlmsg_build_payload(nlh, t.as_ptr()),
                Obj::Chain(c) => nftnl_chain_nlmsg_build_payload(nlh, c.as_ptr()),
                Obj::Rule(r) => nftnl_rule_nlmsg_build_payload(nlh, r.as_ptr()),
                Obj::Set(s) => nftnl_set_nlmsg_build_payload(nlh, s.as_ptr()),
                Obj::Elems(s) => nftnl_set_elems_nlmsg_build_payload(nlh, s.as_ptr()),
            }
        }
        self.commit(reserved);
        Ok(())
    }
}

fn new_table(name: &str) -> Result<Owned<sys::nftnl_table>, EncodeError> {
    // SAFETY: NULL checked; the name is copied.
    let t = Owned::new(unsafe { sys::nftnl_table_alloc() }, free_table, "table")?;
    let n = cstr(name)?;
    check(unsafe { sys::nftnl_table_set_str(t.as_ptr(), sys::NFTNL_TABLE_NAME as u16, n.as_ptr()) }, "table", 0)?;
    Ok(t)
}

fn new_chain(table: &str, name: &str) -> Result<Owned<sys::nftnl_chain>, EncodeError> {
    // SAFETY: NULL checked; strings are copied.
    let c = Owned::new(unsafe { sys::nftnl_chain_alloc() }, free_chain, "chain")?;
    let (t, n) = (cstr(table)?, cstr(name)?);
    unsafe {
        check(sys::nftnl_chain_set_str(c.as_ptr(), sys::NFTNL_CHAIN_TABLE as u16, t.as_ptr()), "chain", 2)?;
        check(sys::nftnl_chain_set_str(c.as_ptr(), sys::NFTNL_CHAIN_NAME as u16, n.as_ptr()), "chain", 0)?;
    }
    Ok(c)
}

fn new_rule(table: &str, chain: &str) -> Result<Owned<sys::nftnl_rule>, EncodeError> {
    // SAFETY: NULL checked; strings are copied.
    let r = Owned::new(unsafe { sys::nftnl_rule_alloc() }, free_rule, "rule")?;
    let (t, c) = (cstr(table)?, cstr(chain)?);
    unsafe {
        check(sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_TABLE as u16, t.as_ptr()), "rule", 1)?;
        check(sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_CHAIN as u16, c.as_ptr()), "rule", 2)?;
    }
    Ok(r)
}

/// A bound `NETLINK_NETFILTER` socket of the network namespace it was opened in.
pub(crate) struct NlSocket {
    sock: mnl::Socket,
    sndbuf: usize,
}

// SAFETY: mnl::Socket wraps a `struct mnl_socket*` (an fd plus its sockaddr) that libmnl never
// touches behind our back; it has no thread affinity. We only use it through `&mut self`.
unsafe impl Send for NlSocket {}

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

fn setsockopt_int(fd: libc::c_int, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &val as *const libc::c_int as *const c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Receive buffer we ask for: errors of a failed batch arrive all at once (one per failing
/// message), and must not be dropped.
const RCVBUF: usize = 8 << 20;

impl NlSocket {
    /// Opens and binds the socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        let sock = mnl::Socket::new(mnl::Bus::Netfilter)?;
        let fd = sock.as_raw_fd();
        // Error replies carry only the failing message's header (not its payload) plus the
        // extended-ack offset of the offending attribute: small, and enough to locate it.
        setsockopt_int(fd, SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        // EXT_ACK is best effort (kernels before 4.12 lack it).
        let _ = setsockopt_int(fd, SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let mut s = NlSocket { sock, sndbuf: 0 };
        s.set_buf(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RCVBUF)?;
        Ok(s)
    }

    fn set_buf(&mut self, force: libc::c_int, plain: libc::c_int, size: usize) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        let v = size.min(libc::c_int::MAX as usize) as libc::c_int;
        // *BUFFORCE needs CAP_NET_ADMIN (which programming nf_tables needs anyway); fall back to
        // the capped plain option so a failure shows up as a clear send error instead.
        setsockopt_int(fd, libc::SOL_SOCKET, force, v).or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, plain, v))
    }

    /// The socket's netlink port id (replies are addressed to it).
    pub(crate) fn portid(&self) -> u32 {
        self.sock.portid()
    }

    /// Sends `buf` as ONE datagram: the kernel only treats BEGIN..END as one transaction when the
    /// whole batch arrives in a single skb. Raises SO_SNDBUF to fit first.
    pub(crate) fn send_batch(&mut self, buf: &[u8]) -> io::Result<()> {
        // netlink_sendmsg refuses messages larger than sk_sndbuf - 32.
        let need = buf.len() + 4096;
        if self.sndbuf < need {
            self.set_buf(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, need)?;
            self.sndbuf = need;
        }
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut c_void, iov_len: buf.len() };
        // SAFETY: zeroed msghdr is valid; it points at live locals for the duration of the call.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_name = &mut addr as *mut libc::sockaddr_nl as *mut c_void;
        mh.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        loop {
            // SAFETY: mh and everything it points to are valid; the kernel only reads `buf`.
            let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &mh, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n as usize != buf.len() {
                return Err(io::Error::other(format!("sendmsg sent {n} of {} bytes", buf.len())));
            }
            return Ok(());
        }
    }

    /// Receives one datagram into `buf`. `timeout` None = do not wait. Returns Ok(None) when
    /// nothing arrived in time, and the datagram's full length (which may exceed `buf.len()`
    /// if it was truncated).
    pub(crate) fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
        let fd = self.sock.as_raw_fd();
        if let Some(t) = timeout {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            let ms = t.as_millis().min(i32::MAX as u128) as libc::c_int;
            loop {
                // SAFETY: one valid pollfd.
                let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
                if rc < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if rc == 0 {
                    return Ok(None);
                }
                break;
            }
        }
        loop {
            // SAFETY: buf is valid for writes of buf.len() bytes.
            let n = unsafe {
                libc::recv(fd, buf.as_mut_ptr() as *mut c_void, buf.len(), libc::MSG_DONTWAIT | libc::MSG_TRUNC)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(None),
                    _ => return Err(e),
                }
            }
            return Ok(Some(n as usize));
        }
    }

    /// Sends a small request that is not part of a batch (the GETGEN barrier).
    pub(crate) fn send_plain(&mut self, buf: &[u8]) -> io::Result<()> {
        self.send_batch(buf)
    }
}

// ---- nfacct (linux/netfilter/nfnetlink_acct.h): named packet/byte counters for `-m nfacct`. ----

pub(crate) const NFNL_SUBSYS_ACCT: u16 = 7;
pub(crate) const NFNL_MSG_ACCT_NEW: u16 = 0;
pub(crate) const NFNL_MSG_ACCT_GET: u16 = 1;
const NFACCT_NAME: u16 = 1;
const NFACCT_PKTS: u16 = 2;
const NFACCT_BYTES: u16 = 3;
/// NFACCT_NAME_MAX (32) including the terminating NUL.
pub(crate) const NFACCT_NAME_MAX: usize = 32;

/// One nfacct request (`NFNL_MSG_ACCT_NEW` or `_GET`) for the object `name`, with an ACK asked
/// for. NEW carries `NLM_F_CREATE` and neither `NLM_F_EXCL` (which makes an existing object
/// EEXIST) nor `NLM_F_REPLACE` (which would zero its counters): the kernel then answers EBUSY for
/// an object that exists, and leaves its counters alone.
pub(crate) fn nfacct_request(cmd: u16, seq: u32, name: &str) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | if cmd == NFNL_MSG_ACCT_NEW { NLM_F_CREATE } else { 0 };
    let mut attrs = Vec::new();
    nla_put_strz(&mut attrs, NFACCT_NAME, name);
    nfnl_message(NFNL_SUBSYS_ACCT, cmd, flags, seq, 0, 0, &attrs)
}

/// One nfnetlink message sent on its own (not in a batch): the netlink header (type
/// `subsys << 8 | msg`), the nfgenmsg (`family`, NFNETLINK_V0, res_id 0), then `attrs`, which
/// [`nla_put`] keeps 4-byte aligned. nf_tables, nfacct and ctnetlink requests alike.
pub(crate) fn nfnl_message(
    subsys: u16,
    msg: u16,
    flags: u16,
    seq: u32,
    portid: u32,
    family: u8,
    attrs: &[u8],
) -> Vec<u8> {
    let len = NFNL_HDRLEN + attrs.len();
    let mut b = Vec::with_capacity(len);
    b.extend((len as u32).to_ne_bytes());
    b.extend(((subsys << 8) | msg).to_ne_bytes());
    b.extend(flags.to_ne_bytes());
    b.extend(seq.to_ne_bytes());
    b.extend(portid.to_ne_bytes());
    b.extend([family, 0, 0, 0]);
    b.extend(attrs);
    b
}

/// Appends one netlink attribute, padded to 4 bytes.
pub(crate) fn nla_put(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    out.extend(((4 + payload.len()) as u16).to_ne_bytes());
    out.extend(ty.to_ne_bytes());
    out.extend(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Appends a NUL-terminated string attribute, padded to 4 bytes.
pub(crate) fn nla_put_strz(out: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend(s.as_bytes());
    v.push(0);
    nla_put(out, ty, &v);
}

/// What one reply datagram says about the request `seq`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct NfacctReply {
    /// (name, packets, bytes) of an object the kernel sent (the answer to GET).
    pub counter: Option<(String, u64, u64)>,
    /// The request's ACK (`Some(0)`) or error (`Some(errno)`): the last message for `seq`.
    pub done: Option<i32>,
}

/// Parses one reply datagram (plain byte reads, any alignment), keeping what belongs to `seq`.
pub(crate) fn parse_nfacct_replies(buf: &[u8], seq: u32, out: &mut NfacctReply) {
    let rd16 = |b: &[u8], at: usize| b.get(at..at + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]));
    let rd32 = |b: &[u8], at: usize| b.get(at..at + 4).map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]));
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let (Some(len), Some(ty), Some(s)) = (rd32(buf, off), rd16(buf, off + 4), rd32(buf, off + 8)) else {
            return;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return;
        }
        let msg = &buf[off..off + len];
        off += len.next_multiple_of(4);
        if s != seq {
            continue;
        }
        if ty == NLMSG_ERROR {
            out.done = Some(-(rd32(msg, NLMSG_HDRLEN).unwrap_or(0) as i32));
        } else if ty == (NFNL_SUBSYS_ACCT << 8) | NFNL_MSG_ACCT_NEW && msg.len() >= NFNL_HDRLEN {
            let (mut name, mut pkts, mut bytes) = (None, None, None);
            let mut a = NFNL_HDRLEN;
            while let (Some(alen), Some(aty)) = (rd16(msg, a), rd16(msg, a + 2)) {
                let alen = alen as usize;
                if alen < 4 || a + alen > msg.len() {
                    break;
                }
                let p = &msg[a + 4..a + alen];
                let be64 = || <[u8; 8]>::try_from(p).ok().map(u64::from_be_bytes);
                match aty & 0x3fff {
                    NFACCT_NAME => name = Some(String::from_utf8_lossy(p).trim_end_matches('\0').to_string()),
                    NFACCT_PKTS => pkts = be64(),
                    NFACCT_BYTES => bytes = be64(),
                    _ => {}
                }
                a += alen.next_multiple_of(4);
            }
            if let (Some(n), Some(p), Some(b)) = (name, pkts, bytes) {
                out.counter = Some((n, p, b));
            }
        }
    }
}

#[cfg(test)]
mod nfacct_tests {
    use super::*;

    fn nlmsg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        b.extend(ty.to_ne_bytes());
        b.extend(0u16.to_ne_bytes());
        b.extend(seq.to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        b.extend(payload);
        b.resize(b.len().next_multiple_of(4), 0);
        b
    }

    fn attr(out: &mut Vec<u8>, ty: u16, p: &[u8]) {
        out.extend(((4 + p.len()) as u16).to_ne_bytes());
        out.extend(ty.to_ne_bytes());
        out.extend(p);
        out.resize(out.len().next_multiple_of(4), 0);
    }

    #[test]
    fn requests_carry_the_name_and_the_flags() {
        let m = nfacct_request(NFNL_MSG_ACCT_NEW, 7, "abcde");
        // 20 bytes of headers, then a 10-byte NAME attribute padded to 12.
        assert_eq!(m.len(), 32);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 0x0700);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(u16::from_ne_bytes(m[20..22].try_into().unwrap()), 10);
        assert_eq!(u16::from_ne_bytes(m[22..24].try_into().unwrap()), NFACCT_NAME);
        assert_eq!(&m[24..30], b"abcde\0");
        let g = nfacct_request(NFNL_MSG_ACCT_GET, 8, "abcd");
        assert_eq!(g.len(), 32, "a 9-byte attribute padded to 12, {g:?}");
        assert_eq!(u16::from_ne_bytes(g[4..6].try_into().unwrap()), 0x0701);
        assert_eq!(u16::from_ne_bytes(g[6..8].try_into().unwrap()), NLM_F_REQUEST | NLM_F_ACK);
    }

    #[test]
    fn a_get_reply_and_its_ack_are_parsed_for_our_seq_only() {
        let mut p = vec![0u8, 0, 0, 0];
        attr(&mut p, NFACCT_NAME, b"ct_state_invalid_dropped_pkts\0");
        attr(&mut p, NFACCT_PKTS, &1234567u64.to_be_bytes());
        attr(&mut p, NFACCT_BYTES, &99u64.to_be_bytes());
        attr(&mut p, 4, &1u32.to_be_bytes()); // NFACCT_USE, ignored
        let mut buf = nlmsg(0x0700, 5, &[0, 0, 0, 0]); // another seq: ignored
        buf.extend(nlmsg(0x0700, 6, &p));
        let mut r = NfacctReply::default();
        parse_nfacct_replies(&buf, 6, &mut r);
        assert_eq!(r.counter, Some(("ct_state_invalid_dropped_pkts".to_string(), 1234567, 99)));
        assert_eq!(r.done, None);
        let mut ack = 0i32.to_ne_bytes().to_vec();
        ack.extend(nlmsg(0x0701, 6, &[])); // the capped original header
        parse_nfacct_replies(&nlmsg(NLMSG_ERROR, 6, &ack), 6, &mut r);
        assert_eq!(r.done, Some(0));
        let mut err = (-libc::ENOENT).to_ne_bytes().to_vec();
        err.extend(nlmsg(0x0701, 9, &[]));
        let mut r = NfacctReply::default();
        parse_nfacct_replies(&nlmsg(NLMSG_ERROR, 9, &err), 9, &mut r);
        assert_eq!(r, NfacctReply { counter: None, done: Some(libc::ENOENT) });
    }
}
