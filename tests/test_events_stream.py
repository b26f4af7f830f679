"""GET /events, GET /logs/<model> and the loading notes of streaming requests, over real sockets
and FAKE llama-server children (tests/fakes/): what the status page and other tools read."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for
from tests.service_harness import Harness, Running


@pytest.fixture
def harness(tmp_path: Path, tiny_model: Path) -> Harness:
    return Harness.create(tmp_path, tiny_model)


@dataclass
class SseEvent:
    kind: str
    data: Any
    id: str | None


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent | str]:
    """Events, and comments as their text (": x" gives "x"), from a stream's lines."""
    kind, data, event_id = "message", [], None
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                yield SseEvent(kind, text if text == "[DONE]" else json.loads(text), event_id)
            kind, data, event_id = "message", [], None
        elif line.startswith(":"):
            yield line[1:].strip()
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "event":
                kind = value
            elif name == "id":
                event_id = value


@dataclass
class Subscriber:
    """One /events reader in a thread, collecting events until told to stop."""

    base: str
    headers: dict[str, str] = field(default_factory=dict)
    events: list[SseEvent] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def start(self) -> Subscriber:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.events or self.error, 10, "the snapshot")
        assert self.error is None, self.error
        return self

    def _run(self) -> None:
        try:
            with httpx.stream("GET", f"{self.base}/events", headers=self.headers, timeout=30) as response:
                self.response = response
                assert response.status_code == 200, response.read()
                assert response.headers["content-type"].startswith("text/event-stream")
                for item in parse_sse(response.iter_lines()):
                    if isinstance(item, SseEvent):
                        self.events.append(item)
                    if self.stop.is_set():
                        return
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            if not self.stop.is_set():
                self.error = exc

    def states(self, model: str, *, after_snapshot: bool = True) -> list[str]:
        """The model's states in the events (after the first one, the snapshot), consecutive
        repeats folded."""
        seen: list[str] = []
        for event in self.events[1 if after_snapshot else 0 :]:
            if event.kind == "model" and event.data["name"] == model and (not seen or seen[-1] != event.data["state"]):
                seen.append(event.data["state"])
        return seen

    def close(self) -> None:
        """Disconnect now, whatever the stream is doing."""
        self.stop.set()
        self.response.close()
        self.thread.join(5)


def number(event: SseEvent) -> int:
    assert event.id is not None
    return int(event.id.rpartition(".")[2])


def admin(running: Running, action: str, model: str) -> httpx.Response:
    return httpx.post(f"{running.base}/admin/models/{model}/{action}", timeout=30)


def test_two_subscribers_get_each_state_change_once_and_in_order(harness: Harness) -> None:
    config = harness.write_config(
        {"tiny": {}, "lazy": {"mode": "on-demand", "env": {"FAKE_LLAMA_LOAD_S": "0.3"}}}
    )
    with harness.serving(config) as running:
        first = Subscriber(running.base).start()
        second = Subscriber(running.base).start()
        assert first.events[0].kind == second.events[0].kind == "snapshot"
        snapshot = first.events[0].data
        assert {m["name"]: m["state"] for m in snapshot["models"]} == {"lazy": "stopped", "tiny": "ready"}
        assert snapshot["models"] == running.status()["models"]  # the same state /status shows

        assert admin(running, "load", "lazy").status_code == 200
        assert admin(running, "unload", "lazy").status_code == 200
        for subscriber in (first, second):
            wait_for(lambda s=subscriber: s.states("lazy")[-1:] == ["stopped"], 10, "lazy stopped")
        first.close()
        second.close()

        for subscriber in (first, second):
            assert subscriber.states("lazy") == ["starting", "ready", "stopping", "stopped"]
            numbers = [number(e) for e in subscriber.events]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # each once, in order
        # both read the same events, from where the later one's snapshot stood
        start = max(number(first.events[0]), number(second.events[0]))
        common = min(number(first.events[-1]), number(second.events[-1]))
        assert [(e.id, e.kind, e.data) for e in first.events[1:] if start < number(e) <= common] == [
            (e.id, e.kind, e.data) for e in second.events[1:] if start < number(e) <= common
        ]


def test_last_event_id_resumes_after_the_changes_it_saw_or_starts_from_a_snapshot(harness: Harness) -> None:
    config = harness.write_config({"tiny": {}, "lazy": {"mode": "on-demand"}})
    with harness.serving(config) as running:
        before = Subscriber(running.base).start()
        before.close()
        last = before.events[-1].id
        assert last is not None
        assert admin(running, "load", "lazy").status_code == 200  # changes while nobody reads

        resumed = Subscriber(running.base, headers={"Last-Event-ID": last}).start()
        wait_for(lambda: "ready" in resumed.states("lazy", after_snapshot=False), 10, "lazy ready in the resumed stream")
        resumed.close()
        assert "snapshot" not in [e.kind for e in resumed.events]  # only what was missed
        assert number(resumed.events[0]) == number(before.events[-1]) + 1

        foreign = Subscriber(running.base, headers={"Last-Event-ID": "0000.1"}).start()  # another run
        foreign.close()
        assert foreign.events[0].kind == "snapshot"
        assert {m["name"]: m["state"] for m in foreign.events[0].data["models"]}["lazy"] == "ready"


def test_a_crash_loop_and_its_reset_reach_the_stream_with_the_reason_and_the_next_retry(harness: Harness) -> None:
    config = harness.write_config({"broken": {"mode": "on-demand", "env": {"FAKE_LLAMA_EXIT_CODE": "3"}}})
    with harness.serving(config) as running:
        events = Subscriber(running.base).start()
        assert admin(running, "load", "broken").status_code == 503
        wait_for(lambda: events.states("broken")[-1:] == ["failed"], 15, "broken failed")
        assert admin(running, "reset", "broken").status_code == 200
        wait_for(lambda: events.states("broken")[-1:] == ["stopped"], 5, "broken reset")
        events.close()
        states = events.states("broken")
        assert states[:2] == ["starting", "backoff"] and states[-2:] == ["failed", "stopped"]
        backoff = next(e.data for e in events.events if e.kind == "model" and e.data["state"] == "backoff")
        assert backoff["retry_at"] > backoff["time"] - 1  # when the next start comes, in unix time
        assert "exited with code 3" in backoff["last_error"]
        failed = next(e.data for e in events.events if e.kind == "model" and e.data["state"] == "failed")
        assert failed["last_error"].startswith("crash loop")


def test_the_log_stream_sends_the_tail_then_each_new_line(harness: Harness) -> None:
    config = harness.write_config({"tiny": {}})
    with harness.serving(config) as running:
        lines: list[str] = []
        done = threading.Event()

        def read() -> None:
            with httpx.stream("GET", f"{running.base}/logs/tiny?tail=1", timeout=30) as response:
                for item in parse_sse(response.iter_lines()):
                    if isinstance(item, SseEvent):
                        assert item.kind == "lines" and item.data["model"] == "tiny"
                        lines.extend(item.data["lines"])
                    if done.is_set():
                        return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: lines, 10, "the tail")
        assert len(lines) == 1  # ?tail=1
        ring = running.service.runtime.log("tiny")
        assert ring is not None
        count = len(lines)
        running.portal.call(lambda: ring.append("a new line from the child"))
        wait_for(lambda: len(lines) > count, 5, "the new line")
        assert lines[-1] == "a new line from the child"
        done.set()
        running.portal.call(lambda: ring.append("wake the reader so it ends"))
        reader.join(5)
        assert httpx.get(f"{running.base}/logs/nobody", timeout=5).status_code == 404


def test_a_stream_to_a_cold_model_gets_loading_notes_and_the_same_data_as_a_warm_one(harness: Harness) -> None:
    config = harness.write_config(
        {"lazy": {"mode": "on-demand", "env": {"FAKE_LLAMA_LOAD_S": "0.6", "FAKE_LLAMA_DOTS": "1"}}},
        proxy='loading_comment_interval = "100ms"',
    )
    body = {"model": "lazy", "messages": [], "stream": True}
    with harness.serving(config) as running:

        def stream() -> tuple[httpx.Response, list[SseEvent | str]]:
            with httpx.stream("POST", f"{running.base}/v1/chat/completions", json=body, timeout=30) as response:
                return response, list(parse_sse(response.iter_lines()))

        cold_response, cold = stream()
        warm_response, warm = stream()
        assert cold_response.status_code == warm_response.status_code == 200
        assert cold_response.headers["content-type"].startswith("text/event-stream")
        notes = [item for item in cold if isinstance(item, str)]
        # the last note may come between the model's readiness and the request's lease: "waiting for"
        assert len(notes) >= 2 and all(n.startswith(("loading lazy ", "waiting for lazy ")) and " s" in n for n in notes), notes
        assert any("%" in n for n in notes), notes  # the fake prints llama.cpp's progress dots
        assert not any(isinstance(item, str) for item in warm)  # a warm model's stream is unchanged

        def data(items: list[SseEvent | str]) -> list[Any]:
            return [(e.data if not isinstance(e.data, dict) else {k: v for k, v in e.data.items() if k != "id"})
                    for e in items if isinstance(e, SseEvent)]  # fmt: skip

        assert data(cold) == data(warm) and data(cold)

        # non-streaming requests never get notes: the answer is the child's JSON, as before
        assert admin(running, "unload", "lazy").status_code == 200
        plain = httpx.post(f"{running.base}/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert plain.status_code == 200 and plain.headers["content-type"].startswith("application/json")
        assert plain.json()["echo"]["model"] == "lazy"


def test_a_model_that_fails_after_notes_ends_the_stream_with_an_error_event(harness: Harness) -> None:
    config = harness.write_config(
        {"broken": {"mode": "on-demand", "env": {"FAKE_LLAMA_EXIT_CODE": "3"}}},
        proxy='loading_comment_interval = "20ms"',
    )
    with harness.serving(config) as running:
        started = time.monotonic()
        with httpx.stream(
            "POST", f"{running.base}/v1/chat/completions", json={"model": "broken", "messages": [], "stream": True}, timeout=30
        ) as response:
            items = list(parse_sse(response.iter_lines()))
        assert response.status_code == 200  # committed by the first note
        assert any(isinstance(i, str) and i.startswith("loading broken") for i in items)
        errors = [i for i in items if isinstance(i, SseEvent)]
        assert len(errors) == 1, items
        assert errors[0].data["error"]["code"] == "failed"
        assert "crash loop" in errors[0].data["error"]["message"]
        assert time.monotonic() - started < 20


def test_the_page_is_served_without_a_key_but_its_data_needs_one(harness: Harness) -> None:
    config = harness.write_config({"tiny": {}}, proxy='api_keys = ["user-key"]')
    with harness.serving(config) as running:
        page = httpx.get(f"{running.base}/ui", timeout=5)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert b"/ui/ui.js" in page.content
        for name, kind in (("ui.js", "text/javascript"), ("ui.css", "text/css")):
            asset = httpx.get(f"{running.base}/ui/{name}", timeout=5)
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert httpx.get(f"{running.base}/ui/../status", timeout=5).status_code == 401
        assert httpx.get(f"{running.base}/events", timeout=5).status_code == 401
        assert httpx.get(f"{running.base}/logs/tiny", timeout=5).status_code == 401
        with httpx.stream(
            "GET", f"{running.base}/events", headers={"Authorization": "Bearer user-key"}, timeout=5
        ) as response:
            assert response.status_code == 200
            first = next(i for i in parse_sse(response.iter_lines()) if isinstance(i, SseEvent))
            assert first.kind == "snapshot"
