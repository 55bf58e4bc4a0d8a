#!/usr/bin/env bash
# `make demo`: kproxy on the bundled example cluster (testdata/demo), in throwaway network
# namespaces: a node with two web pods behind a bridge. Prints the ruleset kproxy programs and
# which pod answers each request to the ClusterIP, then tears everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${KPROXY_BIN:-target/release/kproxy}
DEMO=testdata/demo

if [ "$(id -u)" != 0 ]; then
  echo "== Not root: network namespaces and nftables need root, so this is the dry run only."
  echo "== kproxy --dry-run --manifests $DEMO --hostname-override demo-node --cluster-cidr 10.244.0.0/16"
  "$BIN" --dry-run --manifests "$DEMO" --hostname-override demo-node --cluster-cidr 10.244.0.0/16
  exit 0
fi

P=kpxdemo$$
NODE=${P}n
cleanup() {
  [ -n "${KPID:-}" ] && kill "$KPID" 2>/dev/null || true
  for pid in ${PODPIDS:-}; do kill "$pid" 2>/dev/null || true; done
  for ns in "$NODE" "${P}p1" "${P}p2"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "${WORK:-/nonexistent}"
}
trap cleanup EXIT
WORK=$(mktemp -d)

ip netns add "$NODE"
ip -n "$NODE" link set lo up
ip -n "$NODE" link add br0 type bridge
ip -n "$NODE" addr add 10.244.0.1/24 dev br0
ip -n "$NODE" link set br0 up
# The node's "LAN" address, as the Node object says (a veth pair with one end unused).
ip -n "$NODE" link add lan0 type veth peer name lan1
ip -n "$NODE" addr add 192.168.50.1/24 dev lan0
ip -n "$NODE" link set lan0 up; ip -n "$NODE" link set lan1 up
# Like any node, a default route: ClusterIPs are routed out, and DNAT in output picks the pod.
ip -n "$NODE" route add default dev lan0
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
i=0
for pod in web-1 web-2; do
  i=$((i + 1))
  ns=${P}p$i
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "${P}v$i" type veth peer name eth0 netns "$ns"
  ip link set "${P}v$i" netns "$NODE"
  ip -n "$NODE" link set "${P}v$i" master br0 up
  ip -n "$ns" addr add "10.244.0.1$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via 10.244.0.1
  # A tiny HTTP server that says which pod it is and who it saw.
  ip netns exec "$ns" python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from %s (client seen as %s)\n" % (sys.argv[1], self.client_address[0])).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
' "$pod" >/dev/null 2>&1 &
  PODPIDS="${PODPIDS:-} $!"
done

# Wait until both pods serve, so that every failure below is kproxy's.
for ip in 10.244.0.11 10.244.0.12; do
  for _ in $(seq 1 100); do
    ip netns exec "$NODE" curl -s --max-time 1 "http://$ip:8080/" >/dev/null && break
    sleep 0.1
  done
done

echo "== Starting kproxy in the node namespace on $DEMO"
ip netns exec "$NODE" "$BIN" --manifests "$DEMO" --hostname-override demo-node \
  --cluster-cidr 10.244.0.0/16 --iptables-min-sync-period 0s 2>"$WORK/kproxy.log" &
KPID=$!
for _ in $(seq 1 100); do
  ip netns exec "$NODE" nft list table ip kube-proxy >/dev/null 2>&1 && break
  sleep 0.1
done
echo "== The ruleset kproxy programmed over netlink (nft list table ip kube-proxy):"
ip netns exec "$NODE" nft list table ip kube-proxy
echo
echo "== Six requests from the node to the ClusterIP 10.96.0.10:80"
for _ in 1 2 3 4 5 6; do
  ip netns exec "$NODE" curl -s --max-time 2 http://10.96.0.10/ || echo "(no answer)"
done
echo "== Two requests to the NodePort 192.168.50.1:30080"
for _ in 1 2; do
  ip netns exec "$NODE" curl -s --max-time 2 http://192.168.50.1:30080/ || echo "(no answer)"
done
echo "== A UDP service without endpoints is rejected (ICMP port unreachable):"
ip netns exec "$NODE" python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
try:
    s.connect(("10.96.0.53", 53)); s.send(b"x"); s.recv(10)
    print("unexpected answer")
except (ConnectionRefusedError, PermissionError):
    # A reject in the output path refuses the send itself (EPERM); on the wire it is ICMP.
    print("refused, as expected")
except socket.timeout:
    print("timed out (no reject?)")
'
echo "== kproxy log:"
cat "$WORK/kproxy.log"
echo "== Tearing down"
