"""`load_model`: the weights it builds are freed as soon as their last reference goes."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_first_weights_a_process_builds_need_no_garbage_collection_to_be_freed() -> None:
    # A fresh process: torch's first import of torch._dynamo happens at its first model build.
    code = (
        "import gc, weakref\n"
        "gc.disable()\n"
        "from serve_app.config import ModelSpec\n"
        "from serve_app.models.loading import load_model\n"
        "weights = weakref.ref(load_model(ModelSpec(id='a', seed=1), device='cpu'))\n"
        "print(weights() is None)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert child.stdout.strip() == "True"
