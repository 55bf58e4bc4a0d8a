//! nfacct objects (the named packet/byte counters of `-m nfacct`), created and read over
//! nfnetlink, as upstream's `pkg/proxy/util/nfacct` does for iptables mode's packet counters.
//! The messages are built and parsed in `netlink` (plain bytes); this is the safe API.
//!
//! Each call opens a socket in the calling thread's network namespace; nfacct objects belong to
//! a namespace.

use std::io;
use std::time::Duration;

use super::netlink::{
    nfacct_request, parse_nfacct_replies, NfacctReply, NlSocket, NFACCT_NAME_MAX, NFNL_MSG_ACCT_GET, NFNL_MSG_ACCT_NEW,
};

/// How long to wait for the kernel's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Receive buffer: the answer to one request is two small messages.
const RECV_BUF: usize = 8192;

/// Creates the nfacct object `name` unless it exists (its counters are then left alone).
pub fn ensure(name: &str) -> io::Result<()> {
    match request(NFNL_MSG_ACCT_NEW, name)?.done {
        // EBUSY: the object exists (NEW without NLM_F_REPLACE); EEXIST would be the same.
        Some(0) | Some(libc::EBUSY) | Some(libc::EEXIST) => Ok(()),
        other => Err(failed("creating", name, other)),
    }
}

/// The packets the nfacct object `name` counted so far (ENOENT when it does not exist).
pub fn packets(name: &str) -> io::Result<u64> {
    let r = request(NFNL_MSG_ACCT_GET, name)?;
    match (r.done, r.counter) {
        (Some(0), Some((n, pkts, _))) if n == name => Ok(pkts),
        (Some(0), _) => Err(io::Error::other(format!("nfacct object {name}: the kernel's answer has no counter"))),
        (other, _) => Err(failed("reading", name, other)),
    }
}

fn failed(what: &str, name: &str, done: Option<i32>) -> io::Error {
    match done {
        Some(errno) => {
            let e = io::Error::from_raw_os_error(errno);
            io::Error::new(e.kind(), format!("{what} nfacct object {name}: {e}"))
        }
        None => io::Error::new(io::ErrorKind::TimedOut, format!("{what} nfacct object {name}: no answer")),
    }
}

/// Sends one request and collects the answer until its ACK or error arrives.
fn request(cmd: u16, name: &str) -> io::Result<NfacctReply> {
    if name.is_empty() || name.len() >= NFACCT_NAME_MAX || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("nfacct object name {name:?}: 1 to {} bytes without NUL", NFACCT_NAME_MAX - 1),
        ));
    }
    let mut sock = NlSocket::open()?;
    let seq = 1;
    sock.send_plain(&nfacct_request(cmd, seq, name))?;
    let mut reply = NfacctReply::default();
    let mut buf = vec![0u8; RECV_BUF];
    while reply.done.is_none() {
        match sock.recv(&mut buf, Some(REPLY_TIMEOUT))? {
            None => break,
            Some(n) if n > buf.len() => return Err(io::Error::other(format!("nfacct reply of {n} bytes truncated"))),
            Some(n) => parse_nfacct_replies(&buf[..n], seq, &mut reply),
        }
    }
    Ok(reply)
}
