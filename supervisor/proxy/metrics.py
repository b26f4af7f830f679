"""The proxy's request counters, and /metrics in Prometheus' text format (0.0.4) through
prometheus_client.

Rules kept here:
- counting is plain dict arithmetic on the event loop (one owner, no locks): it is on every
  request's path, so prometheus_client's own metric objects, which take a lock per update, are not
  used for it;
- a scrape renders a copy of the counters and a `ServiceStatus`, both taken on the event loop,
  through a custom collector (`ServiceCollector`); prometheus_client's `ProcessCollector` adds the
  standard process_* metrics (memory, CPU time, open files), which reveal leaks. It reads /proc, so
  the server renders in a worker thread, never on the loop;
- label values are escaped by prometheus_client as the format requires;
- the model label is bounded: it is a configured model's name, or one of three fixed values
  (`NO_MODEL`, `MODEL_MISSING`, `MODEL_UNKNOWN`), never a name a client made up.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from llama_smart_proxy.supervisor.proxy.backends import ModelState, ServiceStatus

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
NO_MODEL = ""  # the model label of requests for the proxy's own routes
MODEL_MISSING = "(none)"  # a model route's request that named no model, with no default
MODEL_UNKNOWN = "(unknown)"  # a request naming a model nothing is called: every such name, one label
PREFIX = "llama_smart_proxy_"
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"  # the format generate_latest writes


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

    def copy(self) -> ProxyMetrics:
        """The counters as they are now, for a scrape rendered away from the event loop."""
        copied = ProxyMetrics()
        copied.requests.update(self.requests)
        copied.latency_counts = {model: list(counts) for model, counts in self.latency_counts.items()}
        copied.latency_sum.update(self.latency_sum)
        copied.in_flight.update(self.in_flight)
        copied.connections = self.connections
        copied.connections_total = self.connections_total
        return copied


def _le(bound: float) -> str:
    """A bucket's upper bound as Prometheus writes it: 0.005, 1.0, +Inf."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _counter(name: str, help_text: str, labels: list[str], samples: Iterator[tuple[list[str], float]]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _gauge(name: str, help_text: str, labels: list[str], samples: Iterator[tuple[list[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


class ServiceCollector:
    """A prometheus_client collector over one copy of the proxy's counters and one status of the
    service: it reads them when collected and keeps nothing."""

    def __init__(self, metrics: ProxyMetrics, service: ServiceStatus) -> None:
        self.metrics = metrics
        self.service = service

    def collect(self) -> Iterator[Metric]:
        metrics, p = self.metrics, PREFIX
        yield _counter(
            p + "requests_total",
            "Requests answered, by model and HTTP status (499: the client went away).",
            ["model", "status"],
            (([m, str(s)], n) for (m, s), n in sorted(metrics.requests.items())),
        )
        duration = HistogramMetricFamily(p + "request_duration_seconds", "Time from request head to response end.", labels=["model"])
        for model in sorted(metrics.latency_counts):
            running, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), metrics.latency_counts[model]):
                running += count
                buckets.append((_le(bound), running))
            duration.add_metric([model], buckets, sum_value=metrics.latency_sum[model])
        yield duration
        yield _gauge(
            p + "proxy_in_flight",
            "Requests the proxy is forwarding now, by model.",
            ["model"],
            (([m], n) for m, n in sorted(metrics.in_flight.items())),
        )
        yield _gauge(p + "client_connections", "Client connections open now.", [], iter([([], metrics.connections)]))
        yield from self._models()
        yield from self._gpus()
        yield _counter(
            p + "reloads_total",
            "Config reloads, by result (failed: refused, the running config kept).",
            ["result"],
            (([result], n) for result, n in sorted(self.service.reloads.items())),
        )

    def _models(self) -> Iterator[Metric]:
        p = PREFIX
        models = sorted(self.service.models, key=lambda s: s.name)
        yield _gauge(
            p + "model_in_flight",
            "Requests a model's child is serving now (runtime's count).",
            ["model"],
            (([s.name], s.in_flight) for s in models),
        )
        yield _gauge(
            p + "model_queue_length",
            "Requests waiting for a model to become ready or free.",
            ["model"],
            (([s.name], s.queued) for s in models),
        )
        yield _gauge(
            p + "model_state",
            "1 for the state each model is in now, 0 for the others.",
            ["model", "state"],
            (([s.name, state.value], int(s.state is state)) for s in models for state in ModelState),
        )
        yield _counter(
            p + "model_restarts_total",
            "Restarts of a model's child after it died.",
            ["model"],
            (([s.name], s.restarts) for s in models),
        )
        yield _gauge(
            p + "model_load_seconds",
            "How long the model's last successful load took.",
            ["model"],
            (([s.name], s.load_seconds) for s in models if s.load_seconds is not None),
        )
        cached = [(s.name, s.prompt_cache) for s in models if s.prompt_cache is not None]
        for name, family, help_text, value in (
            ("prompt_cache_slots_saved_total", _counter, "Slots saved before planned stops (keep_cache).", lambda c: c.slots_saved),
            ("prompt_cache_slots_restored_total", _counter, "Saved slots restored into new children.", lambda c: c.slots_restored),
            ("prompt_cache_tokens_restored_total", _counter, "Tokens restored: prompt not processed again.", lambda c: c.tokens_restored),
            ("prompt_cache_discarded_total", _counter, "Saved caches discarded because the launch changed.", lambda c: c.saves_discarded),
            ("prompt_cache_bytes", _gauge, "Bytes of saved slots on disk, by model.", lambda c: c.bytes_on_disk),
            ("prompt_cache_save_seconds", _gauge, "How long the last save of a model's slots took.", lambda c: c.last_save_s),
            ("prompt_cache_restore_seconds", _gauge, "How long the last restore took (part of its load time).", lambda c: c.last_restore_s),
        ):  # fmt: skip
            yield family(
                p + name, help_text, ["model"],
                (([model], value(cache)) for model, cache in cached if value(cache) is not None),
            )  # fmt: skip

    def _gpus(self) -> Iterator[Metric]:
        p = PREFIX
        gpus = sorted(self.service.gpus, key=lambda g: g.index)
        yield _gauge(
            p + "gpu_total_bytes",
            "Memory of each GPU.",
            ["gpu", "name"],
            (([str(g.index), g.name], g.total_bytes) for g in gpus),
        )
        yield _gauge(
            p + "gpu_usable_bytes",
            "Memory the plan may fill on each GPU: free when it was made, minus the reserve.",
            ["gpu"],
            (([str(g.index)], g.usable_bytes) for g in gpus if g.usable_bytes is not None),
        )
        yield _gauge(
            p + "gpu_planned_bytes",
            "Memory reserved in the ledger on each GPU: the planned bytes of every child holding memory.",
            ["gpu"],
            (([str(g.index)], g.planned_bytes) for g in gpus),
        )
        yield _gauge(
            p + "gpu_reserved_bytes",
            "The ledger's reservations on each GPU, by model.",
            ["gpu", "model"],
            (([str(g.index), m], b) for g in gpus for m, b in sorted(g.reserved_by_model.items())),
        )
        yield _gauge(
            p + "gpu_used_bytes",
            "Memory in use on each GPU, measured through NVML at the last sample.",
            ["gpu"],
            (([str(g.index)], g.used_bytes) for g in gpus if g.used_bytes is not None),
        )
        yield _gauge(
            p + "gpu_free_bytes",
            "Memory free on each GPU, measured through NVML at the last sample.",
            ["gpu"],
            (([str(g.index)], g.free_bytes) for g in gpus if g.free_bytes is not None),
        )
        yield _gauge(
            p + "gpu_sample_age_seconds",
            "How old the last NVML sample of each GPU is.",
            ["gpu"],
            (([str(g.index)], g.measured_age_s) for g in gpus if g.measured_age_s is not None),
        )


_PROCESS = ProcessCollector(registry=None)  # process_*: this process's memory, CPU time, open files


def render(metrics: ProxyMetrics, service: ServiceStatus) -> str:
    """The text exposition of the counters, the service's state and the process; reads /proc."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(metrics, service))
    registry.register(_PROCESS)
    return generate_latest(registry).decode()
