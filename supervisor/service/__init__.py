"""Service: the running whole, `serve`. It owns every promise that spans children: memory
(every GPU byte is a reservation in one ledger), admission, routing, reloads as transactions,
eviction and idle unloading; it is the proxy's `Backends`.

- `serve`: `llama-smart-proxy serve`: plan, bind, start the residents, reload, shut down;
- `runtime`: `Runtime`, the running models and the one path each promise passes through;
- `ledger`: the memory ledger of GPU reservations (pure);
- `eviction`: which idle on-demand models to stop to make room (pure);
- `admission`: queue places and concurrency permits per model (pure);
- `routing`: names and aliases → models (pure);
- `reload_diff`: what a reload changes, and when it must be refused (pure);
- `reload_transaction`: a reload in two phases: all that can fail first, then the difference;
- `prompt_cache`: keep_cache: save a child's slots before a planned stop, restore them after its next start;
- `prompt_cache_rules`: which launch a saved slot belongs to, what to save, what the disk budget drops (pure);
- `gpu_sampler`: live memory, GPU (NVML) and host RAM, sampled in worker threads;
- `state_feed`: every change /status shows, compared and published to the proxy's event log
  (`GET /events`);
- `watch`: reload when the config is saved (`serve --watch`);
- `systemd`: systemd's notify protocol;
- `tinymodel`: the tiny models `serve --demo` and the tests run.

May import: schemas, errors, config, planning, children, proxy.
"""
