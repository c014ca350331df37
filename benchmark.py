"""The measurements of bench.py, one configuration at a time: FLOPs per image (counted on the
meta device, or the release's flops.json for its presets), the device's facts (peak TFLOP/s,
name, peak memory), and run_config: build, warm up and time the training step, the evaluation
pass and sampling of one configuration, with its aten-operator count and, on CUDA, its kernels
and GPU-busy fraction.  bench.py (flags, fresh processes, medians, the table) is its command line.

    flops = flops_per_image(H)
    figures = run_config(H, torch.device('cuda'), flops)   # {'train_images_per_s': ..., ...}
"""
import platform
import resource
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import data
import train_step
from hps import HPARAMS_REGISTRY
from utils import Dist, cudnn_conv_precision, first_sentence, ieee_fp32
from vae import VAE

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
