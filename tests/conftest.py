"""Shared fixtures: the isolated caches every test runs with, tiny real checkpoints (built once per session),
and the offline hub cache."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import checkpoints
from hubcache import offline_hub, point_hub_at  # noqa: F401  (offline_hub: the fixture, for tests of the hub path)


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test, and every session fixture, runs with its caches in a session tmp dir, never the user's:
    lorascale's base-SVD cache (on by default), the Hugging Face hub cache (offline), and XDG_CACHE_HOME
    (the default of both, and where matplotlib keeps its font list).  Ray and the CLI subprocesses inherit
    this environment.  Session-scoped (through a MonkeyPatch context, undone at the end) because session-
    and module-scoped fixtures (the demo, the MiniLM fine-tunes and their lorascale run) are set up before
    any function-scoped fixture; a test that needs other values monkeypatches them itself.  Returns the root
    of the tmp caches.
    """
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORASCALE_CACHE_DIR", str(root / "lorascale"))
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        (root / "hf-home" / "hub").mkdir(parents=True)
        point_hub_at(patch, root / "hf-home" / "hub")
        patch.setenv("TOKENIZERS_PARALLELISM", "false")  # tokenizers warns when Ray or subprocesses fork
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        yield root


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch and OpenBLAS on one thread: the test matrices are tiny, and on a loaded machine multi-threaded
    BLAS spin-waits make a 64 x 128 SVD ~50x slower.  Restores the previous settings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: only numpy's OpenBLAS stays multi-threaded
            limits = contextlib.nullcontext()
        else:
            limits = threadpool_limits(limits=1)
        with limits:
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Opt-in (pytestmark = pytest.mark.usefixtures("one_thread")): see single_threaded()."""
    with single_threaded():
        yield


@dataclass
class LlamaSet:
    """A tiny Llama base and its fine-tunes on disk; paths are read-only for tests (copy before changing)."""

    model: object  # the float32 base model in memory
    tuned_model: object
    base: dict[str, Path]  # dtype -> sharded checkpoint dir
    tuned: dict[str, Path]  # dtype -> full fine-tune dir (sharded)
    lora: checkpoints.Adapter  # plain LoRA on all 7 linear modules, r=4, alpha=8
    rslora: checkpoints.Adapter  # use_rslora=True, r=4, alpha=8
    pattern: checkpoints.Adapter  # rank_pattern/alpha_pattern on q/v/down only
    dora: checkpoints.Adapter  # use_dora=True on all 7 linear modules, r=4, alpha=8, magnitudes perturbed


@dataclass
class Gpt2Set:
    model: object
    base: Path
    lora: checkpoints.Adapter  # fan_in_fan_out on c_attn, c_proj, c_fc
    dora: checkpoints.Adapter  # the same with use_dora=True, magnitudes perturbed


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> LlamaSet:
    root = tmp_path_factory.mktemp("llama")
    with single_threaded():
        return _build_llama(root)


def _build_llama(root: Path) -> LlamaSet:
    model = checkpoints.tiny_llama(seed=0)
    tuned_model = checkpoints.finetuned(model, seed=1)
    base = {d: checkpoints.save_full(model, root / f"base-{d}", d) for d in checkpoints.DTYPES}
    tuned = {d: checkpoints.save_full(tuned_model, root / f"tuned-{d}", d) for d in checkpoints.DTYPES}
    lora = checkpoints.lora_adapter(model, root / "lora", seed=2)
    rslora = checkpoints.lora_adapter(model, root / "rslora", seed=3, use_rslora=True)
    pattern = checkpoints.lora_adapter(
        model, root / "pattern", seed=4, r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3.0})
    dora = checkpoints.lora_adapter(model, root / "dora", seed=6, use_dora=True)
    return LlamaSet(model, tuned_model, base, tuned, lora, rslora, pattern, dora)


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Gpt2Set:
    root = tmp_path_factory.mktemp("gpt2")
    with single_threaded():
        return _build_gpt2(root)


def _build_gpt2(root: Path) -> Gpt2Set:
    model = checkpoints.tiny_gpt2(seed=0)
    base = checkpoints.save_full(model, root / "base", "fp32", max_shard_size=None)
    lora = checkpoints.lora_adapter(model, root / "lora", seed=5, r=4, lora_alpha=8,
                                    target_modules=checkpoints.GPT2_MODULES, fan_in_fan_out=True)
    dora = checkpoints.lora_adapter(model, root / "dora", seed=7, r=4, lora_alpha=8,
                                    target_modules=checkpoints.GPT2_MODULES, fan_in_fan_out=True, use_dora=True)
    return Gpt2Set(model, base, lora, dora)
