"""Progress on stderr for the command line: bars on a terminal, plain lines in logs."""

from __future__ import annotations

import sys

from .client import QUEUE_STAGE, queue_text


class ProgressBars:
    """Progress on stderr: a tqdm bar per stage on a terminal, plain lines in logs.

    Inversion and edit alternate per frame, so each stage keeps its own bar. When stderr is not
    a terminal (a farm log, a pipe), bars would be noise: one line per stage start and per
    finished frame instead.
    """

    def __init__(self, enabled: bool = True, steps: int = 1, *, prefix: str = "p2v: ", lines: bool = False):
        self.enabled = enabled
        self.steps = steps
        self.prefix = prefix  # p2v batch names the clip: "p2v batch: shot010: "
        self.interactive = sys.stderr.isatty() and not lines  # lines: several jobs share the terminal
        self.bars: dict = {}
        self.printed: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage == "download":
            self._download(done, total)
            return
        if stage == QUEUE_STAGE:  # a pool's queue: done is the job's place (1: next to start)
            if self.printed.get(stage) != done:
                self.printed[stage] = done
                self._say(queue_text(done))
            return
        if not self.interactive:
            self._line(stage, done, total)
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            unit = "step" if stage in ("inversion", "edit") else "it"
            bar = tqdm(
                total=total, desc=f"{stage:>9}", unit=unit, file=sys.stderr, position=len(self.bars), dynamic_ncols=True
            )
            self.bars[stage] = bar
        bar.n = done
        bar.refresh()

    def _download(self, done: int, total: int) -> None:
        """Bytes of a model download: a bar with rate and time left, or a line every few seconds."""
        from .hub import ByteMeter

        meter = self.printed.get("download-meter")
        if meter is None or meter.total != total or done < meter.done:  # a new download (another model)
            meter = self.printed["download-meter"] = ByteMeter(total, done)
            self.printed["download-line"] = None
            if "download" in self.bars:
                self.bars.pop("download").close()
        meter.advance(done - meter.done)
        if self.interactive:
            from tqdm import tqdm

            bar = self.bars.get("download")
            if bar is None:
                bar = tqdm(
                    total=total,
                    initial=done,
                    desc=" download",
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1000,
                    file=sys.stderr,
                    position=len(self.bars),
                    dynamic_ncols=True,
                )
                self.bars["download"] = bar
            bar.update(done - bar.n)
            return
        last = self.printed.get("download-line")
        now = meter.clock()
        finished = done >= total and self.printed.get("download-finished") != total
        if last is None or finished or (done < total and now - last >= 5):
            self.printed["download-line"] = now
            self.printed["download-finished"] = total if done >= total else None
            self._say(f"download {meter.describe()}")

    def _line(self, stage: str, done: int, total: int) -> None:
        per_frame = self.steps if stage in ("inversion", "edit") else 1
        if done % per_frame:
            return
        finished = done // per_frame
        if self.printed.get(stage) == finished:
            return
        self.printed[stage] = finished
        if finished == 0:
            self._say(f"{stage}...")
        elif stage in ("depth", "inversion", "edit"):
            self._say(f"{stage} {finished}/{total // per_frame} frames")

    def warn(self, message: str) -> None:
        self._say(f"warning: {message}")

    def _say(self, text: str) -> None:
        """One whole line in one write, so lines of jobs running side by side never mix."""
        sys.stderr.write(f"{self.prefix}{text}\n")
        sys.stderr.flush()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}
