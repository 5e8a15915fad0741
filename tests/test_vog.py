"""VoG: the analytic last-layer gradient against autograd, and the ring buffer's score."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.networks import build_network
from model.vog import VoGBuffer, input_gradient, last_layer_gradient


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_analytic_last_layer_gradient_matches_autograd(seed):
    generator = torch.Generator().manual_seed(seed)
    n, d, k = 7, 13, 5
    features = torch.randn(n, d, generator=generator, dtype=torch.float64)
    weight = torch.randn(k, d, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(k, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, k, (n,), generator=generator)
    probs = torch.softmax(features @ weight.T + bias, dim=1).detach()
    analytic = last_layer_gradient(probs, features, labels)
    for i in range(n):
        loss = F.cross_entropy((features[i:i + 1] @ weight.T + bias), labels[i:i + 1])
        grad_w, grad_b = torch.autograd.grad(loss, [weight, bias])
        expected = torch.cat([grad_b[labels[i]].view(1), grad_w[labels[i]]])
        relative_error = (analytic[i] - expected).norm() / expected.norm()
        assert relative_error < 1e-5


def test_input_gradient_matches_per_sample_autograd():
    torch.manual_seed(0)
    net = build_network("smallcnn", num_classes=3, in_channels=1, image_size=8).double().eval()
    images = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    batched = input_gradient(net, images, labels)
    for i in range(4):
        x = images[i:i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(x)[0, labels[i]], x)
        torch.testing.assert_close(batched[i], grad.flatten(), rtol=1e-8, atol=1e-10)


def test_buffer_scores_are_population_std_over_the_last_window():
    buffer = VoGBuffer(num_samples=2, dim=3, window=3)
    history = [np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]) * (e + 1) for e in range(5)]
    for epoch, snapshot in enumerate(history):
        assert buffer.ready == (epoch >= 3)
        buffer.write(torch.arange(2), torch.from_numpy(snapshot))
        buffer.commit()
    last = np.stack(history[-3:], axis=1)  # (N, W, D)
    np.testing.assert_allclose(buffer.scores(), last.std(axis=1, ddof=0).mean(axis=1), rtol=1e-6)
    assert buffer.scores()[1] == 0.0


def test_buffer_is_nan_until_full_and_round_trips_its_state():
    buffer = VoGBuffer(num_samples=4, dim=2, window=2)
    assert np.isnan(buffer.scores()).all()
    for value in (1.0, 3.0):
        buffer.write(torch.arange(4), torch.full((4, 2), value))
        buffer.commit()
    clone = VoGBuffer.from_state_dict(buffer.state_dict())
    np.testing.assert_allclose(clone.scores(), np.ones(4))


def test_buffer_refuses_a_window_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        VoGBuffer(num_samples=1, dim=1, window=1)
