"""The pure parts behind /events, /logs and the loading notes, driven directly (no sockets): the
numbered event log, SSE framing, the state diff, the log ring, load progress from llama-server's
output, and the words of a loading note."""

from __future__ import annotations

import json

import anyio
import pytest

from llama_smart_proxy.supervisor.children.load_progress import LoadProgress, describe_step
from llama_smart_proxy.supervisor.children.log_ring import LogRing
from llama_smart_proxy.supervisor.proxy.backends import GpuStatus, HostStatus, ModelState, ModelStatus
from llama_smart_proxy.supervisor.proxy.events import EventLog, Lagged, sse_comment, sse_event
from llama_smart_proxy.supervisor.proxy.loading_notes import describe, error_event, upstream_error_event, wants_stream
from llama_smart_proxy.supervisor.service.state_feed import Reading, StateFeed, changes

# ---- the event log


def test_events_are_numbered_in_order_and_every_reader_reads_the_same_list() -> None:
    log = EventLog(history=10)
    first = log.attach()
    second = log.attach()
    for i in range(5):
        log.publish("model", {"i": i})
    assert [e.number for e in log.after(first)] == [1, 2, 3, 4, 5]
    assert [e.data["i"] for e in log.after(second)] == [0, 1, 2, 3, 4]
    assert [e.number for e in log.after(3)] == [4, 5]
    assert log.after(5) == []


def test_a_reader_behind_the_kept_history_is_told_to_start_over() -> None:
    log = EventLog(history=3)
    for i in range(6):
        log.publish("model", {"i": i})
    assert [e.number for e in log.after(3)] == [4, 5, 6]  # exactly the oldest kept
    with pytest.raises(Lagged):
        log.after(2)


def test_last_event_id_resumes_only_within_this_run_and_the_kept_history() -> None:
    log = EventLog(history=3)
    for i in range(5):
        log.publish("model", {"i": i})
    assert log.resume_point(log.event_id(4)) == 4
    assert log.resume_point(log.event_id(1)) is None  # fell out of the history
    assert log.resume_point("another-run.4") is None  # a restart of the service
    assert log.resume_point(log.event_id(9)) is None  # not given by this run
    assert log.resume_point(None) is None
    assert log.resume_point("garbage") is None


def test_the_first_reader_lets_the_publisher_catch_up() -> None:
    log = EventLog()
    calls = []
    log.on_first_reader = lambda: calls.append(log.has_readers)
    log.attach()
    log.attach()
    assert calls == [False]  # once, before the reader counts
    log.detach()
    log.detach()
    log.attach()
    assert len(calls) == 2


@pytest.mark.anyio
async def test_wait_after_wakes_at_the_next_event() -> None:
    log = EventLog()
    woke = []

    async def reader() -> None:
        await log.wait_after(0)
        woke.append(log.last_number)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.sleep(0.01)
        assert woke == []
        log.publish("model", {})
    assert woke == [1]


def test_sse_events_hold_one_compact_json_line_and_comments_hold_no_newline() -> None:
    frame = sse_event("model", {"name": "a", "last_error": "line 1\nline 2"}, "e.7")
    text = frame.decode()
    assert text.endswith("\n\n")
    lines = text[:-2].split("\n")
    assert lines[0] == "id: e.7" and lines[1] == "event: model"
    assert len(lines) == 3 and json.loads(lines[2][len("data: ") :])["last_error"] == "line 1\nline 2"
    assert sse_comment("loading a\nb") == b": loading a b\n\n"


# ---- the state diff


def status(name: str, state: ModelState = ModelState.READY, **changes_: object) -> ModelStatus:
    return ModelStatus(name=name, state=state, **changes_)  # type: ignore[arg-type]


def gpu(**changes_: object) -> GpuStatus:
    values: dict[str, object] = {"index": 0, "name": "RTX", "uuid": "GPU-0", "total_bytes": 100, "planned_bytes": 10}
    values.update(changes_)
    return GpuStatus(**values)  # type: ignore[arg-type]


def test_changes_name_each_changed_model_then_removed_ones_then_gpus_host_and_reload() -> None:
    before = Reading(models={"a": status("a"), "b": status("b"), "c": status("c")}, gpus=(gpu(),))
    after = Reading(
        models={"a": status("a", ModelState.STOPPING), "b": status("b"), "d": status("d")},
        gpus=(gpu(planned_bytes=20),),
        host=HostStatus(total_bytes=1, reserve_bytes=0, usable_bytes=1),
        reload={"last_reload": {"ok": True}, "reloads": {"ok": 1, "failed": 0}},
    )
    found = changes(before, after)
    assert [kind for kind, _ in found] == ["model", "model", "model_removed", "gpus", "host", "reload"]
    assert found[0][1]["name"] == "a" and found[0][1]["state"] == "stopping"
    assert found[1][1]["name"] == "d"
    assert found[2][1] == {"name": "c"}
    assert found[3][1]["gpus"][0]["planned_bytes"] == 20


def test_an_older_sample_is_no_change_but_a_new_sample_is() -> None:
    before = Reading(models={}, gpus=(gpu(measured_age_s=0.1, measured_at=100.0),))
    assert changes(before, Reading(models={}, gpus=(gpu(measured_age_s=1.5, measured_at=100.0),))) == []
    assert [k for k, _ in changes(before, Reading(models={}, gpus=(gpu(measured_age_s=0.0, measured_at=102.0),)))] == ["gpus"]


def test_the_feed_reads_nothing_without_readers_and_publishes_each_change_once() -> None:
    readings = []
    current = {"a": status("a", ModelState.STOPPED)}

    def read() -> Reading:
        readings.append(1)
        return Reading(models=dict(current))

    feed = StateFeed(read)
    feed.notice()
    assert readings == []  # nobody reads: the hot path pays nothing
    after = feed.events.attach()
    for state in (ModelState.STARTING, ModelState.READY):
        current["a"] = status("a", state)
        feed.notice()
        feed.notice()  # nothing new: nothing published
    published = feed.events.after(after)
    assert [(e.kind, e.data["state"]) for e in published] == [("model", "starting"), ("model", "ready")]
    feed.events.detach()
    current["a"] = status("a", ModelState.STOPPING)
    current["a"] = status("a", ModelState.STOPPED)
    count = len(readings)
    feed.notice()
    assert len(readings) == count
    resumed = feed.events.last_number
    feed.events.attach()  # what changed while nobody read, as one change: the resumed view is right
    assert [(e.kind, e.data["state"]) for e in feed.events.after(resumed)] == [("model", "stopped")]


# ---- the log ring


def test_the_log_ring_numbers_lines_and_says_where_the_kept_ones_start() -> None:
    ring = LogRing(3)
    assert ring.lines_after(0) == (1, [])
    for i in range(1, 6):
        ring.append(f"line {i}")
    assert list(ring) == ["line 3", "line 4", "line 5"]
    assert ring.last_number == 5
    assert ring.lines_after(0) == (3, ["line 3", "line 4", "line 5"])  # 1 and 2 are gone
    assert ring.lines_after(4) == (5, ["line 5"])
    assert ring.lines_after(5) == (6, [])


# ---- load progress


def test_load_phases_from_llama_server_output_at_its_default_verbosity() -> None:
    # llama-server build 11434, without -v (as the supervisor starts it)
    progress = LoadProgress()
    assert progress.step.phase is None
    progress.feed_line("0.00.003.801 I srv  llama_server: initializing ...")
    assert progress.step.phase is None
    progress.feed_line("0.00.005.891 I srv    load_model: loading model '/tmp/tiny.gguf'")
    assert progress.step.phase == "reading the model"
    progress.feed_line("0.00.011.507 I srv    load_model: initializing, n_slots = 1, n_ctx_slot = 512")
    assert progress.step.phase == "initializing slots"
    progress.feed_line("0.00.014.829 I srv  llama_server: model loaded")
    assert describe_step(progress.step) == "loaded"


def test_progress_dots_give_a_fraction_and_phases_never_go_back() -> None:
    progress = LoadProgress()
    progress.feed_line("load_tensors: loading model tensors, this can take a while... (mmap = false)")
    progress.feed_partial(b"." * 45)  # printed without a newline until 100
    assert progress.step.fraction == 0.45
    assert describe_step(progress.step) == "loading tensors 45%"
    progress.feed_partial(b"." * 150)
    assert progress.step.fraction == 1.0
    progress.feed_line("llama_context: constructing llama_context")
    assert describe_step(progress.step) == "creating the context"
    progress.feed_line("load_model: loading model 'x'")  # an earlier marker: no going back
    assert progress.step.phase == "creating the context"


# ---- loading notes


def test_only_a_body_asking_for_a_stream_gets_notes() -> None:
    assert wants_stream(b'{"model": "m", "stream": true}')
    assert not wants_stream(b'{"model": "m", "stream": false}')
    assert not wants_stream(b'{"model": "m"}')
    assert not wants_stream(b'{"model": "m", "messages": [{"content": "\\"stream\\": true"}]}')
    assert not wants_stream(b"not json")


def test_a_note_says_how_long_and_how_far_in_words() -> None:
    now = 1000.0
    loading = status("m", ModelState.STARTING, starting_since=now - 12.34, load_phase="loading tensors", load_progress=0.45)
    assert describe("m", loading, 3.0, now) == "loading m 12.3 s (loading tensors 45%)"
    assert describe("m", status("m", ModelState.STARTING), 2.0, now) == "loading m 2.0 s"
    restarting = status("m", ModelState.BACKOFF, retry_at=now + 1.5)
    assert describe("m", restarting, 4.0, now) == "loading m 4.0 s (restarting after a crash in 1.5 s)"
    assert describe("m", status("m", ModelState.STOPPED), 1.0, now) == "loading m 1.0 s (stopped)"
    assert describe("m", status("m", in_flight=2), 1.0, now) == "waiting for m 1.0 s (queued: 2 requests in flight)"


def test_errors_after_notes_are_data_events_the_openai_sdk_raises_from() -> None:
    event = error_event(503, "model 'm' is unavailable (failed): crash loop", "unavailable_error", "failed")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["message"].startswith("model 'm'")
    passed = upstream_error_event(400, b'{"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}}')
    assert json.loads(passed[6:]) == {"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}}
    assert json.loads(upstream_error_event(500, b"oops")[6:])["error"]["message"] == "oops"
