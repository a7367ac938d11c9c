"""The `residual` command: parse arguments, call the Python API, print.

Errors meant for the user print as one line (`error: ...`) with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

from . import __version__
from .errors import ResidualError
from .models import list_models
from .weights import fetch_pretrained, list_pretrained, load_model, save_model


def cmd_models(args: argparse.Namespace, console: Console) -> int:
    from .tables import collect_model_info, models_table

    names = list_models(args.pattern)
    if not names:
        raise ResidualError(f"no model matches {args.pattern!r}; try `residual models` for all of them")
    console.print(models_table(collect_model_info(names, console, args.input_size)))
    return 0


def cmd_pretrained(args: argparse.Namespace, console: Console) -> int:
    from .tables import pretrained_table

    console.print(pretrained_table(list_pretrained(args.pattern)))
    return 0


def cmd_download(args: argparse.Namespace, console: Console) -> int:
    for name in args.names:
        console.print(f"{name}: {fetch_pretrained(name, progress=False if args.quiet else None)}")
    return 0


def cmd_convert(args: argparse.Namespace, console: Console) -> int:
    class_names = args.classes
    if class_names and class_names != "imagenet":
        names_file = Path(class_names)
        if not names_file.is_file():
            raise ResidualError(f"--classes {names_file}: no such file; give 'imagenet' or a file with one name per line")
        class_names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = load_model(args.checkpoint, arch=args.arch, num_classes=args.num_classes, class_names=class_names)
    out = Path(args.output or Path(args.checkpoint).with_suffix(".safetensors"))
    if out.resolve() == Path(args.checkpoint).resolve():
        raise ResidualError(f"{out}: would overwrite the checkpoint being converted; choose another --output")
    save_model(model, out, extra={"converted_from": Path(args.checkpoint).name})
    console.print(f"wrote {out} ({model.arch}, {model.num_classes} classes)")
    return 0


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    from .tables import model_file_table

    console.print(model_file_table(Path(args.model)))
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from .demo import run_demo

    result = run_demo(args.out, console)
    return 0 if result["reload_identical"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="residual", description="Deep residual networks for image recognition.")
    parser.add_argument("--version", action="version", version=f"residual {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("models", help="table of every ResNet: parameters, MACs, depth, block")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*'")
    p.add_argument("--input-size", type=int, help="count MACs at this size instead of each model's default")
    p.set_defaults(run=cmd_models)

    p = commands.add_parser("pretrained", help="published weights that create_model/load_model can fetch")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(run=cmd_pretrained)

    p = commands.add_parser("download", help="fetch pretrained weights into the cache (sha256-checked)")
    p.add_argument("names", nargs="+", metavar="NAME", help="e.g. resnet50.tv2_in1k")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_download)

    p = commands.add_parser("convert", help="a torchvision/timm checkpoint -> a residual model file")
    p.add_argument("checkpoint", help=".pth/.pt/.bin (loaded with weights_only=True) or .safetensors")
    p.add_argument("--arch", required=True, help="architecture it holds, e.g. resnet50 (see `residual models`)")
    p.add_argument("--num-classes", type=int, help="keep the backbone, new head with this many classes")
    p.add_argument("--classes", help="'imagenet', or a text file with one class name per line")
    p.add_argument("-o", "--output", help="model file to write (default: CHECKPOINT with .safetensors)")
    p.set_defaults(run=cmd_convert)

    p = commands.add_parser("info", help="what a model file holds: architecture, classes, preprocessing")
    p.add_argument("model", help="a .safetensors model file")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("demo", help="the guided tour on generated data")
    p.add_argument("--out", default="runs/demo", help="where the demo writes its files")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    console = Console()
    try:
        return args.run(args, console)
    except ResidualError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
