"""--cuda_graphs on the CPU: train_step.GraphedStep's eager warm-up, capture and replays, played
through conftest.FakeCUDAGraphs (torch.cuda's stream and graph API acted out eagerly).  What
only a GPU can show (a real capture next to the DataLoader's pin-memory thread, replays of
real kernels, fresh posterior noise on each replay) is in tests/test_cuda*.py."""
import json

import numpy as np
import pytest
import torch

import checkpoints
import train
import train_step
import utils
from conftest import ref
from hps import get_hparams
from test_device import HostReads
from test_train import TINY, TINY32, fmnist_root  # noqa: F401 (a fixture)
from utils import Dist

META = torch.device('meta')


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # small convolutions: a second OpenMP thread only waits on a busy machine


def _steps(H, model, ema, opt):
    return train_step.make_step(H, model, model, ema, opt, None, train_step.precision_context(H, next(model.parameters()).device))


def test_graphed_step_equals_the_eager_step(fake_cuda_graphs):
    """Three eager warm-up steps, the capture (in CUDA's thread-local mode, with this call's
    batch already in the static buffer) and two replays, at warm-up learning rates and with
    one update skipped (its batch's grad norm is over the threshold), against the plain step:
    the same skip decisions and step counts; losses, grad norms, parameters, EMA and Adam
    moments equal to float rounding (the learning rate is rounded to float32)."""
    d = Dist()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 28, 28, 1), dtype=torch.uint8, generator=gen)
    batches = [x, x, x, x, torch.full_like(x, 255), x]  # all-white: grad norm about 2, the others about 1.3
    runs = []
    for graphs in (False, True):
        H = get_hparams(TINY + ['--skip_threshold', '1.6', '--warmup_iters', '4', '--lr', '0.01']
                        + (['--cuda_graphs'] if graphs else []))
        model, ema = train_step.build_models(H, d)
        opt = train_step.make_optimizer(H, model, d.device)
        assert bool(opt.defaults.get('capturable')) == graphs
        step = _steps(H, model, ema, opt)
        assert isinstance(step, train_step.GraphedStep) == graphs
        out = []
        for i, b in enumerate(batches):
            torch.manual_seed(i)
            assert getattr(step, 'captures_next', False) == (graphs and i == 3)
            st, _ = step(b, train_step.learning_rate(H, i))
            out.append([st[k].item() for k in train_step.STEP_STATS])
        runs.append((torch.tensor(out), torch.cat([p.detach().flatten() for p in list(model.parameters()) +
                                                   list(ema.parameters())]),
                     torch.cat([s['exp_avg_sq'].flatten() for s in opt.state.values()]),
                     [s['step'].item() for s in opt.state.values()]))
    assert fake_cuda_graphs.captures == ['thread_local']  # a CUDA call of another thread cannot break it
    assert torch.equal(fake_cuda_graphs.captured_batches[0], batches[3])
    assert fake_cuda_graphs.eager == 3 and fake_cuda_graphs.replays == step.replays == 3
    (o1, p1, s1, n1), (o2, p2, s2, n2) = runs
    assert o1[:, train_step.STEP_STATS.index('skipped_updates')].tolist() == [0, 0, 0, 0, 1, 0]
    torch.testing.assert_close(o2, o1, rtol=1e-6, atol=0)
    torch.testing.assert_close(p2, p1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-12)
    assert n1 == n2 and n1[0] == 5


# ----------------------------------------------------------------------------- optimizer restores

def _tiny32(device, cuda_graphs=True, **kw):
    """The tiny32 architecture (that of the release bundle and its apex file) on ``device``."""
    H = get_hparams(TINY32 + ['--warmup_iters', '4', '--skip_threshold', '-1']
                    + (['--cuda_graphs'] if cuda_graphs else []))
    H.update(kw)
    model, ema = train_step.build_models(H, Dist(device=device))
    return H, model, ema, train_step.make_optimizer(H, model, device)


def _one_update(model, opt):
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()


def _optimizer_file(tmp_path, cuda_graphs):
    """-opt.th of a run that took one step: the learning rate in it is a float (plain run) or a
    tensor (--cuda_graphs run; saved from the GPU, it loads onto the CPU)."""
    H, model, _, opt = _tiny32(torch.device('cpu'), cuda_graphs)
    _one_update(model, opt)
    assert torch.is_tensor(opt.param_groups[0]['lr']) == cuda_graphs
    path = str(tmp_path / f'{"graphs" if cuda_graphs else "plain"}-opt.th')
    torch.save(opt.state_dict(), path)
    return path


def _restore(kind, H, model, ema, opt, tmp_path):
    """Load optimizer state the ``kind`` way into ``opt`` (and weights into model/ema)."""
    log = utils.logger(str(tmp_path / 'log'), write=False)
    d = Dist(device=next(model.parameters()).device)
    tmp_path.mkdir(exist_ok=True)
    if kind in ('plain_run_file', 'graphs_run_file', 'apex_file'):
        path = {'plain_run_file': lambda: _optimizer_file(tmp_path, False),
                'graphs_run_file': lambda: _optimizer_file(tmp_path, True),
                'apex_file': lambda: ref('tiny32', 'apex_opt.th')}[kind]()
        checkpoints.load_optimizer_file(opt, path)
    elif kind == 'resume':  # a --cuda_graphs run's latest checkpoint, continued
        saved_H, saved_model, saved_ema, saved_opt = _tiny32(torch.device('cpu'))
        _one_update(saved_model, saved_opt)
        saved_H.run_dir = str(tmp_path / 'run')
        (tmp_path / 'run').mkdir()
        progress = checkpoints.Progress(step=3, epoch=0, batch=3, best_eval=float('inf'), skipped=0)
        log = utils.logger(str(tmp_path / 'run' / 'log'))
        log('a run log for the checkpoint to copy')
        checkpoints.save_checkpoint(saved_H, Dist(), 'latest', saved_model, saved_ema, saved_opt, None, log, progress)
        H.run_dir = saved_H.run_dir
        assert checkpoints.restore(H, d, model, ema, opt, None, log).step == 3
    else:  # the release's four restore flags on its bundle (an apex FusedAdam optimizer file)
        b = ref('tiny32', 'tiny32-iter-10-')
        H.update(run_dir=str(tmp_path / 'bundle'), restore_path=b + 'model.th', restore_ema_path=b + 'model-ema.th',
                 restore_optimizer_path=b + 'opt.th', restore_log_path=b + 'log.jsonl')
        assert checkpoints.restore(H, d, model, ema, opt, None, log).step == 10


KINDS = ['plain_run_file', 'graphs_run_file', 'apex_file', 'resume', 'release_bundle']


@pytest.mark.filterwarnings('ignore:for .*copying from a non-meta parameter')  # meta weights hold no values
@pytest.mark.parametrize('kind', KINDS)
def test_cuda_graphs_learning_rate_after_every_optimizer_restore(kind, tmp_path, fake_cuda_graphs):
    """After any optimizer restore, the learning rate is still the float32 tensor on the
    parameters' device that make_optimizer made and GraphedStep fills (load_state_dict put
    in the file's float, then the first step failed on lr.fill_, or the file's CPU tensor,
    which a fused CUDA kernel reads once at capture: the warm-up schedule stopped there), the
    step counts are on that device too, and the schedule moves it at every step.  The
    parameters are on the meta device (PyTorch's stand-in accelerator, see test_device.py)
    for the devices, on the CPU for the values."""
    with HostReads():  # AdamW checks its learning rate (0 <= lr) on the host
        H, model, ema, opt = _tiny32(META)
        lr = opt.param_groups[0]['lr']
        _restore(kind, H, model, ema, opt, tmp_path)
    for g in opt.param_groups:
        assert g['lr'] is lr and lr.device == META and lr.dtype == torch.float32 and g['capturable']
    assert all(s['step'].device == META for s in opt.state.values())

    H, model, ema, opt = _tiny32(torch.device('cpu'))
    lr = opt.param_groups[0]['lr']
    _restore(kind, H, model, ema, opt, tmp_path / 'cpu')
    step = _steps(H, model, ema, opt)
    assert step.lr is lr
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = int(opt.state[next(model.parameters())]['step'])
    for i in range(step.warmup + 2):  # eager steps, the capture, a replay
        st, _ = step(x, train_step.learning_rate(H, i))
        assert opt.param_groups[0]['lr'] is lr and lr.item() == np.float32(train_step.learning_rate(H, i))
    assert fake_cuda_graphs.replays == 2 and int(opt.state[next(model.parameters())]['step']) == first + 5


def test_train_py_loop_with_cuda_graphs(fmnist_root, tmp_path, monkeypatch, fake_cuda_graphs):
    """train.py's loop with --cuda_graphs (its refusal on the CPU patched away): the step is
    captured after the eager warm-up, in thread-local mode, the log says at which step, and
    the train_loss records count the replays."""
    monkeypatch.setattr(train, 'check_cuda_graphs', lambda H, d: None)
    train.main(TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'g', '--cuda_graphs',
                       '--device', 'cpu', '--max_iters', '6', '--iters_per_print', '1', '--valid_images', '16'])
    log = [json.loads(line) for line in open(tmp_path / 'g' / 'log.jsonl')]
    assert [z['step'] for z in log if z.get('type') == 'cuda_graph'] == [3]
    replays = {z['step']: z['graph_replays'] for z in log if z.get('type') == 'train_loss' and 'lr' in z}
    assert replays == {0: 0, 1: 0, 2: 0, 3: 1, 4: 2, 5: 3}
    assert fake_cuda_graphs.captures == ['thread_local']
