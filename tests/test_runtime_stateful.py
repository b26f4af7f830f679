"""The running service under random interleavings: a Hypothesis state machine drives the real
runtime and proxy (over real sockets, FAKE llama-server children, a fake NVML inventory) through
requests (plain, streamed, cancelled mid-stream), bursts, child crashes (one whose port closes
before its process is gone among them), stopped and hung children, a GPU driver slow to answer, a
/proc slow to read while a child stops,
reloads through /admin/reload (no-op, a changed ctx, a changed limit, a model added or removed,
another llama-server binary with settings that apply only later, invalid TOML, a plan that does
not fit, a broken GGUF, an unreadable key file) and saves that
`--watch` must notice (a changed ctx, a model added or removed as a file its include glob matches,
invalid TOML), idle-TTL expiry, admin load/unload/reset and the memory pressure of on-demand models
that evict each other.

After every step it checks what the service promises:
- memory: the GPU bytes of every live child process stay within the GPU's usable bytes (read from
  /proc and the plan, so it holds of the processes, not of the bookkeeping); where the runtime has
  a ledger, each live child holds exactly one reservation and each reservation a child that is
  starting, ready or stopping;
- admission: a child never sees more requests at once than its model's limit at the time;
- every request is answered, in time, with success or a documented error; a 502 or a cut stream
  only for a request whose child was crashed, stopped or hung while it ran;
- a reload is applied exactly when the new config is valid and fits; a refused one restarts nothing
  and leaves the running plan as it was; a new binary runs every ready resident, and settings
  that wait for a later start are named in last_reload; every settled save is reloaded once by the watcher, and
  recorded as refused when it does not parse;
- the service's own routes answer while NVML or /proc is slow (both are read off the event loop);
- at the end, the stop's drain closes an idle keep-alive connection instead of serving it;
- a saved prompt cache (keep_cache) is restored only into a child of the launch that saved it.

The examples and steps are few enough for CI (STATEFUL_EXAMPLES raises them) and derandomized, so a
run is reproducible; each example is a whole service, started and stopped. Each kind of broken
promise raises its own exception type, so Hypothesis shrinks and reports each kind on its own;
STATEFUL_IGNORE=kind,kind leaves kinds unchecked (to look for the next kind of bug once one is known).
The checks after each step record what they find and the example fails at its end: every run of an
example then draws the same steps, which Hypothesis needs to replay and shrink it.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from llama_smart_proxy.schemas.config import Config, LlamaServerSettings
from llama_smart_proxy.supervisor.children import process_group
from llama_smart_proxy.supervisor.service.tinymodel import write_tiny_model
from tests.fakes.fake_pynvml import FakeNvml, gpu
from tests.fakes.supervision import pid_alive
from tests.service_harness import Harness, Running

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("STATEFUL_EXAMPLES", "10"))
STEPS = int(os.environ.get("STATEFUL_STEPS", "25"))
QUEUE_TIMEOUT_S = 12.0
REQUEST_DEADLINE_S = QUEUE_TIMEOUT_S + 8.0
"""No request may take longer: waits are bounded by queue_timeout, and a hung child is noticed in
about a second."""
SLOW_DRIVER_S = 0.6
SLOW_PROC_S = 0.6
"""A probe of the service's routes must answer in half of either: a CI run's own load once made a
/health take 0.18 s, so a margin of 0.15 s over the noise failed runs whose loop never blocked."""
WATCH_NOTICE_S = 8.0
"""A save is polled within 0.25 s, settles in 0.5 s, then its reload may restart c (a cache save)."""
HAS_LIVENESS = "health_interval" in LlamaServerSettings.model_fields
HAS_PROMPT_CACHE = "prompt_cache" in Config.model_fields
"""These two let the test run on older code too, to show which of its bugs it finds."""
MODELS = ("r", "c", "o1", "o2", "x")
GPU_MODELS = ("r", "o1", "o2", "x")
RESIDENTS = ("r", "c", "x")
IGNORED = set(filter(None, os.environ.get("STATEFUL_IGNORE", "").split(",")))


class BrokenPromise(AssertionError):
    """A promise of the running service, broken; one subclass per kind."""


KINDS = (
    "overcommitted",  # live children's GPU bytes beyond the GPU's usable bytes
    "ledger",  # a live child without its reservation, or a reservation without a child
    "over_limit",  # a child held more requests than its model's max_concurrency
    "unanswered",  # a request not answered within its deadline
    "error_undisturbed",  # a 502 or a broken connection for a request whose child we left alone
    "load_timeout",  # a 503 load_timeout: a wait that the service should have ended
    "wrong_status",  # any other answer no documented rule gives
    "reload_unanswered",  # POST /admin/reload got no answer
    "reload_outcome",  # a valid reload refused, an invalid one applied, or last_reload wrong
    "reload_restarted",  # a refused reload restarted a child or changed the running plan
    "watch",  # a save under --watch was not reloaded, or was recorded as the wrong outcome
    "loop_blocked",  # a route waited for a slow GPU driver: something read NVML on the event loop
    "drain_keepalive",  # during the stop's drain, an idle keep-alive connection took a new request
    "admin",  # an admin action answered outside its documented statuses
    "cache_launch",  # a saved prompt cache restored into a child of another launch (its ctx)
)
BROKEN = {kind: type(f"Broken_{kind}", (BrokenPromise,), {}) for kind in KINDS}
RELOADS = ("noop", "ctx", "limit", "toggle_x", "build", "invalid_toml", "no_fit", "broken_gguf", "bad_key_file")
VALID_RELOADS = {"noop", "ctx", "limit", "toggle_x", "build"}
SAVES = ("ctx", "toggle_x", "invalid_toml")


def fake_nvml(total: int) -> FakeNvml:
    return FakeNvml(devices=[gpu(0, total=total, used=0)])


_TINY: dict[str, Path] = {}


def tiny_model() -> Path:
    if "path" not in _TINY:
        _TINY["path"] = write_tiny_model(Path(tempfile.mkdtemp(prefix="stateful-model-")) / "tiny.gguf")
    return _TINY["path"]


def save_atomically(path: Path, text: str) -> None:
    staged = path.with_name(path.name + ".saving")
    staged.write_text(text)
    os.replace(staged, path)


def write_broken_gguf(path: Path) -> None:
    """The tiny model with `llama.block_count` stored as a float32: a header field of the wrong type."""
    data = bytearray(tiny_model().read_bytes())
    key = b"llama.block_count"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF_TYPE_UINT32
    struct.pack_into("<I", data, at, 6)  # GGUF_TYPE_FLOAT32
    path.write_bytes(bytes(data))


@dataclass
class Sent:
    """One request the machine sent, and how it ended."""

    model: str
    kind: str
    started: float
    ended: float | None = None
    status: int | None = None
    code: str | None = None
    error: str | None = None
    configured: bool = True
    judged: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)


@dataclass
class Disturbance:
    """A child we crashed, stopped or hung, and which requests to its model it may fail: a crash,
    those in flight at the kill (later ones wait for the restart); a stopped or hung child, those
    sent before it was noticed and replaced (the service cannot tell it from a slow one sooner)."""

    model: str
    pid: int
    how: str
    since: float
    until: float = math.inf

    def excuses(self, sent: Sent) -> bool:
        if self.model != sent.model:
            return False
        if self.how in ("crash", "slow_crash"):
            return sent.started <= self.since <= (sent.ended or math.inf)
        return self.since <= (sent.ended or math.inf) and sent.started <= self.until


class RuntimeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="stateful-"))
        self.harness = Harness.create(self.directory, tiny_model())
        self.x_present = True
        self.build = 1
        """Which llama-server binary the config names: build 2 is the FAKE one started with
        FAKE_LLAMA_BUILD=2 in its environment, and sets max_connections too."""
        self.ctx = 512
        self.limit = 1
        self.gpu_total = 0
        self.config = self.write_config()
        self.sent: list[Sent] = []
        self.disturbed: list[Disturbance] = []
        self.limits: list[tuple[float, int]] = [(0.0, 1)]
        self.failures: dict[str, list[str]] = {kind: [] for kind in KINDS}
        self.steps: list[str] = []
        """The rules run so far, in order: a failure quotes them (with real processes and real time,
        Hypothesis's own replay of a shrunk example may not fail the same way)."""
        self.stopped_pids: set[int] = set()
        self.need = self.gpu_need()
        # r, x and both on-demand models do not fit together; any three of them do
        self.gpu_total = int(self.need * 3.5)
        self.nvml = fake_nvml(self.gpu_total)
        self.nvml_patch = pytest.MonkeyPatch()
        self.nvml_patch.setitem(sys.modules, "pynvml", self.nvml)
        self._serving = self.harness.serving(self.config, watch=True)
        self.running: Running = self._serving.__enter__()
        self.usable = self.running.status()["plan"]["gpus"][0]["usable_bytes"]
        self.loop_thread = self.running.portal.call(threading.get_ident)

    # ---- config

    def gpu_need(self) -> int:
        from llama_smart_proxy.supervisor.planning.prepare import Source, prepare

        probe = self.harness.write_inventory([80 * 1024**3], name="probe.json")
        plan = prepare(Source(self.config, inventory_path=probe)).plan
        return plan.model("r").estimate.gpus[0].total_bytes

    def write_config(self, variant: str = "noop") -> Path:
        quick = (
            'health_interval = "100ms"\nhealth_timeout = "500ms"\nhealth_failures = 3\nstall_timeout = "2s"\n'
            if HAS_LIVENESS
            else ""
        )
        models: dict[str, dict] = {
            "r": {"max_concurrency": 2},
            # c, o1 and o2 keep their prompt caches: saved at every planned stop (a ctx reload,
            # eviction, idle TTL, unload), restored at the next start when the launch matches
            "c": {"gpus": [], "ctx": self.ctx, "keep_cache": True},
            "o1": {"mode": "on-demand", "max_concurrency": self.limit, "env": {"FAKE_LLAMA_IGNORE_SIGTERM": "1"}, "keep_cache": True},
            "o2": {"mode": "on-demand", "idle_ttl": "1s", "env": {"FAKE_LLAMA_IGNORE_SIGTERM": "1"}, "keep_cache": True},
        }
        if not HAS_PROMPT_CACHE:
            models = {name: {k: v for k, v in table.items() if k != "keep_cache"} for name, table in models.items()}
        proxy = f'queue_timeout = "{QUEUE_TIMEOUT_S:g}s"\nfirst_byte_timeout = "60s"'
        if self.build == 2:
            proxy += "\nmax_connections = 300"
        if variant == "no_fit":
            models["r"] = {**models["r"], "allow_cpu": False, "allow_partial": False}
        if variant == "broken_gguf":
            write_broken_gguf(self.harness.model_file("bad"))
            models["bad"] = {"gpus": []}
        if variant == "bad_key_file":
            # the file exists (so the config's own check passes) but is no UTF-8 text: only reading
            # it finds that, and a reload must do so before it applies anything
            unreadable = self.directory / "keys-not-utf8.txt"
            unreadable.write_bytes(b"\xff\xfe key\n")
            models["c"] = {**models["c"], "ctx": 2048}
            proxy += f'\napi_keys_file = "{unreadable}"'
        draft = self.harness.write_config(
            models,
            name="config.draft.toml",
            proxy=proxy,
            llama_server=quick + "crash_loop_deaths = 50",
            gpus="allow = [0]",
            **({"prompt_cache": f'dir = "{self.directory / "cache"}"\ndisk_reserve = "0"'} if HAS_PROMPT_CACHE else {}),
        )
        text = draft.read_text().replace('stop_grace = "2s"', 'stop_grace = "600ms"')  # quicker evictions
        if self.build == 2:
            build_2 = self.directory / "fake-llama-server-2"
            build_2.write_text(f"#!/bin/sh\nFAKE_LLAMA_BUILD=2 exec {self.harness.fake_binary} \"$@\"\n")
            build_2.chmod(0o755)
            text = text.replace(f'binary = "{self.harness.fake_binary}"', f'binary = "{build_2}"')
        # x comes and goes as a file of its own that the include glob matches, as conf.d files do
        included = self.directory / "conf.d"
        included.mkdir(exist_ok=True)
        text = f'include = ["{included}/*.toml"]\n' + text
        x_file = included / "x.toml"
        if self.x_present:
            save_atomically(x_file, f'[models.x]\nfile = "{self.harness.model_file("x")}"\n')
        else:
            x_file.unlink(missing_ok=True)
        if variant == "invalid_toml":
            text += "\n[models.broken\n"
        # every save is an editor's atomic rename: --watch must never read a file half written
        # (a write in place that it reads between truncating and writing is recorded as "empty")
        path = self.directory / "config.toml"
        save_atomically(path, text)
        self.written = time.monotonic()
        return path

    # ---- what the machine observes

    def pids(self) -> dict[str, int | None]:
        return {m["name"]: m["pid"] for m in self.running.status()["models"]}

    def restarts(self) -> dict[str, int]:
        """Model name -> restarts through the crash path (a death, a wedge, a failed load)."""
        return {m["name"]: m["restarts"] for m in self.running.status()["models"]}

    def live_children(self) -> dict[str, list[int]]:
        """Model name -> pids of live FAKE llama-server processes serving it, from /proc."""
        found: dict[str, list[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not any(a.endswith(b"fake_llama_server.py") for a in argv) or b"-m" not in argv:
                continue
            model_file = Path(argv[argv.index(b"-m") + 1].decode())
            if model_file.parent == self.directory and pid_alive(int(name)):
                found.setdefault(model_file.stem, []).append(int(name))
        return found

    def model_pid(self, model: str) -> int | None:
        status = {m["name"]: m for m in self.running.status()["models"]}
        entry = status.get(model)
        return entry["pid"] if entry and entry["state"] == "ready" else None

    # ---- rules: requests

    def send(self, model: str, kind: str) -> None:
        sent = Sent(model, kind, time.monotonic(), configured=model != "x" or self.x_present)
        body: dict = {"model": model, "messages": []}
        if kind == "hang":
            body["fake"] = {"hang": True}
        elif kind != "plain":
            body |= {"stream": True, "fake": {"chunks": 6, "interval_ms": 60}}

        def run() -> None:
            try:
                with httpx.Client(timeout=REQUEST_DEADLINE_S + 1) as client:
                    if kind == "cancel":
                        with client.stream("POST", f"{self.running.base}/v1/chat/completions", json=body) as response:
                            sent.status = response.status_code
                            if response.status_code != 200:  # an error has no stream to leave: read its code
                                response.read()
                                sent.code = str(response.json().get("error", {}).get("code"))
                            else:
                                for _ in response.iter_raw():
                                    break  # the client goes away mid-stream
                    else:
                        response = client.post(f"{self.running.base}/v1/chat/completions", json=body)
                        sent.status = response.status_code
                        if response.status_code != 200:
                            sent.code = str(response.json().get("error", {}).get("code"))
                        elif kind == "stream" and not response.text.rstrip().endswith("data: [DONE]"):
                            sent.error = "stream cut short"
            except httpx.HTTPError as exc:
                sent.error = f"{type(exc).__name__}: {exc}"
            finally:
                sent.ended = time.monotonic()

        sent.thread = threading.Thread(target=run, daemon=True)
        self.sent.append(sent)
        sent.thread.start()

    @rule(model=st.sampled_from(MODELS), kind=st.sampled_from(("plain", "stream", "cancel")))
    def request(self, model: str, kind: str) -> None:
        self.steps.append(f"request({model!r}, {kind!r})")
        self.send(model, kind)
        time.sleep(0.05)

    @rule(models=st.lists(st.sampled_from(MODELS), min_size=2, max_size=4))
    def burst(self, models: list[str]) -> None:
        self.steps.append(f"burst({models!r})")
        for model in models:
            self.send(model, "plain")
        time.sleep(0.1)

    # ---- rules: faults

    def disturb(self, model: str, how: str, settle_s: float = 0.05) -> None:
        pid = self.model_pid(model)
        if pid is None:
            return
        self.disturbed.append(Disturbance(model, pid, how, time.monotonic()))
        try:
            if how == "crash":
                os.kill(pid, signal.SIGKILL)
            elif how == "slow_crash":  # its port closes at once, the process exits 0.1 s later
                os.kill(pid, signal.SIGUSR1)
            elif how == "stop":
                self.stopped_pids.add(pid)
                os.kill(pid, signal.SIGSTOP)
            else:  # hang its inference loop
                self.send(model, "hang")
        except ProcessLookupError:
            pass  # it ended between the status read and the signal (the service stopped it)
        time.sleep(settle_s)

    @rule(model=st.sampled_from(MODELS))
    def crash(self, model: str) -> None:
        self.steps.append(f"crash({model!r})")
        self.disturb(model, "crash")

    @rule(
        model=st.sampled_from(MODELS),
        kind=st.sampled_from(("plain", "stream")),
        how=st.sampled_from(("crash", "slow_crash")),
    )
    def request_as_its_child_dies(self, model: str, kind: str, how: str) -> None:
        # sent the moment the child is killed, before the service can have noticed: it must wait
        # for the restart, not get the dead port's "connection refused"
        self.steps.append(f"request_as_its_child_dies({model!r}, {kind!r}, {how!r})")
        self.disturb(model, how, settle_s=0)
        self.send(model, kind)
        time.sleep(0.05)

    @rule(model=st.sampled_from(MODELS), how=st.sampled_from(("stop", "hang")))
    def wedge(self, model: str, how: str) -> None:
        self.steps.append(f"wedge({model!r}, {how!r})")
        self.disturb(model, how)

    # ---- rules: reloads, time, admin

    def change(self, variant: str) -> None:
        """The state a valid reload or save of `variant` moves to (the others change no state)."""
        if variant == "ctx":
            self.ctx = 1024 if self.ctx == 512 else 512
        elif variant == "limit":
            self.limit = 2 if self.limit == 1 else 1
        elif variant == "toggle_x":
            self.x_present = not self.x_present
        elif variant == "build":
            self.build = 3 - self.build

    @rule(variant=st.sampled_from(RELOADS))
    def reload(self, variant: str) -> None:
        self.steps.append(f"reload({variant!r})")
        before, restarts_before = self.pids(), self.restarts()
        plan_before = self.running.status()["plan"]
        self.change(variant)
        if variant == "no_fit":
            self.nvml.devices[0] = gpu(0, total=64 * 1024**2, used=0)  # the GPU "shrank"
        self.write_config(variant)
        started = time.monotonic()
        try:
            answer = httpx.post(f"{self.running.base}/admin/reload", timeout=60)
            took = time.monotonic() - started
        except httpx.HTTPError as exc:
            self.failures["reload_unanswered"].append(f"reload {variant}: no answer ({type(exc).__name__}: {exc})")
            return
        finally:
            if variant == "no_fit":
                self.nvml.devices[0] = gpu(0, total=self.gpu_total, used=0)
            self.write_config()  # the next reload starts from a good file
        if variant == "limit":
            # while the reload runs either limit may be the one in force
            self.limits += [(started, max(self.limit, 3 - self.limit)), (time.monotonic(), self.limit)]
        expected_ok = variant in VALID_RELOADS
        if (answer.status_code == 200) != expected_ok:
            self.failures["reload_outcome"].append(f"reload {variant}: answered {answer.status_code} {answer.text[:300]}")
        last = self.running.status()["last_reload"]
        # a reload slower than the watcher's settling (0.5 s) lets --watch reload the same save
        # too (a refused one: the file is put right only after the answer), and its outcome may
        # be the one recorded
        watcher_too = took > 0.5
        if last is None or (last["ok"] != expected_ok and not watcher_too):
            self.failures["reload_outcome"].append(f"reload {variant}: last_reload says {last}")
        if variant == "build" and answer.status_code == 200:
            self.check_build(last)
        if not expected_ok and answer.status_code != 200 and not watcher_too:  # (an accepted one: reload_outcome)
            after, restarts_after = self.pids(), self.restarts()
            # residents only: an on-demand model may be evicted and started again by its requests;
            # and not through the crash path, which may replace a child (one whose new start lost
            # its port, say) while a reload is refused
            restarted = [
                m for m, pid in before.items()
                if m in RESIDENTS and pid is not None and after.get(m) not in (pid, None)
                and restarts_after.get(m) == restarts_before.get(m) and not self._was_disturbed(m, started)
            ]  # fmt: skip
            if restarted:
                self.failures["reload_restarted"].append(f"refused reload {variant} restarted {restarted}")
            if self.running.status()["plan"] != plan_before:
                self.failures["reload_restarted"].append(f"refused reload {variant} changed the running plan")

    @rule(variant=st.sampled_from(SAVES))
    def save(self, variant: str) -> None:
        """Edit the files as a person would and leave the reload to --watch."""
        self.steps.append(f"save({variant!r})")
        # a write of the last step (an /admin/reload's) has been polled and settled by now
        time.sleep(max(0.0, self.written + 1.0 - time.monotonic()))
        before = self.running.status()["last_reload"]
        self.change(variant)
        self.write_config(variant)
        deadline = time.monotonic() + WATCH_NOTICE_S
        while (last := self.running.status()["last_reload"]) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        if variant == "invalid_toml":
            self.write_config()  # fixed again: the running config's own bytes, which reload nothing
        if last == before:
            self.failures["watch"].append(f"save {variant}: --watch did not reload it within {WATCH_NOTICE_S:g} s")
        elif last["ok"] != (variant != "invalid_toml"):
            self.failures["watch"].append(f"save {variant}: last_reload says {last}")

    def check_build(self, last: dict | None) -> None:
        """After a reload to the other binary: max_connections is named as waiting for the next
        start, and every ready resident runs the new binary (restarted with it)."""
        if last is None or not any("max_connections" in line for line in last.get("deferred", [])):
            self.failures["reload_outcome"].append(f"reload build: max_connections changed, last_reload says {last}")
        deadline = time.monotonic() + 5
        while True:
            stale = [m for m in RESIDENTS if (pid := self.model_pid(m)) is not None and self.child_build(pid) != self.build]
            if not stale or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if stale:
            self.failures["reload_outcome"].append(f"reload build: {stale} still run the old llama-server binary")

    @staticmethod
    def child_build(pid: int) -> int | None:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return None
        return 2 if b"FAKE_LLAMA_BUILD=2" in environ else 1

    @rule(seconds=st.sampled_from((0.3, 1.3)))
    def wait(self, seconds: float) -> None:
        self.steps.append(f"wait({seconds})")
        time.sleep(seconds)  # 1.3 s lets o2's idle_ttl (1 s) expire

    @rule()
    def slow_gpu_driver(self) -> None:
        """NVML takes its time to answer; the service's own routes must not wait for it."""
        self.steps.append("slow_gpu_driver()")
        self.nvml.memory_info_delay_s = SLOW_DRIVER_S
        self.nvml.slow_reads_on.clear()
        try:
            # two rounds more than a second apart: a reading cached for up to a second expires
            for round_ in range(2):
                if round_:
                    time.sleep(1.05)
                for path in ("/health", "/status", "/v1/models"):
                    self.answers_at_once(path, SLOW_DRIVER_S / 2, f"while each NVML read took {SLOW_DRIVER_S} s")
        finally:
            self.nvml.memory_info_delay_s = 0.0
        if self.loop_thread in self.nvml.slow_reads_on:
            self.failures["loop_blocked"].append(f"an NVML read that took {SLOW_DRIVER_S} s ran on the event loop")

    @rule(model=st.sampled_from(("o1", "o2")))
    def unload_with_a_slow_proc(self, model: str) -> None:
        """Stopping a child looks for its group's members in every /proc entry, which a busy host
        makes slow; the service's own routes must not wait for it."""
        self.steps.append(f"unload_with_a_slow_proc({model!r})")
        if self.model_pid(model) is None:
            return
        scan = process_group.group_has_live_members

        def slow_scan(pgid: int) -> bool:
            if threading.get_ident() == self.loop_thread:
                self.failures["loop_blocked"].append(f"a /proc scan for {model}'s stop ran on the event loop")
            time.sleep(SLOW_PROC_S)
            return scan(pgid)

        patch = pytest.MonkeyPatch()
        patch.setattr(process_group, "group_has_live_members", slow_scan)
        try:
            unload = threading.Thread(
                target=lambda: httpx.post(f"{self.running.base}/admin/models/{model}/unload", timeout=REQUEST_DEADLINE_S),
                daemon=True,
            )
            unload.start()
            why = f"while {model} stopped and each /proc scan took {SLOW_PROC_S} s"
            while unload.is_alive() and self.answers_at_once("/health", SLOW_PROC_S / 2, why):
                time.sleep(0.05)
            unload.join(REQUEST_DEADLINE_S)
        finally:
            patch.undo()

    def answers_at_once(self, path: str, limit_s: float, why: str) -> bool:
        """GET `path` within `limit_s`; else a loop_blocked failure (`why`: what was slow meanwhile)."""
        started = time.monotonic()
        try:
            httpx.get(f"{self.running.base}{path}", timeout=REQUEST_DEADLINE_S)
        except httpx.HTTPError as exc:
            self.failures["loop_blocked"].append(f"GET {path} {why}: {type(exc).__name__}")
            return False
        took = time.monotonic() - started
        if took > limit_s:
            self.failures["loop_blocked"].append(f"GET {path} took {took:.2f} s {why}")
            return False
        return True

    @rule(action=st.sampled_from(("load", "unload", "reset")), model=st.sampled_from(MODELS))
    def admin(self, action: str, model: str) -> None:
        self.steps.append(f"admin({action!r}, {model!r})")
        try:
            answer = httpx.post(f"{self.running.base}/admin/models/{model}/{action}", timeout=REQUEST_DEADLINE_S)
        except httpx.HTTPError as exc:
            self.failures["admin"].append(f"admin {action} {model}: no answer ({type(exc).__name__})")
            return
        allowed = {200, 404} if model == "x" else {200}
        if action == "load":
            allowed |= {409, 503}  # a failed model, no memory or not ready in time: said so
        if answer.status_code not in allowed:
            self.failures["admin"].append(f"admin {action} {model}: {answer.status_code} {answer.text[:200]}")

    # ---- invariants

    @invariant()
    def memory_is_never_overcommitted(self) -> None:
        live = self.live_children()
        for model, pids in live.items():
            if len(pids) > 1:
                self.failures["overcommitted"].append(f"{model} has {len(pids)} live children at once: {pids}")
        used = sum(self.need for model in live if model in GPU_MODELS)
        if used > self.usable:
            self.failures["overcommitted"].append(
                f"GPU 0 overcommitted: live children {sorted(live)} need {used} bytes, {self.usable} usable"
            )
        ledger = getattr(self.running.service.runtime, "ledger", None)
        if ledger is not None:
            problem = self.running.portal.call(lambda: ledger_problem(self.running.service.runtime))
            if problem:
                self.failures["ledger"].append(problem)

    @invariant()
    def answered_requests_were_answered_as_documented(self) -> None:
        self.close_disturbances()
        for sent in self.sent:
            if sent.ended is not None and not sent.judged:
                sent.judged = True
                verdict = self.judge(sent)
                if verdict:
                    self.failures[verdict[0]].append(verdict[1])
            elif sent.ended is None and time.monotonic() - sent.started > REQUEST_DEADLINE_S and not sent.judged:
                sent.judged = True
                self.failures["unanswered"].append(f"{sent} has not been answered in {REQUEST_DEADLINE_S} s")

    def close_disturbances(self) -> None:
        now = time.monotonic()
        pids = self.pids()
        for d in self.disturbed:
            if d.until == math.inf and pids.get(d.model) not in (d.pid,):
                d.until = now

    def _was_disturbed(self, model: str, since: float) -> bool:
        return any(d.model == model and d.until >= since for d in self.disturbed)

    def judge(self, sent: Sent) -> tuple[str, str] | None:
        """(kind, what) of the promise this request's ending broke, or None."""
        if sent.kind == "hang":
            return None  # the request that wedged its child: any end is fine
        disturbed = any(d.excuses(sent) for d in self.disturbed)
        took = f"after {(sent.ended or 0) - sent.started:.2f} s"
        if sent.ended is not None and sent.ended - sent.started >= REQUEST_DEADLINE_S:
            return "unanswered", f"{sent.model} {sent.kind}: no answer within {REQUEST_DEADLINE_S:g} s ({sent.error})"
        if sent.error is not None:
            if sent.kind == "cancel" or disturbed:
                return None
            return "error_undisturbed", f"{sent.model} {sent.kind}: {sent.error} {took}"
        if sent.status == 200:
            return None
        if sent.status == 404 and sent.model == "x":
            return None  # x is not always configured
        if sent.status == 503 and sent.code in ("stopping", "failed", "no_memory"):
            return None
        if sent.status == 502:
            return None if disturbed else ("error_undisturbed", f"{sent.model} {sent.kind}: 502 ({sent.code}) {took}")
        if sent.status == 503 and sent.code == "load_timeout":
            return "load_timeout", f"{sent.model} {sent.kind}: 503 load_timeout {took}"
        return "wrong_status", f"{sent.model} {sent.kind}: answered {sent.status} ({sent.code}) {took}"

    def stop_with_a_keepalive_connection_open(self) -> None:
        """The service's stop, as SIGTERM begins it, with a stream in flight (so that the drain
        lasts) and an idle keep-alive connection: that connection must be closed, not take a new
        request. Skipped when no model is ready to stream (the example left them all down)."""
        ready = [m["name"] for m in self.running.status()["models"] if m["state"] == "ready"]
        if not ready:
            return
        host, port = self.running.base.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as idle, socket.create_connection((host, int(port)), timeout=5) as busy:
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            if not idle.recv(65536).startswith(b"HTTP/1.1 "):
                return
            body = b'{"model": "%s", "messages": [], "stream": true, "fake": {"chunks": 10, "interval_ms": 100}}' % ready[0].encode()
            busy.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            try:
                if b"data:" not in busy.recv(65536):
                    return  # an error, or a comment while it loads: no stream to hold the drain open
            except TimeoutError:
                return
            self.running.portal.call(self.running.service.stop_requested.set)
            time.sleep(0.1)
            try:
                idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = idle.recv(65536)
            except (ConnectionError, TimeoutError):
                answer = b""
            if answer:
                self.failures["drain_keepalive"].append(f"an idle keep-alive connection was answered during the drain: {answer[:60]!r}")

    def check(self, *kinds: str) -> None:
        for kind in kinds:
            if self.failures[kind] and kind not in IGNORED:
                raise BROKEN[kind]("\n".join([*self.failures[kind], "after the steps: " + "; ".join(self.steps)]))

    def check_limits(self) -> None:
        """Requests to o1 its children saw at once, against o1's limit when each began."""
        events = self.harness.events()
        model_of = {e["pid"]: Path(e["argv"][e["argv"].index("-m") + 1]).stem for e in events if e["event"] == "start"}
        spans: dict[tuple[int, int], list[float]] = {}
        for e in events:
            if e["event"] == "request" and model_of.get(e["pid"]) == "o1":
                spans[(e["pid"], e["id"])] = [e["t"], math.inf]
            elif e["event"] in ("done", "aborted", "disconnect") and (e["pid"], e.get("id")) in spans:
                spans[(e["pid"], e["id"])][1] = e["t"]
        # A child that was killed (by us, by a drain's deadline, by a liveness verdict) records no
        # end for what it held; o1's next child starts only once it is reaped (the same memory),
        # so by then its requests had ended. (Our own record of a kill, `until`, is taken when a
        # step next looks, which may be after the next child took requests.)
        o1_starts = sorted((e["t"], e["pid"]) for e in events if e["event"] == "start" and model_of.get(e["pid"]) == "o1")
        for (pid, _), span in spans.items():
            if span[1] == math.inf:
                killed = min((d.until for d in self.disturbed if d.pid == pid), default=math.inf)
                span[1] = min(killed, next((t for t, other in o1_starts if other != pid and t > span[0]), math.inf))
        for start, _ in spans.values():
            limit = [lim for since, lim in sorted(self.limits) if since <= start][-1]
            running = sum(1 for s, end in spans.values() if s <= start < end)
            if running > limit:
                self.failures["over_limit"].append(f"o1's child held {running} requests at once under max_concurrency = {limit}")

    def check_cache_launches(self) -> None:
        for e in self.harness.events("slot_restore"):
            if e["saved_ctx"] != e["ctx"]:
                self.failures["cache_launch"].append(f"a slot saved at ctx {e['saved_ctx']} restored into ctx {e['ctx']}")

    def teardown(self) -> None:
        try:
            deadline = time.monotonic() + REQUEST_DEADLINE_S
            for sent in self.sent:
                if sent.thread is not None:
                    sent.thread.join(max(0.0, deadline - time.monotonic()))
            for pid in self.stopped_pids:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGCONT)
            self.answered_requests_were_answered_as_documented()
            self.check_limits()
            self.check_cache_launches()
            self.stop_with_a_keepalive_connection_open()
        finally:
            try:
                self._serving.__exit__(None, None, None)
            finally:
                self.nvml_patch.undo()
                shutil.rmtree(self.directory, ignore_errors=True)
        self.check(*KINDS)


def ledger_problem(runtime) -> str | None:
    """In the event loop, at one instant: each live child holds exactly one reservation, and each
    reservation belongs to a child that is starting, ready or stopping."""
    entries = runtime._all_entries()
    held = {id(r): r for r in runtime.ledger.reservations()}
    for entry in entries:
        child = entry.child
        if child is None:
            continue
        alive = child.pid is not None and pid_alive(child.pid)
        if alive and not entry.holds_memory():
            return f"{entry.name}: live child pid {child.pid} holds no reservation"
        if entry.holds_memory():
            if id(entry.reservation) not in held:
                return f"{entry.name}: its reservation is not in the ledger"
            if child.state.value not in ("starting", "ready", "stopping"):
                return f"{entry.name}: holds a reservation while {child.state.value}"
    owners = [e.reservation for e in entries if e.holds_memory()]
    if len(owners) != len(held):
        return f"{len(held)} reservations in the ledger, {len(owners)} held by children"
    for gpu_index, reserved in runtime.ledger.reserved_by_gpu().items():
        if reserved > runtime.ledger.usable_by_gpu.get(gpu_index, 0):
            return f"GPU {gpu_index}: {reserved} reserved > {runtime.ledger.usable_by_gpu.get(gpu_index)} usable"
    return None


RuntimeMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
test_the_runtime_keeps_its_promises_under_random_interleavings = RuntimeMachine.TestCase
