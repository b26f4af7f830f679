"""The status page (GET /ui) in a real headless browser: Debian's Chromium (/usr/bin/chromium),
driven by Playwright for Python, against the service running the REAL tiny llama-server (the FAKE
one only where a load must last seconds), with a fake NVML for the GPU case.

Screenshots of each main state are written to the test's directory, and also to
$LLAMA_SMART_PROXY_SCREENSHOTS when it is set (benchmarks/results/ui/ keeps the ones in the README).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_smart_proxy.supervisor.service.gpu_sampler import GpuSampler
from tests.fakes.fake_pynvml import GIB, FakeNvml, gpu
from tests.helpers import wait_for
from tests.service_harness import Harness, Running

pytestmark = [pytest.mark.llama_server, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_KEY = "admin-key-for-the-page"
MIB = 1024**2
TIMEOUT_MS = 15_000

# Records every state each model's row shows, as the page draws it: proof that a change reached
# the page by itself (no reload), even when it lasted a moment.
WATCH_ROWS = """() => {
  window.pageLoads = (window.pageLoads || 0) + 1;
  window.seenStates = {};
  const note = () => {
    for (const row of document.querySelectorAll('#models tr[data-model]')) {
      const seen = (window.seenStates[row.dataset.model] ||= []);
      if (seen[seen.length - 1] !== row.dataset.state) seen.push(row.dataset.state);
    }
  };
  note();
  new MutationObserver(note).observe(document.querySelector('#models tbody'),
    {subtree: true, childList: true, attributes: true, attributeFilter: ['data-state']});
}"""


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A new page in a fresh Chromium profile."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is needed for the status page's tests: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1360, "height": 900},
        )
        errors: list[str] = []
        try:
            tab = context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            tab.page_errors = errors
            yield tab
        finally:
            context.close()
    # the browser logs each refused action's answer (401, 409, 503, which the tests ask for) and
    # the refused connections while the service restarts; nothing else may fail on the page
    expected = ("the server responded with a status of", "ERR_CONNECTION_REFUSED")
    assert [e for e in errors if not any(words in e for words in expected)] == []


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("LLAMA_SMART_PROXY_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(keep) / path.name)
    return path


def wait_js(page: Any, function: str, arg: Any = None, timeout: float = TIMEOUT_MS / 1000) -> None:
    """Poll `function(arg)` in the page until it is true. (Playwright's wait_for_function evaluates
    its predicate from a string inside the page, which older Playwrights do with eval(): the page's
    Content-Security-Policy forbids that, as it should.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(function, arg):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {function}")
        time.sleep(0.01)


def open_page(page: Any, running: Running) -> None:
    page.goto(f"{running.base}/ui")
    page.wait_for_selector("#connection[data-connection=live]")
    page.wait_for_selector("#models tbody tr[data-model]")
    page.evaluate(WATCH_ROWS)


def row_state(page: Any, model: str) -> str:
    return page.get_attribute(f'#models tr[data-model="{model}"]', "data-state")


def wait_row(page: Any, model: str, state: str) -> None:
    page.wait_for_selector(f'#models tr[data-model="{model}"][data-state="{state}"]')


def seen_states(page: Any, model: str) -> list[str]:
    return page.evaluate(f"window.seenStates[{model!r}] || []")


def use_key(page: Any, key: str) -> None:
    page.fill("#key", key)
    page.click("#key-form button[type=submit]")


def click_action(page: Any, action: str, model: str | None = None) -> str:
    """Click an action and return the result line once it is no longer pending."""
    selector = f'button[data-action="{action}"]' + (f'[data-model="{model}"]' if model else "")
    page.click(selector)
    page.wait_for_selector("#action-result:not([data-result=pending]):not([data-result=''])")
    return page.inner_text("#action-result")


def test_the_page_shows_every_model_with_its_state_and_the_gpu_bars(
    tmp_path: Path, tiny_model: Path, llama_server: Path, monkeypatch: pytest.MonkeyPatch, page: Any
) -> None:
    # Two 8 GiB GPUs through a fake NVML; the real llama-server (a CPU build) runs each child on
    # the CPU whatever the plan says, which is all this page needs: the plan and the ledger are real.
    nvml = FakeNvml(
        devices=[
            gpu(0, name="NVIDIA GeForce RTX 4090", total=8 * GIB, used=1 * GIB, processes={}),
            gpu(1, name="NVIDIA GeForce RTX 4090", total=8 * GIB, used=512 * MIB, processes={}),
        ]
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    harness = Harness.create(tmp_path / "service", tiny_model, binary=llama_server)
    config = harness.write_config(
        {
            "chat": {"aliases": ["default"], "ctx": 2048},
            "writer": {"ctx": 8192},
            "spare": {"mode": "on-demand"},
        },
        gpus='policy = "spread"',
    )
    with harness.serving(config, sampler=GpuSampler(interval_s=0.2)) as running:
        status = running.status()
        placed = {m["name"]: m["gpus"] for m in status["models"]}
        assert placed["chat"] != placed["writer"] and all(placed.values()), placed  # one GPU each
        # NVML reports each child's process on its GPU, and one process that is none of ours
        for model in status["models"]:
            if model["pid"] is not None:
                device = nvml.devices[model["gpus"][0]]
                device.processes[model["pid"]] = 700 * MIB
                device.used += 700 * MIB
        nvml.devices[1].processes[4242] = 300 * MIB
        wait_for(lambda: all(g.get("used_by_model") for g in running.status()["gpus"]), 10, "per-process figures")

        open_page(page, running)
        for name, state in (("chat", "ready"), ("writer", "ready"), ("spare", "stopped")):
            wait_row(page, name, state)
        assert page.inner_text('#models tr[data-model="chat"] [data-field=placement]') == f"gpu · GPU {placed['chat'][0]}"
        assert page.inner_text('#models tr[data-model="chat"] [data-field=pid]') == str(running.model("chat")["pid"])
        for name in ("chat", "writer"):
            index = placed[name][0]
            segment = page.wait_for_selector(f'[data-device="gpu-{index}"] .seg[data-model="{name}"]')
            planned = running.model(name)["planned_bytes_by_gpu"][str(index)]
            assert int(segment.get_attribute("data-bytes")) == planned
            title = segment.get_attribute("title")
            assert f"{name}: planned" in title and "measured 700 MiB" in title, title
            assert segment.query_selector(".measured") is not None
        gpu0 = page.inner_text('[data-device="gpu-0"]')
        assert "GPU 0" in gpu0 and "RTX 4090" in gpu0 and "8.0 GiB total" in gpu0 and "(NVML" in gpu0
        assert "other processes 300 MiB" in page.inner_text('[data-device="gpu-1"]')
        assert page.query_selector('[data-device="host"]') is not None
        screenshot(page, tmp_path, "gpus-ready")


def test_loading_failing_and_resetting_models_change_the_page_and_admin_actions_need_the_key(
    tmp_path: Path, tiny_model: Path, llama_server: Path, page: Any
) -> None:
    harness = Harness.create(tmp_path / "service", tiny_model, binary=llama_server)
    config = harness.write_config(
        {
            "chat": {"aliases": ["default"]},
            "lazy": {"mode": "on-demand"},
            # llama-server refuses an unknown argument at once: every start dies, a crash loop
            "broken": {"mode": "on-demand", "args": ["--no-such-flag"]},
        },
        proxy=f'admin_api_keys = ["{ADMIN_KEY}"]',
        llama_server="crash_loop_deaths = 3",
    )
    with harness.serving(config) as running:
        open_page(page, running)
        wait_row(page, "chat", "ready")
        wait_row(page, "lazy", "stopped")
        # no GPU on this machine: host RAM is drawn as a GPU would be, with the running model in it
        page.wait_for_selector('[data-device="host"] .seg[data-model="chat"]')
        assert "Host RAM" in page.inner_text('[data-device="host"]')

        # without the key, an admin action is refused, and says so
        result = click_action(page, "load", "lazy")
        assert page.get_attribute("#action-result", "data-result") == "refused"
        assert "load lazy: refused" in result and "401" in result, result
        assert running.model("lazy")["state"] == "stopped"
        screenshot(page, tmp_path, "action-refused")

        use_key(page, ADMIN_KEY)
        result = click_action(page, "load", "lazy")
        assert page.get_attribute("#action-result", "data-result") == "ok", result
        assert result == "load lazy: done (now ready)"
        wait_row(page, "lazy", "ready")
        assert seen_states(page, "lazy") == ["stopped", "starting", "ready"]  # loading was shown
        assert page.inner_text('#models tr[data-model="lazy"] [data-field=load_seconds]').endswith(" s")

        result = click_action(page, "load", "broken")
        assert "load broken: refused" in result and "crash loop" in result, result
        wait_row(page, "broken", "failed")
        assert "crash loop: 3 deaths" in page.inner_text('#models tr[data-model="broken"] [data-field=last_error]')
        assert "invalid argument: --no-such-flag" in running.model("broken")["last_error"]
        assert "backoff" in seen_states(page, "broken")  # the restarts were shown, with the next try
        assert page.inner_text("#overall") == "degraded"
        page.select_option("#log-model", "broken")  # what the failed server printed
        wait_js(page, "() => document.querySelector('#log-lines').textContent.includes('invalid argument: --no-such-flag')")
        screenshot(page, tmp_path, "crash-loop-failed")

        result = click_action(page, "reset", "broken")
        assert result == "reset broken: done (now stopped)", result
        wait_row(page, "broken", "stopped")
        assert page.inner_text("#overall") == "ok"
        assert page.evaluate("window.pageLoads") == 1  # every change came without a reload


def test_the_log_pane_shows_a_new_line_of_the_child_within_a_second(
    tmp_path: Path, tiny_model: Path, llama_server: Path, page: Any
) -> None:
    harness = Harness.create(tmp_path / "service", tiny_model, binary=llama_server)
    config = harness.write_config({"chat": {}})
    with harness.serving(config) as running:
        open_page(page, running)
        wait_js(page, "() => document.querySelector('#log-lines').dataset.model === 'chat'")
        wait_js(page, "() => document.querySelector('#log-lines').textContent.includes('listening on')")
        ring = running.service.runtime.log("chat")
        assert ring is not None
        before = ring.last_number

        reply = running.chat("chat", max_tokens=2, messages=[{"role": "user", "content": "Hello"}])
        assert reply.status_code == 200
        wait_for(lambda: ring.last_number > before, 10, "a new line from the child")
        printed = time.monotonic()
        _, lines = running.portal.call(ring.lines_after, before)
        newest = lines[-1]
        wait_js(page, "(line) => document.querySelector('#log-lines').textContent.includes(line)", newest, timeout=1.0)
        shown_after = time.monotonic() - printed
        assert shown_after < 1.0, shown_after
        screenshot(page, tmp_path, "logs")


def test_the_page_stays_right_across_a_reload_and_a_restart_of_the_service(
    tmp_path: Path, tiny_model: Path, llama_server: Path, page: Any
) -> None:
    harness = Harness.create(tmp_path / "service", tiny_model, binary=llama_server)
    first = {"chat": {}}
    config = harness.write_config(first, proxy=f'admin_api_keys = ["{ADMIN_KEY}"]')
    with harness.serving(config) as running:
        open_page(page, running)
        use_key(page, ADMIN_KEY)
        old_pid = running.model("chat")["pid"]
        harness.write_config({**first, "lazy": {"mode": "on-demand"}}, proxy=f'admin_api_keys = ["{ADMIN_KEY}"]')
        result = click_action(page, "reload")
        assert result.startswith("reload: done") and "start lazy" in result, result
        wait_row(page, "lazy", "stopped")
        page.wait_for_selector('#reload [data-reload="applied"]')

        config.write_text(config.read_text() + "\n[models.oops\n")  # not TOML: refused, nothing changes
        result = click_action(page, "reload")
        assert "reload: refused" in result and "409" in result, result
        page.wait_for_selector('#reload [data-reload="refused"]')
        assert "TOML" in page.inner_text("#reload")
        assert page.query_selector('#models tr[data-model="lazy"]') is not None

    # the service is gone: the page says so and keeps trying
    page.wait_for_selector("#connection[data-connection=reconnecting]")
    screenshot(page, tmp_path, "reconnecting")
    harness.write_config(first, proxy=f'admin_api_keys = ["{ADMIN_KEY}"]')
    with harness.serving(config) as running:
        new_pid = running.model("chat")["pid"]
        assert new_pid != old_pid
        page.wait_for_selector("#connection[data-connection=live]")
        wait_js(
            page, "(pid) => document.querySelector('#models tr[data-model=chat] [data-field=pid]').textContent === String(pid)", new_pid
        )
        page.wait_for_selector('#models tr[data-model="lazy"]', state="detached")  # not in this config
        assert "no reload since the service started" in page.inner_text("#reload")
        assert page.evaluate("window.pageLoads") == 1


def test_a_loading_model_shows_its_elapsed_time_and_progress(tmp_path: Path, tiny_model: Path, page: Any) -> None:
    # The FAKE llama-server: a load that lasts seconds and prints llama.cpp's progress dots.
    harness = Harness.create(tmp_path / "service", tiny_model)
    config = harness.write_config(
        {"chat": {}, "big": {"mode": "on-demand", "env": {"FAKE_LLAMA_LOAD_S": "6", "FAKE_LLAMA_DOTS": "1"}}}
    )
    with harness.serving(config) as running:
        open_page(page, running)
        loading = threading.Thread(
            target=lambda: httpx.post(f"{running.base}/admin/models/big/load", timeout=30), daemon=True
        )
        loading.start()
        wait_row(page, "big", "starting")
        page.wait_for_selector('#models tr[data-model="big"] .progress')
        wait_js(page, "() => parseFloat(document.querySelector('#models tr[data-model=big] [data-since]').textContent) >= 1.5")
        cell = page.inner_text('#models tr[data-model="big"] [data-field=state]')
        assert cell.startswith("loading") and "loading tensors" in cell and "%" in cell, cell
        screenshot(page, tmp_path, "loading")
        loading.join(30)
        wait_row(page, "big", "ready")
