"""Unit tests are pure: they may import Ray's schemas but never start a Ray cluster."""

import pytest


@pytest.fixture(autouse=True)
def _refuse_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*_args, **_kwargs):
        raise RuntimeError("unit tests must not start Ray; write an integration test instead")

    monkeypatch.setattr(ray, "init", refuse)
