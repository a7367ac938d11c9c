"""A live stream's segments as they close: `SegmentFinder` (frames made final as they come, only the smoothing
window kept) against its peer, every frame kept and the whole stream's segments worked out again at each look
(once a second of the stream: how `predict --format segments` did it before 2026-12-07). Synthetic scores: 5 s
scenes of a random class, noise below; 30 frames a second in batches of 8, as a camera's arrive.

Prints, per path, the seconds spent on the segments (the scores drawn outside the clock), the most memory numpy
and Python held at once while they ran (tracemalloc), the most frames kept, and checks the two paths found the
same segments. With --timeline, the same for what `--timeline` keeps of the stream to draw: `TimelineScores`
(at most TIMELINE_POINTS points, neighbours merged) against FrameScores (every frame, as before 2026-12-07),
each then drawn.

    .venv/bin/python benchmarks/live_segments.py [--classes 1000] [--minutes 10] [--peer-minutes 10] [--timeline]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch

from residual.video import (CLOSED_LOOK_SECONDS, FrameScores, Segment, SegmentFinder, TimelineScores, plot_timeline,
                            segments)

FPS, BATCH, SCENE_SECONDS = 30, 8, 5


def stream(classes: int, minutes: float, seed: int = 0):
    """(times, probabilities) batches of a synthetic stream."""
    rng = np.random.default_rng(seed)
    frames = int(minutes * 60 * FPS)
    scenes = np.repeat(rng.integers(0, classes, frames // (SCENE_SECONDS * FPS) + 1), SCENE_SECONDS * FPS)
    for start in range(0, frames, BATCH):
        stop = min(start + BATCH, frames)
        probabilities = rng.uniform(0, 0.5 / classes, (stop - start, classes)).astype(np.float32)
        probabilities[np.arange(stop - start), scenes[start:stop]] += 0.5
        yield list(np.arange(start, stop) / FPS), torch.from_numpy(probabilities)


def finder_path(names: list[str], batches) -> tuple[list, float, int]:
    finder, found, seconds, most_kept = SegmentFinder(names, smooth=1.0), [], 0.0, 0
    for times, probabilities in batches:
        start = time.perf_counter()
        finder.add(times, probabilities)
        found += finder.closed()
        seconds += time.perf_counter() - start
        most_kept = max(most_kept, finder.kept_frames)
    start = time.perf_counter()
    found += finder.finish()
    return found, seconds + time.perf_counter() - start, most_kept


def recompute_path(names: list[str], batches) -> tuple[list, float, int]:
    times, chunks, looked_at, found, seconds = [], [], -np.inf, [], 0.0
    for batch_times, probabilities in batches:
        start = time.perf_counter()
        times += batch_times
        chunks.append(probabilities.numpy())
        if times[-1] >= looked_at + CLOSED_LOOK_SECONDS:
            looked_at = times[-1]
            found = segments(np.asarray(times), np.concatenate(chunks), names, smooth=1.0)
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    found = segments(np.asarray(times), np.concatenate(chunks), names, smooth=1.0)
    return found, seconds + time.perf_counter() - start, len(times)


def timeline_path(keep_every_frame: bool):
    """What --timeline keeps of the stream, then the picture drawn from it (its segments: one per scene)."""
    def path(names: list[str], batches) -> tuple[list, float, int]:
        record, seconds = FrameScores() if keep_every_frame else TimelineScores(len(names)), 0.0
        for times, probabilities in batches:
            start = time.perf_counter()
            record.add(times, probabilities, None)
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        times, probabilities = record.arrays(len(names))
        seconds += time.perf_counter() - start
        drawn = scene_segments(times, probabilities, names)  # as the finder would hand them on: not timed
        start = time.perf_counter()
        plot_timeline(times, probabilities, drawn, names, "/tmp/live_segments.timeline.png", "stream", 1.0, None,
                      getattr(record, "frames_per_point", 1))
        return drawn, seconds + time.perf_counter() - start, len(times)
    return path


def scene_segments(times: np.ndarray, probabilities: np.ndarray, names: list[str]) -> list[Segment]:
    """A segment per run of one top class (the synthetic scenes), with no copy of the probabilities."""
    top = probabilities.argmax(axis=1)
    bounds = [0, *(np.flatnonzero(top[1:] != top[:-1]) + 1).tolist(), len(top)]
    return [Segment(float(times[a]), float(times[b - 1]), names[top[a]], 1.0, b - a)
            for a, b in zip(bounds, bounds[1:])]


def measure(path, classes: int, minutes: float) -> tuple[list, float, float, int]:
    names = [f"class {index}" for index in range(classes)]
    tracemalloc.start()
    found, seconds, most_kept = path(names, stream(classes, minutes))
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return found, seconds, peak, most_kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=10, help="the stream's length for the finder")
    parser.add_argument("--peer-minutes", type=float, default=10,
                        help="the stream's length for the peer (its time grows with the square of it)")
    parser.add_argument("--timeline", action="store_true", help="measure what --timeline keeps instead")
    args = parser.parse_args()
    if args.timeline:
        plot_timeline(np.zeros(1), np.zeros((1, 1)), [], ["a"], "/tmp/live_segments.timeline.png", "warm-up")  # imports
        for name, keep_every_frame in (("TimelineScores", False), ("FrameScores", True)):
            _, seconds, peak, points = measure(timeline_path(keep_every_frame), args.classes, args.minutes)
            print(f"{name:<22} {args.classes} classes, {args.minutes:g} min at {FPS} frames/s: {seconds:7.1f} s "
                  f"keeping and drawing, peak {peak:6.0f} MiB, {points} points drawn", flush=True)
        return
    rows = []
    for name, path, minutes in (("SegmentFinder", finder_path, args.minutes),
                                ("recomputed each look", recompute_path, args.peer_minutes)):
        found, seconds, peak, most_kept = measure(path, args.classes, minutes)
        rows.append((name, minutes, found, seconds, peak, most_kept))
        print(f"{name:<22} {args.classes} classes, {minutes:g} min at {FPS} frames/s: {seconds:7.1f} s on the "
              f"segments ({seconds / (minutes * 60):.1%} of the stream's time), peak {peak:6.0f} MiB, "
              f"{most_kept} frames kept at most, {len(found)} segments", flush=True)
    (_, finder_minutes, finder_found, *_), (_, peer_minutes, peer_found, *_) = rows
    if finder_minutes == peer_minutes:
        same = [(s.label, s.start, s.end, s.frames) for s in sorted(finder_found, key=lambda s: s.start)] == \
            [(s.label, s.start, s.end, s.frames) for s in peer_found]
        print("the same segments" if same else "THE SEGMENTS DIFFER")


if __name__ == "__main__":
    main()
