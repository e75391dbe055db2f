"""Finding the real peers (coturn's tools, Chromium, Firefox ESR); tests skip with a reason when
missing (and fail under CI, which must install them)."""

import os
import shutil

import pytest


def need(tool: str):
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing in CI: .ci/run must install it")
        pytest.skip(f"{tool} not installed (apt-get install coturn chromium firefox-esr)")
    return path
