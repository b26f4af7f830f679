"""Memory: GGUF headers → what a model needs on each device at given settings, before it is
loaded (the estimate). Pure arithmetic over the header, apart from `reader`.

- `reader`: a GGUF header (metadata and tensor infos, never weights) from a file;
- `architectures`: the hyperparameters llama.cpp reads per architecture;
- `check`: a model file checked as far as its header goes (for `validate` and the config);
- `geometry`: the context (cells, streams, batches) and the backend kind a launch resolves to;
- `flash_attention`: `flash_attn = "auto"` resolved per kind of device;
- `compute`: the compute (scheduler) buffers;
- `profile`: the memory profile of one model: weights, KV cache, state per layer, and the rest;
- `placement`: a profile placed on devices for a layer count and split (what each device holds);
- `server_args`: a llama-server command line read as llama-server reads it (`estimate -- ...`);
- `report`: `estimate`'s answer and its table.

May import: schemas, errors.
"""
