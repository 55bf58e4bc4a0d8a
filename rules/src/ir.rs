//! The typed nftables ruleset IR: sets, maps, chains and rules of one `kube-proxy` table, and the
//! nft text form of every piece.
//!
//! The IR is deliberately small: it holds exactly the constructs kproxy's layout uses, so that
//! the netlink lowering (`src/backend/netlink/`) and the text renderer here cover the same set and
//! cannot drift apart. `Display` of each type is valid `nft -f` syntax.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{Cidr, Family, Protocol, ServicePortName};

/// Name of the table kproxy owns in each family, as upstream: `ip kube-proxy` / `ip6 kube-proxy`.
pub const TABLE: &str = "kube-proxy";
/// kproxy's second table, there only while a restart builds the new ruleset next to the old
/// `kube-proxy` table (the daemon's `Proxier::restart_in_parts`).
pub const RESTART_TABLE: &str = "kproxy-restart";
/// Comment upstream puts on the table.
pub const TABLE_COMMENT: &str = "rules for kube-proxy";

/// A verdict, in a rule or as map data.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    /// The chain's name is shared with the ruleset's key for the chain (see
    /// [`Ruleset::chain_name`]): one copy however many rules and elements name it.
    Jump(Arc<str>),
    Goto(Arc<str>),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

/// A value in a set element key or map data.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Addr(IpAddr),
    Proto(Protocol),
    Port(u16),
    /// A 32-bit integer in host order (numgen results).
    Int(u32),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Addr(a) => write!(f, "{a}"),
            Value::Proto(p) => write!(f, "{p}"),
            Value::Port(p) => write!(f, "{p}"),
            Value::Int(i) => write!(f, "{i}"),
        }
    }
}

/// Data a map element maps its key to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElemData {
    Verdict(Verdict),
    Values(Vec<Value>),
}

/// One set or map element. `key_end` is set for interval elements (`key-key_end`, inclusive).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub key: Vec<Value>,
    pub key_end: Option<Vec<Value>>,
    pub data: Option<ElemData>,
    pub comment: Option<String>,
}

impl Element {
    pub fn key(key: Vec<Value>) -> Self {
        Element { key, key_end: None, data: None, comment: None }
    }
    pub fn with_data(mut self, data: ElemData) -> Self {
        self.data = Some(data);
        self
    }
    pub fn with_comment(mut self, c: impl Into<String>) -> Self {
        self.comment = Some(c.into());
        self
    }
}

fn join_values(f: &mut fmt::Formatter<'_>, vs: &[Value]) -> fmt::Result {
    for (i, v) in vs.iter().enumerate() {
        if i > 0 {
            f.write_str(" . ")?;
        }
        write!(f, "{v}")?;
    }
    Ok(())
}

/// One field of an interval element: `lo` when the range is one value, `addr/len` when it is
/// exactly a prefix (as nft lists it), `lo-hi` otherwise.
fn fmt_range(f: &mut fmt::Formatter<'_>, lo: &Value, hi: &Value) -> fmt::Result {
    if lo == hi {
        return write!(f, "{lo}");
    }
    if let (Value::Addr(a), Value::Addr(b)) = (lo, hi) {
        if let Some(c) = prefix_of(*a, *b) {
            return write!(f, "{c}");
        }
    }
    write!(f, "{lo}-{hi}")
}

/// The prefix whose first and last addresses are `lo` and `hi`, if there is one.
pub fn prefix_of(lo: IpAddr, hi: IpAddr) -> Option<Cidr> {
    let (a, b, bits) = match (lo, hi) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32u32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128u32),
        _ => return None,
    };
    let host = a ^ b;
    // hi - lo must be all ones in the low bits, lo all zeros there, hi all ones.
    if host.checked_add(1).is_some_and(|n| !n.is_power_of_two()) || a & host != 0 || b & host != host {
        return None;
    }
    let len = bits - (128 - host.leading_zeros());
    Some(Cidr { addr: lo, len: len as u8 })
}

/// The first and last address of a prefix: the key and key end of its interval element.
pub fn prefix_range(c: &Cidr) -> (IpAddr, IpAddr) {
    match c.addr {
        IpAddr::V4(a) => {
            let host = if c.len == 0 { u32::MAX } else { (1u32 << (32 - c.len as u32)).wrapping_sub(1) };
            (c.addr, IpAddr::V4((u32::from(a) | host).into()))
        }
        IpAddr::V6(a) => {
            let host = if c.len == 0 { u128::MAX } else { (1u128 << (128 - c.len as u32)).wrapping_sub(1) };
            (c.addr, IpAddr::V6((u128::from(a) | host).into()))
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key_end {
            None => join_values(f, &self.key)?,
            // A concatenated range is a range per field (`a . b-c . d/8`), never `a . b-c . d`.
            Some(end) if end.len() == self.key.len() => {
                for (i, (lo, hi)) in self.key.iter().zip(end).enumerate() {
                    if i > 0 {
                        f.write_str(" . ")?;
                    }
                    fmt_range(f, lo, hi)?;
                }
            }
            Some(end) => {
                join_values(f, &self.key)?;
                f.write_str("-")?;
                join_values(f, end)?;
            }
        }
        if let Some(c) = &self.comment {
            write!(f, " comment {}", quote(c))?;
        }
        match &self.data {
            None => Ok(()),
            Some(ElemData::Verdict(v)) => write!(f, " : {v}"),
            Some(ElemData::Values(vs)) => {
                f.write_str(" : ")?;
                join_values(f, vs)
            }
        }
    }
}

/// nft data types used in set and map declarations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataType {
    Ipv4Addr,
    Ipv6Addr,
    InetProto,
    InetService,
    Verdict,
}

impl DataType {
    pub fn addr(family: Family) -> DataType {
        match family {
            Family::V4 => DataType::Ipv4Addr,
            Family::V6 => DataType::Ipv6Addr,
        }
    }
    pub fn nft(self) -> &'static str {
        match self {
            DataType::Ipv4Addr => "ipv4_addr",
            DataType::Ipv6Addr => "ipv6_addr",
            DataType::InetProto => "inet_proto",
            DataType::InetService => "inet_service",
            DataType::Verdict => "verdict",
        }
    }
}

/// How a set's key (and a map's data) are declared.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetType {
    /// `type a . b . c [: data]`
    Typed { key: Vec<DataType>, data: Option<DataType> },
    /// The endpoint map of one protocol's ports: `typeof numgen random mod 1 : ip daddr . tcp
    /// dport` (ip6 for IPv6; udp, sctp). Keys are numgen slots, data is the endpoint `addr . port`
    /// to DNAT to. The data names the protocol (not `th dport`) because `nft`, given a rule
    /// `meta l4proto tcp dnat ... map @m` for a map it reads back from the kernel, refuses a
    /// `th dport` typeof as conflicting with tcp (nft 1.0.6): per-protocol maps keep kproxy's
    /// printed transactions valid `nft -f` input against a live table.
    EndpointSlots { family: Family, proto: Protocol },
    /// A ClientIP affinity set: `type ipv4_addr ; flags dynamic,timeout ; timeout Ns ;` (ipv6_addr
    /// for IPv6). The packet path adds client addresses to it; `timeout` is in seconds.
    Affinity { family: Family, timeout: u32 },
}

/// A named set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDef {
    pub name: String,
    pub set_type: SetType,
    pub interval: bool,
}

impl SetDef {
    pub fn is_map(&self) -> bool {
        match &self.set_type {
            SetType::Typed { data, .. } => data.is_some(),
            SetType::EndpointSlots { .. } => true,
            SetType::Affinity { .. } => false,
        }
    }
}

impl fmt::Display for SetDef {
    /// The body of `add set|map <family> kube-proxy NAME { ... }`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.set_type {
            SetType::Typed { key, data } => {
                f.write_str("type ")?;
                for (i, t) in key.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" . ")?;
                    }
                    f.write_str(t.nft())?;
                }
                if let Some(d) = data {
                    write!(f, " : {}", d.nft())?;
                }
            }
            SetType::EndpointSlots { family, proto } => {
                write!(f, "typeof numgen random mod 1 : {} daddr . {} dport", family.nft(), proto.lower())?;
            }
            SetType::Affinity { family, timeout } => {
                write!(f, "type {} ; flags dynamic,timeout ; timeout {timeout}s", DataType::addr(*family).nft())?;
            }
        }
        f.write_str(" ;")?;
        if self.interval {
            f.write_str(" flags interval ;")?;
        }
        Ok(())
    }
}

/// A base chain's hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    pub chain_type: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub fn nft(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

impl fmt::Display for BaseChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = match self.chain_type {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        };
        write!(f, "type {t} hook {} priority {} ;", self.hook.nft(), self.priority)
    }
}

/// What a match reads from the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    /// `ip saddr` / `ip6 saddr`
    Saddr,
    /// `ip daddr` / `ip6 daddr`
    Daddr,
    /// `meta l4proto`
    L4Proto,
    /// `th dport` (any transport header; the protocol is matched separately)
    ThDport,
    /// `tcp dport` / `udp dport` / `sctp dport`: implies a `meta l4proto` match.
    Dport(Protocol),
}

impl Selector {
    fn fmt_in(&self, f: &mut fmt::Formatter<'_>, family: Family) -> fmt::Result {
        match self {
            Selector::Saddr => write!(f, "{} saddr", family.nft()),
            Selector::Daddr => write!(f, "{} daddr", family.nft()),
            Selector::L4Proto => f.write_str("meta l4proto"),
            Selector::ThDport => f.write_str("th dport"),
            Selector::Dport(p) => write!(f, "{p} dport"),
        }
    }
}

/// The right-hand side of a comparison.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operand {
    Value(Value),
    Prefix(Cidr),
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Value(v) => write!(f, "{v}"),
            Operand::Prefix(c) => write!(f, "{c}"),
        }
    }
}

/// One match or statement of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `SEL [!=] VALUE`
    Cmp {
        sel: Selector,
        neq: bool,
        right: Operand,
    },
    /// `SEL . SEL ... [!=] @set`
    InSet {
        key: Vec<Selector>,
        set: String,
        neq: bool,
    },
    /// `SEL . SEL ... vmap @map`
    Vmap {
        key: Vec<Selector>,
        map: String,
    },
    /// `ct state new`
    CtStateNew,
    /// `ct status dnat`
    CtStatusDnat,
    /// `fib daddr type local`
    FibDaddrLocal,
    /// `fib saddr type local`: the packet comes from one of this node's own addresses.
    FibSaddrLocal,
    /// `meta mark & MASK == 0`
    MarkClear(u32),
    /// `meta mark set meta mark | BITS`
    MarkOr(u32),
    /// `meta mark set meta mark ^ BITS`
    MarkXor(u32),
    /// `meta l4proto PROTO dnat ip to numgen random mod MODULUS offset OFFSET map @MAP`
    DnatSlots {
        proto: Protocol,
        modulus: u32,
        offset: u32,
        map: String,
    },
    /// `meta l4proto PROTO dnat ip to ADDR:PORT` (`[ADDR]:PORT` in ip6): a fixed endpoint.
    Dnat {
        proto: Protocol,
        addr: IpAddr,
        port: u16,
    },
    /// `numgen random mod MODULUS == VALUE`: true with probability 1/MODULUS, drawn anew per rule.
    NumgenEq {
        modulus: u32,
        value: u32,
    },
    /// `update @SET { SEL . SEL ... }`: adds the key to a dynamic set, or restarts its timeout.
    SetUpdate {
        key: Vec<Selector>,
        set: String,
    },
    /// `iifname [!=] "NAME"`, or with `prefix` `iifname [!=] "NAME*"` (any interface whose name
    /// starts with NAME).
    Iifname {
        name: String,
        prefix: bool,
        neq: bool,
    },
    /// `masquerade fully-random`
    Masquerade,
    /// `reject` (ICMP / ICMPv6 port unreachable)
    Reject,
    Verdict(Verdict),
}

/// A rule: a sequence of matches and statements, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub exprs: Vec<Expr>,
}

impl Rule {
    pub fn new(exprs: Vec<Expr>) -> Self {
        Rule { exprs }
    }
    /// The named sets and maps the rule reads or writes.
    pub fn sets(&self) -> impl Iterator<Item = &str> + '_ {
        self.exprs.iter().filter_map(|e| match e {
            Expr::InSet { set, .. } | Expr::Vmap { map: set, .. } | Expr::DnatSlots { map: set, .. } => {
                Some(set.as_str())
            }
            Expr::SetUpdate { set, .. } => Some(set.as_str()),
            _ => None,
        })
    }
    /// The chains the rule jumps or goes to.
    pub fn chains(&self) -> impl Iterator<Item = &str> + '_ {
        self.exprs.iter().filter_map(|e| match e {
            Expr::Verdict(Verdict::Jump(c) | Verdict::Goto(c)) => Some(&**c),
            _ => None,
        })
    }
    /// The rule as nft text, in the given family.
    pub fn display(&self, family: Family) -> RuleText<'_> {
        RuleText { rule: self, family }
    }
}

/// `Display` adapter for a rule in a family.
pub struct RuleText<'a> {
    rule: &'a Rule,
    family: Family,
}

fn fmt_key(f: &mut fmt::Formatter<'_>, key: &[Selector], family: Family) -> fmt::Result {
    for (i, s) in key.iter().enumerate() {
        if i > 0 {
            f.write_str(" . ")?;
        }
        s.fmt_in(f, family)?;
    }
    Ok(())
}

impl fmt::Display for RuleText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fam = self.family;
        for (i, e) in self.rule.exprs.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match e {
                Expr::Cmp { sel, neq, right } => {
                    sel.fmt_in(f, fam)?;
                    write!(f, " {}{right}", if *neq { "!= " } else { "" })?;
                }
                Expr::InSet { key, set, neq } => {
                    fmt_key(f, key, fam)?;
                    write!(f, " {}@{set}", if *neq { "!= " } else { "" })?;
                }
                Expr::Vmap { key, map } => {
                    fmt_key(f, key, fam)?;
                    write!(f, " vmap @{map}")?;
                }
                Expr::CtStateNew => f.write_str("ct state new")?,
                Expr::CtStatusDnat => f.write_str("ct status dnat")?,
                Expr::FibDaddrLocal => f.write_str("fib daddr type local")?,
                Expr::FibSaddrLocal => f.write_str("fib saddr type local")?,
                Expr::MarkClear(m) => write!(f, "meta mark & {m:#010x} == 0")?,
                Expr::MarkOr(m) => write!(f, "meta mark set meta mark | {m:#010x}")?,
                Expr::MarkXor(m) => write!(f, "meta mark set meta mark ^ {m:#010x}")?,
                Expr::DnatSlots { proto, modulus, offset, map } => write!(
                    f,
                    "meta l4proto {proto} dnat {} to numgen random mod {modulus} offset {offset} map @{map}",
                    fam.nft()
                )?,
                Expr::Dnat { proto, addr, port } => match addr {
                    IpAddr::V4(a) => write!(f, "meta l4proto {proto} dnat ip to {a}:{port}")?,
                    IpAddr::V6(a) => write!(f, "meta l4proto {proto} dnat ip6 to [{a}]:{port}")?,
                },
                Expr::NumgenEq { modulus, value } => write!(f, "numgen random mod {modulus} == {value}")?,
                Expr::SetUpdate { key, set } => {
                    write!(f, "update @{set} {{ ")?;
                    fmt_key(f, key, fam)?;
                    f.write_str(" }")?;
                }
                Expr::Masquerade => f.write_str("masquerade fully-random")?,
                Expr::Reject => f.write_str("reject")?,
                Expr::Iifname { name, prefix, neq } => {
                    write!(f, "iifname {}\"{name}{}\"", if *neq { "!= " } else { "" }, if *prefix { "*" } else { "" })?
                }
                Expr::Verdict(v) => write!(f, "{v}")?,
            }
        }
        Ok(())
    }
}

/// A chain: regular or base, with its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

/// One family's whole `kube-proxy` table as kproxy wants it.
///
/// `sets` and `chains` keep insertion order through `order`, because the kernel lists objects in
/// the order they were created, and a full transaction creates them in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    pub sets: BTreeMap<String, SetDef>,
    pub elements: BTreeMap<String, std::collections::BTreeSet<Element>>,
    /// Keyed by the names `chain_order` holds too (one shared string per chain).
    pub chains: BTreeMap<Arc<str>, Chain>,
    /// Creation order of sets (first) and chains (second).
    pub set_order: Vec<String>,
    pub chain_order: Vec<Arc<str>>,
    /// Endpoint slot block of every service port's cluster endpoints (see
    /// `build::SLOTS_PER_SERVICE`).
    pub slots: BTreeMap<ServicePortName, u32>,
    /// Slot block of the local endpoints of every service port with a Local traffic policy.
    pub local_slots: BTreeMap<ServicePortName, u32>,
    /// What partial builds need to know (see `build::build_partial`).
    pub book: crate::build::Book,
    /// Sets whose elements this copy does not keep, with their element count (see
    /// [`Ruleset::strip_bulk`]).
    pub stripped: BTreeMap<String, usize>,
}

/// Whether a set holds per-endpoint data (the endpoint slot maps and the hairpin set): the bulk of
/// a large ruleset, which partial builds never need to read back.
pub fn is_bulk_set(def: &SetDef) -> bool {
    matches!(def.set_type, SetType::EndpointSlots { .. }) || def.name == crate::names::HAIRPIN_SET
}

impl Ruleset {
    pub fn new(family: Family) -> Self {
        Ruleset {
            family,
            sets: BTreeMap::new(),
            elements: BTreeMap::new(),
            chains: BTreeMap::new(),
            set_order: Vec::new(),
            chain_order: Vec::new(),
            slots: BTreeMap::new(),
            local_slots: BTreeMap::new(),
            book: Default::default(),
            stripped: BTreeMap::new(),
        }
    }

    /// Forgets the elements of the bulk sets ([`is_bulk_set`]), keeping their count: a ruleset
    /// kept as "what the kernel holds" needs them only for a full diff, which then flushes and
    /// refills those sets instead (at 10k services x 10 endpoints they are 200k of 220k elements,
    /// some 60 MiB). Sets added later by [`Ruleset::apply_ops`] are stripped too.
    pub fn strip_bulk(&mut self) {
        for (name, def) in &self.sets {
            if is_bulk_set(def) {
                if let Some(e) = self.elements.get_mut(name) {
                    self.stripped.insert(name.clone(), e.len());
                    *e = Default::default();
                }
            }
        }
    }
    /// A copy laid out densely ([`crate::model::dense`]), for keeping after a large sync.
    pub fn dense_copy(&self) -> Ruleset {
        use crate::model::{dense, dense_set};
        Ruleset {
            family: self.family,
            sets: dense(&self.sets),
            elements: self.elements.iter().map(|(k, v)| (k.clone(), dense_set(v))).collect(),
            chains: dense(&self.chains),
            set_order: self.set_order.clone(),
            chain_order: self.chain_order.clone(),
            slots: dense(&self.slots),
            local_slots: dense(&self.local_slots),
            book: self.book.dense_copy(),
            stripped: self.stripped.clone(),
        }
    }
    pub fn add_set(&mut self, def: SetDef) {
        self.set_order.push(def.name.clone());
        self.elements.insert(def.name.clone(), Default::default());
        self.sets.insert(def.name.clone(), def);
    }
    pub fn add_element(&mut self, set: &str, e: Element) {
        self.elements.get_mut(set).unwrap_or_else(|| panic!("set {set} not declared")).insert(e);
    }
    /// The ruleset's own copy of chain `name`'s name when the chain is declared (a new one
    /// otherwise), for verdicts that name it: at 50k Services the `goto` of each `service-ips`
    /// element held a copy of its chain's name, ~3 MiB of what a synced node keeps.
    pub fn chain_name(&self, name: &str) -> Arc<str> {
        self.chains.get_key_value(name).map_or_else(|| Arc::from(name), |(k, _)| k.clone())
    }
    pub fn add_chain(&mut self, name: &str, base: Option<BaseChain>) {
        let name: Arc<str> = Arc::from(name);
        self.chain_order.push(name.clone());
        self.chains.insert(name, Chain { base, rules: Vec::new() });
    }
    /// Adds a rule; its verdicts name their chains with this ruleset's copies of the names.
    pub fn add_rule(&mut self, chain: &str, mut exprs: Vec<Expr>) {
        self.share_verdict_names(&mut exprs);
        self.chains.get_mut(chain).unwrap_or_else(|| panic!("chain {chain} not declared")).rules.push(Rule::new(exprs));
    }
    /// Applies a transaction's operations, as the kernel does (the caller applied it there first).
    /// Objects keep their creation order; new ones go last.
    pub fn apply_ops(&mut self, tx: &crate::transaction::Transaction) {
        use crate::transaction::Op;
        for op in &tx.ops {
            match op {
                Op::AddTable => {}
                Op::DeleteTable => *self = Ruleset::new(self.family),
                Op::AddSet(def) => {
                    if !self.sets.contains_key(&def.name) {
                        self.add_set(def.clone());
                        if !self.stripped.is_empty() && is_bulk_set(def) {
                            self.stripped.insert(def.name.clone(), 0);
                        }
                    }
                }
                Op::DeleteSet(name) => {
                    self.sets.remove(name);
                    self.elements.remove(name);
                    self.stripped.remove(name);
                    self.set_order.retain(|n| n != name);
                }
                Op::FlushSet { name, .. } => {
                    if let Some(n) = self.stripped.get_mut(name) {
                        *n = 0;
                    }
                    if let Some(e) = self.elements.get_mut(name) {
                        e.clear();
                    }
                }
                Op::AddChain { name, base } => {
                    if !self.chains.contains_key(name.as_str()) {
                        self.add_chain(name, *base);
                    }
                }
                Op::FlushChain(name) => {
                    if let Some(c) = self.chains.get_mut(name.as_str()) {
                        c.rules.clear();
                    }
                }
                Op::DeleteChain(name) => {
                    self.chains.remove(name.as_str());
                    self.chain_order.retain(|n| **n != **name);
                }
                Op::AddRule { chain, rule } => {
                    let rule = self.shared_names_rule(rule);
                    if let Some(c) = self.chains.get_mut(chain.as_str()) {
                        c.rules.push(rule);
                    }
                }
                Op::AddElements { set, elements } => {
                    if let Some(n) = self.stripped.get_mut(set) {
                        *n += elements.len();
                    } else if self.elements.contains_key(set) {
                        let elements: Vec<Element> = elements.iter().map(|e| self.shared_names_element(e)).collect();
                        if let Some(s) = self.elements.get_mut(set) {
                            s.extend(elements);
                        }
                    }
                }
                Op::DeleteElements { set, elements } => {
                    if let Some(n) = self.stripped.get_mut(set) {
                        *n = n.saturating_sub(elements.len());
                    } else if let Some(s) = self.elements.get_mut(set) {
                        for e in elements {
                            s.remove(e);
                        }
                    }
                }
            }
        }
    }

    /// `v` naming its chain with this ruleset's copy of the name (see [`Ruleset::chain_name`]).
    fn shared_name(&self, v: &Verdict) -> Verdict {
        match v {
            Verdict::Jump(c) => Verdict::Jump(self.chain_name(c)),
            Verdict::Goto(c) => Verdict::Goto(self.chain_name(c)),
            other => other.clone(),
        }
    }
    /// A copy of `e` whose verdict names its chain with this ruleset's copy of the name: what a
    /// transaction carries was built elsewhere, and a kept copy of its name would outlive it.
    fn shared_names_element(&self, e: &Element) -> Element {
        match &e.data {
            Some(ElemData::Verdict(v)) => Element { data: Some(ElemData::Verdict(self.shared_name(v))), ..e.clone() },
            _ => e.clone(),
        }
    }
    /// Points the verdicts among `exprs` at this ruleset's copies of their chains' names.
    fn share_verdict_names(&self, exprs: &mut [Expr]) {
        for x in exprs {
            if let Expr::Verdict(v) = x {
                *v = self.shared_name(v);
            }
        }
    }
    /// [`Ruleset::shared_names_element`] for a rule's verdicts.
    fn shared_names_rule(&self, r: &Rule) -> Rule {
        let mut r = r.clone();
        self.share_verdict_names(&mut r.exprs);
        r
    }

    /// Number of set/map elements over all sets.
    pub fn element_count(&self) -> usize {
        self.elements.values().map(|s| s.len()).sum::<usize>() + self.stripped.values().sum::<usize>()
    }
}

/// Quotes a string for nft. Inputs are validated upstream of here; this still escapes nothing
/// and strips the characters nft cannot carry inside a quoted string, so that no input can ever
/// break out of a comment.
pub fn quote(s: &str) -> String {
    let clean: String = s.chars().filter(|c| *c != '"' && *c != '\\' && !c.is_control()).collect();
    format!("\"{clean}\"")
}
