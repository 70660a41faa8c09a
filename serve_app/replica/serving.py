"""The weights a replica serves for each model, and how a new version's weights are found.

A request takes one `ServingModel` (weights and version together) when it starts and uses it
to the end, so its answer and its cache entries always name the weights that produced them; a
version switch replaces the `ServingModel` whole and then waits until the requests holding
the old one are done (`wait_drained`) before the replica acknowledges the new version.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from cluster.versions.records import ModelVersion
from serve_app.config import ModelSpec
from serve_app.models import CausalLM

DRAIN_POLL_S = 0.005


@dataclass(eq=False)
class ServingModel:
    """One model's weights at one version, and the requests using them right now.

    A request `enter`s before it uses the weights and `leave`s after. A version switch
    `retire`s them before it waits for `wait_drained`: from then on `enter` refuses, so the
    drain cannot end while a request that read the old weights is still about to start.
    """

    model: CausalLM
    record: ModelVersion
    inflight: int = 0
    retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def version(self) -> str:
        return self.record.version

    @property
    def model_bytes(self) -> int:
        """Bytes of these weights in memory."""
        return self.model.weight_bytes

    def enter(self) -> bool:
        """Count a request on these weights; False (nothing counted) once they are retired."""
        with self._lock:
            if self.retired:
                return False
            self.inflight += 1
            return True

    def hold(self) -> None:
        """Count one more user of weights a request already `enter`ed: a computation that
        may outlive its request (a client that disconnects), retired or not."""
        with self._lock:
            self.inflight += 1

    def leave(self) -> None:
        """A request that entered is done with these weights."""
        with self._lock:
            self.inflight -= 1

    def retire(self) -> None:
        """Refuse new requests; those already in go on until they leave."""
        with self._lock:
            self.retired = True

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until no request uses these weights (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self.inflight > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(DRAIN_POLL_S)
        return True


class CheckpointRefused(ValueError):
    """A published checkpoint path lies outside the configured checkpoint directory."""


def allowed_checkpoint(path: str, checkpoint_dir: str | None) -> str:
    """`path` resolved, when it lies inside `checkpoint_dir` (also resolved, so neither `..`
    nor a symbolic link leads out); raises `CheckpointRefused` otherwise or without a dir."""
    if checkpoint_dir is None:
        raise CheckpointRefused(
            "publishing a checkpoint needs args.checkpoint_dir, the directory checkpoints "
            "may be loaded from"
        )
    if "\0" in path:
        # No file name holds one, and os.path refuses it with a ValueError.
        raise CheckpointRefused("a checkpoint path cannot contain a NUL character")
    resolved = os.path.realpath(path)
    root = os.path.realpath(checkpoint_dir)
    if os.path.commonpath([resolved, root]) != root:
        raise CheckpointRefused(f"checkpoints are loaded only from inside {checkpoint_dir}")
    return resolved


def weights_spec(
    spec: ModelSpec, record: ModelVersion, checkpoint_dir: str | None = None
) -> ModelSpec:
    """The spec to build `record`'s weights from: its seed or checkpoint when it names one,
    otherwise the configured source again (weights replaced in place at the same path).

    A published checkpoint (not the one the config names) must lie in `checkpoint_dir`: a
    version record, wherever it came from, cannot make a replica read any other file.
    """
    if record.seed is not None:
        if spec.is_hf:
            raise CheckpointRefused(
                f"model {spec.id!r} is a Hugging Face checkpoint: its versions are checkpoint "
                "directories, not seeds"
            )
        return spec.model_copy(
            update={"version": record.version, "seed": record.seed, "checkpoint": None}
        )
    if record.checkpoint is not None:
        path = record.checkpoint
        if path != spec.checkpoint:
            path = allowed_checkpoint(path, checkpoint_dir)
        return spec.model_copy(update={"version": record.version, "checkpoint": path})
    return spec.model_copy(update={"version": record.version})


def config_version(spec: ModelSpec) -> ModelVersion:
    """The version a replica's config declares, before anything was published (generation 0)."""
    return ModelVersion(
        model=spec.id,
        version=spec.version,
        generation=0,
        source="config",
        # A Hugging Face model is its configured directory: neither seed nor checkpoint.
        seed=spec.seed if not spec.is_hf and spec.checkpoint is None else None,
        checkpoint=spec.checkpoint,
    )
