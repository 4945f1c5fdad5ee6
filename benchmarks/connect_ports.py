"""What a TCP connect costs as one destination's ephemeral ports fill up.

    .venv/bin/python -m benchmarks.connect_ports [--upto 18000]

nginx opens one upstream connection per stream, from 127.0.0.1 to a comet
process's port: toward one destination those connections share the
ephemeral port range (``net.ipv4.ip_local_port_range``). This opens
connections to one listening port on 127.0.0.1, 1,000 at a time, and
prints the time and CPU of a connect as the range fills. On this machine's
Linux a connect costs about 12 µs until half the range is in use and about
1.2 ms after (the kernel tries ports of one parity first, then scans):
past about 14,000 streams per comet process behind nginx, each new stream
costs 100 times the CPU to connect (benchmarks/results/connect-ports.txt;
docs/deployment.md, "SO_REUSEPORT or nginx?"). A second process accepts and
holds the connections (each process stays under ``ulimit -n``); both are
stopped at the end. 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

_HOLDER = """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(4096)
print(s.getsockname()[1], flush=True)
held = []
while True:
    held.append(s.accept()[0])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upto", type=int, default=18000, help="connections to open (each process holds them)")
    parser.add_argument("--step", type=int, default=1000)
    args = parser.parse_args()
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = high - low + 1
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    socks: list[socket.socket] = []
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        print(f"ephemeral ports {low}-{high} ({ports}); connects to 127.0.0.1:{port}")
        print("open | share of the range | wall us per connect | CPU us per connect")
        while len(socks) < args.upto:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.step):
                sock = socket.socket()
                socks.append(sock)
                sock.connect(("127.0.0.1", port))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{len(socks)} | {len(socks) / ports:.1%} | {wall / args.step * 1e6:.1f} | {cpu / args.step * 1e6:.1f}",
                  flush=True)
    finally:
        for sock in socks:
            sock.close()
        holder.kill()
        holder.wait(10)


if __name__ == "__main__":
    main()
