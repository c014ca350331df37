"""Throughput, memory and FLOP utilisation of a VDVAE configuration, on synthetic data.

    python bench.py --tiny                                          # small CPU check, ~20 s
    python bench.py --tiny --compare --threads 1 --repeat 3         # plain fp32 eager vs the flags given
    python bench.py --hps cifar10 --device cuda --precision bf16 --channels_last --compile --compare
    python bench.py --hps ffhq256 --device cuda --n_batch 4 --grad_checkpoint --compare --json ffhq.json
    python bench.py --all_presets --device cuda --compare --steps 5 --warmup 2 --eval_steps 2 --sample_steps 1 \
        --json all.json                                             # the five release presets, one table

Each configuration is set up as train.py sets up its process (utils.configure_device: cuDNN's
autotuner on CUDA), built, warmed up (``--warmup`` steps: compilation, allocator and
optimizer state; with ``--cuda_graphs`` at least until the step is captured and replayed
once, so no timed step captures), then timed:

- training: the real ``train_step.training_step`` (forward, backward, clip, AdamW, EMA) on a
  fixed uint8 batch of the preset's shape, preprocessed on the device every step as in
  ``train_loop.train_loop`` (no data loading); every step updates (``skip_threshold`` -1);
- evaluation: ``forward_per_image`` of the EMA model under ``no_grad`` in fp32, as
  ``evaluation.evaluate`` (batch ``--n_batch_eval``, default 4 x n_batch);
- sampling: ``forward_uncond_samples`` of the EMA model at ``--temperature``, uint8 on the host.

After the timed steps, kernels/step: on CUDA the device kernels (with memcpy/memset) of
``--profile_steps`` training steps under torch.profiler, and GPU busy % = their summed time
over the timed step time; on the CPU the aten operators of one step, counted at the
dispatcher below autograd (forward, backward, clip, AdamW, EMA), and no GPU busy %.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident
set (VmHWM, reset before each phase) on CPU.  With ``--compare`` or ``--repeat`` every
configuration runs in a fresh process (configurations alternate; medians are reported),
so no run inherits another's heap, allocator cache or compiled graphs.  FLOPs per image are *model* FLOPs counted
by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (convolutions and
matmuls, 2 per multiply-add; elementwise work and activation recomputation not counted),
or, for the release presets, the figures in the release's ``flops.json`` (identical; a copy is
tests/reference/flops.json).
Any flag of ``hps.py`` passes through (``--hps``, ``--width``, ``--enc_blocks`` ...).

The measurements themselves (FLOPs, device facts, run_config) are benchmark.py; this script is
their command line: the flags, the fresh processes, the medians and the table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmark import ARCH_KEYS, describe, device_name, flops_per_image, run_config
from hps import HPARAMS_REGISTRY, Hyperparams, UserError, at_least, check_ranges, get_hparams
from utils import configure_device, run_main, write_text
from vae import VAE

# The reference tests' tiny32 model (width 32, 13 decoder blocks, 135,078 parameters), on one
# CPU thread unless --threads says otherwise: its 8-channel convolutions gain little from more,
# and on a shared machine an OpenMP team with a busy core stalls at every barrier.
TINY = dict(width=32, zdim=4, num_mixtures=3, bottleneck_multiple=0.25, no_bias_above=64, custom_width_str='',
            enc_blocks='32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2', dec_blocks='1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2',
            n_batch=8, threads=1)
TINY_PRESET = 'bench_tiny'  # registered only while bench.parse resolves --tiny

RANGES = {'steps': (at_least(1), '>= 1'), 'warmup': (at_least(0), '>= 0'), 'eval_steps': (at_least(1), '>= 1'),
          'sample_steps': (at_least(1), '>= 1'), 'n_sample': (at_least(0), '>= 0 (0: the evaluation batch size)'),
          'peak_tflops': (at_least(0), '>= 0 (0: the GPU table)'), 'repeat': (at_least(1), '>= 1')}
CHILD_FLAG = '--run-one-config'  # internal: bench.py --run-one-config CONFIG.json RESULT.json
COLUMNS = ['config', 'batch', 'train it/s', 'train img/s', 'eval img/s', 'sample img/s', 'peak mem MiB',
           'GFLOP/img', 'train TFLOP/s', '% of peak', 'kernels/step', 'GPU busy %', 'warm-up s']
ALL_PRESETS = ['cifar10', 'imagenet32', 'imagenet64', 'ffhq256', 'ffhq1024']


def bench_arguments(parser):
    a = parser.add_argument
    a('--tiny', action='store_true', help=f'the tests\' tiny32 model (same as --hps {TINY_PRESET}): {TINY}')
    a('--steps', type=int, default=10, help='timed training steps')
    a('--warmup', type=int, default=3,
      help='untimed training steps first (compilation, allocator, optimizer state); at least the step\'s own warm-up '
           '(--cuda_graphs: its eager steps, the capture and one replay, 5)')
    a('--eval_steps', type=int, default=3, help='timed evaluation batches (after one untimed)')
    a('--sample_steps', type=int, default=2, help='timed unconditional-sample batches (after one untimed)')
    a('--n_sample', type=int, default=0, help='images per sampling call (0: the evaluation batch size)')
    a('--adam_impl', choices=['train', 'default', 'fused', 'foreach', 'for-loop'], default='train',
      help='AdamW implementation: "train" = train_step.make_optimizer (fused on CUDA and CPU); '
           '"default" = torch.optim.AdamW\'s own choice (foreach on CUDA, for-loop on CPU)')
    a('--cpu_heap', choices=['keep', 'default'], default='keep',
      help='CPU runs: "keep" = glibc malloc keeps freed memory for reuse (utils.keep_freed_heap, as train.py); '
           '"default" = glibc\'s own mmap/trim thresholds')
    a('--compare', action='store_true',
      help='also run the plain baseline (fp32, eager, NCHW, no checkpointing, default AdamW, glibc\'s default '
           'heap) on the same model and batch first, and print the speedup of the chosen configuration over it; each '
           'configuration then runs in a fresh process (clean memory peak)')
    a('--peak_tflops', type=float, default=0.0,
      help='declared peak TFLOP/s of the device for the %% of peak column (default: the GPU table; n/a on CPU)')
    a('--repeat', type=int, default=1,
      help='measure each configuration this many times, alternating, and report medians (for noisy machines)')
    a('--cudnn_benchmark', choices=['train', 'off'], default='train',
      help='CUDA runs: "train" = cuDNN times its convolution algorithms for these fixed shapes, as train.py '
           '(utils.configure_device); "off" = cuDNN\'s heuristic choice, as the release')
    a('--json', type=str, default=None, help='also write every figure to this JSON file')
    a('--presets', type=str, default='',
      help='comma-separated presets measured one after the other with the same flags, one table (instead of --hps)')
    a('--all_presets', action='store_true', help=f'--presets {",".join(ALL_PRESETS)}')
    a('--profile_steps', type=int, default=2,
      help='training steps profiled after the timed ones for kernels/step and GPU busy %% (0: skip)')
    return parser


def parse(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    tiny = '--tiny' in argv
    if tiny:
        if any(x == '--hps' or x.startswith('--hps=') or x.startswith('--hparam_sets') for x in argv):
            raise UserError('--tiny is a preset of its own; give either --tiny or --hps')
        argv = ['--hps', TINY_PRESET] + argv
        HPARAMS_REGISTRY[TINY_PRESET] = Hyperparams(HPARAMS_REGISTRY['cifar10'], **TINY)
    try:
        H = get_hparams(argv, bench_arguments(argparse.ArgumentParser(description=__doc__.split('\n')[0])))
    finally:
        if tiny:  # leave the registry as hps.py made it (checkpoints.guess_preset walks it)
            del HPARAMS_REGISTRY[TINY_PRESET]
    check_ranges(H, RANGES)
    if H.device == 'auto':
        H.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if H.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA device is visible to this PyTorch build')
    H.skip_threshold = -1  # time every update; a random model's grad norm may exceed the preset's threshold
    if H.cuda_graphs and (H.device != 'cuda' or H.precision == 'fp16' or H.compile or H.adam_impl != 'train'):
        raise UserError('--cuda_graphs needs --device cuda, --precision fp32 or bf16, no --compile and '
                        '--adam_impl train (a capturable fused AdamW)')
    return H


def baseline_of(H):
    """The release's way of running the same model and batch: fp32, eager, NCHW, no
    checkpointing, torch's default AdamW, glibc's default heap settings."""
    B = Hyperparams(H)
    B.update(precision='fp32', compile=False, channels_last=False, grad_checkpoint=False, adam_impl='default',
             cudnn_benchmark='off', cpu_heap='default', cuda_graphs=False)
    return B


# ----------------------------------------------------------------------------- report

def kernels_cell(r):
    """Device kernels per step on a GPU, aten ops per step on the CPU."""
    n = r['device_kernels_per_step'] if r['device_kernels_per_step'] is not None else r['aten_ops_per_step']
    return '' if n is None else f'{n:.0f}'


def fmt_row(r):
    pct = f'{100 * r["train_fraction_of_peak"]:.1f}' if r['train_fraction_of_peak'] is not None else 'n/a'
    busy = f'{100 * r["device_busy_fraction"]:.0f}' if r['device_busy_fraction'] is not None else ''
    return [r['label'], str(r['batch']), f'{r["train_steps_per_s"]:.3g}', f'{r["train_images_per_s"]:.4g}',
            f'{r["eval_images_per_s"]:.4g}', f'{r["sample_images_per_s"]:.4g}',
            f'{r["train_peak_mem_bytes"] / 2 ** 20:.0f}', f'{r["train_flops_per_image"] / 1e9:.4g}',
            f'{r["train_tflops"]:.3g}', pct, kernels_cell(r), busy, f'{r["warmup_s"]:.1f}']


def print_table(rows):
    cells = [COLUMNS] + [fmt_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for j, c in enumerate(cells):
        print('  '.join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            print('  '.join('-' * w for w in widths))


def run_in_fresh_process(C, flops):
    """run_config in a new interpreter, so that its memory peak, allocator and compile
    caches owe nothing to the configuration measured before it."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg, out = os.path.join(tmp, 'config.json'), os.path.join(tmp, 'result.json')
        with open(cfg, 'w') as f:
            json.dump(dict(H=dict(C), flops=flops), f)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), CHILD_FLAG, cfg, out])
        if p.returncode != 0:
            raise UserError(f'the run of configuration "{describe(C)}" failed (exit status {p.returncode})')
        with open(out) as f:
            return json.load(f)


def set_up_process(H):
    """train.py's set-up of this process for the device (utils.configure_device: on the CPU
    threads and a heap kept for reuse, on CUDA cuDNN's autotuner), less what --cpu_heap default
    or --cudnn_benchmark off turn back to the release's way; CPU threads also on CUDA with --threads."""
    configure_device(torch.device(H.device), H.threads, keep_heap=H.cpu_heap == 'keep')
    if H.device == 'cuda':
        torch.backends.cudnn.benchmark = H.cudnn_benchmark == 'train'
        if H.threads:
            torch.set_num_threads(H.threads)


def child_main(cfg_path, out_path):
    with open(cfg_path) as f:
        cfg = json.load(f)
    C = Hyperparams(cfg['H'])
    set_up_process(C)
    r = run_config(C, torch.device(C.run_device), cfg['flops'])
    with open(out_path, 'w') as f:
        json.dump(r, f, default=str)


def median_row(runs):
    """One row from repeated runs of a configuration: the median of every measured figure."""
    row = dict(runs[0])
    for k, v in row.items():
        if k.endswith(('_per_s', '_bytes', '_tflops', '_ms_median', 'warmup_s', 'train_s', '_of_peak', '_per_step',
                       '_busy_fraction')) and v is not None:
            row[k] = statistics.median(r[k] for r in runs)
    row['repeats'] = runs
    return row


def measure(H, prefix='', separate=False):
    """Run H's configuration (and with --compare the plain baseline first); returns the
    result dict, its table rows under 'results' (labels start with ``prefix``)."""
    device = torch.device('cuda', torch.cuda.current_device()) if H.device == 'cuda' else torch.device('cpu')
    H.run_device = str(device)
    flops = flops_per_image(H)
    with torch.device('meta'):
        n_params = VAE(H).num_params()
    configs = ([('plain fp32 eager', baseline_of(H))] if H.compare else []) + [
        (('chosen: ' if H.compare else '') + describe(H), H)]
    separate = separate or H.compare or H.repeat > 1
    print(f'bench: --hps {H.hparam_sets}, {n_params:,} parameters, {H.image_size}x{H.image_size}x{H.image_channels}, '
          f'batch {H.n_batch}, device {device} ({device_name(device)}), torch {torch.__version__}'
          + (f'; each configuration in a fresh process, {H.repeat} time(s), alternating; medians' if separate else ''),
          flush=True)
    runs = {label: [] for label, _ in configs}
    for _ in range(H.repeat):
        for label, C in configs:
            r = run_in_fresh_process(C, flops) if separate else run_config(C, device, flops)
            runs[label].append(dict(r, label=prefix + label))
    rows = [median_row(runs[label]) if separate else runs[label][0] for label, _ in configs]
    result = dict(device=str(device), device_name=device_name(device), torch=torch.__version__,
                  threads=torch.get_num_threads(), hps=H.hparam_sets, n_params=n_params,
                  image_shape=[H.image_size, H.image_size, H.image_channels], flops=flops,
                  arch={k: H[k] for k in ARCH_KEYS}, repeat=H.repeat, results=rows)
    if H.compare:
        b, c = rows
        result['speedup'] = {k: c[k] / b[k] for k in ['train_images_per_s', 'eval_images_per_s',
                                                       'sample_images_per_s']}
        result['memory_ratio'] = c['train_peak_mem_bytes'] / b['train_peak_mem_bytes']
    return result


def print_notes(result):
    flops, r = result['flops'], result['results'][-1]
    print(f'GFLOP/img = model FLOPs of one training step per image (forward {flops["forward"] / 1e9:.4g} + backward '
          f'{flops["backward"] / 1e9:.4g}; {flops["source"]}; convolutions only, recomputation not counted); '
          f'eval {r["eval_tflops"]:.3g} TFLOP/s, sampling {flops["sample"] / 1e9:.4g} GFLOP/img = '
          f'{r["sample_tflops"]:.3g} TFLOP/s')
    cuda = result['device'].startswith('cuda')
    print(f'peak mem = {"CUDA max allocated" if cuda else "process peak RSS"} during training '
          f'steps; % of peak against {r["peak_source"]}; eval fp32 no_grad batch {r["eval_batch"]}, '
          f'sampling batch {r["sample_batch"]}')
    print('kernels/step = ' + ('device kernels (with memcpy/memset) per training step, torch.profiler; GPU busy % = '
                               'their summed time / the timed step time' if cuda else
                               'aten operators per training step (forward, backward, clip, AdamW, EMA; counted at '
                               'the dispatcher); GPU busy %: GPU only'))


def print_speedup(result, prefix=''):
    if 'speedup' not in result:
        return
    b, c = result['results']
    s = result['speedup']
    print(f'{prefix}speedup over plain fp32 eager: train {s["train_images_per_s"]:.2f}x, eval '
          f'{s["eval_images_per_s"]:.2f}x, sampling {s["sample_images_per_s"]:.2f}x; training peak memory '
          f'{result["memory_ratio"]:.2f}x ({(c["train_peak_mem_bytes"] - b["train_peak_mem_bytes"]) / 2 ** 20:+.0f} '
          f'MiB)')


def preset_argv(argv):
    """argv without --presets/--all_presets (and their value), for one preset's run."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == '--presets':
            skip = True
        elif a != '--all_presets' and not a.startswith('--presets='):
            out.append(a)
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD_FLAG]:
        return child_main(*argv[1:3])
    H = parse(argv)
    set_up_process(H)
    presets = ALL_PRESETS if H.all_presets else [p for p in H.presets.split(',') if p]
    if not presets:
        result = measure(H)
        print_table(result['results'])
        print_notes(result)
        print_speedup(result)
    else:  # one preset after the other, each configuration in a fresh process, one table
        if '--tiny' in argv or any(a in ('--hps', '--hparam_sets') or a.startswith(('--hps=', '--hparam_sets='))
                                   for a in argv):
            raise UserError('--presets/--all_presets choose the presets themselves; drop --hps/--tiny')
        t0 = time.perf_counter()
        results = {name: measure(parse(['--hps', name] + preset_argv(argv)), prefix=f'{name}: ', separate=True)
                   for name in presets}
        print_table([r for res in results.values() for r in res['results']])
        print_notes(results[presets[-1]])
        for name, res in results.items():
            print_speedup(res, prefix=f'{name}: ')
        print(f'{len(presets)} presets measured in {time.perf_counter() - t0:.0f} s')
        result = dict(presets=results, wall_s=time.perf_counter() - t0)
    if H.json:
        write_text(H.json, json.dumps(result, indent=1, default=str))
        print(f'wrote {H.json}')
    return result


if __name__ == '__main__':
    run_main(main)
