"""The REST API (/v1): models, inspection, labelled scores, threshold and teaching; every handler is thin."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import mimetypes
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParameter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from defectscope.artifacts import check_model_output, set_threshold
from defectscope.data.decode import read_image
from defectscope.errors import DefectscopeError, InputError, ModelChanged
from defectscope.export.pseudo import map_instances
from defectscope.clock import now
from defectscope.line.audit import MAX_PAGE, MAX_RECORD_ID, AuditLog, Verdict
from defectscope.line.dispatch import Dispatcher
from defectscope.line.drift import DEFAULT_PARTS, MAX_PARTS, recent_drift
from defectscope.line.outbox import OUTBOX, send_verdict
from defectscope.names import MODEL_SUFFIX, SAFE_NAME, as_texts
from defectscope.pipeline import update_model
from defectscope.process import release_memory
from defectscope.prediction import Prediction, place_detections, prediction_rows
from defectscope.regions import polygons
from defectscope.service.batching import QueueFull
from defectscope.service.models import ServedModel, serve_model
from defectscope.service.schemas import (
    AuditPage,
    AuditRecord,
    DriftReport,
    ImageResult,
    InspectResponse,
    LabelledScores,
    ModelList,
    ModelSummary,
    ModelWritten,
    Problem,
    PromoteRequest,
    Region,
    TeachRequest,
    ThresholdRequest,
    VersionList,
    Whoami,
)
from defectscope.service.uploads import decode, read_upload, sniff
from defectscope.thresholds import labelled_calibration
from defectscope.versions import (DamagedVersion, NoEarlierVersion, PrunedVersion, UnknownVersion, VersionStore,
                                  keeping_replaced, made_from)
from defectscope.viz import heat_colours, png_bytes

RELEASE_AFTER_S = 1.0  # after a replaced model's batcher closed: its last requests' handlers finish their answers
_releases: set[asyncio.Task] = set()  # running until each replaced model's memory is given back (asyncio keeps no
# reference to a task of its own)

ERRORS = {code: {"model": Problem} for code in (400, 401, 403, 404, 409, 413, 415, 503)}
router = APIRouter(prefix="/v1", responses=ERRORS)


def served(request: Request, name: str) -> ServedModel:
    model = request.app.state.models.get(name)
    if model is None:
        raise HTTPException(404, f"no model named {name!r}; GET /v1/models lists them")
    return model


def require_engineer(request: Request) -> None:
    """Writes (threshold, teach, reload) are the engineer's; an operator may inspect and read."""
    if request.state.role != "engineer":
        raise HTTPException(403, f"the {request.state.role} role may inspect and read; this needs the engineer's token")


def served_file(request: Request, name: str) -> ServedModel:
    """A served model that new models can be written from (a model file, not an export), by an engineer."""
    require_engineer(request)
    model = served(request, name)
    if not model.writable:
        raise HTTPException(400, f"model {name} is an exported model ({model.engine}); set thresholds and teach on its "
                                 "model file, then export it again")
    return model


@router.get("/whoami", response_model=Whoami)
def whoami(request: Request) -> Whoami:
    """The caller's role, from its token (the page hides what the role may not do)."""
    return Whoami(role=request.state.role)


@router.get("/audit", response_model=AuditPage)
def audit_records(request: Request, model: str | None = None, verdict: str | None = None,
                  since: Annotated[datetime | None, Query(description="ISO 8601, inclusive; UTC without a zone")] = None,
                  until: Annotated[datetime | None, Query(description="ISO 8601, exclusive; UTC without a zone")] = None,
                  limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
                  offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> AuditPage:
    """Audited verdicts, newest first, filtered by model, verdict and time range, a page at a time."""
    audit = request.app.state.audit
    if audit is None:
        raise HTTPException(404, "this service keeps no audit trail; start it without --no-audit")
    since, until = (None if time is None else time.isoformat() for time in (since, until))
    records = audit.query(model=model, verdict=verdict, since=since, until=until, limit=limit, offset=offset)
    keeper = request.app.state.keeper
    kept = [r["id"] for r in records if keeper is not None and keeper.find(r["image_sha256"], r["verdict"])]
    return AuditPage(records=[AuditRecord(**r) for r in records], limit=limit, offset=offset, kept=kept)


RecordId = Annotated[int, PathParameter(ge=1, le=MAX_RECORD_ID, description="an audit record's id")]


def _kept(request: Request, record_id: int) -> tuple[dict, Path, bytes]:
    """An audited verdict, its kept image's file and bytes (404 when there is no audit trail, no such record or no kept
    image with the audited sha256)."""
    audit, keeper = request.app.state.audit, request.app.state.keeper
    if audit is None:
        raise HTTPException(404, "this service keeps no audit trail; start it without --no-audit")
    try:
        record = audit.get(record_id)
    except InputError as exc:
        raise HTTPException(404, str(exc)) from exc
    kept = keeper.read(record["image_sha256"], record["verdict"]) if keeper is not None else None
    if kept is None:
        raise HTTPException(404, f"the image of audit record {record_id} is not kept (serve --keep-images DIR keeps "
                                 "images by verdict; a kept file removed or changed on disk is not served)")
    return record, *kept


@router.get("/audit/{record_id}/image", response_class=Response, responses={200: {"content": {"image/*": {}}}})
def audited_image(request: Request, record_id: RecordId) -> Response:
    """The image of an audited verdict, when the service kept it (`serve --keep-images`)."""
    _, kept, data = _kept(request, record_id)
    return Response(data, media_type=mimetypes.guess_type(kept.name)[0] or "application/octet-stream")


@router.get("/audit/{record_id}/heatmap", response_class=Response, responses={200: {"content": {"image/png": {}}}})
async def audited_heatmap(request: Request, record_id: RecordId) -> Response:
    """The heatmap behind an audited verdict, for a kept image: the image scored again by the very model file that
    judged it (the same sha256), which gives the same map; 409 when that version is no longer the one served."""
    record, kept, data = await run_in_threadpool(_kept, request, record_id)  # a database read: off the event loop
    if record["score"] is None:
        raise HTTPException(404, f"audit record {record_id} has no heatmap: its image could not be scored")
    model = served(request, record["model"])
    if model.sha256 != record["model_sha256"]:
        raise HTTPException(409, f"audit record {record_id} was judged by version {record['model_version']} of model "
                                 f"{record['model']}; version {model.version} is served now, and its map would not be "
                                 "the one behind this verdict")
    return await _heatmap_png(model, await run_in_threadpool(decode, data, kept.name))


async def _heatmap_png(model: ServedModel, image: np.ndarray) -> Response:
    """One image's heatmap on its own pixels, coloured from 0 to twice the threshold (as the page's legend says)."""
    if not model.detector.localizes:
        raise HTTPException(400, f"model {model.name} scores whole images and makes no maps")
    prediction = await model.batcher.predict([image])
    heat = original_map(model, prediction.maps[0], image)
    threshold = prediction.threshold or float(heat.max())
    return Response(png_bytes(heat_colours(heat, 0.0, 2 * threshold)), media_type="image/png")


@router.get("/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    return ModelList(models=[ModelSummary(**m.summary()) for m in request.app.state.models.values()])


@router.get("/models/{name}")
def manifest(request: Request, name: str) -> dict:
    """The model file's manifest: detector, config, frame, backbone, calibration, training set (taught images by
    file name only: server paths stay on the server)."""
    return public_manifest(served(request, name).manifest)


def public_manifest(manifest: dict) -> dict:
    """A manifest without server file-system paths (taught images reduced to their file names), as JSON text takes it
    (`as_texts`: a Latin-1 file name's bytes spelled \\xNN)."""
    summary = dict(manifest.get("train_summary") or {})
    if isinstance(summary.get("taught"), list):
        summary["taught"] = [{**entry, "taught_images": [Path(p).name for p in entry.get("taught_images", [])]}
                             if isinstance(entry, dict) else entry for entry in summary["taught"]]
    return as_texts({**manifest, "train_summary": summary})


@router.post("/models/{name}/inspect", response_model=InspectResponse)
async def inspect(request: Request, name: str, files: Annotated[list[UploadFile], File(description="images", min_length=1)],
                  heatmap: Annotated[bool, Query(description="add each map as a PNG")] = False,
                  regions: Annotated[bool, Query(description="add the defect regions of parts judged defective")] = False,
                  min_area: Annotated[int, Query(ge=1, le=1_000_000)] = 16) -> InspectResponse:
    """Score one or more images: score, normalized score, verdict; on request the heatmap and defect regions."""
    model, config = served(request, name), request.app.state.config
    if len(files) > config.max_files:
        raise HTTPException(413, f"{len(files)} files in one request; the limit is {config.max_files}")
    if (heatmap or regions) and not model.detector.localizes:
        raise HTTPException(400, f"model {name} scores whole images and makes no maps")
    uploads, names, total, pixels = [], [], 0, 0
    role = request.state.role
    for upload in files:
        data = await read_upload(upload, config.max_upload_bytes)
        total += len(data)
        if total > config.max_request_bytes:
            raise HTTPException(413, f"the request's files exceed {config.max_request_bytes:,} bytes together")
        label = Path(upload.filename or f"image{len(names)}").name
        pixels += sniff(data, label)
        if pixels > config.max_request_pixels:
            raise HTTPException(413, f"the request's images exceed {config.max_request_pixels:,} pixels together")
        uploads.append(data)
        names.append(label)
    if pixels > model.batcher.max_queue_pixels:
        raise HTTPException(413, f"the request's images hold {pixels:,} pixels, more than this model ever queues "
                                 f"({model.batcher.max_queue_pixels:,})")
    digests = [hashlib.sha256(data).hexdigest() for data in uploads]
    try:
        with model.batcher.admit(len(uploads), pixels):  # room is held before decoding: a busy model answers 503 at once
            images = [await run_in_threadpool(decode, data, label) for data, label in zip(uploads, names)]
            if request.app.state.keeper is None:
                del uploads  # the bytes are needed no longer (kept images are written after the verdict)
            prediction = await model.batcher.predict(images, admitted=True)
    except QueueFull as exc:
        raise HTTPException(503, f"model {name} is busy ({exc}); retry shortly", headers={"Retry-After": "1"}) from exc
    threshold = prediction.threshold
    results = await run_in_threadpool(_results, model, names, images, prediction, heatmap, regions, min_area)
    for result in results:
        request.app.state.telemetry.images.labels(name, result.verdict).inc()
    keeper = request.app.state.keeper
    if keeper is not None:  # before the audit: a request that fails here is neither answered nor audited
        await run_in_threadpool(lambda: [keeper.keep(data, digest, result.verdict, result.name)
                                         for data, digest, result in zip(uploads, digests, results)])
    await _audit(request, model, results, digests, role)
    return InspectResponse(model=name, model_version=model.version, model_sha256=model.sha256, threshold=threshold,
                           results=results)


async def _audit(request: Request, model: ServedModel, results: list[ImageResult], digests: list[str], role: str) -> None:
    """Record every verdict of a request in the audit trail (one durable transaction) and dispatch each."""
    audit, dispatch = request.app.state.audit, request.app.state.dispatch
    if audit is None and dispatch is None:
        return
    calibration = model.detector.calibration
    verdicts = [Verdict(time=now(), model=model.name, model_version=model.version, model_sha256=model.sha256,
                        threshold=calibration.threshold if calibration else None,
                        stated_rate=calibration.false_alarm_rate if calibration else None, image_sha256=digest,
                        image_name=r.name, width=r.width, height=r.height, source="upload", score=r.score,
                        normalized=r.normalized, verdict=r.verdict, regions=None if r.regions is None else len(r.regions),
                        role=role) for r, digest in zip(results, digests)]
    outbox = OUTBOX if dispatch is not None else None  # its messages journaled until every target has them
    ids = await run_in_threadpool(audit.record, verdicts, outbox=outbox) if audit is not None else [None] * len(verdicts)
    for result, record_id in zip(results, ids):
        result.audit_id = record_id
    if dispatch is not None:  # off the event loop: a message's acknowledgement may be written at once (JSON lines)
        await run_in_threadpool(_dispatch, audit, dispatch, [{"id": i, **asdict(v)} for i, v in zip(ids, verdicts)])


def _dispatch(audit: AuditLog | None, dispatch: Dispatcher, records: list[dict]) -> None:
    """Send each verdict, journaled when there is an audit trail (else there is no journal to send again from)."""
    for record in records:
        if audit is not None:
            send_verdict(audit, dispatch, record)
        else:
            dispatch.send(record)


def original_map(model: ServedModel, frame_map: np.ndarray, image: np.ndarray) -> np.ndarray:
    """A model-frame map placed on the original image's pixels."""
    return model.detector.preprocess.to_original(frame_map, *image.shape[:2])


def _results(model: ServedModel, names: list[str], images: list[np.ndarray], prediction: Prediction, heatmap: bool,
             regions: bool, min_area: int) -> list[ImageResult]:
    """One result per image from the shared rows (`prediction_rows`: an image that failed is 'error', never 'good'),
    detections on the original pixels; on request the heatmap and, on parts judged defective, the regions at or
    above the map's region threshold."""
    if prediction.detections is not None:
        prediction = replace(prediction, detections=[
            place_detections(found, image.shape[:2], model.detector.preprocess, "original")
            for found, image in zip(prediction.detections, images)])
    results, level = [], model.detector.calibration.region_threshold if regions and prediction.threshold else None
    for i, (row, image) in enumerate(zip(prediction_rows(names, prediction), images)):
        result = ImageResult(index=i, name=names[i], height=image.shape[0], width=image.shape[1], score=row["score"],
                             normalized=row["normalized"], verdict=row["verdict"], error=row.get("error"),
                             detections=row.get("detections"))
        mapped = row["score"] is not None and prediction.maps is not None
        outlined = mapped and level is not None and row["verdict"] == "defective"  # a part judged good has no regions
        heat = original_map(model, prediction.maps[i], image) if mapped and (heatmap or outlined) else None
        if heat is not None and heatmap:
            high = 2 * prediction.threshold if prediction.threshold else float(heat.max())
            result.heatmap_png = base64.b64encode(png_bytes(heat_colours(heat, 0.0, high))).decode()
        if mapped and level is not None:
            found = map_instances(heat, level, min_area, names[i]) if outlined else []
            result.regions = [Region(box=list(inst.box), polygons=polygons(inst.mask), area=inst.area, score=inst.score)
                              for inst in found]
        results.append(result)
    return results


def labelled_of(model: ServedModel) -> list[dict]:
    if model.labelled is None:
        raise HTTPException(404, f"model {model.name} has no labelled scores; start the service with --labelled DATASET")
    return model.labelled.records


@router.get("/models/{name}/labelled", response_model=LabelledScores)
def labelled_scores(request: Request, name: str) -> LabelledScores:
    """Scores of the labelled test images, for the threshold and review pages."""
    model = served(request, name)
    labelled_of(model)
    threshold = model.detector.calibration.threshold if model.detector.calibration else None
    return LabelledScores(model=name, threshold=threshold, images=model.labelled.public())


def _record(model: ServedModel, image_id: int) -> dict:
    records = labelled_of(model)
    if not 0 <= image_id < len(records):
        raise HTTPException(404, f"no labelled image {image_id}; ids run from 0 to {len(records) - 1}")
    return records[image_id]


@router.get("/models/{name}/labelled/{image_id}/image", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
async def labelled_image(request: Request, name: str, image_id: int) -> Response:
    record = _record(served(request, name), image_id)
    return Response(await run_in_threadpool(lambda: png_bytes(read_image(record["path"]))), media_type="image/png")


@router.get("/models/{name}/labelled/{image_id}/heatmap", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
async def labelled_heatmap(request: Request, name: str, image_id: int) -> Response:
    model = served(request, name)
    record = _record(model, image_id)
    return await _heatmap_png(model, await run_in_threadpool(read_image, record["path"]))


def _new_model_path(request: Request, model: ServedModel, name: str, overwrite: bool) -> Path:
    """Where a new model is written: beside the served one, by a checked name; existing files only with `overwrite`,
    and never the name of a model served from another file (an export, or a model file elsewhere): it would take that
    model's place here, and clash with its file when the service starts again."""
    if not SAFE_NAME.match(name):  # the request schema checks it too; this guard stays beside the file write
        raise HTTPException(400, f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    target = model.path.parent / f"{name}{MODEL_SUFFIX}"
    holder = request.app.state.models.get(name)
    if holder is not None and holder.path.resolve() != target.resolve():
        raise HTTPException(409, f"model {name} is served from another file ({holder.path.name}, {holder.engine}); "
                                 "choose another name")
    if target.exists() and not overwrite:
        raise HTTPException(409, f"a model named {name} exists; confirm to replace it")
    try:
        check_model_output(target, force=False)
    except DefectscopeError as exc:
        raise HTTPException(409, str(exc)) from exc
    return target


async def _loaded(request: Request, path: Path, name: str) -> ServedModel:
    """A model file loaded for serving (off the event loop), not yet served."""
    return await run_in_threadpool(serve_model, path, name, request.app.state.config, request.app.state.labelled)


async def _register(request: Request, path: Path, name: str, new: ServedModel | None = None) -> ServedModel:
    """Serve a newly written model file (`new`: already loaded), replacing a model of the same name."""
    models = request.app.state.models
    new = new or await _loaded(request, path, name)
    old, models[name] = models.get(name), new  # swapped on the event loop: no request sees a half-built model
    if old is not None:
        old.batcher.retire()  # requests already admitted finish on the old model; new ones reach the new
        task = asyncio.get_running_loop().create_task(_give_back(old.batcher.closed))
        _releases.add(task)
        task.add_done_callback(_releases.discard)
    return new


async def _give_back(closed: asyncio.Event) -> None:
    """Once a replaced model has answered its last request, collect it and give its heap back: the allocator kept it
    (the server's memory grew 0.87 -> 1.5 GB over 24 reloads of bottle's model; trimmed, 0.86)."""
    await closed.wait()
    await asyncio.sleep(RELEASE_AFTER_S)
    await run_in_threadpool(release_memory)


async def _written(request: Request, model: ServedModel, target: Path, name: str, action: str) -> ServedModel:
    """Record a model file just written from `model` as a version of `name` (its parent: the version it was made from)
    and serve it; the replaced file stays in the store, ready for a rollback."""
    parent = model.version if name == model.name else made_from(model.name, model.version)
    await run_in_threadpool(VersionStore.of(target)[0].adopt, name, action, parent)
    return await _register(request, target, name)


@router.post("/models/{name}/threshold", response_model=ModelWritten, status_code=201)
async def save_threshold(request: Request, name: str, body: ThresholdRequest) -> ModelWritten:
    """Write a copy of the model with this threshold (atomically) and serve it under the new name."""
    async with request.app.state.writing:
        return await _save_threshold(request, name, body)


async def _save_threshold(request: Request, name: str, body: ThresholdRequest) -> ModelWritten:
    model = served_file(request, name)
    records = labelled_of(model)
    target = _new_model_path(request, model, body.name, body.overwrite)
    scores = np.array([r["score"] for r in records])
    labels = np.array([r["label"] for r in records])
    calibration = labelled_calibration(scores[labels == 0], scores[labels == 1], body.threshold, "manual", body.threshold,
                                       model.detector.calibration)
    def write() -> None:  # from the served version only: its file may have changed on disk since it was loaded
        with keeping_replaced(target, "threshold", model.path, model.sha256):
            set_threshold(model.path, calibration, target, True)

    try:
        await run_in_threadpool(write)
    except ModelChanged as exc:
        raise HTTPException(409, f"{exc}; reload the model first") from exc
    new = await _written(request, model, target, body.name, "threshold")
    return ModelWritten(model=ModelSummary(**new.summary()), calibration=calibration.to_dict())


@router.post("/models/{name}/teach", response_model=ModelWritten, status_code=201)
async def teach(request: Request, name: str, body: TeachRequest) -> ModelWritten:
    """Learn labelled images as good without a refit (`defectscope update`), write and serve the new model."""
    async with request.app.state.writing:
        return await _teach(request, name, body)


async def _teach(request: Request, name: str, body: TeachRequest) -> ModelWritten:
    model = served_file(request, name)
    records = [_record(model, i) for i in dict.fromkeys(body.images)]
    defective = [i for i, record in zip(dict.fromkeys(body.images), records) if record["label"] == 1]
    if defective:
        raise HTTPException(400, f"images {defective} are labelled defective; a defect is never taught as good")
    known_defects = [Path(r["path"]) for r in labelled_of(model) if r["label"] == 1]
    target = _new_model_path(request, model, body.name, body.overwrite)
    try:
        details = await run_in_threadpool(lambda: update_model(model.path, [Path(r["path"]) for r in records], target,
                                                               defective=known_defects,
                                                               accept_defect_like=body.accept_defect_like, force=True,
                                                               action="teach", read_as=model.sha256))
    except ModelChanged as exc:
        raise HTTPException(409, f"{exc}; reload the model first") from exc
    except DefectscopeError as exc:
        raise HTTPException(400, str(exc)) from exc
    new = await _written(request, model, target, body.name, "teach")
    return ModelWritten(model=ModelSummary(**new.summary()), calibration=new.detector.calibration.to_dict(),
                        details={k: v for k, v in details.items() if k != "taught_images"})


@router.post("/models/{name}/reload", response_model=ModelSummary)
async def reload(request: Request, name: str) -> ModelSummary:
    """Load the served file again (it was replaced on disk, e.g. by `defectscope update -o` or `calibrate -o`) and
    serve it: requests already admitted finish on the old one. A replaced model file becomes a new version once it
    loaded; one that cannot be served is refused (400) and recorded nowhere."""
    require_engineer(request)
    async with request.app.state.writing:
        model = served(request, name)
        try:
            new = await _loaded(request, model.path, name)  # first: a file that cannot be served becomes no version
            if model.writable:
                await run_in_threadpool(model.versions.adopt, name, "reload")
        except DefectscopeError as exc:
            raise HTTPException(400, f"{model.path} cannot be served: {exc}; the served model is unchanged") from exc
        return ModelSummary(**(await _register(request, model.path, name, new)).summary())


def versioned(request: Request, name: str) -> ServedModel:
    """A served model file, whose versions are kept (exports are made from model files and have none)."""
    model = served(request, name)
    if not model.writable:
        raise HTTPException(400, f"model {name} is an exported model ({model.engine}); versions are kept for model files")
    return model


@router.get("/models/{name}/drift", response_model=DriftReport)
async def drift(request: Request, name: str,
                last: Annotated[int, Query(ge=1, le=MAX_PARTS, description="recent verdicts to read")] = DEFAULT_PARTS
                ) -> DriftReport:
    """Whether the parts the served version passed lately still score like its training goods (`line.drift`)."""
    model, audit = served(request, name), request.app.state.audit
    if audit is None:
        raise HTTPException(404, "this service keeps no audit trail; start it without --no-audit")
    found = await run_in_threadpool(recent_drift, audit, model.sha256, model.detector.calibration, last)
    return DriftReport(**found.to_dict())


@router.get("/models/{name}/versions", response_model=VersionList)
async def versions(request: Request, name: str) -> VersionList:
    """Every version of the model, the active one, the one served now, and each activation (the model card's
    history)."""
    model = versioned(request, name)
    return VersionList(model=name, served=model.version, **await run_in_threadpool(model.versions.history, name))


@router.post("/models/{name}/promote", response_model=ModelSummary, responses={410: {"model": Problem}})
async def promote(request: Request, name: str, body: PromoteRequest) -> ModelSummary:
    """Make a version active: its file replaces the served one atomically; admitted requests finish on the old."""
    require_engineer(request)
    return await _activated(request, name, lambda store: store.promote(name, body.version))


@router.post("/models/{name}/rollback", response_model=ModelSummary, responses={410: {"model": Problem}})
async def rollback(request: Request, name: str) -> ModelSummary:
    """Make the version active before the current one active again."""
    require_engineer(request)
    return await _activated(request, name, lambda store: store.rollback(name))


async def _activated(request: Request, name: str, change: Callable[[VersionStore], object]) -> ModelSummary:
    """Apply a promote or rollback to the store (the served file is replaced atomically), then serve the result (no
    other write between the two, so the answer names the version this request made active)."""
    async with request.app.state.writing:
        model = versioned(request, name)
        try:
            await run_in_threadpool(change, model.versions)
        except UnknownVersion as exc:
            raise HTTPException(404, str(exc)) from exc
        except NoEarlierVersion as exc:
            raise HTTPException(409, str(exc)) from exc
        except (PrunedVersion, DamagedVersion) as exc:  # gone: its bytes, as kept, are not there
            raise HTTPException(410, str(exc)) from exc
        return ModelSummary(**(await _register(request, model.path, name)).summary())
