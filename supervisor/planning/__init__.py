"""Planning: the machine and every model's estimate → `schemas.Plan`, the one answer to where
each model runs. Nothing here starts a process; only `inventory`, `headers` and `prepare` read
files or NVML.

- `prepare`: the steps `plan`, `serve` and every reload share: config → inventory → headers →
  estimates → plan;
- `inventory`: the GPUs (NVML), host RAM and CPUs now, or from a snapshot file;
- `headers`: each model's GGUF header from its file or from the snapshot's record;
- `planner`: `plan()`, the rules every plan keeps, from inputs to the finished Plan;
- `fleet`: several hosts ([hosts]): which host runs each model, each host's share planned;
- `fleet_report`: a fleet plan as one section per host and a summary, and its verdict;
- `footprint`: what one model takes on each device for any layer count and split;
- `search`: the search for the best arrangement of the resident models;
- `shortfall`: how many bytes an unplaced model lacks, and where;
- `explain`: the plan in words and rows: each model's reason, the GPU and host tables;
- `report`: a plan as tables a person can check by hand, and its verdict and exit code.

May import: schemas, errors, config, memory.
"""
