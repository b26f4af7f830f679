"""The proxy's request counters and their Prometheus text exposition (format 0.0.4).

Rules kept here:
- counting is plain dict arithmetic on the event loop (one owner, no locks): it is on every
  request's path;
- rendering is a pure function of the counters and a runtime `Snapshot`;
- label values are escaped as the format requires (backslash, double quote, newline);
- the model label is bounded: it is a configured model's name, or one of three fixed values
  (`NO_MODEL`, `MODEL_MISSING`, `MODEL_UNKNOWN`), never a name a client made up.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable

from llama_smart_proxy.supervisor.proxy.backends import ModelState, Snapshot

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
NO_MODEL = ""  # the model label of requests for the proxy's own routes
MODEL_MISSING = "(none)"  # a model route's request that named no model, with no default
MODEL_UNKNOWN = "(unknown)"  # a request naming a model nothing is called: every such name, one label


class ProxyMetrics:
    """Requests by model and status, their latency, and requests in flight."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.latency_counts: dict[str, list[int]] = {}
        self.latency_sum: defaultdict[str, float] = defaultdict(float)
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.connections = 0
        self.connections_total = 0

    def observe(self, model: str, status: int, seconds: float) -> None:
        self.requests[(model, status)] += 1
        counts = self.latency_counts.get(model)
        if counts is None:
            counts = self.latency_counts[model] = [0] * (len(LATENCY_BUCKETS_S) + 1)
        counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.latency_sum[model] += seconds


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{key}="{_label(str(value))}"' for key, value in labels.items()) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[str, dict, float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            self.lines.append(f"{name}{suffix}{_labels(**labels) if labels else ''} {_number(value)}")


PREFIX = "llama_smart_proxy_"


def render(metrics: ProxyMetrics, snapshot: Snapshot) -> str:
    """The Prometheus text exposition of the proxy's counters and the runtime's state."""
    w = _Writer()
    p = PREFIX
    w.family(
        p + "requests_total",
        "counter",
        "Requests answered, by model and HTTP status (499: the client went away).",
        (("", {"model": m, "status": s}, n) for (m, s), n in sorted(metrics.requests.items())),
    )
    samples: list[tuple[str, dict, float]] = []
    for model in sorted(metrics.latency_counts):
        counts = metrics.latency_counts[model]
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts):
            running += count
            samples.append(("_bucket", {"model": model, "le": _number(bound)}, running))
        samples.append(("_sum", {"model": model}, metrics.latency_sum[model]))
        samples.append(("_count", {"model": model}, running))
    w.family(p + "request_duration_seconds", "histogram", "Time from request head to response end.", samples)
    w.family(
        p + "proxy_in_flight",
        "gauge",
        "Requests the proxy is forwarding now, by model.",
        (("", {"model": m}, n) for m, n in sorted(metrics.in_flight.items())),
    )
    w.family(p + "client_connections", "gauge", "Client connections open now.", [("", {}, metrics.connections)])
    models = sorted(snapshot.models, key=lambda s: s.name)
    w.family(
        p + "model_in_flight",
        "gauge",
        "Requests a model's child is serving now (runtime's count).",
        (("", {"model": s.name}, s.in_flight) for s in models),
    )
    w.family(
        p + "model_queue_length",
        "gauge",
        "Requests waiting for a model to become ready or free.",
        (("", {"model": s.name}, s.queued) for s in models),
    )
    w.family(
        p + "model_state",
        "gauge",
        "1 for the state each model is in now, 0 for the others.",
        (("", {"model": s.name, "state": state.value}, int(s.state is state)) for s in models for state in ModelState),
    )
    w.family(
        p + "model_restarts_total",
        "counter",
        "Restarts of a model's child after it died.",
        (("", {"model": s.name}, s.restarts) for s in models),
    )
    w.family(
        p + "model_load_seconds",
        "gauge",
        "How long the model's last successful load took.",
        (("", {"model": s.name}, s.load_seconds) for s in models if s.load_seconds is not None),
    )
    cached = [(s.name, s.prompt_cache) for s in models if s.prompt_cache is not None]
    for name, kind, help_text, value in (
        ("prompt_cache_slots_saved_total", "counter", "Slots saved before planned stops (keep_cache).", lambda c: c.slots_saved),
        ("prompt_cache_slots_restored_total", "counter", "Saved slots restored into new children.", lambda c: c.slots_restored),
        ("prompt_cache_tokens_restored_total", "counter", "Tokens restored: prompt not processed again.", lambda c: c.tokens_restored),
        ("prompt_cache_discarded_total", "counter", "Saved caches discarded because the launch changed.", lambda c: c.saves_discarded),
        ("prompt_cache_bytes", "gauge", "Bytes of saved slots on disk, by model.", lambda c: c.bytes_on_disk),
        ("prompt_cache_save_seconds", "gauge", "How long the last save of a model's slots took.", lambda c: c.last_save_s),
        ("prompt_cache_restore_seconds", "gauge", "How long the last restore took (part of its load time).", lambda c: c.last_restore_s),
    ):  # fmt: skip
        w.family(
            p + name, kind, help_text,
            (("", {"model": model}, value(cache)) for model, cache in cached if value(cache) is not None),
        )  # fmt: skip
    gpus = sorted(snapshot.gpus, key=lambda g: g.index)
    w.family(
        p + "gpu_total_bytes",
        "gauge",
        "Memory of each GPU.",
        (("", {"gpu": g.index, "name": g.name}, g.total_bytes) for g in gpus),
    )
    w.family(
        p + "gpu_usable_bytes",
        "gauge",
        "Memory the plan may fill on each GPU: free when it was made, minus the reserve.",
        (("", {"gpu": g.index}, g.usable_bytes) for g in gpus if g.usable_bytes is not None),
    )
    w.family(
        p + "gpu_planned_bytes",
        "gauge",
        "Memory reserved in the ledger on each GPU: the planned bytes of every child holding memory.",
        (("", {"gpu": g.index}, g.planned_bytes) for g in gpus),
    )
    w.family(
        p + "gpu_reserved_bytes",
        "gauge",
        "The ledger's reservations on each GPU, by model.",
        (("", {"gpu": g.index, "model": m}, b) for g in gpus for m, b in sorted(g.reserved_by_model.items())),
    )
    w.family(
        p + "gpu_used_bytes",
        "gauge",
        "Memory in use on each GPU, measured through NVML at the last sample.",
        (("", {"gpu": g.index}, g.used_bytes) for g in gpus if g.used_bytes is not None),
    )
    w.family(
        p + "gpu_free_bytes",
        "gauge",
        "Memory free on each GPU, measured through NVML at the last sample.",
        (("", {"gpu": g.index}, g.free_bytes) for g in gpus if g.free_bytes is not None),
    )
    w.family(
        p + "gpu_sample_age_seconds",
        "gauge",
        "How old the last NVML sample of each GPU is.",
        (("", {"gpu": g.index}, g.measured_age_s) for g in gpus if g.measured_age_s is not None),
    )
    w.family(
        p + "reloads_total",
        "counter",
        "Config reloads, by result (failed: refused, the running config kept).",
        (("", {"result": result}, n) for result, n in sorted(snapshot.reloads.items())),
    )
    return "\n".join(w.lines) + "\n"
