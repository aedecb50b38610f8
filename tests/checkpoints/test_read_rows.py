"""CheckpointReader.read_rows against the safetensors package reading the same file."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridlm.checkpoints.safetensors_io import CheckpointReader


@pytest.fixture
def stored(tmp_path):
    tensors = {
        "experts": torch.randn(8, 3, 5),
        "bf16": torch.randn(6, 4).to(torch.bfloat16),
        "after": torch.arange(7, dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


CASES = [("experts", range(2, 4)), ("experts", range(0, 8)), ("experts", range(7, 8)), ("bf16", range(1, 5)),
         ("after", range(3, 3))]  # fmt: skip


@pytest.mark.parametrize(("name", "rows"), CASES)
def test_rows_equal_the_slice_safetensors_reads(stored, name, rows):
    expected = load_file(stored / "model.safetensors")[name][rows.start : rows.stop]
    with CheckpointReader(stored) as reader:
        got = reader.read_rows(name, rows)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rows", [range(6, 9), range(-1, 2), range(0, 4, 2)])
def test_rows_outside_the_tensor_are_refused_by_name(stored, rows):
    with CheckpointReader(stored) as reader, pytest.raises(ValueError, match=r"^experts: rows .* not within"):
        reader.read_rows("experts", rows)


def test_a_file_truncated_after_its_header_was_read_is_named(stored):
    path = stored / "model.safetensors"
    with CheckpointReader(stored) as reader:
        row_bytes = 3 * 5 * 4
        path.write_bytes(path.read_bytes()[: reader.tensors["experts"].offset + 6 * row_bytes + 10])
        with pytest.raises(ValueError, match=r"truncated while reading rows 6..8 of experts"):
            reader.read_rows("experts", range(6, 8))
