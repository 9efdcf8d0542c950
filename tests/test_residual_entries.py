"""Issue 26: the sparse residual's entries of ``G = Σ dyᵀ x`` by one sampled product
(``torch.sparse.sampled_addmm``) per micro-batch, equal to the dense ``G`` at the index set, in any
index order, float32 and float64; other dtypes (bf16) keep the gathered dot products."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from galore_plus import projection


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def factored(dtype, micro_batches, m=48, n=80, tokens=22, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(tokens, n, generator=gen, dtype=torch.float64),
              torch.randn(tokens, m, generator=gen, dtype=torch.float64)) for _ in range(micro_batches)]
    grad = projection.FactoredGradient([(x.to(dtype), dy.to(dtype)) for x, dy in pairs])
    return grad, sum(dy.T @ x for x, dy in pairs)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_sampled_entries_equal_dense_g_in_any_index_order(dtype, tol, micro_batches):
    grad, G = factored(dtype, micro_batches)
    gen = torch.Generator().manual_seed(1)
    # unsorted, rows repeated with several columns, the first and last entries, int32 as the optimizer stores it
    index = torch.cat([torch.tensor([48 * 80 - 1, 0]), torch.randperm(48 * 80, generator=gen)[:200]]).to(torch.int32)
    with Ops() as ops:
        got = grad.entries(index)
    assert "aten.sparse_sampled_addmm.default" in ops.names  # the sampled product, not the gathers
    want = G.reshape(-1)[index.long()]
    assert got.dtype == dtype and got.shape == want.shape
    assert float((got.double() - want).norm() / want.norm()) < tol


def test_bf16_factors_keep_the_gathered_dot_products():
    grad, G = factored(torch.bfloat16, 1)
    index = torch.tensor([5, 3, 400, 3000], dtype=torch.int32)
    with Ops() as ops:
        got = grad.entries(index)
    assert "aten.sparse_sampled_addmm.default" not in ops.names
    reference = projection.FactoredGradient([(x.double(), dy.double()) for x, dy in grad.pairs]).dense()
    assert torch.allclose(got.double(), reference.reshape(-1)[index.long()], rtol=2e-2, atol=1e-1)


def test_an_empty_index_set_gives_no_entries():
    grad, _ = factored(torch.float32, 1)
    assert grad.entries(torch.tensor([], dtype=torch.int32)).numel() == 0
