//! Packet-flow tests: real TCP and UDP packets through the real kernel, in network namespaces,
//! with kproxy programming the node. They need root (CAP_NET_ADMIN) plus iproute2, nft and python3.

#[path = "support/topo.rs"]
mod topo;

use std::net::Ipv4Addr;
use std::time::Duration;

use topo::*;

const T1: Duration = Duration::from_secs(1);

/// The harness alone, with a hand-written nft table instead of kproxy: DNAT from a pod keeps the
/// source, DNAT from outside and from the host network is masqueraded to the address the tests
/// expect. If this fails, the kproxy tests below cannot be trusted either way.
#[test]
fn harness_self_check_with_handwritten_nft() {
    let t = Topo::new();
    let script = format!(
        "table ip kpp-selfcheck {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr 172.30.99.1 tcp dport 80 dnat to {b1}:{ECHO_TCP}
    ip daddr {NODE_IP} tcp dport 30099 meta mark set 0x4000 dnat to {r1}:{ECHO_TCP}
  }}
  chain out {{ type nat hook output priority -100; policy accept;
    ip daddr 172.30.99.1 tcp dport 80 meta mark set 0x4000 dnat to {b2}:{ECHO_TCP}
  }}
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    meta mark 0x4000 masquerade
  }}
}}
",
        b1 = Pod::B1.ip(),
        b2 = Pod::B2.ip(),
        r1 = Pod::R1.ip()
    );
    let mut nft = t.cmd(Host::Node, "nft");
    nft.args(["-f", "-"]);
    let mut child = nft.stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "nft -f of the self-check table failed");

    let cip = Ipv4Addr::new(172, 30, 99, 1);
    let a = t.prober(Host::Pod(Pod::Client)).probe(Proto::Tcp, cip, 80, 5, T1);
    expect_answer(&a, Pod::B1, Pod::Client.ip()).unwrap();
    let a = t.prober(Host::Ext).probe(Proto::Tcp, NODE_IP, 30099, 5, T1);
    expect_answer(&a, Pod::R1, Pod::R1.masqueraded_src()).unwrap();
    let a = t.prober(Host::Node).probe(Proto::Tcp, cip, 80, 5, T1);
    expect_answer(&a, Pod::B2, Pod::B2.masqueraded_src()).unwrap();
    // Without a rule, a ClusterIP is routed out of the default route and never answered.
    let a = t.prober(Host::Pod(Pod::Client)).one(Proto::Tcp, cip, 81, Duration::from_millis(300));
    assert_eq!(a.outcome, Outcome::Timeout);
}
