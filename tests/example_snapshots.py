"""The inventory snapshots in examples/, made by code: typical machines, and the GGUF headers of
the example configs' models at the shapes of the published models (no weights, no files).

Regenerate with `python -m tests.example_snapshots` (writes examples/inventory-*.json). The GPUs'
sizes are what NVML reports for those cards; the headers are what `read_header` returns for a
Q4_K_M (or Q8_0) file of that model, with the production paths they would have on a server.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.accuracy.shapes import Q, Shape, Tensor, _t, llama_like
from llama_smart_proxy.schemas.header import ModelHeader
from llama_smart_proxy.schemas.inventory import Gpu, Host, Inventory
from llama_smart_proxy.supervisor.memory.reader import read_header
from llama_smart_proxy.supervisor.planning.inventory import dump_inventory
from llama_smart_proxy.supervisor.service.tinymodel import write_tiny_model

EXAMPLES = Path(__file__).parent.parent / "examples"
MODELS_DIR = "/srv/llama/models"
TAKEN_AT = "2026-01-15T09:30:00+00:00"
MTIME_NS = 1_767_000_000_000_000_000
MIB = 1024**2
GIB = 1024**3


def qwen2_5_7b() -> Shape:
    return llama_like(
        "Qwen2.5-7B-Instruct-Q4_K_M", "qwen2", n_vocab=152064, n_embd=3584, n_layer=28, n_head=28,
        n_head_kv=4, n_ff=18944, n_ctx_train=32768, qkv_bias=True,
    )  # fmt: skip


def qwen2_5_coder_7b() -> Shape:
    shape = qwen2_5_7b()
    return Shape("Qwen2.5-Coder-7B-Instruct-Q4_K_M", shape.arch, shape.n_vocab, shape.metadata, shape.tensors)


def llama_3_3_70b() -> Shape:
    return llama_like(
        "Llama-3.3-70B-Instruct-Q4_K_M", "llama", n_vocab=128256, n_embd=8192, n_layer=80, n_head=64,
        n_head_kv=8, n_ff=28672, n_ctx_train=131072, rope_freqs=True,
        extra={"llama.rope.freq_base": 500000.0},
    )  # fmt: skip


def qwen3_235b_a22b() -> Shape:
    return llama_like(
        "Qwen3-235B-A22B-Instruct-2507-Q4_K_M", "qwen3moe", n_vocab=151936, n_embd=4096, n_layer=94,
        n_head=64, n_head_kv=4, head_dim=128, n_ff=12288, n_ctx_train=262144, qk_norm=True,
        n_expert=128, n_expert_used=8, n_ff_exp=1536,
    )  # fmt: skip


def qwen2_5_coder_32b() -> Shape:
    return llama_like(
        "Qwen2.5-Coder-32B-Instruct-Q4_K_M", "qwen2", n_vocab=152064, n_embd=5120, n_layer=64,
        n_head=40, n_head_kv=8, n_ff=27648, n_ctx_train=32768, qkv_bias=True,
    )  # fmt: skip


def nomic_embed_text_v1_5() -> Shape:
    """nomic-bert at Q8_0 (src/models/bert.cpp tensors for LLM_ARCH_NOMIC_BERT)."""
    n_embd, n_layer, n_ff, n_vocab = 768, 12, 3072, 30522
    t: list[Tensor] = []
    _t(t, "token_embd.weight", (n_embd, n_vocab), Q.Q8_0)
    _t(t, "token_types.weight", (n_embd, 2), Q.F32)
    _t(t, "token_embd_norm.weight", (n_embd,), Q.F32)
    _t(t, "token_embd_norm.bias", (n_embd,), Q.F32)
    for i in range(n_layer):
        b = f"blk.{i}"
        _t(t, f"{b}.attn_qkv.weight", (n_embd, 3 * n_embd), Q.Q8_0)
        _t(t, f"{b}.attn_output.weight", (n_embd, n_embd), Q.Q8_0)
        _t(t, f"{b}.attn_output_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.attn_output_norm.bias", (n_embd,), Q.F32)
        _t(t, f"{b}.ffn_up.weight", (n_embd, n_ff), Q.Q8_0)
        _t(t, f"{b}.ffn_gate.weight", (n_embd, n_ff), Q.Q8_0)
        _t(t, f"{b}.ffn_down.weight", (n_ff, n_embd), Q.Q8_0)
        _t(t, f"{b}.layer_output_norm.weight", (n_embd,), Q.F32)
        _t(t, f"{b}.layer_output_norm.bias", (n_embd,), Q.F32)
    a = "nomic-bert"
    metadata = {
        f"{a}.context_length": 2048,
        f"{a}.embedding_length": n_embd,
        f"{a}.block_count": n_layer,
        f"{a}.feed_forward_length": n_ff,
        f"{a}.attention.head_count": 12,
        f"{a}.attention.layer_norm_epsilon": 1e-12,
        f"{a}.attention.causal": False,
        f"{a}.pooling_type": 1,
        f"{a}.rope.freq_base": 1000.0,
    }
    return Shape("nomic-embed-text-v1.5.Q8_0", a, n_vocab, metadata, t, embedding=True)


def recorded(shape: Shape, parts: int = 1) -> ModelHeader:
    """The header as a snapshot records it, at its production path."""
    name = f"{shape.name}-00001-of-{parts:05d}.gguf" if parts > 1 else f"{shape.name}.gguf"
    header = shape.header(f"{MODELS_DIR}/{name}")
    metadata = dict(header.metadata)
    if parts > 1:  # llama-gguf-split's keys, read from the first part
        metadata.update({"split.no": 0, "split.count": parts, "split.tensors.count": len(header.tensors)})
    return header.model_copy(update={"mtime_ns": MTIME_NS, "parts": parts, "metadata": metadata})


def tiny() -> ModelHeader:
    with tempfile.TemporaryDirectory() as directory:
        header = read_header(write_tiny_model(Path(directory) / "tiny.gguf"))
    return header.model_copy(update={"path": f"{MODELS_DIR}/tiny.gguf", "mtime_ns": MTIME_NS})


def headers(datacenter: bool) -> dict[str, ModelHeader]:
    chosen = [
        recorded(qwen2_5_7b()),
        recorded(qwen2_5_coder_7b()),
        recorded(llama_3_3_70b(), parts=2),
        recorded(nomic_embed_text_v1_5()),
        tiny(),
    ]
    if datacenter:
        chosen += [recorded(qwen3_235b_a22b(), parts=3), recorded(qwen2_5_coder_32b())]
    return {h.path: h for h in sorted(chosen, key=lambda h: h.path)}


def gpu(index: int, name: str, total: int, used: int, capability: str, uuid: str) -> Gpu:
    return Gpu(
        index=index,
        uuid=uuid,
        pci_bus_id=f"00000000:{[0x01, 0x21, 0x41, 0x61][index]:02X}:00.0",
        name=name,
        total_bytes=total,
        used_bytes=used,
        free_bytes=total - used,
        compute_capability=capability,
    )


RTX_4090 = 25_757_220_864  # 24564 MiB, as NVML reports it
RTX_3090 = 25_769_803_776  # 24576 MiB
H100_80GB = 85_520_809_984  # 81559 MiB


def machines() -> dict[str, Inventory]:
    driver = {"driver_version": "550.127.05", "cuda_version": "12.4"}
    one = Inventory(
        nvml_status="ok",
        message="1 NVIDIA GPU: 0: NVIDIA GeForce RTX 4090 24.0 GiB",
        **driver,
        gpus=[gpu(0, "NVIDIA GeForce RTX 4090", RTX_4090, 418 * MIB, "8.9", "GPU-5e9d3a7c-0f4b-8e21-9a6d-1c2b3d4e5f60")],
        host=Host(ram_total_bytes=64 * GIB, ram_available_bytes=58 * GIB, cpu_count=16),
        hostname="workstation",
        taken_at=TAKEN_AT,
        models=headers(datacenter=False),
    )
    two = Inventory(
        nvml_status="ok",
        message="2 NVIDIA GPUs: 0: NVIDIA GeForce RTX 3090 24.0 GiB, 1: NVIDIA GeForce RTX 3090 24.0 GiB",
        **driver,
        gpus=[
            gpu(0, "NVIDIA GeForce RTX 3090", RTX_3090, 312 * MIB, "8.6", "GPU-1a2b3c4d-5e6f-7a8b-9c0d-e1f2a3b4c5d6"),
            gpu(1, "NVIDIA GeForce RTX 3090", RTX_3090, 6 * MIB, "8.6", "GPU-9f8e7d6c-5b4a-3928-1706-f5e4d3c2b1a0"),
        ],
        host=Host(ram_total_bytes=128 * GIB, ram_available_bytes=120 * GIB, cpu_count=24),
        hostname="gpu-box",
        taken_at=TAKEN_AT,
        models=headers(datacenter=False),
    )
    four = Inventory(
        nvml_status="ok",
        message="4 NVIDIA GPUs: 0-3: NVIDIA H100 80GB HBM3 79.6 GiB",
        **driver,
        gpus=[
            gpu(i, "NVIDIA H100 80GB HBM3", H100_80GB, 4 * MIB, "9.0", f"GPU-0c7e{i}d21-3b4a-4f5e-8a6b-7c8d9e0f1a2{i}")
            for i in range(4)
        ],
        host=Host(ram_total_bytes=2048 * GIB, ram_available_bytes=1980 * GIB, cpu_count=224),
        hostname="h100-node",
        taken_at=TAKEN_AT,
        models=headers(datacenter=True),
    )
    none = Inventory(
        nvml_status="library_missing",
        message="the NVML library (libnvidia-ml.so.1) is not installed: no NVIDIA driver on this machine",
        host=Host(ram_total_bytes=32 * GIB, ram_available_bytes=28 * GIB, cpu_count=8),
        hostname="ci-runner",
        taken_at=TAKEN_AT,
        models=headers(datacenter=False),
    )
    return {"1x24gb": one, "2x24gb": two, "4x80gb": four, "no-gpu": none}


def write_all(directory: Path = EXAMPLES) -> list[Path]:
    written = []
    for name, inventory in machines().items():
        path = directory / f"inventory-{name}.json"
        path.write_text(dump_inventory(inventory))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_all():
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
