//! Stale UDP conntrack flows, listed and deleted over ctnetlink (no `conntrack` subprocess).
//!
//! `rules::conntrack` decides which flows are stale; this lists a family's UDP flows (one
//! `IPCTNL_MSG_CT_GET` dump) and deletes the stale ones by their original tuple
//! (`IPCTNL_MSG_CT_DELETE`, many requests per datagram, one ACK each). A flow that vanished
//! between the dump and the delete (ENOENT) is not an error. Messages are built and parsed here in
//! safe code; `netlink::NlSocket` owns the socket.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use rules::conntrack::{StaleUdpFlows, UdpFlow};
use rules::model::Family;

use super::lower::nfproto;
use super::netlink::{nfnl_message, nla_put, NlSocket};

// linux/netlink.h, linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h.
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;
const ENOENT: i32 = 2;

/// Receive buffer: one dump datagram is at most a few pages; MSG_TRUNC catches a larger one.
const RECV_BUF: usize = 256 * 1024;
/// Delete requests are sent in datagrams of about this size.
const DELETE_CHUNK: usize = 32 * 1024;
/// How long to wait for the kernel's next reply datagram before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why listing or deleting conntrack flows failed (the rules are unaffected).
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("opening the netlink socket: {0}")]
    Open(#[source] io::Error),
    #[error("listing conntrack flows: {0}")]
    List(#[source] io::Error),
    #[error("deleting conntrack flows: {0}")]
    Delete(#[source] io::Error),
}

/// One conntrack entry as listed: its original tuple (which identifies it for deletion), the
/// reply source and the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    pub proto: u8,
    pub orig_src: IpAddr,
    pub orig_dst: IpAddr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub zone: Option<u16>,
}

impl CtEntry {
    fn flow(&self) -> UdpFlow {
        UdpFlow { orig_dst: self.orig_dst, orig_dport: self.orig_dport, reply_src: self.reply_src }
    }
}

/// A ctnetlink socket of the network namespace it was opened in.
pub struct ConntrackCleaner {
    sock: NlSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl ConntrackCleaner {
    /// Opens a socket in the calling thread's network namespace.
    pub fn new() -> Result<Self, ConntrackError> {
        let sock = NlSocket::open().map_err(ConntrackError::Open)?;
        Ok(ConntrackCleaner { sock, seq: 1, buf: vec![0; RECV_BUF] })
    }

    /// Deletes the UDP flows of `family` that `stale` calls stale (cases 102-105); returns how
    /// many were deleted. Lists nothing when no UDP frontend has endpoints.
    pub fn clean_stale_udp(&mut self, family: Family, stale: &StaleUdpFlows) -> Result<usize, ConntrackError> {
        if stale.is_empty() {
            return Ok(0);
        }
        let gone: Vec<CtEntry> = self.list_udp(family)?.into_iter().filter(|e| stale.is_stale(&e.flow())).collect();
        self.delete(family, &gone)
    }

    /// Every UDP conntrack entry of `family`.
    pub fn list_udp(&mut self, family: Family) -> Result<Vec<CtEntry>, ConntrackError> {
        let seq = self.next_seq();
        let req = message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, &[]);
        self.sock.send_plain(&req).map_err(ConntrackError::List)?;
        let mut out = Vec::new();
        loop {
            let n = self.recv().map_err(ConntrackError::List)?;
            for (ty, s, payload) in messages(&self.buf[..n]) {
                if s != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = error_code(payload);
                        if errno != 0 {
                            return Err(ConntrackError::List(io::Error::from_raw_os_error(errno)));
                        }
                    }
                    _ => {
                        if let Some(e) = parse_entry(payload.get(NFGEN_HDRLEN..).unwrap_or(&[])) {
                            if e.proto == IPPROTO_UDP {
                                out.push(e);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Deletes `entries` by their original tuple; returns how many the kernel deleted.
    pub fn delete(&mut self, family: Family, entries: &[CtEntry]) -> Result<usize, ConntrackError> {
        let mut deleted = 0;
        let mut i = 0;
        while i < entries.len() {
            let first = self.seq;
            let mut buf = Vec::new();
            while i < entries.len() && buf.len() < DELETE_CHUNK {
                let seq = self.next_seq();
                buf.extend(message(
                    IPCTNL_MSG_CT_DELETE,
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    family,
                    &delete_attrs(&entries[i]),
                ));
                i += 1;
            }
            let last = self.seq - 1;
            self.sock.send_plain(&buf).map_err(ConntrackError::Delete)?;
            let mut pending = (last - first + 1) as usize;
            while pending > 0 {
                let n = self.recv().map_err(ConntrackError::Delete)?;
                for (ty, s, payload) in messages(&self.buf[..n]) {
                    if ty != NLMSG_ERROR || s < first || s > last {
                        continue;
                    }
                    pending -= 1;
                    match error_code(payload) {
                        0 => deleted += 1,
                        ENOENT => {}
                        e => return Err(ConntrackError::Delete(io::Error::from_raw_os_error(e))),
                    }
                }
            }
        }
        Ok(deleted)
    }

    fn next_seq(&mut self) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1).max(1);
        s
    }

    fn recv(&mut self) -> io::Result<usize> {
        match self.sock.recv(&mut self.buf, Some(REPLY_TIMEOUT))? {
            None => Err(io::Error::new(io::ErrorKind::TimedOut, "no reply from the kernel")),
            Some(n) if n > self.buf.len() => Err(io::Error::other(format!("reply of {n} bytes truncated"))),
            Some(n) => Ok(n),
        }
    }
}

/// One ctnetlink message: header, nfgenmsg, attributes.
fn message(kind: u16, flags: u16, seq: u32, family: Family, attrs: &[u8]) -> Vec<u8> {
    nfnl_message(NFNL_SUBSYS_CTNETLINK, kind, flags, seq, 0, nfproto(family) as u8, attrs)
}

fn nested(out: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    f(&mut inner);
    nla_put(out, ty | NLA_F_NESTED, &inner);
}

fn addr_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The attributes of a delete request: the original tuple, and the zone when not the default.
fn delete_attrs(e: &CtEntry) -> Vec<u8> {
    let (src_t, dst_t) =
        if e.orig_src.is_ipv4() { (CTA_IP_V4_SRC, CTA_IP_V4_DST) } else { (CTA_IP_V6_SRC, CTA_IP_V6_DST) };
    let mut out = Vec::new();
    nested(&mut out, CTA_TUPLE_ORIG, |t| {
        nested(t, CTA_TUPLE_IP, |a| {
            nla_put(a, src_t, &addr_bytes(&e.orig_src));
            nla_put(a, dst_t, &addr_bytes(&e.orig_dst));
        });
        nested(t, CTA_TUPLE_PROTO, |p| {
            nla_put(p, CTA_PROTO_NUM, &[e.proto]);
            nla_put(p, CTA_PROTO_SRC_PORT, &e.orig_sport.to_be_bytes());
            nla_put(p, CTA_PROTO_DST_PORT, &e.orig_dport.to_be_bytes());
        });
    });
    if let Some(z) = e.zone {
        nla_put(&mut out, CTA_ZONE, &z.to_be_bytes());
    }
    out
}

/// The netlink messages of one datagram: (type, seq, payload after the header).
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().ok()?);
        let payload = &buf[NLMSG_HDRLEN..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, seq, payload))
    })
}

/// The (positive) errno of an NLMSG_ERROR payload; 0 for an ACK.
fn error_code(payload: &[u8]) -> i32 {
    payload.get(0..4).map_or(0, |b| -i32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

/// The attributes of a buffer: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        if len < 4 || len > buf.len() {
            return None;
        }
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, payload))
    })
}

fn find(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

fn parse_ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
        _ => None,
    }
}

/// (proto, src, dst, sport, dport) of a CTA_TUPLE_* payload.
fn parse_tuple(t: &[u8]) -> Option<(u8, IpAddr, IpAddr, u16, u16)> {
    let ip = find(t, CTA_TUPLE_IP)?;
    let (src, dst) = match (find(ip, CTA_IP_V4_SRC), find(ip, CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (parse_ip(s)?, parse_ip(d)?),
        _ => (parse_ip(find(ip, CTA_IP_V6_SRC)?)?, parse_ip(find(ip, CTA_IP_V6_DST)?)?),
    };
    let proto = find(t, CTA_TUPLE_PROTO)?;
    let num = *find(proto, CTA_PROTO_NUM)?.first()?;
    let port = |ty| find(proto, ty).and_then(|b| Some(u16::from_be_bytes(b.get(0..2)?.try_into().ok()?)));
    // Protocols without ports (ICMP) have none: 0 is fine, they are never UDP.
    Some((num, src, dst, port(CTA_PROTO_SRC_PORT).unwrap_or(0), port(CTA_PROTO_DST_PORT).unwrap_or(0)))
}

/// A CT_NEW message body (after nfgenmsg) as an entry; None when malformed.
fn parse_entry(body: &[u8]) -> Option<CtEntry> {
    let (proto, orig_src, orig_dst, orig_sport, orig_dport) = parse_tuple(find(body, CTA_TUPLE_ORIG)?)?;
    let (_, reply_src, _, _, _) = parse_tuple(find(body, CTA_TUPLE_REPLY)?)?;
    let zone = find(body, CTA_ZONE).and_then(|b| Some(u16::from_be_bytes(b.get(0..2)?.try_into().ok()?)));
    Some(CtEntry { proto, orig_src, orig_dst, orig_sport, orig_dport, reply_src, zone })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(src: &str, dst: &str, reply: &str) -> CtEntry {
        CtEntry {
            proto: IPPROTO_UDP,
            orig_src: src.parse().unwrap(),
            orig_dst: dst.parse().unwrap(),
            orig_sport: 40000,
            orig_dport: 53,
            reply_src: reply.parse().unwrap(),
            zone: Some(7),
        }
    }

    /// A CT_NEW body as the kernel sends it: both tuples, the zone, and attributes we ignore.
    fn body(e: &CtEntry) -> Vec<u8> {
        let mut out = delete_attrs(&CtEntry { zone: None, ..e.clone() });
        nested(&mut out, CTA_TUPLE_REPLY, |t| {
            nested(t, CTA_TUPLE_IP, |a| {
                let (s, d) =
                    if e.reply_src.is_ipv4() { (CTA_IP_V4_SRC, CTA_IP_V4_DST) } else { (CTA_IP_V6_SRC, CTA_IP_V6_DST) };
                nla_put(a, s, &addr_bytes(&e.reply_src));
                nla_put(a, d, &addr_bytes(&e.orig_src));
            });
            nested(t, CTA_TUPLE_PROTO, |p| {
                nla_put(p, CTA_PROTO_NUM, &[e.proto]);
                nla_put(p, CTA_PROTO_SRC_PORT, &5353u16.to_be_bytes());
                nla_put(p, CTA_PROTO_DST_PORT, &e.orig_sport.to_be_bytes());
            });
        });
        nla_put(&mut out, 3, &[0, 0, 0, 8]); // CTA_STATUS
        nla_put(&mut out, CTA_ZONE, &e.zone.unwrap().to_be_bytes());
        out
    }

    #[test]
    fn entries_round_trip_through_the_wire_format() {
        for e in [entry("10.0.0.2", "172.30.0.10", "10.180.0.1"), entry("fd00::2", "fd00:30::10", "fd00:180::1")] {
            assert_eq!(parse_entry(&body(&e)), Some(e.clone()));
            let fam = if e.orig_src.is_ipv4() { Family::V4 } else { Family::V6 };
            let m = message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, 9, fam, &delete_attrs(&e));
            let all: Vec<_> = messages(&m).collect();
            assert_eq!(all.len(), 1);
            let (ty, seq, payload) = all[0];
            assert_eq!((ty, seq), (0x102, 9));
            assert_eq!(payload[0], nfproto(fam) as u8);
            // The delete request names the original tuple and the zone.
            let orig = parse_tuple(find(&payload[NFGEN_HDRLEN..], CTA_TUPLE_ORIG).unwrap()).unwrap();
            assert_eq!(orig, (IPPROTO_UDP, e.orig_src, e.orig_dst, 40000, 53));
            assert_eq!(find(&payload[NFGEN_HDRLEN..], CTA_ZONE), Some(&7u16.to_be_bytes()[..]));
        }
        assert_eq!(parse_entry(&[1, 2, 3]), None);
        assert_eq!(parse_entry(&[]), None);
    }

    #[test]
    fn error_codes_and_message_splitting() {
        let mut two = message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, 1, Family::V4, &[]);
        two.extend(message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, 2, Family::V4, &[1, 2, 3, 4]));
        let seqs: Vec<u32> = messages(&two).map(|(_, s, _)| s).collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(error_code(&(-2i32).to_ne_bytes()), ENOENT);
        assert_eq!(error_code(&0i32.to_ne_bytes()), 0);
        // A truncated datagram yields what is whole, never a panic.
        assert_eq!(messages(&two[..30]).count(), 1);
    }
}
