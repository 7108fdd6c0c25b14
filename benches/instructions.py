#!/usr/bin/env python3
"""Instructions sheath executes per operation, counted by valgrind's
callgrind: the same figure on every run of the same binary, whatever else
the machine is doing.

    python3 benches/instructions.py --sheath-bin A --sheath-bin B
    python3 benches/instructions.py --workloads W1,W8 --requests 20000

compare.py's CPU time per operation moves by 15-30% between runs on a
shared host, so a change worth 5% needs many paired runs to show. This
counts what sheath's own process executes in user space (kernel work,
the load tool and the backend are not in the count) while a fixed amount
of load passes through it, and prints instructions per operation for
every binary given, with each binary's ratio to the first. It answers
"does this change make sheath do less work per request", not "how fast
is it": instructions are not cycles (a cache miss costs the same count as
a hit), so a lever judged here is still confirmed by compare.py.

Workloads (the ones of compare.py that a fixed count of operations
describes):

* W1: HTTP/1.1 keep-alive, 50 connections (``h2load --h1 -c50 -n N``);
* W8: HTTP/2, 4 connections x 100 streams (``h2load -c4 -m100 -n N``);
* W3: full TLS 1.3 handshakes, one request each (benches/handshake_load.rs,
  which runs for a time: the count is of the handshakes it made).

Each run has a warm-up (connections, the upstream pool, lazily built
state) before the counters are zeroed. Needs valgrind, h2load and nginx
(installed from Debian's packages when missing and this runs as root).
Python 3.11 standard library, with compare.py's helpers.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

WORKLOADS = ["W1", "W8", "W3"]


def log(msg: str) -> None:
    print(f"[instructions] {msg}", file=sys.stderr, flush=True)


def ensure_tools(install: bool) -> None:
    missing = [p for c, p in {"valgrind": "valgrind", "h2load": "nghttp2-client",
                              "nginx": "nginx", "taskset": "util-linux"}.items()
               if shutil.which(c) is None]
    if missing and install and os.geteuid() == 0:
        log(f"installing {' '.join(missing)}")
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    elif missing:
        sys.exit(f"missing: {' '.join(missing)} (apt-get install them, or run as root)")


class Counted:
    """One sheath under callgrind, listening on `port` in `mode`."""

    def __init__(self, bench: compare.Bench, binary: Path, mode: str, tmp: Path) -> None:
        self.bench, self.tmp = bench, tmp
        assert bench.pki is not None
        files = tmp / "files"
        files.mkdir(exist_ok=True)
        cert, key = files / "cert.pem", files / "key.pem"
        shutil.copyfile(bench.pki.cert, cert)
        shutil.copyfile(bench.pki.key, key)
        self.port = compare.free_port()
        conf = tmp / "sheath.toml"
        conf.write_text(compare.sheath_conf(
            tmp, bench.pki, cert, key, self.port, compare.free_port(), bench.backend_port, mode))
        self.out = tmp / "callgrind"
        self.out.mkdir(exist_ok=True)
        self.proc = bench.procs.spawn(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}/cg.%p",
             binary, "--workers", "1", "--log-level", "warn", "run", "--config", conf],
            compare.PROXY_CPU, log_path=tmp / "sheath.log")
        # Under valgrind, start-up takes seconds.
        compare.wait_port(self.port, self.proc, "sheath under callgrind", timeout=120)

    def control(self, flag: str) -> None:
        done = subprocess.run(["callgrind_control", flag, str(self.proc.pid)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"callgrind_control {flag}: {done.stdout}{done.stderr}")

    def count(self, run) -> tuple[int, int]:
        """(instructions, operations) of `run()`, which returns operations."""
        before = set(self.out.iterdir())
        self.control("-z")
        ops = run()
        self.control("-d")
        deadline = time.monotonic() + 60
        while True:
            new = [p for p in self.out.iterdir() if p not in before]
            text = new[0].read_text(errors="replace") if new else ""
            m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
            if m:
                return int(m.group(1)), ops
            if time.monotonic() > deadline:
                raise RuntimeError("callgrind wrote no dump")
            time.sleep(0.2)


def h2load(bench: compare.Bench, port: int, args: list[str], n: int) -> int:
    out = bench.procs.run(["h2load", "-t1", *args, "-n", str(n),
                           f"https://127.0.0.1:{port}/small"], timeout=600)
    r = compare.parse_h2load(out)
    if r.get("errors") or not r.get("requests"):
        raise RuntimeError(f"h2load failed: {out[-400:]}")
    return int(r["requests"])


def handshakes(bench: compare.Bench, port: int, seconds: int) -> int:
    assert bench.handshake_load is not None
    out = bench.procs.run([bench.handshake_load, f"127.0.0.1:{port}", "4", str(seconds), "/small"],
                          timeout=seconds + 120)
    m = re.search(r"(\d+) connections, (\d+) errors", out)
    if m is None or int(m.group(2)):
        raise RuntimeError(f"handshake_load printed {out!r}")
    return int(m.group(1))


def measure(bench: compare.Bench, binary: Path, mode: str, workloads: list[str],
            requests: int, tmp: Path) -> dict[str, float]:
    sheath = Counted(bench, binary, mode, tmp)
    result = {}
    try:
        for w in workloads:
            if w == "W1":
                def run(n):
                    return h2load(bench, sheath.port, ["--h1", "-c50"], n)
            elif w == "W8":
                if mode == "tcp":
                    continue

                def run(n):
                    return h2load(bench, sheath.port, ["-c4", "-m100"], n)
            else:
                def run(n):
                    return handshakes(bench, sheath.port, max(2, n // 4000))
            run(max(1000, requests // 5))
            instructions, ops = sheath.count(lambda: run(requests))
            result[w] = instructions / ops
            log(f"{binary} {mode} {w}: {ops} operations, {instructions / ops:,.0f} instructions each")
    finally:
        bench.procs.stop(sheath.proc, grace=30)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sheath-bin", action="append",
                    help="a sheath binary; repeat to compare (default: build the working tree)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated from W1,W8,W3")
    ap.add_argument("--mode", choices=["http", "tcp"], default="http")
    ap.add_argument("--requests", type=int, default=20000,
                    help="requests per W1/W8 count (default 20000); W3 runs N/4000 seconds")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get")
    args = ap.parse_args()
    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w}")
    ensure_tools(install=not args.no_install)
    os.sched_setaffinity(0, {int(compare.LOAD_CPU)})

    procs = compare.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="sheath-instructions-"))
    try:
        bench = compare.Bench(argparse.Namespace(sheath_bin=None), tmp, procs)
        binaries = [Path(b).resolve() for b in args.sheath_bin or []]
        if not binaries:
            bench.build_sheath()
            assert bench.sheath_bin is not None
            binaries = [bench.sheath_bin]
        if "W3" in workloads:
            bench.build_handshake_load()
        (tmp / "pki").mkdir()
        bench.pki = compare.make_pki(tmp / "pki")
        bench.start_backend()
        results = []
        for i, binary in enumerate(binaries):
            run_tmp = tmp / f"run{i}"
            run_tmp.mkdir()
            results.append(measure(bench, binary, args.mode, workloads, args.requests, run_tmp))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"instructions per operation in sheath's process (user space), {args.mode} mode\n")
    head = ["workload", *(str(b) for b in binaries)]
    if len(binaries) > 1:
        head += [f"{i + 1} / 1" for i in range(1, len(binaries))]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for w in workloads:
        if w not in results[0]:
            continue
        row = [w, *(f"{r[w]:,.0f}" for r in results)]
        row += [f"{r[w] / results[0][w]:.3f}" for r in results[1:]]
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
