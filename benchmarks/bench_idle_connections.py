"""Threads and resident memory a server holds for connections that never log in:
300 idle (connected, silent) and 100 stalled (half a header sent), plus three that
declare a 512 MiB body before `hello`. Prints figures; asserts nothing.

    python benchmarks/bench_idle_connections.py [--repo PATH]   (PATH: another checkout
    to measure, e.g. the commit before the fix, run with its own code)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import subprocess
import sys

PREFIX = struct.Struct("!4sIQ")


def status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Threads", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def read_welcome(sock: socket.socket) -> None:
    prefix = b""
    while len(prefix) < 16:
        prefix += sock.recv(16 - len(prefix))
    _, header_len, _ = PREFIX.unpack(prefix)
    got = 0
    while got < header_len:
        got += len(sock.recv(header_len - got))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    env = {**os.environ, "PYTHONPATH": args.repo, "DLSERVER_TOKEN": "bench-token"}
    extra = ["--max-connections", "1000", "--max-unauthenticated", "1000"]
    help_text = subprocess.run([sys.executable, "-m", "dlserver", "--help"], cwd=args.repo,
                               env=env, capture_output=True, text=True).stdout
    command = [sys.executable, "-m", "dlserver", "--port", "0"]
    if "--max-connections" in help_text:
        command += extra
    server = subprocess.Popen(command, cwd=args.repo, env=env, stderr=subprocess.PIPE,
                              text=True)
    try:
        for line in server.stderr:  # type: ignore[union-attr]
            if line.startswith("{"):
                port = json.loads(line)["listening"][1]
                break
        base = status(server.pid)
        print(f"server at rest: {base['Threads']} threads, {base['VmRSS'] / 1024:.1f} MiB")
        idle = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port))
            read_welcome(sock)
            idle.append(sock)
        now = status(server.pid)
        print(f"300 idle: +{now['Threads'] - base['Threads']} threads, "
              f"+{(now['VmRSS'] - base['VmRSS']) / 1024:.1f} MiB")
        stalled = []
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", port))
            read_welcome(sock)
            sock.sendall(PREFIX.pack(b"DLSV", 200, 0) + b'{"type": "hel')
            stalled.append(sock)
        later = status(server.pid)
        print(f"+100 stalled: +{later['Threads'] - now['Threads']} threads, "
              f"+{(later['VmRSS'] - now['VmRSS']) / 1024:.1f} MiB")
        big = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port))
            read_welcome(sock)
            header = json.dumps({"type": "hello", "id": 0, "version": 1,
                                 "buffers": [512 << 20]}).encode()
            sock.sendall(PREFIX.pack(b"DLSV", len(header), 512 << 20) + header)
            sock.settimeout(3)
            try:
                answer = sock.recv(4096)
            except socket.timeout:
                answer = b"(no answer: the server waits for the body)"
            big.append((sock, answer))
        last = status(server.pid)
        print(f"+3 declaring a 512 MiB body before hello: "
              f"+{(last['VmRSS'] - later['VmRSS']) / 1024:.1f} MiB; answer: "
              f"{big[0][1][16:120]!r}")
        for sock in idle + stalled + [s for s, _ in big]:
            sock.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
