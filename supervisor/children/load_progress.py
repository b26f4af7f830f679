"""How far a llama-server's load has come, read from what it prints; pure, no I/O.

What llama-server (build 11434) prints while it loads, at its default verbosity:
`load_model: loading model '<file>'`, then `load_model: initializing, n_slots = ...`, then
`llama_server: model loaded`. With `-v`, llama.cpp's own steps come between (`load_tensors: loading
model tensors`, `llama_context: constructing llama_context`, `common_init_: warming up the model`).
Builds that load weights through llama.cpp's default progress callback print one "." per percent of
the tensors read, with no newline until 100 (llama_model_default_params); a line of dots so far is
the only figure of "how much" any build gives. So progress is a phase, named in words, and a fraction
only where the dots give one; nothing is guessed.

Rules kept here:
- a phase only moves forward within one load: a later marker never goes back to an earlier phase;
- the fraction is the dots printed so far over 100, at most 1.0, while the tensors load; None
  without dots, and once a later phase began;
- `Child` makes one per spawn and feeds it every output line and the unfinished line in hand.
"""

from __future__ import annotations

from dataclasses import dataclass

DOTS_PER_LOAD = 100  # llama.cpp's progress callback prints one dot per percent

# (marker in a line, phase in words), in the order a load goes through them
PHASES: tuple[tuple[str, str], ...] = (
    ("load_model: loading model", "reading the model"),
    ("llama_model_loader: loaded meta data", "reading the model"),
    ("load_tensors: loading model tensors", "loading tensors"),
    ("llama_model_load: loading tensors", "loading tensors"),
    ("llama_context: constructing", "creating the context"),
    ("warming up the model", "warming up"),
    ("load_model: initializing", "initializing slots"),
    ("model loaded", "loaded"),
)
DOTS_PHASE = "loading tensors"


@dataclass(frozen=True)
class LoadStep:
    """Where a load is, as /status shows it."""

    phase: str | None
    """In words; None before the child printed anything we know."""
    fraction: float | None
    """0.0-1.0 from llama.cpp's progress dots; None when the output gives no figure."""


class LoadProgress:
    """One load's progress, fed the child's output as it arrives."""

    __slots__ = ("_phase_index", "_dots")

    def __init__(self) -> None:
        self._phase_index = -1
        self._dots: int | None = None

    def feed_line(self, line: str) -> None:
        """A whole line of output."""
        stripped = line.strip()
        if stripped and set(stripped) == {"."}:
            self._dots = min(len(stripped), DOTS_PER_LOAD)
            self._advance_to(DOTS_PHASE)
            return
        for index, (marker, _) in enumerate(PHASES):
            if marker in line and index > self._phase_index:
                self._phase_index = index
                return

    def feed_partial(self, pending: bytes) -> None:
        """The unfinished line in hand: llama.cpp prints its dots without a newline."""
        stripped = pending.strip()
        if stripped and stripped.count(b".") == len(stripped):
            self._dots = min(len(stripped), DOTS_PER_LOAD)
            self._advance_to(DOTS_PHASE)

    def _advance_to(self, phase: str) -> None:
        for index, (_, name) in enumerate(PHASES):
            if name == phase:
                self._phase_index = max(self._phase_index, index)
                return

    @property
    def step(self) -> LoadStep:
        phase = PHASES[self._phase_index][1] if self._phase_index >= 0 else None
        if phase != DOTS_PHASE or self._dots is None:
            return LoadStep(phase, None)
        return LoadStep(phase, self._dots / DOTS_PER_LOAD)


def describe_step(step: LoadStep) -> str:
    """'loading tensors 45%', 'warming up', or '' when nothing is known."""
    if step.fraction is not None:
        return f"{step.phase} {step.fraction:.0%}"
    return step.phase or ""
