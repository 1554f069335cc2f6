"""The service's OpenAPI document matches what it answers (schemathesis, a bounded number of examples)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from defectscope.line.audit import AuditLog
from defectscope.service.app import create_app
from defectscope.service.config import ServiceConfig
from defectscope.service.models import load_served


@pytest.fixture(scope="module")
def served_app(demo_root: Path, served_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("schema-models")  # a copy: the threshold and teach calls write model files
    shutil.copy(served_folder / "part.dsmodel", folder)
    audit = AuditLog(folder / "audit.sqlite")  # every inspect call is audited; /v1/audit pages through the records
    return create_app(load_served([folder], labelled=demo_root), ServiceConfig(), demo_root, audit)


def test_every_answer_matches_the_schema(served_app) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", served_app)
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        # Any bytes are schema-valid "binary" files, but the service sniffs them and refuses non-images (415):
        # for uploads, "valid by the schema" does not imply "accepted", so that one check is left out there. Teaching
        # likewise refuses (400) ids of labelled defects and images that score like defects: a rule of the data.
        excluded = [positive_data_acceptance] if operation.label.endswith(("/inspect", "/teach")) else None

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            if case.path_parameters and "name" in case.path_parameters:
                case.path_parameters["name"] = "part"  # the served model: its answers, not only 404s, are checked
            case.call_and_validate(excluded_checks=excluded)  # noqa: B023 - check() runs within this iteration

        check()
        checked.append(operation.label)
    assert len(checked) == 19, checked  # health, metrics and the seventeen /v1 operations
