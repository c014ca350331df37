"""The DMoL likelihood and sampler: parity with the release and normalisation."""
import itertools

import numpy as np
import pytest
import torch

from conftest import ref
from vae_helpers import discretized_mix_logistic_loss as dmol_loss
from vae_helpers import gaussian_analytical_kl, sample_from_discretized_mix_logistic

D = np.load(ref('dmol', 'dmol.npz'))
T = {k: torch.tensor(D[k]) for k in D.files}


@pytest.mark.parametrize('l,x,low_bit,want', [
    ('l', 'x', False, 'loss'),
    ('l', 'x_5bit', True, 'loss_low_bit'),
    ('l', 'x', True, 'loss_low_bit_on_x'),
    ('l_clamp', 'x', False, 'loss_clamp'),
    ('l_clamp', 'x_5bit', True, 'loss_low_bit_clamp'),
])
def test_loss_matches_release(l, x, low_bit, want):
    got = dmol_loss(T[x], T[l], low_bit=low_bit)
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), D[want], rtol=1e-5)


@pytest.mark.parametrize('l,want', [('l', 'sample'), ('l_clamp', 'sample_clamp')])
def test_sample_matches_release(l, want):
    torch.manual_seed(3)
    got = sample_from_discretized_mix_logistic(T[l], 3)
    np.testing.assert_allclose(got.numpy(), D[want], atol=1e-6)


def _grid(bits):
    """The values a DMoL of this bit depth puts mass on: 2^bits points tiling [-1, 1]."""
    n = 2 ** bits
    return torch.linspace(-1., 1., n)


@pytest.mark.parametrize('bits', [8, 5])
def test_grayscale_probabilities_sum_to_one(bits):
    torch.manual_seed(0)
    nr_mix = 4
    for scale in [0.5, 3.0]:  # broad and peaked mixtures (peaked ones hit the small-bin fallback)
        l = torch.randn(1, 1, 1, nr_mix * 3) * scale
        values = _grid(bits)
        x = values.view(-1, 1, 1, 1)  # one 1x1 image per value
        nll = dmol_loss(x, l.expand(len(values), 1, 1, -1), low_bit=bits == 5)
        total = torch.exp(-nll.double()).sum().item()  # one pixel, one channel: nll is log p
        assert abs(total - 1) < 1e-4, total


def test_rgb_5bit_joint_probabilities_sum_to_one():
    torch.manual_seed(1)
    nr_mix = 3
    l = torch.randn(1, 1, 1, nr_mix * 10)
    v = _grid(5)
    x = torch.stack(torch.meshgrid(v, v, v, indexing='ij'), dim=-1).reshape(-1, 1, 1, 3)  # all 32^3 pixels
    nll = dmol_loss(x, l.expand(len(x), 1, 1, -1), low_bit=True)
    total = torch.exp(-3 * nll.double()).sum().item()  # nll is per dim: log p = -3 * nll
    assert abs(total - 1) < 1e-4, total


def test_grayscale_sampler_matches_its_likelihood():
    """Empirical frequencies of 1-channel samples agree with the DMoL probabilities."""
    torch.manual_seed(0)
    l = torch.tensor([[[[1.0, -0.5, -0.3, 0.4, -1.5, -2.0]]]])  # 2 mixtures: logits, means, log-scales
    n = 200_000
    torch.manual_seed(5)
    s = sample_from_discretized_mix_logistic(l.expand(n, 1, 1, -1), 2, channels=1)
    codes = torch.round((s + 1) * 127.5).long().flatten()
    values = _grid(8)
    p = torch.exp(-dmol_loss(values.view(-1, 1, 1, 1), l.expand(256, 1, 1, -1)))
    freq = torch.bincount(codes, minlength=256).double() / n
    # total variation distance between sampled and modelled distributions
    assert 0.5 * (freq - p.double()).abs().sum().item() < 0.02


def test_gaussian_kl_properties():
    torch.manual_seed(0)
    mu, ls = torch.randn(1000), torch.randn(1000) * 0.3
    assert torch.allclose(gaussian_analytical_kl(mu, mu, ls, ls), torch.zeros(1000), atol=1e-6)
    mu2, ls2 = torch.randn(1000), torch.randn(1000) * 0.3
    kl = gaussian_analytical_kl(mu, mu2, ls, ls2)
    assert (kl >= -1e-6).all()
    # Monte Carlo check of one entry: E_q[log q - log p]
    q = torch.distributions.Normal(mu[0], ls[0].exp())
    p = torch.distributions.Normal(mu2[0], ls2[0].exp())
    z = q.sample((400_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean()
    assert abs(mc.item() - kl[0].item()) < 0.02 * max(1, kl[0].item())


def _release_kl(mu1, mu2, logsigma1, logsigma2):
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (logsigma1.exp() ** 2 + (mu1 - mu2) ** 2) / (logsigma2.exp() ** 2)


def test_gaussian_kl_closed_form_gradient():
    """GaussianKL (the KL with a hand-written backward): forward bitwise the release's
    expression; gradients pass gradcheck in float64 and equal autograd through the
    release's expression to float32 rounding."""
    from vae_helpers import GaussianKL
    torch.manual_seed(0)
    args64 = [torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(GaussianKL.apply, args64)
    args = [torch.randn(2, 4, 8, 8) * s for s in (1.0, 1.0, 0.5, 0.5)]
    a = [t.clone().requires_grad_() for t in args]
    b = [t.clone().requires_grad_() for t in args]
    got, want = gaussian_analytical_kl(*a), _release_kl(*b)
    assert got.grad_fn.name().startswith('GaussianKLBackward')
    assert torch.equal(got, want)
    w = torch.randn_like(got)
    (got * w).sum().backward()
    (want * w).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=2e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(gaussian_analytical_kl(*args), _release_kl(*args))


def test_head_stays_float32_under_bf16_autocast():
    """The likelihood head (out_conv) computes in float32 under bf16 autocast: on sharp
    mixtures (scales below a bin) with means near +-1, where bf16's spacing (2**-7) is about
    one 8-bit bin, the training loss equals the fp32 head's, not the one of a rounded head."""
    from hps import preset
    from vae_helpers import DmolNet
    H = preset('cifar10', width=16, num_mixtures=3)
    torch.manual_seed(0)
    head = DmolNet(H)
    nr_mix = H.num_mixtures
    bias = torch.zeros(10 * nr_mix)
    for c in range(3):  # per channel: M means near +-1, M log-scales -6.5 (scale 1.5e-3 < half a bin), M coefficients
        first = nr_mix + c * 3 * nr_mix
        bias[first:first + nr_mix] = torch.tensor([0.97, -0.96, 0.99][:nr_mix]) * (-1) ** c
        bias[first + nr_mix:first + 2 * nr_mix] = -6.5
    with torch.no_grad():
        head.out_conv.weight.mul_(0.02)
        for c in range(3):  # no coupling: each channel's mean is its own
            first = nr_mix + c * 3 * nr_mix + 2 * nr_mix
            head.out_conv.weight[first:first + nr_mix] = 0
        head.out_conv.bias.copy_(bias)
    px_z = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        l = head(px_z)
        means = l[..., nr_mix:].reshape(2, 8, 8, 3, 3 * nr_mix)[..., 0]  # component 0 of each channel
        x = torch.round((means.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # the nearest 8-bit values: sharp likelihood
        fp32 = head.nll(px_z, x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert head.out_conv(px_z).dtype == torch.bfloat16  # autocast is on for convolutions
            bf16 = head.nll(px_z, x)
        rounded = dmol_loss(x, l.bfloat16().float())
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=1e-6, atol=0)
    assert fp32.max() < 1 and (rounded - fp32).abs().max() > 0.01  # nats/dim: what a bf16 head's output costs here
