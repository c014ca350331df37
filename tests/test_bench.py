"""bench.py and benchmark.py: the --tiny run prints every column and writes the same figures as
JSON; FLOP counting reproduces the release's flops.json."""
import json
import os
import subprocess
import sys

import pytest

import bench
import benchmark
from conftest import ref
from hps import HPARAMS_REGISTRY, UserError, preset

ROOT = os.path.join(os.path.dirname(__file__), '..')


def test_tiny_compare_prints_every_column_and_json(tmp_path):
    out = tmp_path / 'bench.json'
    cmd = [sys.executable, 'bench.py', '--tiny', '--compare', '--threads', '1', '--steps', '3', '--warmup', '1',
           '--eval_steps', '1', '--sample_steps', '1', '--peak_tflops', '0.5', '--json', str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('config'))
    for col in bench.COLUMNS:
        assert col in lines[header], col
    rows = lines[header + 2:header + 4]
    assert rows[0].startswith('plain fp32 eager') and rows[1].startswith('chosen: fp32')
    for row in rows:
        assert 'n/a' not in row  # a declared peak gives a % of peak
        assert len(row.split()) >= len(bench.COLUMNS)
    assert 'speedup over plain fp32 eager' in p.stdout
    result = json.loads(out.read_text())
    assert result['n_params'] == 135_078 and result['device'] == 'cpu' and result['threads'] == 1
    assert len(result['results']) == 2
    for r in result['results']:
        for k in ['train_steps_per_s', 'train_images_per_s', 'eval_images_per_s', 'sample_images_per_s',
                  'train_peak_mem_bytes', 'train_flops_per_image', 'train_tflops', 'train_fraction_of_peak']:
            assert r[k] > 0, k
        assert r['train_fraction_of_peak'] == pytest.approx(r['train_tflops'] / 0.5)
    assert result['results'][0]['optimizer'] == 'AdamW'
    assert set(result['speedup']) == {'train_images_per_s', 'eval_images_per_s', 'sample_images_per_s'}


def test_flop_count_matches_release_figures():
    want = json.load(open(ref('flops.json')))['cifar10']
    fwd, bwd, sample = benchmark.count_flops(preset('cifar10'))
    assert (fwd, bwd) == (want['forward_flops'], want['backward_flops']) == benchmark.RELEASE_FLOPS['cifar10']
    assert 0 < sample < fwd


def test_release_presets_are_recognised():
    assert benchmark.release_preset_of(preset('cifar10', n_batch=4, lr=1.0)) == 'cifar10'
    assert benchmark.release_preset_of(preset('imagenet64')) == 'imagenet64'
    assert benchmark.release_preset_of(preset('cifar10', width=128)) is None
    assert benchmark.release_preset_of(bench.parse(['--tiny', '--device', 'cpu'])) is None


def test_tiny_excludes_hps():
    with pytest.raises(UserError):
        bench.parse(['--tiny', '--hps', 'cifar10'])
    H = bench.parse(['--tiny', '--n_batch', '2', '--device', 'cpu'])
    assert H.width == 32 and H.n_batch == 2 and H.skip_threshold == -1 and H.threads == 1
    assert bench.TINY_PRESET not in HPARAMS_REGISTRY  # no trace left for other code that walks the registry


def test_presets_table_counts_aten_ops_per_step(tmp_path):
    """--presets measures each preset in fresh processes into one table; on the CPU the
    kernels/step column holds aten operators per training step (the same in every run: the
    step's operator sequence is fixed) and GPU busy % stays blank."""
    out = tmp_path / 'presets.json'
    cmd = [sys.executable, 'bench.py', '--presets', 'fashion_mnist_quick', '--repeat', '2', '--device', 'cpu',
           '--n_batch', '2', '--threads', '1', '--steps', '1', '--warmup', '1', '--eval_steps', '1',
           '--sample_steps', '1', '--json', str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('config'))
    row = lines[header + 2]
    assert row.startswith('fashion_mnist_quick: fp32')
    result = json.loads(out.read_text())['presets']['fashion_mnist_quick']
    r = result['results'][0]
    counts = [run['aten_ops_per_step'] for run in r['repeats']]
    assert len(counts) == 2 and counts[0] == counts[1] and 500 < counts[0] < 20_000
    assert 0 < r['aten_compute_ops_per_step'] < r['aten_ops_per_step']
    assert r['device_kernels_per_step'] is None and r['device_busy_fraction'] is None
    # the kernels/step cell shows the count, the GPU busy % cell is empty (two spaces more before warm-up s)
    cells = row.split()
    assert cells[-2] == str(counts[0])
    k = lines[header].index('kernels/step')
    assert row[k:k + len('kernels/step')].strip() == str(counts[0])
    b = lines[header].index('GPU busy %')
    assert row[b:b + len('GPU busy %')].strip() == ''


def test_presets_exclude_hps():
    with pytest.raises(UserError):
        bench.main(['--presets', 'cifar10', '--hps', 'cifar10', '--device', 'cpu'])


def test_warm_up_covers_the_capture_of_a_graphed_step(monkeypatch, fake_cuda_graphs):
    """With --cuda_graphs (GraphedStep: 3 eager steps, then the capture) bench's warm-up runs
    past the capture and a replay whatever --warmup says, so every timed step is a replay
    (bench's --warmup 3 equalled the eager steps: the capture fell into the first timed step).
    Played on the CPU (conftest.FakeCUDAGraphs)."""
    import torch
    H = bench.parse(['--tiny', '--device', 'cpu', '--warmup', '1', '--steps', '2', '--eval_steps', '1',
                     '--sample_steps', '1', '--profile_steps', '0', '--n_batch', '2'])
    H.cuda_graphs = True  # refused on the CPU by parse; its arithmetic runs there (test_graphed_step.py)
    torch.set_num_threads(1)
    at_timing = []
    timed = benchmark.timed

    def timed_after_warm_up(fn, n, device):
        if not at_timing:
            at_timing.append((list(fake_cuda_graphs.captures), fake_cuda_graphs.replays))
        return timed(fn, n, device)
    monkeypatch.setattr(benchmark, 'timed', timed_after_warm_up)
    out = benchmark.run_config(H, torch.device('cpu'), dict(forward=1, backward=1, sample=1))
    assert at_timing == [(['thread_local'], 2)]  # captured (its first replay) and replayed once before timing
    assert out['warmup_steps'] == 5 and fake_cuda_graphs.eager == 3


def test_cudnn_autotuning_as_train_py(monkeypatch, tmp_path):
    """bench.py sets cuDNN's autotuner as train.py does on CUDA (on: it left it off unless
    --cudnn_benchmark), and its baseline as the release (off).  The flag can be set and read
    on a CPU build; the process set-up is what each script calls."""
    import torch
    import train
    from utils import Dist
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    monkeypatch.setattr(train, 'setup_distributed',
                        lambda port, device=None, timeout=None: Dist(device=torch.device('cuda', 0)))
    train.set_up(['--hps', 'cifar10', '--save_dir', str(tmp_path), '--device', 'cuda'])
    in_train = torch.backends.cudnn.benchmark
    H = bench.parse(['--tiny', '--device', 'cpu'])
    H.device = 'cuda'  # as parse sets it with a GPU
    for config, want in [(bench.baseline_of(H), False), (H, in_train)]:
        bench.set_up_process(config)
        assert torch.backends.cudnn.benchmark is want
    assert in_train is True
