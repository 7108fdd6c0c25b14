#!/usr/bin/env python3
"""Side-by-side benchmark: sheath against nginx, HAProxy, Caddy, hitch and
stunnel, in one run on one machine, reported as ratios.

    python3 benches/compare.py                       # everything, 10 s per run
    python3 benches/compare.py --duration 3 --workloads W1,W3 --peers nginx

What it does (see /work/shared/docs/PERFORMANCE.md for the method):

* installs the peers and load tools from Debian's packages when they are
  missing and this runs as root (``--no-install`` to only look for them);
* builds sheath in release mode (``--sheath-bin`` to use a built binary);
* generates one ECDSA P-256 server certificate for every proxy, and a
  client CA plus client certificate for the mTLS workloads (W5, W5L), which
  first check that each proxy refuses clients it should;
* starts a plaintext nginx backend on CPU 1 (``/small``: ``return 200``,
  ``/large``: a static file), then each proxy in turn on CPU 0 with one
  worker, and drives it with the load tools on CPU 1;
* prints one Markdown table: absolute figures, the proxy's CPU time per
  operation (utime + stime of its process tree, from /proc), and sheath's
  ratio to the best peer of its class, with the targets of issue 7.

Two classes are compared. HTTP proxies (nginx, HAProxy, Caddy) against
sheath in HTTP mode; TLS-to-TCP terminators (hitch, stunnel) against sheath
in TCP mode, with the same HTTP/1.1 traffic passing through them to the
backend. HTTP/2 (W8) and rotation (W9) only apply to the HTTP class.

Every process started here is in its own process group and is stopped on
exit, on Ctrl-C and on SIGTERM; temporary files live in one temp dir that is
removed at the end (``--keep-tmp`` keeps it, with the proxies' logs).

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROXY_CPU = "0"
LOAD_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

HTTP_PEERS = ["sheath", "nginx", "haproxy", "caddy"]
TCP_PEERS = ["sheath-tcp", "hitch", "stunnel"]
ALL_PEERS = HTTP_PEERS + TCP_PEERS
ALL_WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W5L", "W6", "W7", "W8", "W9"]

# Debian package for each command the benchmark runs.
PACKAGES = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "caddy": "caddy",
    "hitch": "hitch",
    "stunnel4": "stunnel4",
    "h2load": "nghttp2-client",
    "wrk": "wrk",
    "openssl": "openssl",
    "taskset": "util-linux",
}
PEER_COMMAND = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "caddy": "caddy",
    "hitch": "hitch",
    "stunnel": "stunnel4",
}

SMALL_BODY = "hello from the backend\n"
LARGE_MIB = 32
W1_CONNS = 50
W3_CLIENTS = 32
W4_CONNS = 32
W5_PROCS = 4
W7_CONNS = 2000
W8_CLIENTS, W8_STREAMS = 4, 100
# W9 runs this many times, alternating with W1 runs: one W9 against the
# W1 either side of it moved with the host's drift as much as with rotation.
W9_ROUNDS = 3


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Processes: everything started here is tracked and stopped by its own id.


class Procs:
    """Starts processes in their own process group, pinned to a CPU, and
    stops them (the group whose id is the child's pid) on the way out."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def spawn(self, args, cpu, *, log_path=None, env=None, stdin=None, stdout=None):
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, *map(str, args)],
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
        if log_path:
            out.close()
        self.live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        else:
            # The leader exited; children it left in its group must go too.
            self._signal(proc, signal.SIGKILL)
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.live)):
            self.stop(proc, grace=3.0)

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def run(self, args, timeout: float, cpu: str = LOAD_CPU) -> str:
        """Run a load tool to completion on the load CPU; return its output."""
        proc = self.spawn(args, cpu, stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc, grace=1.0)
            raise RuntimeError(f"{args[0]} did not finish within {timeout:.0f}s")
        self.stop(proc)
        return out.decode(errors="replace")


# --------------------------------------------------------------------------
# /proc: CPU time and memory of a process and its descendants.


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root: int) -> float:
    """utime + stime of every live process in the tree (all threads)."""
    ticks = 0
    for pid in tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_kib(root: int) -> int:
    total = 0
    for pid in tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


# --------------------------------------------------------------------------
# Setup: tools, certificates, ports.


def ensure_tools(peers: list[str], install: bool) -> None:
    needed = ["h2load", "wrk", "openssl", "taskset"]
    needed += [PEER_COMMAND[p] for p in peers if p in PEER_COMMAND]
    if "nginx" not in needed:
        needed.append("nginx")  # the backend
    missing = [c for c in needed if shutil.which(c) is None]
    if not missing:
        return
    pkgs = sorted({PACKAGES[c] for c in missing})
    if not install or os.geteuid() != 0:
        sys.exit(f"missing {', '.join(missing)}: apt-get install {' '.join(pkgs)}")
    log(f"installing {' '.join(pkgs)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs],
        check=True,
        env=env,
    )
    # A system instance a package may start on install is left alone: the
    # benchmark runs its own instances, with their own configs and ports.
    for c in missing:
        if shutil.which(c) is None:
            sys.exit(f"{c} still missing after installing {' '.join(pkgs)}")


def version_of(peer: str) -> str:
    cmds = {
        "nginx": ["nginx", "-v"],
        "haproxy": ["haproxy", "-v"],
        "caddy": ["caddy", "version"],
        "hitch": ["hitch", "--version"],
        "stunnel": ["stunnel4", "-version"],
        "openssl": ["openssl", "version"],
        "h2load": ["h2load", "--version"],
        "wrk": ["wrk", "-v"],
    }
    try:
        r = subprocess.run(cmds[peer], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (r.stdout + r.stderr).strip()
    for pattern in [
        r"nginx/(\S+)",
        r"HA-?Proxy version (\S+)",
        r"^v?(\d+\.\d+\.\d+)",
        r"hitch (\S+)",
        r"stunnel (\S+)",
        r"OpenSSL (\S+)",
        r"nghttp2/(\S+)",
        r"wrk (\S+)",
    ]:
        m = re.search(pattern, text, re.M)
        if m:
            return m.group(1)
    return text.splitlines()[0] if text else "?"


def openssl(*args) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def issue(dir: Path, name: str, ca: Path, ca_key: Path, cn: str, exts: list[str]) -> tuple[Path, Path]:
    """An ECDSA P-256 v3 leaf signed by `ca`: webpki refuses v1 certificates."""
    cert, key = dir / f"{name}.pem", dir / f"{name}.key"
    ext_args = [a for e in exts for a in ("-addext", e)]
    openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key, "-out", cert, "-subj", f"/CN={cn}", "-days", "30",
        "-CA", ca, "-CAkey", ca_key, *ext_args,
    )
    return cert, key


def make_ca(dir: Path, name: str) -> tuple[Path, Path]:
    cert, key = dir / f"{name}.pem", dir / f"{name}.key"
    openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key, "-out", cert, "-subj", f"/CN=sheath bench {name}",
        "-days", "30", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    return cert, key


SERVER_EXTS = [
    "subjectAltName=DNS:localhost,IP:127.0.0.1",
    "basicConstraints=critical,CA:FALSE",
    "keyUsage=critical,digitalSignature",
    "extendedKeyUsage=serverAuth",
]


@dataclass
class Pki:
    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    combined: Path  # cert + key, for HAProxy, hitch
    client_ca: Path
    client_cert: Path
    client_key: Path
    # A client certificate like the one above from a CA no proxy trusts.
    stranger_cert: Path
    stranger_key: Path


def make_pki(dir: Path) -> Pki:
    ca, ca_key = make_ca(dir, "server-ca")
    cert, key = issue(dir, "server", ca, ca_key, "localhost", SERVER_EXTS)
    combined = dir / "server-combined.pem"
    combined.write_text(cert.read_text() + key.read_text())
    client_ca, client_ca_key = make_ca(dir, "client-ca")
    client_exts = [
        "subjectAltName=URI:spiffe://bench.test/client",
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        "extendedKeyUsage=clientAuth",
    ]
    client_cert, client_key = issue(dir, "client", client_ca, client_ca_key, "bench-client", client_exts)
    other_ca, other_ca_key = make_ca(dir, "stranger-ca")
    stranger_cert, stranger_key = issue(
        dir, "stranger", other_ca, other_ca_key, "bench-client", client_exts
    )
    return Pki(
        ca, ca_key, cert, key, combined, client_ca, client_cert, client_key,
        stranger_cert, stranger_key,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} during startup")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} is not listening on {port} after {timeout:.0f}s")


# --------------------------------------------------------------------------
# The backend and the proxies.

NGINX_COMMON = """
user root;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 10000; }}
"""

NGINX_TEMP = """
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
    # Requests per connection are not what is measured: no periodic closes.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
"""


def backend_conf(tmp: Path, port: int) -> str:
    return (
        NGINX_COMMON.format(tmp=tmp, name="backend")
        + "http {\n"
        + NGINX_TEMP.format(tmp=tmp, name="backend")
        + f"""
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /small {{
            default_type text/plain;
            return 200 "{SMALL_BODY.strip()}\\n";
        }}
        location = /large {{
            alias {tmp}/large.bin;
            default_type application/octet-stream;
        }}
    }}
}}
"""
    )


@dataclass
class Instance:
    """A running proxy: its listening ports and its process."""

    peer: str
    proc: subprocess.Popen
    port: int
    mtls_port: int
    log: Path
    extra: dict = field(default_factory=dict)


def nginx_proxy_conf(tmp: Path, pki: Pki, port: int, mport: int, backend: int) -> str:
    tls = f"""
        ssl_certificate {pki.cert};
        ssl_certificate_key {pki.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        http2_max_requests 100000000;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_buffering on;
        }}
"""
    return (
        NGINX_COMMON.format(tmp=tmp, name="nginx")
        + "http {\n"
        + NGINX_TEMP.format(tmp=tmp, name="nginx")
        + f"""
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 128;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
{tls}
    }}
    server {{
        listen 127.0.0.1:{mport} ssl http2 backlog=4096;
        ssl_client_certificate {pki.client_ca};
        ssl_verify_client on;
{tls}
    }}
}}
"""
    )


def haproxy_conf(tmp: Path, pki: Pki, port: int, mport: int, backend: int) -> str:
    return f"""
global
    nbthread 1
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.2
    stats socket {tmp}/haproxy.sock mode 600 level admin

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 60s
    timeout http-request 30s
    timeout http-keep-alive 300s
    option http-keep-alive
    option forwardfor

frontend tls
    bind 127.0.0.1:{port} ssl crt {pki.combined} alpn h2,http/1.1
    bind 127.0.0.1:{mport} ssl crt {pki.combined} alpn h2,http/1.1 ca-file {pki.client_ca} verify required
    http-request set-header X-Forwarded-Proto https
    default_backend app

backend app
    server app 127.0.0.1:{backend} maxconn 1000
"""


def caddy_conf(tmp: Path, pki: Pki, port: int, mport: int, backend: int) -> str:
    tls = f"""tls {pki.cert} {pki.key} {{
		protocols tls1.2 tls1.3
"""
    proxy = f"""reverse_proxy 127.0.0.1:{backend} {{
		transport http {{
			keepalive_idle_conns_per_host 128
		}}
	}}"""
    return f"""{{
	admin off
	auto_https off
	default_sni localhost
	servers {{
		protocols h1 h2
	}}
}}
https://:{port} {{
	{tls}	}}
	{proxy}
}}
https://:{mport} {{
	{tls}		client_auth {{
			mode require_and_verify
			trusted_ca_cert_file {pki.client_ca}
		}}
	}}
	{proxy}
}}
"""


def hitch_conf(tmp: Path, pki: Pki, port: int, mport: int, backend: int) -> str:
    return f"""
frontend = {{
    host = "127.0.0.1"
    port = "{port}"
}}
frontend = {{
    host = "127.0.0.1"
    port = "{mport}"
    # hitch 1.7 applies a frontend's client-verify only to a frontend with
    # a pem-file of its own; without one it accepts any client.
    pem-file = "{pki.combined}"
    client-verify = required
    client-verify-ca = "{pki.client_ca}"
}}
backend = "[127.0.0.1]:{backend}"
pem-file = "{pki.combined}"
tls-protos = TLSv1.2 TLSv1.3
alpn-protos = "http/1.1"
workers = 1
daemon = off
# hitch refuses to run its workers as root.
user = "nobody"
group = "nogroup"
ocsp-dir = "{tmp}/hitch-ocsp"
syslog = off
log-level = 0
"""


def stunnel_conf(tmp: Path, pki: Pki, port: int, mport: int, backend: int) -> str:
    return f"""
foreground = yes
pid =
debug = 3
output = {tmp}/stunnel-out.log

[tls]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{backend}
cert = {pki.cert}
key = {pki.key}
sslVersionMin = TLSv1.2
sslVersionMax = TLSv1.3

[mtls]
accept = 127.0.0.1:{mport}
connect = 127.0.0.1:{backend}
cert = {pki.cert}
key = {pki.key}
sslVersionMin = TLSv1.2
sslVersionMax = TLSv1.3
CAfile = {pki.client_ca}
verifyChain = yes
requireCert = yes
"""


def sheath_conf(
    tmp: Path, pki: Pki, cert: Path, key: Path, port: int, mport: int, backend: int, mode: str
) -> str:
    # The files source, on sheath's own copy: W9 rewrites these two files
    # while sheath serves.
    files = f"""
[listener.cert]
source = "files"
cert = "{cert}"
key = "{key}"
"""
    return f"""
[global]
state_dir = "{tmp}/sheath-state"
drain_timeout = "1s"

[[listener]]
name = "bench"
bind = "127.0.0.1:{port}"
upstream = "127.0.0.1:{backend}"
mode = "{mode}"
max_connections = 8000
{files}
[[listener]]
name = "bench-mtls"
bind = "127.0.0.1:{mport}"
upstream = "127.0.0.1:{backend}"
mode = "{mode}"
max_connections = 8000
{files}
[listener.client_auth]
mode = "require"
ca = "{pki.client_ca}"
"""


class Bench:
    def __init__(self, args, tmp: Path, procs: Procs) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.pki: Pki | None = None
        self.backend_port = 0
        self.sheath_bin: Path | None = None
        self.handshake_load: Path | None = None

    # -- setup -------------------------------------------------------------

    def build_sheath(self) -> None:
        if self.args.sheath_bin:
            self.sheath_bin = Path(self.args.sheath_bin).resolve()
            return
        log("building sheath (cargo build --release)")
        subprocess.run(["cargo", "build", "--release", "--bin", "sheath"], cwd=REPO, check=True)
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
        self.sheath_bin = (REPO / target / "release" / "sheath").resolve()

    def build_handshake_load(self) -> None:
        """The W3 and W5L load client, benches/handshake_load.rs."""
        log("building the handshake load client (cargo build --release --bench handshake_load)")
        out = subprocess.run(
            ["cargo", "build", "--release", "--bench", "handshake_load", "--message-format=json"],
            cwd=REPO, check=True, stdout=subprocess.PIPE, text=True,
        ).stdout
        for line in out.splitlines():
            msg = json.loads(line)
            if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "handshake_load":
                self.handshake_load = Path(msg["executable"])
        if self.handshake_load is None:
            raise RuntimeError("cargo built no handshake_load executable")

    def start_backend(self) -> None:
        large = self.tmp / "large.bin"
        with open(large, "wb") as f:
            for _ in range(LARGE_MIB):
                f.write(os.urandom(1 << 20))
        self.backend_port = free_port()
        conf = self.tmp / "backend.conf"
        conf.write_text(backend_conf(self.tmp, self.backend_port))
        proc = self.procs.spawn(
            ["nginx", "-p", self.tmp, "-e", self.tmp / "backend-error.log", "-c", conf],
            LOAD_CPU,
            log_path=self.tmp / "backend.log",
        )
        wait_port(self.backend_port, proc, "backend nginx")

    def start(self, peer: str) -> Instance:
        assert self.pki is not None
        tmp, pki, be = self.tmp, self.pki, self.backend_port
        port, mport = free_port(), free_port()
        logf = tmp / f"{peer}.log"
        env = None
        extra: dict = {}
        if peer in ("sheath", "sheath-tcp"):
            files = tmp / f"{peer}-files"
            files.mkdir(exist_ok=True)
            cert, key = files / "cert.pem", files / "key.pem"
            shutil.copyfile(pki.cert, cert)
            shutil.copyfile(pki.key, key)
            conf = tmp / f"{peer}.toml"
            mode = "tcp" if peer == "sheath-tcp" else "http"
            conf.write_text(sheath_conf(tmp, pki, cert, key, port, mport, be, mode))
            extra = {"cert": cert, "key": key}
            # Request logging is off for every proxy in this benchmark; the
            # certificate manager's lines stay on so W9 can count installs.
            args = [
                self.sheath_bin, "--workers", "1",
                "--log-level", self.args.sheath_log_level,
                "run", "--config", conf,
            ]
        elif peer == "nginx":
            conf = tmp / "nginx.conf"
            conf.write_text(nginx_proxy_conf(tmp, pki, port, mport, be))
            args = ["nginx", "-p", tmp, "-e", tmp / "nginx-error.log", "-c", conf]
        elif peer == "haproxy":
            conf = tmp / "haproxy.cfg"
            conf.write_text(haproxy_conf(tmp, pki, port, mport, be))
            args = ["haproxy", "-db", "-f", conf]
        elif peer == "caddy":
            conf = tmp / "Caddyfile"
            conf.write_text(caddy_conf(tmp, pki, port, mport, be))
            home = tmp / "caddy-home"
            home.mkdir(exist_ok=True)
            env = dict(
                os.environ,
                GOMAXPROCS="1",
                HOME=str(home),
                XDG_DATA_HOME=str(home / "data"),
                XDG_CONFIG_HOME=str(home / "config"),
            )
            args = ["caddy", "run", "--adapter", "caddyfile", "--config", conf]
        elif peer == "hitch":
            (tmp / "hitch-ocsp").mkdir(exist_ok=True)
            conf = tmp / "hitch.conf"
            conf.write_text(hitch_conf(tmp, pki, port, mport, be))
            args = ["hitch", "--config", conf]
        elif peer == "stunnel":
            conf = tmp / "stunnel.conf"
            conf.write_text(stunnel_conf(tmp, pki, port, mport, be))
            args = ["stunnel4", conf]
        else:
            raise ValueError(peer)
        proc = self.procs.spawn(args, PROXY_CPU, log_path=logf, env=env)
        try:
            wait_port(port, proc, peer)
            wait_port(mport, proc, f"{peer} (mTLS listener)")
        except RuntimeError:
            log(f"{peer} log:\n{logf.read_text(errors='replace')[-3000:]}")
            raise
        # Let lazy start-up work (Caddy's certificate cache, HAProxy's pools)
        # finish before anything is measured.
        time.sleep(0.5)
        return Instance(peer, proc, port, mport, logf, extra)

    # -- load tools --------------------------------------------------------

    def url(self, inst: Instance, path: str) -> str:
        return f"https://127.0.0.1:{inst.port}{path}"

    def measured(self, inst: Instance, fn):
        """Run `fn` and return (its result, proxy CPU seconds, wall seconds)."""
        c0, t0 = cpu_seconds(inst.proc.pid), time.monotonic()
        result = fn()
        c1, t1 = cpu_seconds(inst.proc.pid), time.monotonic()
        return result, c1 - c0, t1 - t0

    def wrk(self, url: str, conns: int, extra=(), latency=False) -> dict:
        d = self.args.duration
        args = ["wrk", "-t1", f"-c{conns}", f"-d{d}s", "--timeout", "5s", *extra]
        if latency:
            args.append("--latency")
        out = self.procs.run([*args, url], timeout=d + 30)
        return parse_wrk(out)

    def h2load(self, url: str, args: list[str]) -> dict:
        d = self.args.duration
        out = self.procs.run(["h2load", "-t1", "-D", str(d), *args, url], timeout=d + 60)
        return parse_h2load(out)

    # -- workloads ---------------------------------------------------------

    def w1(self, inst: Instance) -> dict:
        r, cpu, wall = self.measured(inst, lambda: self.wrk(self.url(inst, "/small"), W1_CONNS))
        return per_op(r, cpu, wall, r["requests"])

    def w2_direct(self) -> dict:
        return self.wrk(f"http://127.0.0.1:{self.backend_port}/small", 1, latency=True)

    def w2(self, inst: Instance, direct: dict) -> dict:
        r = self.wrk(self.url(inst, "/small"), 1, latency=True)
        r["p50_added"] = r["p50"] - direct["p50"]
        r["p99_added"] = r["p99"] - direct["p99"]
        return r

    def handshakes(self, inst: Instance, port: int, client_auth: list[str]) -> dict:
        """Full handshakes from benches/handshake_load.rs, one request each."""
        assert self.handshake_load is not None
        d = self.args.duration

        def run():
            out = self.procs.run(
                [
                    self.handshake_load, f"127.0.0.1:{port}", str(W3_CLIENTS), str(d), "/small",
                    *client_auth,
                ],
                timeout=d + 60,
            )
            m = re.search(r"(\d+) connections, (\d+) errors in ([\d.]+) s", out)
            if m is None:
                raise RuntimeError(f"handshake_load printed {out!r}")
            return {"requests": int(m.group(1)), "errors": int(m.group(2)), "seconds": float(m.group(3))}

        r, cpu, wall = self.measured(inst, run)
        r["rps"] = r["requests"] / r["seconds"] if r["seconds"] else 0.0
        return per_op(r, cpu, wall, r["requests"])

    def w3(self, inst: Instance) -> dict:
        # Full handshakes need a client that never offers a session: h2load
        # 1.52 offers the previous one when it reconnects, and OpenSSL 3.0
        # clients (s_time) are too slow to load a proxy. See
        # benches/handshake_load.rs.
        r = self.handshakes(inst, inst.port, [])
        r["protocol"] = handshake_probe(inst.port)
        return r

    def w4(self, inst: Instance) -> dict:
        # wrk reconnects after `Connection: close` and offers the previous
        # session, so these handshakes are resumptions when the proxy
        # accepts them: a probe first checks that it does.
        resumed = resumption_probe(inst.port)
        r, cpu, wall = self.measured(
            inst,
            lambda: self.wrk(
                self.url(inst, "/small"), W4_CONNS, extra=["-H", "Connection: close"]
            ),
        )
        r["resumed"] = resumed
        return per_op(r, cpu, wall, r["requests"])

    def check_client_auth(self, inst: Instance) -> None:
        assert self.pki is not None
        problem = client_auth_probe(inst.mtls_port, self.pki)
        if problem is not None:
            raise RuntimeError(f"not measured: its mTLS listener {problem}")

    def w5(self, inst: Instance) -> dict:
        # openssl s_time is the client that presents a certificate; `-new`
        # makes every connection a full handshake and `-www` a request, so
        # a connection only counts once the proxy accepted the certificate
        # and answered. One s_time is sequential: run several.
        assert self.pki is not None
        d = self.args.duration
        self.check_client_auth(inst)

        def run():
            procs = [
                self.procs.spawn(
                    [
                        "openssl", "s_time", "-connect", f"127.0.0.1:{inst.mtls_port}",
                        "-new", "-www", "/small", "-time", str(d),
                        "-cert", self.pki.client_cert, "-key", self.pki.client_key,
                    ],
                    LOAD_CPU,
                    stdout=subprocess.PIPE,
                )
                for _ in range(W5_PROCS)
            ]
            total, errors = 0, 0
            for p in procs:
                try:
                    out, _ = p.communicate(timeout=d + 30)
                except subprocess.TimeoutExpired:
                    errors += 1
                    out = b""
                self.procs.stop(p)
                text = out.decode(errors="replace")
                m = re.search(r"(\d+) connections in [\d.]+s;", text)
                if m is None or p.returncode != 0:
                    errors += 1
                if m:
                    total += int(m.group(1))
            return {"requests": total, "errors": errors}

        r, cpu, wall = self.measured(inst, run)
        r["rps"] = r["requests"] / wall
        return per_op(r, cpu, wall, r["requests"])

    def w5l(self, inst: Instance) -> dict:
        # W5 at a load that fills the proxy's core: s_time spends ~1.4 ms of
        # CPU per handshake, so W5 holds every proxy well below its core and
        # its CPU per handshake includes waking from idle. The W3 client
        # presents the same client certificate s_time does.
        assert self.pki is not None
        self.check_client_auth(inst)
        return self.handshakes(
            inst, inst.mtls_port, [str(self.pki.client_cert), str(self.pki.client_key)]
        )

    def w6(self, inst: Instance) -> dict:
        r, cpu, wall = self.measured(
            inst, lambda: self.h2load(self.url(inst, "/large"), ["--h1", "-c", "1", "-m", "1"])
        )
        mb = r["bytes"] / 1e6
        r["mbps"] = mb / r["seconds"] if r["seconds"] else 0.0
        out = per_op(r, cpu, wall, mb)
        return out

    def w7(self, inst: Instance) -> dict:
        # A few handshakes first, so one-time start-up allocations (session
        # caches, pools, the first TLS context use) are not counted per
        # connection.
        warm = self.procs.spawn(
            [sys.executable, REPO / "benches" / "idle_tls.py", "127.0.0.1", inst.port, 20],
            LOAD_CPU,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        warm.stdout.readline()
        warm.stdin.close()
        warm.wait(10)
        self.procs.stop(warm)
        time.sleep(1.0)
        before = rss_kib(inst.proc.pid)
        holder = self.procs.spawn(
            [sys.executable, REPO / "benches" / "idle_tls.py", "127.0.0.1", inst.port, W7_CONNS],
            LOAD_CPU,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        line = holder.stdout.readline().decode().split()
        opened = int(line[1]) if len(line) == 3 else 0
        failed = int(line[2]) if len(line) == 3 else W7_CONNS
        # Let the server side finish its handshakes (TLS 1.3 completes at the
        # server after the client is done) and a garbage collector settle.
        time.sleep(2.0)
        after = rss_kib(inst.proc.pid)
        holder.stdin.close()
        try:
            holder.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self.procs.stop(holder)
        time.sleep(1.0)
        return {
            "kib_per_conn": (after - before) / opened if opened else float("nan"),
            "rss_before": before,
            "rss_after": after,
            "opened": opened,
            "errors": failed,
        }

    def w8(self, inst: Instance) -> dict:
        r, cpu, wall = self.measured(
            inst,
            lambda: self.h2load(
                self.url(inst, "/small"), ["-c", str(W8_CLIENTS), "-m", str(W8_STREAMS)]
            ),
        )
        if r.get("protocol_alpn") not in (None, "h2"):
            r["errors"] += 1
        return per_op(r, cpu, wall, r["requests"])

    def w9(self, inst: Instance) -> dict:
        """W1 while the certificate files are replaced every second."""
        assert self.pki is not None
        d = self.args.duration
        pairs_dir = self.tmp / "rotation"
        pairs_dir.mkdir(exist_ok=True)
        ca_cert, ca_key = self.pki.ca, self.pki.ca_key
        # Fresh key pairs made before the run, so making them does not take
        # CPU from the load tool during it.
        pairs = [issue(pairs_dir, f"r{i}", ca_cert, ca_key, "localhost", SERVER_EXTS) for i in range(d + 2)]
        # Both of sheath's listeners serve these files; count one of them.
        marker = "certificate installed listener=bench "
        log_before = inst.log.read_text(errors="replace").count(marker)
        stop = threading.Event()
        rotations = [0]

        def rotate():
            i = 0
            while not stop.wait(1.0):
                cert, key = pairs[i % len(pairs)]
                i += 1
                # Each file replaced by rename, so a reader sees the old
                # file or the new one, never a partial write.
                for src, dst in ((key, inst.extra["key"]), (cert, inst.extra["cert"])):
                    tmpf = dst.with_suffix(".tmp")
                    shutil.copyfile(src, tmpf)
                    os.replace(tmpf, dst)
                rotations[0] += 1

        t = threading.Thread(target=rotate, daemon=True)
        t.start()
        try:
            r, cpu, wall = self.measured(inst, lambda: self.wrk(self.url(inst, "/small"), W1_CONNS))
        finally:
            stop.set()
            t.join()
        time.sleep(0.5)
        installs = inst.log.read_text(errors="replace").count(marker) - log_before
        r["rotations"] = rotations[0]
        r["installs"] = installs
        return per_op(r, cpu, wall, r["requests"])


    def w9_interleaved(self, inst: Instance, w1: dict) -> tuple[dict, dict]:
        """W9 and W1 alternately, W9_ROUNDS times, starting after `w1`.

        Each W9 run is judged against the mean of the W1 runs on either
        side of it, and the row shows the median of those ratios: a drift
        of the host across one pair moves one ratio, not the verdict.
        Returns W9's summary and the last W1 run.
        """
        before, runs = w1, []
        for _ in range(W9_ROUNDS):
            r9 = self.w9(inst)
            after = self.w1(inst)
            runs.append(
                {
                    "cpu_ratio": (before["cpu_us"] + after["cpu_us"]) / 2 / r9["cpu_us"],
                    "rps_ratio": r9["rps"] / ((before["rps"] + after["rps"]) / 2),
                    "w9": r9,
                    "w1_before": before,
                    "w1_after": after,
                }
            )
            before = after
        w9s = [r["w9"] for r in runs]
        summary = {
            key: sum(r[key] for r in w9s) for key in ("requests", "errors", "rotations", "installs")
        }
        summary["rps"] = statistics.mean(r["rps"] for r in w9s)
        summary["cpu_us"] = statistics.mean(r["cpu_us"] for r in w9s)
        summary["own_ratio"] = statistics.median(r["cpu_ratio"] for r in runs)
        summary["own_rps_ratio"] = statistics.median(r["rps_ratio"] for r in runs)
        summary["rounds"] = [
            {
                "cpu_ratio": r["cpu_ratio"],
                "w9_cpu_us": r["w9"]["cpu_us"],
                "w1_cpu_us": (r["w1_before"]["cpu_us"], r["w1_after"]["cpu_us"]),
                "installs": r["w9"]["installs"],
                "rotations": r["w9"]["rotations"],
                "errors": r["w9"]["errors"],
            }
            for r in runs
        ]
        return summary, before


def resumption_probe(port: int) -> str:
    """Does the proxy resume a session? Two connections, the second
    offering the first one's session (Python's ssl, OpenSSL like wrk); the
    first reads its whole response so TLS 1.3 tickets are taken in."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    session = None
    try:
        for _ in range(2):
            with ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=5), session=session
            ) as s:
                s.sendall(b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                while True:
                    try:
                        if not s.recv(65536):
                            break
                    except (ssl.SSLError, OSError):
                        break
                reused, version = s.session_reused, s.version()
                session = s.session
    except OSError as e:
        return f"probe failed: {e}"
    return f"{version} {'resumed' if reused else 'not resumed'}"


def client_auth_probe(port: int, pki: Pki) -> str | None:
    """Does the proxy refuse a client without a certificate, and one whose
    certificate its client CA did not issue, and answer one whose
    certificate it did? None if so, else what went wrong: a proxy that
    does not check would be measured doing less than mTLS."""
    import ssl

    def request(cert: Path | None, key: Path | None) -> bool:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        answer = b""
        try:
            # SNI and Host name the same server (see handshake_load.rs).
            with ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=5),
                server_hostname="localhost",
            ) as s:
                s.sendall(b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                while len(answer) < 12:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        except (ssl.SSLError, OSError):
            return False
        return answer.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))

    if request(None, None):
        return "answered a client without a certificate"
    if request(pki.stranger_cert, pki.stranger_key):
        return "answered a client whose certificate another CA issued"
    if not request(pki.client_cert, pki.client_key):
        return "did not answer a client with a valid certificate"
    return None


def handshake_probe(port: int) -> str:
    """The protocol and cipher suite the proxy picks for a new client."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
            return f"{s.version()} {s.cipher()[0]}"
    except OSError as e:
        return f"probe failed: {e}"


def per_op(r: dict, cpu: float, wall: float, ops: float) -> dict:
    r = dict(r)
    r["cpu_s"] = cpu
    r["util"] = cpu / wall if wall else 0.0
    r["cpu_us"] = cpu / ops * 1e6 if ops else float("nan")
    return r


# --------------------------------------------------------------------------
# Output parsing.

UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6}


def parse_wrk(out: str) -> dict:
    r: dict = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk gave no result:\n{out}")
    r["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    r["requests"] = int(m.group(1)) if m else 0
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    r["errors"] = errors
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            r[f"p{pct}"] = float(m.group(1)) * UNIT_US[m.group(2)]
    return r


def parse_h2load(out: str) -> dict:
    r: dict = {"raw": out}
    m = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    if not m:
        raise RuntimeError(f"h2load gave no result:\n{out}")
    r["seconds"] = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    r["rps"] = float(m.group(3))
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        out,
    )
    r["requests"] = int(m.group(4)) if m else 0
    r["errors"] = int(m.group(5)) + int(m.group(7)) if m else 1
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        r["errors"] += int(m.group(3)) + int(m.group(4))
    m = re.search(r"traffic: \S+ \((\d+)\) total", out)
    r["bytes"] = int(m.group(1)) if m else 0
    m = re.search(r"TLS Protocol: (\S+)", out)
    r["protocol"] = m.group(1) if m else "?"
    m = re.search(r"Application protocol: (\S+)", out)
    r["protocol_alpn"] = m.group(1) if m else None
    return r


# --------------------------------------------------------------------------
# The table.

# Each row: (workload, label, result key, how sheath is compared, target).
# "high": sheath / best peer (more is better); "cpu": best peer's CPU per
# operation / sheath's, i.e. how many times more work sheath does per CPU
# second; "low": sheath / best peer (less is better).
ROWS = [
    ("W1", "req/s", "rps", "high", None),
    ("W1", "proxy CPU µs/req", "cpu_us", "cpu", (">=", 1.2)),
    ("W2", "added p50 µs", "p50_added", "low", None),
    ("W2", "added p99 µs", "p99_added", "low", ("<=", 1.0)),
    ("W3", "handshakes/s", "rps", "high", None),
    ("W3", "proxy CPU µs/handshake", "cpu_us", "cpu", (">=", 2.5)),
    ("W4", "resumed conns/s", "rps", "high", None),
    ("W4", "proxy CPU µs/conn", "cpu_us", "cpu", None),
    ("W5", "mTLS handshakes/s", "rps", "high", None),
    ("W5", "proxy CPU µs/handshake", "cpu_us", "cpu", (">=", 3.0)),
    ("W5L", "mTLS handshakes/s", "rps", "high", None),
    ("W5L", "proxy CPU µs/handshake", "cpu_us", "cpu", (">=", 3.0)),
    ("W6", "MB/s", "mbps", "high", None),
    ("W6", "proxy CPU µs/MB", "cpu_us", "cpu", (">=", 1.3)),
    ("W7", "KiB/idle conn", "kib_per_conn", "low", ("<", 1.0)),
    ("W8", "req/s", "rps", "high", None),
    ("W8", "proxy CPU µs/req", "cpu_us", "cpu", (">=", 1.0)),
    ("W9", "req/s (errors)", "rps", "self", (">=", 0.95)),
]

TITLES = {
    "W1": f"HTTP/1.1 keep-alive, {W1_CONNS} conns (wrk)",
    "W2": "1 conn, 1 request at a time (wrk -c1), over direct",
    "W3": f"full handshakes, one request each (benches/handshake_load.rs, {W3_CLIENTS} conns)",
    "W4": f"new conn per request, resumed (wrk -c{W4_CONNS} Connection: close)",
    "W5": f"mTLS full handshakes (openssl s_time -new x{W5_PROCS})",
    "W5L": f"mTLS full handshakes at load (benches/handshake_load.rs with a client certificate, {W3_CLIENTS} conns)",
    "W6": "bulk download, 1 stream (h2load --h1 -c1, 32 MiB file)",
    "W7": f"{W7_CONNS} idle TLS connections (RSS delta)",
    "W8": f"HTTP/2, {W8_CLIENTS} conns x {W8_STREAMS} streams (h2load)",
    "W9": f"W1 with the certificate replaced every second, {W9_ROUNDS} runs alternating with W1 runs"
    " (each against the mean of the W1 runs either side; median)",
}


def fmt(v, key: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if key in ("cpu_us", "kib_per_conn"):
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    if key in ("p50_added", "p99_added"):
        return f"{v:.0f}"
    if key == "mbps":
        return f"{v:.0f}"
    return f"{v:,.0f}"


def cell(res: dict | None, key: str) -> str:
    if res is None:
        return "n/a"
    if "failed" in res:
        return "failed"
    s = fmt(res.get(key), key)
    if key == "cpu_us" and "util" in res:
        s += f" ({res['util'] * 100:.0f}%)"
    if key in ("rps", "mbps", "kib_per_conn") and res.get("errors"):
        s += f" ({res['errors']} err)"
    return s


def ratio(how: str, mine: float | None, peers: list[float]) -> float | None:
    peers = [p for p in peers if p is not None and p == p]
    if mine is None or mine != mine or not peers:
        return None
    if how == "high":
        best = max(peers)
        return mine / best if best > 0 else None
    if how == "cpu":
        best = min(peers)
        return best / mine if mine > 0 else None
    if how == "low":
        best = min(peers)
        # Added latency can be ~0 or negative within noise; compare from a
        # floor of 1 µs so the ratio stays meaningful.
        return max(mine, 1.0) / max(best, 1.0)
    return None


def verdict(target, r: float | None, extra_ok: bool = True) -> str:
    if target is None:
        return ""
    if r is None:
        return "–"
    op, bound = target
    ok = {">=": r >= bound, "<=": r <= bound, "<": r < bound}[op]
    return "PASS" if ok and extra_ok else "MISS"


def render(results: dict, peers: list[str], workloads: list[str], meta: dict) -> str:
    http = [p for p in HTTP_PEERS if p in peers]
    tcp = [p for p in TCP_PEERS if p in peers]
    cols = ["", "metric", *http, "× best HTTP peer", *tcp, "× best TCP peer", "target", "HTTP", "TCP"]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(["---"] * len(cols)) + "|",
    ]
    for wid, label, key, how, target in ROWS:
        if wid not in workloads:
            continue
        row = [wid, label]
        verdicts = []
        for cls, members in (("sheath", http), ("sheath-tcp", tcp)):
            cells = [cell(results.get(p, {}).get(wid), key) for p in members]
            mine = results.get(cls, {}).get(wid)
            if how == "self":
                # Judged like the other throughput rows, on CPU per
                # request (sheath saturates its core in W1, so this is its
                # capacity); the throughput ratio is shown next to it.
                own_cpu = [
                    results.get(cls, {}).get(w, {}).get("cpu_us")
                    for w in ("W1", "W1_after")
                ]
                own_cpu = [x for x in own_cpu if x]
                own_rps = [
                    results.get(cls, {}).get(w, {}).get("rps")
                    for w in ("W1", "W1_after")
                ]
                own_rps = [x for x in own_rps if x]
                r = (
                    (sum(own_cpu) / len(own_cpu)) / mine["cpu_us"]
                    if mine and mine.get("cpu_us") and own_cpu
                    else None
                )
                thr = (
                    mine["rps"] / (sum(own_rps) / len(own_rps))
                    if mine and "rps" in mine and own_rps
                    else None
                )
                if mine and "own_ratio" in mine:
                    # Interleaved runs: the median of the per-round ratios.
                    r, thr = mine["own_ratio"], mine.get("own_rps_ratio")
                extra_ok = bool(mine) and mine.get("errors", 1) == 0 and mine.get("installs", 0) > 0
                if mine and "rps" in mine:
                    cells[0] = (
                        f"{mine['rps']:,.0f} ({mine.get('errors', 0)} err, "
                        f"{mine.get('installs', 0)}/{mine.get('rotations', 0)} installed)"
                    )
                rtxt = f"{r:.2f}× own W1" if r is not None else "–"
                if thr is not None:
                    rtxt += f" (req/s {thr:.2f}×)"
                if mine and "cpu_us" in mine:
                    cells[0] += f", {mine['cpu_us']:.1f} µs/req"
            else:
                peer_vals = [
                    results.get(p, {}).get(wid, {}).get(key)
                    for p in members
                    if p != cls and results.get(p, {}).get(wid) is not None
                ]
                mine_v = mine.get(key) if mine else None
                r = ratio(how, mine_v, peer_vals)
                extra_ok = True
                if wid == "W7" and mine_v is not None and mine_v == mine_v:
                    extra_ok = mine_v <= 10.0
                rtxt = f"{r:.2f}×" if r is not None else "–"
            row += cells + [rtxt]
            verdicts.append(verdict(target, r, extra_ok) if members and cls in members else "")
        tgt = ""
        if target:
            tgt = f"{target[0]} {target[1]}×"
            if wid == "W7":
                tgt = "≤ 10 KiB and < every peer"
            if wid == "W9":
                tgt = "0 errors, ≥ 0.95× own W1 (CPU/req)"
        row += [tgt, *verdicts]
        lines.append("| " + " | ".join(row) + " |")
    rounds = meta.get("rounds", 1)
    per_run = f"{meta['duration']} s per run" + (
        f", median of {rounds} rounds (each peer visited in turn)" if rounds > 1 else ""
    )
    head = [
        f"sheath vs peers, {meta['date']}, {meta['machine']}, {per_run}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
    ]
    notes = [
        "",
        "Workloads: " + "; ".join(f"{w} {TITLES[w]}" for w in workloads),
        "",
        "CPU cells: proxy CPU time per operation (utime+stime of the proxy's processes),"
        " with the proxy's CPU use during the run in brackets (100% = the one pinned core)."
        " `× best` on a CPU row is the best peer's CPU per operation divided by sheath's:"
        " how many times more work sheath does per CPU second. Targets on throughput"
        " workloads apply to that row, because the load tool shares CPU 1 with the"
        " backend and saturates before an efficient proxy does.",
    ]
    if "W2" in workloads and "direct" in meta:
        d = meta["direct"]
        notes.append(
            f"W2 direct to the backend: p50 {d.get('p50', 0):.0f} µs, p99 {d.get('p99', 0):.0f} µs."
        )
    w9 = results.get("sheath", {}).get("W9") or {}
    w1s = [results.get("sheath", {}).get(w) for w in ("W1", "W1_after")]
    if "W9" in workloads and w9.get("rounds"):
        notes.append(
            "W9 rounds (W9 µs/req against the W1 runs either side): "
            + "; ".join(
                f"{r['w9_cpu_us']:.1f} vs {r['w1_cpu_us'][0]:.1f}/{r['w1_cpu_us'][1]:.1f}"
                f" = {r['cpu_ratio']:.2f}×, {r['installs']}/{r['rotations']} installed,"
                f" {r['errors']} err"
                for r in w9["rounds"]
            )
            + "."
        )
    elif "W9" in workloads and all(w and "cpu_us" in w for w in w1s):
        notes.append(
            f"W9 reference: sheath W1 just before {w1s[0]['rps']:,.0f} req/s, "
            f"{w1s[0]['cpu_us']:.1f} µs/req; just after {w1s[1]['rps']:,.0f} req/s, "
            f"{w1s[1]['cpu_us']:.1f} µs/req."
        )
    resumed = {
        p: results[p]["W4"]["resumed"]
        for p in peers
        if "resumed" in results.get(p, {}).get("W4", {})
    }
    if resumed:
        notes.append("W4 resumption probe: " + ", ".join(f"{k} {v}" for k, v in resumed.items()) + ".")
    if meta.get("protocols"):
        notes.append("TLS negotiated in W3: " + ", ".join(f"{k} {v}" for k, v in meta["protocols"].items()) + ".")
    for p, errs in meta.get("failures", {}).items():
        for e in errs:
            notes.append(f"{p}: {e}")
    return "\n".join(head + lines + notes)


# Counts add up over rounds (an error in any round shows); every other
# figure is the median of the rounds, and each round's value is kept in
# `per_round` so the spread behind a median can be read from --json.
SUMMED = {"errors", "installs", "rotations", "requests"}


def merge_rounds(visits: list[dict]) -> dict:
    """One peer's results from each round, as one result per workload."""
    if len(visits) == 1:
        return visits[0]
    merged: dict = {}
    for wid in {w for v in visits for w in v}:
        runs = [v[wid] for v in visits if wid in v]
        ok = [r for r in runs if "failed" not in r]
        if not ok:
            merged[wid] = runs[0]
            continue
        out: dict = {"round_count": len(ok)}
        per_round: dict = {}
        for key in sorted({k for r in ok for k in r}):
            values = [r[key] for r in ok if key in r]
            if key in SUMMED:
                out[key] = sum(values)
            elif key == "rounds":
                out[key] = [x for v in values for x in v]
            elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
                out[key] = statistics.median(values)
                per_round[key] = values
            else:
                out[key] = values[0]
        if per_round:
            out["per_round"] = per_round
        if len(ok) < len(runs):
            out["failed_rounds"] = len(runs) - len(ok)
        merged[wid] = out
    return merged


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per load run (default 10)")
    ap.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help="comma-separated, e.g. W1,W3")
    ap.add_argument(
        "--peers",
        default=",".join(ALL_PEERS),
        help=f"comma-separated from {','.join(ALL_PEERS)} (sheath is always run)",
    )
    ap.add_argument("--sheath-bin", help="use this sheath binary instead of building one")
    ap.add_argument(
        "--sheath-log-level",
        default="warn,sheath::cert=info",
        help="sheath's log filter (default: no request lines, like the peers' access logs off)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="visit every peer this many times, in turn, and report each figure's median"
        " (default 1; on a shared machine 3 keeps one slow minute from deciding a row)",
    )
    ap.add_argument("--no-install", action="store_true", help="never run apt-get")
    ap.add_argument("--json", help="also write all results as JSON here")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--from-json", help="print the table of a run saved with --json; run nothing")
    args = ap.parse_args()

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        res = saved["results"]
        ran = [p for p in ALL_PEERS if p in res]
        done = [w for w in ALL_WORKLOADS if any(w in r for r in res.values())]
        print(render(res, ran, done, saved["meta"]))
        return 0

    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for w in workloads:
        if w not in ALL_WORKLOADS:
            ap.error(f"unknown workload {w}")
    for p in peers:
        if p not in ALL_PEERS:
            ap.error(f"unknown peer {p}")
    if "sheath" not in peers:
        peers.insert(0, "sheath")
    if any(p in TCP_PEERS for p in peers) and "sheath-tcp" not in peers:
        peers.append("sheath-tcp")
    peers = [p for p in ALL_PEERS if p in peers]
    if os.cpu_count() is None or len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs CPUs 0 and 1: proxies on one, load tools and backend on the other")
    # The harness itself (W9's rotation thread, the samplers) belongs with
    # the load tools: on the proxy's core it would take cycles from the
    # proxy and show up as the proxy's cost.
    os.sched_setaffinity(0, {int(LOAD_CPU)})

    ensure_tools(peers, install=not args.no_install)
    # Descriptors for the idle-connection workload, inherited by children.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="sheath-compare-"))

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Explicitly, since a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, on_term)
    results: dict = {}
    meta: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "duration": args.duration,
        "versions": {},
        "failures": {},
        "protocols": {},
    }
    try:
        bench = Bench(args, tmp, procs)
        bench.build_sheath()
        if "W3" in workloads or "W5L" in workloads:
            bench.build_handshake_load()
        meta["versions"]["sheath"] = subprocess.run(
            [bench.sheath_bin, "--version"], capture_output=True, text=True
        ).stdout.strip().split()[-1]
        for p in peers:
            if p in PEER_COMMAND:
                meta["versions"][p] = version_of(p)
        for tool in ("openssl", "h2load", "wrk"):
            meta["versions"][tool] = version_of(tool)
        log("generating certificates")
        bench.pki = make_pki(tmp)
        bench.start_backend()
        if "W2" in workloads:
            meta["direct"] = {k: v for k, v in bench.w2_direct().items() if k != "raw"}
        meta["rounds"] = args.rounds
        visits: dict[str, list[dict]] = {p: [] for p in peers}
        for round_no, peer in ((r, p) for r in range(1, args.rounds + 1) for p in peers):
            results[peer] = {}
            visits[peer].append(results[peer])
            log(f"starting {peer}" + (f" (round {round_no} of {args.rounds})" if args.rounds > 1 else ""))
            try:
                inst = bench.start(peer)
            except RuntimeError as e:
                meta["failures"].setdefault(peer, []).append(f"did not start: {e}")
                continue
            try:
                order = ["W7", "W1", "W9", "W2", "W3", "W4", "W5", "W5L", "W6", "W8"]
                for wid in order:
                    if wid not in workloads:
                        continue
                    if wid == "W8" and peer in TCP_PEERS:
                        continue  # raw TCP in front of an HTTP/1.1 backend
                    if wid == "W9" and peer not in ("sheath",):
                        continue
                    if wid == "W9" and "W1" not in results[peer]:
                        # W9 is judged against this run's W1.
                        results[peer]["W1"] = bench.w1(inst)
                    log(f"{peer} {wid}")
                    try:
                        if wid == "W2":
                            res = bench.w2(inst, meta["direct"])
                        elif wid == "W9":
                            res, results[peer]["W1_after"] = bench.w9_interleaved(
                                inst, results[peer]["W1"]
                            )
                        else:
                            res = getattr(bench, wid.lower())(inst)
                    except RuntimeError as e:
                        meta["failures"].setdefault(peer, []).append(f"{wid}: {e}")
                        res = {"failed": str(e)}
                    results[peer][wid] = res
                    if wid == "W3" and "protocol" in res:
                        meta["protocols"][peer] = res["protocol"]
                    if inst.proc.poll() is not None:
                        meta["failures"].setdefault(peer, []).append(
                            f"exited with {inst.proc.returncode} during {wid}"
                        )
                        break
            finally:
                procs.stop(inst.proc)
        results = {p: merge_rounds(v) for p, v in visits.items()}
        meta["versions"] = {k: v for k, v in meta["versions"].items()}
        table = render(results, peers, workloads, meta)
        print(table)
        if args.json:
            strip = {
                p: {w: {k: v for k, v in r.items() if k != "raw"} for w, r in ws.items()}
                for p, ws in results.items()
            }
            Path(args.json).write_text(json.dumps({"meta": meta, "results": strip}, indent=2))
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        procs.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
