"""Benchmark: ``p2v serve --ray`` with CPU actors, one actor against two.

Two figures, each on a pool of one actor and then of two (one thread each, so two actors use two
cores where one uses one):

* the first edit of one clip (an empty inversion cache): with two actors, one edits while the
  other inverts the frames ahead of it, so the inversion half of the work should nearly vanish
  from the wall time;
* two clips submitted together against the same two one after the other (each its own client
  and connection, as ``p2v batch --server`` sends them).

A local ``edit_clip`` in this process (one thread) gives the baseline of the first edit. Each
figure is the median of ``--repeats`` runs, with the spread (min-max); ratios are taken within
one pool, where both sides see the same machine. Random-weight models: no hub needed.

    p2v make-tiny-models /tmp/models
    python scripts/bench_pool.py --model /tmp/models/sd2-depth --size 128 --steps 20 --frames 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from p2v_runtime.client import Client
from p2v_runtime.settings import EditSettings


def clip(count: int, size: int, seed: int) -> list[np.ndarray]:
    """A square moving over a gradient: different per frame, the same every run."""
    rng = np.random.default_rng(seed)
    background = np.zeros((size, size, 3), np.uint8)
    background[..., 0] = np.linspace(20, 235, size, dtype=np.uint8)[None, :]
    background[..., 1] = np.linspace(200, 40, size, dtype=np.uint8)[:, None]
    background[..., 2] = rng.integers(60, 90)
    frames = []
    for index in range(count):
        frame = background.copy()
        x = (index * size // (2 * count) + seed * 7) % (size - size // 3)
        frame[size // 3 : 2 * size // 3, x : x + size // 3] = (230, 230, 230)
        frames.append(frame)
    return frames


class Pool:
    def __init__(self, actors: int):
        env = {k: v for k, v in os.environ.items() if k != "P2V_TOKEN"}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2v_runtime.server", "--ray", "--actors", str(actors), "--actor-threads", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.ready = json.loads(self.proc.stdout.readline())

    def job(self, settings: EditSettings, frames) -> dict:
        height, width = frames[0].shape[:2]
        with Client.connect(self.ready["address"], self.ready["token"]) as client:
            for message in client.run_job(settings, [f.tobytes() for f in frames], width, height):
                if message.type == "done":
                    return message["stats"]
        raise RuntimeError("the job did not finish")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def together(pool: Pool, jobs) -> float:
    def run():
        threads = [threading.Thread(target=pool.job, args=job) for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return timed(run)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} s  ({min(values):.2f}-{max(values):.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SD 2 depth folder")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args(argv)

    import torch

    from p2v_runtime.editor import edit_clip

    torch.set_num_threads(1)
    scratch = tempfile.mkdtemp(prefix="p2v-bench-pool-")
    caches = iter(range(10_000))

    def settings() -> EditSettings:  # a new, empty inversion cache each time: a first edit
        return EditSettings(
            prompt="a red sports car",
            source_prompt="a grey car on a road",
            model=args.model,
            device="cpu",
            steps=args.steps,
            size=args.size,
            cache_dir=os.path.join(scratch, f"cache-{next(caches)}"),
        ).validate()

    clips = [clip(args.frames, args.size, seed) for seed in (1, 2)]

    class Frames:
        size = (args.size, args.size)
        description = "benchmark clip"

        def __len__(self):
            return args.frames

        def read(self, index):
            return clips[0][index]

    figures: dict[str, list[float]] = {"local": []}
    list(edit_clip(Frames(), settings()))  # load the models once
    for _ in range(args.repeats):
        figures["local"].append(timed(lambda: list(edit_clip(Frames(), settings()))))
    inversions = {}
    for actors in (1, 2):
        pool = Pool(actors)
        try:
            pool.job(settings(), clip(4, args.size, 9))  # every actor loads the models
            first, both, serial = [], [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                inversions[actors] = pool.job(settings(), clips[0])
                first.append(time.perf_counter() - started)
                both.append(together(pool, [(settings(), frames) for frames in clips]))
                started = time.perf_counter()
                for frames in clips:
                    pool.job(settings(), frames)
                serial.append(time.perf_counter() - started)
            figures[f"first edit, {actors} actor(s)"] = first
            figures[f"two clips together, {actors} actor(s)"] = both
            figures[f"two clips one after the other, {actors} actor(s)"] = serial
        finally:
            pool.stop()

    print(f"{args.frames} frames at {args.size}x{args.size}, {args.steps} steps, CPU actors of one thread each")
    print(f"{'local edit_clip (1 thread)':42} {summary(figures['local'])}")
    for name, values in figures.items():
        if name != "local":
            print(f"{name:42} {summary(values)}")
    for actors in (1, 2):
        print(f"inversions by actor, {actors} actor(s): {inversions[actors]['pool_inversions']}")
    median = {name: statistics.median(values) for name, values in figures.items()}
    print(f"first edit, 2 actors / 1 actor: {median['first edit, 2 actor(s)'] / median['first edit, 1 actor(s)']:.2f}")
    for actors in (1, 2):
        ratio = (
            median[f"two clips together, {actors} actor(s)"]
            / median[f"two clips one after the other, {actors} actor(s)"]
        )
        print(f"two clips together / one after the other, {actors} actor(s): {ratio:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "seconds": figures}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
