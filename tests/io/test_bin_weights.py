"""Pickled torch.save weights (.bin): read through torch's restricted loader only, as byte ranges afterwards.

Checkpoints are the layouts the ecosystem has: transformers 4.x `save_pretrained(safe_serialization=False)`
(one pytorch_model.bin, or shards + pytorch_model.bin.index.json; written by tests/checkpoints.save_full_bin,
as transformers 5 only writes safetensors) and peft's `save_pretrained(safe_serialization=False)`
(adapter_model.bin).  A comparison read from .bin must give the rows the same checkpoints give as safetensors
(which tests/test_formats.py checks against the float64 oracle).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from click.testing import CliRunner

import checkpoints
from hubcache import make_hub_cache
from test_inspect_hub_headers import COMMIT, _metadata_only, hub_server  # noqa: F401  (hub_server: a fixture)

from lorascale.cli import main
from lorascale.errors import CheckpointFormatError, CheckpointReferenceError
from lorascale.io.checkpoint import open_checkpoint
from lorascale.io.identity import changed_since, describe
from lorascale.io.resolve import resolve
from lorascale.io.safetensors_header import dtype_not_analysed
from lorascale.io.tensors import load_tensor
from lorascale.io.torch_bin import read_bin_index, record_table_sha256, require_safe_torch
from runs import compare
from lorascale.store.schema import MANIFEST, TABLES

INCLUDE = ("*layers.0.*",)  # one layer: 7 matrices, enough to cover every module kind


def _rows(out: Path, table: str, names: dict[str, str]) -> list[dict]:
    rows = ds.dataset(out / table).to_table().to_pylist()
    for row in rows:
        row.pop("seconds", None)
        row.pop("label", None)  # the default label is the short path: the copies live in other directories
        row["model"] = names.get(row["model"], row["model"])
    return sorted(rows, key=lambda r: json.dumps({k: v for k, v in r.items() if not isinstance(v, float)},
                                                 sort_keys=True, default=str))


def _assert_same_rows(out_a: Path, names_a: dict[str, str], out_b: Path, names_b: dict[str, str]) -> None:
    """Same rows in every table: strings and ints equal, floats to 1e-6 relative (same bytes in, same code)."""
    for table in TABLES:
        rows_a, rows_b = _rows(out_a, table, names_a), _rows(out_b, table, names_b)
        assert len(rows_a) == len(rows_b) > 0, table
        for a, b in zip(rows_a, rows_b):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=f"{table}.{key}")
                else:
                    assert a[key] == b[key], (table, key, a, b)


@pytest.fixture(scope="module")
def bin_llama(llama, tmp_path_factory):
    """The session Llama set again as .bin: base sharded, full fine-tune as one pytorch_model.bin, the LoRA
    adapter saved by peft as adapter_model.bin; in fp32 and bf16."""
    root = tmp_path_factory.mktemp("bin-llama")
    made = {}
    for dtype in ("fp32", "bf16"):
        made[("base", dtype)] = checkpoints.save_full_bin(llama.model, root / f"base-{dtype}", dtype)
        made[("tuned", dtype)] = checkpoints.save_full_bin(llama.tuned_model, root / f"tuned-{dtype}", dtype,
                                                           max_shard_size=None)
    llama.lora.model.save_pretrained(root / "lora", safe_serialization=False)
    made["lora"] = root / "lora"
    return made


def test_layouts_are_the_real_ones(bin_llama):
    base, tuned, lora = bin_llama[("base", "fp32")], bin_llama[("tuned", "fp32")], bin_llama["lora"]
    assert (base / "pytorch_model.bin.index.json").is_file() and len(list(base.glob("pytorch_model-*.bin"))) >= 2
    assert (tuned / "pytorch_model.bin").is_file() and not list(tuned.glob("*.safetensors"))
    assert (lora / "adapter_model.bin").is_file() and not (lora / "adapter_model.safetensors").exists()
    for path in (*base.glob("*.bin"), tuned / "pytorch_model.bin", lora / "adapter_model.bin"):
        assert zipfile.is_zipfile(path)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bin_comparison_equals_the_safetensors_one(llama, bin_llama, tmp_path, dtype):
    st_refs = [str(llama.base[dtype]), str(llama.tuned[dtype]), str(llama.lora.path)]
    bin_refs = [str(bin_llama[("base", dtype)]), str(bin_llama[("tuned", dtype)]), str(bin_llama["lora"])]
    outs = []
    for refs, name in ((st_refs, "st"), (bin_refs, "bin")):
        compare(refs[0], refs[1:], tmp_path / name, device="cpu", include=INCLUDE, use_cache=False)
        outs.append((tmp_path / name, dict(zip(refs, ("base", "full", "lora")))))
    _assert_same_rows(*outs[0], *outs[1])
    manifest = json.loads((tmp_path / "bin" / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    assert [m["format"] for m in (manifest["base"], *manifest["tuned"])] == ["pytorch"] * 3
    assert all(len(f["header_sha256"]) == 64 for m in (manifest["base"], *manifest["tuned"]) for f in m["files"])
    assert json.loads((tmp_path / "st" / MANIFEST).read_text())["base"]["format"] == "safetensors"


def _reorder_records(path: Path) -> None:
    """Rewrite a torch.save zip with its tensor records in reverse order (every record kept, torch.load reads
    it alike): what other zip tools may write."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    data = [r for r in records if "/data/" in r[0]]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, content in [r for r in records if "/data/" not in r[0]] + data[::-1]:
            archive.writestr(name, content)


def test_records_in_another_order_give_the_same_rows(llama, bin_llama, tmp_path):
    """Issue 26: records stored out of torch's order gave k_proj the bytes of v_proj (exit 0, wrong numbers)."""
    tuned = checkpoints.copy_checkpoint(bin_llama[("tuned", "fp32")], tmp_path / "tuned")
    _reorder_records(tuned / "pytorch_model.bin")
    want = torch.load(bin_llama[("tuned", "fp32")] / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(v, want[k]) for k, v in torch.load(tuned / "pytorch_model.bin", weights_only=True).items())
    base = str(bin_llama[("base", "fp32")])
    for reference, name in ((str(bin_llama[("tuned", "fp32")]), "in-order"), (str(tuned), "reordered")):
        compare(base, [reference], tmp_path / name, device="cpu", include=INCLUDE, use_cache=False)
    _assert_same_rows(tmp_path / "in-order", {str(bin_llama[("tuned", "fp32")]): "full"},
                      tmp_path / "reordered", {str(tuned): "full"})


def test_every_tensor_reads_back_as_stored(llama, bin_llama):
    """Index parity with the safetensors copy: names, dtype codes, shapes, and every tensor's bytes."""
    for dtype in ("fp32", "bf16"):
        st = open_checkpoint(resolve(str(llama.base[dtype]))).tensors
        pt = open_checkpoint(resolve(str(bin_llama[("base", dtype)]))).tensors
        assert st.keys() == pt.keys()
        for name, entry in pt.items():
            assert (entry.dtype, entry.shape) == (st[name].dtype, st[name].shape), name
            assert torch.equal(load_tensor(entry), load_tensor(st[name])), name


def test_bert_with_tied_weights(tmp_path):
    """A BERT masked-LM (decoder weight tied to the word embeddings: one storage, two names) as one .bin."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=50, max_position_embeddings=16)).eval()
    directory = tmp_path / "bert"
    directory.mkdir()
    state = model.state_dict()
    torch.save(state, directory / "pytorch_model.bin")
    entries = open_checkpoint(resolve(str(directory))).tensors
    assert entries.keys() == state.keys()
    for name, entry in entries.items():
        assert torch.equal(load_tensor(entry), state[name]), name
    tied = [n for n in state if n.endswith("decoder.weight")]
    assert tied and entries[tied[0]].data_start == entries["bert.embeddings.word_embeddings.weight"].data_start


def test_views_storage_offsets_and_dtypes(tmp_path):
    """Non-contiguous views, slices into a shared storage, every float width, and integer tensors (indexed,
    then skipped by the plan with their reason)."""
    base = torch.arange(48, dtype=torch.float64).reshape(6, 8)
    state = {"transposed": base.T, "rows": base[2:5], "strided": base[:, ::3], "f16": base.to(torch.float16),
             "bf16": base.to(torch.bfloat16), "f32": base.float(), "f64": base, "i8": base.to(torch.int8),
             "empty": torch.zeros(0, 4)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    entries, metadata = read_bin_index(path)
    assert metadata == {}
    codes = {name: entry.dtype for name, entry in entries.items()}
    assert codes == {"transposed": "F64", "rows": "F64", "strided": "F64", "f16": "F16", "bf16": "BF16",
                     "f32": "F32", "f64": "F64", "i8": "I8", "empty": "F32"}
    assert entries["transposed"].strides == (1, 8) and entries["rows"].strides is None
    for name, entry in entries.items():
        if name != "i8":
            got = load_tensor(entry)
            assert got.is_contiguous() and got.dtype == state[name].dtype and torch.equal(got, state[name]), name
    assert "quantized" in dtype_not_analysed(entries["i8"].dtype)


# --- Refusals -----------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _run(*args: str):
    return CliRunner().invoke(main, ["run", *args, "--device", "cpu", "--quiet", "--no-cache"])


def _one_line(result, code: int, *mentions: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorascale: error: "), result.stderr
    for words in mentions:
        assert words in lines[0], (words, lines[0])
    return lines[0]


@pytest.mark.parametrize("layout", ["zip", "raw-pickle", "legacy"])
def test_a_malicious_pickle_runs_nothing(llama, tmp_path, layout):
    marker = tmp_path / "UNPICKLED"
    directory = tmp_path / "evil"
    directory.mkdir()
    path = directory / "pytorch_model.bin"
    payload = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64), "trap": _Trap(marker)}
    if layout == "zip":  # torch.save's own zip, data.pkl asking for pathlib.Path.touch
        torch.save(payload, path)
    elif layout == "raw-pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    assert not marker.exists()
    result = _run("--base", str(llama.base["fp32"]), "--tuned", str(directory), "--out", str(tmp_path / "out"))
    line = _one_line(result, 3, str(path))
    assert ("restricted loader refused it" if layout == "zip" else "not a zip-format torch.save file") in line
    assert not marker.exists(), "a pickle was executed"
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointFormatError):
        read_bin_index(path)
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["legacy", "raw-pickle"])
def test_a_hub_repo_with_only_a_legacy_pickle_is_named_by_its_repo_id(llama, offline_hub, tmp_path, layout):
    """The message names the repo the user typed (and the file in it), not only a snapshot path of the cache."""
    from hubcache import make_hub_cache

    local = tmp_path / "weights.bin"
    payload = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}
    if layout == "legacy":
        torch.save(payload, local, _use_new_zipfile_serialization=False)
    else:
        local.write_bytes(pickle.dumps(payload))
    make_hub_cache(offline_hub, "org/old-model", {"pytorch_model.bin": local, "config.json": b"{}"})
    for command in (["run", "--base", str(llama.base["fp32"]), "--tuned", "org/old-model", "--out",
                     str(tmp_path / "out"), "--device", "cpu", "--quiet", "--no-cache"], ["inspect", "org/old-model"]):
        result = CliRunner().invoke(main, command)
        line = _one_line(result, 3, "org/old-model: pytorch_model.bin", "not a zip-format torch.save file")
        assert line.startswith("lorascale: error: org/old-model: pytorch_model.bin ("), line
    assert not (tmp_path / "out").exists()


def test_a_hub_tensor_that_cannot_be_read_is_named_by_its_repo_id(tmp_path):
    """While streaming, a Hub file's tensor names its repo too (TensorEntry.location)."""
    from lorascale.records import HubFile, TensorEntry

    cached = tmp_path / "snapshots" / "abc" / "model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\0" * 64)  # shorter than the byte range the header promised
    entry = TensorEntry(name="w", file=cached, dtype="F32", shape=(8, 8), data_start=32, data_end=288,
                        hub=HubFile("org/model", "abc", "model.safetensors"))
    with pytest.raises(CheckpointFormatError) as caught:
        load_tensor(entry)
    assert str(caught.value).startswith(f"org/model: model.safetensors ({cached}): tensor 'w': file ended")


def test_truncated_and_corrupt_bin_exit_3(llama, bin_llama, tmp_path):
    source = bin_llama[("tuned", "fp32")] / "pytorch_model.bin"
    data = source.read_bytes()
    truncated = checkpoints.copy_checkpoint(bin_llama[("tuned", "fp32")], tmp_path / "truncated")
    (truncated / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    corrupt = checkpoints.copy_checkpoint(bin_llama[("tuned", "fp32")], tmp_path / "corrupt")
    with zipfile.ZipFile(source) as archive:  # garble the pickle, keep the zip valid
        pkl = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    start = pkl.header_offset + 30 + len(pkl.filename.encode()) + len(pkl.extra)
    garbled = bytearray(data)
    garbled[start + 2: start + pkl.file_size - 2] = b"\xfe" * (pkl.file_size - 4)
    (corrupt / "pytorch_model.bin").write_bytes(bytes(garbled))
    for directory in (truncated, corrupt):
        result = _run("--base", str(llama.base["fp32"]), "--tuned", str(directory), "--out", str(tmp_path / "out"))
        _one_line(result, 3, str(directory / "pytorch_model.bin"))
        assert not (tmp_path / "out").exists()


def test_a_tensor_record_cut_short_is_refused(tmp_path):
    """A zip whose central directory is intact but whose tensor record is shorter than the storage."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(4, 4)}, path)
    with zipfile.ZipFile(path) as archive:
        records = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    name = next(n for n in records if n.endswith("/data/0"))
    records[name] = records[name][:16]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for record, content in records.items():
            archive.writestr(record, content)
    with pytest.raises(CheckpointFormatError, match="tensor .w.: its storage record .*data/0. is short: 16 bytes"):
        read_bin_index(path)


def test_old_torch_is_refused(bin_llama, monkeypatch, tmp_path, llama):
    path = bin_llama[("tuned", "fp32")] / "pytorch_model.bin"
    for version in ("2.5.1+cu121", "2.4.0", "1.13.1"):
        with pytest.raises(CheckpointFormatError, match="torch >= 2.6.*CVE-2025-32434"):
            require_safe_torch(path, version)
    for version in ("2.6.0", "2.6.0+cpu", "2.13.0", "3.0.0a0"):
        require_safe_torch(path, version)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    result = _run("--base", str(llama.base["fp32"]), "--tuned", str(bin_llama[("tuned", "fp32")]),
                  "--out", str(tmp_path / "out"))
    _one_line(result, 3, str(path), "CVE-2025-32434")


def test_no_pickle_refuses_bin_and_keeps_safetensors(llama, bin_llama, tmp_path):
    result = _run("--base", str(llama.base["fp32"]), "--tuned", str(bin_llama["lora"]), "--out",
                  str(tmp_path / "out"), "--no-pickle")
    _one_line(result, 2, str(bin_llama["lora"]), "adapter_model.bin", "--no-pickle")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointReferenceError, match="no_pickle=True refuses"):
        compare(str(bin_llama[("base", "fp32")]), [str(llama.tuned["fp32"])], tmp_path / "out", no_pickle=True)
    # Both formats in one directory: safetensors is read, --no-pickle or not.
    both = checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp_path / "both")
    for path in bin_llama[("tuned", "fp32")].glob("*.bin"):
        shutil.copy(path, both / path.name)
    result = _run("--base", str(llama.base["fp32"]), "--tuned", str(both), "--out", str(tmp_path / "out2"),
                  "--no-pickle", "--include", "*layers.0.self_attn.q_proj*")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out2" / MANIFEST).read_text())
    assert manifest["tuned"][0]["format"] == "safetensors"
    assert all(f["name"].endswith(".safetensors") for f in manifest["tuned"][0]["files"])


def test_inspect_a_bin_checkpoint(bin_llama):
    result = CliRunner().invoke(main, ["inspect", str(bin_llama[("base", "bf16")]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "pytorch" and info["dtypes"] == {"BF16": info["tensors"]}
    assert info["analysed_by_default"] == 14 and len(info["files"]) >= 2


# --- Identity and memory ------------------------------------------------------------------------------------


def test_identity_of_a_bin_changes_with_any_tensor(bin_llama, tmp_path):
    directory = checkpoints.copy_checkpoint(bin_llama[("tuned", "fp32")], tmp_path / "tuned")
    path = directory / "pytorch_model.bin"
    before = describe(open_checkpoint(resolve(str(directory))))
    assert before["format"] == "pytorch" and before["files"][0]["header_sha256"] == record_table_sha256(path)
    assert changed_since(before, describe(open_checkpoint(resolve(str(directory))))) is None
    state = torch.load(path, weights_only=True)
    name = next(n for n in state if n.endswith("q_proj.weight"))
    state[name][0, 0] += 1.0
    stat = os.stat(path)
    torch.save(state, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: the record table tells
    after = describe(open_checkpoint(resolve(str(directory))))
    assert after["files"][0]["header_sha256"] != before["files"][0]["header_sha256"]
    assert changed_since(before, after) is not None


def _bytes_read() -> int:
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_indexing_and_loading_read_only_what_they_need(tmp_path):
    """Memory stays at one matrix because nothing but the asked-for byte range is read: indexing reads the zip
    directory and the pickle (no storage), and loading a small tensor reads its own bytes, not the 32 MB next
    to it (rchar counts every byte this process read through read(), page cache or not)."""
    path = tmp_path / "pytorch_model.bin"
    big = torch.ones(2048, 4096)  # 32 MiB
    torch.save({"big": big, "small": torch.arange(64.0).reshape(8, 8)}, path)
    before = _bytes_read()
    entries, _ = read_bin_index(path)
    small = load_tensor(entries["small"])
    assert _bytes_read() - before < 1 << 20
    assert torch.equal(small, torch.arange(64.0).reshape(8, 8))
    before = _bytes_read()
    assert torch.equal(load_tensor(entries["big"]), big)
    assert _bytes_read() - before >= big.numel() * 4  # the measurement does see tensor reads


def test_hub_adapter_with_only_a_bin(bin_llama, llama, offline_hub, hub_server, monkeypatch):
    """Online, headers-only (inspect, and run's planning): the adapter's safetensors is missing (HEAD 404), so
    the .bin is taken, fetched whole (its index is inside it), and described as the local copy is."""
    import lorascale.io.resolve as resolve_module
    from lorascale.inspect import describe_checkpoint

    local = bin_llama["lora"]
    make_hub_cache(offline_hub, "org/model", {p.name: p for p in local.iterdir() if p.is_file()}, commit=COMMIT)
    hub_server.files = {"adapter_model.bin": (local / "adapter_model.bin").read_bytes()}
    monkeypatch.setattr(resolve_module, "_snapshot", _metadata_only(offline_hub, "org/model"))
    remote = describe_checkpoint("org/model")
    on_disk = describe_checkpoint(str(local))
    assert remote["format"] == on_disk["format"] == "pytorch"
    assert remote["adapter"] == on_disk["adapter"] and remote["adapter"]["adapted_modules"] == 14
    heads = [r[1] for r in hub_server.requests if r[0] == "HEAD"]
    assert any("adapter_model.safetensors" in h for h in heads) and any("adapter_model.bin" in h for h in heads)
    with pytest.raises(CheckpointReferenceError, match="no_pickle=True refuses"):
        describe_checkpoint("org/model", allow_pickle=False)
