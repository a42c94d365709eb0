"""fastlm.ops.embedding: F.embedding's values and gradients, with an index_add_ backward on CPU."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastlm.model import GPT, Embedding, GPTConfig
from fastlm.ops.embedding import _CpuEmbedding, embedding


def _grads(fn, idx, weight, grad_out):
    w = weight.detach().clone().requires_grad_(True)
    out = fn(idx, w)
    out.backward(grad_out)
    return out.detach(), w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_values_and_grads_equal_f_embedding(dtype, idx_dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(11, 24, generator=g).to(dtype)
    idx = torch.randint(0, 11, (3, 37), generator=g).to(idx_dtype)  # repeats: rows sum several tokens
    grad_out = torch.randn(3, 37, 24, generator=g).to(dtype)
    out, gw = _grads(embedding, idx, weight, grad_out)
    ref_out, ref_gw = _grads(F.embedding, idx, weight, grad_out)
    assert torch.equal(out, ref_out)
    assert gw.dtype == dtype and gw.shape == weight.shape
    # every row: the sum of its tokens' gradients (zeros where no token picked it)
    exact = torch.zeros(11, 24, dtype=torch.float64).index_add_(
        0, idx.reshape(-1).long(), grad_out.reshape(-1, 24).double()
    )
    if dtype == torch.bfloat16:
        # summed in float32 and rounded once: the exact sum rounded (aten's bf16 backward sums in
        # bf16, further off)
        assert torch.equal(gw, exact.to(dtype))
        assert (gw.double() - exact).abs().max() <= (ref_gw.double() - exact).abs().max()
    else:
        assert torch.equal(gw, ref_gw)
        torch.testing.assert_close(gw.double(), exact, rtol=1e-6, atol=1e-6)


def test_takes_the_index_add_backward_only_where_it_should(monkeypatch):
    calls = []
    real = _CpuEmbedding.apply
    monkeypatch.setattr(_CpuEmbedding, "apply", lambda *a: calls.append(1) or real(*a))
    idx = torch.tensor([[0, 2, 2]])
    w = torch.randn(3, 4, requires_grad=True)
    embedding(idx, w).sum().backward()
    assert calls == [1]
    with torch.no_grad():
        embedding(idx, w)
    embedding(idx, w.detach())
    assert calls == [1]


def test_gradcheck():
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 4, 4, 1], [1, 1, 3, 0]])
    assert torch.autograd.gradcheck(lambda w: embedding(idx, w), (w,))


def test_out_of_range_ids_raise():
    w = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(IndexError):
        embedding(torch.tensor([[5]]), w)
    with pytest.raises(IndexError):
        embedding(torch.tensor([[-1]]), w)


def test_module_keeps_nn_embedding_hooks_and_state():
    m = Embedding(7, 5)
    assert isinstance(m, torch.nn.Embedding) and list(m.state_dict()) == ["weight"]
    seen = []
    m.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    m(torch.tensor([[1, 2]]))
    assert seen == [torch.Size([1, 2, 5])]


def test_model_gradients_equal_those_with_nn_embedding(monkeypatch):
    cfg = dataclasses.replace(GPTConfig(), vocab_size=13, block_size=16, n_layer=2, n_embd=32, n_head=2, n_kv_head=2)
    cfg = dataclasses.replace(cfg, mlp_hidden=64, pos="learned", backend="reference")
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 13, (3, 16))
    y = torch.randint(0, 13, (3, 16))

    def grads():
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, got = grads()
    monkeypatch.setattr(Embedding, "forward", lambda self, idx: F.embedding(idx, self.weight))
    ref_loss, ref = grads()
    assert torch.equal(loss, ref_loss)
    embeds = [n for n, m in model.named_modules() if isinstance(m, Embedding)]
    assert {"wte", "wpe", "value_embeds.0", "value_embeds.1"} <= set(embeds)
    for name in got:
        assert torch.equal(got[name], ref[name]), name
