"""Console tables (rich) for models, pretrained weights and model files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from .data.check import DataReport
from .data.corruptions import CORRUPTIONS
from .metrics import SCORE_NAMES, SIGNIFICANCE, p_value_text, shows_top5
from .models import ModelInfo, Preprocessing, count_params, model_info
from .models.summary import LayerSummary
from .train.compare import DataScore, RunRecord, recipe_differences
from .progress import transient_bar
from .report import clip_rows, temperature_text, threshold_text, unknown_scores
from .weights import PretrainedWeights, cache_dir, load_model, read_metadata

if TYPE_CHECKING:  # robustness draws with matplotlib: not imported for a table's annotation
    from .robustness import RobustnessResult


def collect_model_info(names: list[str], console: Console, input_size: int | None = None) -> list[ModelInfo]:
    """model_info for each name, with a progress bar: the deepest nets take a second each."""
    infos = []
    columns = (TextColumn("counting {task.fields[name]:<18}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with transient_bar(*columns, console=console) as progress:
        task = progress.add_task("models", total=len(names), name="")
        for name in names:
            progress.update(task, name=name)
            infos.append(model_info(name, input_size=input_size))
            progress.advance(task)
    return infos


def new_table(title: str, columns: Iterable[str], right: Iterable[str] = (), **options) -> Table:
    """A rich Table with these column headers (left-justified, except those in `right`) whose cells wrap,
    and fold what is longer than a line, instead of cutting it short: rich's default cuts a long path or
    name to "very_long_dire…" when the table is wider than the console, and that is what tells the rows
    apart."""
    table = Table(title=title, **options)
    right = set(right)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    return table


def models_table(infos: Iterable[ModelInfo]) -> Table:
    table = new_table("ResNets (parameters with the default head; MACs for one image)",
                      ("name", "family", "block", "depth", "params (M)", "MACs (G)", "input", "about"),
                      right=("depth", "params (M)", "MACs (G)", "input"))
    for i in infos:
        table.add_row(i.name, i.family, i.block, str(i.depth), f"{i.params / 1e6:.3f}", f"{i.macs / 1e9:.3f}",
                      f"{i.input_size}px", i.description)
    return table


def layer_summary_table(summary: LayerSummary, title: str) -> Table:
    """A model layer by layer (Keras' model.summary()): output shape, parameters, MACs and their share."""
    columns = ("layer", "type", "output", "params", "MACs (M)", "share of MACs")
    table = new_table(title, columns, right=columns[2:])
    for row in summary.rows:
        table.add_row("  " * (row.depth - 1) + row.name, row.kind, " x ".join(map(str, row.output)) or "-",
                      f"{row.params:,}", f"{row.macs / 1e6:,.1f}" if row.macs else "0",
                      f"{row.macs / summary.macs:.1%}" if row.macs else "")
    table.add_row("[bold]total", "", "input " + " x ".join(map(str, summary.input_shape)),
                  f"[bold]{summary.params:,}", f"[bold]{summary.macs / 1e6:,.1f}", "")
    return table


def pretrained_table(entries: Iterable[PretrainedWeights]) -> Table:
    table = new_table(f"Pretrained weights (cache: {cache_dir()})",
                      ("name", "ImageNet top-1", "eval resize/crop", "source", "cached"),
                      right=("ImageNet top-1", "eval resize/crop"))
    for w in entries:
        cached = "yes" if (cache_dir() / w.filename).is_file() else ""
        table.add_row(w.name, f"{w.top1:.3f}" if w.top1 else "", f"{w.preprocessing.resize_size}/"
                      f"{w.preprocessing.input_size}", w.source, cached)
    return table


def outputs_line(multi_label: bool, threshold: float | list[float]) -> str:
    """What a model's outputs are, for `residual info`: a softmax, or sigmoids with their threshold."""
    if not multi_label:
        return "single-label: softmax over the classes"
    return f"multi-label: one sigmoid per class, a class present where it reaches the threshold " \
           f"({threshold_text(threshold)})"


def classes_line(count: int, names: list[str] | None) -> str:
    """A model's classes in one table cell: the count and the first eight names."""
    listed = f": {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}" if names else " (unnamed)"
    return f"{count}{listed}"


def fields_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column table of (field, value) rows, as `residual info` shows a model file."""
    table = new_table(title, ("field", "value"), show_header=False)
    for field, value in rows:
        table.add_row(field, value)
    return table


def model_file_table(path: Path) -> Table:
    meta = read_metadata(path)
    model = load_model(path)
    config = meta["config"]
    names = meta["class_names"]
    pre = meta["preprocessing"]
    options = {k: v for k, v in config.items() if k not in ("num_classes", "in_chans")}
    rows = [("architecture", meta["arch"]),
            ("parameters", f"{count_params(model):,}"),
            ("classes", classes_line(config["num_classes"], names)),
            ("outputs", outputs_line(meta["multi_label"], meta["threshold"])),
            ("input", f"{config['in_chans']} channels, resize {pre['resize_size']} -> crop {pre['input_size']}, "
                      f"{pre['interpolation']}"),
            ("mean / std", Preprocessing(**pre).normalisation()),
            ("config", ", ".join(f"{k}={v}" for k, v in options.items())),
            ("written by", f"residual {meta['residual_version']}, torch {meta['torch_version']}")]
    if meta["extra"]:
        rows.append(("extra", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in meta["extra"].items())))
    return fields_table(str(path), rows)


def data_report_tables(report: DataReport, limit: int = 15) -> list[Table]:
    """Class counts, a summary with a verdict per check, and the offending files."""
    splits = list(report.counts)
    counts = new_table(f"{report.dataset.root} ({report.dataset.kind}, {len(report.dataset.classes)} classes)",
                       ["class", *splits], right=splits)
    for index, name in enumerate(report.dataset.classes):
        counts.add_row(name, *(str(report.counts[split][index]) for split in splits))
    counts.add_row("[bold]total", *(f"[bold]{sum(report.counts[split])}" for split in splits))

    summary = new_table("checks", ("check", "result", ""))
    verdict = lambda bad: "[red]problem" if bad else "[green]ok"  # noqa: E731
    summary.add_row("unreadable images", str(len(report.bad)), verdict(report.bad))
    summary.add_row("ignored files (not images, or hidden like ._x.jpg)", str(len(report.dataset.ignored)), "")
    summary.add_row("exact duplicates (groups)", str(len(report.duplicates)), verdict(report.duplicates))
    summary.add_row("near-identical copies: re-encoded or resized (groups)", str(len(report.near_duplicates)),
                    verdict(report.near_duplicates))
    summary.add_row("train/val/test leakage", str(len(report.leaks)), verdict(report.leaks))
    summary.add_row("train/val/test leakage through near-identical copies", str(len(report.near_leaks)),
                    verdict(report.near_leaks))
    summary.add_row("same or near-identical image filed under different classes", str(len(report.conflicts)),
                    verdict(report.conflicts))
    summary.add_row("classes without training images", str(len(report.empty_classes)), verdict(report.empty_classes))
    summary.add_row("imbalance (largest/smallest train class)", f"{report.imbalance:.1f}x",
                    verdict(report.imbalance > 10))

    details = new_table("details", ("what", "file"), show_header=False)
    rows = ([("no training images", f"class {name!r}") for name in report.empty_classes]
            + [("unreadable", message) for message in report.bad]
            + [("ignored", str(path)) for path in report.dataset.ignored]
            + [("duplicates", " = ".join(group)) if len(set(group)) > 1
               else (f"listed {len(group)} times", group[0]) for group in report.duplicates]  # a CSV's rows
            + [("near-identical", " ~ ".join(group)) for group in report.near_duplicates]
            + [(f"{split} leaks train", f"{item} = {train_item}") for split, item, train_item in report.leaks]
            + [(f"{split} near-copy of train", f"{item} ~ {train_item}")
               for split, item, train_item in report.near_leaks]
            + [("different classes", " = ".join(group)) for group in report.conflicts])
    for what, file in rows[:limit]:
        details.add_row(what, file)
    if len(rows) > limit:
        details.add_row("...", f"{len(rows) - limit} more")
    return [counts, summary] + ([details] if rows else [])


def score_text(value: float | None, digits: int) -> str:
    """A score to `digits` decimals; '-' where it is undefined (ROC AUC of a class absent from the images)."""
    return "-" if value is None else f"{value:.{digits}f}"


def eval_tables(metrics: dict, title: str, limit: int = 30) -> list[Table]:
    """The headline numbers, per-class scores (the worst `limit` by F1 when there are more), confused pairs."""
    summary = new_table(title, ("metric", "value"), right=("value",), title_justify="left", show_header=False)
    low, high = metrics["top1_ci95"]
    top5 = [("top-5", f"{metrics['top5']:.2%}")] if shows_top5(len(metrics["per_class"])) else []
    for name, value in [("images", f"{metrics['images']:,}"), ("top-1", f"{metrics['top1']:.2%}"),
                        ("top-1, 95% interval", f"{low:.2%} - {high:.2%}"),
                        *top5, ("loss", f"{metrics['loss']:.4f}"),
                        ("ECE", f"{metrics['ece']:.4f}"), ("macro F1", f"{metrics['macro']['f1']:.4f}"),
                        ("weighted F1", f"{metrics['weighted']['f1']:.4f}"),
                        ("macro ROC AUC", score_text(metrics["macro"]["roc_auc"], 4)), *clip_rows(metrics)]:
        summary.add_row(name, value)
    rows = metrics["per_class"]
    shown = rows if len(rows) <= limit else sorted(rows, key=lambda r: r["f1"])[:limit]
    score_columns = ("precision", "recall", "F1", "ROC AUC", "AP", "support")
    per_class = new_table("per class" if shown is rows else f"the {limit} classes with the lowest F1",
                          ("class", *score_columns), right=score_columns)
    scores = ("precision", "recall", "f1", "roc_auc", "average_precision")
    for row in shown:
        per_class.add_row(row["class"], *(score_text(row[k], 3) for k in scores), str(row["support"]))
    for name in ("macro", "weighted"):
        averages = metrics[name]
        per_class.add_row(f"[bold]{name} avg", *(f"[bold]{score_text(averages[k], 3)}" for k in scores),
                          f"[bold]{metrics['images']}")
    selective_columns = ("probability >=", "images kept", "their top-1")
    selective = new_table("accepting only predictions at least this sure", selective_columns,
                          right=selective_columns)
    for row in metrics["selective"]:
        selective.add_row(f"{row['threshold']:g}", f"{row['coverage']:.1%}",
                          "-" if row["accuracy"] is None else f"{row['accuracy']:.2%}")
    tables = [summary, per_class, selective]
    if metrics["most_confused"]:
        confused = new_table("most confused (true -> predicted)", ("true", "predicted", "images", "share of true"),
                             right=("images", "share of true"))
        for pair in metrics["most_confused"]:
            confused.add_row(pair["true"], pair["predicted"], str(pair["count"]), f"{pair['share_of_true']:.1%}")
        tables.append(confused)
    return tables + unknown_tables(metrics)


def unknown_tables(metrics: dict) -> list[Table]:
    """With unknown images evaluated: each score's ROC AUC and floor, then per probability threshold the known
    images it keeps, their score, and the unknown images it lets through."""
    if "unknown" not in metrics:
        return []
    unknown = metrics["unknown"]
    score = "their top-1" if "labelled" not in unknown else "their exact match"
    columns = ("score", "ROC AUC", f"floor keeping {unknown['keep_known']:.0%} of the known", "unknown let through")
    scores = new_table(f"telling {unknown['unknown_images']:,} unknown images from the {unknown['known_images']:,} "
                       f"known", columns, right=columns[1:])
    for name, detection in unknown_scores(unknown):
        if "skipped" in detection:
            scores.add_row(name, "-", "-", f"not measured: {detection['skipped']}")
        else:
            scores.add_row(name, score_text(detection["roc_auc"], 4), f"{detection['floor']:.4f}",
                           f"{detection['at_floor']['unknown_passed']:.1%}")
    columns = ("probability >=", "known kept", score, "unknown let through")
    table = new_table("accepting only predictions at least this sure", columns, right=columns)
    for row in unknown["thresholds"]:
        table.add_row(f"{row['threshold']:g}", f"{row['coverage']:.1%}",
                      "-" if row["accuracy"] is None else f"{row['accuracy']:.2%}", f"{row['unknown_passed']:.1%}")
    return [scores, table]


def multi_label_eval_tables(metrics: dict, title: str, limit: int = 30) -> list[Table]:
    """A multi-label model's headline numbers, and per-class scores (the worst `limit` by average precision when
    there are more)."""
    summary = new_table(title, ("metric", "value"), right=("value",), title_justify="left", show_header=False)
    low, high = metrics["exact_match_ci95"]
    labels = metrics["labels_per_image"]
    for name, value in [("images", f"{metrics['images']:,}"),
                        ("mAP", "-" if metrics["map"] is None else f"{metrics['map']:.2%}"),
                        (f"F1 micro (threshold {threshold_text(metrics['thresholds'])})",
                         f"{metrics['micro']['f1']:.4f}"),
                        ("F1 macro", f"{metrics['macro']['f1']:.4f}"),
                        ("exact match", f"{metrics['exact_match']:.2%}"),
                        ("exact match, 95% interval", f"{low:.2%} - {high:.2%}"),
                        ("Hamming loss", f"{metrics['hamming_loss']:.4f}"), ("loss", f"{metrics['loss']:.4f}"),
                        ("ECE (every class's probability)", f"{metrics['ece']:.4f}"),
                        ("labels per image, true / predicted", f"{labels['true']:.2f} / {labels['predicted']:.2f}")]:
        summary.add_row(name, value)
    rows = metrics["per_class"]
    ranked = lambda row: -1.0 if row["average_precision"] is None else row["average_precision"]  # noqa: E731
    shown = rows if len(rows) <= limit else sorted(rows, key=ranked)[:limit]
    columns = ("AP", "ROC AUC", "precision", "recall", "F1", "images with it", "predicted")
    per_class = new_table("per class" if shown is rows else f"the {limit} classes with the lowest AP",
                          ("class", *columns), right=columns)
    for row in shown:
        per_class.add_row(row["class"], *(score_text(row[k], 3) for k in ("average_precision", "roc_auc", "precision",
                                                                           "recall", "f1")),
                          str(row["support"]), str(row["predicted"]))
    return [summary, per_class, *unknown_tables(metrics)]


def thresholds_table(report: dict) -> list[Table]:
    """Per-class thresholds' effect on each split checked (F1 and exact match before and after), and the
    thresholds themselves."""
    scores = ("images", "mAP", "F1 micro", "F1 macro", "exact match")
    effect = new_table(f"per-class thresholds fitted on {report['fitted_on']}", ("split", "thresholds", *scores),
                       right=scores)
    for name, split in report["splits"].items():
        for stage, label in (("before", "the model's"), ("after", "per class")):
            effect.add_row(name, label, f"{split['images']:,}", "-" if split["map"] is None else f"{split['map']:.2%}",
                           f"{split[stage]['f1_micro']:.4f}", f"{split[stage]['f1_macro']:.4f}",
                           f"{split[stage]['exact_match']:.2%}")
    chosen = new_table("thresholds", ("class", "threshold"), right=("threshold",))
    for name, value in report["thresholds"].items():
        chosen.add_row(name, f"{value:.3f}")
    return [effect, chosen]


def calibration_table(report: dict) -> Table:
    """Temperature scaling's effect on each split checked: ECE and negative log-likelihood before and after."""
    metric = report["metric"]
    scores = ("images", SCORE_NAMES[metric], "ECE before", "ECE after", "NLL before", "NLL after")
    table = new_table(f"temperature scaling, T = {temperature_text(report['temperature'])} fitted on "
                      f"{report['fitted_on']}", ("split", *scores), right=scores)
    for name, scores in report["splits"].items():
        table.add_row(name, f"{scores['images']:,}",
                      f"{scores[metric]:.2%}", f"{scores['before']['ece']:.4f}", f"{scores['after']['ece']:.4f}",
                      f"{scores['before']['nll']:.4f}", f"{scores['after']['nll']:.4f}")
    return table


def temperatures_table(report: dict) -> Table:
    """A multi-label model's temperature per class: T > 1 softened its probabilities, T < 1 sharpened them."""
    table = new_table("per-class temperatures", ("class", "T", "its probabilities were"), right=("T",))
    for name, value in zip(report["classes"], report["temperature"]):
        table.add_row(name, f"{value:.3g}", "over-confident" if value > 1 else "under-confident" if value < 1
                      else "kept (all held-out images alike)")
    return table


def predictions_table(predictions: list, title: str, item: str = "image") -> Table:
    """A row per image (or video: `item`) with its answer and the next classes."""
    if predictions and predictions[0].present is not None:  # a multi-label model's: what is present, then the top
        table = new_table(title, (item, "labels", "top"))
        for prediction in predictions:
            table.add_row(prediction.source, " ".join(prediction.answer()) or "(none)",
                          ", ".join(f"{n} {p:.3f}" for _, n, p in prediction.top))
        return table
    table = new_table(title, (item, "class", "probability", "next"), right=("probability",))
    for prediction in predictions:
        (_, name, probability), *others = prediction.top
        table.add_row(prediction.source, f"[dim]unsure ({name}?)" if prediction.unsure else name,
                      f"{probability:.3f}", ", ".join(f"{n} {p:.3f}" for _, n, p in others))
    return table


def segments_table(segments: list, title: str, key_frames: list[str] | None = None) -> Table:
    """A video's segments (video.Segment): when each starts and ends, its class and how sure; with `key_frames`,
    the file of each one's key frame (explain)."""
    columns = ("from", "to", "class", "probability", "frames") + (("key frame",) if key_frames is not None else ())
    table = new_table(title, columns, right=("probability", "frames"))
    for index, segment in enumerate(segments):
        table.add_row(clock_time(segment.start), clock_time(segment.end),
                      segment.label or "[dim]unsure (no class)", f"{segment.probability:.3f}", str(segment.frames),
                      *([key_frames[index]] if key_frames is not None else []))
    return table


def clock_time(seconds: float) -> str:
    """Seconds as a player shows them: m:ss.s, or h:mm:ss.s from an hour."""
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes}:{rest:04.1f}"


def parity_table(parity: dict, title: str) -> Table:
    """An export's parity check against the original: logits, and the answers (top-1, or a multi-label model's
    labels) on the sample."""
    agreement = f"{parity['answers']} agreement"
    table = new_table(title, ("images", "sample from", "max |logit diff|", "tolerance", agreement, "verdict"),
                      right=("images", "max |logit diff|", "tolerance", agreement, "verdict"))
    table.add_row(str(parity["images"]), parity["source"], f"{parity['max_abs_diff']:.3g}",
                  f"{parity['tolerance']:.3g}", f"{parity['agreement']:.2%}",
                  "[green]pass" if parity["passed"] else "[red]FAIL")
    return table


def runs_table(records: list[RunRecord], differing: list[str]) -> Table:
    """Training runs, best first: their best validation scores, how far they got, and a column for each
    setting that differs between them."""
    score = "val mAP" if records and records[0].score == "val_map" else "val top-1"
    scores = (score, "val loss", "best epoch", "epochs", "time")
    table = new_table(f"{len(records)} training runs, best {score.replace('val', 'validation')} first",
                      ("run", *scores, "what differs"), right=scores)
    for record in records:
        best = record.best or {}
        kept = (f"{best[record.score]:.2%}", f"{best['val_loss']:.4f}", str(best["epoch"])) if best else ("-",) * 3
        minutes, seconds = divmod(round(record.seconds), 60)
        table.add_row(record.name, *kept, record.state, f"{minutes}:{seconds:02d}",
                      recipe_differences(record, differing))
    return table


def data_scores_table(scores: list[DataScore], title: str) -> Table:
    """Runs on the same images, best top-1 first: each one's top-1 with its 95% interval, and against the best,
    the images only one of the two got right and McNemar's p-value for such a split arising by chance.
    Multi-label runs: mAP with its bootstrap interval, the images with every label right, and the paired
    bootstrap's p-value for the gap in mAP."""
    columns = (SCORE_NAMES[scores[0].metric], "95% interval", "only best right", "only it right", "p (vs best)")
    table = new_table(title, ("run", *columns, "the gap"), right=columns)
    for score in scores:
        low, high = score.score_ci95
        versus = score.versus_best
        if versus is None:
            cells = ("-", "-", "-", "best")
        else:
            cells = (str(versus["only_first"]), str(versus["only_second"]), p_value_text(versus),
                     "more than chance" if versus["p_value"] < SIGNIFICANCE else "could be chance")
        table.add_row(score.record.name, f"{score.score:.2%}", f"{low:.2%} - {high:.2%}", *cells)
    return table


def comparison_table(rows: dict[str, dict], title: str) -> Table:
    """Models side by side (float vs int8, before vs after pruning): whichever of size, parameters, MACs,
    latency, throughput and top-1 (or mAP) the rows have."""
    columns = [("size_mb", "size (MB)", "{:.2f}"), ("params", "params (M)", "{:.3f}"), ("macs", "MACs (M)", "{:.1f}"),
               ("latency_ms_b1", "latency b1 (ms)", "{:.2f}"), ("images_per_s_b32", "img/s b32", "{:,.0f}"),
               *((key, name, "{:.2%}") for key, name in SCORE_NAMES.items())]
    scale = {"params": 1e-6, "macs": 1e-6}
    present = [c for c in columns if any(c[0] in row for row in rows.values())]
    headers = [header for _, header, _ in present]
    table = new_table(title, ["model", *headers], right=headers)
    for name, row in rows.items():
        table.add_row(name, *(fmt.format(row[key] * scale.get(key, 1)) if key in row else ""
                              for key, _, fmt in present))
    return table


def robustness_table(result: RobustnessResult) -> Table:
    """Top-1 (mAP) per corruption and severity, its mean, and with a baseline the corruption errors against it."""
    with_baseline = result.baseline is not None
    severities = [f"severity {s}" for s in result.severities]
    columns = ["corruption", "kind", *severities, "mean"] + (["CE", "relative CE"] if with_baseline else [])
    table = new_table(f"{result.model.name}: {SCORE_NAMES[result.metric]} on {result.images:,} {result.split} "
                      f"images, clean {result.model.clean:.2%}; {result.protocol}'s severities", columns,
                      right=columns[2:])
    errors, relative = result.corruption_errors(), result.corruption_errors(relative=True)
    for name, values in result.model.scores.items():
        row = [name, CORRUPTIONS[name], *(f"{value:.1%}" for value in values), f"{sum(values) / len(values):.1%}"]
        if with_baseline:
            row += [score_text(errors[name], 3), score_text(relative[name], 3)]
        table.add_row(*row)
    return table
