//! kproxy's pure core: the cluster model, the nftables ruleset IR, `build` (model → ruleset),
//! `diff` (applied + desired → transaction) and the nft text form. No I/O, no clock, no async.

pub mod build;
pub mod conntrack;
pub mod fake;
pub mod health;
pub mod iptables;
pub mod ir;
pub mod model;
pub mod names;
pub mod synthetic;
pub mod transaction;

pub use build::{build, Built};
pub use transaction::{diff, Op, Transaction};
