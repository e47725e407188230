"""The order a clip is edited in and what each frame reads (docs/algorithm.md, "Anchor and order").

The plan is drawn before the first frame from the clip length and the settings alone (anchor,
injection, seed), so the editor knows ahead which frames' features a later frame will read:
only those are recorded, and each step of them is freed as soon as the last frame that reads it
has done that step. Standard library only, so it is cheap to reason about and to test.

Edit order, with the anchor at frame ``a`` of ``n``: ``a``, then backward ``a-1 .. 0``, then
forward ``a+1 .. n-1``. "Previous" is the neighbour already edited on the way from the anchor
(``i+1`` going backward, ``i-1`` going forward); with the paper's anchor (frame 0) the backward
pass is empty and this is the paper's order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Which frames each injection mode attends to; the order is the token order of K/V.
SOURCES_BY_MODE = {
    "anchor+previous": ("anchor", "previous"),
    "anchor+random": ("anchor", "random"),
    "anchor": ("anchor",),
    "previous": ("previous",),
    "none": (),
}


@dataclass(frozen=True)
class Turn:
    """One frame's place in the edit."""

    position: int  # in edit order; 0 is the anchor
    index: int  # the frame of the clip, counted from 0
    previous: int | None  # the neighbour edited before it on the way from the anchor; None for the anchor
    sources: tuple[int, ...]  # frames whose recorded features give its K/V, in token order; () = plain
    record: bool  # a later turn reads this frame's features
    keep_x0: bool  # a later turn's guided update pulls towards this frame's predictions


@dataclass(frozen=True)
class EditPlan:
    anchor: int
    count: int  # frames in the clip
    turns: tuple[Turn, ...]  # in edit order (only the anchor's for a preview)
    last_reader: dict[int, int]  # frame -> position of the last turn whose sources include it
    last_pull: dict[int, int]  # frame -> position of the last turn whose guided update pulls towards it

    def output_order(self) -> list[int]:
        """The frames in the order they are handed out: frame order (the anchor alone for a preview)."""
        return sorted(turn.index for turn in self.turns)

    def feature_steps_peak(self, steps: int) -> int:
        """The most steps' worth of features held at once (one step: one frame's features at one
        step, all layers, both branches), the frame being recorded included.

        A frame whose last reader is the turn being edited is freed step by step while that turn
        records step by step: at the end of step ``s`` it still holds steps ``s..S-1`` and the
        current frame holds ``0..s``. So a previous frame and the current one make one frame and
        one step, not two frames.
        """
        held: set[int] = set()
        peak = 0
        for turn in self.turns:
            ending = {frame for frame in held if self.last_reader[frame] == turn.position}
            recording = 1 if turn.record else 0
            during = max(len(ending) * (steps - s) + recording * (s + 1) for s in range(steps))
            peak = max(peak, (len(held) - len(ending)) * steps + during)
            held -= ending
            if turn.record:
                held.add(turn.index)
        return peak


def edit_order(count: int, anchor: int) -> list[tuple[int, int | None]]:
    """``(frame, previous)`` in edit order: the anchor, backward to frame 0, forward to the end."""
    order: list[tuple[int, int | None]] = [(anchor, None)]
    order += [(index, index + 1) for index in range(anchor - 1, -1, -1)]
    order += [(index, index - 1) for index in range(anchor + 1, count)]
    return order


def random_earlier_frame(rng: random.Random, index: int, anchor: int) -> int:
    """A frame edited before ``index`` on its side of the anchor, drawn uniformly; the anchor itself
    only for the anchor's neighbours (the anchor is already the other source)."""
    between = range(index + 1, anchor) if index < anchor else range(anchor + 1, index)
    return rng.choice(between) if len(between) else anchor


def plan_edit(count: int, anchor: int, injection: str, seed: int = 0, *, update: bool = True, limit=None) -> EditPlan:
    """The turns of a ``count``-frame edit from ``anchor``; ``limit`` turns only (1: a preview).

    ``seed`` draws the random earlier frames of ``anchor+random`` (``random.Random(seed)``, one
    draw per turn in edit order; no global generator is touched). ``update``: whether the guided
    update runs, so a frame's predictions are kept for the next one.
    """
    if not 0 <= anchor < count:
        raise ValueError(f"anchor {anchor} outside a clip of {count} frames")
    roles = SOURCES_BY_MODE[injection]
    rng = random.Random(seed)
    order = edit_order(count, anchor)[: limit if limit is not None else count]
    drafts = []
    for position, (index, previous) in enumerate(order):
        sources: tuple[int, ...] = ()
        if position > 0:
            role_frames = {"anchor": anchor, "previous": previous}
            if "random" in roles:
                role_frames["random"] = random_earlier_frame(rng, index, anchor)
            sources = tuple(role_frames[role] for role in roles)
        drafts.append((position, index, previous, sources))
    last_reader: dict[int, int] = {}
    last_pull: dict[int, int] = {}
    for position, _index, previous, sources in drafts:
        for frame in sources:
            last_reader[frame] = position
        if update and previous is not None:
            last_pull[previous] = position
    turns = tuple(
        Turn(position, index, previous, sources, record=index in last_reader, keep_x0=index in last_pull)
        for position, index, previous, sources in drafts
    )
    return EditPlan(anchor=anchor, count=count, turns=turns, last_reader=last_reader, last_pull=last_pull)
