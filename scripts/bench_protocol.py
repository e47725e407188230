"""Round-trip frames per second through the runtime's socket, with the echo job (no model).

Starts ``p2v serve --job-runner echo`` as a subprocess on 127.0.0.1, sends N frames of
512x512 uint8 RGB, and counts until the last result is back: every frame crosses the socket
twice and is spooled to and read back from the job folder on the way, as in a real job.

    python scripts/bench_protocol.py [--frames 1000] [--size 512] [--runs 5] [--spool-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from p2v_runtime.client import Client  # noqa: E402

TARGET_FPS = 500.0


def start_server(spool_dir: str | None = None) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ, P2V_TOKEN="")
    extra = ["--spool-dir", spool_dir] if spool_dir else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2v_runtime.server", "--job-runner", "echo", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit("bench: the server did not start")
    return proc, json.loads(line)


def one_run(client: Client, frames: list[bytes], size: int) -> float:
    settings = {"prompt": "echo steps=1", "depth_norm": "frame"}  # the echo runner reads its options from the prompt
    received = 0
    started = time.perf_counter()
    for message in client.run_job(settings, frames.__getitem__, size, size, count=len(frames)):
        if message.type == "result":
            received += 1
        elif message.type == "done":
            break
    elapsed = time.perf_counter() - started
    if received != len(frames):
        raise SystemExit(f"bench: {received} of {len(frames)} frames came back")
    return len(frames) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--spool-dir", default=None, help="the server's --spool-dir (default: its temp folder)")
    args = parser.parse_args()
    distinct = [bytes([i]) * (args.size * args.size * 3) for i in range(16)]
    frames = [distinct[i % len(distinct)] for i in range(args.frames)]
    proc, ready = start_server(args.spool_dir)
    try:
        with Client(ready["host"], ready["port"], ready["token"]) as client:
            one_run(client, frames[:50], args.size)  # warm up
            rates = [one_run(client, frames, args.size) for _ in range(args.runs)]
            client.shutdown(ready["token"])
    finally:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    best = max(rates)
    median = sorted(rates)[len(rates) // 2]
    mb = args.size * args.size * 3 / 1e6
    print(
        f"{args.size}x{args.size} RGB round trip through the socket (echo job, spooled to disk): "
        f"median {median:.0f} frames/s, best {best:.0f} frames/s over {args.runs} runs of {args.frames} frames "
        f"(runs: {', '.join(f'{r:.0f}' for r in rates)}; median {median * mb * 2:.0f} MB/s both ways); "
        f"target {TARGET_FPS:.0f} frames/s: {'met' if median >= TARGET_FPS else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
