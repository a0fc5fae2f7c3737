"""`lorascale mitigate` on the session's local Ray: the same mitigation table and adapter as in-process."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
from conftest import one_torch_thread
from safetensors.torch import load_file

from lorascale import mitigate
from lorascale.execute.local import LocalExecutor
from lorascale.store.schema import MITIGATION

pytestmark = pytest.mark.ray


def _rows(out: Path) -> dict[str, dict]:
    table = ds.dataset(out / MITIGATION, format="parquet").to_table().to_pylist()
    return {r["matrix"]: {k: v for k, v in r.items() if k not in ("seconds", "relative_error", "delta_ratio")}
            for r in table}


def test_two_workers_write_the_in_process_adapter(local_ray, demo, tmp_path: Path):
    base, adapter = str(demo["base"]), str(demo["lora"])
    with one_torch_thread():
        local = mitigate(base, adapter, tmp_path / "local", mitigation_lambda=0.0, executor=LocalExecutor(),
                         use_cache=False)
    on_ray = mitigate(base, adapter, tmp_path / "ray", mitigation_lambda=0.0, workers=2, use_cache=False)
    assert on_ray.manifest["execution"]["executor"] == "ray"
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    assert on_ray.summary["mitigated"] > 0
    got, want = (_updates(r.adapter) for r in (on_ray, local))
    assert set(got) == set(want)
    for module, update in want.items():  # B @ A: the factors' signs are the SVD's, arbitrary
        assert torch.allclose(got[module], update, rtol=0, atol=1e-2 * float(update.abs().max())), module


def _updates(adapter: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return {name.removesuffix(".lora_A.weight"): tensors[name.replace("lora_A", "lora_B")].double()
            @ tensors[name].double() for name in tensors if name.endswith(".lora_A.weight")}
