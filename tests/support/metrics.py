"""Reading Fender's Prometheus exposition in tests."""

from __future__ import annotations

import httpx


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


async def get_metrics(fender) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(fender.admin_url + "/metrics")).text
