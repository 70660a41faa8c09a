"""The cluster secret when the operator configured none: generated once per Ray cluster.

The first replica to ask stores a random secret in Ray's GCS key-value store (an atomic
put-if-absent, so concurrent first replicas agree); every later one reads it back. Ray's token
authentication guards the GCS as it guards actor calls, so only processes of this Ray cluster
hold the secret, and it lives as long as the cluster. Several Ray clusters sharing one Redis
do not share a generated secret: each then treats the others' values as foreign (a miss) and
ignores their version records, which is why such a deployment must configure one.
"""

from __future__ import annotations

from typing import Final

from ray.experimental import internal_kv

from cluster.secret import ClusterSecret

_KV_NAMESPACE: Final = "raycache"


def shared_secret(namespace: str, configured: ClusterSecret | None) -> ClusterSecret:
    """`configured`, or this Ray cluster's generated secret for raycache `namespace`.

    Blocking (a GCS round trip or two): call it from a worker thread on an event loop.
    """
    if configured is not None:
        return configured
    key = f"cluster-secret-{namespace}"
    internal_kv._internal_kv_put(
        key, ClusterSecret.generate().material, overwrite=False, namespace=_KV_NAMESPACE
    )
    material = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
    if not isinstance(material, bytes):
        raise RuntimeError("Ray's key-value store lost the generated cluster secret")
    return ClusterSecret(material)
