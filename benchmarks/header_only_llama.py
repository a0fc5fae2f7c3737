"""Write a header-only Llama-shaped checkpoint and LoRA adapter: valid safetensors headers whose data regions
are sparse (the files have their full size, but no weight byte is written or stored on disk), so that
`lorascale run --dry-run` can plan a 70B comparison on any laptop.

    python benchmarks/header_only_llama.py --out /tmp/llama70b-headers              # Llama-2-70B shapes
    python benchmarks/header_only_llama.py --out /tmp/llama7b-headers --shape 7b
    lorascale run --base /tmp/llama70b-headers/base --tuned /tmp/llama70b-headers/lora-r16 --out x --dry-run

Shapes (bf16, nn.Linear [out, in]): 70B: 80 layers, hidden 8192, intermediate 28672, k/v 1024 (grouped-query
attention: 8 key-value heads of 128), vocab 32000; 7B: 32 layers, hidden 4096, intermediate 11008, k/v 4096.
Reading a tensor of these files gives zeros; a dry run never does (tests/test_dry_run.py checks it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

SHAPES = {
    "70b": {"layers": 80, "hidden": 8192, "intermediate": 28672, "kv": 1024, "vocab": 32000},
    "7b": {"layers": 32, "hidden": 4096, "intermediate": 11008, "kv": 4096, "vocab": 32000},
}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
LAYERS_PER_SHARD = 4


def write_header_only(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """A safetensors file at `path` with `tensors` (name -> (dtype, shape)) in its header and a sparse data
    region of the right length (truncate: no data byte written); returns the file's size."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_BYTES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def layer_tensors(layer: int, dims: dict[str, int], dtype: str = "BF16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """The seven projections and two norms of one decoder layer."""
    h, i, kv = dims["hidden"], dims["intermediate"], dims["kv"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
              "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    return {f"model.layers.{layer}.{name}.weight": (dtype, shape) for name, shape in shapes.items()}


def build(out: Path, dims: dict[str, int], *, rank: int = 16) -> dict[str, Path]:
    """base/ (sharded, with an index and config.json) and lora-r{rank}/ (PEFT, all seven projections)."""
    base, layers = out / "base", dims["layers"]
    weight_map, total = {}, 0
    shards = [list(range(s, min(s + LAYERS_PER_SHARD, layers))) for s in range(0, layers, LAYERS_PER_SHARD)]
    for index, members in enumerate(shards):
        tensors = {}
        if index == 0:
            tensors["model.embed_tokens.weight"] = ("BF16", (dims["vocab"], dims["hidden"]))
        for layer in members:
            tensors.update(layer_tensors(layer, dims))
        if index == len(shards) - 1:
            tensors["model.norm.weight"] = ("BF16", (dims["hidden"],))
            tensors["lm_head.weight"] = ("BF16", (dims["vocab"], dims["hidden"]))
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_header_only(base / name, tensors)
        weight_map.update({tensor: name for tensor in tensors})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["hidden"],
              "intermediate_size": dims["intermediate"], "num_hidden_layers": layers, "num_attention_heads": 64,
              "num_key_value_heads": dims["hidden"] // 128 * dims["kv"] // dims["hidden"], "vocab_size": dims["vocab"],
              "torch_dtype": "bfloat16"}
    (base / "config.json").write_text(json.dumps(config, indent=1))
    adapter = out / f"lora-r{rank}"
    factors = {}
    for layer in range(layers):
        for tensor, (_, shape) in layer_tensors(layer, dims).items():
            if len(shape) != 2:
                continue
            prefix = "base_model.model." + tensor.removesuffix(".weight")
            factors[f"{prefix}.lora_A.weight"] = ("BF16", (rank, shape[1]))
            factors[f"{prefix}.lora_B.weight"] = ("BF16", (shape[0], rank))
    write_header_only(adapter / "adapter_model.safetensors", factors)
    peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": str(base)}
    (adapter / "adapter_config.json").write_text(json.dumps(peft, indent=1))
    return {"base": base, f"lora-r{rank}": adapter}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    for name, path in build(args.out, SHAPES[args.shape], rank=args.rank).items():
        used = sum(os.stat(p).st_blocks * 512 for p in path.iterdir())
        print(f"{name}: {path} ({used / 1e6:.1f} MB on disk)")


if __name__ == "__main__":
    main()
