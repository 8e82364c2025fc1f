"""Keep the suite's disk use small: a real-model test writes hundreds of MB of checkpoints.

``tmp_path`` folders of passed tests are removed right after each test (pyproject's
``tmp_path_retention_policy = "failed"``); the folders a module's fixtures made with
``tmp_path_factory`` are removed when the module ends, unless one of its tests failed."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="module", autouse=True)
def _remove_module_folders(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for folder in set(base.iterdir()) - before:
            shutil.rmtree(folder, ignore_errors=True)
