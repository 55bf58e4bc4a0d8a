//! Where the rules go: nftables over netlink, or iptables-restore (`iptables`). `nftables` is the safe API the daemon uses,
//! `lower` turns the rules IR into nf_tables messages, `netlink` (the only module allowed
//! `unsafe`) serializes them with libnftnl and talks to the kernel.

pub mod conntrack;
pub mod iptables;
mod lower;
mod netlink;
pub mod nfacct;
pub mod nftables;
