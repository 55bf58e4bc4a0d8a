//! An in-memory nftables table with real semantics, for tests: applies a `Transaction`
//! all-or-nothing, checks that every referenced chain and set exists, refuses duplicate
//! elements and deletions of missing objects (as the kernel does), and dumps sorted text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::ir::{BaseChain, ElemData, Element, Expr, Rule, SetDef, Verdict};
use crate::model::Family;
use crate::transaction::{Op, Transaction};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Table {
    sets: BTreeMap<String, (SetDef, BTreeSet<Element>)>,
    chains: BTreeMap<String, (Option<BaseChain>, Vec<Rule>)>,
}

/// Why the fake refused a transaction (the whole transaction is then discarded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeError {
    pub op_index: usize,
    pub reason: String,
}

/// One family's fake kernel state: `None` when the table does not exist.
#[derive(Debug, Clone, Default)]
pub struct FakeKernel {
    table: Option<Table>,
    /// Number of transactions applied successfully (empty ones are never sent, so not counted).
    pub applied: usize,
}

fn key_of(e: &Element) -> (Vec<crate::ir::Value>, Option<Vec<crate::ir::Value>>) {
    (e.key.clone(), e.key_end.clone())
}

impl FakeKernel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `tx` atomically: on any error nothing changes.
    pub fn apply(&mut self, tx: &Transaction) -> Result<(), FakeError> {
        let mut t = self.table.clone();
        for (i, op) in tx.ops.iter().enumerate() {
            let err = |reason: String| FakeError { op_index: i, reason };
            if matches!(op, Op::AddTable) {
                t.get_or_insert_with(Table::default);
                continue;
            }
            if matches!(op, Op::DeleteTable) {
                if t.take().is_none() {
                    return Err(err("delete of a missing table".into()));
                }
                continue;
            }
            let tab = t.as_mut().ok_or_else(|| err("table does not exist".into()))?;
            match op {
                Op::AddTable | Op::DeleteTable => unreachable!(),
                Op::AddSet(def) => {
                    if tab.sets.contains_key(&def.name) {
                        return Err(err(format!("set {} exists", def.name)));
                    }
                    tab.sets.insert(def.name.clone(), (def.clone(), BTreeSet::new()));
                }
                Op::DeleteSet(n) => {
                    // As the kernel (EBUSY): a set still used by a rule cannot go.
                    if let Some(c) =
                        tab.chains.iter().find(|(_, (_, rules))| rules.iter().any(|r| r.sets().any(|s| s == n)))
                    {
                        return Err(err(format!("set {n} is in use by chain {}", c.0)));
                    }
                    if tab.sets.remove(n).is_none() {
                        return Err(err(format!("set {n} missing")));
                    }
                }
                Op::AddChain { name, base } => {
                    // `add chain` of an existing chain is not an error in nft.
                    tab.chains.entry(name.clone()).or_insert((*base, Vec::new()));
                }
                Op::FlushChain(n) => {
                    tab.chains.get_mut(n).ok_or_else(|| err(format!("chain {n} missing")))?.1.clear();
                }
                Op::DeleteChain(n) => {
                    // As the kernel (EBUSY): a chain still jumped to cannot go.
                    let jumped =
                        tab.chains.iter().any(|(_, (_, rules))| rules.iter().any(|r| r.chains().any(|c| c == n)));
                    let mapped = tab.sets.values().flat_map(|(_, elems)| elems).any(
                        |e| matches!(&e.data, Some(ElemData::Verdict(Verdict::Jump(c) | Verdict::Goto(c))) if **c == **n),
                    );
                    if jumped || mapped {
                        return Err(err(format!("chain {n} is in use")));
                    }
                    if tab.chains.remove(n).is_none() {
                        return Err(err(format!("chain {n} missing")));
                    }
                }
                Op::AddRule { chain, rule } => {
                    tab.chains
                        .get_mut(chain)
                        .ok_or_else(|| err(format!("chain {chain} missing")))?
                        .1
                        .push(rule.clone());
                }
                Op::AddElements { set, elements } => {
                    let s = &mut tab.sets.get_mut(set).ok_or_else(|| err(format!("set {set} missing")))?.1;
                    for e in elements {
                        if s.iter().any(|x| key_of(x) == key_of(e)) {
                            return Err(err(format!("element {e} exists in {set}")));
                        }
                        s.insert(e.clone());
                    }
                }
                Op::FlushSet { name, .. } => {
                    tab.sets.get_mut(name).ok_or_else(|| err(format!("set {name} missing")))?.1.clear();
                }
                Op::DeleteElements { set, elements } => {
                    let s = &mut tab.sets.get_mut(set).ok_or_else(|| err(format!("set {set} missing")))?.1;
                    for e in elements {
                        let found = s.iter().find(|x| key_of(x) == key_of(e)).cloned();
                        match found {
                            Some(x) => {
                                s.remove(&x);
                            }
                            None => return Err(err(format!("element {e} missing in {set}"))),
                        }
                    }
                }
            }
        }
        if let Some(tab) = &t {
            check_references(tab).map_err(|reason| FakeError { op_index: tx.ops.len(), reason })?;
        }
        self.table = t;
        self.applied += 1;
        Ok(())
    }

    pub fn has_table(&self) -> bool {
        self.table.is_some()
    }

    /// Sorted text dump of the table (sets with sorted elements, chains with their rules).
    pub fn dump(&self, family: Family) -> String {
        let mut out = String::new();
        let Some(t) = &self.table else { return out };
        for (name, (def, elems)) in &t.sets {
            let _ = writeln!(out, "set {name} {{ {def} }}");
            for e in elems {
                let _ = writeln!(out, "  {e}");
            }
        }
        for (name, (base, rules)) in &t.chains {
            match base {
                Some(b) => {
                    let _ = writeln!(out, "chain {name} {{ {b} }}");
                }
                None => {
                    let _ = writeln!(out, "chain {name}");
                }
            }
            for r in rules {
                let _ = writeln!(out, "  {}", r.display(family));
            }
        }
        out
    }
}

fn check_references(t: &Table) -> Result<(), String> {
    let chain_ok = |c: &str| t.chains.contains_key(c);
    for (name, (_, rules)) in &t.chains {
        for r in rules {
            for e in &r.exprs {
                match e {
                    Expr::Verdict(Verdict::Jump(c) | Verdict::Goto(c)) if !chain_ok(c) => {
                        return Err(format!("chain {name} jumps to missing chain {c}"));
                    }
                    Expr::InSet { set, .. }
                    | Expr::Vmap { map: set, .. }
                    | Expr::DnatSlots { map: set, .. }
                    | Expr::SetUpdate { set, .. }
                        if !t.sets.contains_key(set) =>
                    {
                        return Err(format!("chain {name} uses missing set {set}"));
                    }
                    _ => {}
                }
            }
        }
    }
    for (name, (_, elems)) in &t.sets {
        for e in elems {
            if let Some(ElemData::Verdict(Verdict::Jump(c) | Verdict::Goto(c))) = &e.data {
                if !chain_ok(c) {
                    return Err(format!("element {e} of {name} points to missing chain {c}"));
                }
            }
        }
    }
    Ok(())
}
