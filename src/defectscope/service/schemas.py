"""Pydantic models of every request and response body (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, get_type_hints

from pydantic import BaseModel, Field, create_model

from defectscope.line.audit import Verdict
from defectscope.names import SAFE_NAME

MODEL_NAME = Field(pattern=SAFE_NAME.pattern, description="name of the new model: letters, digits, '.', '_', '-'")


class Problem(BaseModel):
    """Every error answer: one sentence saying what was wrong."""

    detail: str


class Health(BaseModel):
    status: str
    models: int
    version: str


class ModelSummary(BaseModel):
    name: str
    detector: str
    sha256: str
    version: str = Field(description="the first 12 hex digits of the file's sha256")
    engine: str = Field(description="what runs it: torch (model file), onnxruntime or openvino (exported model)")
    threshold: float | None
    localizes: bool
    labelled_images: int


class ModelList(BaseModel):
    models: list[ModelSummary]


class Region(BaseModel):
    """A connected region of the map at or above the model's region threshold, in original image pixels."""

    box: list[int] = Field(description="x, y, width, height")
    polygons: list[list[float]] = Field(description="outer outlines as flat x1, y1, x2, y2, ... lists")
    area: int
    score: float = Field(description="peak map value / region threshold")


class Instance(BaseModel):
    """A defect instance found by a model that tells instances apart, in original image pixels."""

    type: str
    confidence: float
    box: list[float] = Field(description="x0, y0, x1, y1 (pixel edges)")
    area: int
    mask: dict[str, Any] = Field(description="COCO uncompressed RLE: size [height, width] and column-major counts")


class ImageResult(BaseModel):
    index: int = Field(description="position of the file in the request (names may repeat)")
    name: str
    width: int | None = None
    height: int | None = None
    score: float | None = Field(description="raw anomaly score; null when the image could not be scored")
    normalized: float | None = Field(description="score / threshold: 1.0 is the decision point")
    verdict: str = Field(description="good, defective, error, or unknown (no threshold)")
    error: str | None = None
    heatmap_png: str | None = Field(None, description="base64 PNG of the anomaly map (JET, 0 .. 2 x threshold)")
    regions: list[Region] | None = None
    detections: list[Instance] | None = Field(None, description="typed instances, from models that find them")
    audit_id: int | None = Field(None, description="the verdict's record in the audit trail (when the service keeps one)")


class InspectResponse(BaseModel):
    model: str
    model_version: str = Field(description="the served file's version: the first 12 hex digits of its sha256")
    model_sha256: str
    threshold: float | None
    results: list[ImageResult]


class DriftReport(BaseModel):
    """The drift check on the served version's recent verdicts (`line.drift.Drift`)."""

    parts: int = Field(description="recent verdicts of the served version read (good or defective)")
    passed: int = Field(description="of them scored below the threshold")
    share_above: float | None = Field(description="passed parts above the training goods' median score")
    expected_share: float = Field(description="the share expected without drift")
    shift_sd: float | None = Field(description="the passed parts' median less the training goods', in their sd")
    p_value: float | None = Field(description="one-sided: the chance of so many above the median without drift")
    drifted: bool = Field(description="true: they score higher than the training goods; the stated rate no longer holds")
    message: str


AuditRecord = create_model("AuditRecord", __doc__="One audited verdict (the fields of `line.audit.Verdict`).",
                           id=(int, ...), **{name: (kind, ...) for name, kind in get_type_hints(Verdict).items()})


class AuditPage(BaseModel):
    records: list[AuditRecord]
    limit: int
    offset: int
    kept: list[int] = Field([], description="ids of the records whose image is kept (GET /v1/audit/{id}/image)")


class Whoami(BaseModel):
    role: str = Field(description="engineer (inspect, read, threshold, teach, reload, promote, rollback) or operator "
                                  "(inspect, read)")


class ModelVersion(BaseModel):
    version: str = Field(description="the first 12 hex digits of the file's sha256")
    sha256: str
    parent: str | None = Field(description="the version it was made from ('NAME@version' when from another model)")
    action: str = Field(description="what made it: served, threshold, teach, reload, found (a file put in place by other "
                                    "means), or the command that wrote it over the model: fit, calibrate, update")
    time: str
    pruned: str | None = Field(None, description="when its file was removed (`defectscope versions --keep`); the "
                                                 "entry stays, the version can no longer be made active")


class Activation(BaseModel):
    version: str
    action: str = Field(description="served, threshold, teach, reload, promote, rollback, found, fit, calibrate or update")
    time: str


class VersionList(BaseModel):
    model: str
    active: str | None
    served: str = Field(description="the version this service judges with now: not the active one after a promote or "
                                    "rollback on disk (the command line) until POST .../reload")
    versions: list[ModelVersion]
    activations: list[Activation]


class PromoteRequest(BaseModel):
    version: str = Field(pattern=r"^[0-9a-f]{12}$", description="a version of this model (GET .../versions)")


class LabelledImage(BaseModel):
    id: int
    name: str
    defect: str
    label: int
    score: float


class LabelledScores(BaseModel):
    model: str
    threshold: float | None
    images: list[LabelledImage]


class ThresholdRequest(BaseModel):
    threshold: float = Field(gt=0, allow_inf_nan=False)
    name: str = MODEL_NAME
    overwrite: bool = Field(False, description="replace an existing model of that name")


class TeachRequest(BaseModel):
    images: list[int] = Field(min_length=1, description="ids of labelled images to learn as good")
    name: str = MODEL_NAME
    overwrite: bool = False
    accept_defect_like: bool = Field(False, description="also teach images scoring far above the threshold")


class ModelWritten(BaseModel):
    model: ModelSummary
    calibration: dict[str, Any]
    details: dict[str, Any] = {}
