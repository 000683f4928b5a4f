"""The link shaper's own cost at no shaping, against a direct loopback connection.

For each of --repeats rounds, side by side: the round-trip time of a 64-byte message
(median of 200) and the time to echo --megabytes through an echo server, directly and
through a `LinkShaper` relay with the "none" profile. Prints medians and ratios and writes
JSON (atomically) to --out.

    .venv/bin/python benchmarks/link_overhead.py --out benchmarks/results/link_overhead.json
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from pathlib import Path

from secfwt_jax.files import write_json_atomic
from secfwt_jax.runtime.link_shaper import LinkShaper


def echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def echo(conn):
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def _recv_exactly(conn: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = conn.recv(min(1 << 16, n - got))
        if not chunk:
            raise ConnectionError("closed early")
        got += len(chunk)


def round_trip_s(port: int, count: int = 200) -> float:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            conn.sendall(b"x" * 64)
            _recv_exactly(conn, 64)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def echo_s(port: int, payload: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        start = time.perf_counter()
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        _recv_exactly(conn, len(payload))
        sender.join()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/link_overhead.json"))
    args = parser.parse_args()
    server, port = echo_server()
    payload = os.urandom(args.megabytes << 20)
    rows = {"direct": {"rtt_s": [], "echo_s": []}, "relay": {"rtt_s": [], "echo_s": []}}
    with LinkShaper({"echo": ("127.0.0.1", port)}) as shaper:
        ports = {"direct": port, "relay": shaper.port("echo")}
        for _ in range(args.repeats):
            for how, p in ports.items():  # side by side, alternating
                rows[how]["rtt_s"].append(round_trip_s(p))
                rows[how]["echo_s"].append(echo_s(p, payload))
    server.close()
    summary = {}
    for how, r in rows.items():
        rtt, echo = statistics.median(r["rtt_s"]), statistics.median(r["echo_s"])
        summary[how] = {"rtt_us": round(rtt * 1e6, 1), "echo_gbps": round(8 * len(payload) / echo / 1e9, 3)}  # fmt: skip
    ratio = {
        "rtt_relay_over_direct": round(summary["relay"]["rtt_us"] / summary["direct"]["rtt_us"], 2),
        "throughput_relay_over_direct": round(
            summary["relay"]["echo_gbps"] / summary["direct"]["echo_gbps"], 3
        ),  # fmt: skip
    }
    for how, s in summary.items():
        print(f"{how:6s}: round trip {s['rtt_us']:8.1f} us (median)   echo {s['echo_gbps']:.3f} Gbit/s each way (median)")  # fmt: skip
    print(f"relay / direct: round trip {ratio['rtt_relay_over_direct']}x, throughput {ratio['throughput_relay_over_direct']}x")  # fmt: skip
    write_json_atomic(args.out, {"command": f"benchmarks/link_overhead.py --repeats {args.repeats} --megabytes {args.megabytes}",
                                 "measured": time.strftime("%Y-%m-%d"), "summary": summary, "ratio": ratio, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
