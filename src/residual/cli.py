"""The `residual` command: parse arguments, call the Python API, print.

Errors meant for the user print as one line (`error: ...`) with exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from pathlib import Path

from rich.console import Console

from . import __version__
from .errors import ConfigError, ResidualError
from .models import list_models
from .progress import message_console
from .weights import fetch_pretrained, imagenet_class_names, list_pretrained, load_model, save_model


def cmd_models(args: argparse.Namespace, console: Console) -> int:
    from .tables import collect_model_info, models_table

    names = list_models(args.pattern)
    if not names:
        raise ResidualError(f"no model matches {args.pattern!r}; try `residual models` for all of them")
    console.print(models_table(collect_model_info(names, console, args.input_size)))
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from .atomic import write_json
    from .data.datasets import data_name
    from .runs import output_dir
    from .tables import SCORE_NAMES, data_scores_table, runs_table
    from .train.compare import compare_runs, score_on_data
    from .train.history import plot_runs, plot_scores

    records, differing = compare_runs(args.runs)
    console.print(runs_table(records, differing))
    if not differing:
        console.print("their recipes are the same (apart from where they were written)")
    scores = (score_on_data(records, args.data, args.split, args.device, args.batch_size, args.workers,
                            progress=not args.quiet) if args.data else [])
    with output_dir(args.out, "runs/compare", records[0].name) as out:
        out.mkdir(parents=True, exist_ok=True)
        plot_runs([(record.name, record.history) for record in records], out / "compare.png")
        if scores:
            write_json(out / "scores.json", {"data": str(args.data), "split": scores[0].split,
                                             "runs": [score.to_dict() for score in scores]})
            plot_scores([(score.record.name, score.score, score.score_ci95, score.versus_best) for score in scores],
                        out / "scores.png", f"{data_name(args.data)} ({scores[0].split}, {len(scores[0].correct):,} "
                                            f"images)", SCORE_NAMES[scores[0].metric])
    if scores:
        test = ("McNemar's exact test" if scores[0].metric == "top1" else
                "a paired bootstrap of mAP (right: every label of the image right)")
        console.print(data_scores_table(scores, f"on {args.data} ({scores[0].split}): {len(scores[0].correct):,} "
                                                f"images, the same for every run; the gap to the best by {test}"))
        scored = {score.record.path for score in scores}
        left_out = [record.name for record in records if record.path not in scored]
        if left_out:
            console.print(f"not scored (no model.safetensors yet): {', '.join(left_out)}")
    console.print(f"validation curves: {out / 'compare.png'}"
                  + (f", scores: {out / 'scores.json'} and {out / 'scores.png'}" if scores else ""))
    return 0


def cmd_summary(args: argparse.Namespace, console: Console) -> int:
    from .models.registry import empty_model
    from .models.summary import layer_summary
    from .tables import layer_summary_table

    _refuse_onnx(args.model, "the summary walks the PyTorch model's layers")
    if Path(args.model).suffix == ".safetensors":
        model = load_model(args.model).eval()
    elif weights := {entry.name: entry for entry in list_pretrained()}.get(args.model):
        model = empty_model(weights.arch)  # published weights: their architecture, at their input size
        model.preprocessing = weights.preprocessing
    else:
        model = empty_model(args.model)
    size = args.image_size or model.preprocessing.input_size
    summary = layer_summary(model, size, args.depth, model.config.in_chans)
    console.print(layer_summary_table(summary, f"{args.model} layer by layer, for one {size} px image"))
    return 0


def cmd_pretrained(args: argparse.Namespace, console: Console) -> int:
    from .tables import pretrained_table

    entries = list_pretrained(args.pattern)
    if not entries:
        raise ResidualError(f"no pretrained weights match {args.pattern!r}; try `residual pretrained` for all of them")
    console.print(pretrained_table(entries))
    return 0


def cmd_download(args: argparse.Namespace, console: Console) -> int:
    for name in args.names:
        if name == "frost":  # not weights: the photographs robustness's frost corruption lays over images
            from .robustness import frost_photographs, frost_wheel

            frost_photographs(fetch=True, progress=False if args.quiet else None)
            console.print(f"frost: {frost_wheel()} (ImageNet-C's six frost photographs)")
            continue
        console.print(f"{name}: {fetch_pretrained(name, progress=False if args.quiet else None)}")
    return 0


def class_names_option(value: str | None) -> list[str] | str | None:
    """--classes: 'imagenet' as it is, or the names a text file lists one per line."""
    if not value or value == "imagenet":
        return value
    names_file = Path(value)
    if not names_file.is_file():
        raise ResidualError(f"--classes {names_file}: no such file; give 'imagenet' or a file with one name per line")
    return [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def cmd_convert(args: argparse.Namespace, console: Console) -> int:
    class_names = class_names_option(args.classes)
    model = load_model(args.checkpoint, arch=args.arch, num_classes=args.num_classes, class_names=class_names)
    out = Path(args.output or Path(args.checkpoint).with_suffix(".safetensors"))
    if out.resolve() == Path(args.checkpoint).resolve():
        raise ResidualError(f"{out}: would overwrite the checkpoint being converted; choose another --output")
    save_model(model, out, extra={"converted_from": Path(args.checkpoint).name})
    console.print(f"wrote {out} ({model.arch}, {model.num_classes} classes)")
    return 0


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    from .tables import fields_table, model_file_table

    if Path(args.model).suffix == ".onnx":
        from .deploy.onnx import describe_onnx

        console.print(fields_table(args.model, describe_onnx(args.model)))
    elif Path(args.model).suffix == ".pte":
        from .deploy.executorch import describe_pte

        console.print(fields_table(args.model, describe_pte(args.model)))
    else:
        console.print(model_file_table(Path(args.model)))
    return 0


def _inference_model(name: str, device: str, precision: str | None = None, image_size: int | None = None,
                     threshold: float | None = None, runtime: str = "onnxruntime"):
    """A model file, pretrained name, exported .onnx (run by ONNX Runtime, or OpenVINO: `runtime`) or .pte (run by
    ExecuTorch), ready for inference.

    With `precision` a PyTorch model takes the fast path (BN folded, channels_last, that precision); an .onnx
    run by OpenVINO computes in bf16 where it is bf16.
    With `image_size` it is fed images of that size (its preprocessing's resize scaled alike).
    With `threshold`, a multi-label model predicts the classes whose probability reaches it.
    """
    model = _loaded_for_inference(name, device, precision, image_size, runtime)
    if threshold is not None:
        if not getattr(model, "multi_label", False):
            raise ResidualError(f"--threshold: {name} predicts one class per image (its most likely); the threshold "
                                f"is for multi-label models")
        model.threshold = threshold
    return model


def _loaded_for_inference(name: str, device: str, precision: str | None, image_size: int | None, runtime: str):
    from .models import prepare_for_inference
    from .runs import pick_device

    if Path(name).suffix == ".pte":
        from .deploy.executorch import ExecuTorchModel

        if precision in ("fp16", "bf16") or image_size or runtime != "onnxruntime" or device not in ("auto", "cpu"):
            raise ResidualError(f"{name}: ExecuTorch runs it on the CPU as it was exported (fp32, one input size); "
                                f"drop --precision, --image-size, --runtime and --device, or give the .safetensors "
                                f"model file")
        return ExecuTorchModel(name)
    if Path(name).suffix == ".onnx":
        from .deploy.onnx import OnnxModel

        openvino = runtime == "openvino"
        if precision == "fp16" or (precision == "bf16" and not openvino):  # fp32 and auto take the file as it is
            raise ResidualError(f"--precision {precision}: ONNX Runtime runs {name} in the precision it was exported "
                                f"with (residual export --fp16 for float16; --runtime openvino computes in bf16)")
        if image_size:
            raise ResidualError(f"--image-size: {name} was exported for one input size; give the .safetensors "
                                f"model file to run it at another")
        if openvino and device not in ("auto", "cpu"):
            raise ResidualError(f"--runtime openvino runs on the CPU; drop --device {device}")
        return OnnxModel(name, "cpu" if openvino else pick_device(device), runtime=runtime,
                         bf16=openvino and precision == "bf16")
    if runtime != "onnxruntime":
        raise ResidualError(f"--runtime {runtime} runs exported models: residual export {name}, then give the .onnx")
    model = load_model(name).to(pick_device(device)).eval()
    if image_size:
        model.preprocessing = model.preprocessing.at_size(image_size)
    return prepare_for_inference(model, pick_device(device), precision) if precision else model


SERVE_TOKEN_VARIABLE = "RESIDUAL_SERVE_TOKEN"  # where serve finds its token without --token-file
CALIBRATION_HINT_ECE = 0.05  # above this, eval suggests `residual calibrate`


def _report_failed(failed: list[str]) -> None:
    for message in failed:
        print(f"error: {message}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from .data.datasets import data_name
    from .data.loaders import check_stream
    from .evaluate import evaluate, split_as_trained
    from .predict import model_device
    from .runs import output_dir
    from .tables import eval_tables, multi_label_eval_tables

    model = _inference_model(args.model, args.device, args.precision, args.image_size, args.threshold, args.runtime)
    check_stream(args.batch_size, args.workers, args.decoder, model_device(model))  # before the report folder is made
    as_trained = split_as_trained(args.model, args.data)
    split = args.split or ("val" if as_trained else None)
    if as_trained and not args.split:
        console.print(f"{args.data}: the data {args.model} was trained on, so its {len(as_trained.val):,} images "
                      f"that training held out are evaluated (--split all: every image)")
    with output_dir(args.out, "runs/eval", f"{Path(args.model).stem}-{data_name(args.data)}") as out:
        result = evaluate(model, as_trained or args.data, split, args.tta, args.batch_size, out, args.gallery,
                          workers=args.workers, progress=not args.quiet, decoder=args.decoder, compile=args.compile,
                          unknown=args.unknown)
    console.print(f"torch.compile: {result.compiled}")
    if getattr(model, "runtime", None) in ("openvino", "executorch"):  # which runtime, in which precision
        how = f", {model.runtime_text}"
    else:
        how = f", {getattr(model, 'inference_precision', 'exported')} weights" if args.precision != "fp32" else ""
    console.rule(f"{args.model} on {args.data}, {result.metrics['images']:,} images"
                 + (f", TTA {args.tta}" if args.tta != "none" else "")
                 + (f", {args.image_size} px" if args.image_size else "") + how)
    multi_label = result.thresholds is not None
    for table in (multi_label_eval_tables if multi_label else eval_tables)(result.metrics, "summary"):
        console.print(table)
    if "unknown" in result.metrics and not multi_label:
        unknown = result.metrics["unknown"]
        console.print(f"--min-confidence {unknown['floor']:.4f} (predict, serve) keeps "
                      f"{unknown['at_floor']['coverage']:.1%} of the known images and lets "
                      f"{unknown['at_floor']['unknown_passed']:.1%} of the unknown ones through")
    if "unknown" in result.metrics and "skipped" in result.metrics["unknown"]["nearest"]:
        console.print(f"the similarity to the nearest training image was not measured: "
                      f"{result.metrics['unknown']['nearest']['skipped']}")
    elif "unknown" in result.metrics:
        nearest = result.metrics["unknown"]["nearest"]
        console.print(f"--feature-bank {result.files['feature_bank']} (predict, serve: similarity floor "
                      f"{nearest['floor']:.4f}) keeps {nearest['at_floor']['coverage']:.1%} of the known images and "
                      f"lets {nearest['at_floor']['unknown_passed']:.1%} of the unknown ones through")
    _report_failed(result.failed)
    if result.failed:
        console.print(f"[yellow]{len(result.failed)} unreadable image(s) skipped (listed above and in the report)")
    written = ", ".join(path.name for name, path in result.files.items() if name != "report")
    console.print(f"report: {result.files['report']}  ({written} in {out})")
    if result.metrics["ece"] > CALIBRATION_HINT_ECE and Path(args.model).suffix == ".safetensors":
        console.print(f"ECE {result.metrics['ece']:.3f}: the probabilities are off from how often they are right; "
                      f"`residual calibrate {args.model} {args.data}` fits temperature scaling on the validation split")
    return 0


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    from .data.datasets import input_images
    from .data.frames import is_video_source
    from .feature_bank import FeatureBank
    from .predict import class_names_of, inference_compile, iter_predict, output_columns
    from .tables import predictions_table

    by_suffix = ({".csv": "csv", ".json": "json", ".jsonl": "jsonl"}.get(Path(args.out).suffix.lower())
                 if args.out else None)
    output_format = args.format or by_suffix or "table"
    if args.out and output_format == "table":
        raise ResidualError(f"--out {args.out}: a table is printed, not written; give --format csv, json or jsonl (or "
                            f"an --out ending in .csv, .json or .jsonl)")
    args.images = _folders_of_videos_opened(args.images)
    videos = [source for source in args.images if is_video_source(source)]
    _check_video_flags(args, videos, "predict", "the videos give a row per frame and segments, the images a row each",
                       {"--fps": args.fps, "--smooth": args.smooth, "--timeline": args.timeline,
                        "--format segments": output_format == "segments" or None,
                        "--per-video": args.per_video or None},
                       {"--workers": args.workers, "--decoder torchvision": args.decoder == "torchvision" or None})
    model = _inference_model(args.model, args.device, args.precision, args.image_size, args.threshold, args.runtime)
    if videos:
        return _predict_videos(args, console, model, videos, output_format)
    items = input_images(args.images)
    if not items:
        raise ResidualError(f"no image files in {' '.join(args.images)}")
    bank = FeatureBank.load(args.feature_bank) if args.feature_bank else None
    # The bank reads the features of the model run eagerly: it is not compiled unless asked (then refused).
    compiled, why = inference_compile(model, False if bank and args.compile is None else args.compile, len(items))
    failed: list[str] = []
    names = class_names_of(model)
    topk = {"probabilities": len(names), "labels": 1}.get(output_format, args.topk)  # probabilities: every class
    predictions = iter_predict(model, items, topk, args.batch_size, args.tta, args.workers, failed,
                               progress=not args.quiet, decoder=args.decoder, compile=compiled,
                               min_confidence=args.min_confidence, feature_bank=bank)
    if not args.quiet:  # once the arguments are checked; stderr, as stdout holds the predictions
        print(f"torch.compile: {why}", file=sys.stderr)
    annotated = 0
    if args.annotate:
        from .annotate import annotated_images

        def annotating(rows):
            nonlocal annotated
            for row in annotated_images(rows, items, args.annotate):
                annotated += 1
                yield row

        predictions = annotating(predictions)
    if output_format == "table":
        rows = list(predictions)
        if rows:  # none at all: the errors below say why, an empty table adds nothing
            console.print(predictions_table(rows, f"{args.model}: top-{len(rows[0].top)} of {len(rows)} image(s)"))
    else:
        columns = output_columns(items)  # a listing's own headers: a test set's sample submission gives its shape
        write = _predictions_writer(output_format, model, columns, "image", args.min_confidence is not None, bank)
        _write_rows(args.out, lambda stream: write(predictions, stream), "prediction(s)")
    if args.annotate:
        print(f"annotated: {annotated} image(s) in {args.annotate}", file=sys.stderr)
    _report_failed(failed)
    return 1 if failed else 0


def _predictions_writer(output_format: str, model, columns: tuple[str, str], json_key: str, floor: bool,
                        bank=None):
    """predict's writer of rows for `output_format` (csv, json, jsonl, labels, probabilities): `columns` name the
    image and class columns, `json_key` the image's key; `floor` or a feature `bank`: whether each is unsure."""
    from .predict import (class_names_of, is_multi_label, write_csv, write_json, write_json_lines, write_labels,
                          write_probabilities)

    return {"csv": lambda rows, stream: write_csv(rows, stream, columns[0], is_multi_label(model),
                                                  floor=floor or bank is not None, similarity=bank is not None),
            "json": lambda rows, stream: write_json(rows, stream, json_key),
            "jsonl": lambda rows, stream: write_json_lines(rows, stream, json_key),
            "labels": lambda rows, stream: write_labels(rows, stream, columns),
            "probabilities": lambda rows, stream: write_probabilities(rows, stream, class_names_of(model), columns[0])
            }[output_format]


def _write_rows(out: str | None, write, noun: str) -> None:
    """`write(stream)` to the file `out`, atomically, saying how many `noun` it wrote; or to standard output."""
    from .atomic import atomic_path

    if out:
        with atomic_path(Path(out)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
            count = write(stream)
        print(f"wrote {count} {noun} to {out}", file=sys.stderr)
    else:
        write(sys.stdout)


def _folders_of_videos_opened(sources: list[str]) -> list[str]:
    """`sources` with each folder that holds videos and no image replaced by its videos, searched through, in
    name order (`residual predict MODEL clips/`); a folder with images stays a folder of images."""
    from .data.decode import files_under, is_image_file
    from .data.frames import is_video_file

    opened = []
    for source in sources:
        if Path(source).is_dir() and not any(is_image_file(path) for path in files_under(Path(source))):
            if videos := [str(path) for path in files_under(Path(source)) if is_video_file(path)]:
                opened += videos
                continue
        opened.append(source)
    return opened


def _check_video_flags(args: argparse.Namespace, videos: list[str], command: str, why_apart: str,
                       video_flags: dict, image_flags: dict) -> None:
    """Refuse, in one line, flags that do not fit the inputs (a flag is given where its value is not None):
    video flags for images, image flags for videos, and the two mixed."""
    from .data.frames import VIDEO_EXTENSIONS

    if not videos:
        if given := [flag for flag, value in video_flags.items() if value is not None]:
            raise ResidualError(f"{given[0]} is for videos ({', '.join(VIDEO_EXTENSIONS)}, a stream's address, or a "
                                f"camera); none is among {' '.join(args.images)}")
        return
    if len(videos) < len(args.images):
        others = [source for source in args.images if source not in videos]
        raise ResidualError(f"{others[0]}: {command} videos and images in separate calls ({why_apart})")
    if given := [flag for flag, value in image_flags.items() if value is not None]:
        raise ResidualError(f"{given[0]} is for images; videos are decoded by FFmpeg, with its own threads")


def _opened_videos(videos: list[str], failed: list[str]) -> list:
    """The VideoInfo of each video FFmpeg can open; each one it cannot is named in `failed`, and the others go on.
    A live source given alone is left open, to be read on from the same connection; of several, each is opened
    again when its turn comes (held open meanwhile, a stream's unread data would pile up, or be dropped)."""
    from .data.decode import BadImageError
    from .data.frames import video_info

    infos = []
    for video in videos:
        try:
            infos.append(video_info(video, keep_open=len(videos) == 1))
        except BadImageError as error:
            failed.append(str(error))
    return infos


def _say_live(infos: list, recordings: list | None = None) -> None:
    """A line per live source: what the camera or sender gives, which the source may not have said, and where
    its recording grows (`recordings`, one per source or None), to be watched while it is written."""
    for info, recording in zip(infos, recordings or [None] * len(infos)):
        if info.live:
            rate = f" at {info.rate:g} frames/s" if info.rate else ""
            to = f"; recording to {recording} as it is answered" if recording else ""
            print(f"{info.name}: {info.width}x{info.height}{rate}, live: Ctrl-C ends it{to}", file=sys.stderr)


def _predict_videos(args: argparse.Namespace, console: Console, model, videos: list[str],
                    output_format: str) -> int:
    """predict on video files: a row per frame (csv, json, jsonl, labels, probabilities), or the segments of time each
    class holds (a table, or --format segments as CSV); --timeline draws them."""
    import itertools

    from .data.frames import source_file_name
    from .feature_bank import FeatureBank
    from .predict import class_names_of, inference_compile
    from .tables import predictions_table, segments_table
    from .video import (SMOOTH_SECONDS, TimelineScores, check_smooth, check_video_arguments, expected_frames,
                        iter_predict_video, plot_timeline, segment_finder, segments_as_they_close, video_files,
                        video_prediction, write_annotated, write_segments)

    smooth = SMOOTH_SECONDS if args.smooth is None else args.smooth
    check_smooth(smooth)
    names = class_names_of(model)
    topk = {"probabilities": len(names), "labels": 1}.get(output_format, args.topk)
    bank = FeatureBank.load(args.feature_bank) if args.feature_bank else None
    check_video_arguments(model, topk, args.batch_size, args.tta, args.fps, args.min_confidence, bank, args.compile)
    if args.per_video and (output_format == "segments" or bank):
        other = ("--format segments gives its stretches of time" if output_format == "segments"
                 else "--feature-bank judges each frame by its own features")
        raise ResidualError(f"--per-video gives a video's classes from its frames' mean probabilities; {other}: "
                            f"leave one out")
    failed: list[str] = []
    infos = _opened_videos(videos, failed)
    if not infos:  # nothing to predict: said before anything is prepared for it
        _report_failed(failed)
        return 1
    annotated = video_files(infos, args.annotate, ".annotated.mp4") if args.annotate else [None] * len(infos)
    if not args.out and any(info.live for info in infos) and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a live stream's rows as they come: `| tee`, `| grep`
    if not args.quiet:
        _say_live(infos, annotated)
    # The bank reads the features of the model run eagerly, as for images.
    compiled, why = inference_compile(model, False if bank else args.compile,
                                      sum(expected_frames(info, args.fps) or 0 for info in infos))
    if not args.quiet:
        print(f"torch.compile: {why}", file=sys.stderr)
    # The segments are found as the frames come; a timeline keeps its points, in memory that stops growing.
    finders = [segment_finder(model, info, smooth, args.min_confidence, bank,
                              TimelineScores(len(names)) if args.timeline else None) for info in infos]
    # A live stream's annotated video is recorded as its frames are answered: it cannot be decoded again to draw
    # its segments on afterwards, as a file's is.
    per_video = [iter_predict_video(model, info, finder, topk, args.batch_size, args.tta, args.fps,
                                    args.min_confidence, failed, not args.quiet, compiled, bank,
                                    recording=path if info.live else None)
                 for info, finder, path in zip(infos, finders, annotated)]
    predictions = itertools.chain.from_iterable(per_video)
    if args.per_video:  # a row per video, once its frames are predicted
        predictions = (prediction for info, finder, answers in zip(infos, finders, per_video)
                       for prediction in video_prediction(model, info, finder, answers, topk, args.min_confidence))
        if output_format == "table":
            rows = list(predictions)
            if rows:
                console.print(predictions_table(rows, f"{args.model}: top-{len(rows[0].top)} of {len(rows)} video(s), "
                                                      f"by the mean of their frames' probabilities", "video"))
        else:
            write = _predictions_writer(output_format, model, ("video", "label"), "video",
                                        args.min_confidence is not None)
            _write_rows(args.out, lambda stream: write(predictions, stream), "video prediction(s)")
    elif output_format == "table":  # the segments, once every frame is predicted
        for _ in predictions:
            pass
    elif output_format == "segments":  # a live stream's as each closes, a file's once its frames are done
        rows = segments_as_they_close(infos, finders, per_video)
        _write_rows(args.out, lambda stream: write_segments(rows, stream), "segment(s)")
    else:
        write = _predictions_writer(output_format, model, ("frame", "label"), "frame", args.min_confidence is not None,
                                    bank)
        _write_rows(args.out, lambda stream: write(predictions, stream), "frame prediction(s)")
    for finder in finders:
        finder.finish()  # the segments still open at the end (those --format segments wrote are closed already)
    found = [finder.found for finder in finders]
    if output_format == "table" and not args.per_video:
        for info, finder, segments in zip(infos, finders, found):
            console.print(segments_table(segments, f"{info.name}: {finder.frames} frames, {len(segments)} "
                                                   f"segment(s), probabilities averaged over {smooth:g} s"))
    if args.timeline:
        timelines = video_files(infos, args.timeline, ".timeline.png")
        for info, finder, segments, path in zip(infos, finders, found, timelines):
            plot_timeline(*finder.record.arrays(len(names)), segments, names, path, source_file_name(info.path),
                          smooth, args.min_confidence, finder.record.frames_per_point)
        print(f"timeline: {len(infos)} picture(s) in {args.timeline}", file=sys.stderr)
    if args.annotate:
        for info, segments, path in zip(infos, found, annotated):
            if segments and not info.live:  # none: no frame predicted; a live one's was recorded as it came
                write_annotated(info, segments, path)
        print(f"annotated: {sum(finder.frames > 0 for finder in finders)} video(s) in {args.annotate}",
              file=sys.stderr)
    _report_failed(failed)
    return 1 if failed else 0


def _refuse_onnx(model: str, why: str) -> None:
    """Commands that need the PyTorch model itself say so for an exported file (.onnx, .pte), and which file to
    give."""
    if Path(model).suffix in (".onnx", ".pte"):
        raise ResidualError(f"{model}: {why}; give the .safetensors model file it was exported from")


def cmd_explain(args: argparse.Namespace, console: Console) -> int:
    from .data.datasets import input_images
    from .data.frames import is_video_source
    from .explain import iter_explain
    from .runs import output_dir
    from .tables import new_table

    _refuse_onnx(args.model, "Grad-CAM needs the model's gradients, which an exported model's runtime does not give")
    args.images = _folders_of_videos_opened(args.images)
    videos = [source for source in args.images if is_video_source(source)]
    _check_video_flags(args, videos, "explain", "the videos give a video of overlays and a picture per segment, the "
                       "images a picture each", {"--fps": args.fps, "--smooth": args.smooth},
                       {"--workers": args.workers})
    model = _inference_model(args.model, args.device, image_size=args.image_size, threshold=args.threshold)
    if videos:
        return _explain_videos(args, console, model, videos)
    items = input_images(args.images)
    if not items:
        raise ResidualError(f"no image files in {' '.join(args.images)}")
    failed: list[str] = []
    table = new_table(f"{args.method} on {args.layer or 'the last stage'} of {args.model}",
                      ("image", "class explained", "probability", "overlay"), right=("probability",))
    with output_dir(args.out, "runs/explain", Path(args.model).stem) as out:
        for item in iter_explain(model, items, args.method, args.target, args.layer, out, args.batch_size, failed,
                                 progress=not args.quiet):
            table.add_row(item.source, item.class_name, f"{item.probability:.3f}", item.path.name)
    if table.row_count:  # none at all: the errors below say why, an empty table adds nothing
        console.print(table)
        console.print(f"wrote {table.row_count} overlay(s) to {out}")
    _report_failed(failed)
    return 1 if failed else 0


def _explain_videos(args: argparse.Namespace, console: Console, model, videos: list[str]) -> int:
    """explain on video files: per video, a video of its frames' overlays and a picture per segment."""
    from .runs import output_dir
    from .tables import segments_table
    from .video import SMOOTH_SECONDS, video_files
    from .video_explain import explain_video

    failed: list[str] = []
    infos = _opened_videos(videos, failed)
    if not infos:  # nothing to explain: no output folder is made for it
        _report_failed(failed)
        return 1
    if not args.quiet:
        _say_live(infos)
    smooth = SMOOTH_SECONDS if args.smooth is None else args.smooth
    with output_dir(args.out, "runs/explain", Path(args.model).stem) as out:
        for info, named in zip(infos, video_files(infos, out, "")):
            result = explain_video(model, info, out, args.method, args.target, args.layer, args.fps, smooth,
                                   args.batch_size, named.name, progress=not args.quiet)
            failed += result.failed
            if result.path is None:
                continue
            console.print(segments_table(result.segments, f"{info.name}: {result.frames} frames explained by "
                                                           f"{args.method}, {len(result.segments)} segment(s)",
                                         [key.path.name for key in result.key_frames]))
            console.print(f"wrote {result.path} and {len(result.key_frames)} key frame(s) beside it")
    _report_failed(failed)
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from .data.datasets import sample_items
    from .deploy.exported import export_metadata, training_data
    from .tables import parity_table

    executorch = args.format == "executorch"
    if executorch and args.fp16:
        raise ResidualError("--fp16: the ExecuTorch export is float32 (XNNPACK); drop --fp16, or export --format onnx")
    if not executorch and args.max_batch != 1:
        raise ResidualError("--max-batch is for --format executorch: an ONNX export takes any batch")
    model = load_model(args.model).eval()  # first: a path that is no model file is named as such
    data = args.data or training_data(args.model)
    if data is None:
        raise ResidualError(f"{args.model}: give --data DATA (a dataset or a folder of images): the export is "
                            f"checked against the model on real images, and the model file does not name its data")
    out = Path(args.output or Path(args.model).with_suffix(".pte" if executorch else ".onnx"))
    items = sample_items(data, "val", args.samples, args.seed)
    if executorch:
        from .deploy.executorch import export_executorch

        result = export_executorch(model, out, items, str(data), max_batch=args.max_batch,
                                   with_preprocessing=args.with_preprocessing, force=args.force,
                                   extra=export_metadata(args.model))
        runtime, checked = "ExecuTorch (XNNPACK)", f"runs in ExecuTorch, batches of up to {args.max_batch}"
    else:
        from .deploy.onnx import export_onnx

        result = export_onnx(model, out, items, str(data), fp16=args.fp16, with_preprocessing=args.with_preprocessing,
                             force=args.force, extra=export_metadata(args.model))
        runtime, checked = "ONNX Runtime", "checked by onnx.checker"
    console.print(parity_table(result.parity.to_dict(), f"{runtime} vs PyTorch: {args.model}"
                               + (" (fp16)" if args.fp16 else "")))
    if result.path is None:
        print(f"error: {out}: the export does not match the model (see the table); nothing was written. "
              f"--force writes it anyway", file=sys.stderr)
        return 1
    console.print(f"wrote {result.path} ({result.path.stat().st_size / 2**20:.2f} MB, {checked}) "
                  f"and {result.report_path} in {result.seconds:.1f} s")
    return 0


def cmd_quantize(args: argparse.Namespace, console: Console) -> int:
    from .deploy.quantize import quantize
    from .tables import SCORE_NAMES, comparison_table

    result = quantize(args.model, args.calib, args.output, val=args.val, split=args.split, method=args.method,
                      calib_size=args.calib_size, max_drop=args.max_drop, force=args.force,
                      batch_size=args.batch_size, runtime=args.runtime, max_batch=args.max_batch,
                      progress=not args.quiet)
    report = result.report
    as_trained = " (split as the model was trained)" if report["split_as_trained"] else ""
    console.print(comparison_table({f"float ({report['float']['runtime']})": report["float"],
                                    f"int8 ({report['int8']['runtime']})": report["int8"]},
                                   f"INT8 vs float on {report['images']:,} {report['split']} images{as_trained}; "
                                   f"calibrated on {report['calibration']['images']} images "
                                   f"({report['calibration']['method']})"))
    versus = report["versus_float"]
    score = SCORE_NAMES[report["metric"]]
    agreement = (f"top-1 agreement with float {report['top1_agreement']:.2%}" if "top1_agreement" in report
                 else f"the same labels as float on {report['agreement']:.2%} of the images")
    console.print(f"{score} drop {report['drop_points']:+.2f} points (allowed: {args.max_drop}); {agreement}; "
                  f"{versus['only_first']} image(s) only float got right, {versus['only_second']} only INT8: McNemar "
                  f"p = {versus['p_value']:.3g}")
    if "int8_convolutions" in report:
        convolutions = report["int8_convolutions"]
        console.print(f"OpenVINO runs {convolutions['int8']} of {convolutions['of']} convolutions on 8-bit integers")
    if result.refused:
        methods = "" if args.runtime == "executorch" else ", try --method entropy or percentile"
        print(f"error: INT8 loses {report['drop_points']:.2f} {score} points, more than --max-drop {args.max_drop}; "
              f"nothing was written. Calibrate on more or more typical images{methods}, or --force", file=sys.stderr)
        return 1
    console.print(f"wrote {result.path} and {result.report_path}")
    return 0


def cmd_robustness(args: argparse.Namespace, console: Console) -> int:
    from .data.datasets import data_name
    from .evaluate import split_as_trained
    from .robustness import robustness
    from .runs import output_dir
    from .tables import SCORE_NAMES, robustness_table, score_text

    model = _inference_model(args.model, args.device, args.precision, args.image_size, runtime=args.runtime)
    baseline = (_inference_model(args.baseline, args.device, args.precision, args.image_size, runtime=args.runtime)
                if args.baseline else None)
    as_trained = split_as_trained(args.model, args.data)  # as eval: only the images its training held out
    with output_dir(args.out, "runs/robustness", f"{Path(args.model).stem}-{data_name(args.data)}") as out:
        result = robustness(model, as_trained or args.data, args.split or ("val" if as_trained else None),
                            args.corruptions, args.severities, args.images, args.seed, args.batch_size, args.workers,
                            baseline, out, progress=not args.quiet,
                            names=(Path(args.model).name, args.baseline and Path(args.baseline).name),
                            protocol=args.protocol, frost_dir=args.frost_dir)
    console.print(robustness_table(result))
    for name, why in result.left_out.items():
        console.print(f"[yellow]{name} left out: {why}[/]")
    _report_failed(result.failed)
    summary = result.summary()
    line = (f"clean {SCORE_NAMES[result.metric]} {result.model.clean:.2%}; under corruption {result.model.mean:.2%} "
            f"on average")
    if summary["share_of_clean"] is not None:
        line += f" ({summary['share_of_clean']:.0%} of clean)"
    line += f"; calibration error (ECE) {result.model.clean_ece:.3f} clean, {result.model.mean_ece:.3f} corrupted"
    if result.baseline is not None:
        line += (f"; against {args.baseline}: mCE {score_text(summary['mce'], 3)}, relative mCE "
                 f"{score_text(summary['relative_mce'], 3)} (below 1: more robust than it)")
    console.print(line)
    console.print(f"wrote {', '.join(path.name for path in result.files.values())} in {out}")
    return 1 if result.failed else 0


def _fit_on_held_out(fit, args: argparse.Namespace, runs: str, report_name: str, console: Console):
    """Run `fit` (calibrate or tune_thresholds) as their commands do: the report folder under `runs`, each
    unreadable image named on one line -> (its result, the report folder)."""
    from .data.datasets import data_name
    from .runs import output_dir

    with output_dir(args.out, runs, f"{Path(args.model).stem}-{data_name(args.data)}") as out:
        result = fit(args.model, args.data, args.output, split=args.split, report_dir=out, batch_size=args.batch_size,
                     workers=args.workers, device=args.device, progress=not args.quiet)
    unreadable = [message for scores in result.report["splits"].values() for message in scores["unreadable"]]
    _report_failed(unreadable)
    if unreadable:
        console.print(f"[yellow]{len(unreadable)} unreadable image(s) skipped (listed above and in {report_name})")
    return result, out


def cmd_calibrate(args: argparse.Namespace, console: Console) -> int:
    from .calibrate import calibrate
    from .tables import calibration_table, temperatures_table

    result, out = _fit_on_held_out(calibrate, args, "runs/calibrate", "calibration.json", console)
    multi_label = isinstance(result.temperature, list)
    if multi_label:
        console.print(temperatures_table(result.report))
    console.print(calibration_table(result.report))
    for warning in result.report["warnings"]:
        console.print(f"[yellow]warning: {warning}")
    if multi_label:
        console.print(f"a temperature per class, its threshold moved with it (mAP and every image's labels "
                      f"unchanged); wrote {result.path}, report in {out}")
        return 0
    sharpens = "under-confident: T < 1 sharpens" if result.temperature < 1 else "over-confident: T > 1 softens"
    console.print(f"temperature {result.temperature:.4g} (the model was {sharpens} its probabilities; top-1 "
                  f"unchanged); wrote {result.path}, report in {out}")
    return 0


def cmd_thresholds(args: argparse.Namespace, console: Console) -> int:
    from .tables import thresholds_table
    from .thresholds import tune_thresholds

    result, out = _fit_on_held_out(tune_thresholds, args, "runs/thresholds", "thresholds.json", console)
    for table in thresholds_table(result.report):
        console.print(table)
    console.print(f"wrote {result.path} (mAP unchanged: the thresholds do not reorder the images), report in {out}")
    return 0


def cmd_soup(args: argparse.Namespace, console: Console) -> int:
    from .soup import soup
    from .tables import SCORE_NAMES, new_table

    result = soup(args.models, args.data, args.out, args.recipe, args.split, args.batch_size, args.workers,
                  args.device, progress=not args.quiet)
    score = SCORE_NAMES[result.metric]
    columns = ["model", f"{result.split} {score}", "in the soup"] + ([f"test {score}", "p (vs best model)"]
                                                                     if result.test else [])
    table = new_table(f"{result.recipe} soup of {len(result.ingredients)} models", columns,
                      right=[column for column in columns if column not in ("model", "in the soup")])
    for name, value in result.held_out.items():
        test = result.test.get(name, {})
        versus = test.get("versus_best_model")
        row = [name, f"{value:.2%}", "yes" if name in result.kept else "-" if name in result.ingredients else ""]
        if result.test:
            row += [f"{test[result.metric]:.2%}" if test else "", f"{versus['p_value']:.3g}" if versus else ""]
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {result.path} ({len(result.kept)} of {len(result.ingredients)} models); its "
                  f"{result.split} {score} chose it, so `residual eval {result.path} {args.data}` on the test split "
                  f"is the number to trust")
    return 0


def cmd_prune(args: argparse.Namespace, console: Console) -> int:
    from .deploy.prune import prune
    from .tables import SCORE_NAMES, comparison_table

    result = prune(args.model, args.data, args.output, amount=args.amount, epochs=args.epochs, lr=args.lr,
                   batch_size=args.batch_size, device=args.device, workers=args.workers, progress=not args.quiet,
                   console=console)
    report = result.report
    rows = {"before": report["before"], f"pruned {report['amount']:.0%}": report["pruned"]}
    if report["epochs"]:
        rows[f"+ fine-tuned {report['epochs']} epoch(s)"] = report["after"]
    console.print(comparison_table(rows, f"channel pruning of {args.model} ({SCORE_NAMES[report['metric']]} on "
                                         f"{report['split']})"))
    versus = report["versus_before"]
    console.print(f"{versus['only_first']} image(s) only the model before got right, {versus['only_second']} only "
                  f"the pruned one: McNemar p = {versus['p_value']:.3g}")
    console.print(f"wrote {result.path} and {result.report_path}"
                  + (f"; fine-tuning run in {result.run_dir}" if result.run_dir else ""))
    return 0


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from .serve import ModelServer, ServeConfig

    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_pending=args.max_pending, max_image_mb=args.max_image_mb, topk=args.topk, tta=args.tta,
                         min_confidence=args.min_confidence, feature_bank=args.feature_bank,
                         compile=args.compile, timeout_s=args.timeout, access_log=not args.quiet,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, token=_serve_token(args.token_file))
    config.check()  # before the model is loaded
    config.tls_context()  # a bad certificate too
    if args.compile:
        _refuse_onnx(args.model, "--compile: an exported model runs in ONNX Runtime, which optimises it already")
    server = ModelServer(_inference_model(args.model, args.device, args.precision, args.image_size, args.threshold,
                                          args.runtime),
                         config,
                         name=Path(args.model).name)
    info = server.describe()
    console.print(f"serving {args.model} ({info['arch']}, {len(info['classes'])} classes, {info['runtime']} on "
                  f"{info['device']}, {info['precision']}; warm-up {server.warmup_s:.1f} s) at {server.url}")
    token = ' -H "Authorization: Bearer $TOKEN"' if config.token else ""
    console.print(f"  curl{token} --data-binary @photo.jpg {server.url}/predict    (also POST /explain, GET /health, "
                  f"/info, /metrics; Ctrl-C stops)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        if config.token is None:
            console.print(f"[yellow]warning:[/] listening on {args.host} without --token-file: anyone who can reach "
                          f"this machine can use the model")
        if config.tls_cert is None:
            console.print(f"[yellow]warning:[/] listening on {args.host} without --tls-cert: images, answers"
                          + (" and the token" if config.token else "") + " cross the network unencrypted")
    server.serve_forever()
    console.print("stopped: every request in flight was answered")
    return 0


def _serve_token(token_file: str | None) -> str | None:
    """The bearer token serve asks for: the first line of --token-file, else $RESIDUAL_SERVE_TOKEN, else none.
    Not a flag's value, which any user of the machine could read in the process list."""
    if token_file is None:
        return os.environ.get(SERVE_TOKEN_VARIABLE) or None
    try:
        lines = Path(token_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--token-file {token_file}: cannot read it ({getattr(error, 'strerror', None) or error})")
    if not lines or not lines[0].strip():
        raise ConfigError(f"--token-file {token_file}: its first line is empty; write the token there")
    return lines[0].strip()


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from .bench import (CPU_WORKLOADS, SETTINGS, TINY_WORKLOADS, WORKLOADS, bench, bench_table, compile_payback,
                        select_workloads)

    settings = [s for s in SETTINGS if args.compile or not s.compile]
    workloads = select_workloads(TINY_WORKLOADS if args.tiny else CPU_WORKLOADS if args.cpu_sized else WORKLOADS,
                                 args.only)
    rows = bench(workloads, settings, args.device, args.steps, args.warmup, augment=args.augment,
                 compile_mode=args.compile_mode)
    peak = args.peak_tflops or (790.0 if rows and _on_cuda(args.device) else None)
    print(bench_table(rows, peak))
    for line in compile_payback(rows):
        print(line)
    if peak is None:
        print("MFU: give --peak-tflops (the device's bf16 matrix rate) to compute it", file=sys.stderr)
    return 0


def _on_cuda(device: str) -> bool:
    from .runs import pick_device

    return pick_device(device).type == "cuda"


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from .demo import run_demo

    run_demo(args.out, args.data, console=console)
    return 0


# Training flags lr-find takes (so a train command line can be reused) but that do not apply to the sweep:
# it trains no run, on no schedule but its own.
LR_FIND_IGNORES = ("resume", "run_dir", "nproc", "sync_bn", "epochs", "lr", "schedule", "warmup_epochs",
                   "min_lr_ratio", "step_size", "milestones", "gamma", "decay_rate", "decay_epochs", "staircase",
                   "plateau_patience", "early_stopping", "keep_best", "monitor", "ema", "checkpoint_every", "report")


def cmd_lr_find(args: argparse.Namespace, console: Console) -> int:
    from .train.lr_find import lr_find

    ignored = ["--" + name.replace("_", "-") for name in LR_FIND_IGNORES if getattr(args, name) is not None]
    if ignored:
        console.print(f"warning: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to the range "
                      f"test, which raises the rate from --start-lr to --end-lr over --steps batches and trains no run")
    lr_find(_train_config(args, lr=None), args.start_lr, args.end_lr, args.steps, runs=args.out or "runs/lr-find",
            console=console)
    return 0


def cmd_tune(args: argparse.Namespace, console: Console) -> int:
    from .train import TrainingInterrupted
    from .train.tune import searchable_settings, tune

    refused = [flag for flag, given in [("--nproc", args.nproc), ("--max-restarts", args.max_restarts),
                                        ("--run-dir", args.run_dir), ("--lr auto", args.lr == "auto")] if given]
    if refused:
        raise ResidualError(f"residual tune trains each trial in one process, in a folder of its own (--jobs N: "
                            f"N trials at once), and searches the learning rate itself: drop {', '.join(refused)}")
    try:
        if args.resume:
            if given := _settings_given(args) + [flag for flag, on in [("--search", args.search),
                                                                       ("--pruner", args.pruner),
                                                                       ("--prune-from", args.prune_from)] if on]:
                raise ResidualError(f"--resume {args.resume} goes on with the search as its tune.yaml says, so "
                                    f"{', '.join(given)} would be ignored: drop them, or start a new search")
            result = tune(trials=args.trials, time_limit=args.time_limit, jobs=args.jobs, resume=args.resume,
                          console=console)
        else:
            settings = searchable_settings()
            searched = {text.partition("=")[0].strip().removeprefix("--") for text in args.search or ()}
            fixed = [f"--{name}" for name in sorted(searched & set(settings))
                     if getattr(args, settings[name][0].rpartition(".")[2]) is not None]
            if fixed:
                raise ResidualError(f"{', '.join(fixed)} given both as a flag and in --search: a setting is either "
                                    f"fixed or searched")
            config = _train_config(args)
            result = tune(config, args.search or (), trials=args.trials, pruner=args.pruner or "median",
                          prune_from=args.prune_from, time_limit=args.time_limit, jobs=args.jobs,
                          out=args.out or "runs/tune", console=console)
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return 130
    if result.importance:
        console.print("importance of each setting for the score (PED-ANOVA): " + ", ".join(
            f"{name} {share:.2f}" for name, share in result.importance.items()))
    console.print(f"all trials: {result.files['trials.csv']}; pictures: {result.files['search.png']}")
    return 0 if result.best is not None else 1


LABEL_ERRORS_IGNORES = ("resume", "run_dir", "nproc", "max_restarts", "name", "report")


def cmd_label_errors(args: argparse.Namespace, console: Console) -> int:
    from .data.datasets import data_name
    from .label_errors import find_label_errors, judge_probabilities
    from .runs import output_dir
    from .tables import SCORE_NAMES, new_table

    ignored = ["--" + name.replace("_", "-") for name in LABEL_ERRORS_IGNORES if getattr(args, name)]
    if ignored:
        console.print(f"warning: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply: every fold "
                      f"is a new run of its own under the output folder")
    config = _train_config(args)
    with output_dir(None, args.out or "runs/label-errors", data_name(config.data)) as out:  # --out: their parent
        if args.probabilities:  # judged again, or by probabilities from elsewhere: no fold models
            result = judge_probabilities(config.data, args.probabilities, out)
        else:
            result = find_label_errors(config.data, out, args.folds, config, console=console)
    _report_failed(result.unreadable)
    title = f"probably mislabelled: {len(result.issues)} of {result.images} images (worst first)"
    if result.multi_label:  # + a label probably missing, - one probably wrong; p: how sure of the surest edit
        table = new_table(title, ("image", "given", "suggested edit", "p(edit)"), right=("p(edit)",))
        for issue in result.issues[:args.show]:
            table.add_row(issue.image, issue.given or "(none)", issue.change, f"{issue.p_suggested:.2f}")
    else:
        table = new_table(title, ("image", "given", "p(given)", "suggested", "p(suggested)"),
                          right=("p(given)", "p(suggested)"))
        for issue in result.issues[:args.show]:
            table.add_row(issue.image, issue.given, f"{issue.p_given:.2f}", issue.suggested,
                          f"{issue.p_suggested:.2f}")
    if result.issues:
        console.print(table)
    folds = ", ".join(f"{score:.1%}" for score in result.fold_scores)
    judged_by = (f"the probabilities in {args.probabilities}" if args.probabilities else
                 f"the model that did not train on it (fold models' "
                 f"{SCORE_NAMES['map' if result.multi_label else 'top1']}: {folds})")
    console.print(f"each image judged by {judged_by}; all {len(result.issues)} in {result.files['table']}, the "
                  f"worst as pictures in {result.files['picture']}")
    return 1 if result.unreadable else 0


def _train_config(args: argparse.Namespace, **overrides):
    """Flags -> TrainConfig; flags left unset keep the config's defaults (auto where it has them)."""
    from .train import TrainConfig
    from .train.config import options_as_asked

    def given(*names):
        values = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
        return {**values, **{k: v for k, v in overrides.items() if k in names}}

    from .train.recipes import recipe_options

    if args.config and args.recipe:
        raise ConfigError(f"--config {args.config} and --recipe {args.recipe}: give one starting point (a run's "
                          f"config.yaml holds the recipe it ran)")
    base = options_as_asked(args.config) if args.config else recipe_options(args.recipe) if args.recipe else {}
    if args.data is not None:
        base["data"] = args.data
    optim = {**base.get("optim", {}), **given(*OPTIM_FLAGS)}
    augment = {**base.get("augment", {}), **given(*AUGMENT_FLAGS)}
    model_options = {**base.get("model_options", {}), **given(*MODEL_FLAGS)}
    top = given(*TRAIN_FLAGS)
    try:
        return TrainConfig.from_dict({**base, **top, "optim": optim, "augment": augment,
                                      "model_options": model_options})
    except ConfigError as error:
        if not args.config and not args.recipe:
            raise
        # The clash may be with a setting the user never typed: say where it came from.
        source, remedy = ((f"--config {args.config}", "edit it there, or give the flag another value") if args.config
                          else (f"--recipe {args.recipe}", "give the flag another value"))
        raise ConfigError(f"{error} (settings in {source} count as given: {remedy})") from None


OPTIM_FLAGS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs", "min_lr_ratio",
               "step_size", "milestones", "gamma", "decay_rate", "decay_epochs", "staircase", "plateau_patience")
AUGMENT_FLAGS = ("preset", "hflip", "pad_crop", "pad_mode", "crop_scale", "rotation", "shift", "brightness", "contrast",
                 "random_erasing", "auto_augment", "randaugment_ops", "randaugment_magnitude", "mixup", "cutmix")
MODEL_FLAGS = ("stem", "drop_rate", "drop_path_rate", "block_drop_rate", "zero_init_residual")
TRAIN_FLAGS = ("class_weights", "balanced_sampler", "aug_repeats", "augmix_jsd", "pretrained", "strategy",
               "freeze_stages", "head_epochs", "unfreeze_stages", "layer_lr_decay", "model", "image_size",
               "eval_image_size", "crop_pct", "progressive_resize", "progressive_ramp", "epochs", "batch_size",
               "label_smoothing", "loss", "bce_target_threshold",
               "grad_clip", "accumulate", "ema", "sam", "sam_adaptive", "teacher", "distill_weight",
               "distill_temperature", "early_stopping", "keep_best", "monitor", "val_split", "seed", "deterministic",
               "device", "amp", "channels_last", "grad_checkpointing",
               "compile", "compile_mode", "workers", "in_memory", "decoder", "checkpoint_every", "max_bad_streak",
               "out", "name", "quiet", "report", "sync_bn", "tensorboard", "mlflow",
               "wandb", "group")


FINETUNE_DEFAULTS = {"strategy": "two-stage"}
# The flags that set up a run (every TrainConfig field), and the names they go by where those differ.
RUN_SETTINGS = ("data", "config", "recipe", *TRAIN_FLAGS, *OPTIM_FLAGS, *AUGMENT_FLAGS, *MODEL_FLAGS)
SETTING_NAMES = {"data": "DATA", "pretrained": "--from", "preset": "--augment", "drop_path_rate": "--drop-path"}


def _settings_given(args: argparse.Namespace) -> list[str]:
    """The flags (and DATA) that set up a run given on this command line, as the user typed them."""
    finetune = FINETUNE_DEFAULTS if getattr(args, "finetune", False) else {}
    return [SETTING_NAMES.get(name, "--" + name.replace("_", "-")) for name in RUN_SETTINGS
            if getattr(args, name) is not None and finetune.get(name) != getattr(args, name)]


def _refuse_settings_with_resume(args: argparse.Namespace) -> None:
    """A resumed run goes on as its config.yaml says: a setting given with --resume would be silently ignored."""
    if given := _settings_given(args):
        raise ResidualError(f"--resume {args.resume} goes on as its config.yaml says, so {', '.join(given)} would be "
                            f"ignored: drop them, or start a new run from its weights (--from "
                            f"{Path(args.resume) / 'model.safetensors'})")


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from .train import TrainingInterrupted, train
    from .train.lr_find import lr_find

    if args.resume:
        _refuse_settings_with_resume(args)
    if getattr(args, "finetune", False) and not args.pretrained and not args.resume:
        raise ResidualError("residual finetune needs --from NAME|PATH (e.g. resnet50.tv2_in1k, or a model file)")
    if args.max_restarts and not args.nproc:
        raise ResidualError("--max-restarts restarts a group of --nproc workers: give --nproc N too")
    if args.nproc:
        return _launch_workers(args, console)
    try:
        if args.run_dir:
            train(None if Path(args.run_dir, "config.yaml").is_file() else _train_config(args),
                  run_dir=args.run_dir, console=console)
        elif args.resume:
            train(resume=args.resume, console=console)
        elif args.lr == "auto":
            args.lr = lr_find(_train_config(args, lr=None), console=console).suggestion
            console.print(f"--lr auto: training at {args.lr:.3g}")
            train(_train_config(args), console=console)
        else:
            train(_train_config(args), console=console)
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return 130
    return 0


def _launch_workers(args: argparse.Namespace, console: Console) -> int:
    """--nproc N: prepare the run directory here, then let torchrun run N workers in it."""
    from .train import load_config
    from .train.distributed import check_launch, launch
    from .train.trainer import prepare_run, resumable_run

    if args.resume:
        run_dir = resumable_run(args.resume)
        config = load_config(run_dir / "config.yaml")
    else:
        config = _train_config(args)
    check_launch(args.nproc, args.max_restarts, config.device, config.sync_bn, config.batch_size)
    run_dir = run_dir if args.resume else prepare_run(config, args.nproc, console)
    console.print(f"{run_dir}: {args.nproc} workers through torchrun"
                  + (f", up to {args.max_restarts} restart(s) of the group" if args.max_restarts else ""))
    code = launch(run_dir, args.nproc, args.max_restarts)
    if code:
        print(f"error: the workers failed (torchrun exit code {code}); the run can be resumed from its last "
              f"checkpoint: residual train --resume {run_dir} --nproc {args.nproc}", file=sys.stderr)
    return code


def cmd_shapes(args: argparse.Namespace, console: Console) -> int:
    from .data.shapes import (MULTI_LABEL_CSV, multi_label_split_sizes, split_sizes, write_multi_label_shapes,
                              write_shapes)

    if args.multi_label:
        if args.masks:
            raise ResidualError("--masks: the multi-label images are drawn without masks; drop --masks")
        out = write_multi_label_shapes(args.out, size=args.size, train_images=args.per_class * 10, seed=args.seed)
        sizes = multi_label_split_sizes(args.per_class * 10)
        console.print(f"wrote {out}: 10 classes, 0-3 shapes per image, {args.size}px, train/val/test = "
                      f"{sizes['train']}/{sizes['val']}/{sizes['test']} images; labels in {out / MULTI_LABEL_CSV} "
                      f"(residual train {out / MULTI_LABEL_CSV})")
        return 0
    out = write_shapes(args.out, size=args.size, per_class=args.per_class, seed=args.seed, masks=args.masks)
    sizes = split_sizes(args.per_class)
    console.print(f"wrote {out}: 10 classes, {args.size}px, train/val/test = "
                  f"{sizes['train']}/{sizes['val']}/{sizes['test']} per class"
                  + (", with masks/" if args.masks else ""))
    return 0


def cmd_unpack(args: argparse.Namespace, console: Console) -> int:
    from .data.clips import CLIP_FPS, is_clip_folder, unpack_clips
    from .data.unpack import MULTI_LABEL_CSV, SPLITS, UNLABELLED, file_kind, unpack_dataset

    source = Path(args.source)
    clips = is_clip_folder(source) and not any(file_kind(path) for path in source.rglob("*"))
    clip_flags = {"--fps": args.fps, "--val-split": args.val_split, "--frame-size": args.frame_size}
    file_flags = {"--image-column": args.image_column, "--label-column": args.label_column,
                  "--split": args.split or None, "--classes": args.classes}
    if given := [flag for flag, value in (file_flags if clips else clip_flags).items() if value is not None]:
        raise ResidualError(f"{given[0]}: {source} is a folder of video clips; it is for dataset files" if clips else
                            f"{given[0]} is for a folder of class folders of video clips; {source} is not one")
    if clips:
        result = unpack_clips(source, args.out, CLIP_FPS if args.fps is None else args.fps, args.val_split, args.seed,
                              args.frame_size, progress=console.is_terminal)
        for folder in result.removed:
            console.print(f"removed {folder}: what an unpack into {result.out} that was stopped left behind")
        console.print(f"wrote {result.out}: {len(result.classes)} classes, frames of {sum(result.clips.values())} "
                      f"clips, each clip's in one split")
        _print_split_counts(console, result, lambda split: f"{split}/", lambda split: f", {result.clips[split]} clips")
        _print_skipped(console, result, "")
        console.print(f"Next: residual train {result.data}")
        return 0
    splits = {}
    for given in args.split:
        word, equals, split = given.partition("=")
        if not (equals and word and split):
            raise ConfigError(f"--split {given}: give WORD=SPLIT, as --split extra=train")
        splits[word.lower()] = split  # split words are matched in lower case
    class_names = class_names_option(args.classes)
    result = unpack_dataset(args.source, args.out, image_column=args.image_column, label_column=args.label_column,
                            splits=splits, progress=console.is_terminal,
                            class_names=list(imagenet_class_names()) if class_names == "imagenet" else class_names)
    others = f" (also {', '.join(result.other_label_columns)}: --label-column picks another)" \
        if result.other_label_columns else ""
    for folder in result.removed:
        console.print(f"removed {folder}: what an unpack into {result.out} that was stopped left behind")
    source = result.label_column if result.label_column.startswith(".") else f"column {result.label_column}"
    console.print(f"wrote {result.out}: {len(result.classes)} classes from {source}{others}")
    _print_split_counts(console, result, lambda split: f"{split} rows of {result.out / MULTI_LABEL_CSV}"
                        if result.multi_label else f"{split}/")
    for split, count in sorted(result.unlabelled.items(), key=lambda item: SPLITS.index(item[0])):
        console.print(f"  {UNLABELLED}/{split}/: {count:,} images without a label (for residual predict)")
    for path, word in result.left_out:
        console.print(f"  left out {path}: " + (f"--split {word}=skip" if splits.get(word) == "skip" else
                                                f"its split, {word}, is not train, validation or test (--split "
                                                f"{word}=train takes it in)"))
    _print_skipped(console, result, " rows")
    console.print(f"Next: residual train {result.data}")
    return 0


def _print_skipped(console: Console, result, unit: str) -> None:
    """What an unpack skipped: how many (of `unit`: " rows"), the first ones named, the rest counted."""
    if result.skipped_count:
        more = result.skipped_count - len(result.skipped)
        console.print(f"  skipped {result.skipped_count:,}{unit}:\n    " + "\n    ".join(result.skipped)
                      + (f"\n    ... and {more:,} more" if more else ""))


def _print_split_counts(console: Console, result, where, more=lambda split: "") -> None:
    """An unpack's images per split: how many, of how many classes, and the fewest and most in a class."""
    from .data.unpack import SPLITS

    for split, counts in sorted(result.counts.items(), key=lambda item: SPLITS.index(item[0])):
        console.print(f"  {where(split)}: {result.images[split]:,} images, {len(counts)} classes "
                      f"({min(counts.values()):,} to {max(counts.values()):,} images per class){more(split)}")


def cmd_check_data(args: argparse.Namespace, console: Console) -> int:
    from .data.check import check_data
    from .report import write_check_files
    from .tables import data_report_tables

    report = check_data(args.data, args.val_split, args.seed)
    for table in data_report_tables(report):
        console.print(table)
    if args.out:
        written = write_check_files(report, Path(args.out))
        console.print(f"wrote {', '.join(path.name for path in written)} in {args.out}")
    return 0 if report.ok else 1


def cmd_experiment_degradation(args: argparse.Namespace, console: Console) -> int:
    from .experiments.degradation import run_degradation

    result = run_degradation(args.data, tuple(args.depths), args.recipe, args.epochs, args.norm, args.init, args.out,
                             console=console, seed=args.seed)
    console.print(f"figure, table and verdict in {result['out']} (degradation.png, results.csv, verdict.txt)")
    return 0


def cmd_experiment_gradients(args: argparse.Namespace, console: Console) -> int:
    from .experiments.gradients import run_gradients

    out = args.out or f"runs/experiments/gradients-{args.norm or 'none'}-{args.init}"
    run_gradients(args.model, args.data, out, args.norm, args.init, args.steps, trained=args.trained, console=console)
    console.print(f"figure and table in {out} (gradients.png, gradients.csv)")
    return 0


def cmd_experiment_landscape(args: argparse.Namespace, console: Console) -> int:
    from .experiments.landscape import run_landscape

    run_landscape(args.models, args.data, args.out, args.resolution, args.span, args.images, args.seed,
                  args.device, console=console, progress=not args.quiet)
    console.print(f"figure and numbers in {args.out} (landscape.png, landscape.csv, summary.json)")
    return 0


def cmd_experiment_lesion(args: argparse.Namespace, console: Console) -> int:
    from .experiments.lesion import run_lesion

    run_lesion(args.models, args.data, args.out, args.images, args.draws, args.seed, args.device, console=console,
               progress=not args.quiet)
    console.print(f"figure and numbers in {args.out} (lesion.png, lesion.csv, summary.json)")
    return 0


FEATURES_NOT_IN_ONNX = "the features are the pooled output before the classifier, which an exported model does not give"


def cmd_embed(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    from .atomic import atomic_path
    from .embed import embed

    _refuse_onnx(args.model, FEATURES_NOT_IN_ONNX)
    model = load_model(args.model)
    result = embed(model, args.images, args.batch_size, progress=not args.quiet)
    for message in result.failed:
        print(f"skipped {message}", file=sys.stderr)
    if not result.paths:
        raise ResidualError(f"not one of the {len(result.failed)} image(s) could be read; nothing was written")
    out = Path(args.out)
    out = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")  # where np.save writes it
    with atomic_path(out) as tmp, open(tmp, "wb") as stream:
        np.save(stream, result.features)
    paths_file = out.with_suffix(".paths.txt")
    with atomic_path(paths_file) as tmp:
        tmp.write_text("".join(f"{p}\n" for p in result.paths))
    console.print(f"wrote {out} ({result.features.shape[0]} x {result.features.shape[1]} features) and {paths_file}"
                  + (f"; {len(result.failed)} file(s) could not be read" if result.failed else ""))
    return 1 if result.failed else 0


def cmd_similar(args: argparse.Namespace, console: Console) -> int:
    from .embed import similar
    from .tables import new_table

    _refuse_onnx(args.model, FEATURES_NOT_IN_ONNX)
    matches, failed = similar(load_model(args.model), args.query, args.gallery, args.topk, args.batch_size)
    table = new_table(f"most similar to {args.query} (cosine similarity of pooled features)",
                      ("rank", "image", "similarity"), right=("rank", "similarity"))
    for rank, (path, score) in enumerate(matches, 1):
        table.add_row(str(rank), str(path), f"{score:.4f}")
    console.print(table)
    for message in failed:
        print(f"skipped {message}", file=sys.stderr)
    return 1 if failed else 0


def at_least(least: int | float, kind: type = int):
    """An argparse type: a number of at least `least` (a count of steps, images; a drop in points...)."""
    def parse(text: str):
        value = kind(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least:g}, got {value:g}")
        return value

    parse.__name__ = kind.__name__  # argparse's message for a non-number: "invalid int value"
    return parse


def positive(text: str) -> float:
    """An argparse type: a number above 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


positive.__name__ = "float"


def probability(text: str) -> float:
    """An argparse type: a probability strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


probability.__name__ = "float"


def epoch_pair(text: str) -> tuple[int, int]:
    """An argparse type: two epochs, START,END."""
    try:
        start, end = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes two epochs, START,END (e.g. 20,26), got {text!r}") from None
    return start, end


def runtime_flag(p: argparse.ArgumentParser) -> None:
    from .deploy import RUNTIMES

    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                   help="what runs an exported .onnx: onnxruntime (default), or openvino on the CPU, where "
                        "--precision bf16 computes in bfloat16 (CPUs with AVX512-BF16 or AMX)")


def tta_flag(p: argparse.ArgumentParser) -> None:
    from .predict import TTA_MODES

    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation, probabilities averaged over views: flip (2), flip-shift (10: "
                        "each mirror shifted to the four corners), ten-crop (10: the corner and centre crops of the "
                        "resized image and their mirrors, the ResNet paper's 10-crop testing)")


def floor_flags(p: argparse.ArgumentParser) -> None:
    """--min-confidence and --feature-bank: the floors below which an image gets no class."""
    p.add_argument("--min-confidence", type=probability, metavar="P",
                   help="single-label models: an image whose top class has a probability below P gets no class, "
                        "\"unsure\" (most likely it shows none of the classes); `residual eval MODEL DATA --unknown "
                        "FOLDER` measures which P keeps 95%% of known images")
    p.add_argument("--feature-bank", metavar="FILE",
                   help="the feature_bank.safetensors `residual eval MODEL DATA --unknown FOLDER` wrote for this "
                        "model: an image less similar to the nearest training image than its floor is \"unsure\" "
                        "too (not with --compile; an exported .onnx model applies the bank of the file it was exported "
                        "from)")


def threshold_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=probability, metavar="P",
                   help="multi-label models: a class is predicted where its probability reaches P (default: the "
                        "model file's, 0.5 unless it was saved with another)")


def _norm(value: str) -> str | None:
    return None if value == "none" else value


def _add_experiment_commands(commands) -> None:
    parser = commands.add_parser("experiment", help="residual learning made visible: degradation, gradients, "
                                                   "landscape, lesion")
    experiments = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    p = experiments.add_parser("degradation", help="plain vs residual nets at two depths (He et al. Fig. 6)")
    p.add_argument("--data", default="shapes", help="'shapes' (built-in, 16 px) or a dataset folder (e.g. CIFAR-10)")
    p.add_argument("--depths", type=lambda v: [int(d) for d in v.split(",")], default=[20, 56])
    p.add_argument("--recipe", choices=("quick", "paper"), default="quick")
    p.add_argument("--epochs", type=at_least(1), help="override the recipe's length")
    p.add_argument("--norm", type=_norm, default="batch", choices=("batch", "group", None), metavar="batch|group|none")
    p.add_argument("--init", choices=("he", "xavier"), default="he")
    p.add_argument("--seed", type=int, default=0, help="the training seed (the data stays the same)")
    p.add_argument("--out", default="runs/experiments/degradation")
    p.set_defaults(run=cmd_experiment_degradation)
    p = experiments.add_parser("gradients", help="per-layer gradient norms and response stds, init vs trained")
    p.add_argument("--model", type=lambda v: v.split(","), default=["plain56", "resnet56"])
    p.add_argument("--data", default="shapes")
    p.add_argument("--norm", type=_norm, default="batch", choices=("batch", "group", None), metavar="batch|group|none")
    p.add_argument("--init", choices=("he", "xavier"), default="he")
    p.add_argument("--steps", type=at_least(1), default=200, help="SGD steps between the two measurements")
    p.add_argument("--trained", metavar="RUNS", help="also probe the nets a degradation experiment trained, in eval "
                                                     "mode (e.g. runs/experiments/degradation/runs)")
    p.add_argument("--out", help="default runs/experiments/gradients-NORM-INIT")
    p.set_defaults(run=cmd_experiment_gradients)
    p = experiments.add_parser("landscape", help="the loss surface around trained nets, plain vs residual "
                                                 "(Li et al. 2018, Fig. 5)")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="trained model files, e.g. runs/experiments/degradation/runs/{plain56,resnet56}/"
                        "model.safetensors")
    p.add_argument("--data", default="shapes", help="the data they were trained on ('shapes': the experiments' "
                                                    "built-in data, as degradation writes it)")
    p.add_argument("--resolution", type=int, default=21, help="grid points per side, odd (the weights at the centre)")
    p.add_argument("--span", type=positive, default=1.0,
                   help="the grid covers [-SPAN, SPAN] in both directions (1: each filter moved by its own norm)")
    p.add_argument("--images", type=at_least(1), default=1000, help="training images the loss is computed on")
    p.add_argument("--seed", type=int, default=0, help="the directions' and the images' seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--out", default="runs/experiments/landscape")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_experiment_landscape)
    p = experiments.add_parser("lesion", help="delete blocks from trained nets at test time: residual nets survive it, "
                                              "plain nets do not (Veit et al. 2016)")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="trained model files, e.g. runs/experiments/degradation/runs/*/model.safetensors")
    p.add_argument("--data", default="shapes", help="the data they were trained on ('shapes': the experiments' "
                                                    "built-in data, as degradation writes it); its test split is used")
    p.add_argument("--images", type=at_least(1), help="held-out images to score on (default: all of them)")
    p.add_argument("--draws", type=at_least(1), default=10,
                   help="random sets of blocks deleted for each number of blocks")
    p.add_argument("--seed", type=int, default=0, help="the random sets' and the images' seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--out", default="runs/experiments/lesion")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_experiment_lesion)


def _add_train_arguments(p: argparse.ArgumentParser, runs: str = "runs/train",
                         resume: tuple[str, str] = ("RUN_DIR", "continue an interrupted run from its last.pt")) -> None:
    """Every TrainConfig field as a flag; unset flags stay None so the config's own defaults apply.
    `runs`: where the command's run directories go by default; `resume`: --resume's metavar and help."""
    from .data.device_decode import DECODERS
    from .data.transforms import AUTO_AUGMENTS, PAD_MODES
    from .models.resnet import STEMS
    from .train.config import COMPILE_MODES
    from .train.recipes import RECIPES

    # argparse's own usage line lists all ~100 flags, burying a one-line error under 70 lines; --help has them.
    p.usage = "%(prog)s [DATA] [--model NAME] [--from NAME|PATH] [options]   (every option: --help)"
    p.add_argument("data", nargs="?", help="ImageFolder (DIR/<class>/ or DIR/train|val|test/<class>/), a CSV of "
                                           "image,label[,split] rows, a dataset file (.yaml) describing a CSV of "
                                           "other columns, or a CIFAR folder")
    p.add_argument("--config", help="start from a run's config.yaml (flags override it)")
    p.add_argument("--recipe", choices=RECIPES,
                   help="start from a published recipe (flags override it): He et al. 2015's CIFAR ResNets, "
                        "Zagoruyko & Komodakis 2016's CIFAR Wide ResNets, torchvision's original ImageNet reference, "
                        "ResNet strikes back's A1, A2 or A3 (docs/training.md#recipes)")
    p.add_argument("--resume", metavar=resume[0], help=resume[1])
    p.add_argument("--model", help="registry name (auto: resnet20/56 for small images, resnet18/50 otherwise)")
    p.add_argument("--stem", choices=STEMS, help="the model's stem: cifar (one 3x3, no downsampling) makes an "
                                                 "ImageNet net such as resnet18 fit 32 px images")
    p.add_argument("--image-size", type=int, help="the side of the training crops (auto: from the images)")
    p.add_argument("--eval-image-size", type=int, metavar="N",
                   help="validation, and the model saved, take N px images (default: --image-size): training at "
                        "less than the model is tested at (Touvron et al. 2019), as torchvision's recipes train at "
                        "176 and test at 224")
    p.add_argument("--crop-pct", type=float, metavar="F",
                   help="above 64 px, the share of the resized image the centre crop keeps (default: a pretrained "
                        "model's own, else 0.875: 224 of 256)")
    p.add_argument("--progressive-resize", type=int, metavar="MIN",
                   help="progressive resizing: train at MIN px first, ramping up to --image-size near the end "
                        "(FFCV's ResNet-50: 160 to 192); early epochs cost about (MIN/size)^2 of a full one")
    p.add_argument("--progressive-ramp", type=epoch_pair, metavar="START,END",
                   help="with --progressive-resize: the last epoch at MIN and the first at the full size (default: "
                        "the last eighth of the epochs at the full size, after a ramp over the eighth before)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int,
                   help="the global batch (default: 128, halved down to 32 while an epoch would be under 64 steps)")
    p.add_argument("--val-split", type=float, help="fraction held out per class when there is no val/ folder")
    fine = p.add_argument_group("fine-tuning")
    fine.add_argument("--from", dest="pretrained", metavar="NAME|PATH",
                      help="start from pretrained weights: a name (resnet50.tv2_in1k), a model file or a checkpoint")
    fine.add_argument("--strategy", choices=("full", "linear-probe", "two-stage"))
    fine.add_argument("--freeze-stages", type=int, metavar="K", help="keep the stem and the first K stages frozen")
    fine.add_argument("--head-epochs", type=int, help="two-stage: epochs that train the new head alone (3)")
    fine.add_argument("--unfreeze-stages", type=int, metavar="K", help="two-stage: then train only the last K stages")
    fine.add_argument("--layer-lr-decay", type=float,
                      help="lr factor per layer group toward the input (discriminative lr; two-stage: 0.5)")
    opt = p.add_argument_group("optimizer and schedule")
    opt.add_argument("--optimizer", choices=("sgd", "adam", "adamw", "rmsprop", "lamb"),
                     help="lamb: LAMB, as ResNet strikes back trains ResNet-50 (with --loss bce)")
    opt.add_argument("--lr", type=lambda v: v if v == "auto" else float(v),
                     help="default 0.1 per 128 images (small) or per 256 (large), 0.001 for adam, adamw and "
                          "rmsprop (a from-scratch run that warms up takes 128 images' rate when the automatic "
                          "batch is smaller); 0.008 for lamb; 'auto': run the range test first")
    opt.add_argument("--momentum", type=float)
    opt.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    opt.add_argument("--weight-decay", type=float, help="L2 on conv/linear weights only (never BN or bias)")
    opt.add_argument("--schedule", choices=("cosine", "step", "multistep", "exponential", "onecycle", "constant",
                                            "plateau"),
                     help="plateau: the lr cut by --gamma when --monitor stops improving")
    opt.add_argument("--warmup-epochs", type=float,
                     help="a linear warm-up (default: 5 epochs, at most a sixth of them, when training from scratch "
                          "under the cosine schedule; none otherwise)")
    opt.add_argument("--min-lr-ratio", type=float,
                     help="cosine: the final lr, plateau: the lowest, as a fraction of --lr")
    opt.add_argument("--step-size", type=int, help="step schedule: epochs between decays")
    opt.add_argument("--milestones", type=lambda v: tuple(float(x) for x in v.split(",")),
                     help="multistep: epochs, e.g. 30,60,80")
    opt.add_argument("--gamma", type=float, help="step, multistep and plateau: the factor on the lr at each cut")
    opt.add_argument("--plateau-patience", type=int,
                     help="plateau: epochs without improvement of --monitor before the lr is cut (default 10)")
    opt.add_argument("--decay-rate", type=float, help="exponential: factor per --decay-epochs")
    opt.add_argument("--decay-epochs", type=float)
    opt.add_argument("--staircase", action=argparse.BooleanOptionalAction, default=None)
    reg = p.add_argument_group("regularisation")
    reg.add_argument("--label-smoothing", type=float)
    reg.add_argument("--loss", choices=("ce", "bce"),
                     help="ce: softmax cross-entropy (default); bce: one sigmoid per class, as in ResNet strikes back "
                          "(the default, and the only choice, for multi-label data)")
    reg.add_argument("--bce-target-threshold", type=float, metavar="T",
                     help="with --loss bce: mixed targets above T become 1, the rest 0 (ResNet strikes back: 0.2)")
    reg.add_argument("--class-weights", choices=("auto",), help="weight the loss by inverse class frequency")
    reg.add_argument("--balanced-sampler", action=argparse.BooleanOptionalAction, default=None,
                     help="draw every class equally often (with replacement)")
    reg.add_argument("--drop-rate", type=float, help="dropout before the classifier")
    reg.add_argument("--drop-path", dest="drop_path_rate", type=float, metavar="RATE",
                     help="stochastic depth: training skips the last block's branch with this chance per image, "
                          "earlier blocks' less (linearly), e.g. 0.1; evaluation runs every block")
    reg.add_argument("--block-drop-rate", type=float, metavar="RATE",
                     help="dropout inside every residual block, before its last convolution (Wide ResNets: 0.3)")
    reg.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=None)
    reg.add_argument("--grad-clip", type=float, help="max global gradient norm")
    reg.add_argument("--accumulate", type=int, help="micro-batches per optimizer step")
    reg.add_argument("--ema", type=float, help="EMA decay of the weights, e.g. 0.999")
    reg.add_argument("--sam", type=float, metavar="RHO",
                     help="sharpness-aware minimisation: each step takes the gradient at the worst weights within RHO "
                          "(e.g. 0.05): flatter minima, two forward-backward passes per step")
    reg.add_argument("--sam-adaptive", action=argparse.BooleanOptionalAction, default=None,
                     help="ASAM: SAM's step scaled by each weight's size (RHO about 0.5)")
    reg.add_argument("--teacher", metavar="MODEL_FILE",
                     help="knowledge distillation: also learn this trained model's softened predictions (same classes)")
    reg.add_argument("--distill-weight", type=float,
                     help="with --teacher: the distillation term's share of the loss (default 0.5)")
    reg.add_argument("--distill-temperature", type=float,
                     help="with --teacher: how much both models' probabilities are softened (default 4)")
    reg.add_argument("--early-stopping", type=int, metavar="PATIENCE")
    reg.add_argument("--keep-best", type=int, metavar="K",
                     help="also keep the model files of the K best epochs (by --monitor) as RUN/epoch-NNN.safetensors, "
                          "for checkpoint averaging: residual soup RUN/epoch-*.safetensors --recipe uniform")
    reg.add_argument("--monitor", choices=("val_top1", "val_loss", "val_map"),
                     help="what picks the best epoch (default val_top1; val_map, mean average precision, for "
                          "multi-label data)")
    aug = p.add_argument_group("augmentation")
    aug.add_argument("--augment", dest="preset", choices=("none", "cifar", "standard", "strong"))
    aug.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None)
    aug.add_argument("--pad-crop", type=int)
    aug.add_argument("--pad-mode", choices=PAD_MODES,
                     help="what --pad-crop's border holds: zeros (default), or the image mirrored (reflect, as the "
                          "Wide ResNets trained)")
    aug.add_argument("--crop-scale", type=float,
                     help="smallest area of random-resized crops (0: off); auto: 0.08, or 0.35 for images up to "
                          "64 px and from scratch on fewer than 50,000 training images")
    aug.add_argument("--rotation", type=float, help="degrees")
    aug.add_argument("--shift", type=float, help="width/height shift, fraction")
    aug.add_argument("--brightness", type=float)
    aug.add_argument("--contrast", type=float)
    aug.add_argument("--random-erasing", type=float, help="probability (cutout)")
    aug.add_argument("--auto-augment", choices=AUTO_AUGMENTS[1:],
                     help="autoaugment: AutoAugment's policy for CIFAR-10 up to 64 px, for ImageNet above; augmix: "
                          "mixed chains of operations, for robustness to corruptions (residual robustness)")
    aug.add_argument("--randaugment-ops", type=int, metavar="N", help="RandAugment: operations per image (2)")
    aug.add_argument("--randaugment-magnitude", type=int, metavar="M",
                     help="RandAugment: their strength, 1-29 of 30 as torchvision counts (9); timm's m7 of 10 is 21")
    aug.add_argument("--mixup", type=float, help="Beta alpha, e.g. 0.2")
    aug.add_argument("--cutmix", type=float, help="Beta alpha, e.g. 1.0")
    aug.add_argument("--aug-repeats", type=int, metavar="N",
                     help="repeated augmentation: each epoch draws 1/N of the images and trains on each N times, "
                          "augmented anew (on other workers when distributed); e.g. 3, for long schedules (hundreds "
                          "of epochs): on short ones it costs accuracy (docs/training.md)")
    aug.add_argument("--augmix-jsd", type=float, nargs="?", const=12.0, metavar="WEIGHT",
                     help="with --auto-augment augmix: the paper's Jensen-Shannon consistency loss between each image "
                          "and two AugMix views of it, at this weight (alone: 12, the paper's); 3x the compute")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int)
    run.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None)
    run.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    run.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                     help="keep only each block's input for the backward pass and recompute the rest: a fraction "
                          "of the activation memory (a larger batch or model fits) for about a third more time")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    run.add_argument("--compile-mode", choices=COMPILE_MODES,
                     help="torch.compile's mode (default: reduce-overhead, i.e. CUDA graphs, for inputs up to 64 px "
                          "in one process; otherwise default)")
    run.add_argument("--workers", type=int)
    run.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=None)
    run.add_argument("--decoder", choices=DECODERS,
                     help="images streamed from files: pillow (default; decoding workers) or torchvision (the workers "
                          "read the files, JPEGs are decoded on the device: nvjpeg on CUDA)")
    run.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    run.add_argument("--max-bad-streak", type=int)
    run.add_argument("--out", help=f"parent of the run directory (default {runs})")
    run.add_argument("--name")
    run.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=None, help="no progress bar")
    run.add_argument("--report", action=argparse.BooleanOptionalAction, default=None,
                     help="evaluate the best model on val at the end and write report.html (default: on)")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                     help="also write each epoch's numbers for TensorBoard to RUN/tensorboard/ (needs the "
                          "tensorboard package)")
    run.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                     help="also log the run to MLflow: its settings, each epoch's numbers, its files (needs "
                          "mlflow-skinny); URI: the tracking server (default: MLFLOW_TRACKING_URI); the experiment "
                          "is MLFLOW_EXPERIMENT_NAME, or residual")
    run.add_argument("--wandb", nargs="?", const="", metavar="PROJECT",
                     help="also log the run to Weights & Biases: its settings, each step's and epoch's numbers, its "
                          "pictures and model (needs wandb, logged in, or WANDB_MODE=offline); PROJECT: default "
                          "WANDB_PROJECT, or residual")
    run.add_argument("--group", metavar="NAME",
                     help="the runs this one belongs with (an ablation, a sweep): its W&B run group, and the tag "
                          "residual.group in MLflow; a tune search's trials are grouped under the search's name")
    scale = p.add_argument_group("data-parallel (docs/distributed.md)")
    scale.add_argument("--nproc", type=int, metavar="N",
                       help="train on N local workers through torchrun (one per GPU; gloo on the CPU)")
    scale.add_argument("--max-restarts", type=int, default=0, metavar="K",
                       help="with --nproc: restart the group up to K times after a lost worker, resuming from last.pt")
    scale.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                       help="batch norm statistics over the global batch (CUDA workers)")
    scale.add_argument("--run-dir", metavar="DIR",
                       help="run in DIR, resuming its last.pt if any (torchrun workers; several machines)")


def _add_inference_commands(commands) -> None:
    from .data.device_decode import DECODERS
    from .explain import METHODS
    from .data.corruptions import CORRUPTIONS, PROTOCOLS, SMALL_IMAGES
    from .models import PRECISIONS
    from .predict import INFERENCE_COMPILE_FROM_IMAGES
    from .robustness import DEFAULT_IMAGES

    def common(p, batch_size: int) -> None:
        p.add_argument("--image-size", type=at_least(1),
                       help="feed images of this size instead of the model's own (its resize scaled alike): "
                            "ResNets take any size; eval tells which scores best")
        p.add_argument("--batch-size", type=int, default=batch_size)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
        p.add_argument("--workers", type=int, help="image decoding processes (default: the cores less one)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    def decoder_and_compile(p) -> None:
        p.add_argument("--decoder", choices=DECODERS, default="pillow",
                       help="pillow (decoding workers) or torchvision (the workers read the files, JPEGs are "
                            "decoded on the model's device: nvjpeg on CUDA)")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="run the model under torch.compile (default: on CUDA for jobs of "
                            f"{INFERENCE_COMPILE_FROM_IMAGES:,} images or more, which repay its warm-up)")

    p = commands.add_parser("eval", help="accuracy, per-class scores, confusion, calibration and an HTML report")
    p.add_argument("model", help="a model file or a pretrained name")
    p.add_argument("data", help="a dataset folder (class folders, or train/ val/ test/), a CSV of labels, a dataset "
                                "file (.yaml), or CIFAR")
    p.add_argument("--split", choices=("train", "val", "test", "all"),
                   help="default: test if present, else val; a flat folder of classes is used whole, or only the "
                        "images training held out if the model was trained on it")
    tta_flag(p)
    p.add_argument("--gallery", type=at_least(0), default=16, help="highest-loss images shown with Grad-CAM (0: none)")
    p.add_argument("--unknown", metavar="FOLDER",
                   help="a folder of images of none of the model's classes: how well the top class's probability "
                        "and the similarity to the nearest training image tell them from the split's; the floors "
                        "that keep 95%% of the known images (--min-confidence, and feature_bank.safetensors for "
                        "--feature-bank) for predict and serve")
    threshold_flag(p)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="weights' precision (BN folded, channels_last); auto: bf16 on CUDA, fp32 elsewhere")
    runtime_flag(p)
    p.add_argument("--out", help="report folder (default: a new runs/eval/MODEL-DATA)")
    common(p, 64)
    decoder_and_compile(p)
    p.set_defaults(run=cmd_eval)

    p = commands.add_parser("robustness", help="top-1 (mAP) under noise, blur, weather and digital corruptions at five "
                                               "severities (ImageNet-C's protocol on your test images)")
    p.add_argument("model", help="a model file, a pretrained name or an exported .onnx or .pte")
    p.add_argument("data", help="the dataset, as for eval")
    p.add_argument("--split", choices=("train", "val", "test", "all"), help="as for eval")
    p.add_argument("--corruptions", type=lambda v: v.split(","),
                   help=f"comma-separated, of {', '.join(CORRUPTIONS)} (default: all)")
    p.add_argument("--severities", type=lambda v: [int(s) for s in v.split(",")], help="e.g. 1,3,5 (default: 1-5)")
    p.add_argument("--images", type=at_least(1), default=DEFAULT_IMAGES,
                   help="a seeded sample of this many images of the split (default: %(default)s)")
    p.add_argument("--baseline", help="a second model scored on the same corrupted images: CE and mCE against it")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS),
                   help=f"whose severity parameters: ImageNet-C's (for 224 px) or CIFAR-10-C's (for 32 px); "
                        f"default: cifar-10-c for inputs up to {SMALL_IMAGES} px, imagenet-c above")
    p.add_argument("--frost-dir", help="ImageNet-C's frost photographs (frost1.png ... frost6.jpg) for frost; "
                                       "default: those `residual download frost` fetched")
    p.add_argument("--seed", type=int, default=0, help="the sample and the noise")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="weights' precision (BN folded, channels_last); auto: bf16 on CUDA, fp32 elsewhere")
    runtime_flag(p)
    p.add_argument("--out", help="report folder (default: a new runs/robustness/MODEL-DATA)")
    common(p, 64)
    p.set_defaults(run=cmd_robustness)

    p = commands.add_parser("calibrate", help="temperature scaling (per class for a multi-label model): "
                                              "probabilities that match accuracy (ECE)")
    p.add_argument("model", help="a .safetensors model file")
    p.add_argument("data", help="the dataset: T is fitted on its validation split and checked on its test split")
    p.add_argument("--split", choices=("val", "test"), default="val", help="the held-out split to fit T on")
    p.add_argument("--out", help="report folder (default: a new runs/calibrate/MODEL-DATA)")
    p.add_argument("-o", "--output", help="the calibrated model file (default: MODEL.calibrated.safetensors)")
    common(p, 64)
    p.set_defaults(run=cmd_calibrate)

    p = commands.add_parser("thresholds", help="a multi-label model's per-class thresholds, each class's best F1 on "
                                               "held-out images")
    p.add_argument("model", help="a multi-label .safetensors model file")
    p.add_argument("data", help="the dataset: the thresholds are fitted on its validation split and checked on its "
                                "test split")
    p.add_argument("--split", choices=("val", "test"), default="val", help="the held-out split to fit them on")
    p.add_argument("--out", help="report folder (default: a new runs/thresholds/MODEL-DATA)")
    p.add_argument("-o", "--output", help="the model file with them (default: MODEL.thresholds.safetensors)")
    common(p, 64)
    p.set_defaults(run=cmd_thresholds)

    p = commands.add_parser("soup", help="average fine-tuned models' weights into one (model soups)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more .safetensors models fine-tuned from the "
                                                               "same weights to the same classes")
    p.add_argument("--data", required=True, help="the dataset: its held-out split chooses, its test split checks")
    p.add_argument("--recipe", choices=("greedy", "uniform"), default="greedy",
                   help="greedy: best first, each model kept only if the held-out top-1 does not drop; "
                        "uniform: all of them")
    p.add_argument("--split", choices=("val", "test"), default="val", help="the held-out split that chooses")
    p.add_argument("--out", default="soup.safetensors", help="the soup's model file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--workers", type=int, help="image decoding processes (default: the cores less one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_soup)

    p = commands.add_parser("predict", help="the top classes of images or folders of images, or of videos' frames")
    p.add_argument("model", help="a model file or a pretrained name")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) and/or CSV files "
                                             "of images (an image column, as for train; or a dataset file); or "
                                             "video files (.mp4, .mov, .mkv, .webm, .avi ...) or streams "
                                             "(rtsp://, http://, udp:// ...) or a camera (/dev/video0, or "
                                             "camera:0; camera:0,size=1280x720,fps=30,format=mjpeg asks for "
                                             "those): Ctrl-C ends a live one")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--format", choices=("table", "json", "jsonl", "csv", "labels", "probabilities", "segments"),
                   help="default: csv, json or jsonl for an --out ending so, otherwise a table; jsonl: JSON Lines, "
                        "an object per line (for jq -c, tail -f, a live stream); labels: a CSV with a row "
                        "per image and its most likely class; probabilities: a CSV with a row per image and every "
                        "class's probability in a column of its own (both: --topk unused; images a CSV lists are "
                        "named by its cells, under its column's name). Videos: a row per frame, named "
                        "VIDEO#t=SECONDS; the table shows their segments, and segments writes them as CSV")
    p.add_argument("--out", help="write csv/json/jsonl here instead of standard output")
    p.add_argument("--fps", type=float, metavar="N",
                   help="videos: predict at most N frames a second (default: every frame)")
    p.add_argument("--smooth", type=float, metavar="SECONDS",
                   help="videos: segments come from each class's probability averaged over this many seconds "
                        "around each frame, so one odd frame does not split a scene (default: 1; 0: none)")
    p.add_argument("--timeline", metavar="DIR",
                   help="videos: draw each video's class probabilities over time and its segments to "
                        "DIR/VIDEO.timeline.png")
    p.add_argument("--per-video", action="store_true",
                   help="videos: a row per video, not per frame (table, csv, json, labels, probabilities): its "
                        "classes by the mean of its frames' probabilities, as eval scores a clip (a camera trap's "
                        "clips sorted by animal); a live stream's once it ends")
    p.add_argument("--annotate", metavar="DIR",
                   help="write each image with its answer drawn across its top to DIR/NAME.annotated.png; each video "
                        "again with its segments' class and probability on every frame to DIR/VIDEO.annotated.mp4 "
                        "(H.264, with its sound); a live stream's or camera's frames as they are answered, each "
                        "with its own answer")
    tta_flag(p)
    threshold_flag(p)
    floor_flags(p)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="weights' precision (BN folded, channels_last); auto: bf16 on CUDA, fp32 elsewhere")
    runtime_flag(p)
    common(p, 64)
    decoder_and_compile(p)
    p.set_defaults(run=cmd_predict)

    p = commands.add_parser("explain", help="Grad-CAM heatmaps: where the model looked, as PNG overlays (videos: "
                                            "a video of overlays)")
    p.add_argument("model", help="a model file or a pretrained name")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) and/or CSV files "
                                             "of images (an image column, as for train; or a dataset file); or "
                                             "video files (.mp4, .mov, .mkv, .webm, .avi ...)")
    p.add_argument("--method", choices=METHODS, default="gradcam",
                   help="how the gradient weighs the layer's activations (docs/evaluation.md); layercam and hirescam "
                        "give finer maps at earlier layers (--layer layer2)")
    p.add_argument("--target", help="class name or index to explain (default: the predicted class)")
    p.add_argument("--layer", help="module to explain at, e.g. layer3 or layer4.1.conv2 (default: last stage)")
    threshold_flag(p)
    p.add_argument("--out", help="folder for the overlays (default: a new runs/explain/MODEL)")
    p.add_argument("--fps", type=float, metavar="N",
                   help="videos: explain at most N frames a second (default: every frame)")
    p.add_argument("--smooth", type=float, metavar="SECONDS",
                   help="videos: the segments, one key frame each, come from each class's probability averaged over "
                        "this many seconds around each frame (default: 1; 0: none)")
    common(p, 16)
    p.set_defaults(run=cmd_explain)


def _add_deploy_commands(commands) -> None:
    from .deploy import CALIBRATION_METHODS, QUANTIZE_RUNTIMES
    from .models import PRECISIONS

    p = commands.add_parser("export", help="ONNX or ExecuTorch export, checked against the model in its runtime")
    p.add_argument("model", help="a .safetensors model file or a pretrained name")
    p.add_argument("--format", choices=("onnx", "executorch"), default="onnx",
                   help="onnx (ONNX Runtime, OpenVINO), or executorch: a .pte for apps on phones and edge devices "
                        "(XNNPACK on Arm and x86 CPUs)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic (float32 in and out; ONNX)")
    p.add_argument("--max-batch", type=at_least(1), default=1,
                   help="executorch: the most images one call takes; memory is planned for them (default 1)")
    p.add_argument("--with-preprocessing", action="store_true",
                   help="the graph takes uint8 N x H x W x 3 pixels at the input size and normalises them itself")
    p.add_argument("--data", help="images for the parity check (default: the model's training data, if recorded)")
    p.add_argument("--samples", type=at_least(1), default=256, help="images in the parity check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write the file even if it fails the parity check")
    p.add_argument("-o", "--output", help="default: MODEL with .onnx, or .pte")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("quantize", help="INT8 static quantization (for ONNX Runtime, OpenVINO or ExecuTorch), "
                                             "refused if top-1 drops")
    p.add_argument("model", help="a .safetensors model file, or an fp32 .onnx exported by residual (not for "
                                 "executorch)")
    p.add_argument("--calib", required=True, help="calibration images: a dataset (its train split) or an image folder")
    p.add_argument("--val", help="dataset to compare top-1 on (default: --calib)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--method", choices=CALIBRATION_METHODS,
                   help="how ONNX Runtime's quantizer calibrates activation ranges (default minmax); ExecuTorch's "
                        "sets them from a histogram itself")
    p.add_argument("--calib-size", type=at_least(1), default=256, help="calibration images (a seeded sample)")
    p.add_argument("--max-drop", type=at_least(0.0, float), default=1.0,
                   help="largest top-1 loss allowed, in points (a multi-label model's: mAP points)")
    p.add_argument("--force", action="store_true", help="write the model even if it loses more than --max-drop")
    p.add_argument("--runtime", choices=QUANTIZE_RUNTIMES, default="onnxruntime",
                   help="the runtime the INT8 file is written for, compared and timed in: onnxruntime (its QLinear "
                        "operators), openvino (QuantizeLinear/DequantizeLinear pairs, the form it reads) or "
                        "executorch (a .pte for XNNPACK, beside its float .pte)")
    p.add_argument("--max-batch", type=at_least(1), default=1,
                   help="executorch: the most images one call takes; memory is planned for them (default 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", help="default: MODEL.int8.onnx, for OpenVINO MODEL.int8.openvino.onnx, for "
                                          "ExecuTorch MODEL.int8.pte")
    p.set_defaults(run=cmd_quantize)

    p = commands.add_parser("prune", help="structured channel pruning (L1), fine-tuned: a smaller, faster model")
    p.add_argument("model", help="a .safetensors model file")
    p.add_argument("data", help="the dataset the model was trained on (fine-tuning and the before/after top-1)")
    p.add_argument("--amount", type=float, default=0.3, help="fraction of each block's inner channels to remove")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs after pruning (0: none)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: a tenth of the from-scratch rate)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", help="default: MODEL-pruned.safetensors")
    p.set_defaults(run=cmd_prune)

    p = commands.add_parser("serve", help="an HTTP server for a model: POST an image, get its top classes as JSON")
    p.add_argument("model", help="a model file, a pretrained name or an exported .onnx or .pte")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--max-batch", type=int, default=32, help="most images in one run of the model")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a batch's first image waits for others to join it (0: never)")
    p.add_argument("--max-pending", type=int, default=128,
                   help="requests in flight before new ones are answered 503 (busy, retry)")
    p.add_argument("--max-image-mb", type=float, default=16.0, help="the largest request body taken (413 above)")
    p.add_argument("--topk", type=int, default=5, help="classes per image, unless a request asks ?topk=N")
    threshold_flag(p)
    floor_flags(p)
    tta_flag(p)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="weights' precision (BN folded, channels_last); auto: bf16 on CUDA, fp32 elsewhere")
    runtime_flag(p)
    p.add_argument("--image-size", type=at_least(1), help="feed images of this size instead of the model's own")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile, each batch padded to --max-batch (one graph; worth it on CUDA)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a silent connection is kept open")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    p.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS, with --tls-key")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--token-file", help=f"a file whose first line is the token every request but /health must send "
                                        f"(Authorization: Bearer TOKEN); default: ${SERVE_TOKEN_VARIABLE} if set")
    p.set_defaults(run=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="residual", description="Deep residual networks for image recognition.")
    parser.add_argument("--version", action="version", version=f"residual {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("models", help="table of every ResNet: parameters, MACs, depth, block")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*'")
    p.add_argument("--input-size", type=at_least(1), help="count MACs at this size instead of each model's default")
    p.set_defaults(run=cmd_models)

    p = commands.add_parser("compare", help="training runs side by side: best scores, curves, what differs")
    p.add_argument("runs", nargs="+", help="run folders (runs/train/NAME), or folders of them (runs/train)")
    p.add_argument("--out", help="folder for compare.png (default: a new runs/compare/NAME)")
    p.add_argument("--data", help="also score every run's model on the same images of this dataset, with a 95%% "
                                  "interval on each top-1 and McNemar's test of each gap to the best")
    p.add_argument("--split", choices=("train", "val", "test", "all"),
                   help="with --data: the split scored (default: as eval chooses)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--workers", type=at_least(0), help="decoding processes (default: the cores less one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("summary", help="a model layer by layer: output shapes, parameters, MACs")
    p.add_argument("model", help="a registry name (resnet50), pretrained weights (resnet50.tv2_in1k) or a "
                                 ".safetensors model file")
    p.add_argument("--image-size", type=at_least(1), help="the input's side (default: the model's own)")
    p.add_argument("--depth", type=int, choices=(1, 2, 3), default=2,
                   help="1: stem, stages, head; 2: also each block; 3: also the layers inside blocks")
    p.set_defaults(run=cmd_summary)

    p = commands.add_parser("pretrained", help="published weights that create_model/load_model can fetch")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(run=cmd_pretrained)

    p = commands.add_parser("download", help="fetch pretrained weights into the cache (sha256-checked)")
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="e.g. resnet50.tv2_in1k; 'frost': ImageNet-C's frost photographs, for robustness")
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
    p.add_argument("model", help="a .safetensors model file, or an .onnx or .pte file residual exported")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("train", help="train a ResNet on a folder of images, a CSV of labels, or CIFAR")
    _add_train_arguments(p)
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("finetune", help="fine-tune pretrained weights on your classes (two-stage by default)")
    _add_train_arguments(p)
    p.set_defaults(run=cmd_train, finetune=True, **FINETUNE_DEFAULTS)

    p = commands.add_parser("lr-find", help="the learning-rate range test: a plot and a suggested --lr")
    _add_train_arguments(p, runs="runs/lr-find")
    p.add_argument("--start-lr", type=float, default=1e-6)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100)
    p.set_defaults(run=cmd_lr_find)

    from .train.tune import PRUNERS

    p = commands.add_parser("tune", help="hyperparameter search: training runs whose settings Optuna proposes, "
                                         "the poor ones pruned early")
    _add_train_arguments(p, runs="runs/tune", resume=("TUNE_DIR", "go on with the search in this folder"))
    p.add_argument("--search", action="append", metavar="NAME=RANGE",
                   help="a setting to search (repeatable): lr=0.01..0.3:log, label-smoothing=0..0.2, "
                        "optimizer=sgd,adamw; default: lr, weight-decay and label-smoothing around residual "
                        "train's choice (docs/tuning.md)")
    p.add_argument("--trials", type=at_least(1), help="training runs in all (default 20; with --resume: as before)")
    p.add_argument("--pruner", choices=PRUNERS, default=None,
                   help="what stops a trial that falls behind: median (default), hyperband, none")
    p.add_argument("--prune-from", type=at_least(1), metavar="EPOCH",
                   help="no trial is stopped before this epoch (default: a third of --epochs, 2 at least); later "
                        "for data whose runs start slowly")
    p.add_argument("--time-limit", type=positive, metavar="MINUTES", help="no new trial starts after this")
    p.add_argument("--jobs", type=at_least(1), default=1, metavar="N",
                   help="trials trained at once, each in its own process: on the GPUs in turn (with --device auto "
                        "or cuda), or sharing the device named; on the CPU, sharing its cores (default 1)")
    p.set_defaults(run=cmd_tune)

    p = commands.add_parser("label-errors", help="images probably labelled wrong, found by k-fold models that "
                                                 "never trained on them")
    _add_train_arguments(p, runs="runs/label-errors")
    p.add_argument("--folds", type=at_least(2), default=3, help="models trained, each judging the images it left out")
    p.add_argument("--show", type=at_least(0), default=20, help="suspects listed here (all go to the CSV)")
    p.add_argument("--probabilities", metavar="CSV",
                   help="judge by these out-of-fold probabilities instead of training fold models: an earlier "
                        "audit's probabilities.csv, or any CSV with an image column and one per class")
    p.set_defaults(run=cmd_label_errors)

    p = commands.add_parser("embed", help="pooled features of images (include_top=False) -> a .npy file")
    p.add_argument("model", help="a model file or a pretrained name")
    p.add_argument("images", nargs="+", help="image files, folders and/or CSV files of images (or dataset files "
                                             "describing them)")
    p.add_argument("--out", default="features.npy", help="features, one row per image; paths go to OUT.paths.txt")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_embed)

    p = commands.add_parser("similar", help="the gallery images nearest to a query (cosine of ResNet features)")
    p.add_argument("model", help="a model file or a pretrained name")
    p.add_argument("query", help="the query image")
    p.add_argument("gallery", help="a folder of images (searched recursively)")
    p.add_argument("--topk", type=at_least(1), default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(run=cmd_similar)

    _add_inference_commands(commands)
    _add_deploy_commands(commands)

    p = commands.add_parser("shapes", help="write the built-in synthetic dataset as an ImageFolder of PNGs")
    p.add_argument("out", help="folder to write (train/ val/ test/, and masks/ with --masks)")
    p.add_argument("--size", type=at_least(1), default=32)
    p.add_argument("--per-class", type=at_least(1), default=1000,
                   help="training images per class (val/test get a fifth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", action="store_true", help="also write each shape's mask under masks/")
    p.add_argument("--multi-label", action="store_true",
                   help="0-3 different shapes per image, listed in labels.csv (10 x --per-class training images)")
    p.set_defaults(run=cmd_shapes)

    p = commands.add_parser("unpack", help="a dataset stored as Hugging Face stores them (Parquet or Arrow files) "
                            "or as WebDataset shards, or class folders of video clips, as an image folder")
    p.add_argument("source", help="a .parquet, .arrow or WebDataset .tar (.tar.gz) file, or the folder a dataset "
                   "was downloaded or saved to (searched through); or a folder of class folders of video clips "
                   "(their frames, split by clip)")
    p.add_argument("out", help="folder to write: train/ val/ test/ with a folder per class (must not exist yet)")
    p.add_argument("--image-column", help="the column of encoded images (default: the one declared an Image)")
    p.add_argument("--label-column", help="the column of labels (default: the one declared a ClassLabel, "
                   "'label' first)")
    p.add_argument("--split", action="append", default=[], metavar="WORD=SPLIT",
                   help="what the files of a split become: train, val, test or skip (repeatable; e.g. extra=train "
                   "for SVHN, test=skip)")
    p.add_argument("--classes", help="names of integer labels the files do not name (a WebDataset's .cls "
                   "indices): 'imagenet', or a text file with one class name per line")
    p.add_argument("--fps", type=float, metavar="N",
                   help="a folder of class folders of video clips: at most N frames a second of each (default: 1)")
    p.add_argument("--val-split", type=float,
                   help="clips: the share of each class's clips held out whole as val/ (default: 0.2; not with a "
                        "val/ folder of its own)")
    p.add_argument("--seed", type=int, default=0, help="clips: which clips the val split draws")
    p.add_argument("--frame-size", type=int, metavar="PIXELS",
                   help="clips: shrink each frame's shorter side to this (default: as the video has it)")
    p.set_defaults(run=cmd_unpack)

    p = commands.add_parser("check-data", help="bad files, class balance, duplicates and train/val leakage")
    p.add_argument("data", help="a dataset folder, a CSV of labels, a dataset file (.yaml), or CIFAR")
    p.add_argument("--val-split", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write check-data.json and copies.png (each group of copies, to look at) here")
    p.set_defaults(run=cmd_check_data)

    _add_experiment_commands(commands)

    from .train.config import COMPILE_MODES

    p = commands.add_parser("bench", help="training and inference images/s: residual's path beside a plain loop")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="small nets, small batches: a few seconds, any device")
    size.add_argument("--cpu-sized", action="store_true",
                      help="resnet20 training at batch 128 and resnet50 inference at batch 32: minutes on a CPU")
    p.add_argument("--only", action="append", metavar="TEXT",
                   help="only the workloads whose name contains TEXT (repeatable), e.g. --only resnet56")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=at_least(1), default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=at_least(0), default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="include the torch.compile setting (its warm-up can take minutes)")
    p.add_argument("--peak-tflops", type=positive,
                   help="the device's bf16 matrix rate for MFU (default on CUDA: 790, an H200 as measured)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile's mode for residual's compiled rows (default: as residual train chooses)")
    p.add_argument("--augment", choices=("auto", "none", "cifar", "standard", "strong"), default="none",
                   help="the training rows' augmentation: none (default) does the peer's work; auto is what "
                        "`residual train` would choose")
    p.set_defaults(run=cmd_bench)

    p = commands.add_parser("demo", help="the guided tour on generated data")
    p.add_argument("--out", default="runs/demo", help="where the demo writes its run directory")
    p.add_argument("--data", default="data/shapes-32", help="where the demo writes (or finds) its dataset")
    p.set_defaults(run=cmd_demo)
    for command_parser in commands.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def refuse_unrecognized(args: argparse.Namespace, unrecognized: list[str]) -> None:
    """Exit with the command's own usage and an error naming what it did not take. argparse alone names neither
    the command nor, when a second positional came (`finetune resnet18 DATA`), where the first belongs."""
    message = f"unrecognized arguments: {' '.join(unrecognized)}"
    data = getattr(args, "data", None)
    if hasattr(args, "pretrained") and data and not unrecognized[0].startswith("-"):  # train, finetune, tune ...
        message += (f" ({args.command} takes one dataset and read {data!r} as it: name the architecture with "
                    f"--model NAME and pretrained weights with --from NAME|PATH)")
    args.command_parser.error(message)


def file_system_message(error: OSError) -> str | None:
    """One line for a file the file system would not let a command read or write (a full disk, no permission, a
    read-only mount), naming it; None for other errors, which stay tracebacks."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        written = f"{error.filename}: " if error.filename else ""  # none: the output stream (`> FILE`)
        return f"{written}out of disk space (or quota) writing it; free some space and run again"
    if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not error.filename:
        return None
    path = Path(error.filename)
    if path.exists() and not os.access(path, os.R_OK):
        return f"{path}: {error.strerror} (this user cannot read it)"
    return f"{path}: {error.strerror} (this user cannot write there); give a folder it can write to"


TRAINING_COMMANDS = ("train", "finetune", "lr-find", "tune", "label-errors", "experiment")


def out_of_memory_message(error: RuntimeError, command: str) -> str | None:
    """One line for a batch that did not fit in the device's memory, with what to lower; None for other errors."""
    text = str(error)
    cpu = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    gpu = re.search(r"(CUDA|MPS backend) out of memory\. Tried to allocate ([\d.]+ \w+)", text)
    if cpu:
        asked = f"the CPU's: it asked for {int(cpu.group(1)) / 2**30:.1f} GiB at once"
    elif gpu:
        asked = f"the GPU's: it asked for {gpu.group(2)} more"
    else:
        return None
    training = (" (--accumulate K keeps the effective batch; --amp and --grad-checkpointing need less memory per "
                "image)" if command in TRAINING_COMMANDS else "")
    return f"out of memory ({asked}); lower --batch-size{training}, or the image size"


def main(argv: list[str] | None = None) -> int:
    args, unrecognized = build_parser().parse_known_args(argv)
    if unrecognized:
        refuse_unrecognized(args, unrecognized)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    console = message_console()
    try:
        return args.run(args, console)
    except ResidualError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`residual predict ... | head`): stop quietly
        sys.stdout = open(os.devnull, "w")
        return 0
    except (OSError, RuntimeError) as error:
        message = (file_system_message(error) if isinstance(error, OSError)
                   else out_of_memory_message(error, args.command))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
