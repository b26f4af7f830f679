"""Children: one planned model → one supervised `llama-server` process, started, watched,
restarted and stopped. A child knows nothing of the others beyond what its owner tells it.

- `llama_binary`: find the llama-server program and check it accepts every flag we pass;
- `launch`: a plan entry → argv and environment (pure);
- `child`: `Child`, the one owner of one model's process: start, ready, restart, stop;
- `state`: the child's state table, crash-loop arithmetic, load deadlines and liveness (pure);
- `hold`: the memory a child holds while it runs, and `NoRoom` when there is none;
- `log_ring`: the last lines a model's llama-server printed, numbered, waited on by readers;
- `load_progress`: how far a load has come, read from the child's output while it starts;
- `process_group`: spawn in a process group of its own, signal it, stop it, always reap;
- `child_request`: one request to a child's own API: the health probe, `/slots` save and restore;
- `listener`: whose socket listens on a port (a /health answer counts only from the child's own);
- `ports`: the loopback ports children listen on;
- `supervise`: several children in one task group (`supervise()`, `Children`).

May import: schemas, errors.
"""
