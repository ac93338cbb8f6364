"""Learning-rate schedule and collapse guard (bundle.stability)."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine

from bundle.stability import CollapseGuard, WeightAverage, constant_then_linear_decay


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_constant_then_linear_decay_and_extension():
    opt = _opt()
    sched = constant_then_linear_decay(opt, max_epochs=8, decay_start=0.5)
    rates = []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    # a finished run extended to 16 epochs follows the new schedule from epoch 8, not the old (decayed) one
    opt2 = _opt()
    longer = constant_then_linear_decay(opt2, max_epochs=16, decay_start=0.5)
    longer.load_state_dict(sched.state_dict())
    opt2.step()
    longer.step()
    assert longer.last_epoch == 9 and opt2.param_groups[0]["lr"] == pytest.approx(0.875)
    with pytest.raises(ValueError, match="decay_start"):
        constant_then_linear_decay(_opt(), 8, decay_start=1.5)


def _validate(guard: CollapseGuard, epoch: int, score: float, baseline: float = 20.0) -> None:
    engine = Engine(lambda e, b: None)
    engine.state.epoch = epoch
    engine.state.metrics = {"val_psnr": score, "val_input_psnr": baseline}
    guard(engine)


def test_collapse_guard_restores_the_last_good_state_on_a_forced_collapse(tmp_path):
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = constant_then_linear_decay(opt, 10)
    log = tmp_path / "guard.json"
    guard = CollapseGuard({"net": net, "opt": opt, "sched": sched}, optimizers=[opt], schedulers=[sched], log_path=str(log))

    with torch.no_grad():
        net.weight.fill_(5.0)
    _validate(guard, 1, 18.0)  # an early model below the input: not a collapse, nothing kept
    assert guard.restores == [] and guard.good is None and opt.param_groups[0]["lr"] == pytest.approx(1e-3)

    with torch.no_grad():
        net.weight.fill_(1.0)
    _validate(guard, 2, 25.0)  # good: kept
    with torch.no_grad():
        net.weight.fill_(0.0)  # the forced collapse: an all-dark generator
    _validate(guard, 3, 15.0)
    assert torch.equal(net.weight, torch.ones_like(net.weight))  # restored
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4) and sched.base_lrs == pytest.approx([5e-4])
    events = json.loads(log.read_text())
    assert events == [guard.restores[0]] and events[0]["restored_epoch"] == 2 and events[0]["epoch"] == 3

    with pytest.raises(KeyError, match="val_input_psnr"):
        bad = Engine(lambda e, b: None)
        bad.state.metrics = {"val_psnr": 1.0}
        guard(bad)


@pytest.mark.parametrize("momentum", [1.0, 0.25])
def test_weight_average_accepts_momentum_one_as_no_averaging(momentum):
    """``configs/paper_recipe.json`` sets ``ema_momentum`` 1 (raw weights); ignite's EMAHandler refused it."""
    net = torch.nn.Linear(3, 2)
    ema = WeightAverage(net, momentum=momentum)

    def step(_engine, _batch):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)

    engine = Engine(step)
    ema.attach(engine)
    before = [p.detach().clone() for p in ema.ema_model.parameters()]
    engine.run([0], max_epochs=1)
    for b, e, w in zip(before, ema.ema_model.parameters(), net.parameters(), strict=True):
        expected = (1 - momentum) * b + momentum * w.detach()
        torch.testing.assert_close(e.detach(), expected)
    if momentum == 1.0:
        assert all(torch.equal(e, w) for e, w in zip(ema.ema_model.parameters(), net.parameters(), strict=True))


@pytest.mark.parametrize("momentum", [0.0, 1.5])
def test_weight_average_refuses_momentum_outside_zero_one(momentum):
    with pytest.raises(ValueError, match="ema_momentum"):
        WeightAverage(torch.nn.Linear(2, 2), momentum=momentum)
