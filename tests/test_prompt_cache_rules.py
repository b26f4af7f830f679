"""The prompt cache's pure decisions (supervisor/service/prompt_cache_rules.py), driven directly: which
launch a saved slot belongs to, which slots are saved, their predicted size, and the disk budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_smart_proxy.schemas.config import Config
from llama_smart_proxy.schemas.estimate import DeviceMemory, Estimate, EstimateSettings
from llama_smart_proxy.schemas.launch import LaunchSpec
from llama_smart_proxy.schemas.prompt_cache import model_dir_name, FileIdentity
from llama_smart_proxy.supervisor.children.launch import build_command
from llama_smart_proxy.supervisor.service.prompt_cache_rules import (
    HeldSlot,
    Limits,
    SlotToSave,
    cache_identity,
    choose_slots,
    identity_differences,
    make_room,
    predict_slot_bytes,
)

MODEL = FileIdentity(path="/models/m.gguf", size_bytes=1000, mtime_ns=1)
BUILD = [FileIdentity(path="/opt/llama-server", size_bytes=10, mtime_ns=2)]


def launch(**overrides: object) -> LaunchSpec:
    values: dict[str, object] = dict(
        model="m", file="/models/m.gguf", ctx=4096, parallel=2, kv_unified=True, cache_type_k="f16",
        cache_type_v="f16", flash_attn="on", batch=2048, ubatch=512, gpu_layers=0,
        slot_save_path="/cache/m-0123abcd",
    )  # fmt: skip
    values.update(overrides)
    return LaunchSpec(**values)  # type: ignore[arg-type]


def identity(spec: LaunchSpec, model: FileIdentity = MODEL, build: list[FileIdentity] = BUILD):
    return cache_identity(spec, model_file=model, mmproj_file=None, build=build)


# ---- identity


@pytest.mark.parametrize(
    "change, said",
    [
        ({"ctx": 2048}, "ctx 4096 -> 2048"),
        ({"parallel": 4}, "parallel 2 -> 4"),
        ({"kv_unified": False}, "kv_unified True -> False"),
        ({"cache_type_k": "q8_0"}, "cache_type_k f16 -> q8_0"),
        ({"cache_type_v": "q8_0"}, "cache_type_v f16 -> q8_0"),
        ({"flash_attn": "off"}, "flash_attn on -> off"),
        ({"args": ["--lora", "a.gguf"]}, "args [] -> ['--lora', 'a.gguf']"),
        ({"env": {"X": "1"}}, "env {} -> {'X': '1'}"),
    ],
)
def test_a_launch_setting_that_changes_what_the_cache_means_discards_it_and_says_which(change: dict, said: str) -> None:
    saved, now = identity(launch()), identity(launch(**change))
    assert saved != now
    assert identity_differences(saved, now) == [said]


def test_the_model_file_or_the_build_changing_discards_the_cache() -> None:
    replaced = FileIdentity(path="/models/m.gguf", size_bytes=1000, mtime_ns=99)
    assert identity_differences(identity(launch()), identity(launch(), model=replaced)) == [
        "the model file /models/m.gguf (1000 bytes, mtime 1) is now /models/m.gguf (1000 bytes, mtime 99)"
    ]
    rebuilt = [FileIdentity(path="/opt/llama-server", size_bytes=11, mtime_ns=2)]
    assert identity_differences(identity(launch()), identity(launch(), build=rebuilt)) == ["the llama-server build changed"]


def test_placement_and_batch_sizes_keep_the_cache() -> None:
    # llama.cpp writes a slot's state the same from any device; batch sizes do not change the tokens
    moved = launch(gpu_layers=33, devices=["GPU-a", "GPU-b"], tensor_split=[1.0, 1.0], batch=512, ubatch=128)
    assert identity(launch()) == identity(moved)


def test_each_model_has_a_directory_of_its_own_even_when_names_read_alike() -> None:
    names = ["qwen", "a/b", "a_b", "a b", "..", "", "Qwen2.5:7b"]
    dirs = [model_dir_name(n) for n in names]
    assert len(set(dirs)) == len(dirs)
    assert all("/" not in d and d not in (".", "..") and not d.startswith(".") for d in dirs)
    assert model_dir_name("qwen").startswith("qwen-")


def test_the_launch_gives_a_keep_cache_model_its_directory(tmp_path: Path) -> None:
    config = Config.model_validate(
        {"prompt_cache": {"dir": str(tmp_path)}, "models": {"m": {"file": "m.gguf", "keep_cache": True}, "n": {"file": "n.gguf"}}}
    )
    assert config.model_spec("m").keep_cache and not config.model_spec("n").keep_cache
    argv = build_command(launch(slot_save_path=str(tmp_path / "m-x")), binary=Path("/b"), port=1, settings=config.llama_server).argv
    assert argv[argv.index("--slot-save-path") + 1] == str(tmp_path / "m-x")
    assert "--slot-save-path" not in build_command(launch(slot_save_path=None), binary=Path("/b"), port=1, settings=config.llama_server).argv


def test_a_config_built_in_code_with_keep_cache_must_say_where() -> None:
    with pytest.raises(ValueError, match="models.m.keep_cache needs prompt_cache.dir"):
        Config.model_validate({"models": {"m": {"file": "m.gguf", "keep_cache": True}}})


# ---- which slots are saved


def test_idle_slots_holding_tokens_are_saved_most_recent_first_busy_ones_never() -> None:
    slots = [
        {"id": 0, "is_processing": False, "id_task": 7, "n_prompt_tokens": 900, "next_token": [{"n_decoded": 12}]},
        {"id": 1, "is_processing": True, "id_task": 9, "n_prompt_tokens": 50},
        {"id": 2, "is_processing": False},  # never used
        {"id": 3, "is_processing": False, "id_task": 8, "n_prompt_tokens": 100},
        {"id": 4, "is_processing": False},  # restored at start, unused since: /slots shows nothing
        "garbage",
    ]
    choice = choose_slots(slots, restored={4: 500, 2: 0})
    assert choice.save == (SlotToSave(3, 100, 8), SlotToSave(0, 912, 7), SlotToSave(4, 500, -1))
    assert choice.busy == (1,)


def test_an_answer_that_is_not_a_slot_list_saves_nothing() -> None:
    for answer in (None, {"error": "x"}, "text", [{"id": "0"}]):
        assert choose_slots(answer, {}).save == ()


def test_the_predicted_size_is_the_slots_share_of_the_kv_cache_and_errs_large() -> None:
    # the tiny model: 2 layers, 32 K and 32 V values per token per layer, f16: 256 bytes a token
    kv_bytes = 256 * 2048
    estimate = Estimate(
        model="m", architecture="llama", gpu_layers=0, n_layers=2, tensor_split=[], gpus=[],
        settings=EstimateSettings(ctx=2048, n_ctx=2048, parallel=1, kv_unified=True, cache_type_k="f16", cache_type_v="f16",
                                  flash_attn=True, batch=2048, ubatch=512),
        host=DeviceMemory(device="CPU", kv_bytes=kv_bytes),
    )  # fmt: skip
    predicted = predict_slot_bytes(952, estimate)
    assert 259_044 <= predicted <= 2 * 259_044  # llama-server wrote 259 044 bytes for these 952 tokens
    assert predict_slot_bytes(952, None) == 0


# ---- the budget


def held(model: str, slot: int, size: int, saved_at: float, order: int = 0) -> HeldSlot:
    return HeldSlot(model, slot, size, saved_at, order)


LIMITS = Limits(max_bytes=1000, max_bytes_per_model=600, disk_room_bytes=10**9)


def test_a_new_save_replaces_the_models_last_one_and_drops_other_models_oldest_first() -> None:
    on_disk = [held("a", 0, 300, 1.0), held("b", 0, 300, 2.0), held("c", 0, 300, 3.0), held("m", 0, 100, 4.0)]
    incoming = [(SlotToSave(0, 10, 5), 250), (SlotToSave(1, 10, 4), 250)]
    room = make_room(on_disk, incoming, model="m", limits=LIMITS)
    assert room.keep == (SlotToSave(0, 10, 5), SlotToSave(1, 10, 4))
    # 500 incoming + 900 of others > 1000: a and b (the oldest) go, c stays; m's earlier save goes anyway
    assert room.drop == (held("a", 0, 300, 1.0), held("b", 0, 300, 2.0), held("m", 0, 100, 4.0))


def test_a_model_keeps_its_most_recently_used_slots_within_its_own_budget() -> None:
    incoming = [(SlotToSave(2, 10, 9), 300), (SlotToSave(0, 10, 8), 200), (SlotToSave(1, 10, 3), 200)]
    room = make_room([], incoming, model="m", limits=LIMITS)
    assert [s.slot for s in room.keep] == [2, 0] and [s.slot for s in room.left_out] == [1]


def test_the_save_of_a_model_that_is_starting_goes_last() -> None:
    # b starts and evicts m: m's save must not push out b's, which b restores a moment later
    on_disk = [held("b", 0, 500, 1.0), held("c", 0, 300, 2.0)]
    room = make_room(on_disk, [(SlotToSave(0, 1, 1), 400)], model="m", limits=LIMITS, starting=frozenset({"b"}))
    assert room.drop == (held("c", 0, 300, 2.0),) and room.keep == (SlotToSave(0, 1, 1),)
    # m's slot would fit only without b's save: m's is left out, and c's is not dropped for nothing
    room = make_room(on_disk, [(SlotToSave(0, 1, 1), 550)], model="m", limits=LIMITS, starting=frozenset({"b"}))
    assert room.drop == () and room.left_out == (SlotToSave(0, 1, 1),)
    room = make_room(on_disk, [(SlotToSave(0, 1, 1), 550)], model="m", limits=LIMITS)
    assert room.drop == (held("b", 0, 500, 1.0),) and room.keep == (SlotToSave(0, 1, 1),)


def test_the_disk_reserve_limits_a_save_even_under_the_budget() -> None:
    limits = Limits(max_bytes=10**9, max_bytes_per_model=10**9, disk_room_bytes=150)
    room = make_room([held("a", 0, 100, 1.0)], [(SlotToSave(0, 1, 2), 200)], model="m", limits=limits)
    assert room.drop == (held("a", 0, 100, 1.0),) and room.keep == (SlotToSave(0, 1, 2),)
    room = make_room([], [(SlotToSave(0, 1, 2), 200)], model="m", limits=limits)
    assert room.keep == () and room.left_out == (SlotToSave(0, 1, 2),)


def test_the_check_after_a_save_drops_the_oldest_until_every_limit_holds() -> None:
    # the prediction was low: real sizes put m over its budget and the root over the total
    on_disk = [held("a", 0, 500, 1.0), held("m", 0, 550, 5.0, order=2), held("m", 1, 400, 5.0, order=1)]
    room = make_room(on_disk, [], model="m", limits=LIMITS)
    assert room.drop == (held("a", 0, 500, 1.0), held("m", 1, 400, 5.0, order=1))


@settings(max_examples=300, deadline=None)
@given(
    saves=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.lists(st.tuples(st.integers(1, 700), st.floats(0.5, 1.5)), min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=25,
    ),
    free=st.integers(0, 3000),
    starting=st.lists(st.sets(st.sampled_from(["a", "b", "c"])), min_size=1, max_size=3),
)
def test_many_saves_never_leave_the_directory_over_any_limit(saves: list, free: int, starting: list) -> None:
    """Whatever llama-server writes (the prediction off by up to 50% either way), after each save
    and its check the files on disk keep the per-model and total budgets and the disk's room."""
    disk: list[HeldSlot] = []
    disk_free = free
    for clock, (model, slots) in enumerate(saves):
        limits = Limits(max_bytes=1000, max_bytes_per_model=600, disk_room_bytes=disk_free - 100)
        incoming = [(SlotToSave(i, 1, len(slots) - i), size) for i, (size, _) in enumerate(slots)]
        room = make_room(disk, incoming, model=model, limits=limits, starting=frozenset(starting[clock % len(starting)]))
        for h in room.drop:
            disk.remove(h)
            disk_free += h.size_bytes
        for slot in room.keep:  # written: its real size differs from the prediction
            size, error = slots[slot.slot]
            real = int(size * error)
            disk.append(HeldSlot(model, slot.slot, real, float(clock), slot.order))
            disk_free -= real
        room = make_room(disk, [], model=model, limits=Limits(1000, 600, disk_free - 100))
        for h in room.drop:
            disk.remove(h)
            disk_free += h.size_bytes
        assert sum(h.size_bytes for h in disk) <= 1000
        for name in "abc":
            assert sum(h.size_bytes for h in disk if h.model == name) <= 600
        # what the cache added since the start never eats into the reserve
        assert sum(h.size_bytes for h in disk) <= max(free - 100, 0)
