"""Place a memory profile on devices the way llama.cpp assigns layers; pure, no I/O.

llama.cpp (build 11434, src/llama-model.cpp `load_tensors`) numbers the repeating layers
0..n-1 and the output layer n. With `-ngl N` the last N of those n+1 go to the GPUs (so the
output layer first, then blocks n-1, n-2, ...); the input layer always stays on the CPU. A GPU
layer il goes to the first device whose cumulative split fraction exceeds
(il - first_gpu_layer) / gpu_layers. Version-dependent: builds before early 2026 offloaded the
output layer only when N > n.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import struct

from llama_smart_proxy.schemas.estimate import DeviceMemory, Estimate, MemoryProfile

_F32 = struct.Struct("<f")


def _f32(value: float) -> float:
    """value rounded to float32. A sum or quotient of two float32 values computed in double and
    rounded once is the float32 result (53 >= 2 * 24 + 2 bits), so this is llama.cpp's arithmetic."""
    return _F32.unpack(_F32.pack(value))[0]


def layer_devices(n_layers: int, gpu_layers: int, tensor_split: Sequence[float]) -> list[int | None]:
    """Device index of each layer 0..n_layers (the last is the output layer); None is the CPU."""
    if not tensor_split or gpu_layers <= 0:
        return [None] * (n_layers + 1)
    # float32 throughout, as llama.cpp computes the split points, so boundaries round alike
    cumulative = []
    total = 0.0
    for fraction in tensor_split:
        total = _f32(total + _f32(fraction))
        cumulative.append(total)
    if not total > 0:
        raise ValueError(f"tensor split {list(tensor_split)} has no positive fraction")
    bounds = [_f32(c / total) for c in cumulative]
    on_gpu = min(gpu_layers, n_layers + 1)
    first = n_layers + 1 - on_gpu
    devices: list[int | None] = []
    for il in range(n_layers + 1):
        if il < first:
            devices.append(None)
        else:
            position = _f32(_f32(il - first) / _f32(on_gpu))
            devices.append(min(bisect.bisect_right(bounds, position), len(bounds) - 1))
    return devices


def place(profile: MemoryProfile, gpu_layers: int, tensor_split: Sequence[float]) -> Estimate:
    """Bytes per GPU and on the host for `-ngl gpu_layers` over len(tensor_split) GPUs.

    An empty tensor_split (or gpu_layers 0) is a CPU-only run with no GPU visible.
    """
    n = profile.n_layers
    if not tensor_split:
        gpu_layers = 0
    gpu_layers = min(gpu_layers, n + 1)
    n_gpus = len(tensor_split) if gpu_layers > 0 else 0
    where = layer_devices(n, gpu_layers, tensor_split)

    weights = [0] * (n_gpus + 1)  # last slot: the host
    kv = [0] * (n_gpus + 1)
    recurrent = [0] * (n_gpus + 1)
    host = n_gpus
    for il, layer in enumerate(profile.layers):
        slot = host if where[il] is None else where[il]
        weights[slot] += layer.weights_bytes
        kv[slot] += layer.kv_bytes
        recurrent[slot] += layer.recurrent_bytes
    output_slot = host if where[n] is None else where[n]
    weights[output_slot] += profile.output_weights_bytes
    if output_slot != host:
        # the tied head is a duplicate of token_embd, which stays on the host (TENSOR_DUPLICATED)
        weights[output_slot] += profile.tied_output_bytes
    weights[host] += profile.input_weights_bytes
    if profile.host_mapped_bytes:
        # with mmap the host holds the file span of its tensors, not their sum (get_mapping_range)
        weights[host] = profile.host_mapped_bytes[n + 1 - gpu_layers if n_gpus else n + 1]

    compute = [0] * n_gpus
    used = sorted({d for d in where if d is not None})
    partial = gpu_layers < n + 1
    # The planner mirrors these roles in its search (supervisor/planning/footprint.py Footprint.fixed): keep
    # the two in step. A partial offload charges every device the same (gpu_partial_bytes).
    for d in used:
        if partial:
            compute[d] = profile.compute.gpu_partial_bytes
        elif n_gpus == 1:
            compute[d] = profile.compute.gpu_full_bytes
        elif d == output_slot:
            compute[d] = profile.compute.gpu_split_output_bytes
        else:
            compute[d] = profile.compute.gpu_split_other_bytes
    if n_gpus == 0 or partial:
        host_compute = profile.compute.host_cpu_only_bytes
    elif n_gpus > 1:
        # llama.cpp enables pipeline parallelism for a full offload when it is given several
        # devices (src/llama-context.cpp), whether or not each of them receives layers
        host_compute = profile.compute.host_split_bytes
    else:
        host_compute = profile.compute.host_with_gpu_bytes

    if n_gpus:
        weights[0] += profile.mmproj_bytes
    else:
        weights[host] += profile.mmproj_bytes

    gpus = [
        DeviceMemory(
            device=f"GPU{d}",
            weights_bytes=weights[d],
            kv_bytes=kv[d],
            recurrent_bytes=recurrent[d],
            compute_bytes=compute[d],
            # every visible device gets a CUDA context, whether or not it holds layers
            overhead_bytes=profile.device_overhead_bytes,
        )
        for d in range(n_gpus)
    ]
    host_memory = DeviceMemory(
        device="CPU",
        weights_bytes=weights[host],
        kv_bytes=kv[host],
        recurrent_bytes=recurrent[host],
        compute_bytes=host_compute,
        output_bytes=profile.output_buffer_bytes,
    )
    return Estimate(
        model=profile.model,
        architecture=profile.architecture,
        settings=profile.settings,
        gpu_layers=gpu_layers,
        n_layers=n,
        tensor_split=list(tensor_split) if n_gpus > 1 else [],
        gpus=gpus,
        host=host_memory,
        warnings=profile.warnings,
    )
