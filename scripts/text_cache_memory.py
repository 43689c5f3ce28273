"""Memory of a frozen text tower's caption-embedding cache at COCO scale, old layout vs new.

    python scripts/text_cache_memory.py [--captions 1400000] [--dim 512] [--per-step 672]

Fills a cache as training on COCO train2017 would (118 K images x 5 captions + ~970 K region
captions ~ 1.4 M distinct strings, EVA02-B/16's 512-d embeddings, 32 captions + 640 region
captions a step) with random unit vectors in place of the text tower, and measures what each
layout holds:

- before: a dict of caption -> row of the encoder's output, which stays on the accelerator
  (fp32: F.normalize under autocast returns fp32);
- now (``fineclip.models.text_cache``): one host table (fp16 for GPU-computed embeddings) plus
  a dict caption -> row; nothing stays on the accelerator, a step moves its own rows.

Both are measured on this machine's memory (tensor storage bytes, and tracemalloc for the Python
objects); on a GPU the first number of the old layout is GPU memory.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import torch
import torch.nn.functional as F

from fineclip.models.text_cache import TextEmbeddingCache


def fake_encoder(dim: int, dtype: torch.dtype):
    def encode(texts: list[str]) -> torch.Tensor:
        return F.normalize(torch.randn(len(texts), dim), dim=-1).to(dtype)
    return encode


def old_layout(captions: list[str], per_step: int, dim: int) -> tuple[int, int]:
    """(tensor bytes held, Python-object bytes) of the old dict-of-rows cache."""
    store: dict[str, torch.Tensor] = {}
    encode = fake_encoder(dim, torch.float32)
    tracemalloc.start()
    for start in range(0, len(captions), per_step):
        batch = captions[start : start + per_step]
        store.update(zip(batch, encode(batch), strict=True))
    python_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in store.values()}
    return sum(storages.values()), python_bytes


def new_layout(captions: list[str], per_step: int, dim: int) -> tuple[int, int, float]:
    """(table bytes, Python-object bytes, ms per warm lookup of one step) of TextEmbeddingCache."""
    cache = TextEmbeddingCache(dtype=torch.float16)  # what "auto" stores for GPU-computed embeddings
    encode = fake_encoder(dim, torch.float32)
    cpu = torch.device("cpu")
    tracemalloc.start()
    for start in range(0, len(captions), per_step):
        cache.lookup(captions[start : start + per_step], encode, cpu)
    python_bytes = tracemalloc.get_traced_memory()[0]  # Python objects only: tensor data is not traced
    tracemalloc.stop()
    step = captions[:: max(1, len(captions) // per_step)][:per_step]
    begin = time.perf_counter()
    for _ in range(20):
        cache.lookup(step, encode, cpu)
    return cache.host_bytes, python_bytes, (time.perf_counter() - begin) / 20 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1_400_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-step", type=int, default=672)
    args = parser.parse_args()
    captions = [f"a region caption number {i} of a coco-sized data set" for i in range(args.captions)]
    torch.manual_seed(0)
    old_tensor, old_python = old_layout(captions, args.per_step, args.dim)
    new_table, new_python, lookup_ms = new_layout(captions, args.per_step, args.dim)
    gb = 2**30
    print(f"{args.captions:,} captions x {args.dim}-d embeddings, {args.per_step} captions per step")
    print("| layout | on the accelerator | on the host | warm lookup of one step |")
    print("|---|---|---|---|")
    print(f"| before: dict of fp32 rows on the device | {old_tensor / gb:.2f} GB | {old_python / gb:.2f} GB (dict) "
          "| — |")
    print(f"| now: fp16 host table + dict | 0 GB (+ {args.per_step * args.dim * 4 / 2**20:.1f} MB per step, "
          f"transient) | {new_table / gb:.2f} GB table + {new_python / gb:.2f} GB dict | {lookup_ms:.2f} ms |")


if __name__ == "__main__":
    main()
