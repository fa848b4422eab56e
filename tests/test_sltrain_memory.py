import pytest
import torch

import sltrain.parametrize.sltrain as sl
from sltrain.measure.tensor_bytes import LiveTensorBytes
from sltrain.parametrize.sltrain import SparseLowRankLinear, compose_weight, compose_weight_in

IN, OUT, RANK, TOKENS = 1000, 400, 8, 16


def layer_and_input(dtype=torch.float32):
    torch.manual_seed(0)
    layer = SparseLowRankLinear(IN, OUT, rank=RANK, lora_alpha=16, density=0.05, seed=1).to(dtype)
    torch.nn.init.normal_(layer.B)
    return layer, torch.randn(TOKENS, IN, dtype=dtype, requires_grad=True)


def small_grads_bytes(layer, x) -> int:
    """What the backward returns besides the transient dense matrices: dx, dA, dB, dvalues."""
    return sum(t.numel() * t.element_size() for t in (x, layer.A, layer.B, layer.values))


def test_backward_holds_one_dense_matrix_not_two():
    layer, x = layer_and_input()
    y = layer(x)
    g = torch.randn_like(y)
    with LiveTensorBytes() as m:
        y.backward(g)
    dense = OUT * IN * 4
    # W (for dx) is freed before G = dY^T X exists: one dense (out, in) matrix at the peak.
    assert dense <= m.peak <= dense + 2 * small_grads_bytes(layer, x), m.peak / dense


def test_forward_under_bf16_autocast_holds_no_float32_weight(monkeypatch):
    monkeypatch.setattr(sl, "_BLOCK", OUT * IN // 8)  # as a large layer is to the real block
    layer, x = layer_and_input()
    with LiveTensorBytes() as m, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # bf16 W (2 bytes an entry) and one float32 block of 1/8 of it; not a float32 W beside it.
    assert m.peak <= OUT * IN * (2 + 4 / 8) + 4 * x.numel() + 4 * y.numel(), m.peak / (OUT * IN)


@pytest.mark.parametrize("block", [OUT * IN // 8, 3 * IN + 7, IN // 2])
def test_blockwise_composition_is_the_float32_composition_rounded_once(monkeypatch, block):
    monkeypatch.setattr(sl, "_BLOCK", block)
    layer, _ = layer_and_input()
    args = (layer.A.detach(), layer.B.detach(), layer.values.detach(), layer.support, layer.scaling)
    want = compose_weight(*args)
    got = compose_weight_in(*args, torch.bfloat16)
    # one rounding of the float32 W: exact, but where a block's matmul sums in another order
    # (float32 last bits) and the rounding tips over to the other bf16 neighbour
    differ = got != want.bfloat16()
    assert differ.float().mean() < 1e-3
    assert ((got.float() - want).abs() <= 2**-7 * want.abs() + 1e-7).all()
