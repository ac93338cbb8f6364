import io

import pytest
import torch

from bundle.image_pool import ImagePool


def test_pool_size_zero_passes_through():
    pool = ImagePool(pool_size=0)
    x = torch.rand(3, 1, 4, 4, 4)
    assert pool.query(x) is x
    assert len(pool) == 0


def test_pool_fills_up_to_size_and_keeps_shapes():
    pool = ImagePool(pool_size=5, seed=0)
    for i in range(4):
        x = torch.full((2, 1, 4, 4, 4), float(i), requires_grad=True)
        out = pool.query(x)
        assert out.shape == x.shape and not out.requires_grad
        assert len(pool) == min(2 * (i + 1), 5)
    assert all(im.device.type == "cpu" and im.shape == (1, 4, 4, 4) for im in pool.images)


def test_first_queries_return_inputs_then_history_is_mixed():
    pool = ImagePool(pool_size=4, seed=1)
    x = torch.arange(4.0).reshape(4, 1, 1, 1, 1)
    assert torch.equal(pool.query(x), x)
    outs = torch.cat([pool.query(torch.full((4, 1, 1, 1, 1), 10.0 + k)) for k in range(10)])
    assert (outs < 10).any()  # volumes stored by the first query come back later
    fresh = sum(v == 10.0 + k // 4 for k, v in enumerate(outs.flatten().tolist()))
    assert 0.3 < fresh / outs.numel() < 0.8  # about half come from the history


def test_state_dict_round_trip_gives_identical_subsequent_queries():
    torch.manual_seed(0)
    pool = ImagePool(pool_size=3, seed=123)
    for _ in range(3):
        pool.query(torch.rand(2, 1, 4, 4, 4))
    buffer = io.BytesIO()
    torch.save(pool.state_dict(), buffer)
    buffer.seek(0)
    resumed = ImagePool(pool_size=3, seed=999)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(5):
        x = torch.rand(2, 1, 4, 4, 4)
        assert torch.equal(pool.query(x), resumed.query(x))
    with pytest.raises(ValueError, match="pool_size"):
        ImagePool(pool_size=4).load_state_dict(pool.state_dict())


def test_same_seed_same_sequence():
    xs = [torch.rand(2, 1, 2, 2, 2) for _ in range(6)]
    a, b = ImagePool(2, seed=5), ImagePool(2, seed=5)
    for x in xs:
        assert torch.equal(a.query(x), b.query(x))
