"""`serve --watch`: one save gives one reload; an unchanged file gives none; a half-written one is
handed on once as a problem (recorded as a refused reload), never applied; a new file matching an
include glob is a change."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from llama_smart_proxy.supervisor.config.load import files_digest
from llama_smart_proxy.supervisor.service.watch import watch_config

pytestmark = pytest.mark.anyio

CONFIG = '[models.a]\nfile = "a.gguf"\nctx = {ctx}\n'


@dataclass
class Loaded:
    """The running config as the watcher sees it: its files and the digest of the bytes read."""

    files: list[Path]
    digest: str
    include_patterns: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path, include_patterns: list[str] | None = None) -> Loaded:
        return cls([path], files_digest([(path, path.read_bytes())]), include_patterns or [])


async def run_watcher(
    path: Path,
    edits,
    settle_s: float = 0.4,
    loaded: Loaded | None = None,
    problems: list[str] | None = None,
    applies: bool = False,
) -> int:
    """Apply `edits` (an async callable) under the watcher; return how many reloads it asked for.

    The running config is the file as it is now unless `loaded` says otherwise; with `applies`,
    each reload makes the file's bytes the running config, as one that succeeds does. Saves handed
    on with a problem are appended to `problems`.
    """
    reloads = 0
    running = loaded or Loaded.read(path)

    async def on_change(problem: str | None, contents: Mapping[Path, bytes]) -> None:
        nonlocal reloads
        if problem is None:
            reloads += 1
            if applies:
                running.digest = files_digest(contents.items())  # what a reload parses
        elif problems is not None:
            problems.append(problem)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: watch_config(lambda: running, on_change, debounce_s=0.1, poll_s=0.02))
        await anyio.sleep(0.05)
        await edits()
        await anyio.sleep(settle_s)
        tg.cancel_scope.cancel()
    return reloads


async def test_editor_style_save_by_rename_gives_exactly_one_reload(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))

    async def save() -> None:
        temporary = tmp_path / ".config.toml.swp"
        temporary.write_text(CONFIG.format(ctx=2))
        os.replace(temporary, path)

    assert await run_watcher(path, save) == 1


async def test_several_writes_in_a_burst_give_one_reload(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))

    async def burst() -> None:
        for ctx in range(2, 6):
            path.write_text(CONFIG.format(ctx=ctx))
            await anyio.sleep(0.03)

    assert await run_watcher(path, burst) == 1


async def test_truncated_write_gives_no_reload_and_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))
    problems: list[str] = []

    async def truncated() -> None:
        path.write_text(CONFIG.format(ctx=2)[:20])  # '[models.a]\nfile = "a' - cut mid-string

    assert await run_watcher(path, truncated, settle_s=0.6, problems=problems) == 0
    assert len(problems) == 1 and str(path) in problems[0]


async def test_truncated_write_then_completed_gives_one_reload(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))

    async def truncated_then_whole() -> None:
        path.write_text(CONFIG.format(ctx=2)[:20])
        await anyio.sleep(0.3)
        path.write_text(CONFIG.format(ctx=2))

    problems: list[str] = []
    assert await run_watcher(path, truncated_then_whole, settle_s=0.5, problems=problems) == 1
    assert len(problems) == 1


async def test_save_that_changes_nothing_does_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))

    async def touch() -> None:
        path.write_text(CONFIG.format(ctx=1))
        os.utime(path)

    assert await run_watcher(path, touch) == 0


async def test_emptied_file_gives_no_reload_and_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))
    problems: list[str] = []

    async def truncate() -> None:
        path.write_text("")

    assert await run_watcher(path, truncate, problems=problems) == 0
    assert problems == [f"{path}: empty"]


async def test_a_broken_save_is_handed_on_once_however_long_it_stays(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))
    problems: list[str] = []

    async def broken_then_touched() -> None:
        path.write_text("[models.a\n")
        await anyio.sleep(0.3)
        os.utime(path)  # same bytes again: not a new save
        await anyio.sleep(0.3)

    assert await run_watcher(path, broken_then_touched, problems=problems) == 0
    assert len(problems) == 1


async def test_a_new_file_matching_an_include_glob_gives_one_reload(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('include = ["models.d/*.toml"]\n')
    (tmp_path / "models.d").mkdir()
    running = Loaded.read(path, [str(tmp_path / "models.d" / "*.toml")])

    async def add_file() -> None:
        (tmp_path / "models.d" / "b.toml").write_text(CONFIG.format(ctx=3))

    assert await run_watcher(path, add_file, loaded=running) == 1


async def test_a_save_made_before_watching_began_is_applied_once(tmp_path: Path) -> None:
    # serve reads the config, then loads its models (minutes, for a big one), then starts
    # watching: an edit saved in between must not become the watcher's baseline
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))
    read_at_start = Loaded.read(path)
    path.write_text(CONFIG.format(ctx=2))

    async def nothing() -> None:
        pass

    assert await run_watcher(path, nothing, loaded=read_at_start) == 1


async def test_a_refused_reload_is_not_retried_until_the_next_save(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))
    running = Loaded.read(path)  # a refused reload leaves the running config as it was

    async def save_then_wait() -> None:
        path.write_text(CONFIG.format(ctx=2))
        await anyio.sleep(0.5)

    assert await run_watcher(path, save_then_wait, loaded=running) == 1


@pytest.mark.parametrize(
    ("applied", "other_ctx"),
    [
        (False, 3),  # ctx=2 was refused; SIGHUP or /admin/reload then applied ctx=3
        (True, 1),  # ctx=2 was applied; /admin/reload then put ctx=1 back
    ],
)
async def test_a_save_back_to_bytes_handed_on_before_is_reloaded_once_another_reload_changed_what_runs(
    tmp_path: Path, applied: bool, other_ctx: int
) -> None:
    # saving ctx=2 again differs from what runs now: it must be reloaded, not skipped as "already tried"
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))
    running = Loaded.read(path)

    async def edits() -> None:
        path.write_text(CONFIG.format(ctx=2))
        await anyio.sleep(0.3)  # the watcher hands it on
        path.write_text(CONFIG.format(ctx=other_ctx))
        running.digest = Loaded.read(path).digest  # applied by another route at once
        await anyio.sleep(0.3)
        path.write_text(CONFIG.format(ctx=2))

    assert await run_watcher(path, edits, loaded=running, applies=applied) == 2


async def test_a_broken_save_made_again_after_a_good_one_is_handed_on_again(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))
    problems: list[str] = []

    async def broken_fixed_broken() -> None:
        for text in ("[models.a\n", CONFIG.format(ctx=1), "[models.a\n"):
            path.write_text(text)
            await anyio.sleep(0.3)

    assert await run_watcher(path, broken_fixed_broken, problems=problems) == 0
    assert len(problems) == 2


async def test_a_write_in_place_that_begins_while_a_settled_save_is_read_is_never_handed_on_half_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the editor's next save truncates the file at the instant the watcher reads the settled one,
    # then writes it whole: what was read (nothing) must not be handed on as a refused save
    from llama_smart_proxy.supervisor.service import watch

    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(ctx=1))
    read_files = watch.content_digest

    def read_as_the_editor_writes_in_place(paths):  # type: ignore[no-untyped-def]
        if path.read_text() != CONFIG.format(ctx=2):
            return read_files(paths)
        path.write_text("")
        result = read_files(paths)
        path.write_text(CONFIG.format(ctx=3))
        return result

    monkeypatch.setattr(watch, "content_digest", read_as_the_editor_writes_in_place)

    async def save() -> None:
        path.write_text(CONFIG.format(ctx=2))

    problems: list[str] = []
    assert await run_watcher(path, save, problems=problems) == 1  # the whole ctx=3 save, once
    assert problems == []
