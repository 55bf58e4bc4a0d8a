//! Transactions: the one change type for the kernel, and the pure diff that produces them.
//!
//! A `Transaction` is an ordered list of nft operations on one family's `kube-proxy` table. Its
//! `Display` is an `nft -f` script: the dry-run output, the debug log and the golden format. The
//! netlink backend sends the same operations, in the same order, as one atomic batch.

use std::collections::BTreeSet;
use std::fmt;

use crate::ir::{quote, BaseChain, Element, Rule, Ruleset, SetDef, TABLE, TABLE_COMMENT};
use crate::model::Family;

/// One nft operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `add table` (with the upstream comment); no error if it exists.
    AddTable,
    DeleteTable,
    AddSet(SetDef),
    DeleteSet(String),
    AddChain {
        name: String,
        base: Option<BaseChain>,
    },
    FlushChain(String),
    DeleteChain(String),
    AddRule {
        chain: String,
        rule: Rule,
    },
    AddElements {
        set: String,
        elements: Vec<Element>,
    },
    /// Deletes every element of a set or map (`map` says which, for the text form).
    FlushSet {
        name: String,
        map: bool,
    },
    DeleteElements {
        set: String,
        elements: Vec<Element>,
    },
}

/// An ordered list of operations on one family's table, applied all-or-nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub family: Family,
    pub ops: Vec<Op>,
}

/// Size of a transaction, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxStats {
    pub ops: usize,
    pub elements_added: usize,
    pub elements_removed: usize,
    pub rules_added: usize,
}

impl TxStats {
    /// Adds another transaction's sizes (a sync that sent several).
    pub fn add(&mut self, o: &TxStats) {
        self.ops += o.ops;
        self.elements_added += o.elements_added;
        self.elements_removed += o.elements_removed;
        self.rules_added += o.rules_added;
    }
}

impl Transaction {
    pub fn new(family: Family) -> Self {
        Transaction { family, ops: Vec::new() }
    }
    /// Moves the rules of the base chains this transaction adds into a transaction of their own
    /// (in their order). What is left adds the base chains hooked but empty: nothing else it adds
    /// is reachable from a hook, so traffic meets none of it, and the kernel's check of the table
    /// on commit has nothing to walk (it starts from the base chains).
    pub fn split_off_hook_rules(&mut self) -> Transaction {
        let base: BTreeSet<String> = self
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::AddChain { name, base: Some(_) } => Some(name.clone()),
                _ => None,
            })
            .collect();
        let (hooks, rest) = std::mem::take(&mut self.ops)
            .into_iter()
            .partition(|op| matches!(op, Op::AddRule { chain, .. } if base.contains(chain)));
        self.ops = rest;
        Transaction { family: self.family, ops: hooks }
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn stats(&self) -> TxStats {
        let mut s = TxStats { ops: self.ops.len(), ..Default::default() };
        for op in &self.ops {
            match op {
                Op::AddElements { elements, .. } => s.elements_added += elements.len(),
                Op::DeleteElements { elements, .. } => s.elements_removed += elements.len(),
                Op::AddRule { .. } => s.rules_added += 1,
                _ => {}
            }
        }
        s
    }
}

impl fmt::Display for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fam = self.family.nft();
        for op in &self.ops {
            match op {
                Op::AddTable => writeln!(f, "add table {fam} {TABLE} {{ comment {} ; }}", quote(TABLE_COMMENT))?,
                Op::DeleteTable => writeln!(f, "delete table {fam} {TABLE}")?,
                Op::AddSet(def) => {
                    let kind = if def.is_map() { "map" } else { "set" };
                    writeln!(f, "add {kind} {fam} {TABLE} {} {{ {def} }}", def.name)?
                }
                Op::DeleteSet(name) => writeln!(f, "delete set {fam} {TABLE} {name}")?,
                Op::AddChain { name, base: Some(b) } => writeln!(f, "add chain {fam} {TABLE} {name} {{ {b} }}")?,
                Op::AddChain { name, base: None } => writeln!(f, "add chain {fam} {TABLE} {name}")?,
                Op::FlushChain(name) => writeln!(f, "flush chain {fam} {TABLE} {name}")?,
                Op::DeleteChain(name) => writeln!(f, "delete chain {fam} {TABLE} {name}")?,
                Op::AddRule { chain, rule } => {
                    writeln!(f, "add rule {fam} {TABLE} {chain} {}", rule.display(self.family))?
                }
                Op::AddElements { set, elements } => {
                    for e in elements {
                        writeln!(f, "add element {fam} {TABLE} {set} {{ {e} }}")?;
                    }
                }
                Op::FlushSet { name, map } => {
                    writeln!(f, "flush {} {fam} {TABLE} {name}", if *map { "map" } else { "set" })?
                }
                Op::DeleteElements { set, elements } => {
                    for e in elements {
                        // Deletion needs only the key (and the interval end).
                        let key_only = Element { data: None, comment: None, ..e.clone() };
                        writeln!(f, "delete element {fam} {TABLE} {set} {{ {key_only} }}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Builds the transaction that turns the kernel's table from `applied` into `desired`.
///
/// `applied == None` means "unknown" (start-up, or after a failed apply): the result is a full
/// transaction that creates the table if missing, deletes it with everything in it, and creates
/// the desired table from scratch, all in one batch, so that an old table (ours or upstream
/// kube-proxy's) keeps serving until the new one replaces it atomically.
///
/// Otherwise the result is the minimal ordered change: nothing at all when nothing changed.
pub fn diff(applied: Option<&Ruleset>, desired: &Ruleset) -> Transaction {
    let mut tx = Transaction::new(desired.family);
    let Some(old) = applied else {
        tx.ops.push(Op::AddTable);
        tx.ops.push(Op::DeleteTable);
        tx.ops.push(Op::AddTable);
        create_all(&mut tx, desired);
        return tx;
    };
    assert_eq!(old.family, desired.family, "diff across families");

    // A set whose declaration changed is re-created: delete it (after its users are gone) and add
    // it anew with all its elements. The kernel refuses to delete a set a rule still uses, so a
    // chain using it is flushed and refilled even when its rules are unchanged.
    let recreated: BTreeSet<&String> =
        desired.sets.iter().filter(|(n, d)| old.sets.get(*n).is_some_and(|o| o != *d)).map(|(n, _)| n).collect();
    let uses_recreated =
        |c: &crate::ir::Chain| c.rules.iter().any(|r| r.sets().any(|s| recreated.contains(&s.to_string())));

    // 1. New chains (declarations only, so any rule or element below may reference them).
    for name in &desired.chain_order {
        if !old.chains.contains_key(name) {
            tx.ops.push(Op::AddChain { name: name.to_string(), base: desired.chains[name].base });
        }
    }
    // 2. New sets.
    for name in &desired.set_order {
        if !old.sets.contains_key(name) {
            tx.ops.push(Op::AddSet(desired.sets[name].clone()));
        }
    }
    // 3. Element deletions (before chains they point at go away). A set whose elements `old` did
    // not keep (see `Ruleset::strip_bulk`) is flushed and refilled.
    for name in &old.set_order {
        if !desired.sets.contains_key(name) || recreated.contains(name) {
            continue;
        }
        if old.stripped.contains_key(name) {
            tx.ops.push(Op::FlushSet { name: name.clone(), map: desired.sets[name].is_map() });
            continue;
        }
        let gone: Vec<Element> = old.elements[name].difference(&desired.elements[name]).cloned().collect();
        if !gone.is_empty() {
            tx.ops.push(Op::DeleteElements { set: name.clone(), elements: gone });
        }
    }
    // 4. Chains whose rules changed (or whose hook changed): flush and refill.
    let mut deleted_chains = Vec::new();
    for name in &old.chain_order {
        let o = &old.chains[name];
        match desired.chains.get(name) {
            None => deleted_chains.push(name.clone()),
            Some(d) if d.base != o.base => {
                // A hook cannot be changed in place; such a change is a full resync.
                return diff(None, desired);
            }
            Some(d) if d.rules != o.rules || uses_recreated(o) => tx.ops.push(Op::FlushChain(name.to_string())),
            Some(_) => {}
        }
    }
    // Recreated sets: flush users first is not needed, since users are rules referencing by
    // name and the set is replaced in one transaction; delete then add.
    for name in &recreated {
        tx.ops.push(Op::DeleteSet((*name).clone()));
        tx.ops.push(Op::AddSet(desired.sets[*name].clone()));
    }
    for name in &desired.chain_order {
        let d = &desired.chains[name];
        let changed = match old.chains.get(name) {
            None => true,
            Some(o) => o.rules != d.rules || uses_recreated(o),
        };
        if changed {
            for r in &d.rules {
                tx.ops.push(Op::AddRule { chain: name.to_string(), rule: r.clone() });
            }
        }
    }
    // 5. Element additions.
    for name in &desired.set_order {
        let new_elems: Vec<Element> = match old.elements.get(name) {
            Some(o) if !recreated.contains(name) && !old.stripped.contains_key(name) => {
                desired.elements[name].difference(o).cloned().collect()
            }
            _ => desired.elements[name].iter().cloned().collect(),
        };
        if !new_elems.is_empty() {
            tx.ops.push(Op::AddElements { set: name.clone(), elements: new_elems });
        }
    }
    // 6. Removed chains: flush (drops their references) then delete; then removed sets.
    for name in &deleted_chains {
        tx.ops.push(Op::FlushChain(name.to_string()));
    }
    for name in &deleted_chains {
        tx.ops.push(Op::DeleteChain(name.to_string()));
    }
    for name in &old.set_order {
        if !desired.sets.contains_key(name) {
            tx.ops.push(Op::DeleteSet(name.clone()));
        }
    }
    tx
}

/// Appends the operations that create every object of `rs` in an empty table.
fn create_all(tx: &mut Transaction, rs: &Ruleset) {
    for name in &rs.set_order {
        tx.ops.push(Op::AddSet(rs.sets[name].clone()));
    }
    for name in &rs.chain_order {
        tx.ops.push(Op::AddChain { name: name.to_string(), base: rs.chains[name].base });
    }
    for name in &rs.chain_order {
        for r in &rs.chains[name].rules {
            tx.ops.push(Op::AddRule { chain: name.to_string(), rule: r.clone() });
        }
    }
    for name in &rs.set_order {
        let elems: Vec<Element> = rs.elements[name].iter().cloned().collect();
        if !elems.is_empty() {
            tx.ops.push(Op::AddElements { set: name.clone(), elements: elems });
        }
    }
}

/// The operations that delete kproxy's table of a family (`--cleanup`). Deleting a missing table
/// is not an error: `add` first makes sure it exists.
pub fn cleanup(family: Family) -> Transaction {
    Transaction { family, ops: vec![Op::AddTable, Op::DeleteTable] }
}
