"""GPU-only checks of the training step, in this process (skipped where no CUDA device is
visible), each showing that its feature is really on: the autocast dtype of a convolution's
output and a float32 likelihood head in bf16 and fp16, parameters and activations in
channels_last, no host synchronisation inside a step (fp32, bf16, fp16); the CUDA-graph step
(--cuda_graphs) replaying the eager step's arithmetic, with replays counted, fresh posterior
noise on each replay and, after an optimizer restore, the learning rate the schedule sets
reaching the graph; and, marked ``slow`` (the optional run), torch.compile building frames."""
import numpy as np
import pytest
import torch

import checkpoints
import train_step
from conftest import ref
from hps import get_hparams
from test_train import TINY, TINY32
from utils import Dist, ieee_fp32

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def _setup(extra=(), args=TINY, shape=(4, 28, 28, 1)):
    H = get_hparams(args + ['--device', 'cuda', '--skip_threshold', '400', '--lr', '0.003', '--warmup_iters', '3',
                            *extra])
    d = Dist(device=torch.device('cuda', torch.cuda.current_device()))
    model, ema = train_step.build_models(H, d)
    opt = train_step.make_optimizer(H, model, d.device)
    scaler = torch.amp.GradScaler('cuda') if H.precision == 'fp16' else None
    step = train_step.make_step(H, model, model, ema, opt, scaler, train_step.precision_context(H, d.device))
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return H, model, ema, opt, step, x.to(d.device)


FEATURES = {'fp32': [], 'bf16-channels_last': ['--precision', 'bf16', '--channels_last'],
            'fp16-grad_checkpoint': ['--precision', 'fp16', '--grad_checkpoint']}


@pytest.mark.parametrize('case', list(FEATURES))
def test_precision_and_layout_are_on_and_the_step_does_not_synchronise(case):
    """A 3x3 convolution's output has the autocast dtype (bf16/fp16) and the likelihood head's
    stays float32; with --channels_last the parameters and activations are channels_last.  Then
    three steps (the first creates the optimizer state) with CUDA's sync debug mode set to
    raise on any host synchronisation (fp16: with the gradient scaler)."""
    H, model, ema, opt, step, x = _setup(FEATURES[case])
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output)  # the first call's output (grad checkpointing calls again)
        return hook
    conv, head = model.encoder.enc_blocks[0].c2, model.decoder.out_net.out_conv  # a 3x3 conv, the DMoL head
    hooks = [conv.register_forward_hook(record('conv')), head.register_forward_hook(record('head'))]
    step(x, 1e-3)
    for h in hooks:
        h.remove()
    want = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[H.precision]
    assert seen['conv'].dtype == want and seen['head'].dtype == torch.float32
    cl = torch.channels_last
    assert conv.weight.is_contiguous(memory_format=cl) == H.channels_last == (not conv.weight.is_contiguous())
    if H.channels_last:  # (without it the backend may still pick NHWC for a 1-channel input: not asserted)
        assert seen['conv'].is_contiguous(memory_format=cl) and not seen['conv'].is_contiguous()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for i in range(3):
            st, _ = step(x, train_step.learning_rate(H, i + 1))
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert torch.isfinite(st['elbo'])  # (fp16: the scaler's first steps may overflow; it lowers its scale)


def test_cuda_graph_step_equals_eager_step(monkeypatch):
    """Six steps (three eager warm-up steps, the capture, replays), posterior noise fixed to
    zero so that both runs see the same numbers, and learning rates rounded to float32 for both
    (the graph reads a float32 tensor; Adam's updates of nearly-zero gradients amplify the
    difference to 5e-6): losses, grad norms, parameters and EMA equal the eager step's to float
    rounding, in IEEE fp32."""
    import vae
    monkeypatch.setattr(vae.DecBlock, '_noise', lambda self, n, device: torch.zeros(
        (n, self.zdim, self.base, self.base), device=device))
    runs = []
    with ieee_fp32():
        for extra in ((), ('--cuda_graphs',)):
            H, model, ema, opt, step, x = _setup(extra)
            assert isinstance(step, train_step.GraphedStep) == bool(extra)
            losses = []
            for i in range(6):
                st, _ = step(x, float(np.float32(train_step.learning_rate(H, i))))
                losses.append(torch.stack([st['elbo'], st['grad_norm']]))
            assert step.graph is not None and step.replays == 3 if extra else True
            runs.append((torch.stack(losses).cpu(), torch.cat([p.detach().flatten() for p in
                                                               list(model.parameters()) + list(ema.parameters())])))
    (l1, p1), (l2, p2) = runs
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=0)
    torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _replays_at_zero_lr(H, model, step, x, n=2):
    """After the eager steps and the capture, ``n`` replays at learning rate 0: (elbos, whether the
    parameters stayed exactly as they were).  AdamW's step and its decoupled weight decay both
    scale with the learning rate, so a graph that reads the schedule's lr changes nothing."""
    for i in range(step.warmup):
        step(x, train_step.learning_rate(H, i + 1))
    step(x, 1e-3)  # the capture (and its first replay)
    before = _params(model)
    elbos = [step(x, 0.0)[0]['elbo'] for _ in range(n)]
    return torch.stack(elbos), torch.equal(_params(model), before)


def test_cuda_graph_replays_draw_fresh_noise():
    """Two replays on the same batch with the parameters held still (lr 0): different losses,
    since each replay draws new posterior noise through the graph's RNG offsets; counted."""
    H, model, ema, opt, step, x = _setup(['--cuda_graphs'])
    elbos, unchanged = _replays_at_zero_lr(H, model, step, x)
    assert unchanged and step.replays == 3
    assert elbos[0] != elbos[1] and torch.isfinite(elbos).all()


@pytest.mark.parametrize('source', ['cuda_graphs_run', 'apex_file'])
def test_cuda_graphs_learning_rate_reaches_the_graph_after_an_optimizer_restore(source, tmp_path):
    """A --cuda_graphs run's own -opt.th (its learning rate saved as a CUDA tensor, loaded onto
    the CPU) or the release's apex file, loaded before the capture: replays at lr 0 leave the
    parameters exactly as they are, replays at lr > 0 move them (the graph read a CPU copy of
    the learning rate once, at capture, or the step failed on a float)."""
    H, model, ema, opt, step, x = _setup(['--cuda_graphs'], TINY32, (4, 32, 32, 3))
    if source == 'apex_file':
        path = ref('tiny32', 'apex_opt.th')
    else:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        assert opt.param_groups[0]['lr'].is_cuda
        path = str(tmp_path / 'latest-opt.th')
        torch.save(opt.state_dict(), path)
        H, model, ema, opt, step, x = _setup(['--cuda_graphs'], TINY32, (4, 32, 32, 3))
    checkpoints.load_optimizer_file(opt, path)
    step = train_step.make_step(H, model, model, ema, opt, None, train_step.precision_context(H, x.device))
    _, unchanged = _replays_at_zero_lr(H, model, step, x)
    assert unchanged
    before = _params(model)
    step(x, 1e-3)
    assert not torch.equal(_params(model), before)


@pytest.mark.slow
@pytest.mark.parametrize('scope', ['model', 'blocks'])
def test_compile_builds_frames(scope):
    """--compile: dynamo compiles frames (none would mean the model ran eagerly) and the
    compiled training step gives finite losses in bf16."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    H, model, ema, opt, _, x = _setup(['--precision', 'bf16', '--compile', '--compile_scope', scope])
    net = train_step.wrap_for_training(H, model, Dist(device=x.device))
    step = train_step.EagerStep(H, net, model, ema, opt, None, train_step.precision_context(H, x.device))
    for i in range(2):
        st, _ = step(x, 1e-3)
    assert counters['frames']['ok'] > 0 and counters['stats']['unique_graphs'] > 0, dict(counters['frames'])
    assert torch.isfinite(st['elbo'])
