"""A whole synthetic Llama-2-7B-shaped checkpoint family, written streaming (for whole_model.py).

    python benchmarks/synthetic_whole.py --out /work/bench/7b --layers 32     # base, full-ft, lora-r16, lora-r64
    python benchmarks/synthetic_whole.py --out /tmp/tiny --shape tiny --layers 2

What it writes under --out (bf16; every tensor of a real Llama-2-7B, in the Hugging Face names and order):
- base/: model-0000i-of-0000n.safetensors shards of at most ~2 GB + model.safetensors.index.json +
  config.json (Llama-2-7B's): embed_tokens and lm_head (32000 x 4096), per layer the two RMSNorm vectors,
  q/k/v/o (4096 x 4096), gate/up (11008 x 4096), down (4096 x 11008), and the final norm;
- full-ft/: a full fine-tune of every tensor: base + a dense update (~5% of the weights' scale) + a weak rank-8
  one (make_synthetic_llama.full_update), written the same way; `--full-layers N` fine-tunes only the first N
  layers (the rest, and the embeddings, equal the base's) when the run is to be cut short;
- lora-r16/, lora-r64/: PEFT LoRA adapters on all seven projections (adapter_config.json +
  adapter_model.safetensors with peft's key names, base_model.model.<module>.lora_A/B.weight; checked against
  peft itself in tests/test_whole_model.py), lora_alpha = 2 r, different random factors.

Streaming: every shard's header is known before any weight exists (the shapes are fixed), so each tensor is
written the moment it is generated and dropped; the builder holds one matrix (and its fine-tuned version) in
fp32 at a time, ~1 GB at 7B shapes, whatever the depth.  Directories are written under a temporary name and
renamed when complete, with BUILD.json (the arguments) last, so a rerun reuses a finished build and never a
half-written one.  The matrices come from make_synthetic_llama.py (power-law structure over a Gaussian bulk;
see there), so the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_llama import (
    MODULES,
    _generator,
    base_weight,
    full_update,
    lora_factors,
)

SHARD_BYTES = 2 * 10**9  # ~2 GB shards, as Hugging Face writes 7B checkpoints
FULL_STRENGTH = 0.1  # rank-8 part of the full fine-tune, relative to sigma_1 (make_synthetic_llama "full-a")
ADAPTERS = {"lora-r16": (16, 10), "lora-r64": (64, 11)}  # name -> (rank, random stream)
CHUNK_ROWS = 4096  # embeddings are generated and written this many rows at a time
DTYPES = {torch.bfloat16: ("BF16", 2), torch.float16: ("F16", 2), torch.float32: ("F32", 4)}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    vocab: int
    heads: int


SHAPES = {"7b": Shape(4096, 11008, 32000, 32), "tiny": Shape(64, 172, 128, 4)}


class StreamingSafetensors:
    """Safetensors shards written tensor by tensor in a fixed order, never holding more than one in memory.

    `layout` is the full list of (name, shape) in write order; it is split into shards of at most
    `shard_bytes` and each shard's header (offsets included) is written when the shard is opened.  `write`
    takes a tensor's data in row chunks; a name, shape or byte count other than the layout's is an error.
    `close` renames the shards to model-0000i-of-0000n.safetensors (or `single`) and writes the index.
    """

    def __init__(self, directory: Path, layout: list[tuple[str, tuple[int, ...]]], *, dtype: torch.dtype,
                 shard_bytes: int | None = SHARD_BYTES, single: str | None = None) -> None:
        self.directory, self.dtype, self.single = directory, dtype, single
        code, self.itemsize = DTYPES[dtype]
        self.shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in layout:
            nbytes = math.prod(shape) * self.itemsize
            if shard_bytes is not None and self.shards[-1] and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, shape))
            size += nbytes
        self.code = code
        self.order = iter([(i, name, shape) for i, shard in enumerate(self.shards) for name, shape in shard])
        self.handle, self.open_index, self.total = None, -1, 0
        directory.mkdir(parents=True, exist_ok=True)

    def _open(self, index: int) -> None:
        if self.handle is not None:
            self.handle.close()
        entries, offset = {}, 0
        for name, shape in self.shards[index]:
            nbytes = math.prod(shape) * self.itemsize
            entries[name] = {"dtype": self.code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.handle = open(self.directory / f"shard-{index}.tmp", "wb")  # noqa: SIM115 (open across write calls)
        self.handle.write(struct.pack("<Q", len(header)) + header)
        self.open_index = index
        self.total += offset

    def write(self, name: str, chunks: Iterator[torch.Tensor] | torch.Tensor) -> None:
        index, expected, shape = next(self.order)
        if name != expected:
            raise ValueError(f"tensor {name} written where the layout has {expected}")
        if index != self.open_index:
            self._open(index)
        written = 0
        for chunk in ([chunks] if isinstance(chunks, torch.Tensor) else chunks):
            data = chunk.to(self.dtype).contiguous().view(torch.uint8).numpy()  # raw little-endian bytes
            self.handle.write(memoryview(data))
            written += data.nbytes
        if written != math.prod(shape) * self.itemsize:
            raise ValueError(f"tensor {name}: {written} bytes written, its shape {shape} needs "
                             f"{math.prod(shape) * self.itemsize}")

    def close(self) -> None:
        if next(self.order, None) is not None:
            raise ValueError(f"{self.directory}: closed before every tensor of the layout was written")
        self.handle.close()
        count, weight_map = len(self.shards), {}
        for i, shard in enumerate(self.shards):
            final = self.single or f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{i}.tmp", self.directory / final)
            weight_map.update({name: final for name, _ in shard})
        if self.single is None:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def llama_config(shape: Shape, layers: int) -> dict:
    """Llama-2-7B's config.json (meta-llama/Llama-2-7b-hf), at `shape` and `layers`, in bf16."""
    return {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": shape.hidden, "initializer_range": 0.02, "intermediate_size": shape.intermediate,
            "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": shape.heads,
            "num_hidden_layers": layers, "num_key_value_heads": shape.heads, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": shape.vocab}


def dims(shape: Shape) -> dict[str, int]:
    return {"h": shape.hidden, "i": shape.intermediate}


def base_layout(shape: Shape, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model in the order the builder writes it (Hugging Face's order)."""
    d = dims(shape)
    layout: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        layout.append((f"{prefix}.input_layernorm.weight", (shape.hidden,)))
        layout += [(f"{prefix}.{module}.weight", (d[rows], d[cols])) for module, (rows, cols) in MODULES.items()]
        layout.append((f"{prefix}.post_attention_layernorm.weight", (shape.hidden,)))
    return layout + [("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (shape.vocab, shape.hidden))]


def adapter_layout(shape: Shape, layers: int, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """peft's saved names and shapes: lora_A (r, in), lora_B (out, r) per module."""
    d = dims(shape)
    layout = []
    for layer in range(layers):
        for module, (rows, cols) in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            layout += [(f"{prefix}.lora_A.weight", (rank, d[cols])), (f"{prefix}.lora_B.weight", (d[rows], rank))]
    return layout


def adapter_config(rank: int, base: Path) -> dict:
    """The fields peft 0.x writes for LoraConfig(r, lora_alpha=2r, target_modules=<the seven>, CAUSAL_LM)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": sorted(m.split(".")[-1] for m in MODULES), "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
            "base_model_name_or_path": str(base)}


def _embedding_chunks(shape: Shape, seed: int, which: int, tuned: bool) -> Iterator[torch.Tensor]:
    """Gaussian rows (std 0.02, Llama's initialisation), CHUNK_ROWS at a time; the full fine-tune's are the same
    rows (regenerated from the same seed) plus a dense update.  lorascale skips embeddings by default, so their
    spectrum does not matter, only that they are there and read-sized."""
    gen, noise = _generator(seed, 10_000 + which, 0, 0), _generator(seed, 10_000 + which, 0, 1)
    for start in range(0, shape.vocab, CHUNK_ROWS):
        rows = 0.02 * torch.randn(min(CHUNK_ROWS, shape.vocab - start), shape.hidden, generator=gen)
        yield rows + 0.001 * torch.randn(rows.shape, generator=noise) if tuned else rows


def _vector(shape: Shape, gen: torch.Generator | None) -> torch.Tensor:
    """An RMSNorm weight: ones in the base, ones plus a small update in the fine-tune."""
    ones = torch.ones(shape.hidden)
    return ones if gen is None else ones + 0.01 * torch.randn(shape.hidden, generator=gen)


def _write_layer(writers: dict[str, StreamingSafetensors], shape: Shape, layer: int, seed: int) -> None:
    """One decoder layer into the base / full-ft / adapter writers present, one matrix in memory at a time."""
    d, prefix = dims(shape), f"model.layers.{layer}"
    for position, norm in enumerate(("input_layernorm", None, "post_attention_layernorm")):
        if norm is None:
            for index, (module, (rows, cols)) in enumerate(MODULES.items()):
                _write_matrix(writers, f"{prefix}.{module}", (d[rows], d[cols]), (seed, layer, index))
            continue
        if "base" in writers:
            writers["base"].write(f"{prefix}.{norm}.weight", _vector(shape, None))
        if "full-ft" in writers:
            writers["full-ft"].write(f"{prefix}.{norm}.weight", _vector(shape, _generator(seed, layer, 50 + position, 0)))


def _write_matrix(writers: dict[str, StreamingSafetensors], module: str, size: tuple[int, int],
                  key: tuple[int, int, int]) -> None:
    seed, layer, index = key
    if "base" in writers or "full-ft" in writers:
        w0 = base_weight(*size, _generator(seed, layer, index, 0))  # (m, n) fp32
        if "base" in writers:
            writers["base"].write(f"{module}.weight", w0)
        if "full-ft" in writers:
            w0 += full_update(w0, FULL_STRENGTH, _generator(seed, layer, index, 1))
            writers["full-ft"].write(f"{module}.weight", w0)
        del w0
    for name, (rank, stream) in ADAPTERS.items():
        if name in writers:
            a, b = lora_factors(*size, rank, _generator(seed, layer, index, stream))  # (r, n), (m, r)
            writers[name].write(f"base_model.model.{module}.lora_A.weight", a)
            writers[name].write(f"base_model.model.{module}.lora_B.weight", b)


def _writers(out: Path, parts: list[str], shape: Shape, layers: int) -> dict[str, StreamingSafetensors]:
    writers = {}
    for part in parts:
        tmp = out / f".{part}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a build killed half-way
        if part in ADAPTERS:
            writers[part] = StreamingSafetensors(tmp, adapter_layout(shape, layers, ADAPTERS[part][0]),
                                                 dtype=torch.bfloat16, shard_bytes=None,
                                                 single="adapter_model.safetensors")
        else:
            writers[part] = StreamingSafetensors(tmp, base_layout(shape, layers), dtype=torch.bfloat16)
    return writers


PARTS = ("base", "full-ft", *ADAPTERS)


def missing_parts(out: Path, *, layers: int = 32, shape: str = "7b", seed: int = 0,
                  parts: tuple[str, ...] = PARTS) -> list[str]:
    """The parts a build with these arguments would write: those without a matching BUILD.json."""
    record = {"layers": layers, "shape": asdict(SHAPES[shape]), "seed": seed, "dtype": "bfloat16"}
    return [p for p in parts if not _built(out / p, record)]


def build(out: Path, *, layers: int = 32, shape: str = "7b", seed: int = 0,
          parts: tuple[str, ...] = PARTS) -> dict[str, Path]:
    """Write the parts missing under `out` (a part is there when its BUILD.json matches these arguments) in one
    streaming pass over the layers; return every part's path."""
    record = {"layers": layers, "shape": asdict(SHAPES[shape]), "seed": seed, "dtype": "bfloat16"}
    missing = missing_parts(out, layers=layers, shape=shape, seed=seed, parts=parts)
    if missing:
        writers = _writers(out, missing, SHAPES[shape], layers)
        _write_all(writers, SHAPES[shape], layers, seed)
        for part, writer in writers.items():
            writer.close()
            _finish(out, part, record, SHAPES[shape], layers)
    return {part: out / part for part in parts}


def _write_all(writers: dict[str, StreamingSafetensors], shape: Shape, layers: int, seed: int) -> None:
    for part in ("base", "full-ft"):
        if part in writers:
            writers[part].write("model.embed_tokens.weight", _embedding_chunks(shape, seed, 0, part == "full-ft"))
    for layer in range(layers):
        _write_layer(writers, shape, layer, seed)
        print(f"layer {layer + 1}/{layers} written", file=sys.stderr, flush=True)
    for part in ("base", "full-ft"):
        if part in writers:
            gen = _generator(seed, 20_000, 0, 0) if part == "full-ft" else None
            writers[part].write("model.norm.weight", _vector(shape, gen))
            writers[part].write("lm_head.weight", _embedding_chunks(shape, seed, 1, part == "full-ft"))


def _finish(out: Path, part: str, record: dict, shape: Shape, layers: int) -> None:
    """config files into the part's temporary directory, rename it into place, then BUILD.json last."""
    tmp, final = out / f".{part}.tmp", out / part
    if part in ADAPTERS:
        config = adapter_config(ADAPTERS[part][0], out / "base")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        (tmp / "config.json").write_text(json.dumps(llama_config(shape, layers), indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (final / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")


def _built(path: Path, record: dict) -> bool:
    try:
        return json.loads((path / "BUILD.json").read_text()) == record
    except (OSError, ValueError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B has 32)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="base,full-ft," + ",".join(ADAPTERS))
    args = parser.parse_args()
    for name, path in build(args.out, layers=args.layers, shape=args.shape, seed=args.seed,
                            parts=tuple(args.parts.split(","))).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
