"""Every speed option computes what the plain fp32 eager model computes, on CPU.

channels_last, grad checkpointing, per-block compile, the shared-GELU decoder step and
fused AdamW to float32 rounding (1e-5); bf16 autocast within the difference that two
fp32 seeds make; the foreach EMA bitwise equal to the release's per-parameter loop.
The two compile tests (whole model, as train.py --compile; and per block) build a
one-resolution model (about a minute each cold, seconds with inductor's cache warm);
deselect them with ``-m "not slow"``.
"""
import contextlib
import copy

import pytest
import torch
from torch.nn import functional as F

import evaluation
import train_step
from conftest import load_tiny
from hps import Hyperparams, preset
from utils import Dist
from vae import VAE


def _loss_and_grads(model, x, xt, seed=0, ctx=None):
    """elbo (0-dim) and {name: grad} of one training-mode forward/backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with ctx or contextlib.nullcontext():
        elbo = model(x, xt)['elbo']
    elbo.backward()
    return elbo.detach().float(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def _assert_same_grads(got, want, rel=1e-5):
    """The whole gradient vector within ``rel`` (relative L2), and no entry further from
    its reference than 10 x rel x the largest gradient entry (summation order moves
    small gradients that come from cancelling terms by a few float32 ulps)."""
    scale = max(g.abs().max() for g in want.values())
    g, w = _flat(got), _flat(want)
    assert (g - w).norm() <= rel * w.norm(), ((g - w).norm() / w.norm()).item()
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 10 * rel * scale, k


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these tiny models gain nothing from more, and on a shared machine an
    OpenMP team whose second core is busy elsewhere stalls at every barrier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def tiny():
    """The perturbed tiny32 model (non-trivial prior and biases) and its batch, with the
    plain path's loss and gradients (on one thread, like the tests: the convolution
    backend, hence the last bits, depends on the thread count)."""
    torch.set_num_threads(1)
    H, model, x, xt, _ = load_tiny('tiny32_perturbed')
    e, g = _loss_and_grads(model, x, xt)
    return H, model, x, xt, e, g


def test_channels_last_same_loss_and_grads(tiny):
    H, model, x, xt, e, g = tiny
    m = copy.deepcopy(model)
    m.set_channels_last(True)
    assert m.encoder.in_conv.weight.is_contiguous(memory_format=torch.channels_last)
    e2, g2 = _loss_and_grads(m, x, xt)
    torch.testing.assert_close(e2, e, rtol=1e-5, atol=0)
    _assert_same_grads(g2, g)


def test_channels_last_same_samples(tiny):
    """Noise is drawn in contiguous order also for channels_last tensors."""
    H, model, x, xt, e, g = tiny
    m = copy.deepcopy(model).eval()
    m.set_channels_last(True)
    with torch.no_grad():
        for fn in [lambda mod: mod.forward_uncond_samples(4, t=0.8),
                   lambda mod: mod.forward_samples_set_latents(4, [s['z'] for s in mod.forward_get_latents(x)][:6],
                                                              t=0.1)]:
            torch.manual_seed(0)
            want = fn(model.eval())
            torch.manual_seed(0)
            got = fn(m)
            assert abs(got.astype(int) - want.astype(int)).max() <= 1  # a pixel on a uint8 boundary


def test_grad_checkpoint_identical_loss_and_grads(tiny):
    """Recomputation replays the same ops on the same noise (drawn outside the
    checkpointed step), so loss and gradients are bitwise those of the plain path."""
    H, model, x, xt, e, g = tiny
    m = copy.deepcopy(model)
    m.set_grad_checkpoint(True)
    e2, g2 = _loss_and_grads(m, x, xt)
    assert torch.equal(e2, e)
    for k in g:
        assert torch.equal(g2[k], g[k]), k


def test_bf16_autocast_within_seed_noise(tiny):
    H, model, x, xt, e, g = tiny
    e1, g1 = _loss_and_grads(model, x, xt, seed=1)
    seed_noise = (e1 - e).abs()
    grad_noise = (_flat(g1) - _flat(g)).norm() / _flat(g).norm()
    assert seed_noise > 1e-4  # a meaningful yardstick
    eb, gb = _loss_and_grads(copy.deepcopy(model), x, xt, ctx=torch.autocast('cpu', dtype=torch.bfloat16))
    assert (eb - e).abs() < 0.5 * seed_noise
    assert (_flat(gb) - _flat(g)).norm() / _flat(g).norm() < 0.5 * grad_noise


def test_shared_gelu_step_equals_release_formulation(tiny):
    """DecBlock._step shares GELU(x) between enc and prior and GELU(acts) across blocks;
    the release applies enc to cat[x, acts] and prior to x.  Same values, same gradients."""
    H, model, x, xt, e, g = tiny
    block = copy.deepcopy(model.decoder.dec_blocks[-1])  # a 32x32 block
    torch.manual_seed(3)
    w = block.widths[block.base]
    state = torch.randn(2, w, block.base, block.base, requires_grad=True)
    acts = torch.randn(2, w, block.base, block.base, requires_grad=True)
    eps = torch.randn(2, H.zdim, block.base, block.base)

    def release(x, acts):
        qm, qv = block.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        feats = block.prior(x)
        pm, pv, xpp = feats[:, :block.zdim], feats[:, block.zdim:2 * block.zdim], feats[:, 2 * block.zdim:]
        z = torch.exp(qv) * eps + qm
        return block.resnet(x + xpp + block.z_proj(z)), z, qm, qv, pm, pv

    outs = []
    for fn in (release, lambda x, a: block._step(x, F.gelu(a), eps)):
        block.zero_grad(set_to_none=True)
        state.grad = acts.grad = None
        o = fn(state, acts)
        sum((t * (i + 1)).sum() for i, t in enumerate(o)).backward()
        grads = {k: p.grad.clone() for k, p in block.named_parameters()}
        grads.update(state=state.grad.clone(), acts=acts.grad.clone())
        outs.append((o, grads))
    (o1, g1), (o2, g2) = outs
    for a, b in zip(o1, o2):
        assert torch.equal(a, b)  # forward values are bitwise the release's
    _assert_same_grads(g2, g1, rel=1e-6)


def test_update_ema_bitwise_equals_release_loop(tiny):
    """train_step.update_ema (foreach) against the release's loop, where ema_rate is a float32
    tensor: p2.mul_(rate); p2.add_(p1 * (1 - rate))."""
    H = tiny[0]
    torch.manual_seed(0)
    model, ema = VAE(H), VAE(H)
    release = copy.deepcopy(ema)
    rate = 0.9999
    rate_t = torch.as_tensor(rate, dtype=torch.float32)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            for p1, p2 in zip(model.parameters(), release.parameters()):
                p2.mul_(rate_t)
                p2.add_(p1 * (1 - rate_t))
        train_step.update_ema(model, ema, rate)
    for (k, a), b in zip(ema.named_parameters(), release.parameters()):
        assert torch.equal(a, b), k


def test_fused_adamw_matches_for_loop(tiny):
    H = tiny[0]
    params = {}
    for kw in [dict(foreach=False), dict(fused=True), dict(foreach=True)]:
        torch.manual_seed(0)
        m = VAE(H)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.9), eps=1e-8, **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        params[str(kw)] = torch.cat([p.detach().flatten() for p in m.parameters()])
    ref = params.pop(str(dict(foreach=False)))
    for k, v in params.items():
        torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-7, msg=k)


def test_training_steps_with_cpu_fast_paths_match_plain(tiny):
    """The real train_step.training_step, three updates: channels_last + grad checkpointing +
    train.py's optimizer (fused AdamW) against the plain configuration with the release's
    per-parameter AdamW loop."""
    H0, _, x, xt, _, _ = tiny
    results = []
    for fast in (False, True):
        H = Hyperparams(H0)
        H.update(seed=0, channels_last=fast, grad_checkpoint=fast, rank_invariant_noise=False, precision='fp32',
                 compile=False, lr=1e-3, grad_clip=200., skip_threshold=-1., ema_rate=0.99)
        d = Dist()
        model, ema = train_step.build_models(H, d)
        opt = (train_step.make_optimizer(H, model, d.device) if fast else
               torch.optim.AdamW(model.parameters(), lr=H.lr, weight_decay=H.wd, betas=(0.9, 0.9), eps=1e-8,
                                 foreach=False))
        assert bool(opt.defaults.get('fused')) == fast
        losses = []
        for it in range(3):
            st, _ = train_step.training_step(H, x, xt, model, model, ema, opt, None, contextlib.nullcontext(), H.lr,
                                        False)
            losses.append(st['elbo'])
        results.append((losses, torch.cat([p.flatten() for p in ema.parameters()])))
    (l0, e0), (l1, e1) = results
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=0)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-6)


def _one_resolution_model():
    """A model with every kind of block at one 4x4 resolution, quick to compile, with
    perturbed weights (a non-trivial prior), and a batch for it."""
    H = preset('cifar10', width=16, zdim=2, num_mixtures=2, enc_blocks='4x1', dec_blocks='4x1', image_size=4)
    torch.manual_seed(0)
    model = VAE(H)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 4, 4, 3)
    xt = torch.randint(0, 256, (2, 4, 4, 3)).float() / 127.5 - 1
    return model, x, xt


@pytest.mark.slow
def test_compile_whole_model_same_loss_and_grads():
    """train.py's --compile (torch.compile of the whole training model): same elbo and
    gradients as eager from the same seed, so the posterior noise is the same draw."""
    model, x, xt = _one_resolution_model()
    e, g = _loss_and_grads(model, x, xt)
    compiled = torch.compile(copy.deepcopy(model))
    for _ in range(2):
        e2, g2 = _loss_and_grads(compiled, x, xt)
        torch.testing.assert_close(e2, e, rtol=1e-5, atol=0)
        _assert_same_grads({k.removeprefix('_orig_mod.'): v for k, v in g2.items()}, g)


@pytest.mark.slow
def test_compile_blocks_same_loss_and_grads():
    """VAE.compile_blocks (inductor) on a one-resolution model with every kind of block:
    same elbo and gradients as eager, noise drawn in eager code (same seed, same draw)."""
    model, x, xt = _one_resolution_model()
    e, g = _loss_and_grads(model, x, xt)
    compiled = copy.deepcopy(model).compile_blocks()
    assert list(compiled.state_dict()) == list(model.state_dict())
    for _ in range(2):  # the first call builds, the second runs the cached graphs
        e2, g2 = _loss_and_grads(compiled, x, xt)
        torch.testing.assert_close(e2, e, rtol=1e-5, atol=0)
        _assert_same_grads(g2, g)


def test_configure_cpu_threads_and_heap(monkeypatch):
    """train.py's CPU set-up: threads = cores / processes on this node unless given, and
    glibc accepts the heap settings (utils.keep_freed_heap)."""
    import os
    import platform
    from utils import configure_cpu, keep_freed_heap
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(8)))  # the cores this process may use
    assert configure_cpu(0, keep_heap=False) == 4 and torch.get_num_threads() == 4
    assert configure_cpu(3, keep_heap=False) == 3 and torch.get_num_threads() == 3
    if platform.libc_ver()[0] == 'glibc':
        assert keep_freed_heap()


def test_threads_beyond_the_cores_are_capped_with_one_line(monkeypatch, capsys):
    """--threads 100 on 8 cores shared by 2 processes runs 4 threads each (more only
    oversubscribes the cores, many times slower), and says so in one line on the main process."""
    import os
    from utils import configure_cpu
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(8)))
    assert configure_cpu(100, keep_heap=False) == 4 and torch.get_num_threads() == 4
    assert capsys.readouterr().out == ('note: --threads 100 is more than the 8 cores here shared by 2 processes '
                                       'allow; using 4 threads per process\n')
    assert configure_cpu(100, keep_heap=False, is_main=False) == 4 and capsys.readouterr().out == ''


def test_evaluation_runs_in_ieee_fp32(tiny, monkeypatch):
    """evaluation.evaluate turns TF32 convolutions and matmuls off while it runs (PyTorch allows
    TF32 convolutions on GPUs by default) and restores the caller's settings after."""
    import numpy as np
    from utils import ieee_fp32
    H = Hyperparams(tiny[0])
    H.update(n_batch_eval=4, num_workers=0, no_progress=True)
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    seen = []
    original = VAE.forward_per_image

    def recording(self, x, xt):
        seen.append((conv.fp32_precision, matmul.fp32_precision))
        return original(self, x, xt)
    monkeypatch.setattr(VAE, 'forward_per_image', recording)
    images = np.random.default_rng(0).integers(0, 256, (6, H.image_size, H.image_size, 3), dtype=np.uint8)
    stats = evaluation.evaluate(H, Dist(), VAE(H), images)
    assert stats['n_images'] == 6 and seen == [('ieee', 'ieee')] * 2
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with ieee_fp32():
        conv.fp32_precision = 'tf32'  # changed inside: still restored on exit
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def _tf32_flags_as_read():
    """Every TF32 setting PyTorch reports ('refused' where it refuses to read a mixed one)."""
    b = torch.backends
    getters = dict(all=lambda: b.fp32_precision, cuda=lambda: b.cudnn.fp32_precision,
                   conv=lambda: b.cudnn.conv.fp32_precision, rnn=lambda: b.cudnn.rnn.fp32_precision,
                   matmul=lambda: b.cuda.matmul.fp32_precision, cudnn_allow_tf32=lambda: b.cudnn.allow_tf32,
                   matmul_allow_tf32=lambda: b.cuda.matmul.allow_tf32,
                   matmul_precision=torch.get_float32_matmul_precision)
    out = {}
    for k, get in getters.items():
        try:
            out[k] = get()
        except RuntimeError:
            out[k] = 'refused'
    return out


@pytest.fixture
def tf32_flags_put_back():
    """Puts PyTorch's default TF32 settings back after the test, whatever it left."""
    b = torch.backends
    yield
    b.fp32_precision = b.cudnn.fp32_precision = 'none'
    b.cudnn.allow_tf32 = True  # the default: conv and rnn in tf32
    b.cuda.matmul.fp32_precision = 'none'
    torch.set_float32_matmul_precision('highest')


@pytest.mark.parametrize('start', ['default', 'conv_only_new_api', 'legacy_off', 'cuda_backend_tf32'])
def test_ieee_fp32_sets_cudnn_flags_consistently_and_restores_them(start, tf32_flags_put_back):
    """Inside utils.ieee_fp32 cuDNN's legacy flag agrees with its conv and rnn precisions, so
    torch.backends.cudnn.allow_tf32 and cudnn.flags() work (setting only conv's precision made
    both raise); on exit every TF32 setting reads as before, a caller's own mix included."""
    from utils import ieee_fp32
    b = torch.backends
    if start == 'conv_only_new_api':
        b.cudnn.conv.fp32_precision = 'ieee'  # the caller's mix: the legacy flag can no longer be read
    elif start == 'legacy_off':
        b.cudnn.allow_tf32 = False
    elif start == 'cuda_backend_tf32':
        b.cudnn.fp32_precision = 'tf32'
    before = _tf32_flags_as_read()
    with ieee_fp32():
        assert (b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision) == \
            ('ieee',) * 3
        assert b.cudnn.allow_tf32 is False and b.cuda.matmul.allow_tf32 is False
        with b.cudnn.flags(enabled=True):  # reads the legacy flag on entry
            pass
    assert _tf32_flags_as_read() == before


def test_compile_scope_flag_wraps_as_documented(tiny):
    """train_step.wrap_for_training: --compile_scope model compiles the whole training model;
    blocks compiles each residual Block inside it (nothing is built until the first call)
    and leaves parameter names alone; without --compile the model itself is used."""
    from vae import Block
    H = Hyperparams(tiny[0])
    d = Dist()
    H.update(compile=False, compile_scope='model', compile_mode=None)
    model = VAE(H)
    assert train_step.wrap_for_training(H, model, d) is model
    H.update(compile=True)
    assert isinstance(train_step.wrap_for_training(H, model, d), torch._dynamo.eval_frame.OptimizedModule)
    H.update(compile_scope='blocks')
    names = list(model.state_dict())
    assert train_step.wrap_for_training(H, model, d) is model
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert list(model.state_dict()) == names
