"""`residual unpack` against the plain loop anyone would write: pyarrow's read_table, then each image's bytes
to a file of its class.

The data: Hub-format Parquet (an Image and a ClassLabel column in the `huggingface` metadata, 100 rows per
row group as the Hub's writers make them) of JPEGs at ImageNet-like size (500 x 375, noise, so each is as
large as a photograph). Rounds alternate the two paths. Prints a table; record it in docs/BENCHMARKS.md.

    python benchmarks/unpack.py [--images 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from residual.data.unpack import unpack_dataset

CLASSES = [f"class{index}" for index in range(10)]


def write_hub_files(folder: Path, count: int) -> int:
    """Two shards of `count` JPEGs; returns their bytes."""
    noise = (np.random.default_rng(0).random((375, 500, 3)) * 255).astype(np.uint8)
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.roll(noise, 7 * index, axis=1)).save(buffer, "JPEG", quality=85)
        images.append({"bytes": buffer.getvalue(), "path": f"image{index}.JPEG"})
    features = {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    (folder / "data").mkdir(parents=True)
    half = count // 2
    for shard, rows in enumerate((slice(0, half), slice(half, count))):
        table = pa.table({"image": images[rows], "label": [index % 10 for index in range(count)][rows]})
        pq.write_table(table.replace_schema_metadata(metadata), folder / f"data/train-{shard:05d}-of-00002.parquet",
                       row_group_size=100)
    return sum(len(image["bytes"]) for image in images)


def plain_loop(source: Path, out: Path) -> None:
    for path in sorted(source.rglob("*.parquet")):
        table = pq.read_table(path)
        for cell, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist()):
            folder = out / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / cell["path"]).write_bytes(cell["bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "hub"
        size = write_hub_files(source, args.images)
        paths = {"residual unpack (unpack_dataset)": lambda out: unpack_dataset(source, out, progress=False),
                 "plain loop (read_table, write_bytes)": lambda out: plain_loop(source, out)}
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, run in paths.items():
                out = Path(folder) / "out"
                start = time.perf_counter()
                run(out)
                seconds[name].append(time.perf_counter() - start)
                shutil.rmtree(out)
    print(f"{args.images} JPEGs, {size / 1e6:.0f} MB, {args.rounds} rounds")
    print("| path | images/s median | min - max | MB/s median |")
    print("|---|---:|---:|---:|")
    medians = {}
    for name, values in seconds.items():
        medians[name] = statistics.median(values)
        print(f"| {name} | {args.images / medians[name]:,.0f} | {args.images / max(values):,.0f} - "
              f"{args.images / min(values):,.0f} | {size / 1e6 / medians[name]:,.0f} |")
    ours, plain = medians.values()
    print(f"residual's time / the plain loop's: {ours / plain:.2f}")


if __name__ == "__main__":
    main()
