"""Every replica's ``adapterserve_*`` families in one exposition, each sample labelled ``replica``.

The ingress's ``/metrics`` asks every replica for its registry's text (``DeploymentHandle.broadcast``)
and merges them here: one HELP/TYPE per family, every sample with ``replica="<Serve replica id>"``
added, so Prometheus scrapes one target per cluster and the Grafana dashboard works per replica
(``by (replica)``) and in sum (its ``sum(...)`` queries ignore the new label).
Thread domain: any (pure functions).
"""

from __future__ import annotations

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


class _Families:
    """A prometheus_client collector yielding already built families (for generate_latest)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_replica_metrics(texts: list[tuple[str, bytes]]) -> bytes:
    """Merge (replica id, Prometheus text) pairs into one Prometheus text exposition."""
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts):
        for family in text_string_to_metric_families(text.decode("utf-8")):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                labels = {**s.labels, REPLICA_LABEL: replica}
                into.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
    return generate_latest(_Families(list(merged.values())))  # type: ignore[arg-type]
