"""GPU-only checks of the training step (skipped where no CUDA device is visible): no host
synchronisation inside a step, and the CUDA-graph step (--cuda_graphs) replaying the
eager step's arithmetic."""
import pytest
import torch

import train
from hps import get_hparams
from test_train import TINY
from utils import Dist, ieee_fp32

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def _setup(extra=()):
    H = get_hparams(TINY + ['--device', 'cuda', '--skip_threshold', '400', '--lr', '0.003', '--warmup_iters', '3',
                            *extra])
    d = Dist(device=torch.device('cuda', torch.cuda.current_device()))
    model, ema = train.build_models(H, d)
    opt = train.make_optimizer(H, model, d.device)
    step = train.make_step(H, model, model, ema, opt, None, train.precision_context(H, d.device))
    x = torch.randint(0, 256, (4, 28, 28, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return H, model, ema, opt, step, x.to(d.device)


def test_training_step_does_not_synchronise():
    """Three steps (the first creates the optimizer state) with CUDA's sync debug mode set to
    raise on any host synchronisation."""
    H, model, ema, opt, step, x = _setup()
    step(x, 1e-3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for i in range(3):
            st, _ = step(x, train.learning_rate(H, i + 1))
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert st['skipped_updates'].item() == 0


def test_cuda_graph_step_equals_eager_step(monkeypatch):
    """Six steps (three eager warm-up steps, the capture, replays), posterior noise fixed to
    zero so that both runs see the same numbers: losses, grad norms, parameters and EMA equal
    the eager step's to float rounding, in IEEE fp32."""
    import vae
    monkeypatch.setattr(vae.DecBlock, '_noise', lambda self, n, device: torch.zeros(
        (n, self.zdim, self.base, self.base), device=device))
    runs = []
    with ieee_fp32():
        for extra in ((), ('--cuda_graphs',)):
            H, model, ema, opt, step, x = _setup(extra)
            assert isinstance(step, train.GraphedStep) == bool(extra)
            losses = []
            for i in range(6):
                st, _ = step(x, train.learning_rate(H, i))
                losses.append(torch.stack([st['elbo'], st['grad_norm']]))
            assert step.graph is not None if extra else True
            runs.append((torch.stack(losses).cpu(), torch.cat([p.detach().flatten() for p in
                                                               list(model.parameters()) + list(ema.parameters())])))
    (l1, p1), (l2, p2) = runs
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=0)
    torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6)
