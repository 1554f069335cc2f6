"""The `defectscope` command: a thin Typer layer over the library, rendered with rich."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from defectscope import __version__
from defectscope.artifacts import load_model, model_info, save_model, set_threshold, write_atomic
from defectscope.backbones import LITE_FILES, list_backbones, load_backbone
from defectscope.data.images import IMAGE_SUFFIXES, read_image
from defectscope.data.layout import load_dataset
from defectscope.data.summary import summarize
from defectscope.data.synthetic import make_demo_dataset
from defectscope.detectors import DETECTORS, create_detector
from defectscope.errors import DefectscopeError
from defectscope.evaluation import evaluate as run_evaluation
from defectscope.experiments.config import load_experiment
from defectscope.export.check import check_export
from defectscope.export.labels import FORMATS, ExportOptions, export_ground_truth
from defectscope.export.pseudo import export_pseudo_labels
from defectscope.experiments.runner import run_experiment
from defectscope.experiments.table import build_table, csv_text, load_results, markdown
from defectscope.reports import metrics_markdown, write_report
from defectscope.thresholds import Calibration
from defectscope.viz import overlay, save_rgb

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Industrial visual inspection: learn good parts, find defects.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets and make demo data.")
app.add_typer(data_app, name="data")
console = Console()
state = {"quiet": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"defectscope {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    state["quiet"] = quiet


@contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (off with --quiet), yielding an advance-by-n callback."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), disable=state["quiet"], transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@data_app.command("summary")
def data_summary(
    path: Annotated[Path, typer.Argument(help="Dataset folder (MVTec layout or plain folders).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Classes, counts per split and class, image sizes, masks and imbalance of a dataset."""
    summary = summarize(load_dataset(path))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    defects = summary["defect_classes"]
    console.print(f"[bold]{summary['root']}[/] ({summary['layout']} layout): {summary['total_images']} images, "
                  f"{defects['count']} defect classes: {', '.join(defects['names']) or 'none'}")
    table = Table(title="images per class and split")
    for column in ("class", "train", "test", "total", "good : class"):
        table.add_column(column, justify="left" if column == "class" else "right")
    ratios = summary["imbalance"]["good_per_defect"]
    for name, row in summary["per_class"].items():
        flag = " (combined)" if name in defects["combined"] else ""
        table.add_row(name + flag, str(row["train"]), str(row["test"]), str(row["total"]),
                      f"{ratios[name]:.2f}" if name in ratios else "")
    table.add_row("all", str(summary["splits"]["train"]["images"]), str(summary["splits"]["test"]["images"]),
                  str(summary["total_images"]), "", style="bold")
    console.print(table)
    formats = ", ".join(f"{f['count']} x {f['width']}x{f['height']} {f['mode']} ({f['channels']} ch)" for f in summary["image_formats"])
    dist = summary["distribution"]
    console.print(f"image formats: {formats}")
    console.print(f"train fraction {dist['train_fraction']:.1%}; test: {dist['test_good']} good, {dist['test_defective']} defective")
    console.print(f"masks: {summary['masks']} ({summary['defective_without_mask']} defective images without one)")
    imbalance = summary["imbalance"]
    if imbalance["largest_to_smallest"]:
        console.print(f"imbalance: largest class '{imbalance['largest_class']}' / smallest '{imbalance['smallest_class']}' "
                      f"= {imbalance['largest_to_smallest']:.2f}")
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")


@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Argument(help="Folder to write the demo dataset to.")],
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write the seeded synthetic demo dataset (MVTec layout, with masks)."""
    make_demo_dataset(out, size=size, seed=seed)
    console.print(f"demo dataset written to {out}")


@app.command("backbones")
def backbones() -> None:
    """List backbones: offline EfficientNet-Lite first, then torchvision models."""
    for name in list_backbones():
        console.print(f"{name}  [dim]{'(weights ship with defectscope)' if name in LITE_FILES else '(torchvision weights)'}[/]")


WeightsOption = Annotated[Optional[Path], typer.Option("--weights", help="Backbone weight file (torchvision backbones offline).")]


def _fit(data: Path, model: str, settings: dict, out: Path, weights: Path | None = None, download: bool = False) -> tuple:
    dataset = load_dataset(data)
    detector = create_detector(model, **settings)
    if weights is not None or download:
        detector.backbone = load_backbone(detector.config.backbone, detector.strides, weights, download)
    train = [s.path for s in dataset.train]
    with _progress(f"fitting {model}", len(train)) as advance:
        report = detector.fit(train, progress=advance)
    save_model(detector, out)
    return dataset, detector, report


@app.command("fit")
def fit(
    data: Annotated[Path, typer.Argument(help="Dataset folder; its good training images are used.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write.")],
    model: Annotated[str, typer.Option(help=f"One of: {', '.join(sorted(DETECTORS))}.")] = "patchcore",
    backbone: Annotated[str, typer.Option(help="Feature extractor (see `defectscope backbones`).")] = "efficientnet_lite0",
    coreset: Annotated[Optional[float], typer.Option(help="PatchCore memory ratio (default 0.1).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Square resize before cropping (default: the model's).")] = None,
    crop: Annotated[Optional[int], typer.Option(help="Center crop side; 0 for no crop (default: the model's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    weights: WeightsOption = None,
    download: Annotated[bool, typer.Option(help="Download torchvision weights if they are not found locally.")] = False,
) -> None:
    """Fit a detector on the good training images and write a model file."""
    settings: dict = {"backbone": backbone, "seed": seed}
    if image_size is not None:
        settings["image_size"] = image_size
    if crop is not None:
        settings["crop"] = crop or None
    if coreset is not None:
        if model != "patchcore":
            raise DefectscopeError("--coreset applies to --model patchcore only")
        settings["coreset_ratio"] = coreset
    _, detector, report = _fit(data, model, settings, output, weights, download)
    threshold = f"{detector.calibration.threshold:.4g}" if detector.calibration else "none (too few images)"
    console.print(f"fitted {model} on {report.train_images} images in {report.seconds:.1f} s "
                  f"({report.calibration_images} held out for the threshold: {threshold}) -> {output}")


def _expand_inputs(inputs: list[Path]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not found:
                raise DefectscopeError(f"folder {item} holds no images")
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise DefectscopeError(f"{item} does not exist")
    return paths


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Argument(help="Model file from `defectscope fit`.")],
    inputs: Annotated[list[Path], typer.Argument(help="Images or folders of images.")],
    heatmaps: Annotated[Optional[Path], typer.Option(help="Write a heatmap overlay PNG per image here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    weights: WeightsOption = None,
) -> None:
    """Score images: raw score, normalized score (1.0 = threshold) and verdict."""
    detector = load_model(model, weights)
    paths = _expand_inputs(inputs)
    with _progress("scoring", len(paths)) as advance:
        prediction = detector.predict(paths, progress=advance)
    normalized = prediction.normalized if prediction.threshold else [None] * len(paths)
    verdicts = prediction.verdicts if prediction.threshold else ["unknown (no threshold)"] * len(paths)
    rows = [{"path": str(p), "score": float(s), "normalized": None if n is None else float(n), "verdict": v}
            for p, s, n, v in zip(paths, prediction.scores, normalized, verdicts)]
    if heatmaps is not None and prediction.maps is not None:
        high = 2 * prediction.threshold if prediction.threshold else float(np.max([m.max() for m in prediction.maps]))
        for row, heat in zip(rows, prediction.maps):
            target = heatmaps / f"{Path(row['path']).parent.name}_{Path(row['path']).stem}.png"
            save_rgb(target, overlay(read_image(row["path"]), heat, 0.0, high))
            row["heatmap"] = str(target)
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table()
    for column in ("image", "score", "normalized", "verdict"):
        table.add_column(column)
    for row in rows:
        colour = "red" if row["verdict"] == "defective" else "green"
        norm = "" if row["normalized"] is None else f"{row['normalized']:.3f}"
        table.add_row(row["path"], f"{row['score']:.4g}", norm, f"[{colour}]{row['verdict']}[/]")
    console.print(table)


@app.command("evaluate")
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    data: Annotated[Path, typer.Argument(help="Dataset folder with a test split.")],
    out: Annotated[Optional[Path], typer.Option(help="Write metrics.json/.md, roc.png, gallery.png here.")] = None,
    set_f1_threshold: Annotated[bool, typer.Option("--set-f1-threshold", help="Store the F1-optimal threshold in the model file.")] = False,
    weights: WeightsOption = None,
) -> None:
    """Metrics on the test split: image/pixel AUROC, AUPRO, F1-max, per defect type."""
    detector = load_model(model, weights)
    dataset = load_dataset(data)
    with _progress("evaluating", len(dataset.test)) as advance:
        evaluation = run_evaluation(detector, dataset, progress=advance)
    console.print(metrics_markdown(evaluation.metrics))
    if out is not None:
        for path in write_report(evaluation, detector, out):
            console.print(f"wrote {path}")
    if set_f1_threshold:
        best = evaluation.metrics.get("at_f1_threshold")
        if best is None:
            raise DefectscopeError("no F1-optimal threshold: the test split needs good and defective images")
        previous = detector.calibration
        set_threshold(model, Calibration(best["threshold"], "f1", evaluation.metrics["image_f1_max"],
                                         previous.good_mean if previous else 0.0, previous.good_std if previous else 0.0,
                                         previous.good_count if previous else 0))
        console.print(f"threshold set to {best['threshold']:.4g} in {model}")


experiment_app = typer.Typer(no_args_is_help=True, help="Run attempts from a config file and compare them in a table.")
app.add_typer(experiment_app, name="experiment")


def _show_table(folder: Path, metric: str | None) -> None:
    """Write table.md / table.csv / table.json in the folder and print the table."""
    meta, results = load_results(folder)
    table = build_table(meta, results, metric)
    write_atomic(folder / "table.md", markdown(table).encode())
    write_atomic(folder / "table.csv", csv_text(table).encode())
    write_atomic(folder / "table.json", (json.dumps(table, indent=1) + "\n").encode())
    console.print(markdown(table), highlight=False, soft_wrap=True)  # plain Markdown: readable at any width, pastes as is
    console.print(f"tables: {folder / 'table.md'}, {folder / 'table.csv'}, {folder / 'table.json'}")


@experiment_app.command("run")
def experiment_run(
    config: Annotated[Path, typer.Argument(help="Experiment config (.yaml or .toml).")],
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder (overrides the config's 'data').")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder; default runs/<config name>.")] = None,
    redo: Annotated[bool, typer.Option(help="Run attempts again even if they finished earlier.")] = False,
    only: Annotated[Optional[list[str]], typer.Option(help="Run only this attempt (repeatable).")] = None,
) -> None:
    """Train and evaluate every attempt, skip finished ones, and print the comparison table."""
    experiment = load_experiment(config)
    data = data or (Path(experiment.data) if experiment.data else None)
    if data is None:
        raise DefectscopeError(f"config {config} names no 'data'; pass --data FOLDER")
    out = out or Path("runs") / experiment.name
    with console.status("starting", spinner="dots") as status:
        run_experiment(experiment, data, out, redo=redo, only=only, say=console.print,
                       status=(lambda text: None) if state["quiet"] else status.update)
    _show_table(out, None)


@experiment_app.command("report")
def experiment_report(
    folder: Annotated[Path, typer.Argument(help="Experiment output folder.")],
    metric: Annotated[Optional[str], typer.Option(help="Rank attempts by this metric instead of the config's.")] = None,
) -> None:
    """Re-render the comparison table from the attempts' saved results."""
    _show_table(folder, metric)


export_app = typer.Typer(no_args_is_help=True, help="Detection / segmentation training data from masks or a model's maps.")
app.add_typer(export_app, name="export")


@export_app.command("labels")
def export_labels(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MVTec or plain layout).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    format: Annotated[str, typer.Option("--format", help=f"One of: {', '.join(FORMATS)}.")] = "coco",
    from_model: Annotated[Optional[Path], typer.Option(help="Label the test images with this model's maps (pseudo-labels).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Map threshold for pseudo-labels (default: the model's).")] = None,
    min_area: Annotated[int, typer.Option(help="Smallest instance kept, in pixels.")] = 1,
    tolerance: Annotated[float, typer.Option(help="Polygon simplification, in pixels (0: none).")] = 0.5,
    rle: Annotated[bool, typer.Option(help="COCO: exact RLE masks instead of polygons.")] = False,
    val_fraction: Annotated[float, typer.Option(help="Share of images in the val subset (stratified).")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 0,
    link: Annotated[bool, typer.Option(help="Symlink images instead of copying them.")] = False,
    include_train_good: Annotated[bool, typer.Option(help="Also export the good training images (empty labels).")] = False,
) -> None:
    """Write YOLO, YOLO-seg, COCO or per-instance masks from the ground-truth masks or a model's maps."""
    dataset = load_dataset(data)
    options = ExportOptions(format, val_fraction=val_fraction, seed=seed, min_area=min_area, tolerance=tolerance, rle=rle, link=link)
    if format not in FORMATS:
        raise DefectscopeError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    if from_model:
        counts = export_pseudo_labels(dataset, load_model(from_model), from_model, out, options, threshold)
    else:
        counts = export_ground_truth(dataset, out, options, include_train_good)
    for subset, count in counts.items():
        console.print(f"{subset}: {count['images']} images, {count['instances']} instances")
    console.print(f"wrote {format} labels to {out}")


@export_app.command("check")
def export_check(out: Annotated[Path, typer.Argument(help="Folder written by 'export labels'.")]) -> None:
    """Parse an export back (COCO via pycocotools) and compare every label with its source mask."""
    report = check_export(out)
    iou = "" if report["min_iou"] is None else f"; mask IoU min {report['min_iou']:.4f}, mean {report['mean_iou']:.4f}"
    console.print(f"{report['format']}: {report['images']} images, {report['instances']} instances checked{iou}")
    for failure in report["failures"][:20]:
        console.print(f"[red]FAIL[/] {failure}", highlight=False)
    if not report["ok"]:
        raise typer.Exit(1)
    console.print("ok: every label matches its mask")


@app.command("info")
def info(model: Annotated[Path, typer.Argument(help="Model file.")]) -> None:
    """Print a model file's manifest (detector, config, backbone, threshold, training set)."""
    print(json.dumps(model_info(model), indent=2))


@app.command("demo")
def demo(
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder; default: generate the demo dataset.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo-output"),
    model: Annotated[str, typer.Option(help="Detector to fit.")] = "patchcore",
) -> None:
    """The main job end to end: (demo data,) fit, evaluate, heatmaps and a short report."""
    if data is None:
        data = make_demo_dataset(out / "data", size=256)
        console.print(f"generated demo dataset in {data}")
    model_path = out / f"{model}.dsmodel"
    dataset, detector, report = _fit(data, model, {}, model_path)
    console.print(f"fitted {model} on {report.train_images} images in {report.seconds:.1f} s -> {model_path}")
    with _progress("evaluating", len(dataset.test)) as advance:
        evaluation = run_evaluation(detector, dataset, progress=advance)
    written = write_report(evaluation, detector, out / "report")
    first_of_each = {s.defect: s.path for s in reversed(dataset.test)}  # one image per class, good included
    if detector.localizes:
        predict(model_path, [first_of_each[d] for d in sorted(first_of_each)], heatmaps=out / "heatmaps", as_json=False)
    table = metrics_markdown(evaluation.metrics)
    summary = (f"# defectscope demo\n\ndata: {data}\nmodel: {model_path} ({model}, fit {report.seconds:.1f} s "
               f"on {report.train_images} good images)\n\n{table}\nfiles: " + ", ".join(str(p) for p in written) + "\n")
    (out / "report.md").write_text(summary)
    console.print(table)
    console.print(f"report: {out / 'report.md'}")


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    try:
        app()
    except DefectscopeError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
