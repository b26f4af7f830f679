"""The cases the accuracy harness measures: a shape, llama-server settings, and a device layout.

`CASES` covers every family (dense GQA, sliding window, MoE, MLA, recurrent, hybrid, embedding)
at two or more settings each, on the CPU, and splits and partial offloads over RPC devices.
`QUICK_CASES` is the small form the test suite runs: small models, the real llama-server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llama_smart_proxy.schemas.config import BUILTIN_DEFAULTS, CacheType, FlashAttn, ModelSpec

Oracle = Literal["server", "probe"]


@dataclass(frozen=True)
class Case:
    shape: str
    ctx: int = 4096
    parallel: int = 1
    kv_unified: bool = True
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    flash_attn: FlashAttn = "on"
    batch: int = 2048
    ubatch: int = 512
    gpu_layers: int = 0
    tensor_split: tuple[float, ...] = ()  # one RPC device per entry; empty: CPU only
    oracle: Oracle = "server"
    mmap: bool = False  # llama-server's default load mode: the host weights are a mapped file span

    @property
    def label(self) -> str:
        parts = [self.shape, f"c{self.ctx}", f"np{self.parallel}" + ("" if self.kv_unified else "/slot")]
        if (self.cache_type_k, self.cache_type_v) != ("f16", "f16"):
            parts.append(f"{self.cache_type_k}/{self.cache_type_v}")
        parts.append(f"fa-{self.flash_attn}")
        if self.ubatch != 512:
            parts.append(f"ub{self.ubatch}")
        if self.tensor_split:
            parts.append(f"ngl{self.gpu_layers} ts{':'.join(f'{f:g}' for f in self.tensor_split)}")
        if self.mmap:
            parts.append("mmap")
        return " ".join(parts)

    def spec(self, model: Path) -> ModelSpec:
        values = BUILTIN_DEFAULTS.model_dump()
        values.update(
            name=self.shape, file=model, mmproj=None, aliases=[], ctx=self.ctx, parallel=self.parallel,
            kv_unified=self.kv_unified, cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
            flash_attn=self.flash_attn, batch=self.batch, ubatch=self.ubatch,
            args=[] if self.mmap else ["-lm", "none"],
        )  # fmt: skip
        return ModelSpec(**values)

    def server_args(self, embedding: bool) -> list[str]:
        args = ["-c", str(self.ctx), "-np", str(self.parallel), "--kv-unified" if self.kv_unified else "--no-kv-unified",
                "-ctk", self.cache_type_k, "-ctv", self.cache_type_v, "-fa", self.flash_attn,
                "-b", str(self.batch), "-ub", str(self.ubatch), "-ngl", str(self.gpu_layers)]  # fmt: skip
        if self.tensor_split:
            args += ["-ts", ",".join(f"{f:g}" for f in self.tensor_split)]
        if embedding:
            args.append("--embedding")
        if not self.mmap:
            args += ["-lm", "none"]
        return args

    def probe_args(self, embedding: bool) -> list[str]:
        return [str(self.ctx), str(self.parallel), "1" if self.kv_unified else "0", self.cache_type_k, self.cache_type_v,
                self.flash_attn, str(self.batch), str(self.ubatch), "1" if embedding else "0", str(self.gpu_layers)]  # fmt: skip


def _pair(shape: str, oracle: Oracle = "server", **second: object) -> list[Case]:
    """A shape at the default settings and at one other setting."""
    return [Case(shape, oracle=oracle), Case(shape, oracle=oracle, **second)]  # type: ignore[arg-type]


CPU_CASES: list[Case] = [
    # dense GQA (llama, mistral, qwen2 with biases, qwen3 with q/k norms, phi3 fused qkv)
    *_pair("llama-3.1-8b", ctx=8192, parallel=4, kv_unified=False, cache_type_k="q8_0", cache_type_v="q8_0"),
    Case("llama-3.1-8b", ctx=2048, flash_attn="off"),
    *_pair("mistral-7b-v0.3", ctx=16384, cache_type_k="q4_0", cache_type_v="q4_0"),
    *_pair("qwen2.5-7b", ctx=8192, flash_attn="off", parallel=2),
    *_pair("qwen3-8b", ctx=2048, ubatch=1024),
    *_pair("phi-3-mini-4k", ctx=512, flash_attn="off"),
    # sliding window (gemma2 every other layer, gemma3 five of six), unified and per slot
    *_pair("gemma-2-9b", ctx=8192, parallel=2, kv_unified=False),
    *_pair("gemma-3-4b", ctx=16384, parallel=4, flash_attn="off"),
    Case("gemma-3-4b", ctx=8192, parallel=4, kv_unified=False),
    # mixture of experts and multi-head latent attention: too big to allocate here, dry runs
    *_pair("mixtral-8x7b", "probe", ctx=32768, flash_attn="off"),
    *_pair("qwen3-30b-a3b", "probe", ctx=16384, parallel=4, kv_unified=False, cache_type_k="q8_0", cache_type_v="q8_0"),
    *_pair("deepseek-v2-lite", "probe", ctx=16384, flash_attn="off"),
    Case("deepseek-v2-lite", ctx=8192, cache_type_k="q8_0", cache_type_v="q8_0", oracle="probe"),
    # a NextN/MTP block (DeepSeek-V3 style): llama.cpp leaves it unloaded unless asked for MTP
    Case("deepseek-v2-lite-mtp", oracle="probe"),
    # recurrent and hybrid: state per slot, not per token
    *_pair("mamba-2.8b", ctx=16384, parallel=4),
    *_pair("lfm2-1.2b", ctx=32768, parallel=3, kv_unified=False),
    # embedding-only: no KV cache
    *_pair("bge-base-en-v1.5", ctx=512, flash_attn="off"),
    *_pair("nomic-embed-text-v1.5", ctx=2048, ubatch=2048, batch=2048),
    # small models, also used by the quick form
    *_pair("qwen2.5-0.5b", ctx=32768, parallel=2, flash_attn="off"),
    *_pair("llama-3.2-1b", ctx=8192, cache_type_k="q8_0", cache_type_v="q4_0"),
]

# RPC devices stand in for GPUs: weights, KV, recurrent state and compute per device.
SPLIT_CASES: list[Case] = [
    Case("qwen2.5-0.5b", gpu_layers=99, tensor_split=(1, 1)),  # full offload over two: pipeline
    Case("llama-3.2-1b", ctx=8192, gpu_layers=99, tensor_split=(3, 1)),
    Case("gemma-3-4b", ctx=8192, gpu_layers=20, tensor_split=(1, 1)),  # partial offload, SWA
    Case("lfm2-1.2b", gpu_layers=9, tensor_split=(1, 1)),  # partial, hybrid state split
    Case("mamba-2.8b", parallel=2, gpu_layers=40, tensor_split=(2, 1)),  # partial, recurrent
    Case("phi-3-mini-4k", gpu_layers=99, tensor_split=(1,)),  # one device, full offload
    Case("qwen2.5-0.5b", ctx=8192, flash_attn="off", gpu_layers=12, tensor_split=(1,)),  # one device, partial
    Case("llama-3.2-1b", gpu_layers=8, tensor_split=(1,)),  # one device, partial
    Case("gemma-3-4b", flash_attn="off", gpu_layers=99, tensor_split=(1, 1)),  # pipeline, two caches
    # MoE and MLA as dry runs (a dry run over-reports the output device of a full offload over
    # several devices, so these are partial offloads)
    Case("mixtral-8x7b", gpu_layers=20, tensor_split=(1, 1), oracle="probe"),
    Case("qwen3-30b-a3b", ctx=8192, gpu_layers=30, tensor_split=(1, 1), oracle="probe"),
    Case("deepseek-v2-lite", gpu_layers=20, tensor_split=(2, 1), oracle="probe"),
    Case("deepseek-v2-lite-mtp", gpu_layers=12, tensor_split=(1, 1), oracle="probe"),
]

# Issue 13: flash attention "auto" as llama.cpp resolves it (on for the CPU and RPC devices), the
# host's mapped file span with mmap, and full offloads of MoE and MLA models over two devices
# (allocated for real, so with fewer blocks of the real shape).
ISSUE_13_CASES: list[Case] = [
    Case("lfm2-1.2b", ctx=32768, flash_attn="auto"),  # a hybrid at 32k: "auto" was charged as off
    Case("gemma-3-4b", ctx=16384, parallel=4, flash_attn="auto"),
    Case("qwen2.5-0.5b", ctx=8192, flash_attn="auto", gpu_layers=99, tensor_split=(1, 1)),
    Case("llama-3.1-8b", ctx=8192, gpu_layers=20, tensor_split=(1,), mmap=True),  # head before blk.0
    Case("tinyllama-1.1b", gpu_layers=12, tensor_split=(1, 1), mmap=True),
    Case("llama-3.2-1b", gpu_layers=99, tensor_split=(1,), mmap=True),  # full offload: token_embd alone
    Case("qwen2.5-0.5b", mmap=True),  # CPU only: the whole file
    Case("deepseek-v2-lite-8l", gpu_layers=99, tensor_split=(1, 1)),
    Case("deepseek-v2-lite-8l", ubatch=1024, gpu_layers=99, tensor_split=(1, 1)),
    Case("deepseek-v2-lite-8l", ctx=8192, flash_attn="off", gpu_layers=99, tensor_split=(3, 1)),
    Case("qwen3-30b-a3b-8l", gpu_layers=99, tensor_split=(1, 1)),
    Case("qwen3-30b-a3b-8l", ctx=16384, parallel=4, kv_unified=False, gpu_layers=99, tensor_split=(1, 1)),
    Case("mixtral-8x7b-5l", gpu_layers=99, tensor_split=(1, 1)),
]

CASES: list[Case] = CPU_CASES + SPLIT_CASES + ISSUE_13_CASES

QUICK_CASES: list[Case] = [
    Case("qwen2.5-0.5b", ctx=8192, parallel=2, flash_attn="off"),
    Case("lfm2-1.2b", ctx=4096, parallel=2, kv_unified=False),
    Case("bge-base-en-v1.5", ctx=512),
    Case("qwen2.5-0.5b", gpu_layers=99, tensor_split=(1, 1)),
    Case("lfm2-1.2b", gpu_layers=9, tensor_split=(1, 1)),
    Case("lfm2-1.2b", ctx=32768, flash_attn="auto"),
    Case("tinyllama-1.1b", gpu_layers=12, tensor_split=(1, 1), mmap=True),
]
