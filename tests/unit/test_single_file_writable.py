"""write_single_file's `_writable`: a tensor that alone holds its whole storage is written as it is (a model's own
parameters: no second copy in memory); views, tied and shared tensors get storage of their own, as safetensors needs."""

import torch

from megatron_taskmoe.checkpoint_tools.single_file import _writable


def test_only_tensors_sharing_or_viewing_storage_are_copied():
    own = torch.randn(4, 3)
    tied = torch.randn(5, 2)
    base = torch.randn(6, 4)
    tensors = {"own": own, "tied.a": tied, "tied.b": tied, "row": base[1], "col": base[:, 1],
               "t": torch.randn(3, 2).t(), "empty": torch.empty(0)}
    out = _writable(tensors)
    assert out["own"].data_ptr() == own.data_ptr()
    for k in ("tied.a", "tied.b", "row", "col", "t"):
        assert out[k].data_ptr() != tensors[k].data_ptr() and out[k].is_contiguous(), k
    assert out["tied.a"].data_ptr() != out["tied.b"].data_ptr()
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)
