"""`python -m benchmarks.accuracy.moe_output_device`: why one partial-offload figure stays over target.

The compute buffer of the device holding the output layer in a partial offload of a wide-routing
MoE (no shared expert), against the other device's, over cuts of the Qwen3-30B-A3B shape (8
layers, 32 experts, `-ngl 6 -ts 1,1`) that vary the width, the experts used and the expert
width. Measured with the dry-run probe on two RPC devices; prints one line per cut.
"""

from __future__ import annotations

import sys

from benchmarks.accuracy.__main__ import default_models_dir
from benchmarks.accuracy.cases import Case
from benchmarks.accuracy.oracle import build_probe, rpc_servers, run_probe
from benchmarks.accuracy.shapes import llama_like

MIB = 1024**2
# (n_embd, experts used, expert width); the first is the real shape's
CUTS = [(2048, 8, 768), (2048, 2, 768), (2048, 4, 768), (2048, 6, 768), (2048, 12, 768), (2048, 16, 768),
        (2048, 8, 384), (2048, 8, 1152), (2048, 8, 1536), (2048, 8, 2048), (1024, 8, 768), (3072, 8, 768),
        (4096, 8, 768)]  # fmt: skip


def main() -> int:
    models = default_models_dir()
    probe = build_probe(models / ".probe")
    ratios = []
    print("n_embd used width   other device   output device   output / other")
    for n_embd, used, width in CUTS:
        name = f"qwen3moe-cut-e{n_embd}-u{used}-f{width}"
        shape = llama_like(name, "qwen3moe", n_vocab=151936, n_embd=n_embd, n_layer=8, n_head=32, n_head_kv=4,
                           n_ff=6144, n_ctx_train=40960, head_dim=128, qk_norm=True, n_expert=32,
                           n_expert_used=used, n_ff_exp=width)  # fmt: skip
        model = shape.write(models)
        case = Case(name, ctx=8192, gpu_layers=6, tensor_split=(1, 1), oracle="probe")
        with rpc_servers(2) as endpoints:
            measured = run_probe(probe, model, case.probe_args(False), endpoints, [1, 1])
        other, output = measured.devices["RPC0"].compute, measured.devices["RPC1"].compute
        ratios.append(output / other)
        print(f"{n_embd:6d} {used:4d} {width:5d}   {other / MIB:9.2f} MiB   {output / MIB:10.2f} MiB   {output / other:.2f}",
              flush=True)  # fmt: skip
    print(f"output / other: {min(ratios):.2f} to {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
