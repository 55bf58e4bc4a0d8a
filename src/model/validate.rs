//! Owns the small syntax checks conversion relies on: DNS-1123 names, port names, and the
//! lenient ("sloppy") IP parsing upstream applies to every address in a Service or EndpointSlice.
//!
//! These checks are what keep hostile text out of the ruleset: namespace, service and port names
//! end up inside nft chain names and comments, so anything outside `[a-z0-9-.]` is refused here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The longest address text we bother parsing; a real IPv6 address with an embedded, zero-padded
/// IPv4 tail is well under this, and it bounds the work done on garbage.
const MAX_IP_TEXT: usize = 64;

/// RFC 1123 label as Kubernetes checks it (`IsDNS1123Label`): 1-63 chars of `[a-z0-9-]`,
/// starting and ending alphanumeric. Used for namespaces, Service names and port names.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && label_chars_ok(s)
}

/// RFC 1123 subdomain as Kubernetes checks it (`IsDNS1123Subdomain`): at most 253 chars,
/// dot-separated labels of `[a-z0-9-]` that start and end alphanumeric. Used for
/// EndpointSlice and Node names.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| !l.is_empty() && label_chars_ok(l))
}

fn label_chars_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    alnum(b[0]) && alnum(b[b.len() - 1]) && b.iter().all(|&c| alnum(c) || c == b'-')
}

/// A Service or EndpointSlice port name: empty (an unnamed port) or a DNS-1123 label.
///
/// Why DNS-1123 label and not IANA_SVC_NAME (15 chars): the API server validates
/// `Service.spec.ports[].name` and `EndpointSlice.ports[].name` as DNS labels (up to 63 chars);
/// IANA_SVC_NAME is the rule for *container* ports. Refusing 16-63 char names would drop Services
/// the API accepts. Both rules keep nft syntax characters out, which is what matters here.
pub fn is_port_name(s: &str) -> bool {
    s.is_empty() || is_dns1123_label(s)
}

/// Parses an IP address the way upstream's `netutils.ParseIPSloppy` does, plus trimming
/// surrounding whitespace (case 61): IPv4 octets may carry leading zeros and are read as decimal
/// (`172.30.0.041` is 172.30.0.41, not octal), which Rust's strict parser refuses. An
/// IPv4-mapped IPv6 address (`::ffff:1.2.3.4`) is IPv4, as Go's `To4()` makes it.
/// Anything else that is not an address gives `None`.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    let t = s.trim();
    if t.is_empty() || t.len() > MAX_IP_TEXT {
        return None;
    }
    if t.contains(':') {
        let v6 = match t.rsplit_once(':') {
            // An embedded dotted quad may be zero-padded too: normalise it, then parse strictly.
            Some((head, tail)) if tail.contains('.') => {
                let v4 = parse_ipv4_sloppy(tail)?;
                format!("{head}:{v4}").parse::<Ipv6Addr>().ok()?
            }
            _ => t.parse::<Ipv6Addr>().ok()?,
        };
        Some(match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        })
    } else {
        parse_ipv4_sloppy(t).map(IpAddr::V4)
    }
}

/// Four dot-separated decimal fields, each 0-255, leading zeros allowed.
fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut fields = s.split('.');
    for o in octets.iter_mut() {
        let f = fields.next()?;
        if f.is_empty() || !f.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let digits = f.trim_start_matches('0');
        if digits.len() > 3 {
            return None;
        }
        let v: u32 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
        *o = u8::try_from(v).ok()?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<String> {
        parse_ip_sloppy(s).map(|i| i.to_string())
    }

    #[test]
    fn sloppy_ipv4_accepts_leading_zeros_and_whitespace() {
        assert_eq!(ip("172.30.0.041").as_deref(), Some("172.30.0.41"));
        assert_eq!(ip("1.2.3.004").as_deref(), Some("1.2.3.4"));
        assert_eq!(ip("192.168.099.022").as_deref(), Some("192.168.99.22"));
        assert_eq!(ip("10.180.00.001").as_deref(), Some("10.180.0.1"));
        assert_eq!(ip(" 10.0.0.1\t").as_deref(), Some("10.0.0.1"));
        assert_eq!(ip("0000000010.0.0.1").as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn sloppy_ipv4_refuses_garbage() {
        for bad in [
            "",
            " ",
            "1.2.3",
            "1.2.3.4.5",
            "1.2.3.256",
            "1.2.3.-1",
            "1.2.3.4/32",
            "a.b.c.d",
            "1..2.3",
            "1.2.3.4 5",
            "0x1.2.3.4",
            "1.2.3.+4",
            "None",
            "1.2.3.4\"",
            "99999999999999999999.1.1.1",
        ] {
            assert_eq!(ip(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sloppy_ipv6() {
        assert_eq!(ip("fd00:172:30::41").as_deref(), Some("fd00:172:30::41"));
        assert_eq!(ip(" FD00::1 ").as_deref(), Some("fd00::1"));
        assert_eq!(ip("::ffff:1.2.3.004").as_deref(), Some("1.2.3.4"), "v4-mapped is IPv4, as in Go");
        assert_eq!(ip("64:ff9b::10.0.0.01").as_deref(), Some("64:ff9b::a00:1"));
        for bad in ["fe80::1%eth0", ":::", "fd00::1::2", "fd00::g", "[fd00::1]", &"1:".repeat(40)] {
            assert_eq!(ip(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn dns_names() {
        assert!(is_dns1123_label("kube-system"));
        assert!(is_dns1123_label("a"));
        assert!(is_dns1123_label("0abc"));
        assert!(is_dns1123_label(&"a".repeat(63)));
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "a b", "a\"b", "a{b}", "a;b", "a\nb", &"a".repeat(64)] {
            assert!(!is_dns1123_label(bad), "{bad:?}");
        }
        assert!(is_dns1123_subdomain("web-abc12.x"));
        assert!(is_dns1123_subdomain("node-1.example.com"));
        for bad in ["", ".a", "a.", "a..b", "A.b", "a;b", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
    }

    #[test]
    fn port_names() {
        assert!(is_port_name(""));
        assert!(is_port_name("http"));
        assert!(is_port_name("dns-tcp"));
        assert!(is_port_name("a-port-name-longer-than-fifteen"), "API allows DNS labels up to 63");
        for bad in ["HTTP", "-x", "x-", "a b", "a\"", "{a}", "a;", "a/b", &"a".repeat(64)] {
            assert!(!is_port_name(bad), "{bad:?}");
        }
    }
}
