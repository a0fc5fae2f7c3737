"""Write a synthetic Llama-2-7B-shaped base, two full fine-tunes and two LoRA adapters, as real files.

    python benchmarks/make_synthetic_llama.py --out /tmp/llama-synth              # 2 layers, real shapes
    python benchmarks/make_synthetic_llama.py --out /tmp/llama-synth --layers 32  # the whole 7B stack
    python benchmarks/make_synthetic_llama.py --out /tmp/half --scale 0.5         # every dimension halved

Layout (what lorascale and the reference read):
- base/, full-a/, full-b/: fp16 sharded safetensors (model-0000i-of-0000n.safetensors +
  model.safetensors.index.json + config.json); per layer q,k,v,o (4096 x 4096), gate, up (11008 x 4096),
  down (4096 x 11008), and the two RMSNorm vectors.  No embeddings: lorascale skips them by default and
  the paper compares the linear layers.
- lora-r16/, lora-r64/: PEFT adapters (adapter_config.json + adapter_model.safetensors, fp16) on all 7
  modules, lora_alpha = 2 r as in the paper's LoRA-TMLR-2024 checkpoints.

Weights are not Gaussian noise, whose flat Marchenko-Pastur spectrum no trained matrix has: each W0 is a
rank-256 part with power-law singular values (s_i ~ i^-0.7) on top of a Gaussian bulk, entries ~0.02 like
Llama's.  Full fine-tunes add a small dense update plus a weak rank-8 one (no intruders expected); adapters
add s * B @ A with strengths around the top base singular value (intruders expected), as trained adapters
with intruder dimensions have.  Everything is seeded: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE = 4096, 11008
MODULES = {  # name -> (rows, cols) as nn.Linear stores them, [out, in]
    "self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
    "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
    "mlp.down_proj": ("h", "i"),
}
# name -> strength of the rank-8 part, relative to sigma_1; full-c, full-d for 1 base x 4 full fine-tunes
FULL_TUNES = {"full-a": 0.1, "full-b": 0.15, "full-c": 0.12, "full-d": 0.2}
DEFAULT_TUNES = ("full-a", "full-b", "lora-r16", "lora-r64")
ADAPTERS = {"lora-r16": 16, "lora-r64": 64}
SHARD_BYTES = 2 * 2**30


def _generator(seed: int, layer: int, module: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1009 + layer) * 101 + module) * 101 + stream)


def _unit_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=gen)
    return x / torch.linalg.vector_norm(x, dim=0)  # random directions, nearly orthogonal in high dimension


def base_weight(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Power-law structured part (rank 256) over a Gaussian bulk; top singular value ~4x the bulk edge."""
    bulk_std = 0.02
    edge = bulk_std * (math.sqrt(rows) + math.sqrt(cols))  # largest singular value of the bulk
    rank = min(256, rows, cols)
    strengths = 4.0 * edge * torch.arange(1, rank + 1, dtype=torch.float32) ** -0.7
    structured = (_unit_columns(rows, rank, gen) * strengths) @ _unit_columns(cols, rank, gen).T
    return structured + bulk_std * torch.randn(rows, cols, generator=gen)  # (m, r) @ (r, n) + (m, n)


def full_update(w0: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    rows, cols = w0.shape
    sigma_1 = 4.0 * 0.02 * (math.sqrt(rows) + math.sqrt(cols))
    dense = 0.001 * torch.randn(rows, cols, generator=gen)  # ~5% of the weights' scale, full rank
    strengths = strength * sigma_1 * 0.5 ** torch.arange(8.0)  # rank 8, weaker than the base's top values
    low = (_unit_columns(rows, 8, gen) * strengths) @ _unit_columns(cols, 8, gen).T  # (m, 8) @ (8, n)
    return dense + low


def lora_factors(rows: int, cols: int, r: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, cols), B (rows, r) with scale s = alpha / r = 2: s B A has singular values ~1.5 sigma_1 ... decaying."""
    sigma_1 = 4.0 * 0.02 * (math.sqrt(rows) + math.sqrt(cols))
    strengths = 1.5 * sigma_1 * 0.8 ** torch.arange(float(r))
    a = _unit_columns(cols, r, gen).T.contiguous()  # (r, cols)
    b = _unit_columns(rows, r, gen) * (strengths / 2.0)  # (rows, r); / s so that s B A has `strengths`
    return a, b


class ShardedWriter:
    """Accumulates fp16 tensors and writes model-0000i-of-0000n.safetensors shards plus the index."""

    def __init__(self, directory: Path, config: dict) -> None:
        self.directory, self.config = directory, config
        directory.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.to(torch.float16).contiguous()
        if self.pending and self.pending_bytes + tensor.numel() * 2 > SHARD_BYTES:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * 2

    def _flush(self) -> None:
        index = len(self.shards)
        save_file(self.pending, self.directory / f"shard-{index}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        total = len(self.shards)
        weight_map, size = {}, 0
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            tmp = self.directory / f"shard-{i}.tmp"
            size += tmp.stat().st_size
            tmp.rename(self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.directory / "config.json").write_text(json.dumps(self.config, indent=2))


def build(out: Path, *, layers: int = 2, scale: float = 1.0, seed: int = 0,
          only: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write base, full-a, full-b, lora-r16, lora-r64 under `out` (or base and the fine-tunes named in
    `only`); return their paths.  A fine-tune's bytes do not depend on which others are written."""
    only = DEFAULT_TUNES if only is None else only
    tunes = {name: strength for name, strength in FULL_TUNES.items() if name in only}
    adapter_ranks = {name: r for name, r in ADAPTERS.items() if name in only}
    dims = {"h": round(HIDDEN * scale), "i": round(INTERMEDIATE * scale)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["h"],
              "intermediate_size": dims["i"], "num_hidden_layers": layers, "num_attention_heads": 32,
              "torch_dtype": "float16", "lorascale_synthetic": {"seed": seed, "scale": scale}}
    writers = {name: ShardedWriter(out / name, config) for name in ("base", *tunes)}
    adapters: dict[str, dict[str, torch.Tensor]] = {name: {} for name in adapter_ranks}
    for layer in range(layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            for writer in writers.values():
                writer.add(f"model.layers.{layer}.{name}.weight", torch.ones(dims["h"]))
        for index, (module, (rows, cols)) in enumerate(MODULES.items()):
            m, n = dims[rows], dims[cols]
            tensor = f"model.layers.{layer}.{module}.weight"
            w0 = base_weight(m, n, _generator(seed, layer, index, 0))
            writers["base"].add(tensor, w0)
            for t, (tune, strength) in enumerate(FULL_TUNES.items()):
                if tune not in tunes:
                    continue
                writers[tune].add(tensor, w0 + full_update(w0, strength, _generator(seed, layer, index, 1 + t)))
            del w0
            for a_i, (adapter, r) in enumerate(ADAPTERS.items()):
                if adapter not in adapter_ranks:
                    continue
                a, b = lora_factors(m, n, r, _generator(seed, layer, index, 10 + a_i))
                prefix = f"base_model.model.model.layers.{layer}.{module}"
                adapters[adapter][f"{prefix}.lora_A.weight"] = a.to(torch.float16)
                adapters[adapter][f"{prefix}.lora_B.weight"] = b.to(torch.float16)
    for writer in writers.values():
        writer.close()
    for adapter, r in adapter_ranks.items():
        directory = out / adapter
        directory.mkdir(parents=True, exist_ok=True)
        save_file(adapters[adapter], directory / "adapter_model.safetensors", metadata={"format": "pt"})
        peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                       "target_modules": [m.split(".")[-1] for m in MODULES], "lora_dropout": 0.0,
                       "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
                       "base_model_name_or_path": str(out / "base")}
        (directory / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return {name: out / name for name in ("base", *tunes, *adapter_ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Llama-2-7B has 32)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dimension (1 = real 7B shapes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = build(args.out, layers=args.layers, scale=args.scale, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
