"""The flat-buffer optimiser, EMA and clipping do what the per-tensor versions they replace do."""

import copy

import pytest
import torch

from prompt2prompt.shapes.optim import EMA, FlatParameters, adamw


def _nets():
    torch.manual_seed(0)
    return {"a": torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3)),
            "b": torch.nn.Conv2d(3, 4, 3)}


def _loss(nets, x):
    return nets["a"](x).pow(2).mean() + nets["b"](x[:, :3].reshape(-1, 3, 1, 1).expand(-1, 3, 3, 3)).abs().mean()


def test_parameters_are_views_of_one_buffer_and_gradients_accumulate_into_another():
    nets = _nets()
    reference = copy.deepcopy(nets)
    flat = FlatParameters(nets)
    params = [p for net in nets.values() for p in net.parameters()]
    assert flat.param.numel() == sum(p.numel() for p in params)
    assert all(p.untyped_storage().data_ptr() == flat.param.untyped_storage().data_ptr() for p in params)
    for p, q in zip(params, (p for net in reference.values() for p in net.parameters())):
        assert torch.equal(p, q)  # the values are kept
    x = torch.randn(4, 5)
    for _ in range(2):  # accumulated over two backward passes, as autograd does for ordinary gradients
        _loss(nets, x).backward()
        _loss(reference, x).backward()
    expected = torch.cat([q.grad.reshape(-1) for net in reference.values() for q in net.parameters()])
    assert torch.allclose(flat.grad, expected, atol=1e-7)
    flat.zero_grad()
    assert flat.grad.abs().sum() == 0 and all(p.grad is not None and p.grad.abs().sum() == 0 for p in params)
    flat.release()
    assert all(p.untyped_storage().data_ptr() != flat.param.untyped_storage().data_ptr() for p in params)


def test_adamw_ema_and_clipping_on_the_flat_buffer_match_torch_and_diffusers_per_tensor():
    from diffusers.training_utils import EMAModel

    nets, reference = _nets(), _nets()
    flat = FlatParameters(nets)
    ref_params = [p for net in reference.values() for p in net.parameters()]
    opt = adamw(flat.param, lr=1e-2, weight_decay=1e-2)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=1e-2, foreach=False)
    ema = EMA(flat.param, decay=0.9)
    ref_ema = EMAModel(ref_params, decay=0.9)
    for step in range(6):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step)) * 10  # large: clipping acts
        flat.zero_grad()
        ref_opt.zero_grad()
        _loss(nets, x).backward()
        _loss(reference, x).backward()
        norm = flat.clip_grad_norm(1.0)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        assert norm.item() == pytest.approx(ref_norm.item(), rel=1e-5)
        for group in (opt.param_groups[0], ref_opt.param_groups[0]):
            group["lr"] = 1e-2 * (step + 1) / 6  # the trainer sets the rate every step
        opt.step()
        ref_opt.step()
        ema.step(flat.param)
        ref_ema.step(ref_params)
        assert torch.allclose(flat.param, torch.cat([p.reshape(-1) for p in ref_params]), atol=1e-6)
        assert torch.allclose(ema.shadow, torch.cat([p.reshape(-1) for p in ref_ema.shadow_params]), atol=1e-6)
    state = ema.state_dict()
    again = EMA(torch.zeros_like(flat.param), decay=0.9)
    again.load_state_dict(state)
    assert again.updates == 6 and torch.equal(again.shadow, ema.shadow)
    ema.copy_to(flat.param)
    assert torch.equal(nets["a"][0].weight.reshape(-1), ema.shadow[: nets["a"][0].weight.numel()])
