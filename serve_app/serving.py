"""The weights a replica serves for each model, and how a new version's weights are found.

A request takes one `ServingModel` (weights and version together) when it starts and uses it
to the end, so its answer and its cache entries always name the weights that produced them; a
version switch replaces the `ServingModel` whole and then waits until the requests holding
the old one are done (`wait_drained`) before the replica acknowledges the new version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cluster.versions import ModelVersion
from serve_app.config import ModelSpec
from serve_app.models import CausalLM

DRAIN_POLL_S = 0.005


@dataclass(eq=False)
class ServingModel:
    """One model's weights at one version, and the requests using them right now.

    `inflight` is changed on the replica's event loop only; other threads only read it.
    """

    model: CausalLM
    record: ModelVersion
    inflight: int = 0

    @property
    def version(self) -> str:
        return self.record.version

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until no request uses these weights (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self.inflight > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(DRAIN_POLL_S)
        return True


def weights_spec(spec: ModelSpec, record: ModelVersion) -> ModelSpec:
    """The spec to build `record`'s weights from: its seed or checkpoint when it names one,
    otherwise the configured source again (weights replaced in place at the same path)."""
    if record.seed is not None:
        return spec.model_copy(
            update={"version": record.version, "seed": record.seed, "checkpoint": None}
        )
    if record.checkpoint is not None:
        return spec.model_copy(update={"version": record.version, "checkpoint": record.checkpoint})
    return spec.model_copy(update={"version": record.version})


def config_version(spec: ModelSpec) -> ModelVersion:
    """The version a replica's config declares, before anything was published (generation 0)."""
    return ModelVersion(
        model=spec.id,
        version=spec.version,
        generation=0,
        source="config",
        seed=spec.seed if spec.checkpoint is None else None,
        checkpoint=spec.checkpoint,
    )
