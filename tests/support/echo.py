"""Test-only echo server and client for the packet-flow tests (tests/packet.rs).

The server answers every TCP connection and UDP datagram with "<name> <source ip> <source port>",
so a test can tell which backend answered and which source address that backend saw (masqueraded
or not). The client runs in a pod's network namespace and reports one line per attempt, so the
Rust side never has to enter a namespace itself.

    echo.py serve NAME TCP_PORTS UDP_PORTS     ports comma-separated; prints "ready"; exits on stdin EOF
    echo.py client                             reads "probe PROTO IP PORT COUNT TIMEOUT_S" lines from
                                               stdin; answers one line per attempt, then "end"
    echo.py loop PROTO IP PORT INTERVAL_MS TIMEOUT_S
                                               one attempt every INTERVAL_MS until stdin has data or EOF

Result lines: "ok NAME SRC MS", "refused MS", "timeout MS", "unreach MS", "reset MS", "error WHAT MS".
"""

import errno
import os
import select
import socket
import sys
import threading
import time


def serve(name, tcp_ports, udp_ports):
    def tcp_loop(sock):
        while True:
            conn, (ip, port) = sock.accept()
            try:
                conn.sendall(f"{name} {ip} {port}\n".encode())
            except OSError:
                pass
            finally:
                conn.close()

    def udp_loop(sock):
        while True:
            _, (ip, port) = sock.recvfrom(2048)
            try:
                sock.sendto(f"{name} {ip} {port}\n".encode(), (ip, port))
            except OSError:
                pass

    for port in tcp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        # A deep backlog: the tests open hundreds of connections back to back.
        s.listen(1024)
        threading.Thread(target=tcp_loop, args=(s,), daemon=True).start()
    for port in udp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        threading.Thread(target=udp_loop, args=(s,), daemon=True).start()
    print("ready", flush=True)
    # Tie our lifetime to the test's pipe: if the test process dies without killing us, stdin
    # reaches EOF and we exit, so the namespace can go away.
    sys.stdin.read()


def attempt(proto, ip, port, timeout):
    """One new connection (TCP) or one datagram from a new socket (UDP): a new conntrack entry."""
    start = time.monotonic()

    def ms():
        return f"{(time.monotonic() - start) * 1000:.1f}"

    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        if proto == "udp":
            s.send(b"x")
            data = s.recv(2048)
        else:
            data = b""
            while True:
                chunk = s.recv(2048)
                if not chunk:
                    break
                data += chunk
        parts = data.decode(errors="replace").split()
        if len(parts) < 2:
            return f"error short-reply {ms()}"
        return f"ok {parts[0]} {parts[1]} {ms()}"
    except ConnectionRefusedError:
        return f"refused {ms()}"
    except ConnectionResetError:
        return f"reset {ms()}"
    except socket.timeout:
        return f"timeout {ms()}"
    except OSError as e:
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"unreach {ms()}"
        return f"error {errno.errorcode.get(e.errno, e.errno)} {ms()}"
    finally:
        s.close()


def client():
    for line in sys.stdin:
        f = line.split()
        if not f:
            continue
        if f[0] != "probe" or len(f) != 6:
            print("error bad-command 0", flush=True)
            print("end", flush=True)
            continue
        proto, ip, port, count, timeout = f[1], f[2], int(f[3]), int(f[4]), float(f[5])
        out = [attempt(proto, ip, port, timeout) for _ in range(count)]
        out.append("end")
        sys.stdout.write("\n".join(out) + "\n")
        sys.stdout.flush()


def loop(proto, ip, port, interval_ms, timeout):
    t0 = time.monotonic()
    while True:
        if select.select([sys.stdin], [], [], 0)[0]:
            return
        start = time.monotonic()
        res = attempt(proto, ip, port, timeout)
        print(f"{(start - t0) * 1000:.0f} {res}", flush=True)
        rest = interval_ms / 1000 - (time.monotonic() - start)
        if rest > 0 and select.select([sys.stdin], [], [], rest)[0]:
            return


def main():
    a = sys.argv[1:]
    if a[:1] == ["serve"] and len(a) == 4:
        ports = lambda s: [int(p) for p in s.split(",") if p]
        serve(a[1], ports(a[2]), ports(a[3]))
    elif a == ["client"]:
        client()
    elif a[:1] == ["loop"] and len(a) == 6:
        loop(a[1], a[2], int(a[3]), float(a[4]), float(a[5]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, KeyboardInterrupt):
        os._exit(0)
