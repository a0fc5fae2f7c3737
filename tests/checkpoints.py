"""Tiny but REAL checkpoints for tests, written by transformers and peft themselves.

- Llama (hidden 64, 2 layers, intermediate 128, 2 KV heads, vocab 96) saved with `save_pretrained(...,
  max_shard_size=...)`: real `model-0000i-of-0000n.safetensors` shards + `model.safetensors.index.json`,
  in fp32, fp16 or bf16.
- A "full fine-tune": a copy with a small dense update of every weight (norms and embeddings too).
- PEFT LoRA adapters made with `get_peft_model` + `save_pretrained` (plain, rsLoRA, rank/alpha patterns,
  DoRA), and GPT-2 (Conv1D, fan_in_fan_out) adapters; IA3 and pickle-only adapters for the error paths.

Random init gives Marchenko-Pastur spectra whose neighbouring singular values can nearly coincide, which
makes individual singular vectors (and so max_cos) ill-defined in fp32.  Every 2-D weight inside the layers
is therefore replaced by a matrix with a geometrically decaying spectrum (smallest/largest = 1/20, so the
relative gap between neighbours is at least ~2.5e-3 of sigma_max), and LoRA factors are set explicitly to
well separated strengths.  The tests still derive their tolerances from the gaps they actually find.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_MODULES = ("c_attn", "c_proj", "c_fc")

# Top singular value of every base matrix, and the strengths (singular values of s * B @ A, relative to it)
# of the LoRA updates: comparable to the base's top values, as trained adapters with intruders have.
TOP = 1.0
LORA_STRENGTHS = (2.0, 1.45, 1.05, 0.75, 0.55, 0.4, 0.3, 0.22)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def separated(rows: int, cols: int, gen: torch.Generator, *, top: float = TOP, floor: float = 0.05) -> torch.Tensor:
    """U diag(s) V^T with s_i = top * rho^i decaying geometrically from `top` to `floor * top`."""
    p = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, p, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, p, generator=gen, dtype=torch.float64))
    rho = floor ** (1.0 / max(p - 1, 1))
    s = top * rho ** torch.arange(p, dtype=torch.float64)
    return (u * s) @ v.T  # (rows, p) @ (p, cols)


def _is_layer_matrix(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 2 and (".layers." in name or ".h." in name)


def _condition(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace every 2-D weight inside the layers by a well separated matrix (stored shape kept)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _is_layer_matrix(name, param):
                param.copy_(separated(*param.shape, gen).to(param.dtype))
    return model


# --- Models -----------------------------------------------------------------------------------------------------


def llama_config(**overrides):
    from transformers import LlamaConfig

    values = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64,
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None}
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **config_overrides):
    """A float32 LlamaForCausalLM with well separated layer matrices."""
    _quiet_transformers()
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return _condition(LlamaForCausalLM(llama_config(**config_overrides)).eval(), seed + 1000)


def tiny_gpt2(seed: int = 0):
    """A float32 GPT2LMHeadModel (Conv1D layers storing W as [in, out]) with well separated matrices."""
    _quiet_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return _condition(GPT2LMHeadModel(config).eval(), seed + 2000)


def finetuned(model: torch.nn.Module, seed: int = 1, *, noise: float = 2e-3, nudge: float = 0.03) -> torch.nn.Module:
    """A "full fine-tune" of `model`: dense noise on every weight, plus for layer matrices a small change
    along their own top singular directions (what full fine-tuning looks like in the paper)."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            w = param.detach().to(torch.float64)
            update = noise * torch.randn(w.shape, generator=gen, dtype=torch.float64)
            if _is_layer_matrix(name, param):
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                update += (u[:, :6] * (nudge * s[:6])) @ vh[:6]
            param.copy_((w + update).to(param.dtype))
    return tuned


def save_full(model: torch.nn.Module, directory: Path, dtype: str = "fp32", *,
              max_shard_size: str | int | None = "120KB") -> Path:
    """save_pretrained in `dtype`; with the default shard size the tiny Llama gives 2-3 shards + index."""
    directory = Path(directory)
    copy_ = copy.deepcopy(model).to(DTYPES[dtype])
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    copy_.save_pretrained(directory, **kwargs)
    return directory


def save_full_bin(model: torch.nn.Module, directory: Path, dtype: str = "fp32", *,
                  max_shard_size: str | int | None = "120KB") -> Path:
    """The pickled layout transformers 4.x `save_pretrained(..., safe_serialization=False)` wrote (transformers 5
    writes safetensors only): `pytorch_model.bin`, or `pytorch_model-0000i-of-0000n.bin` shards plus
    `pytorch_model.bin.index.json`, each a torch.save'd state dict, sharded by huggingface_hub's splitter."""
    from huggingface_hub import split_torch_state_dict_into_shards

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to(DTYPES[dtype]) for name, tensor in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size if max_shard_size is not None else 2**40)
    for filename, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, directory / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(directory)
    return directory


# --- PEFT adapters ----------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """A saved adapter and what peft itself says about it (the tests' ground truth for the scale)."""

    path: Path
    scaling: dict[str, float]  # module path without "base_model.model." -> peft's scaling
    ranks: dict[str, int]
    fan_in_fan_out: bool
    model: object = field(repr=False, default=None)  # the live PeftModel (for merge_and_unload)

    def merged(self, directory: Path, dtype: str = "fp32", *, max_shard_size: str | int | None = None) -> Path:
        """peft's own merge: merge_and_unload() saved as a full checkpoint."""
        merged = copy.deepcopy(self.model).merge_and_unload()
        return save_full(merged, directory, dtype, max_shard_size=max_shard_size)


def _peft_model(model: torch.nn.Module, config):
    """get_peft_model on a copy (peft modifies the model in place)."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # transformers deprecations that peft triggers; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(copy.deepcopy(model), config)


def lora_adapter(model: torch.nn.Module, directory: Path, *, seed: int = 2, r: int = 4, lora_alpha: float = 8,
                 target_modules=LLAMA_MODULES, strengths=LORA_STRENGTHS, save_dtype: str = "fp32",
                 magnitude_noise: float = 0.3, **config) -> Adapter:
    """get_peft_model + LoraConfig(init_lora_weights=False) + save_pretrained, with factors set so that
    s * B @ A has singular values `strengths * TOP` along random directions (s is peft's own scaling).

    With use_dora=True, peft initialises each magnitude vector m to the row norms of W0 + s*B@A for its
    initial factors; after the factors are replaced, m is also multiplied by exp(magnitude_noise * N(0, 1))
    per row, so that m / ||W0 + s*B@A|| is far from 1 (a trained DoRA adapter, not an identity)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    _quiet_transformers()
    peft_config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                             init_lora_weights=False, lora_dropout=0.0, **config)
    peft_model = _peft_model(model, peft_config)
    gen = torch.Generator().manual_seed(seed)
    scaling, ranks = {}, {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in getattr(module, "lora_A", {}):
                continue
            a_param, b_param = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
            rank, scale = a_param.shape[0], float(module.scaling["default"])
            a, _ = torch.linalg.qr(torch.randn(a_param.shape[1], rank, generator=gen, dtype=torch.float64))
            q, _ = torch.linalg.qr(torch.randn(b_param.shape[0], rank, generator=gen, dtype=torch.float64))
            strength = torch.tensor([strengths[i % len(strengths)] * TOP for i in range(rank)], dtype=torch.float64)
            a_param.copy_(a.T.to(a_param.dtype))
            b_param.copy_((q * (strength / scale)).to(b_param.dtype))
            if "default" in getattr(module, "lora_magnitude_vector", {}):
                m = module.lora_magnitude_vector["default"].weight  # (out,)
                noise = magnitude_noise * torch.randn(m.shape, generator=gen, dtype=torch.float64)
                m.mul_(torch.exp(noise).to(m.dtype))
            key = name.removeprefix("base_model.model.")
            scaling[key], ranks[key] = scale, rank
    if save_dtype != "fp32":
        peft_model = peft_model.to(DTYPES[save_dtype])
    peft_model.save_pretrained(directory)
    return Adapter(Path(directory), scaling, ranks, bool(peft_model.peft_config["default"].fan_in_fan_out),
                   peft_model)


def lora_bias_adapter(model: torch.nn.Module, directory: Path) -> Path:
    """A LoRA adapter that also trains a bias (lora_bias=True), which lorascale refuses."""
    from peft import LoraConfig

    with warnings.catch_warnings():  # peft warns that the Llama's bias-free layers make the bias unmergeable
        warnings.simplefilter("ignore")
        _peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False, lora_bias=True)).save_pretrained(directory)
    return Path(directory)


def dora_delta(adapter: Adapter, module: str, w0: np.ndarray,
               tensors: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """W' - W0 of a DoRA module in float64, from the saved file, by the DoRA paper's formula
    W' = m * V / ||V||_row, V = W0 + s * B @ A ([out, in]; transposed back to [in, out] for fan_in_fan_out)."""
    tensors = load_float64(adapter.path) if tensors is None else tensors
    magnitude = tensors[f"base_model.model.{module}.lora_magnitude_vector"]
    delta = lora_delta(adapter, module, tensors)  # stored layout
    v = (w0 + delta).T if adapter.fan_in_fan_out else w0 + delta  # (out, in)
    merged = (magnitude / np.linalg.norm(v, axis=1))[:, None] * v
    return (merged.T if adapter.fan_in_fan_out else merged) - w0


def ia3_adapter(model: torch.nn.Module, directory: Path) -> Path:
    """A non-LoRA PEFT adapter (IA3), made with peft."""
    from peft import IA3Config

    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    _peft_model(model, config).save_pretrained(directory)
    return Path(directory)


def pickle_adapter(model: torch.nn.Module, directory: Path) -> Path:
    """A LoRA adapter saved the old way: adapter_model.bin only (a pickle lorascale must never open)."""
    from peft import LoraConfig

    peft_model = _peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(directory, safe_serialization=False)
    return Path(directory)


# --- Reading back, for oracles ----------------------------------------------------------------------------------


def weight_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(f"no safetensors weights in {directory}")


def load_float64(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, read with safetensors itself and upcast exactly to float64."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = handle.get_tensor(name).to(torch.float64).numpy()
    return tensors


def lora_delta(adapter: Adapter, module: str, tensors: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """s * B @ A in float64 (transposed to the stored [in, out] layout for fan_in_fan_out), from the saved file."""
    tensors = load_float64(adapter.path) if tensors is None else tensors
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    b = tensors[f"base_model.model.{module}.lora_B.weight"]
    delta = adapter.scaling[module] * (b @ a)
    return delta.T if adapter.fan_in_fan_out else delta


def copy_checkpoint(source: Path, target: Path) -> Path:
    """A private copy of a (session-scoped, shared) fixture checkpoint that a test may damage."""
    shutil.copytree(source, target)
    return Path(target)


def rewrite_tensor(path: Path, name: str, fn) -> None:
    """Rewrite one tensor of a safetensors file in place (same dtype and shape), keeping the others."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
