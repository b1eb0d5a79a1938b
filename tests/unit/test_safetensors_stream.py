"""SafetensorsWriter, one tensor at a time in any order, writes what safetensors' save_file writes for all
of them at once (every dtype it takes, names sorting "10" before "2", metadata), and refuses to close
before every tensor came."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from speft_ds.runtime.safetensors_stream import SafetensorsWriter


def test_written_one_at_a_time_is_byte_for_byte_save_files_output(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"layer.10/value": torch.randn(7, generator=g), "layer.2/value": torch.randn(3, generator=g),
               "indices/layer.2": torch.randperm(50, generator=g)[:5].to(torch.int32),
               "big/indices": torch.randperm(50, generator=g)[:4], "rng/torch": torch.get_rng_state(),
               "empty/value": torch.zeros(0)}
    metadata = {"ranges": '{"layer.2/value": [0, 3]}'}
    writer = SafetensorsWriter(tmp_path / "streamed.safetensors",
                               {key: (t.dtype, list(t.shape)) for key, t in tensors.items()}, metadata)
    for key in reversed(list(tensors)):
        writer.add(key, tensors[key])
    writer.close()
    save_file(tensors, str(tmp_path / "whole.safetensors"), metadata=metadata)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_closing_before_every_tensor_came_is_refused(tmp_path):
    writer = SafetensorsWriter(tmp_path / "f.safetensors", {"a": (torch.float32, [2]), "b": (torch.float32, [1])},
                               {"format": "pt"})
    writer.add("a", torch.ones(2))
    with pytest.raises(ValueError, match="without b"):
        writer.close()
    writer.abandon()
