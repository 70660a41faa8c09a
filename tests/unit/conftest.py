"""Unit tests are pure: they may import Ray's schemas but never start a Ray cluster."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _refuse_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*_args, **_kwargs):
        raise RuntimeError("unit tests must not start Ray; write an integration test instead")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module: generation there is then deterministic in its
    timing and does not compete with the test runner for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
