"""How many planted label errors `residual label-errors` finds in multi-label data.

    python benchmarks/planted_label_errors.py plant data/tags/labels.csv data/tags/noisy.csv --share 0.05
    residual label-errors data/tags/noisy.csv --folds 3 --epochs 40 --batch-size 32 --out runs/audit
    python benchmarks/planted_label_errors.py score data/tags/noisy.planted.json runs/audit/noisy/label_issues.csv

`plant` edits a seeded share of the rows of a multi-label CSV (image,labels,split): alternately one of an
image's labels is dropped (a label missing) or a class it lacks is added (a label wrong; also where an image
has no label to drop), and writes which beside the new CSV. `score` reads label_issues.csv: how many planted
rows were flagged, how many with the planted edit named, and how many planted rows are among the worst
suspects (as many as were planted).
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def plant(source: Path, out: Path, share: float, seed: int) -> None:
    with open(source, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    classes = sorted({name for row in rows for name in row["labels"].split()})
    rng = np.random.default_rng(seed)
    planted = {}
    for turn, index in enumerate(rng.choice(len(rows), round(share * len(rows)), replace=False)):
        labels = rows[index]["labels"].split()
        if turn % 2 == 0 and labels:
            dropped = labels[rng.integers(len(labels))]
            rows[index]["labels"] = " ".join(name for name in labels if name != dropped)
            planted[rows[index]["image"]] = f"+{dropped}"  # the edit that undoes it
        else:
            absent = [name for name in classes if name not in labels]
            added = absent[rng.integers(len(absent))]
            rows[index]["labels"] = " ".join(sorted(labels + [added]))
            planted[rows[index]["image"]] = f"-{added}"
    with open(out, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".planted.json").write_text(json.dumps(planted, indent=1))
    missing = sum(edit.startswith("+") for edit in planted.values())
    print(f"{len(planted)} of {len(rows)} rows edited: {missing} lost a label, {len(planted) - missing} gained one; "
          f"{out}, {out.with_suffix('.planted.json')}")


def score(planted_file: Path, issues_file: Path) -> None:
    planted = json.loads(planted_file.read_text())
    root = planted_file.parent.resolve()
    with open(issues_file, newline="", encoding="utf-8") as stream:
        issues = list(csv.DictReader(stream))
    edits = {str(Path(row["image"]).relative_to(root)): {f"+{name}" for name in row["missing"].split()}
             | {f"-{name}" for name in row["wrong"].split()} for row in issues}
    worst = [str(Path(row["image"]).relative_to(root)) for row in issues[:len(planted)]]
    for kind, sign in (("all", ""), ("a label missing", "+"), ("a label wrong", "-")):
        rows = [image for image, edit in planted.items() if edit.startswith(sign)]
        found = [image for image in rows if image in edits]
        named = [image for image in found if planted[image] in edits[image]]
        print(f"{kind}: {len(rows)} planted, {len(found)} flagged ({len(found) / len(rows):.1%}), "
              f"{len(named)} with the planted edit named")
    print(f"{len(issues)} suspects; precision {sum(image in planted for image in edits) / max(len(issues), 1):.1%}; "
          f"{sum(image in planted for image in worst)} planted among the worst {len(planted)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plant")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--share", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=7)
    p = commands.add_parser("score")
    p.add_argument("planted", type=Path)
    p.add_argument("issues", type=Path)
    args = parser.parse_args()
    if args.command == "plant":
        plant(args.source, args.out, args.share, args.seed)
    else:
        score(args.planted, args.issues)


if __name__ == "__main__":
    main()
