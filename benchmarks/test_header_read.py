"""Header-reading speed goal (issue 3): reading a 40 GB model's header costs milliseconds.

Measured as ratios in the same run, on a sparse Llama-3-70B-shaped file (40 GB, Q4_K_M mix) with a
real-sized GPT-2-style tokenizer (128,256 tokens and 280,147 merges, the bulk of any header):

- the cost does not depend on the weights: reading the 40 GB file's header takes at most 1.5x
  as long as reading the same header in front of 1 MB of weights (baseline);
- it is far cheaper than the gguf package's reader: gguf.GGUFReader (baseline) takes at least 20x
  as long on the same file.

Run: `python -m pytest benchmarks/test_header_read.py --benchmark-only` (or `make bench`).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from benchmarks.accuracy.shapes import Q, Shape, llama_like, write_sparse_gguf
from benchmarks.timing import median_seconds
from llama_smart_proxy.supervisor.memory.reader import read_header

GIB = 1024**3
GOAL_SIZE_RATIO = 1.5
GOAL_VS_GGUF_READER = 20.0
N_VOCAB = 128256
N_MERGES = 280147  # Llama 3's BPE merges


def _with_tokenizer(shape: Shape) -> Shape:
    merges = [f"t{i % 5000} t{i // 5000}" for i in range(N_MERGES)]
    metadata = {**shape.metadata, "tokenizer.ggml.merges": merges}  # type: ignore[dict-item]
    return Shape(shape.name, shape.arch, shape.n_vocab, metadata, shape.tensors)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("header-bench")
    big = _with_tokenizer(
        llama_like("llama-3-70b", "llama", n_vocab=N_VOCAB, n_embd=8192, n_layer=80, n_head=64, n_head_kv=8,
                   n_ff=28672, n_ctx_train=131072, rope_freqs=True)  # fmt: skip
    )
    small = Shape("same-header", big.arch, big.n_vocab, big.metadata, [(n, (32,), Q.F32) for n, _, _ in big.tensors])
    paths = []
    for shape in (big, small):
        path = directory / f"{shape.name}.gguf"
        write_sparse_gguf(path, shape.arch, shape.metadata, shape.tensors, shape.n_vocab)
        paths.append(path)
    assert paths[0].stat().st_size > 39 * GIB
    return paths[0], paths[1]


def test_header_of_a_40gb_model(benchmark, models: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    big, small = models
    header = benchmark(read_header, big)
    assert header.file_size > 39 * GIB and len(header.tensors) == 80 * 9 + 4
    assert header.array_lengths["tokenizer.ggml.merges"] == N_MERGES

    ours = median_seconds(lambda: read_header(big), 7)
    same_header = median_seconds(lambda: read_header(small), 7)
    reference = median_seconds(lambda: gguf.GGUFReader(big), 1)
    benchmark.extra_info.update(
        read_header_ms=round(ours * 1000, 1),
        same_header_small_file_ms=round(same_header * 1000, 1),
        gguf_reader_ms=round(reference * 1000, 1),
    )
    print(f"\nread_header 40 GB: {ours * 1000:.1f} ms; same header, 1 MB file: {same_header * 1000:.1f} ms; "
          f"gguf.GGUFReader: {reference * 1000:.0f} ms")  # fmt: skip
    assert ours <= GOAL_SIZE_RATIO * same_header, "reading the header must not depend on the file size"
    assert reference >= GOAL_VS_GGUF_READER * ours, "read_header should be far cheaper than gguf.GGUFReader"
