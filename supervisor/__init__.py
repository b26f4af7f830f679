"""llama-smart-proxy's behaviour, one package per stage of the flow:

    config ─┐
    memory ─┴─► planning ─► children ─► service ◄─► proxy

- `config`: the TOML file (and what it includes, and the environment) → `schemas.Config`;
- `memory`: GGUF headers → what a model needs on each device (the estimate);
- `planning`: the machine (NVML or a snapshot) and every model's estimate → `schemas.Plan`;
- `children`: one planned model → one supervised `llama-server` process;
- `service`: the running whole: memory ledger, admission, routing, reloads, eviction, `serve`;
- `proxy`: the HTTP front; it knows the service only through `proxy.backends.Backends`.

Beside them: `cli` (every command; it may import any stage) and `errors` (the exceptions a
user can act on and the exit codes they end in; every stage may import it, it imports none).
Each stage's `__init__` says what it owns and, on its `May import:` line, which other stages
it may import; tests/test_layout.py holds every module to that and to having no import cycle.
"""
