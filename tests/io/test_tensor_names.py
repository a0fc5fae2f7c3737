"""Tensor names longer than MAX_TENSOR_NAME_BYTES (UTF-8) are refused where names are first read: a
safetensors header, a .bin state dict, the weight_map of an index.  1,024 bytes pass; 1,025 do not."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from lorascale.errors import CheckpointFormatError
from lorascale.io.jsonfiles import read_weight_map
from lorascale.io.safetensors_header import read_header
from lorascale.io.tensor_names import MAX_TENSOR_NAME_BYTES
from lorascale.io.torch_bin import read_bin_index

# ASCII at the bound and one past it; 4-byte characters at the bound (256 of them) and one past it.
AT_BOUND = ("w" * MAX_TENSOR_NAME_BYTES, "\U0001F600" * (MAX_TENSOR_NAME_BYTES // 4))
PAST_BOUND = ("w" * (MAX_TENSOR_NAME_BYTES + 1), "\U0001F600" * (MAX_TENSOR_NAME_BYTES // 4) + "w",
              "x" * 5_000_000)


def _safetensors(path: Path, name: str) -> Path:
    header = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    return path


def _bin(path: Path, name: str) -> Path:
    torch.save({name: torch.zeros(1)}, path)
    return path


def _index(path: Path, name: str) -> Path:
    path.write_text(json.dumps({"weight_map": {name: "model-00001-of-00001.safetensors"}}))
    return path


READERS = {"safetensors": (_safetensors, "model.safetensors", read_header),
           "bin": (_bin, "pytorch_model.bin", read_bin_index),
           "index": (_index, "model.safetensors.index.json", read_weight_map)}


@pytest.mark.parametrize("kind", READERS)
def test_names_up_to_the_bound_are_read(tmp_path, kind):
    write, filename, read = READERS[kind]
    for number, name in enumerate(AT_BOUND):
        result = read(write(tmp_path / f"{number}-{filename}", name))
        names = result if kind == "index" else result[0]
        assert list(names) == [name]


@pytest.mark.parametrize("kind", READERS)
def test_longer_names_are_refused_as_corrupt(tmp_path, kind):
    write, filename, read = READERS[kind]
    for number, name in enumerate(PAST_BOUND):
        path = write(tmp_path / f"{number}-{filename}", name)
        with pytest.raises(CheckpointFormatError) as caught:
            read(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: a tensor name of ") and "longer than the 1024 bytes" in message
        assert len(message) < 600  # the name is cut, not printed whole
