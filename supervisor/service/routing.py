"""The routing table: which configured model a name or alias a client sends means.

Rules kept here:
- built whole from a config's models and never changed after: a reload swaps the table in one
  assignment, so every name and alias switches at the same instant;
- `resolve` is a dict lookup: it runs on every request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llama_smart_proxy.schemas.config import ModelSpec


@dataclass(frozen=True)
class RoutingTable:
    routes: Mapping[str, str] = field(default_factory=dict)
    """Every name and alias → the model's name."""

    @classmethod
    def of(cls, specs: Iterable[ModelSpec]) -> RoutingTable:
        routes: dict[str, str] = {}
        for spec in specs:
            routes[spec.name] = spec.name
            for alias in spec.aliases:
                routes[alias] = spec.name
        return cls(routes)

    def resolve(self, name: str) -> str | None:
        return self.routes.get(name)
