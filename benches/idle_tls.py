#!/usr/bin/env python3
"""Hold N idle TLS connections open to HOST:PORT (workload W7 of compare.py).

Each connection completes its handshake (ALPN http/1.1, no certificate
verification: only the server's memory is under test) and then sends
nothing. The script prints `ready` once every connection is up and holds
them until its standard input closes, so the caller decides how long the
proxy is measured with them open.

    python3 benches/idle_tls.py 127.0.0.1 8443 2000
"""

import resource
import socket
import ssl
import sys


def main() -> int:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # Each connection is one descriptor here and at least one in the proxy.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 64), hard))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    conns = []
    failed = 0
    for _ in range(count):
        try:
            raw = socket.create_connection((host, port), timeout=10)
            conns.append(ctx.wrap_socket(raw))
        except OSError as e:
            failed += 1
            if failed == 1:
                print(f"connection failed: {e}", file=sys.stderr)
    print(f"ready {len(conns)} {failed}", flush=True)
    sys.stdin.read()
    for c in conns:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
