//! Where the rules go: nftables over netlink.
