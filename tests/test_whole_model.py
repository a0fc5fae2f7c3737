"""benchmarks/synthetic_whole.py and whole_model.py at a tiny shape: the checkpoints are what transformers and
peft themselves read and write (names, shapes, config), the streaming writer writes valid safetensors, and the
measuring runner records what it claims to from a real `lorascale run`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import synthetic_whole  # noqa: E402
import whole_model  # noqa: E402
from synthetic_whole import ADAPTERS, SHAPES, StreamingSafetensors, base_layout, build  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("whole"), layers=LAYERS, shape="tiny")


@pytest.mark.slow
def test_base_is_a_llama_transformers_loads_whole(tiny):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.LlamaForCausalLM.from_pretrained(tiny["base"], output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.dtype == torch.bfloat16
    stored = {}
    for shard in sorted(tiny["base"].glob("model-*.safetensors")):
        stored.update(load_file(shard))
    assert set(stored) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(stored[name], tensor), name


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapter_layout_is_peft_own(tiny, tmp_path, adapter):
    """The names, shapes and config fields of an adapter peft saves for the same model and LoraConfig; and peft
    loads ours into that model, values intact."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ours_config = json.loads((tiny[adapter] / "adapter_config.json").read_text())
    model = transformers.LlamaForCausalLM.from_pretrained(tiny["base"])
    lora = peft.LoraConfig(r=ours_config["r"], lora_alpha=ours_config["lora_alpha"], lora_dropout=0.0,
                           target_modules=ours_config["target_modules"], task_type="CAUSAL_LM")
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tiny[adapter] / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    theirs_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora",
                "fan_in_fan_out"):
        assert ours_config[key] == theirs_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tiny["base"]),
                                            tiny[adapter])
    state = loaded.state_dict()
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert torch.equal(state[name.replace("lora_B.weight", "lora_B.default.weight")], ours[name])


def test_streaming_writer_shards_and_refuses_a_wrong_order(tmp_path):
    layout = base_layout(SHAPES["tiny"], 1)
    writer = StreamingSafetensors(tmp_path / "m", layout, dtype=torch.bfloat16, shard_bytes=40_000)
    expected = {}
    for i, (name, shape) in enumerate(layout):
        tensor = torch.full(shape, float(i))
        expected[name] = tensor.to(torch.bfloat16)
        writer.write(name, iter(tensor.split(7)) if len(shape) == 2 else tensor)  # row chunks, as embeddings
    writer.close()
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in expected.values())
    for name, shard in index["weight_map"].items():
        with safe_open(tmp_path / "m" / shard, "pt") as handle:
            assert torch.equal(handle.get_tensor(name), expected[name]), name
    bad = StreamingSafetensors(tmp_path / "bad", layout, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="where the layout has"):
        bad.write(layout[1][0], torch.zeros(layout[1][1]))
    short = StreamingSafetensors(tmp_path / "short", layout, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bytes written"):
        short.write(layout[0][0], torch.zeros(3, SHAPES["tiny"].hidden))


def test_rebuild_reuses_a_finished_part_and_not_a_changed_one(tiny):
    out = tiny["base"].parent
    before = {p: (p / "BUILD.json").stat().st_mtime_ns for p in tiny.values()}
    build(out, layers=LAYERS, shape="tiny")
    assert {p: (p / "BUILD.json").stat().st_mtime_ns for p in tiny.values()} == before
    assert not synthetic_whole._built(tiny["base"], {"layers": LAYERS + 1})


@pytest.mark.slow
def test_runner_measures_a_real_cold_run(tiny, tmp_path, monkeypatch):
    """One measured `lorascale run` (cold, tiny): the dry run is kept with its estimate, the cache was empty and
    is filled, every layer has a series entry, and the sampled peak RSS is a process's, not zero."""
    import argparse

    args = argparse.Namespace(work=tmp_path, full_layers=None, log=tmp_path / "log")
    monkeypatch.setattr(whole_model, "PARTIAL_SECONDS", 0.0)  # a record after every line, as a long run has
    partials: list[dict] = []
    result = whole_model.run_one("cold", args, tiny, tmp_path / "cache", on_partial=partials.append)
    assert result["returncode"] == 0 and result["status"] == "done", (tmp_path / "log").read_text()[-3000:]
    assert partials and all(p["status"] == "running" for p in partials)
    assert [p["matrices"] for p in partials] == sorted(p["matrices"] for p in partials)
    assert max(p["matrices"] for p in partials) >= 7 * LAYERS - 1
    assert "matrices to analyse" in result["dry_run"]["text"]["stdout"] and result["dry_run"]["estimate_seconds"] is not None
    # before the run the cache dir holds only the dry run's calibration file (calibration/), no base SVD
    assert result["cache_bytes_before"] < 64 * 1024 < result["cache_bytes_written"]
    assert result["cache_bytes_after"] == result["cache_bytes_before"] + result["cache_bytes_written"]
    assert result["out_bytes"] > 0 and result["cpu_seconds"] > 0 and result["io"]["rchar"] > 0
    assert result["peak_rss_sampled_bytes"] > 50e6
    assert [entry["layer"] for entry in result["layers"]] == list(range(LAYERS))
    assert all(entry["matrices"] == 7 and entry["compute_seconds"] > 0 for entry in result["layers"])
    # a tiny layer can take less CPU than the 0.25 s sampling sees; the series never exceeds the whole
    assert 0 <= sum(entry["cpu_seconds"] for entry in result["layers"]) <= result["cpu_seconds"]
    assert result["matrices"] == 7 * LAYERS


@pytest.mark.parametrize(("text", "seconds"), [
    ("SVDs: 448, estimated 4 h 19 min on cpu", 4 * 3600 + 19 * 60),
    ("SVDs: 42, estimated under 0.1 s on cpu", 0.1),
    ("time: estimated 2 min 5 s (calibrated)", 125),
])
def test_estimate_is_read_from_the_dry_run_text(text, seconds):
    record = {"text": {"stdout": text + "\n", "stderr": ""}}
    assert whole_model.estimate_seconds(record) == pytest.approx(seconds)
    assert whole_model.estimate_seconds({"text": {"stdout": "x", "stderr": ""},
                                         "json": {"returncode": 0, "stdout": '{"time": {"estimate_seconds": 7.5}}'}}) == 7.5
