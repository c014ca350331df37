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
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import data
import train_step
from hps import HPARAMS_REGISTRY, Hyperparams, UserError, at_least, check_ranges, get_hparams
from utils import Dist, configure_device, cudnn_conv_precision, first_sentence, ieee_fp32, run_main, write_text
from vae import VAE

# The reference tests' tiny32 model (width 32, 13 decoder blocks, 135,078 parameters), on one
# CPU thread unless --threads says otherwise: its 8-channel convolutions gain little from more,
# and on a shared machine an OpenMP team with a busy core stalls at every barrier.
TINY = dict(width=32, zdim=4, num_mixtures=3, bottleneck_multiple=0.25, no_bias_above=64, custom_width_str='',
            enc_blocks='32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2', dec_blocks='1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2',
            n_batch=8, threads=1)
TINY_PRESET = 'bench_tiny'  # registered only while bench.parse resolves --tiny

# FLOPs per image (forward, backward) of the release presets, from the release's flops.json
# (tests/reference/flops.json)
# (FlopCounterMode on meta tensors, torch 2.13); counting gives the same numbers.
RELEASE_FLOPS = {
    'cifar10': (44_785_483_776, 89_549_733_888),
    'imagenet32': (140_663_652_352, 281_298_993_152),
    'imagenet64': (298_275_307_520, 596_437_368_832),
    'ffhq256': (1_144_052_187_136, 2_286_292_434_944),
    'ffhq1024': (754_485_231_616, 1_508_064_493_568),
}
ARCH_KEYS = ['width', 'zdim', 'enc_blocks', 'dec_blocks', 'custom_width_str', 'bottleneck_multiple',
             'no_bias_above', 'num_mixtures', 'image_size', 'image_channels', 'dataset']

# Dense peak TFLOP/s by GPU and arithmetic: bf16/fp16 tensor cores, TF32 tensor cores
# (fp32 convs/matmuls with TF32 allowed), plain fp32.  SXM parts; PCIe parts are lower.
GPU_PEAKS = {
    'H100': dict(bf16=989.0, fp16=989.0, tf32=495.0, fp32=67.0),
    'H200': dict(bf16=989.0, fp16=989.0, tf32=495.0, fp32=67.0),
    'A100': dict(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
}

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


# ----------------------------------------------------------------------------- FLOPs

def release_preset_of(H):
    """The release preset whose architecture H has, or None."""
    for name in RELEASE_FLOPS:
        ref = HPARAMS_REGISTRY[name]
        if all(H[k] == ref.get(k, H[k]) for k in ARCH_KEYS):
            return name
    return None


def count_flops(H, training=True):
    """Model FLOPs per image, counted on the meta device with batch 1 (no memory, no
    compute): (forward = evaluation, backward, one unconditional sample); the first two
    are None unless ``training``."""
    with torch.device('meta'):
        model = VAE(H)
        x = torch.zeros(1, H.image_size, H.image_size, H.image_channels)
    fwd = bwd = None
    if training:
        counter = FlopCounterMode(display=False)
        with counter:
            loss = model(x, x)['elbo']
        fwd = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            loss.backward()
        bwd = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.decoder.out_net(model.decoder.forward_uncond(1, t=1.0))
    return fwd, bwd, counter.get_total_flops()


def flops_per_image(H):
    name = release_preset_of(H)
    fwd, bwd, sample = count_flops(H, training=name is None)
    if name is not None:
        fwd, bwd = RELEASE_FLOPS[name]
        return dict(forward=fwd, backward=bwd, sample=sample, source=f'release flops.json ({name})')
    return dict(forward=fwd, backward=bwd, sample=sample, source='FlopCounterMode on meta')


# ----------------------------------------------------------------------------- device facts

def device_peak(H, device, precision):
    """(peak TFLOP/s or None, which peak) for the training arithmetic."""
    if H.peak_tflops > 0:
        return H.peak_tflops, f'declared --peak_tflops {H.peak_tflops:g}'
    if device.type != 'cuda':
        return None, 'n/a on CPU (declare one with --peak_tflops)'
    name = torch.cuda.get_device_name(device)
    kind = precision if precision != 'fp32' else ('tf32' if convs_use_tf32() else 'fp32')
    for gpu, peaks in GPU_PEAKS.items():
        if gpu in name:
            return peaks[kind], f'{gpu} SXM dense {kind} {peaks[kind]:g} TFLOP/s'
    return None, f'unknown peak for {name} (declare one with --peak_tflops)'


def convs_use_tf32():
    """Whether cuDNN may run fp32 convolutions in TF32 (PyTorch's default)."""
    return cudnn_conv_precision() == 'tf32'


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{model}, {torch.get_num_threads()} thread(s)'


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_memory(device):
    """Bytes: CUDA max allocated since the last reset; CPU peak RSS (VmHWM, else ru_maxrss)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- one configuration

def make_optimizer(H, model, device):
    if H.adam_impl == 'train':
        return train_step.make_optimizer(H, model, device)
    kw = {'default': {}, 'fused': dict(fused=True), 'foreach': dict(foreach=True),
          'for-loop': dict(foreach=False)}[H.adam_impl]
    return torch.optim.AdamW(model.parameters(), weight_decay=H.wd, lr=H.lr, betas=(H.adam_beta1, H.adam_beta2),
                             eps=1e-8, **kw)


def describe(H):
    parts = [H.precision]
    if H.channels_last:
        parts.append('channels_last')
    if H.compile:
        parts.append(f'compile:{H.compile_scope}' + (f':{H.compile_mode}' if H.compile_mode else ''))
    if H.grad_checkpoint:
        parts.append('grad_checkpoint')
    if H.cuda_graphs:
        parts.append('cuda_graphs')
    if H.device == 'cuda' and H.cudnn_benchmark == 'off':
        parts.append('cudnn_benchmark:off')
    parts.append(f'adam:{H.adam_impl}')
    if H.device == 'cpu':
        parts.append(f'heap:{H.cpu_heap}')
    return ' '.join(parts)


def timed(fn, n, device):
    """Run fn n times between device synchronisations; (total seconds, per-call seconds;
    the latter are exact on the CPU, and host (queueing) times on a GPU, where the training
    step does not wait for the device)."""
    times = []
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    sync(device)
    return time.perf_counter() - start, times


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that reach the backends (below autograd: the forward's and
    the backward's), in total and without the view operators (which launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.total = self.compute = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.compute += not func.is_view
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn):
    """(aten ops, non-view aten ops) of one call of fn, or (None, None) where the counting
    mode cannot run it (e.g. some compiled code)."""
    counter = OpCounter()
    try:
        with counter:
            fn()
    except Exception as e:  # a measurement aid: report the gap instead of failing the benchmark
        print(f'note: aten ops not counted ({type(e).__name__}: {first_sentence(e)})', flush=True)
        return None, None
    return counter.total, counter.compute


def step_profile(one_step, device, n, step_s):
    """kernels/step and GPU busy % of the training step.  On every device: aten ops per step
    (OpCounter over one step).  On CUDA also, from torch.profiler over n steps: device
    activities per step (kernels, memcpy, memset) and their summed time, as a fraction of
    ``step_s`` (the timed, unprofiled seconds per step): the GPU-busy fraction."""
    ops, compute_ops = count_aten_ops(one_step)
    sync(device)
    out = dict(aten_ops_per_step=ops, aten_compute_ops_per_step=compute_ops, device_kernels_per_step=None,
               device_kernel_s_per_step=None, device_busy_fraction=None)
    if device.type == 'cuda' and n > 0:
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(n):
                one_step()
            sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / n
        out.update(device_kernels_per_step=len(kernels) / n, device_kernel_s_per_step=busy,
                   device_busy_fraction=busy / step_s)
    return out


def run_config(H, device, flops):
    """Build, warm up and time one configuration; returns a dict of figures."""
    dist_info = Dist(device=device)
    t_build = time.perf_counter()
    model, ema = train_step.build_models(H, dist_info)
    optimizer = make_optimizer(H, model, device)
    scaler = torch.amp.GradScaler(device.type) if H.precision == 'fp16' else None
    ctx = train_step.precision_context(H, device)
    net = train_step.wrap_for_training(H, model, dist_info)  # torch.compile per --compile_scope, as train.py
    gen = torch.Generator().manual_seed(H.seed)
    shape = (H.n_batch, H.image_size, H.image_size, H.image_channels)
    batch = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
    n_eval = H.n_batch_eval or 4 * H.n_batch
    eval_batch = torch.randint(0, 256, (n_eval,) + shape[1:], dtype=torch.uint8, generator=gen).to(device)
    n_sample = H.n_sample or n_eval
    it = [0]
    last = {}

    step = train_step.make_step(H, net, model, ema, optimizer, scaler, ctx)  # train.py's (a CUDA graph: --cuda_graphs)

    def one_step():
        stats, _ = step(batch, train_step.learning_rate(H, it[0]))
        it[0] += 1
        last.update(stats)

    model.train()
    warmup = max(H.warmup, step.warmup_calls)  # with --cuda_graphs: the eager steps, the capture and a replay
    for _ in range(warmup):
        one_step()
    sync(device)
    warmup_s = time.perf_counter() - t_build
    reset_peak(device)
    total, per_step = timed(one_step, H.steps, device)
    mem_train = peak_memory(device)
    out = dict(config=describe(H), batch=H.n_batch, precision=H.precision, channels_last=H.channels_last,
               compile=H.compile, compile_scope=H.compile_scope if H.compile else None,
               compile_mode=H.compile_mode, grad_checkpoint=H.grad_checkpoint, adam_impl=H.adam_impl,
               optimizer=type(optimizer).__name__ + ('(fused)' if optimizer.defaults.get('fused') else
                                                     '(foreach)' if optimizer.defaults.get('foreach') else ''),
               warmup_s=warmup_s, warmup_steps=warmup, train_steps=H.steps, train_s=total,
               train_steps_per_s=H.steps / total, train_images_per_s=H.steps * H.n_batch / total,
               train_step_ms_median=1000 * statistics.median(per_step), train_peak_mem_bytes=mem_train,
               last_elbo=float(last['elbo']), last_grad_norm=float(last['grad_norm']))
    out.update(step_profile(one_step, device, H.profile_steps, total / H.steps))

    # evaluation and sampling: the EMA model in IEEE fp32 (no TF32) under no_grad, as evaluation.evaluate and sample.py
    ema.eval()
    with torch.no_grad(), ieee_fp32():
        def eval_step():
            x_in, x_target = data.preprocess(H, eval_batch)
            ema.forward_per_image(x_in, x_target)['elbo'].sum()
        eval_step()
        reset_peak(device)
        total, _ = timed(eval_step, H.eval_steps, device)
        out.update(eval_batch=n_eval, eval_images_per_s=H.eval_steps * n_eval / total,
                   eval_peak_mem_bytes=peak_memory(device))

        def sample_step():
            ema.forward_uncond_samples(n_sample, t=H.temperature)
        sample_step()
        reset_peak(device)
        total, _ = timed(sample_step, H.sample_steps, device)
        out.update(sample_batch=n_sample, sample_images_per_s=H.sample_steps * n_sample / total,
                   sample_peak_mem_bytes=peak_memory(device))

    peak, peak_source = device_peak(H, device, H.precision)
    train_flops = flops['forward'] + flops['backward']
    out.update(train_flops_per_image=train_flops, eval_flops_per_image=flops['forward'],
               sample_flops_per_image=flops['sample'],
               train_tflops=train_flops * out['train_images_per_s'] / 1e12,
               eval_tflops=flops['forward'] * out['eval_images_per_s'] / 1e12,
               sample_tflops=flops['sample'] * out['sample_images_per_s'] / 1e12,
               peak_tflops=peak, peak_source=peak_source,
               tf32_convs=convs_use_tf32() if device.type == 'cuda' else None)
    out['train_fraction_of_peak'] = out['train_tflops'] / peak if peak else None
    del model, ema, optimizer, net
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return out


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
