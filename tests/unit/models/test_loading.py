"""`load_model`: the weights it builds are freed as soon as their last reference goes."""

from __future__ import annotations

from tests.support.processes import python_output


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
    assert python_output(code) == "True"
