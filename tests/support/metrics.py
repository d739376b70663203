"""Reading a mirror's ``/metrics``: one scrape's samples, and sums over them."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    """Every sample of one scrape of *url* (a new connection each time: any worker may answer)."""
    answer = httpx.get(url, timeout=30.0, trust_env=False)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return parse(answer.text)


def parse(text: str) -> Samples:
    """Every sample of a scrape's body in the Prometheus text format."""
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called *name* whose labels include *labels*."""
    return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())
