"""The `defectscope` command: a thin Typer layer over the library, rendered with rich.

Exit codes: 0 done; 1 a check failed (`export check`); 2 bad input, nothing done (one line on
stderr, `--debug` shows the traceback); 3 `predict` or `score` could not score some images (verdict `error`),
or `fit-many` could not fit some products.
"""

from __future__ import annotations

import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from defectscope._version import __version__
from defectscope.errors import DataWarning, DefectscopeError
from defectscope.jobs import RayCluster
from defectscope.names import (DEFECT_LIKE, GOOD_ONLY_MODELS, KEPT_MB, KEPT_VERDICTS, LABEL_FORMATS, MASK_MODELS,
                               MAX_THREADS, MQTT_TOPIC, OPERATOR_TOKEN_ENV, RAY_WORKERS, TOKEN_ENV, version_of)
from defectscope.process import configure_process, freeze_loaded

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Industrial visual inspection: learn good parts, find defects.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets and make demo data.")
app.add_typer(data_app, name="data")
console = Console()
state = {"quiet": False, "debug": False, "data_warnings": [], "data_said": set()}
SOME_FAILED = 3  # predict, score, fit-many: some items could not be done


def say(text: str, markup: bool = False) -> None:
    """Print a line as is: no wrapping (paths stay whole for scripts), no highlighting, no markup unless asked."""
    _say_data_warnings()
    console.print(text, soft_wrap=True, highlight=False, markup=markup)


def _say_data_warnings() -> None:
    """What the datasets read so far skip (`DataWarning`), said before the command's next line: held until then,
    so a command that fails says its one error line alone."""
    held, state["data_warnings"] = state["data_warnings"], []
    for text in held:
        warn(text)


def _notes(jsonl: bool) -> Callable[[str], None]:
    """Where a command's own lines go: with --jsonl stdout holds verdicts only, so they go to stderr."""
    return (lambda text: _stderr_line("", "", text)) if jsonl else say


def _stderr_line(label: str, style: str, text: str) -> None:
    if label != "error: ":
        _say_data_warnings()
    Console(stderr=True).print(Text(label, style=style) + Text(text), soft_wrap=True, highlight=False)


def warn(text: str) -> None:
    _stderr_line("warning: ", "yellow", text)


@contextmanager
def doing(text: str) -> Iterator[None]:
    """A spinner on stderr saying what a command does before its first progress bar (loading PyTorch and a model
    takes seconds); it leaves no line behind, so an error stays the only line on stderr."""
    if state["quiet"]:
        yield
        return
    with Console(stderr=True).status(text, spinner="dots"):
        yield


def _version(value: bool) -> None:
    if value:
        say(f"defectscope {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    state["quiet"], state["debug"] = quiet, debug


@contextmanager
def _progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr, yielding an advance-by-n callback; off with --quiet and off a terminal (a log
    file would get an empty line per bar)."""
    stderr = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=stderr, disable=state["quiet"] or not stderr.is_terminal, transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing file or write into a folder defectscope did not create.")]
WeightsOption = Annotated[Path | None, typer.Option("--weights", help="Backbone weight file (torchvision backbones offline).")]
JsonlOption = Annotated[bool, typer.Option("--jsonl", help="Print each verdict as a JSON line on stdout.")]
WebhookOption = Annotated[str | None, typer.Option("--webhook", help="POST each verdict as JSON to this URL (retried).")]
MqttOption = Annotated[str | None, typer.Option("--mqtt", help="Publish each verdict to this MQTT broker, HOST or HOST:PORT (QoS 1).")]
MqttTopicOption = Annotated[str | None, typer.Option("--mqtt-topic", show_default=MQTT_TOPIC, help="The MQTT topic.")]


@data_app.command("summary")
def data_summary(
    path: Annotated[Path, typer.Argument(help="Dataset folder (MVTec layout or plain folders).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Classes, counts per split and class, image sizes, masks and imbalance of a dataset."""
    from defectscope.data.layout import load_dataset
    from defectscope.data.summary import summarize
    from defectscope.files import json_text
    with warnings.catch_warnings():  # the summary lists them itself
        warnings.simplefilter("ignore", DataWarning)
        summary = summarize(load_dataset(path))
    if as_json:
        print(json_text(summary, indent=2))
        return
    defects = summary["defect_classes"]
    say(f"[bold]{escape(summary['root'])}[/] ({summary['layout']} layout): {summary['total_images']} images, "
        f"{defects['count']} defect classes: {escape(', '.join(defects['names']) or 'none')}", markup=True)
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
    say(f"image formats: {formats}")
    say(f"train fraction {dist['train_fraction']:.1%}; test: {dist['test_good']} good, {dist['test_defective']} defective")
    say(f"masks: {summary['masks']} ({summary['defective_without_mask']} defective images without one, "
        f"{summary['empty_masks']} marking no pixel)")
    imbalance = summary["imbalance"]
    if imbalance["largest_to_smallest"]:
        say(f"imbalance: largest class '{imbalance['largest_class']}' / smallest '{imbalance['smallest_class']}' "
            f"= {imbalance['largest_to_smallest']:.2f}")
    for warning in summary["warnings"]:
        warn(warning)


@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Argument(help="New or empty folder to write the demo dataset to.")],
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write the seeded synthetic demo dataset (MVTec layout, with masks)."""
    from defectscope.data.synthetic import make_demo_dataset
    if not 16 <= size <= 4096:
        raise DefectscopeError(f"--size must be between 16 and 4096 pixels, got {size}")
    make_demo_dataset(out, size=size, seed=seed)
    say(f"demo dataset written to {out}")


@app.command("backbones")
def backbones() -> None:
    """List backbones: offline EfficientNet-Lite first, then torchvision models."""
    from defectscope.backbones import LITE_FILES, list_backbones
    for name in list_backbones():
        say(f"{name}  [dim]{'(weights ship with defectscope)' if name in LITE_FILES else '(torchvision weights)'}[/]", markup=True)


def parse_settings(text: str | None) -> dict:
    """`--settings` JSON: a mapping of config fields (checked later, with the model's other settings)."""
    from defectscope.files import loads_strict
    if text is None:
        return {}
    value = loads_strict(text, "--settings")
    if not isinstance(value, dict):
        raise DefectscopeError(f"--settings must be a JSON mapping of config fields, got {type(value).__name__}")
    return value


def gather_settings(config: Path | None, settings_json: str | None, assignments: list[str] | None) -> dict:
    """Config fields from `--config FILE`, then `--settings` JSON, then each `--set KEY=VALUE` (later ones win); a
    value is read as JSON when it is JSON (numbers, true, null, "text"), else as text. Checked by the config class."""
    from defectscope.config_files import read_mapping
    from defectscope.files import loads_strict

    settings = read_mapping(config, "config fields") if config is not None else {}
    settings.update(parse_settings(settings_json))
    for assignment in assignments or []:
        key, equals, text = assignment.partition("=")
        if not equals or not key.strip():
            raise DefectscopeError(f"--set takes KEY=VALUE, e.g. --set coreset_ratio=0.2; got {assignment!r}")
        try:
            settings[key.strip()] = loads_strict(text, f"--set {key}")
        except DefectscopeError:
            settings[key.strip()] = text
    return settings


RayOption = Annotated[str | None, typer.Option("--ray", help="Ray cluster address, or 'local' for a Ray instance on this "
                                                  "machine; without it everything runs in this process.")]
RayTokenOption = Annotated[Path | None, typer.Option("--ray-token-file", help="File holding the Ray cluster's token "
                                                      "(`ray get-auth-token` on the head node prints it).")]
RayEnvOption = Annotated[Path | None, typer.Option("--ray-env", help="YAML/TOML file of Ray runtime_env fields (pip, "
                                                    "py_modules, working_dir, env_vars) for nodes without the package.")]


def _mqtt_topic(mqtt: str | None, topic: str | None) -> str:
    """The topic of --mqtt-topic (default MQTT_TOPIC), which applies with --mqtt only."""
    if topic is not None and mqtt is None:
        raise DefectscopeError("--mqtt-topic applies with --mqtt only")
    return MQTT_TOPIC if topic is None else topic


def _ray_cluster(address: str | None, token_file: Path | None, env_file: Path | None) -> RayCluster | None:
    """The Ray cluster the options name, or None to run in this process."""
    if address is None:
        if token_file is not None or env_file is not None:
            raise DefectscopeError("--ray-token-file and --ray-env apply with --ray only")
        return None
    return RayCluster.from_files(address, token_file, env_file)


@app.command("fit")
def fit(
    data: Annotated[Path, typer.Argument(help="Dataset folder; its good training images are used.")],
    output: Annotated[Path, typer.Option("--output", "--out", "-o", help="Model file to write.")],
    model: Annotated[str, typer.Option(help=f"One of: {', '.join(GOOD_ONLY_MODELS)}; where masks exist also {', '.join(MASK_MODELS)}.")] = "patchcore",
    backbone: Annotated[str | None, typer.Option(show_default="the model's: efficientnet_lite0", help="Feature extractor (see `defectscope backbones`).")] = None,
    coreset: Annotated[float | None, typer.Option("--coreset-ratio", "--coreset", show_default="0.1", help="PatchCore: share of the patches kept in memory.")] = None,
    image_size: Annotated[int | None, typer.Option(show_default="chosen per product (PatchCore), else the model's", help="Short side of the frame before cropping (without --crop, the crop keeps the default frame's margin).")] = None,
    crop: Annotated[int | None, typer.Option(show_default="chosen per product (PatchCore), else the model's", help="Center crop side; 0 for no crop.")] = None,
    patch_stride: Annotated[int | None, typer.Option(show_default="chosen per product", help="PatchCore patch grid in pixels: 8, 16 or 32.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    false_alarm_rate: Annotated[float | None, typer.Option(show_default="0.01", help="Share of good parts the threshold may flag.")] = None,
    settings_json: Annotated[str | None, typer.Option("--settings", help='Any config fields as JSON, e.g. \'{"shard_images": 32}\'.')] = None,
    assignments: Annotated[list[str] | None, typer.Option("--set", help="One config field as KEY=VALUE, e.g. --set shard_images=32 (repeatable; wins over --config and --settings).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A YAML or TOML file of config fields (the names of the Python API).")] = None,
    weights: WeightsOption = None,
    download: Annotated[bool, typer.Option(help="Download torchvision weights if they are not found locally.")] = False,
    ray: Annotated[str | None, typer.Option("--ray", help="PatchCore: run the coreset shards as tasks on this Ray "
                                                          "cluster ('local': this machine).")] = None,
    ray_token_file: RayTokenOption = None,
    ray_env: RayEnvOption = None,
    force: ForceOption = False,
) -> None:
    """Fit a detector on the good training images (a mask model: on the labelled images) and write a model file.

    PatchCore chooses its frame (image size, crop, patch stride) from the good images unless one of them is given.
    """
    with doing("loading the library"):
        from defectscope.detectors import detector_config
        from defectscope.pipeline import fit_model
    settings: dict = {**({"backbone": backbone} if backbone is not None else {}), "seed": seed,
                      **gather_settings(config, settings_json, assignments)}
    if false_alarm_rate is not None:
        settings.update(threshold_method="false_alarm_rate", threshold_param=false_alarm_rate)
    if image_size is not None:
        settings["image_size"] = image_size
    if crop is not None:
        settings["crop"] = crop or None
    if patch_stride is not None:
        settings["patch_stride"] = patch_stride
    if coreset is not None:
        if model != "patchcore":
            raise DefectscopeError("--coreset-ratio applies to --model patchcore only")
        settings["coreset_ratio"] = coreset
    config = detector_config(model, settings)  # typed and checked here, before any data is read
    fitted = fit_model(data, model, config, output, weights=weights, download=download, force=force, bar=_progress,
                       ray_address=_ray_cluster(ray, ray_token_file, ray_env))
    calibration, report = fitted.detector.calibration, fitted.report
    if fitted.detector.kind != "good_only":
        say(f"trained {model} on {report.train_images} labelled images in {report.seconds:.1f} s -> {output}")
        warn("it learned the defects of the test split and their masks: judge it with `defectscope experiment run` "
             "(k-fold, every image scored by a model that did not learn it), not `evaluate` on this dataset")
        return
    say(f"fitted {model} on {report.train_images} images in {report.seconds:.1f} s -> {output}")
    choice = fitted.detector.train_summary.get("frame_choice")
    if choice and choice.get("chosen"):
        evidence = choice["candidates"][choice["chosen"]]
        say(f"frame {choice['chosen']} chosen from the good images alone: {evidence['recall_at_1pct']:.0%} of "
            f"{choice['synthetic_images']} synthetic defects above the held-out good scores' 1% tail ({len(choice['candidates'])} candidates; `info` lists them)"
            + (f"; {', '.join(choice['within_noise'])} did as well within the probe's noise (a near tie: "
               "pin a frame with --image-size/--crop/--settings to decide it)" if choice.get("within_noise") else ""))
    turns = (choice or {}).get("rotations")
    if turns:
        say(f"rotations {turns['chosen']}: with each fit image's turns, {turns['recall_at_1pct_with']:.0%} of the synthetic "
            f"defects caught against {turns['recall_at_1pct_without']:.0%} without (on only beyond two standard errors, "
            f"{2 * turns['standard_error']:.0%}; pin it with --set rotations=on/off)")
    view = fitted.detector.train_summary.get("global_view_choice")
    if view and "evidence" in view:
        say(f"global view {view['chosen']}: with it, the synthetic defects caught change by {-view['recall_cost']:+.0%} "
            f"and the held-out good images flagged (as they are or drifted) by {view['false_alarm_cost']:+.0%} (`info` has "
            "the evidence)")
    elif getattr(fitted.detector, "learns_turns", False) and fitted.detector.config.global_view == "off":
        say("global view off: learned with rotations (a part that lies at any turn has no layout of regions)")
    place = getattr(fitted.detector.config, "place_view", None)
    if place is not None:
        say(f"place view {place}: " + ("each patch also judged against how the good images vary at its place" if place == "on"
                                      else "the global view judges places" if fitted.detector.config.global_view == "on"
                                      else "the patch view alone"))
    say(f"from {report.calibration_images} cross-fitted good scores: {calibration.describe()}")
    if calibration.warning:
        warn(calibration.warning)


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Argument(help="Model file from `defectscope fit`, or a .dsdeploy file from `export model`.")],
    inputs: Annotated[list[Path], typer.Argument(help="Images or folders of images.")],
    heatmaps: Annotated[Path | None, typer.Option(help="Write a heatmap overlay PNG per image into this folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    weights: WeightsOption = None,
    force: ForceOption = False,
) -> None:
    """Score images: raw score, normalized score (1.0 = threshold) and verdict; exit 3 if any could not be scored."""
    from defectscope.files import json_text
    with doing(f"loading {model}"):
        from defectscope.pipeline import predict_images
        from defectscope.predictor import load_predictor
        detector = load_predictor(model, weights)
    skipped: list[Path] = []
    rows = predict_images(detector, inputs, heatmaps=heatmaps, force=force, bar=_progress, skipped=skipped)
    if as_json:
        for row in rows:
            print(json_text(row, indent=None))
    else:
        table = Table()
        for column in ("image", "score", "normalized", "verdict"):
            table.add_column(column, overflow="fold")
        for row in rows:
            colour = {"defective": "red", "error": "magenta"}.get(row["verdict"], "green")
            score = "" if row["score"] is None else f"{row['score']:.4g}"
            norm = "" if row["normalized"] is None else f"{row['normalized']:.3f}"
            verdict = Text(row["verdict"], style=colour) + Text(f": {row['error']}" if "error" in row else "")
            table.add_row(Text(row["path"]), score, norm, verdict)
        console.print(table)
        if detector.calibration is not None:
            say(detector.calibration.describe())
    if skipped:
        from defectscope.data.decode import skipped_note
        warn(skipped_note(skipped))
    _exit_if_failed(sum(row["verdict"] == "error" for row in rows), len(rows), "image(s) could not be scored (verdict 'error')")


def _exit_if_failed(failed: int, total: int, what: str) -> None:
    """Warn and exit SOME_FAILED when some items failed (the others were done)."""
    if failed:
        warn(f"{failed} of {total} {what}")
        raise typer.Exit(SOME_FAILED)


@app.command("evaluate")
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model file from `defectscope fit`, or a .dsdeploy file from `export model`.")],
    data: Annotated[Path, typer.Argument(help="Dataset folder with a test split.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write report.html/.md, predictions.csv, metrics.json/.md, curves, histogram and overlays into this folder.")] = None,
    weights: WeightsOption = None,
    force: ForceOption = False,
) -> None:
    """Metrics on the test split: image/pixel AUROC, AUPRO, F1-max, per defect type (it reads; `calibrate` sets thresholds)."""
    with doing(f"loading {model}"):
        from defectscope.data.layout import load_dataset
        from defectscope.pipeline import evaluate_model
        from defectscope.predictor import load_identified
        from defectscope.reports import metrics_markdown
        detector, digest, _ = load_identified(model, weights)  # the report names the file as it was evaluated
    evaluation, written = evaluate_model(detector, load_dataset(data), out, force=force, bar=_progress, model_file=model,
                                         model_sha256=digest)
    say(metrics_markdown(evaluation.metrics))
    for path in written:
        say(f"wrote {path}")


IN_PLACE = "Model file to write (may be MODEL itself: the model it replaces is kept as a version, see `versions`)."


@app.command("calibrate")
def calibrate(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    output: Annotated[Path, typer.Option("--output", "--out", "-o", help=IN_PLACE)],
    false_alarm_rate: Annotated[float | None, typer.Option(help="Threshold for this share of good parts flagged, from the model's cross-fitted good scores.")] = None,
    good: Annotated[list[Path] | None, typer.Option(help="Good images or folders (repeatable).")] = None,
    defective: Annotated[list[Path] | None, typer.Option(help="Defective images or folders (repeatable).")] = None,
    target_recall: Annotated[float | None, typer.Option(help="With labelled images: catch at least this share of defective ones.")] = None,
    f1: Annotated[bool, typer.Option("--f1", help="With labelled images: the threshold of the best F1.")] = False,
    margin: Annotated[float, typer.Option(help="With labelled images: move the threshold this share (0 to 1) of the way "
                                               "down from the weakest caught defect to the strongest good part below it.")] = 0.0,
    weights: WeightsOption = None,
    force: ForceOption = False,
) -> None:
    """Set a model's threshold for a stated false-alarm rate, or from a few labelled images, and say how sure it is."""
    from defectscope.pipeline import recalibrate
    calibration = recalibrate(model, output, false_alarm_rate=false_alarm_rate, good=good or (), defective=defective or (),
                              target_recall=target_recall, f1=f1, margin=margin, weights=weights, force=force,
                              bar=_progress)
    say(f"{calibration.describe()} -> {output}")
    if calibration.warning:
        warn(calibration.warning)


@app.command("update")
def update(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    good: Annotated[list[Path], typer.Option(help="Good images or folders to learn (repeatable), e.g. false alarms.")],
    output: Annotated[Path, typer.Option("--output", "--out", "-o", help=IN_PLACE)],
    check: Annotated[Path | None, typer.Option(help="Dataset whose labelled defective test images must stay caught (and may not be taught).")] = None,
    defective: Annotated[list[Path] | None, typer.Option(help="Images known to be defective: never taught, and must stay caught (repeatable).")] = None,
    accept_defect_like: Annotated[bool, typer.Option(help=f"Teach images scoring >= {DEFECT_LIKE:g}x the threshold too (they look defective).")] = False,
    accept_misses: Annotated[bool, typer.Option(help="Write the update even if a labelled defect the old model caught would pass.")] = False,
    weights: WeightsOption = None,
    force: ForceOption = False,
) -> None:
    """Teach a model more good images without a full refit (PatchCore), and restate its threshold."""
    from defectscope.pipeline import update_model
    details = update_model(model, good, output, defective=defective or (), check=check,
                           accept_defect_like=accept_defect_like, accept_misses=accept_misses, weights=weights,
                           force=force, bar=_progress)
    learned = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in details.items() if isinstance(v, int))
    say(f"learned {learned} -> {output}")
    if details["warning"]:
        warn(details["warning"])


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@app.command("serve")
def serve(
    models: Annotated[list[Path], typer.Argument(help="Model files or exported models (.dsdeploy), or folders: every .dsmodel and .dsdeploy in them.")],
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the service on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[str | None, typer.Option(envvar=TOKEN_ENV, help=f"The engineer's token (inspect, read, threshold, teach, reload); with a token /v1 and /metrics need 'Authorization: Bearer TOKEN' (or set {TOKEN_ENV}).")] = None,
    operator_token: Annotated[str | None, typer.Option(envvar=OPERATOR_TOKEN_ENV, help=f"The operator's token: inspect and read only (or set {OPERATOR_TOKEN_ENV}).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow binding beyond loopback without a token (anyone who reaches the port may write).")] = False,
    audit: Annotated[Path | None, typer.Option(show_default="defectscope-audit.sqlite beside the first model", help="Audit database (SQLite) of every verdict.")] = None,
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Keep no audit trail.")] = False,
    keep_images: Annotated[Path | None, typer.Option(help="Keep the images of --keep-verdicts here (VERDICT/SHA256.SUFFIX), for review beside the audit trail.")] = None,
    keep_verdicts: Annotated[str | None, typer.Option(show_default=KEPT_VERDICTS, help="Comma-separated verdicts whose images --keep-images keeps: good, defective, error, unknown.")] = None,
    keep_images_mb: Annotated[float | None, typer.Option(show_default=f"{KEPT_MB:g}", help="Most megabytes the kept images take; the oldest go first.")] = None,
    jsonl: JsonlOption = False,
    webhook: WebhookOption = None,
    mqtt: MqttOption = None,
    mqtt_topic: MqttTopicOption = None,
    labelled: Annotated[Path | None, typer.Option(help="Dataset folder whose test split feeds the threshold and review pages.")] = None,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to share a batch (0: off).")] = 5.0,
    max_batch: Annotated[int, typer.Option(help="Most images per model call (1: no batching).")] = 32,
    max_queue: Annotated[int, typer.Option(help="Images waiting per model before requests get 503.")] = 256,
    max_upload_mb: Annotated[float, typer.Option(help="Largest image file accepted.")] = 20.0,
    engine_threads: Annotated[int | None, typer.Option(show_default="the engine's choice", help="Threads of each exported model's engine.")] = None,
) -> None:
    """Serve models over HTTP: the inspection API, metrics, and the web page."""
    from defectscope.service.config import ServiceConfig

    mqtt_topic = _mqtt_topic(mqtt, mqtt_topic)
    if keep_images is None and (keep_verdicts is not None or keep_images_mb is not None):
        raise DefectscopeError("--keep-verdicts and --keep-images-mb apply with --keep-images only")
    if keep_images is not None:
        from defectscope.line.retention import kept_verdicts
        verdicts = kept_verdicts(KEPT_VERDICTS if keep_verdicts is None else keep_verdicts)  # before anything is written
    kept_cap = {} if keep_images_mb is None else {"keep_images_mb": keep_images_mb}
    config = ServiceConfig.from_dict({"batch_wait_ms": batch_wait_ms, "max_batch": max_batch, "max_queue": max_queue,
                                      "max_upload_mb": max_upload_mb, "engine_threads": engine_threads, **kept_cap,
                                      "token": token, "operator_token": operator_token})
    if not (token or operator_token) and not is_loopback(host):
        if not insecure:
            raise DefectscopeError(f"binding {host} without a token would let anyone who reaches this port re-threshold "
                                   f"and teach; set --token (and --operator-token), or pass --insecure")
        warn(f"binding {host} without a token (--insecure): anyone who reaches this port can inspect, re-threshold and teach")
    if audit is not None and no_audit:
        raise DefectscopeError("give --audit DB or --no-audit, not both")
    if keep_images is not None and no_audit:
        raise DefectscopeError("kept images are found again through the audit trail: drop --no-audit or --keep-images")
    from defectscope.service.listener import listening_socket, serve_on
    listener = listening_socket(host, port)  # a port that cannot be had is said before anything is loaded or written
    port = listener.getsockname()[1]
    from defectscope.line.dispatch import dispatcher
    dispatch = dispatcher(jsonl, webhook, mqtt, mqtt_topic, report=warn) if (jsonl or webhook or mqtt) else None
    try:  # a target that cannot be had is said before a model is loaded (which records its version)
        with doing(f"loading the models{f' and scoring the test split of {labelled} with each' if labelled else ''}"):
            from defectscope.line.audit import AuditLog
            from defectscope.service.app import create_app
            from defectscope.service.models import load_served
            freeze_loaded()  # before the models: one replaced later (reload, teach, promote) must remain collectable
            served = load_served(models, config, labelled)
    except BaseException:
        if dispatch:
            dispatch.close()
        raise
    first = next(iter(served.values())).path
    log = None if no_audit else AuditLog(audit or first.parent / "defectscope-audit.sqlite")  # bad options: none made
    keeper = None
    if keep_images is not None:
        from defectscope.line.retention import ImageKeeper
        keeper = ImageKeeper(keep_images, verdicts, config.keep_images_bytes)
    kept = f"; keeping {','.join(sorted(keeper.verdicts))} images in {keep_images}" if keeper else ""
    _notes(jsonl)(f"serving {', '.join(f'{name} ({model.engine})' for name, model in served.items())} on "
                  f"http://{host}:{port}/ (API docs at /docs){f'; audit trail: {log.path}' if log else ''}{kept}")
    serve_on(create_app(served, config, labelled, log, dispatch, keeper), listener)


audit_app = typer.Typer(no_args_is_help=True, help="The audit trail of verdicts (serve --audit, watch --audit).")
app.add_typer(audit_app, name="audit")


@audit_app.command("export")
def audit_export(
    database: Annotated[Path, typer.Argument(help="Audit database (SQLite) written by serve or watch.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")],
    since: Annotated[str | None, typer.Option(help="Only verdicts from this time on (ISO 8601, e.g. 2026-12-07 or 2026-12-07T06:00+01:00; UTC without a zone).")] = None,
    until: Annotated[str | None, typer.Option(help="Only verdicts before this time (ISO 8601).")] = None,
    force: ForceOption = False,
) -> None:
    """Every audited verdict, or those of a time range, into one Parquet file (time, model and sha256, threshold, image
    sha256, verdict, role)."""
    from defectscope.line.audit import export_parquet

    say(f"wrote {export_parquet(database, out, since=since, until=until, force=force)} verdicts to {out}")


@audit_app.command("drift")
def audit_drift(
    database: Annotated[Path, typer.Argument(help="Audit database (SQLite) written by serve or watch.")],
    model: Annotated[Path, typer.Argument(help="The model file (or .dsdeploy) that judged them.")],
    last: Annotated[int, typer.Option("--last", help="Recent verdicts of this model file to read.")] = 500,
    as_json: Annotated[bool, typer.Option("--json", help="Print what the check found as JSON (the service's answer).")] = False,
) -> None:
    """Whether the parts this model passed lately still score like its training goods; exit 1 when they score higher
    (its stated false-alarm rate no longer holds), 0 otherwise."""
    from defectscope.files import json_text
    from defectscope.line.drift import audited_drift

    found = audited_drift(database, model, last)
    if as_json:
        print(json_text(found.to_dict(), indent=2))
    else:
        say(found.message)
    if found.drifted:
        raise typer.Exit(1)


@audit_app.command("verify")
def audit_verify(
    database: Annotated[Path, typer.Argument(help="Audit database (SQLite) written by serve or watch.")],
    noted: Annotated[str | None, typer.Option(help="A last link noted from an earlier run: exit 1 unless a record "
                                                   "still has it (a trail cut short before it, or rewritten, has not).")] = None,
) -> None:
    """Whether every verdict is as it was written: each record's link recomputed from the one before and its fields;
    exit 1 at the first that was changed or follows a removed one (or without the --noted link), 0 when the chain
    holds."""
    from defectscope.line.audit import verify_chain

    found = verify_chain(database, noted=noted)
    older = f"; the first {found.unchained} were written before the chain began and cannot be checked" if found.unchained else ""
    if found.broken is not None:
        say(f"broken at verdict {found.broken}: it was changed, or a verdict before it removed, after it was written "
            f"(its link does not follow from the one before){older}")
        raise typer.Exit(1)
    end = (f"; the last link is {found.last_link}: note it, and a trail cut short (or rewritten from the start) will "
           "not hold it (--noted checks)" if found.last_link else "")
    if noted is not None and found.noted_at is None:
        say(f"{found.records} verdict(s), and none has the noted link {noted}: the trail was cut short before it, or "
            f"rewritten, since it was noted{older}")
        raise typer.Exit(1)
    held = f"; the noted link is verdict {found.noted_at}'s" if noted is not None else ""
    say(f"{found.records} verdict(s): the chain holds{held}{older}{end}")


@app.command("watch")
def watch(
    model: Annotated[Path, typer.Argument(help="Model file, or a .dsdeploy export.")],
    inbox: Annotated[Path, typer.Argument(help="The hot folder the camera writes into.")],
    good_dir: Annotated[Path, typer.Option(help="Where images judged good go.")],
    defective_dir: Annotated[Path, typer.Option(help="Where images judged defective go.")],
    error_dir: Annotated[Path, typer.Option(help="Where images that could not be scored go.")],
    audit: Annotated[Path | None, typer.Option(show_default="defectscope-audit.sqlite beside the hot folder", help="Audit database (SQLite): every verdict, and the journal that makes a restart safe.")] = None,
    jsonl: JsonlOption = False,
    webhook: WebhookOption = None,
    mqtt: MqttOption = None,
    mqtt_topic: MqttTopicOption = None,
    settle: Annotated[float, typer.Option(help="Seconds a file's size and time must stay unchanged before it is taken (a file renamed into the folder is taken at once).")] = 0.5,
    limit: Annotated[int | None, typer.Option(min=0, show_default="run until stopped", help="Stop after judging this many images (0: only finish what a stopped run left).")] = None,
) -> None:
    """Judge every image dropped into a hot folder: score it, move it to the folder of its verdict, audit and dispatch it,
    each exactly once across restarts. Stop with Ctrl-C or SIGTERM."""
    from defectscope.line.hotfolder import Folders, HotFolder, ModelIdentity, check_line

    mqtt_topic = _mqtt_topic(mqtt, mqtt_topic)
    folders = Folders(inbox, good_dir, defective_dir, error_dir)
    check_line(folders, settle)  # bad input writes nothing: no audit trail, no verdict folders
    with doing(f"loading {model}"):
        from defectscope.line.audit import AuditLog
        from defectscope.line.dispatch import DriftNotice, dispatcher
        from defectscope.predictor import load_identified, warm_up
        predictor, digest, _ = load_identified(model)  # verdicts are recorded under the file that judges them
        warm_up(predictor)
    note = _notes(jsonl)
    identity = ModelIdentity(model.name.rsplit(".", 1)[0], digest[:12], digest, model)
    dispatch = dispatcher(jsonl, webhook, mqtt, mqtt_topic, report=warn)
    log = drift = None
    try:
        log = AuditLog(audit or inbox.resolve().parent / "defectscope-audit.sqlite")
        drift = DriftNotice(mqtt, mqtt_topic, identity.message(), warn) if mqtt else None
        line = HotFolder(predictor, identity, folders, log, dispatch, settle=settle, say=note, on_drift=drift)
        judged = line.run(limit=limit)
        dispatch.close()
        missed = log.undelivered_count(line.journal)
    finally:
        dispatch.close()
        if drift:
            drift.close()
        if log:
            log.close()
    note(f"judged {judged} image(s)")
    if missed:
        warn(f"{missed} verdict message(s) did not reach every target; they are sent again at the next start")


experiment_app = typer.Typer(no_args_is_help=True, help="Run attempts from a config file and compare them in a table.")
app.add_typer(experiment_app, name="experiment")


@app.command("fit-many")
def fit_many_command(
    plan: Annotated[Path, typer.Argument(help="Plan file (YAML/TOML): products with data folder, model, settings, output.")],
    ray: RayOption = None,
    ray_token_file: RayTokenOption = None,
    ray_env: RayEnvOption = None,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a failed fit before it is reported.")] = 2,
    threads: Annotated[int | None, typer.Option(min=1, max=MAX_THREADS, show_default="this process's threads",
                                                help="Threads of each fit (on Ray: the CPUs each task holds).")] = None,
) -> None:
    """Fit one model per product of a plan; products whose model file is up to date are skipped; exit 3 if any failed."""
    from defectscope.scale.fit_many import fit_many
    rows = fit_many(plan, _ray_cluster(ray, ray_token_file, ray_env), retries, threads, bar=_progress)
    table = Table()
    for column in ("product", "model", "status", "seconds", "model file"):
        table.add_column(column, overflow="fold")
    for row in rows:
        status = Text(row["status"], style="red" if row["status"] == "failed" else "green")
        if "error" in row:
            status += Text(f": {row['error']}")
        table.add_row(row["name"], row["model"], status, f"{row.get('seconds', 0):.1f}", row["out"])
    console.print(table)
    _exit_if_failed(sum(row["status"] == "failed" for row in rows), len(rows), ("product(s) failed (an input error at once, any "
                    f"other failure after {retries} retries)"))


@app.command("score")
def score(
    model: Annotated[Path, typer.Argument(help="Model file, or a .dsdeploy file from `export model`.")],
    inputs: Annotated[list[Path], typer.Argument(help="Images, folders, or .txt files listing one image per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet dataset folder (new, or an interrupted run to resume).")],
    ray: RayOption = None,
    ray_token_file: RayTokenOption = None,
    ray_env: RayEnvOption = None,
    workers: Annotated[int | None, typer.Option(min=1, show_default=str(RAY_WORKERS), help="Ray actors, each holding the model once.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, max=MAX_THREADS, show_default="this process's threads",
                                                help="CPUs per Ray actor.")] = None,
    force: ForceOption = False,
) -> None:
    """Score many images into Parquet (path, sha256, score, normalized, verdict, error); an interrupted run resumes."""
    from defectscope.scale.scoring import score_to_parquet
    summary = score_to_parquet(model, inputs, out, _ray_cluster(ray, ray_token_file, ray_env), workers, force,
                               threads=threads, bar=_progress)
    say(f"{summary['images']} images in {summary['chunks']} part file(s) under {out}: {summary['scored_now']} scored now, "
        f"{summary['resumed_chunks']} part(s) kept from an earlier run")
    if summary["skipped"]:
        from defectscope.data.decode import skipped_note
        warn(skipped_note(summary["skipped"]))
    _exit_if_failed(summary["failed"], summary["images"], "images could not be scored (verdict 'error', reason in "
                    "the 'error' column)")


def _show_table(folder: Path, metric: str | None) -> None:
    """Write table.md / table.csv / table.json in the folder and print the table."""
    from defectscope.experiments.table import markdown, write_table
    table, paths = write_table(folder, metric)
    say(markdown(table))  # plain Markdown: readable at any width, pastes as is
    say("tables: " + ", ".join(str(p) for p in paths))


@experiment_app.command("run")
def experiment_run(
    config: Annotated[Path, typer.Argument(help="Experiment config (.yaml or .toml).")],
    data: Annotated[Path | None, typer.Option(help="Dataset folder (overrides the config's 'data').")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder; default runs/<config name>.")] = None,
    redo: Annotated[bool, typer.Option(help="Run attempts again even if they finished earlier.")] = False,
    only: Annotated[list[str] | None, typer.Option(help="Run only this attempt (repeatable).")] = None,
    force: ForceOption = False,
) -> None:
    """Train and evaluate every attempt, skip finished ones, and print the comparison table."""
    from defectscope.experiments.config import load_experiment
    from defectscope.experiments.runner import run_experiment
    experiment = load_experiment(config)
    data = data or (Path(experiment.data) if experiment.data else None)
    if data is None:
        raise DefectscopeError(f"config {config} names no 'data'; pass --data FOLDER")
    out = out or Path("runs") / experiment.name
    with console.status("starting", spinner="dots") as status:
        run_experiment(experiment, data, out, redo=redo, only=only, say=say, force=force,
                       status=(lambda text: None) if state["quiet"] else status.update)
    _show_table(out, None)


@experiment_app.command("report")
def experiment_report(
    folder: Annotated[Path, typer.Argument(help="Experiment output folder.")],
    metric: Annotated[str | None, typer.Option(help="Rank attempts by this metric instead of the config's.")] = None,
) -> None:
    """Re-render the comparison table from the attempts' saved results."""
    from defectscope.experiments.config import METRICS
    if metric is not None and metric not in METRICS:  # as a config's metric is checked: a typo ranks nothing
        raise DefectscopeError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    _show_table(folder, metric)


export_app = typer.Typer(no_args_is_help=True, help="Training data from masks or a model's maps (labels); a model for the torch-free runtime (model).")
app.add_typer(export_app, name="export")


@export_app.command("labels")
def export_labels(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MVTec or plain layout).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (new, empty, or an earlier export).")],
    format: Annotated[str, typer.Option("--format", help=f"One of: {', '.join(LABEL_FORMATS)}.")] = "coco",
    from_model: Annotated[Path | None, typer.Option(help="Label the test images with this model's instances (a detector: typed) or maps (pseudo-labels).")] = None,
    threshold: Annotated[float | None, typer.Option(show_default="the model's region threshold", help="Map threshold (a detector: least confidence) for pseudo-labels.")] = None,
    min_area: Annotated[int, typer.Option(help="Smallest instance kept, in pixels.")] = 1,
    tolerance: Annotated[float, typer.Option(help="Polygon simplification, in pixels (0: none).")] = 0.5,
    rle: Annotated[bool, typer.Option(help="COCO: exact RLE masks instead of polygons.")] = False,
    val_fraction: Annotated[float, typer.Option(help="Share of images in the val subset (stratified; 0: no val subset).")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 0,
    link: Annotated[bool, typer.Option(help="Symlink images instead of copying them.")] = False,
    include_train_good: Annotated[bool, typer.Option(help="Also export the good training images (empty labels).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty folder defectscope did not create (its contents are deleted).")] = False,
) -> None:
    """Write YOLO, YOLO-seg, COCO or per-instance masks from the ground-truth masks or a model's maps."""
    from defectscope.artifacts import load_model
    from defectscope.data.layout import load_dataset
    from defectscope.export.labels import ExportOptions, export_ground_truth
    from defectscope.export.pseudo import export_pseudo_labels
    if threshold is not None and not from_model:
        raise DefectscopeError("--threshold sets the level of a model's maps: it applies with --from-model only")
    if include_train_good and from_model:
        raise DefectscopeError("--include-train-good adds the good training images to labels from masks; with "
                               "--from-model only the test images are labelled")
    options = ExportOptions(format, val_fraction=val_fraction, seed=seed, min_area=min_area, tolerance=tolerance, rle=rle, link=link)
    dataset = load_dataset(data)
    if from_model:
        counts = export_pseudo_labels(dataset, load_model(from_model), from_model, out, options, threshold, force=force)
    else:
        counts = export_ground_truth(dataset, out, options, include_train_good, force=force)
    for subset, count in counts.items():
        say(f"{subset}: {count['images']} images, {count['instances']} instances")
    say(f"wrote {format} labels to {out}")


@export_app.command("model")
def export_model_command(
    model: Annotated[Path, typer.Argument(help="Model file from `defectscope fit`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Deployment file to write (.dsdeploy); the graph goes beside it.")],
    file_format: Annotated[str, typer.Option("--format", help="onnx (onnxruntime) or openvino (OpenVINO IR).")] = "onnx",
    force: ForceOption = False,
) -> None:
    """Export a model for the torch-free runtime, checked against the PyTorch model before anything is written."""
    from defectscope.deployment import export_model
    written = export_model(model, out, file_format, force=force)
    say(f"wrote {', '.join(str(path) for path in written)}; run it with: python -m defectscope.runtime {written[0]} IMAGES...")


@export_app.command("check")
def export_check(out: Annotated[Path, typer.Argument(help="Folder written by 'export labels'.")]) -> None:
    """Parse an export back (COCO via pycocotools), compare every label with its source mask, and look for leaks."""
    from defectscope.export.check import check_export
    report = check_export(out)
    iou = "" if report["min_iou"] is None else f"; mask IoU min {report['min_iou']:.4f}, mean {report['mean_iou']:.4f}"
    say(f"{report['format']}: {report['images']} images, {report['instances']} instances checked{iou}")
    for failure in report["failures"][:20]:
        _stderr_line("FAIL ", "red", failure)
    if not report["ok"]:
        raise typer.Exit(1)
    say("ok: every label matches its mask")


@app.command("info")
def info(model: Annotated[Path, typer.Argument(help="Model file, or deployment file (.dsdeploy).")]) -> None:
    """Print a model file's manifest (detector, config, backbone, threshold, training set), or a deployment file's
    (the same, with its graph files, engine and parity; refused when a graph file beside it is missing or altered)."""
    from defectscope.files import json_text
    from defectscope.runtime import checked_manifest
    print(json_text(checked_manifest(model), indent=2))


@app.command("versions")
def versions(
    model: Annotated[Path, typer.Argument(help="Model file (.dsmodel) whose versions are kept beside it.")],
    keep: Annotated[int | None, typer.Option("--keep", help="Remove the files of all but the N versions active most "
                                             "recently (the active one always kept); their entries stay, marked "
                                             "pruned.")] = None,
) -> None:
    """List a model file's versions (newest last): version, parent, what made it; the active one is marked, a pruned
    one says so. With --keep, prune first."""
    from defectscope.files import file_sha256
    from defectscope.versions import VersionStore
    store, name = VersionStore.of(model)
    if keep is not None:
        pruned = store.prune(name, keep)
        say(f"{name}: pruned {len(pruned)} version file(s){': ' + ', '.join(pruned) if pruned else ''}")
    history = store.history(name)
    if not history["versions"]:
        say(f"no versions of {name} kept yet: a version is kept when the file is served, when the service changes it "
            "(a threshold, taught images), when calibrate or update write over it, and by promote and rollback")
        return
    holds = version_of(file_sha256(model))
    for entry in history["versions"]:
        mark = "*" if entry["version"] == history["active"] == holds else " "
        pruned = f"  (file pruned {entry['pruned']})" if "pruned" in entry else ""
        print(f"{mark} {entry['version']}  parent {entry['parent'] or '-':<26} {entry['action']:<10} {entry['time']}{pruned}")
    if holds != history["active"]:
        say(f"{model} holds {holds}, not the active version {history['active']}: the file was replaced since, by "
            "something other than defectscope; serving, promote or rollback record it")


@app.command("promote")
def promote(
    model: Annotated[Path, typer.Argument(help="The served model file (.dsmodel).")],
    version: Annotated[str, typer.Argument(help="The version to make active (see `defectscope versions`).")],
) -> None:
    """Make a kept version the active one: its bytes replace the model file atomically (a running service: POST
    /v1/models/NAME/promote, or reload after this)."""
    from defectscope.versions import VersionStore
    store, name = VersionStore.of(model)
    store.promote_file(name, version)  # the file as it is now is kept first, so nothing is lost by promoting
    say(f"{name}: version {version} is active -> {model}")


@app.command("rollback")
def rollback(model: Annotated[Path, typer.Argument(help="The served model file (.dsmodel).")]) -> None:
    """Make the version that was active before the current one active again."""
    from defectscope.versions import VersionStore
    store, name = VersionStore.of(model)
    say(f"{name}: rolled back to version {store.rollback_file(name)} -> {model}")


@app.command("demo")
def demo(
    data: Annotated[Path | None, typer.Option(help="Dataset folder; default: generate the demo dataset.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-output"),
    model: Annotated[str, typer.Option(help=f"Detector to fit: {', '.join(GOOD_ONLY_MODELS)}.")] = "patchcore",
    force: ForceOption = False,
) -> None:
    """The main job end to end: (demo data,) fit, evaluate, heatmaps and a short report."""
    from defectscope.pipeline import run_demo
    from defectscope.reports import metrics_markdown
    result = run_demo(out, data, model, force=force, bar=_progress, say=say)
    say(metrics_markdown(result.evaluation.metrics))
    calibration = result.fitted.detector.calibration
    if calibration is not None and calibration.warning:
        warn(calibration.warning)
    say(f"report: {result.report}")


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM ends the command like Ctrl-C: pending atomic writes remove their temporary files."""
    raise SystemExit(128 + signum)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """What a dataset skips or never reads (`DataWarning`): a `warning:` line before the command's next line (or at its
    end); other warnings as Python shows them."""
    if issubclass(category, DataWarning):
        if str(message) not in state["data_said"]:  # once a command: a dataset read twice, a frame search's fits
            state["data_said"].add(str(message))
            state["data_warnings"].append(str(message))
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback (unless --debug)."""
    configure_process()  # before any command loads torch
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", DataWarning)  # Python's own once-per-place forgets after any catch_warnings
    state["data_warnings"], state["data_said"] = [], set()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except SystemExit as exc:
        if exc.code not in (2, 130):  # done (or done in part): what its data skipped is said; a refusal says one line
            _say_data_warnings()
        raise
    except (DefectscopeError, OSError) as exc:
        state["data_warnings"].clear()
        if state["debug"]:
            raise
        message = str(exc) if isinstance(exc, DefectscopeError) else f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
        _stderr_line("error: ", "red", " ".join(message.split()))
        sys.exit(2)
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "can't allocate memory" not in str(exc):  # PyTorch's CPU allocator
            raise
        state["data_warnings"].clear()
        if state["debug"]:
            raise
        wanted = re.search(r"allocate (\d+) bytes", str(exc))
        size = f" (one more block of {int(wanted[1]) / 2**30:.1f} GiB)" if wanted else ""
        _stderr_line("error: ", "red", f"out of memory{size}: this machine cannot hold what the command asked for; a "
                     "smaller frame (--image-size), batch or image count needs less")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
