"""What HAProxy must know of a fleet, as one frozen value: `FleetRoutes`.

Rules kept here:
- pure data, checked when built: an unknown host in a model, a name used twice, a malformed
  address are `ValueError`s naming the key, never a config HAProxy refuses later;
- durations are seconds (`_s`), sizes bytes (`_bytes`), as in `schemas`;
- the values that come from a host's `[proxy]` settings are read in one place, `fleet_routes()`,
  so that HAProxy's limits follow the hosts' own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llama_smart_proxy.schemas.config import ProxySettings, name_clashes, parse_listen
from llama_smart_proxy.schemas.plan import FleetPlan

# The largest request body HAProxy reads to find its "model", unless told otherwise. HAProxy holds
# a request body in one buffer (tune.bufsize) and every stream may hold two such buffers: 1 MiB
# keeps 1000 streams within about 2 GiB while leaving room for a chat with a small image.
DEFAULT_BODY_LIMIT_BYTES = 1024**2
# After a reload the old worker keeps serving the connections it holds (a long generation) this
# long at most (HAProxy's hard-stop-after).
DEFAULT_OLD_WORKER_GRACE_S = 3600.0


@dataclass(frozen=True)
class HostRoute:
    """One host of the fleet: its name in the fleet config and where its `serve` listens."""

    name: str
    address: str  # host:port of that host's llama-smart-proxy

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("hosts: a host needs a name")
        try:
            parse_listen(self.address)
        except ValueError as exc:
            raise ValueError(f"hosts.{self.name}.address: {exc}") from None


@dataclass(frozen=True)
class ModelRoute:
    """One model: the names clients use for it and the hosts that serve it (a replica each)."""

    name: str
    aliases: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()  # empty: placed on no host; HAProxy answers 503 naming it

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class HealthCheck:
    """How HAProxy checks each host's /health (one check per host, every backend tracks it)."""

    interval_s: float = 2.0
    fast_interval_s: float = 0.5  # between checks while a host is going down or coming back
    timeout_s: float = 2.0
    fall: int = 2  # failed checks in a row that mark a host down
    rise: int = 2  # passed checks in a row that bring it back

    def __post_init__(self) -> None:
        if min(self.interval_s, self.fast_interval_s, self.timeout_s) <= 0 or min(self.fall, self.rise) < 1:
            raise ValueError(f"health check: intervals and timeout must be > 0, fall and rise >= 1: {self}")

    @property
    def down_after_s(self) -> float:
        """Longest time from a host's service stopping (connection refused) to HAProxy marking
        it down: the wait for the next check, then `fall - 1` fast ones."""
        return self.interval_s + (self.fall - 1) * self.fast_interval_s

    @property
    def up_after_s(self) -> float:
        return self.interval_s + (self.rise - 1) * self.fast_interval_s


@dataclass(frozen=True)
class Timeouts:
    """The hosts' own timeouts that bound what HAProxy may wait for."""

    connect_s: float
    request_s: float  # header block and body from the client (HAProxy buffers the body)
    keepalive_s: float
    queue_s: float  # a request may wait this long on its host for its model to load
    first_byte_s: float  # prompt processing of a long prompt counts here
    stream_idle_s: float  # the longest gap between two chunks of a stream

    @property
    def longest_silence_s(self) -> float:
        """The longest a host may legitimately send nothing: a request that waits out the load
        queue, then its first byte (a whole answer, unless streamed), or a stream's longest gap.
        (A streamed request that waits for a load gets SSE comments meanwhile.)"""
        return max(self.queue_s + self.first_byte_s, self.stream_idle_s)

    @classmethod
    def of(cls, proxy: ProxySettings) -> Timeouts:
        return cls(
            connect_s=proxy.upstream_connect_timeout,
            request_s=proxy.header_timeout + proxy.body_timeout,
            keepalive_s=proxy.keepalive_timeout,
            queue_s=proxy.queue_timeout,
            first_byte_s=proxy.first_byte_timeout,
            stream_idle_s=proxy.stream_idle_timeout,
        )


@dataclass(frozen=True)
class FleetRoutes:
    """Everything `haproxy_config.render_haproxy()` needs, and nothing it must look up."""

    listen: str  # where HAProxy binds, host:port
    hosts: tuple[HostRoute, ...]
    models: tuple[ModelRoute, ...]
    timeouts: Timeouts
    body_limit_bytes: int = DEFAULT_BODY_LIMIT_BYTES
    check: HealthCheck = field(default_factory=HealthCheck)
    stats_socket: str | None = None  # HAProxy's admin socket (also hands listeners to a reload)
    old_worker_grace_s: float = DEFAULT_OLD_WORKER_GRACE_S
    run_as: str | None = None  # user and group the workers drop to (Debian's: "haproxy"); None: stay

    def __post_init__(self) -> None:
        try:
            parse_listen(self.listen)
        except ValueError as exc:
            raise ValueError(f"haproxy listen: {exc}") from None
        if not self.hosts:
            raise ValueError("hosts: the fleet has no host")
        seen: set[str] = set()
        for host in self.hosts:
            if host.name in seen:
                raise ValueError(f"hosts.{host.name}: named twice")
            seen.add(host.name)
        for model in self.models:
            for name in model.hosts:
                if name not in seen:
                    raise ValueError(f"models.{model.name}.hosts: {name!r} is not a host of the fleet ({', '.join(sorted(seen))})")
            if len(set(model.hosts)) != len(model.hosts):
                raise ValueError(f"models.{model.name}.hosts: a host named twice: {list(model.hosts)}")
        clashes = name_clashes({m.name: list(m.aliases) for m in self.models})
        if len({m.name for m in self.models}) != len(self.models):
            clashes.append((("models",), "a model named twice"))
        if clashes:
            path, message = clashes[0]
            raise ValueError(f"{'.'.join(map(str, path))}: {message}")
        if self.run_as is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]*", self.run_as):
            raise ValueError(f"run_as: {self.run_as!r} is not a user name")
        if self.body_limit_bytes < 1:
            raise ValueError(f"body limit must be at least 1 byte, got {self.body_limit_bytes}")

    def host(self, name: str) -> HostRoute:
        return next(h for h in self.hosts if h.name == name)


def fleet_routes(
    listen: str,
    hosts: Mapping[str, str],
    models: Iterable[ModelRoute],
    proxy: ProxySettings,
    *,
    body_limit_bytes: int | None = None,
    check: HealthCheck | None = None,
    stats_socket: str | None = None,
    old_worker_grace_s: float = DEFAULT_OLD_WORKER_GRACE_S,
    run_as: str | None = None,
) -> FleetRoutes:
    """The routes of a fleet whose hosts share `proxy` settings: hosts by name → address, each
    model with its aliases and the hosts the fleet plan gave it.

    The body limit is the hosts' `max_body_size` or `DEFAULT_BODY_LIMIT_BYTES`, whichever is
    smaller, unless given: HAProxy must hold a whole body in one buffer to read its "model".
    """
    limit = body_limit_bytes if body_limit_bytes is not None else min(proxy.max_body_size, DEFAULT_BODY_LIMIT_BYTES)
    return FleetRoutes(
        listen=listen,
        hosts=tuple(HostRoute(name, address) for name, address in hosts.items()),
        models=tuple(sorted(models, key=lambda m: m.name)),
        timeouts=Timeouts.of(proxy),
        body_limit_bytes=limit,
        check=check or HealthCheck(),
        stats_socket=stats_socket,
        old_worker_grace_s=old_worker_grace_s,
        run_as=run_as,
    )


def routes_of_plan(plan: FleetPlan, proxy: ProxySettings, listen: str, **options: Any) -> FleetRoutes:
    """The routes of a solved fleet (`plan --json` for a config with [hosts]): each model on the
    hosts the plan gave it, the hosts' `[proxy]` settings; `options` as for `fleet_routes`."""
    hosts = {name: host.address for name, host in plan.hosts.items()}
    models = [ModelRoute(name, tuple(m.aliases), tuple(m.hosts)) for name, m in plan.models.items()]
    return fleet_routes(listen, hosts, models, proxy, **options)
