"""keep_cache with the REAL llama-server on the tiny model (issue 17's proof): after an eviction, an
idle TTL and a reload that restarts the child, a repeated long prompt reuses its prefix
(`timings.prompt_n`), beside a keep_cache = false twin in the same test that processes it whole;
a changed ctx discards the saved cache; the disk budget holds over many saves; and a restored cache
never changes an answer."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from llama_smart_proxy.supervisor.planning.prepare import Source, prepare
from llama_smart_proxy.schemas.prompt_cache import model_dir_name
from tests.helpers import wait_for
from tests.service_harness import Harness, Running

pytestmark = pytest.mark.llama_server

PROMPT = "The quick brown fox jumps over the lazy dog. " * 15  # 949 tokens of the tiny model's bytes
OTHER = PROMPT[:300] + "and then it went home, where nobody waited for it. " * 2
"""Shares its first 300 bytes with PROMPT, then differs."""
REUSED = 4
"""prompt_n at most this when the prefix was restored (llama-server evaluates at least one token)."""


@pytest.fixture
def harness(tmp_path: Path, tiny_model: Path, llama_server: Path) -> Harness:
    return Harness.create(tmp_path, tiny_model, binary=llama_server)


def cache_section(harness: Harness, **extra: str) -> str:
    lines = [f'dir = "{harness.directory / "cache"}"', 'disk_reserve = "0"', *(f"{k} = {v}" for k, v in extra.items())]
    return "\n".join(lines)


def complete(running: Running, model: str, prompt: str = PROMPT) -> tuple[int, str]:
    """(prompt tokens processed, the answer) of a short greedy completion."""
    body = {"model": model, "prompt": prompt, "n_predict": 4, "temperature": 0, "seed": 1}
    response = httpx.post(f"{running.base}/completion", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer["timings"]["prompt_n"], answer["content"]


def twins(**table: object) -> dict[str, dict]:
    """The same tiny model twice: `kept` keeps its cache, `plain` does not."""
    return {"kept": {"ctx": 2048, "keep_cache": True, **table}, "plain": {"ctx": 2048, **table}}


def cache_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.name.startswith("slot-"))


def test_after_an_eviction_the_kept_model_reuses_the_prompt_and_the_plain_one_processes_it_again(harness: Harness) -> None:
    config = harness.write_config(twins(mode="on-demand"), prompt_cache=cache_section(harness))
    probe = harness.write_inventory([80 * 1024**3], name="probe.json")
    need = prepare(Source(config, inventory_path=probe)).plan.model("kept").estimate.gpus[0].total_bytes
    inventory = harness.write_inventory([need * 3 // 2])  # room for one of them at a time
    with harness.serving(config, inventory) as running:
        full, reference = complete(running, "kept")
        assert full > 900
        assert complete(running, "plain")[0] == full  # evicts kept, which saves its slot
        assert running.model("kept")["state"] == "stopped"
        reused, answer = complete(running, "kept")  # evicts plain; kept restores before its first request
        assert running.model("plain")["state"] == "stopped"
        assert reused <= REUSED and answer == reference
        assert complete(running, "plain")[0] == full  # nothing kept: the whole prompt again
        cache = running.model("kept")["prompt_cache"]
        assert cache["slots_saved"] == 2 and cache["slots_restored"] == 1 and cache["tokens_restored"] > 900
        assert cache["bytes_on_disk"] > 0 and cache["last_restore_s"] is not None
        assert running.model("plain")["prompt_cache"] is None
        metrics = httpx.get(f"{running.base}/metrics", timeout=10).text
        assert 'llama_smart_proxy_prompt_cache_slots_restored_total{model="kept"} 1' in metrics
        assert f'llama_smart_proxy_prompt_cache_bytes{{model="kept"}} {cache["bytes_on_disk"]}' in metrics


def test_after_an_idle_ttl_the_kept_model_reuses_the_prompt_and_the_plain_one_processes_it_again(harness: Harness) -> None:
    config = harness.write_config(twins(mode="on-demand", idle_ttl="1s"), prompt_cache=cache_section(harness))
    with harness.serving(config) as running:
        full = complete(running, "kept")[0]
        assert complete(running, "plain")[0] == full
        for model in ("kept", "plain"):
            running.wait_state(model, "stopped", timeout=15)
        assert complete(running, "kept")[0] <= REUSED
        assert complete(running, "plain")[0] == full


def test_a_reload_restart_reuses_the_prompt_a_changed_ctx_discards_the_cache_and_answers_never_change(harness: Harness) -> None:
    config = harness.write_config(twins(), prompt_cache=cache_section(harness))
    with harness.serving(config) as running:
        _, reference = complete(running, "plain", OTHER)  # OTHER's answer from a child that never had a cache
        full = complete(running, "kept")[0]
        complete(running, "plain")

        # a launch change outside the cache's identity: both restart, and kept restores its slot
        harness.write_config(twins(batch=1024), prompt_cache=cache_section(harness))
        assert running.reload().endswith("restart kept, restart plain")
        assert complete(running, "plain")[0] == full
        assert complete(running, "kept")[0] <= REUSED

        # restarted again: a different prompt on the restored slot reuses only the common prefix,
        # and its answer is the one computed without any cache
        harness.write_config(twins(batch=512), prompt_cache=cache_section(harness))
        assert running.reload().endswith("restart kept, restart plain")
        processed, answer = complete(running, "kept", OTHER)
        assert REUSED < processed < len(OTHER) - 250 and answer == reference

        # ctx changes: the slot saved by the ctx-2048 child is not restored into the ctx-1024 one
        changed = twins(batch=512)
        changed["kept"]["ctx"] = 1024
        harness.write_config(changed, prompt_cache=cache_section(harness))
        assert running.reload().endswith(": restart kept")
        cache = running.model("kept")["prompt_cache"]
        assert cache["saves_discarded"] == 1 and "ctx 2048 -> 1024" in cache["last_event"]
        assert complete(running, "kept")[0] == full
        assert not any((harness.directory / "cache" / model_dir_name("kept")).glob("slot-*"))


def test_many_saves_over_the_budget_keep_the_directory_under_it_dropping_the_oldest(harness: Harness) -> None:
    # three keep_cache models evicting each other in turn (room for one at a time): every eviction
    # saves 200-260 kB; the root may hold 700 kB, two saves, so a third drops the oldest, never the
    # save of the model whose start caused the eviction (it restores it a moment later)
    models = {name: {"ctx": 2048, "keep_cache": True, "mode": "on-demand"} for name in ("a", "b", "c")}
    budget = cache_section(harness, max_bytes="700000", max_bytes_per_model="400000")
    config = harness.write_config(models, prompt_cache=budget)
    probe = harness.write_inventory([80 * 1024**3], name="probe.json")
    need = prepare(Source(config, inventory_path=probe)).plan.model("a").estimate.gpus[0].total_bytes
    root = harness.directory / "cache"

    def saved() -> set[str]:
        return {name for name in "abc" if any((root / model_dir_name(name)).glob("slot-*"))}

    with harness.serving(config, harness.write_inventory([need * 3 // 2])) as running:
        sizes, held = [], []
        for turn, model in enumerate("abcabcab"):
            processed = complete(running, model, (PROMPT * 2)[: 700 - 25 * turn])[0]  # each a different length
            sizes.append(cache_bytes(root))
            held.append(saved())
            assert sizes[-1] <= 700_000, sizes
            assert all(cache_bytes(root / model_dir_name(name)) <= 400_000 for name in "abc")
            if turn == 3:  # c's save (evicted by a) dropped b's, the oldest, and a restored its own
                assert processed <= REUSED
        assert held == [set(), {"a"}, {"a", "b"}, {"c"}, {"a", "c"}, {"b"}, {"b", "c"}, {"a"}], held
        assert max(sizes) > 400_000  # two saves at once: the budget was what decided
